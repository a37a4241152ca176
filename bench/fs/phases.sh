# shellcheck shell=sh
# The fs row's four timed phases, run inside the guest by every VMM's side (busybox sh): by
# bench/fs/init (lguest, QEMU: the share mounted at /mnt/fs, the tar in the initramfs) and by
# bench/fs/vng-guest.sh (virtme-ng: its --rwdir share, the tar copied into the guest's RAM).
# usage: sh phases.sh DIR TAR ENTRIES MD5
# Untars TAR into DIR, finds every entry, reads every file, rm -rf's the tree. The guest's
# page cache is dropped before each phase, so every phase asks the host. Each phase is
# checked: the entry count and the files' md5 must be ENTRIES and MD5, and DIR empty at the
# end, or the run is an error, never a number. Says BENCH-RESULT metric=PHASE value=MS
# unit=ms (and total), then BENCH-DONE. It trusts nothing it reads back from DIR.
dir=$1 tar=$2 entries=$3 sum=$4

# uptime_ms: the guest's clock, in ms (10 ms steps).
uptime_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
total=0 failed=
# timed NAME CMD...: drops the page cache (every phase asks the host), times CMD into $ms.
timed() {
    _name=$1
    shift
    sync
    echo 3 >/proc/sys/vm/drop_caches
    _t0=$(uptime_ms)
    "$@" || { echo "BENCH-ERROR $_name failed"; failed=1; return 1; }
    ms=$(($(uptime_ms) - _t0))
}
# said NAME CHECK...: the phase's time, if CHECK holds (else it is an error, not a number).
said() {
    _name=$1
    shift
    if "$@"; then
        total=$((total + ms))
        echo "BENCH-RESULT metric=$_name value=$ms unit=ms"
    else
        failed=1
    fi
}
# (Each phase's result in a variable: the guest's /tmp may be the read-only root, under vng.)
count() { seen=$(find "$dir/tree" | wc -l); }
read_all() { got=$(find "$dir/tree" -type f | sort | xargs cat | md5sum | cut -d' ' -f1); }
counted() { [ "$seen" = "$entries" ] || { echo "BENCH-ERROR find saw $seen entries, not $entries"; false; }; }
summed() { [ "$got" = "$sum" ] || { echo "BENCH-ERROR the files read back as md5 $got, not $sum"; false; }; }
emptied() { [ -z "$(ls "$dir")" ] || { echo "BENCH-ERROR the share is not empty after rm -rf"; false; }; }
timed untar tar -xf "$tar" -C "$dir" && said untar true
timed find count && said find counted
timed read read_all && said read summed
timed rm rm -rf "$dir/tree" && said rm emptied
[ -n "$failed" ] || echo "BENCH-RESULT metric=total value=$total unit=ms"
echo BENCH-DONE
