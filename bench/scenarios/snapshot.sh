# Lab side of bench/run.sh's row 10 (snapshot); bench/run.sh prepends RUNS=N.
# For 256 MiB and 2 GiB guests, RUNS times each, lguest and QEMU alternating: boot the
# reference guest's shell (same kernel, initramfs and command line for both, no devices),
# save it, kill the VMM, and restore it in a new process:
#   save     lguest: PATCH /vm Paused + PUT /snapshot/create, timed by stopwatch around the
#            two curl calls; QEMU: QMP `migrate` to "exec:cat > FILE" (the guest runs until
#            the last pass, as QEMU migrates), from the command to the MIGRATION event
#            "completed"
#   restore  process start → the guest answers: stopwatch's marker on the line the guest's
#            shell computes from what is typed on its console (the answer to
#            `echo LGUEST-ANSWER-$((6 * 7))`, which its echo of the typed line can't match),
#            typed again every 0.1 s until it comes (a byte sent before the guest runs may
#            be lost); lguest: `lguest restore`, QEMU: the same command line with -incoming
#   sizes    the snapshot's files: bytes on disk (du, holes left out), and for lguest the
#            state file alone and the memory file's length
#   diff     lguest only (booted with --track-dirty-pages): after the Full snapshot, resumed
#            for 2 s of the idle shell, then PATCH /vm Paused + a Diff snapshot, timed as
#            save; its memory file's bytes on disk. (QEMU has no counterpart to a file.)
# The files live in the lab's RAM (its initramfs root), as a snapshot on a page-cached disk.
. /bench/lib.sh
ASK='echo LGUEST-ANSWER-$((6 * 7))'
ANSWER=LGUEST-ANSWER-42
QMP_PORT=4444
BOOT_CMDLINE="$CMDLINE lguest.scenario=shell"

# stopwatch_ms FILE MARKER|exit: the ms stopwatch wrote to FILE for a marker, or its exit
# (when the status was 0); empty otherwise.
stopwatch_ms() {
    case $2 in
        exit) sed -n 's/^STOPWATCH .* exit ms=\([0-9]*\) status=0 .*/\1/p' "$1" ;;
        *) sed -n "s/^STOPWATCH .* marker=$2 ms=\([0-9]*\)\$/\1/p" "$1" ;;
    esac
}
disk_kib() { du -k "$@" | awk '{ s += $1 } END { print s + 0 }'; }

# boot VMM MEM [ARGS]: the guest's shell, up; $pid is the VMM.
boot() {
    vmm_cmd "$1" "$2" 1 /guest/initramfs.cpio.gz "$BOOT_CMDLINE"
    (eval "exec $CMD $3") </dev/null >/tmp/boot.out 2>&1 &
    pid=$!
    wait_said /tmp/boot.out LGUEST-SHELL-READY 180 $pid && sleep 1
}

# save_lguest ROW: pauses and saves the booted guest into /tmp/l.snap and /tmp/l.mem.
save_lguest() {
    api='curl -s --fail-with-body --max-time 120 --unix-socket /tmp/l.sock -H Content-Type:application/json'
    timeout 300 stopwatch --label lguest -- sh -c "$api -X PATCH -d '{\"state\": \"Paused\"}' http://localhost/vm &&
        $api -X PUT -d '{\"snapshot_path\": \"/tmp/l.snap\", \"mem_file_path\": \"/tmp/l.mem\"}' http://localhost/snapshot/create" \
        >/tmp/save.out 2>/tmp/save.err
    ms=$(stopwatch_ms /tmp/save.err exit)
    [ -n "$ms" ] || { note "$1" "lguest: the snapshot failed: $(cat /tmp/save.out /tmp/save.err | printable)"; return 1; }
    emit "$1" lguest save "$ms" ms
    emit "$1" lguest files-on-disk "$(kib_to_mib "$(disk_kib /tmp/l.snap /tmp/l.mem)")" MiB
    emit "$1" lguest state-file "$(awk -v b="$(wc -c </tmp/l.snap)" 'BEGIN { printf "%.1f", b / 1024 }')" KiB
    emit "$1" lguest memory-file-length "$(($(wc -c </tmp/l.mem) / 1048576))" MiB
    save_lguest_diff "$1"
}

