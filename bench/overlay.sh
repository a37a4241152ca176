#!/usr/bin/env bash
# bench/overlay.sh OUTDIR TCP_RR VSOCK_IO: the benchmark guest's initramfs images and the
# lab's extra modules, built from the reference guest (guest/build.sh) without touching it.
#   OUTDIR/initrd-idle.img  the reference initramfs + the overlay: bench/guest/init as /init,
#                           the virtio modules (pci, blk, net, rng) and their load order
#   OUTDIR/initrd-disk.img  the same + fio with its shared libraries (Debian's fio links
#                           ~80 MB of them: this image is for guests of 512 MiB or more)
#   OUTDIR/initrd-net.img   the same + iperf3 with its libraries + TCP_RR (a static binary)
#   OUTDIR/initrd-usernet.img  initrd-idle + VSOCK_IO (static)
#   OUTDIR/initrd-vsock.img the same + the vsock modules (vsock, the virtio transport), with
#                           a module load order that has them
#   OUTDIR/lab-mods/        vhost_net, vhost_vsock and their dependencies for the lab machine
#                           (QEMU vhost=on, vhost-vsock-pci), with their load order in lab-mods/order
# Each image is the reference cpio.gz, zero-padded to a 512-byte boundary (the kernel only
# looks for the next archive at 4-byte alignment), then uncompressed cpio archives: the
# kernel unpacks them in turn, later files replacing earlier ones. Installs fio and iperf3
# (apt) when missing. Prints nothing; rebuilds only what is older than its inputs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
source "$repo/lab/lib.sh"

(($# == 3)) || die "usage: bench/overlay.sh OUTDIR TCP_RR VSOCK_IO"
out=$1 tcp_rr=$2 vsock_io=$3
for b in "$tcp_rr" "$vsock_io"; do [[ -x $b ]] || die "$b: not an executable (build bench-tools first)"; done
ensure_cmds fio:fio iperf3:iperf3 cpio:cpio ldd:libc-bin
kdir=$LGUEST_CACHE/kernel
# The reference initramfs: guest/build.sh's third line (it lives in a folder named after
# its inputs, so a stale file at a fixed path can never stand in for it).
ref=$("$repo/guest/build.sh" | sed -n 3p)
[[ -f $ref ]] || die "guest/build.sh did not give an initramfs"
ver=$(cat "$kdir/version")
mkdir -p "$out"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# modules_cpio CPIO MODULE...: the modules (with their dependencies) and their load order
# as /etc/bench-modules.order (a later archive's order replaces an earlier one's).
modules_cpio() {
    local cpio=$1 s=$stage/${1##*/} m; shift
    mkdir -p "$s/etc"
    mod_deps "$kdir/modules" "$@" >"$s/etc/bench-modules.order"
    while read -r m; do
        install -D -m 644 "$kdir/modules/$m" "$s/lib/modules/$ver/$m"
    done <"$s/etc/bench-modules.order"
    mkcpio "$s" "$cpio"
}

# The overlay every image has: /init and the virtio modules.
base=$out/overlay-base.cpio
virtio_mods=(virtio_pci virtio_blk virtio_net virtio-rng)
if stale "$base" "$here/guest/init" "$here/overlay.sh" "$kdir/.from"; then
    install -D -m 755 "$here/guest/init" "$stage/${base##*/}/init"
    modules_cpio "$base" "${virtio_mods[@]}"
fi
# The vsock row's guest: the same modules and the vsock ones.
if stale "$out/overlay-vsock-mods.cpio" "$here/overlay.sh" "$kdir/.from"; then
    modules_cpio "$out/overlay-vsock-mods.cpio" "${virtio_mods[@]}" vmw_vsock_virtio_transport
fi

# tools_cpio NAME BINARY...: the binaries at /usr/bin with their libraries.
tools_cpio() {
    local name=$1 b; shift
    local cpio=$out/overlay-$name.cpio
    stale "$cpio" "$@" "$here/overlay.sh" || return 0
    local s=$stage/$name
    mkdir -p "$s"
    for b in "$@"; do copy_with_libs "$b" "$s" "usr/bin/${b##*/}"; done
    mkcpio "$s" "$cpio"
}
tools_cpio disk "$(command -v fio)"
tools_cpio net "$(command -v iperf3)" "$tcp_rr"
tools_cpio vsock-io "$vsock_io"

# image NAME PIECE...: the reference initramfs, padded, then the pieces.
image() {
    local img=$out/initrd-$1.img; shift
    stale "$img" "$ref" "$@" || return 0
    local size pad
    cp "$ref" "$img.tmp"
    size=$(stat -c %s "$img.tmp")
    pad=$(((512 - size % 512) % 512))
    head -c "$pad" /dev/zero >>"$img.tmp"
    cat "$@" >>"$img.tmp"
    mv "$img.tmp" "$img"
}
image idle "$base"
image disk "$base" "$out/overlay-disk.cpio"
image net "$base" "$out/overlay-net.cpio"
image usernet "$base" "$out/overlay-vsock-io.cpio"
image vsock "$base" "$out/overlay-vsock-io.cpio" "$out/overlay-vsock-mods.cpio"

# The lab's vhost_net and vhost_vsock (its kernel is the same Debian kernel as the guest's).
if stale "$out/lab-mods/order" "$kdir/.from" "$here/overlay.sh"; then
    rm -rf "$out/lab-mods"
    mkdir -p "$out/lab-mods"
    mod_deps "$kdir/modules" vhost_net vhost_vsock >"$out/lab-mods/order"
    while read -r m; do
        install -D -m 644 "$kdir/modules/$m" "$out/lab-mods/$m"
    done <"$out/lab-mods/order"
fi
