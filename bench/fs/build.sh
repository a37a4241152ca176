#!/usr/bin/env bash
# bench/fs/build.sh OUTDIR: the fs row's guest. Debian's cloud kernel, which every other row
# boots, has no 9p (CONFIG_NET_9P is not set), and QEMU's 9p is this row's peer: so this row
# boots Debian 12's generic kernel (the package linux-image-amd64 depends on) under both
# VMMs. Makes OUTDIR/bzImage-generic and OUTDIR/initrd-fs.img (busybox, bench/fs/init as
# /init, the kernel's virtio, virtio-fs and 9p modules, and bench/fs/tree.py's tree as
# /tree.tar), and prints "ENTRIES MD5" of the tree (what the guest checks against).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
source "$repo/lab/lib.sh"
out=${1:?usage: bench/fs/build.sh OUTDIR}
ensure_cmds cpio:cpio gzip:gzip dpkg-deb:dpkg python3:python3
"$repo/lab/fetch.sh" >/dev/null   # busybox, and apt's package lists
DEBS=$LGUEST_CACHE/debs
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\..*-amd64$/ && !n++ {print $2}')
if [[ -z $kpkg ]]; then
    kdeb=$(compgen -G "$DEBS/linux-image-6.1.*[0-9]-amd64_*.deb" | sort -V | tail -n1 || true)
    [[ -n $kdeb ]] || die "cannot resolve linux-image-amd64 (no apt lists, nothing cached)"
else
    kdeb=$(compgen -G "$DEBS/${kpkg}_*.deb" | sort -V | tail -n1 || true)
    if [[ -z $kdeb ]]; then
        note "downloading $kpkg"
        (cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" >&2)
        kdeb=$(compgen -G "$DEBS/${kpkg}_*.deb" | sort -V | tail -n1)
    fi
fi
mkdir -p "$out"
if stale "$out/initrd-fs.img" "$kdeb" "$here" "$repo/bench/vng/kernel-tree.sh" "$LGUEST_CACHE/busybox"; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    dpkg-deb --fsys-tarfile "$kdeb" | tar x -C "$tmp" --wildcards './boot/vmlinuz-*' \
        './lib/modules/*/kernel/drivers/virtio/*' './lib/modules/*/kernel/fs/fuse/*' './lib/modules/*/kernel/fs/9p/*' \
        './lib/modules/*/kernel/net/9p/*' './lib/modules/*/kernel/fs/netfs/*' './lib/modules/*/kernel/fs/fscache/*' \
        './lib/modules/*/modules.*' './lib/modules/*/kernel/fs/overlayfs/*' './lib/modules/*/kernel/net/vmw_vsock/*' \
        './lib/modules/*/kernel/drivers/char/virtio_console.ko' './lib/modules/*/kernel/drivers/net/*failover.ko' \
        './lib/modules/*/kernel/drivers/net/virtio_net.ko' './lib/modules/*/kernel/net/core/failover.ko'
    root=$tmp/root
    mkdir -p "$root"/{bin,proc,sys,dev,mnt,tmp,modules}
    install -m 755 "$LGUEST_CACHE/busybox" "$root/bin/busybox"
    install -m 755 "$here/init" "$root/init"
    install -m 644 "$here/phases.sh" "$root/phases.sh"
    for m in virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci fuse virtiofs netfs fscache \
        9pnet 9pnet_virtio 9p; do
        ko=$(find "$tmp/lib/modules" -name "$m.ko" | head -n1)
        [[ -n $ko ]] || die "$(basename "$kdeb") has no $m.ko"
        cp "$ko" "$root/modules/"
    done
    python3 "$here/tree.py" "$root/tree.tar" >"$out/tree.meta"
    cp "$root/tree.tar" "$out/tree.tar"
    (cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1 >"$out/initrd-fs.img.new"
    cp "$(compgen -G "$tmp/boot/vmlinuz-*")" "$out/bzImage-generic"
    ver=$(basename "$(compgen -G "$tmp/lib/modules/*")")
    "$repo/bench/vng/kernel-tree.sh" "$out/bzImage-generic" "$tmp/lib/modules/$ver" "$ver" "$out/k-generic" ||
        die "cannot lay out the generic kernel for vng in $out/k-generic"
    mv "$out/initrd-fs.img.new" "$out/initrd-fs.img"
fi
cat "$out/tree.meta"
