# The guest's side of tests/lab/vsock.sh (busybox sh, run by guest/init's vsock scenario from
# the initramfs tests/lab/vsock-initrd.sh made). vsock-io prints one "VSOCK-IO ..." line per
# connection; the lab side checks them against its own.
#   host -> guest: listeners on 1234 (64 MiB each way), 1235 (10 connections at once, 1 MiB
#                  each way), 1236 (8 MiB in, read 4 KiB at a time with a sleep after each)
#   guest -> host: 64 MiB each way to host port 5000, 10 connections at once to 5001, and
#                  one to 5999, where nobody listens (must fail, not hang)
# Every wait is bounded: a watchdog ends the listeners after 400 s.
cd /tmp
vsock-io listen 1234 --send 64M --recv 64M >listen-1234.out 2>&1 &
l1=$!
vsock-io listen 1235 --count 10 --send 1M --recv 1M >listen-1235.out 2>&1 &
l2=$!
vsock-io listen 1236 --recv 8M --chunk 4K --slow-ms 1 >listen-1236.out 2>&1 &
l3=$!
(sleep 400; kill $l1 $l2 $l3 2>/dev/null) &
watchdog=$!
# The listeners are listening before the lab side hears of them (a connection to a port
# nobody listens on yet would be refused).
n=0
until [ "$(cat listen-*.out | grep -c '^VSOCK-IO listening')" = 3 ] || [ $n -ge 50 ]; do sleep 0.2; n=$((n + 1)); done
echo LGUEST-VSOCK-LISTENING

echo "LGUEST-STEP vsock: 64 MiB each way with host port 5000"
vsock-io connect 2 5000 --send 64M --recv 64M
echo "LGUEST-STEP vsock: 10 connections at once to host port 5001"
pids=
for i in 1 2 3 4 5 6 7 8 9 10; do
    vsock-io connect 2 5001 --send 1M --recv 1M >connect-5001-$i.out 2>&1 &
    pids="$pids $!"
done
for p in $pids; do wait "$p"; done
cat connect-5001-*.out
echo "LGUEST-STEP vsock: host port 5999, where nobody listens"
timeout 30 vsock-io connect 2 5999
echo "LGUEST-VSOCK-CLOSED status=$?"

echo "LGUEST-STEP vsock: waiting for the host's connections"
wait $l1
echo "LGUEST-VSOCK-LISTENER 1234 status=$?"
wait $l2
echo "LGUEST-VSOCK-LISTENER 1235 status=$?"
wait $l3
echo "LGUEST-VSOCK-LISTENER 1236 status=$?"
kill $watchdog 2>/dev/null
cat listen-1234.out listen-1235.out listen-1236.out
