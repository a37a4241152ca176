# Lab side of bench/run.sh's row 12 (exec); bench/run.sh prepends RUNS=N.
# `lguest exec -- true` against virtme-ng's `vng --run KERNEL -- true` (on QEMU, with the Rust
# virtiofsd sharing the root: bench/vng/build.sh put vng at /usr and the kernel at /k), RUNS
# times each, alternating, each timed by stopwatch from process start to exit. Both boot the
# same kernel file (/k/boot/vmlinuz-VERSION, the reference bzImage) with the same modules
# (/k/lib/modules/VERSION), 512 MiB and 1 vCPU (lguest exec's defaults; vng's would be 1 GiB
# and every CPU), the lab's / as the guest's root, read-only. vng's guest starts Debian's udev
# (in /usr beside vng), which names the virtio-serial ports its command's stdio and status
# travel on, as on any distribution. lguest runs with --boot-timeline:
# its milestones are the row's other lines, and its VMM share is everything but the guest's
# own work (up to the first KVM_RUN, and from CMD's end to the VM's stop).
# A run that fails (a bad status: the lab's nested virtualization loses a boot now and then)
# is noted and retried once.
. /bench/lib.sh

VERSION=$(ls /k/lib/modules)
KERNEL_FILE=/k/boot/vmlinuz-$VERSION
MEM=512M CPUS=1

# ms_at LABEL FILE: the ms of --boot-timeline's milestone LABEL ("first KVM_RUN", ...).
ms_at() { awk -v m="$1" 'index($0, m) { printf "%d", $1; exit }' "$2"; }

# exec_once VMM: one timed `... -- true`; BENCH lines on success, a note on failure.
exec_once() {
    case $1 in
        lguest) set -- lguest lguest exec --kernel "$KERNEL_FILE" --modules "/k/lib/modules/$VERSION" \
            --memory $MEM --cpus $CPUS --boot-timeline -- true ;;
        vng) set -- vng vng --run "$KERNEL_FILE" --memory $MEM --cpus $CPUS -- true ;;
    esac
    vmm=$1
    shift
    # 240 s: under a loaded lab, vng's udev coldplug alone took ~15 s of a ~80 s run.
    timeout 240 stopwatch --label "$vmm" -- "$@" </dev/null >/tmp/exec.out 2>/tmp/exec.err
    status=$?
    # A vng that timed out leaves its QEMU and virtiofsd behind (python alone got the signal).
    [ "$status" = 0 ] || killall -9 qemu-system-x86_64 virtiofsd 2>/dev/null
    done_ms=$(sed -n 's/^STOPWATCH .* exit ms=\([0-9]*\) status=0 .*/\1/p' /tmp/exec.err)
    if [ "$status" != 0 ] || [ -z "$done_ms" ]; then
        note exec "$vmm run failed (status $status):" "$(tail -c 400 /tmp/exec.out /tmp/exec.err | printable)"
        return 1
    fi
    emit exec "$vmm" true "$done_ms" ms
    [ "$vmm" = lguest ] && timeline /tmp/exec.err
    return 0
}

# timeline ERR: lguest's milestones from --boot-timeline, and its VMM share.
timeline() {
    initramfs=$(ms_at "initramfs built" "$1") built=$(ms_at "VM built" "$1") first=$(ms_at "first KVM_RUN" "$1")
    init=$(ms_at "guest init connected" "$1") started=$(ms_at "CMD started" "$1")
    exited=$(ms_at "CMD exited" "$1") stopped=$(ms_at "VM stopped" "$1")
    if [ -z "$first" ] || [ -z "$exited" ] || [ -z "$stopped" ]; then
        note exec "lguest's --boot-timeline had no milestones: $(printable </tmp/exec.err | tail -c 300)"
        return
    fi
    emit exec lguest initramfs "$initramfs" ms
    emit exec lguest vm-built "$built" ms
    emit exec lguest first-kvm-run "$first" ms
    emit exec lguest init-connected "$init" ms
    emit exec lguest cmd-started "$started" ms
    emit exec lguest cmd-exited "$exited" ms
    emit exec lguest vm-stopped "$stopped" ms
    emit exec lguest vmm-share $((first + stopped - exited)) ms
}

echo "exec: kernel $KERNEL_FILE; $(vng --version 2>&1); $(virtiofsd --version 2>&1 | head -n1)"
for run in $(seq 1 "$RUNS"); do
    for vmm in lguest vng; do
        exec_once $vmm || exec_once $vmm || true
    done
done
drain
