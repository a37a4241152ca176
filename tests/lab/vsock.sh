# Inside the lab: virtio-vsock with Firecracker's hybrid host side (guest side:
# /vsock-guest.sh, run by guest/init's vsock scenario). The lab machine is the host: its
# programs reach guest port P by connecting to /tmp/v.sock and writing "CONNECT P", and the
# guest reaches host port P at the Unix socket /tmp/v.sock_P. Both ends are vsock-io, which
# prints "VSOCK-IO TAG sent=N sent_sum=X received=M sum=Y ms=T" per connection: every check
# compares what one end received with the pattern the other sent (T is for the log only).
#   host -> guest  64 MiB each way (port 1234); 10 connections at once, 1 MiB each way
#                  (1235); 8 MiB to a guest that reads slowly (1236): flow control, no loss
#   guest -> host  64 MiB each way (5000); 10 connections at once (5001)
#   closed ports   the host's CONNECT to guest port 1299 is closed without OK; the guest's
#                  connection to host port 5999 fails at once
# Each check prints "CASE NAME status=0" (or status=1 and "FAIL NAME: why"); the guest's
# console is always printed. Every wait is bounded.
set -o pipefail
. /tests/lib.sh
cd /tmp
big=$((64 * 1048576)) mib=1048576 slow=$((8 * 1048576))
sum() { vsock-io pattern-sum "$1"; }
# count_good FILE TAG BYTES: the lines of FILE saying connection TAG* received the pattern
# of BYTES bytes (with \r gone).
count_good() {
    tr -d '\r' <"$1" | grep -cE "^VSOCK-IO $2[^ ]* sent=[0-9]+ sent_sum=[0-9a-f]+ received=$3 sum=$(sum "$3") ms=[0-9]+\$"
}

# The lab's listeners for the guest's connections, before the guest can make any.
vsock-io uds-listen /tmp/v.sock_5000 --send $big --recv $big >host-5000.out 2>&1 &
h1=$!
vsock-io uds-listen /tmp/v.sock_5001 --count 10 --send $mib --recv $mib >host-5001.out 2>&1 &
h2=$!

echo "== vsock: lguest run --vsock cid=3,uds=/tmp/v.sock"
cmdline="console=ttyS0 reboot=k panic=-1 quiet lguest.scenario=vsock"
timeout 500 lguest run --kernel /guest/vmlinux --initrd /guest/initrd-vsock.img --memory 256M \
    --vsock cid=3,uds=/tmp/v.sock --cmdline "$cmdline" </dev/null >guest.out 2>&1 &
vm=$!
n=0
until grep -q '^LGUEST-VSOCK-LISTENING' guest.out || ! kill -0 $vm 2>/dev/null || [ $n -ge 900 ]; do
    sleep 0.2
    n=$((n + 1))
done
check vsock-listening "the guest never said LGUEST-VSOCK-LISTENING" grep -q '^LGUEST-VSOCK-LISTENING' guest.out

echo "== vsock: host -> guest, 64 MiB each way; 10 at once; a slow reader; a closed port"
timeout 300 vsock-io uds-connect /tmp/v.sock 1234 --send $big --recv $big >host-1234.out 2>&1
pids=
for i in 1 2 3 4 5 6 7 8 9 10; do
    timeout 300 vsock-io uds-connect /tmp/v.sock 1235 --send $mib --recv $mib >host-1235-$i.out 2>&1 &
    pids="$pids $!"
done
for p in $pids; do wait "$p"; done
timeout 300 vsock-io uds-connect /tmp/v.sock 1236 --send $slow >host-1236.out 2>&1
timeout 30 vsock-io uds-connect /tmp/v.sock 1299 >host-1299.out 2>&1
closed_status=$?
# What the guest's connections cost lguest, while they are open or just closed.
pid=$(pidof lguest)
echo "LAB-VSOCK lguest $(grep -E 'VmHWM|VmRSS' /proc/$pid/status 2>/dev/null | tr -s ' \t' ' ' | tr '\n' ' ')fds=$(ls /proc/$pid/fd 2>/dev/null | wc -l)"

wait $vm
status=$?
echo "== vsock: lguest exited with status $status"
kill $h1 $h2 2>/dev/null
cat host-1235-*.out >host-1235.out
tr -d '\r' <guest.out
cat host-1234.out host-1235.out host-1236.out host-1299.out host-5000.out host-5001.out

check vsock-exit "lguest exited with $status (124/143: timed out after 500 s)" [ "$status" = 0 ]
check vsock-done "the guest did not finish its scenario" grep -q '^LGUEST-SCENARIO-DONE' guest.out
check vsock-host-to-guest "64 MiB from the lab did not reach the guest's listener intact" \
    [ "$(count_good guest.out listen-1234 $big)" = 1 ]
check vsock-host-to-guest-lab-side "64 MiB from the guest's listener did not reach the lab intact" \
    [ "$(count_good host-1234.out uds-connect-1234 $big)" = 1 ]
check vsock-guest-to-host "64 MiB from the guest did not reach the lab's listener intact" \
    [ "$(count_good host-5000.out uds-listen- $big)" = 1 ]
check vsock-guest-to-host-guest-side "64 MiB from the lab's listener did not reach the guest intact" \
    [ "$(count_good guest.out connect-2-5000 $big)" = 1 ]
check vsock-parallel-host-to-guest "not all 10 parallel host connections came through both ways" \
    [ "$(count_good guest.out listen-1235 $mib)/$(count_good host-1235.out uds-connect-1235 $mib)" = 10/10 ]
check vsock-parallel-guest-to-host "not all 10 parallel guest connections came through both ways" \
    [ "$(count_good host-5001.out uds-listen- $mib)/$(count_good guest.out connect-2-5001 $mib)" = 10/10 ]
check vsock-slow-reader "8 MiB to a slow guest reader did not arrive intact" \
    [ "$(count_good guest.out listen-1236 $slow)" = 1 ]
check vsock-closed-host-side "CONNECT to a guest port nobody listens on was not refused (status $closed_status)" \
    sh -c "[ $closed_status = 3 ] && grep -q 'failed: refused' host-1299.out"
check vsock-closed-guest-side "the guest's connection to a host port nobody listens on did not fail at once" \
    sh -c "tr -d '\r' <guest.out | grep -q '^LGUEST-VSOCK-CLOSED status=3' && tr -d '\r' <guest.out | grep -q '^VSOCK-IO connect-2-5999 failed: connect'"
