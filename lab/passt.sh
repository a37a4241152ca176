#!/usr/bin/env bash
# lab/passt.sh: builds the passt that `--net user` runs in tests and benchmarks, into
# ${LGUEST_CACHE:-$HOME/.cache/lguest}/passt/VERSION/passt (and passt.avx2), and prints that directory (put it
# first on PATH). Idempotent: a built passt is kept, nothing is downloaded twice.
#
# Why not Debian 12's own passt (0.0~git20230309): bulk TCP from the host into the guest
# stalls with it under QEMU's stream netdev just as under lguest (bench row 9, issue 16), and
# it turns IPv6 off on a host with link-local addresses only. Debian 13 (trixie) ships a
# passt without either problem, but no bookworm package of it: we build trixie's source
# package. The Debian mirror serves its tarballs but not its .dsc, so their SHA-256 sums are
# pinned here, copied from trixie's Sources index (signed by Debian's archive key through
# InRelease); a download that does not match is refused. Building needs make and a C compiler
# only (Build-Depends' debhelper is for the .deb, which we don't make).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

VERSION=0.0~git20250503.587980c-2+deb13u1
POOL=http://deb.debian.org/debian/pool/main/p/passt
ORIG=passt_0.0~git20250503.587980c.orig.tar.xz
ORIG_SHA256=69d5eb843f7d648c2cc60bfbca6ea7b5014c6b6f07cdee362c2a8cf490515a49
DEBIAN=passt_${VERSION}.debian.tar.xz
DEBIAN_SHA256=f8d9fdfc1ba89e7dde48705ae68d1dfa8a40477cb85184d41194487f2902b77d

CACHE=$LGUEST_CACHE
DIR=$CACHE/passt/$VERSION
if [[ -x $DIR/passt ]]; then
    echo "$DIR"
    exit 0
fi
ensure_cmds curl:curl make:make cc:gcc xz:xz-utils patch:patch sha256sum:coreutils flock:util-linux
mkdir -p "$CACHE/passt"
# Parallel lab runs may call us at once: one build at a time.
exec 9>"$CACHE/passt/.lock"
flock 9
if [[ -x $DIR/passt ]]; then
    echo "$DIR"
    exit 0
fi

# fetch FILE SHA256: FILE from Debian's pool into the cache, checked.
fetch() {
    local file=$CACHE/passt/$1
    if [[ ! -f $file ]]; then
        note "downloading $1"
        curl -fsS --retry 3 -o "$file.part" "$POOL/$1" || die "cannot download $POOL/$1"
        mv "$file.part" "$file"
    fi
    echo "$2  $file" | sha256sum -c --quiet - >&2 || { rm -f "$file"; die "$1: checksum mismatch (removed; run again)"; }
}
fetch "$ORIG" "$ORIG_SHA256"
fetch "$DEBIAN" "$DEBIAN_SHA256"

note "building passt $VERSION"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
tar xf "$CACHE/passt/$ORIG" -C "$build" --strip-components=1
tar xf "$CACHE/passt/$DEBIAN" -C "$build"
# Debian's patches, in its series' order (format 3.0 (quilt)).
while read -r patch; do
    [[ -z $patch || $patch == \#* ]] || patch -d "$build" -p1 -s <"$build/debian/patches/$patch"
done <"$build/debian/patches/series"
# passt.avx2 too: on a CPU with AVX2, passt re-executes itself as the .avx2 file beside it
# (and warns when that is missing).
make -C "$build" passt passt.avx2 VERSION="$VERSION" >"$build/make.log" 2>&1 || { tail -20 "$build/make.log" >&2; die "building passt failed"; }
mkdir -p "$DIR.part"
install -m 755 "$build/passt" "$build/passt.avx2" "$DIR.part/"
rm -rf "$DIR"
mv "$DIR.part" "$DIR"
echo "$DIR"
