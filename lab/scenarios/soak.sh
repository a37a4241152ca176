# The soak test (issue 6; not in CI: `scripts/soak.sh [SECONDS]`, default 600): inside the lab,
# lguest runs the reference guest with a virtio disk and a virtio-net card on a tap, and the
# guest keeps both busy (direct-I/O reads and writes of the whole disk, TCP from the lab's web server) for
# SOAK_SECONDS. Every 30 s we sample lguest's RSS and open file descriptors; the guest counts
# its failed operations. Prints "SOAK rss_kib=... fds=..." samples and a "SOAK-RESULT" line.
trap "" PIPE
seconds=${SOAK_SECONDS:-600}
cd /tmp
dd if=/dev/zero of=soak.img bs=1M count=64 2>/dev/null
mkfifo in
lguest run --kernel /guest/vmlinux --initrd /guest/initramfs.cpio.gz --memory 256M \
    --disk /tmp/soak.img --net tap=tap0 \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet lguest.scenario=shell" <in >out 2>&1 &
pid=$!
exec 3>in
n=0
until grep -q LGUEST-SHELL-READY out || ! kill -0 $pid 2>/dev/null || [ $n -ge 900 ]; do sleep 0.2; n=$((n + 1)); done
ip addr add 169.254.1.1/16 dev tap0
ip link set tap0 up
# The lab's side of the TCP load: busybox httpd serving a 4 MiB file, which the guest fetches
# over and over (busybox nc serves one connection only).
mkdir -p www
dd if=/dev/urandom of=www/blob bs=1M count=4 2>/dev/null
httpd -p 8080 -h /tmp/www
echo "ip addr add 169.254.1.2/16 dev eth0; ip link set eth0 up; sleep 1
end=\$((\$(cut -d. -f1 /proc/uptime) + $seconds)); rounds=0; errors=0; rd=0; wr=0; tx=0
while [ \$(cut -d. -f1 /proc/uptime) -lt \$end ]; do
  dd if=/dev/vda of=/dev/null bs=1M iflag=direct 2>/dev/null || rd=\$((rd+1))
  dd if=/dev/urandom of=/dev/vda bs=64k count=256 oflag=direct conv=fsync 2>/dev/null || wr=\$((wr+1))
  wget -q -O /dev/null http://169.254.1.1:8080/blob || tx=\$((tx+1))
  rounds=\$((rounds+1))
done
echo SOAK-GUEST rounds=\$rounds errors=\$((rd+wr+tx)) read=\$rd write=\$wr tcp=\$tx" >&3
sample() { echo "SOAK t=$1 rss_kib=$(awk '/^VmRSS/ {print $2}' /proc/$pid/status) fds=$(ls /proc/$pid/fd | wc -l) threads=$(ls /proc/$pid/task | wc -l)"; }
start=$(cut -d. -f1 /proc/uptime)
while ! grep -q '^SOAK-GUEST' out && kill -0 $pid 2>/dev/null; do
    now=$(cut -d. -f1 /proc/uptime)
    [ $(((now - start) % 30)) -ne 0 ] || sample $((now - start))
    [ $((now - start)) -lt $((seconds + 300)) ] || break
    sleep 1
done
sample end
echo 'poweroff -f' >&3
exec 3>&-
wait $pid
status=$?
tr -d '\r' <out | grep -E '^SOAK-GUEST|seccomp|WARN|ERROR'
echo "SOAK-RESULT lguest-status=$status"
