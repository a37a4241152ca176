# Inside the lab, two lguest boots:
#  1. --console virtio with console=hvc0: the guest's shell runs on hvc0 (guest/init opens
#     it once virtio_console is loaded); a command typed on lguest's stdin (a pipe) runs
#     there and its output comes back. We wait for the shell before typing, as a person would.
#  2. --rng: /sys/class/misc/hw_random/rng_current names virtio and /dev/hwrng gives 64
#     bytes (guest/init's `rng` scenario); with a rate limit of 16 KiB/s (1.6 KiB every
#     100 ms), 64 KiB more take the guest's clock at least 64 KiB / (16 KiB/s × 1.2).
# Each check prints "CASE NAME status=0" (or status=1 and "FAIL NAME: why"); the guest's
# console is always printed. Every wait is bounded.
set -o pipefail
. /tests/lib.sh
cd /tmp
guest="--kernel /guest/vmlinux --initrd /guest/initramfs.cpio.gz --memory 256M"

# 1. The shell on hvc0.
echo "== hvc: lguest run --console virtio"
trap '' PIPE   # should lguest be gone, typing into its FIFO fails instead of ending us
mkfifo hvc-in
timeout 180 lguest run $guest --console virtio --cmdline "console=hvc0 reboot=k panic=-1 quiet" \
    <hvc-in >hvc.out 2>&1 &
pid=$!
exec 3>hvc-in
tries=0
# Until the shell is ready, the guest gave up (a FAIL marker), lguest exited, or 120 s.
until grep -q -E 'LGUEST-SHELL-READY|LGUEST-[A-Z-]*FAIL' hvc.out || ! kill -0 $pid 2>/dev/null ||
    [ $tries -ge 600 ]; do
    sleep 0.2
    tries=$((tries + 1))
done
ready=no
grep -q LGUEST-SHELL-READY hvc.out && ready=yes
echo 'echo "virtio-console-$((6*7)) on $(tty)"' >&3
echo 'poweroff -f' >&3
wait $pid
status=$?
exec 3>&-
cat hvc.out
echo "== hvc: lguest exited with status $status"
check hvc-shell "no LGUEST-SHELL-READY from the guest on hvc0 (waited up to 120 s)" [ $ready = yes ]
check hvc-command "the command's output 'virtio-console-42 on /dev/hvc0' did not come back" \
    grep -q '^virtio-console-42 on /dev/hvc0.\{0,1\}$' hvc.out
check hvc-exit "lguest exited with $status (124/143: timed out after 180 s)" [ "$status" = 0 ]

# 2. Entropy.
echo "== rng: lguest run --rng=bw_size=1638,bw_refill_time=100"
timeout 180 lguest run $guest --rng=bw_size=1638,bw_refill_time=100 \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet lguest.scenario=rng lguest.rng.rate=65536" \
    </dev/null 2>&1 | tee rng.out
status=$?
echo "== rng: lguest exited with status $status"
check rng "the guest did not say LGUEST-RNG-OK" grep -q '^LGUEST-RNG-OK virtio' rng.out
rate=$(said rng.out LGUEST-RNG-RATE)
bytes=$(field "$rate" bytes) ms=$(field "$rate" ms)
bytes_s=$((${bytes:-0} * 1000 / (${ms:-0} + 1)))
echo "== rng-rate: ${bytes:-?} bytes in ${ms:-?} ms: $bytes_s bytes/s (limit 16380)"
check rng-rate "the guest read ${bytes:-no} bytes at $bytes_s bytes/s: over the limit of 16380 by more than 20 % ('${rate:-no LGUEST-RNG-RATE line}')" \
    [ "${bytes:-0}" = 65536 -a "$bytes_s" -le 19656 ]
check rng-exit "lguest exited with $status (124/143: timed out after 180 s)" [ "$status" = 0 ]
