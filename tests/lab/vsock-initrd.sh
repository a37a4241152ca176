#!/usr/bin/env bash
# tests/lab/vsock-initrd.sh OUT VSOCK_IO: the reference guest's initramfs with vsock-io (a
# static binary) at /usr/bin/vsock-io and tests/lab/vsock-guest.sh at /vsock-guest.sh, for
# tests/lab/vsock.sh. As bench/overlay.sh does: the reference cpio.gz, zero-padded to a
# 512-byte boundary, then an uncompressed cpio the kernel unpacks after it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
source "$repo/lab/lib.sh"

(($# == 2)) || die "usage: tests/lab/vsock-initrd.sh OUT VSOCK_IO"
out=$1 vsock_io=$2
ensure_cmds cpio:cpio
ref=$("$repo/guest/build.sh" | sed -n 3p)
[[ -f $ref ]] || die "guest/build.sh did not give an initramfs"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
install -D -m 755 "$vsock_io" "$stage/root/usr/bin/vsock-io"
install -m 644 "$here/vsock-guest.sh" "$stage/root/vsock-guest.sh"
mkcpio "$stage/root" "$stage/overlay.cpio"
cp "$ref" "$out.tmp"
size=$(stat -c %s "$out.tmp")
head -c $(((512 - size % 512) % 512)) /dev/zero >>"$out.tmp"
cat "$stage/overlay.cpio" >>"$out.tmp"
mv "$out.tmp" "$out"
