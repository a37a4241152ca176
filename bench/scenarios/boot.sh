# Lab side of bench/run.sh's rows 1 (boot) and 2 (VMM start-up); bench/run.sh prepends RUNS=N.
# Boots the reference guest (PVH vmlinux + guest/build.sh's busybox initramfs, 256 MiB,
# lguest.scenario=poweroff) with 1 and then 2 vCPUs, RUNS times per VMM, lguest and QEMU
# microvm alternating, each timed by stopwatch: process start → the guest's LGUEST-GUEST-INIT
# line, and → the process's exit after the guest's `poweroff -f`. lguest runs with
# --boot-timeline, whose "first KVM_RUN" (1 vCPU) is row 2, and whose exit counts are row 1's
# last lines. A run that dies (no /init marker
# or a bad status: the lab's nested virtualization loses about one boot in thirty) is noted
# and retried once.
. /bench/lib.sh

# boot_exits CPUS ERR: the exits to lguest of the boot whose --boot-timeline is in ERR, by
# kind ("exits to lguest: port in N, port out N, mmio read N, mmio write N, other N").
boot_exits() {
    sed -n 's/.*exits to lguest: port in \([0-9]*\), port out \([0-9]*\), mmio read \([0-9]*\), mmio write \([0-9]*\), other \([0-9]*\).*/\1 \2 \3 \4 \5/p' "$2" |
        while read -r pin pout mread mwrite other; do
            emit "boot-${1}cpu" lguest exits-port $((pin + pout)) exits
            emit "boot-${1}cpu" lguest exits-mmio $((mread + mwrite)) exits
            emit "boot-${1}cpu" lguest exits-other "$other" exits
        done
}

# boot_once VMM CPUS: one timed boot; BENCH lines on success, a note on failure.
boot_once() {
    vmm_cmd "$1" 256 "$2" /guest/initramfs.cpio.gz "$CMDLINE lguest.scenario=poweroff"
    [ "$1" = lguest ] && CMD="$CMD --boot-timeline"
    eval "timeout 120 stopwatch --label $1 --marker LGUEST-GUEST-INIT -- $CMD" \
        </dev/null >/tmp/boot.out 2>/tmp/boot.err
    status=$?
    init=$(sed -n 's/^STOPWATCH .* marker=LGUEST-GUEST-INIT ms=\([0-9]*\)$/\1/p' /tmp/boot.err)
    done_ms=$(sed -n 's/^STOPWATCH .* exit ms=\([0-9]*\) status=0 .*/\1/p' /tmp/boot.err)
    if [ "$status" != 0 ] || [ -z "$init" ] || [ -z "$done_ms" ]; then
        note "boot-${2}cpu" "$1 run failed (status $status, /init ${init:-never}):" \
            "$(tail -c 300 /tmp/boot.out /tmp/boot.err | printable)"
        return 1
    fi
    emit "boot-${2}cpu" "$1" init "$init" ms
    emit "boot-${2}cpu" "$1" exit "$done_ms" ms
    if [ "$1" = lguest ]; then
        boot_exits "$2" /tmp/boot.err
    fi
    if [ "$1" = lguest ] && [ "$2" = 1 ]; then
        first=$(awk '/first KVM_RUN/ { print $1 }' /tmp/boot.err)
        [ -n "$first" ] && emit startup lguest first-kvm-run "$first" ms
    fi
    return 0
}

for cpus in 1 2; do
    for run in $(seq 1 "$RUNS"); do
        for vmm in lguest qemu; do
            boot_once $vmm $cpus || boot_once $vmm $cpus || true
        done
    done
done
drain
