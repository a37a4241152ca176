#!/bin/sh
# Lab scenario: QEMU (microvm, KVM) boots the reference guest inside the lab, timed by
# stopwatch. Proves the lab, the reference guest and stopwatch work, and gives the
# numbers lguest is compared with. Run it with:
#   lab/run.sh --with-qemu --bin target/release/stopwatch lab/scenarios/qemu-smoke.sh
# Checks:
#   - lguest.scenario=poweroff, with the bzImage and with the PVH vmlinux: the guest
#     prints LGUEST-SCENARIO-DONE and QEMU exits 0;
#   - lguest.scenario=reboot: the same after `reboot -f`;
#   - lguest.scenario=shell with the guest's console fed from a FIFO (not a terminal):
#     the guest shell runs `echo hello-$((6*7))`, then `poweroff -f`.
set -o pipefail
failed=0
fail() { echo "FAIL: $*"; failed=1; }
# guest_said LINE FILE: the guest printed LINE as a whole line (its console ends lines
# with \r\n). A plain grep would also match stopwatch's "marker=LINE" report.
guest_said() { grep -q "^$1.\{0,1\}\$" "$2"; }

# QEMU's fixed flags (split into words on use). `timeout` turns a hung guest into a
# quick FAIL (a boot takes ~15 s here): stopwatch passes its SIGTERM on to QEMU, and
# exits 143 although QEMU exits 0 on SIGTERM.
QEMU="qemu-system-x86_64 -M microvm -enable-kvm -cpu host -m 256 -nodefaults -no-user-config
      -nographic -serial stdio -no-reboot -initrd /guest/initramfs.cpio.gz"
CMDLINE="console=ttyS0 reboot=t panic=-1"

for kernel in /guest/bzImage /guest/vmlinux; do
    label=qemu-${kernel##*/}
    echo "== $label: lguest.scenario=poweroff"
    timeout 120 stopwatch --label "$label" --marker LGUEST-GUEST-INIT --marker LGUEST-SCENARIO-DONE -- \
        $QEMU -kernel "$kernel" -append "$CMDLINE lguest.scenario=poweroff" </dev/null 2>&1 |
        tee "/tmp/$label.out"
    status=$?
    [ "$status" = 0 ] || fail "$label: QEMU exited with $status"
    guest_said LGUEST-SCENARIO-DONE "/tmp/$label.out" || fail "$label: no LGUEST-SCENARIO-DONE"
done

# reboot=t: microvm has no keyboard controller, so with reboot=k the guest's
# `reboot -f` never ends QEMU (lguest's guests use reboot=k: lguest must handle it).
echo "== qemu-reboot: lguest.scenario=reboot (quiet)"
timeout 120 stopwatch --label qemu-reboot --marker LGUEST-SCENARIO-DONE -- \
    $QEMU -kernel /guest/bzImage -append "$CMDLINE quiet lguest.scenario=reboot" </dev/null 2>&1 |
    tee /tmp/qemu-reboot.out
status=$?
[ "$status" = 0 ] || fail "qemu-reboot: QEMU exited with $status"
guest_said LGUEST-SCENARIO-DONE /tmp/qemu-reboot.out || fail "qemu-reboot: no LGUEST-SCENARIO-DONE"

echo "== qemu-shell: lguest.scenario=shell (quiet), console input from a FIFO"
rm -f /tmp/in && mkfifo /tmp/in
timeout 120 stopwatch --label qemu-shell --marker LGUEST-SHELL-READY --marker hello-42 -- \
    $QEMU -kernel /guest/bzImage -append "$CMDLINE quiet lguest.scenario=shell" \
    </tmp/in >/tmp/shell.out 2>&1 &
qemu_pid=$!
exec 3>/tmp/in   # opening the FIFO lets QEMU start; fd 3 keeps it from seeing EOF
i=0
until guest_said LGUEST-SHELL-READY /tmp/shell.out || [ $i -ge 240 ]; do
    i=$((i + 1))
    sleep 0.5
done
echo 'echo hello-$((6*7))' >&3
sleep 1
echo 'poweroff -f' >&3
wait $qemu_pid
status=$?
exec 3>&-
cat /tmp/shell.out
[ "$status" = 0 ] || fail "qemu-shell: QEMU exited with $status"
guest_said LGUEST-SHELL-READY /tmp/shell.out || fail "qemu-shell: no LGUEST-SHELL-READY"
# The tty echoes the command as typed ($((6*7))); only the shell's output is hello-42.
guest_said hello-42 /tmp/shell.out || fail "qemu-shell: the guest shell did not run our command"

echo "== timings (ms from QEMU's start)"
cat /tmp/*.out | grep '^STOPWATCH'
[ $failed = 0 ] && echo "qemu-smoke: PASS" || echo "qemu-smoke: FAIL"
exit $failed
