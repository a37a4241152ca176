#!/usr/bin/env bash
# bench/overlay.sh OUTDIR TCP_RR: the benchmark guest's initramfs images and the lab's extra
# modules, built from the reference guest (guest/build.sh) without touching it.
#   OUTDIR/initrd-idle.img  the reference initramfs + the overlay: bench/guest/init as /init,
#                           the virtio modules (pci, blk, net, rng) and their load order
#   OUTDIR/initrd-disk.img  the same + fio with its shared libraries (Debian's fio links
#                           ~80 MB of them: this image is for guests of 512 MiB or more)
#   OUTDIR/initrd-net.img   the same + iperf3 with its libraries + TCP_RR (a static binary)
#   OUTDIR/lab-mods/        vhost_net and its dependencies for the lab machine (QEMU vhost=on),
#                           with their load order in lab-mods/order
# Each image is the reference cpio.gz, zero-padded to a 512-byte boundary (the kernel only
# looks for the next archive at 4-byte alignment), then uncompressed cpio archives: the
# kernel unpacks them in turn, later files replacing earlier ones. Installs fio and iperf3
# (apt) when missing. Prints nothing; rebuilds only what is older than its inputs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
source "$repo/lab/lib.sh"

(($# == 2)) || die "usage: bench/overlay.sh OUTDIR TCP_RR"
out=$1 tcp_rr=$2
[[ -x $tcp_rr ]] || die "$tcp_rr: not an executable (build bench-tools first)"
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

# The overlay every image has: /init and the virtio modules.
base=$out/overlay-base.cpio
if stale "$base" "$here/guest/init" "$here/overlay.sh" "$kdir/.from"; then
    s=$stage/base
    mkdir -p "$s/etc"
    install -m 755 "$here/guest/init" "$s/init"
    mod_deps "$kdir/modules" virtio_pci virtio_blk virtio_net virtio-rng >"$s/etc/bench-modules.order"
    while read -r m; do
        install -D -m 644 "$kdir/modules/$m" "$s/lib/modules/$ver/$m"
    done <"$s/etc/bench-modules.order"
    mkcpio "$s" "$base"
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

# The lab's vhost_net (its kernel is the same Debian kernel as the guest's).
if stale "$out/lab-mods/order" "$kdir/.from" "$here/overlay.sh"; then
    rm -rf "$out/lab-mods"
    mkdir -p "$out/lab-mods"
    mod_deps "$kdir/modules" vhost_net >"$out/lab-mods/order"
    while read -r m; do
        install -D -m 644 "$kdir/modules/$m" "$out/lab-mods/$m"
    done <"$out/lab-mods/order"
fi
