#!/usr/bin/env bash
# guest/build.sh [OUTDIR]: build lguest's reference guest from lab/fetch.sh's cache.
#   OUTDIR/bzImage            Debian's cloud kernel
#   OUTDIR/vmlinux            the same kernel as an ELF (boots through its PVH entry)
#   OUTDIR/initramfs.cpio.gz  busybox + guest/init (+ the modules in guest/modules.list)
# OUTDIR defaults to ${LGUEST_CACHE:-$HOME/.cache/lguest}/guest/KEY, KEY naming the
# inputs' contents: checkouts share the cache, each with its own guest/init, and must never
# boot one another's guest. Does nothing when OUTDIR is newer than all its inputs. Prints
# the three paths. Boot with e.g.
#   console=ttyS0 reboot=k panic=-1 lguest.scenario=poweroff
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lab/lib.sh"

"$here/../lab/fetch.sh" >/dev/null
kdir=$LGUEST_CACHE/kernel
inputs=("$here/init" "$here/modules.list" "$here/build.sh" "$here/../lab/lib.sh"
    "$LGUEST_CACHE/busybox" "$kdir/.from")
out=${1:-}
if [[ -z $out ]]; then
    out=$LGUEST_CACHE/guest/$(cat "${inputs[@]}" | sha256sum | cut -c1-12)
    # Keep the 8 guests used last (a use touches its directory).
    mkdir -p "$out" && touch "$out"
    find "$LGUEST_CACHE/guest" -mindepth 1 -maxdepth 1 -type d -regex '.*/[0-9a-f]\{12\}' \
        -printf "%T@ %p\n" | sort -rn | tail -n +9 | cut -d" " -f2- | xargs -r rm -rf
fi
mkdir -p "$out"

exec 9>"$out/.lock"   # parallel lab runs may build the same OUTDIR
flock 9

initrd=$out/initramfs.cpio.gz
if stale "$initrd" "${inputs[@]}"; then
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc}

    # busybox and a symlink for every applet, at the path busybox expects.
    install -m 755 "$LGUEST_CACHE/busybox" "$stage/bin/busybox"
    for applet in $("$LGUEST_CACHE/busybox" --list-full); do
        [[ $applet == bin/busybox ]] || ln -sf /bin/busybox "$stage/$applet"
    done
    install -m 755 "$here/init" "$stage/init"
    # The kernel opens /dev/console before running /init: give it the node (needs root;
    # without it /init opens the console itself, see guest/init).
    mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || note "not root: no /dev/console node"

    # Modules named in modules.list, with their dependencies, in load order.
    ver=$(cat "$kdir/version")
    mapfile -t wanted < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/modules.list")
    : >"$stage/etc/modules.order"
    if ((${#wanted[@]})); then
        mod_deps "$kdir/modules" "${wanted[@]}" >"$stage/etc/modules.order"
        while read -r m; do
            install -D -m 644 "$kdir/modules/$m" "$stage/lib/modules/$ver/$m"
        done <"$stage/etc/modules.order"
        cp "$kdir/modules/modules.dep" "$stage/lib/modules/$ver/"
    fi

    find "$stage" -exec touch -h -d @0 {} +   # same inputs, same bytes
    mkcpio "$stage" /dev/stdout | gzip -9 -n >"$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
fi

# The kernels: hard links to the cache's (fetch.sh never changes them in place, it
# replaces the directory), or copies where links can't be made; redone when they changed.
for f in bzImage vmlinux; do
    [[ $kdir/$f -ef $out/$f ]] || cmp -s "$kdir/$f" "$out/$f" ||
        { rm -f "$out/$f" && ln "$kdir/$f" "$out/$f" 2>/dev/null; } || cp "$kdir/$f" "$out/$f"
done
echo "$out/bzImage"
echo "$out/vmlinux"
echo "$initrd"