# save_lguest_diff ROW: resumes the saved guest for 2 s, then pauses it and takes a Diff
# snapshot into /tmp/l-diff.snap and /tmp/l-diff.mem.
save_lguest_diff() {
    $api -X PATCH -d '{"state": "Resumed"}' http://localhost/vm >/tmp/save.out 2>&1 ||
        { note "$1" "lguest: no resume after the snapshot: $(printable </tmp/save.out)"; return 1; }
    sleep 2
    timeout 300 stopwatch --label lguest -- sh -c "$api -X PATCH -d '{\"state\": \"Paused\"}' http://localhost/vm &&
        $api -X PUT -d '{\"snapshot_path\": \"/tmp/l-diff.snap\", \"mem_file_path\": \"/tmp/l-diff.mem\", \"snapshot_type\": \"Diff\"}' http://localhost/snapshot/create" \
        >/tmp/save.out 2>/tmp/save.err
    ms=$(stopwatch_ms /tmp/save.err exit)
    [ -n "$ms" ] || { note "$1" "lguest: the Diff snapshot failed: $(cat /tmp/save.out /tmp/save.err | printable)"; return 1; }
    emit "$1" lguest diff-save "$ms" ms
    emit "$1" lguest diff-memory-on-disk "$(disk_kib /tmp/l-diff.mem)" KiB
    rm -f /tmp/l-diff.snap /tmp/l-diff.mem
}

# save_qemu ROW: migrates the booted guest into /tmp/q.mig through QMP (one connection, held
# open until the MIGRATION event says completed).
save_qemu() {
    rm -f /tmp/q.mig
    qmp='{"execute": "qmp_capabilities"}
{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "events", "state": true}]}}
{"execute": "migrate", "arguments": {"uri": "exec:cat > /tmp/q.mig"}}'
    timeout 300 stopwatch --label qemu --marker '"completed"' -- sh -c "{ echo '$qmp'
        n=0; until grep -q '\"completed\"\\|\"failed\"' /tmp/save.out || [ \$n -ge 2400 ]; do sleep 0.05; n=\$((n + 1)); done
        } | nc 127.0.0.1 $QMP_PORT" \
        >/tmp/save.out 2>/tmp/save.err
    ms=$(stopwatch_ms /tmp/save.err '"completed"')
    [ -n "$ms" ] || { note "$1" "qemu: the migration failed: $(cat /tmp/save.out /tmp/save.err | printable)"; return 1; }
    sleep 1   # cat's last write
    emit "$1" qemu save "$ms" ms
    emit "$1" qemu files-on-disk "$(kib_to_mib "$(disk_kib /tmp/q.mig)")" MiB
}

# restore ROW VMM: the saved guest in a new process, timed to its answer; then `exit` ends
# its shell and the guest powers off.
restore() {
    rm -f /tmp/restore.out
    { n=0
      until grep -q "$ANSWER" /tmp/restore.out 2>/dev/null || [ $n -ge 600 ]; do
          echo "$ASK"; sleep 0.1; n=$((n + 1))
      done
      echo exit; } | eval "timeout 120 stopwatch --label $2 --marker $ANSWER -- $CMD" >/tmp/restore.out 2>/tmp/restore.err
    ms=$(stopwatch_ms /tmp/restore.err "$ANSWER")
    [ -n "$ms" ] || { note "$1" "$2: the restored guest never answered: $(tail -c 300 /tmp/restore.out | printable)"; return 1; }
    emit "$1" "$2" restore-answer "$ms" ms
}

# once VMM ROW MEM: one boot, save and restore.
once() {
    rm -f /tmp/l.snap /tmp/l.mem /tmp/q.mig /tmp/l.sock
    case $1 in
        lguest) extra="--api-sock /tmp/l.sock --track-dirty-pages" ;;
        *) extra="-qmp tcp:127.0.0.1:$QMP_PORT,server=on,wait=off" ;;
    esac
    if ! boot "$1" "$3" "$extra"; then
        note "$2" "$1: the guest's shell never came: $(tail -c 300 /tmp/boot.out | printable)"
        stop_pid $pid
        return 1
    fi
    echo "snapshot: $1 $3 MiB booted"
    save_$1 "$2"
    saved=$?
    echo "snapshot: $1 $3 MiB saved (status $saved)"
    kill -9 $pid 2>/dev/null
    wait $pid 2>/dev/null
    [ $saved = 0 ] || return 1
    case $1 in
        lguest) CMD="lguest restore --snapshot /tmp/l.snap --memory-file /tmp/l.mem" ;;
        *) vmm_cmd qemu "$3" 1 /guest/initramfs.cpio.gz "$BOOT_CMDLINE"; CMD="$CMD -incoming 'exec:cat /tmp/q.mig'" ;;
    esac
    restore "$2" "$1"
}

for run in $(seq 1 "$RUNS"); do
    for vmm in lguest qemu; do
        once $vmm snapshot-256m 256 || once $vmm snapshot-256m 256 || true
        once $vmm snapshot-2g 2048 || once $vmm snapshot-2g 2048 || true
    done
done
rm -f /tmp/l.snap /tmp/l.mem /tmp/q.mig
drain
