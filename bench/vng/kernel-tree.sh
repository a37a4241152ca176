#!/usr/bin/env bash
# bench/vng/kernel-tree.sh BZIMAGE MODULES VERSION OUTDIR: a kernel laid out as virtme-ng
# finds one (an unpacked kernel package): OUTDIR/boot/vmlinuz-VERSION and, as
# ../lib/modules/VERSION from it, the modules a vng or `lguest exec` guest loads (virtio,
# fuse/virtiofs, overlay, vsock, virtio_console for vng's stdio ports, virtio_net), taken
# from MODULES (that kernel's lib/modules/VERSION) and indexed by kmod's depmod, as a kernel
# package's postinst would. Row 12 (bench/vng/build.sh) makes one of the reference kernel,
# row 11 (bench/fs/build.sh) one of Debian's generic kernel, which its vng boots.
set -euo pipefail
bzimage=${1:?usage: kernel-tree.sh BZIMAGE MODULES VERSION OUTDIR} modules=${2:?} ver=${3:?}
out=$(realpath -m "${4:?}")   # absolute: the copy below runs in MODULES
mods=$out/lib/modules/$ver
rm -rf "$out"
install -D -m 644 "$bzimage" "$out/boot/vmlinuz-$ver"
mkdir -p "$mods"
(cd "$modules" && cp --parents -r modules.builtin modules.builtin.modinfo modules.order \
    kernel/drivers/virtio kernel/fs/fuse kernel/fs/overlayfs kernel/net/vmw_vsock \
    kernel/drivers/char/virtio_console.ko kernel/drivers/net/virtio_net.ko \
    kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko "$mods/")
/usr/sbin/depmod -b "$out" "$ver" || { echo "kernel-tree.sh: depmod failed for $mods" >&2; exit 1; }
