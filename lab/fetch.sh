#!/usr/bin/env bash
# lab/fetch.sh: download and unpack the Debian pieces the lab and the reference guest
# are built from, into ${LGUEST_CACHE:-$HOME/.cache/lguest}. Idempotent: nothing
# already in the cache is downloaded or unpacked again.
# Usage: lab/fetch.sh [--refresh]   (--refresh: move to the newest cloud kernel apt knows)
#
# Produces:
#   $CACHE/kernel/bzImage    Debian bookworm's cloud kernel (vmlinuz)
#   $CACHE/kernel/vmlinux    the ELF inside it (has the PVH entry note)
#   $CACHE/kernel/modules/   its /lib/modules/<version> tree, modules as plain .ko, with modules.dep
#   $CACHE/kernel/version    the <version>
#   $CACHE/busybox           busybox-static's binary
set -euo pipefail
source "$(dirname "$0")/lib.sh"

CACHE=$LGUEST_CACHE
DEBS=$CACHE/debs
mkdir -p "$DEBS"

ensure_cmds qemu-system-x86_64:qemu-system-x86 cpio:cpio lz4:lz4 xz:xz-utils zstd:zstd \
    readelf:binutils gzip:gzip dpkg-deb:dpkg flock:util-linux

# Several lab runs (parallel tests) may call us at once: one at a time.
exec 9>"$CACHE/.fetch.lock"
flock 9

# fetch_deb PACKAGE: prints the cached .deb of PACKAGE, downloading it if absent.
fetch_deb() {
    local deb
    deb=$(compgen -G "$DEBS/${1}_*.deb" | sort -V | tail -n1 || true)
    if [[ -z $deb ]]; then
        note "downloading $1"
        # -o Sandbox::User=root: _apt can't write into a cache under /root.
        (cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "$1" >&2)
        deb=$(compgen -G "$DEBS/${1}_*.deb" | sort -V | tail -n1)
    fi
    echo "$deb"
}

# The versioned kernel package that the cloud metapackage points at.
resolve_kernel() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\..*-cloud-amd64$/ && !n++ {print $2}'
}
kpkg=
# Once a kernel is unpacked, keep it (stable numbers, no apt look-up on every lab run)
# unless asked for the newest with --refresh.
if [[ ${1:-} != --refresh && -f $CACHE/kernel/.from ]]; then
    kpkg=$(cut -d_ -f1 "$CACHE/kernel/.from")
fi
[[ -n $kpkg ]] || kpkg=$(resolve_kernel)
if [[ -z $kpkg ]]; then
    # No package lists (fresh machine): fetch them. Offline, fall back to what is cached.
    apt-get update -q >&2 || true
    kpkg=$(resolve_kernel)
fi
if [[ -z $kpkg ]]; then
    cached=$(compgen -G "$DEBS/linux-image-6.1.*-cloud-amd64_*.deb" | sort -V | tail -n1 || true)
    [[ -n $cached ]] || die "cannot resolve linux-image-cloud-amd64 (no apt lists, nothing cached)"
    kpkg=$(basename "$cached"); kpkg=${kpkg%%_*}
fi

tmp=
trap '[[ -z $tmp ]] || rm -rf "$tmp"' EXIT

# --- busybox ---------------------------------------------------------------
bbdeb=$(fetch_deb busybox-static)
if stale "$CACHE/busybox" "$bbdeb"; then
    tmp=$(mktemp -d "$CACHE/.bb.XXXXXX")
    dpkg-deb -x "$bbdeb" "$tmp"
    install -m 755 "$tmp/bin/busybox" "$CACHE/busybox.new"
    mv "$CACHE/busybox.new" "$CACHE/busybox"
    rm -rf "$tmp"
fi

# --- kernel ------------------------------------------------------------------
kdeb=$(fetch_deb "$kpkg")
KDIR=$CACHE/kernel
if [[ $(cat "$KDIR/.from" 2>/dev/null) != "$(basename "$kdeb")" ]]; then
    note "unpacking $(basename "$kdeb")"
    tmp=$(mktemp -d "$CACHE/.kernel.XXXXXX")
    dpkg-deb -x "$kdeb" "$tmp/root"
    mkdir "$tmp/kernel"
    ver=$(basename "$(compgen -G "$tmp/root/lib/modules/*")")
    echo "$ver" >"$tmp/kernel/version"
    cp "$tmp/root/boot/vmlinuz-$ver" "$tmp/kernel/bzImage"
    cp "$tmp/root/boot/config-$ver" "$tmp/kernel/config"
    mv "$tmp/root/lib/modules/$ver" "$tmp/kernel/modules"

    # Bookworm ships plain .ko; later Debians compress them (.ko.xz), which busybox
    # insmod can't load. Decompress whatever is compressed, so users see only .ko.
    find "$tmp/kernel/modules" -name '*.ko.xz' -exec xz -d {} +
    find "$tmp/kernel/modules" -name '*.ko.zst' -exec zstd -q -d --rm {} +
    find "$tmp/kernel/modules" -name '*.ko.gz' -exec gzip -d {} +
    # The .deb has no modules.dep (its postinst runs depmod): make it with busybox's
    # depmod, which wants the BASE/lib/modules/VERSION layout.
    mkdir -p "$tmp/base/lib/modules"
    ln -s "$tmp/kernel/modules" "$tmp/base/lib/modules/$ver"
    "$CACHE/busybox" depmod -b "$tmp/base" "$ver"

    # vmlinux: the bzImage's payload (offset and length from the x86 boot header) is
    # the LZ4 "legacy" stream, followed by 4 bytes giving the uncompressed size.
    bz=$tmp/kernel/bzImage
    u32() { od -An -t u4 -j "$2" -N 4 "$1" | tr -d ' '; }
    setup_sects=$(od -An -t u1 -j $((0x1f1)) -N 1 "$bz" | tr -d ' ')
    start=$(( (setup_sects + 1) * 512 + $(u32 "$bz" $((0x248))) ))
    len=$(u32 "$bz" $((0x24c)))
    [[ $(od -An -tx1 -j "$start" -N 4 "$bz" | tr -d ' ') == 02214c18 ]] ||
        die "the bzImage payload is not LZ4 (legacy magic 02 21 4c 18 not at $start)"
    dd if="$bz" iflag=skip_bytes,count_bytes skip="$start" count=$((len - 4)) status=none |
        lz4 -d -c >"$tmp/kernel/vmlinux"
    [[ $(stat -c %s "$tmp/kernel/vmlinux") == $(u32 "$bz" $((start + len - 4))) ]] ||
        die "vmlinux has the wrong size after lz4 -d"
    # The PVH entry point is the Xen note XEN_ELFNOTE_PHYS32_ENTRY (type 0x12).
    readelf -h "$tmp/kernel/vmlinux" | grep -q 'Type:.*EXEC' || die "vmlinux is not an ELF executable"
    readelf -n "$tmp/kernel/vmlinux" | grep -Eq 'Xen.*(\(0x00000012\)|PHYS32_ENTRY)' ||
        die "vmlinux has no PVH entry note (Xen note 0x12)"

    basename "$kdeb" >"$tmp/kernel/.from"
    rm -rf "$KDIR"
    mv "$tmp/kernel" "$KDIR"
    rm -rf "$tmp"
fi

echo "kernel:  $KDIR/bzImage ($(cat "$KDIR/version"))"
echo "vmlinux: $KDIR/vmlinux"
echo "modules: $KDIR/modules"
echo "busybox: $CACHE/busybox"
