# Lab side of bench/run.sh's row 7 (density); bench/run.sh prepends RUNS=N K=N MEM=MIB VMMS=LIST.
# Starts K VMs of MEM MiB at once (the reference guest, lguest.scenario=shell: it prints
# LGUEST-GUEST-INIT, then LGUEST-SHELL-READY and waits at its prompt), each under stopwatch,
# VM i pinned to lab CPU i%2 (taskset: one VMM's threads never move between the lab's CPUs,
# which is what loses nested boots). Measures the time from the first start until the last
# VM reached /init, and once all are at their prompt the sum of the K VMMs' RSS. Then stops
# them all. RUNS runs of each VMM in VMMS (lguest, qemu: QEMU microvm). bench/run.sh gives
# each VMM its own lab session: 8 nested guests at once are what the lab machine's own
# kernel sometimes dies of, and then only that VMM's part is lost and run again. A run where
# not every VM got to its prompt is noted, not measured (see the wait below), and run once more.
WAIT=300 STALL=60
. /bench/lib.sh

# density_once VMM
density_once() {
    rm -f /tmp/d.*
    read -r t0 _ </proc/uptime
    pids=""
    i=0
    while [ $i -lt "$K" ]; do
        vmm_cmd "$1" "$MEM" 1 /guest/initramfs.cpio.gz "$CMDLINE lguest.scenario=shell"
        read -r up _ </proc/uptime
        echo "$up" >/tmp/d.start.$i
        (eval "exec taskset -c $((i % 2)) stopwatch --label $1 --marker LGUEST-GUEST-INIT -- $CMD") \
            </dev/null >/tmp/d.out.$i 2>/tmp/d.err.$i &
        pids="$pids $!"
        i=$((i + 1))
    done
    # Until all are at their prompt; or one died; or none got there in the last STALL s
    # (the lab's nested virtualization sometimes hangs a boot for good); or WAIT s in all.
    ready=0 waited=0 last_change=0
    while [ $waited -lt "$WAIT" ]; do
        now=$(grep -l "^LGUEST-SHELL-READY" /tmp/d.out.* 2>/dev/null | wc -l)
        [ "$now" != "$ready" ] && last_change=$waited
        ready=$now
        [ "$ready" -ge "$K" ] && break
        [ "$ready" -gt 0 ] && [ $((waited - last_change)) -ge "$STALL" ] && break
        alive=0
        for p in $pids; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
        [ $alive -lt "$K" ] && break
        sleep 1
        waited=$((waited + 1))
    done
    rss=0
    for p in $pids; do
        child=$(cat "/proc/$p/task/$p/children" 2>/dev/null)
        kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/${child% }/status" 2>/dev/null)
        rss=$((rss + ${kib:-0}))
    done
    for p in $pids; do stop_pid "$p"; done
    if [ "$ready" -lt "$K" ]; then
        for f in /tmp/d.out.*; do guest_said "$f" LGUEST-SHELL-READY || break; done
        note density "$1: only $ready of $K VMs reached their prompt after ${waited} s: not measured." \
            "One that did not: $(tail -c 300 "$f" "${f%.out.*}.err.${f##*.}" | printable)"
        return 1
    fi
    # The last VM at /init, measured from the first start: start offset + its own marker time.
    i=0 last=0
    while [ $i -lt "$K" ]; do
        ms=$(sed -n 's/^STOPWATCH .* marker=LGUEST-GUEST-INIT ms=\([0-9]*\)$/\1/p' /tmp/d.err.$i)
        [ -n "$ms" ] || { note density "$1: VM $i has no /init time"; return 1; }
        last=$(awk -v s="$(cat /tmp/d.start.$i)" -v t0="$t0" -v ms="$ms" -v l="$last" \
            'BEGIN { v = (s - t0) * 1000 + ms; printf "%.0f", (v > l ? v : l) }')
        i=$((i + 1))
    done
    emit density "$1" all-init "$last" ms
    emit density "$1" total-rss "$(kib_to_mib $rss)" MiB
}

for run in $(seq 1 "$RUNS"); do
    for vmm in $VMMS; do
        density_once $vmm || density_once $vmm || true
    done
done
drain
