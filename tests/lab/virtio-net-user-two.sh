# Inside the lab: two guests on `--net user` at once, each with its own passt, run by nobody
# (as in virtio-net-user.sh, whose set-up this repeats). Each gets its address by DHCP,
# fetches the lab's page through its router, and serves a page that the lab fetches through
# its own forwarded port (8081 and 8082); the lab then releases each guest through a second
# forwarded port (9081, 9082) and both power off. Link-local addresses only; every wait is
# bounded.
set -o pipefail
. /tests/lib.sh
cd /tmp
guest="--kernel /guest/vmlinux --initrd /guest/initramfs.cpio.gz --memory 192M"

ip link add br0 type bridge && ip addr add 169.254.1.1/16 dev br0 && ip link set br0 up &&
    ip route add default via 169.254.1.254 dev br0
br_status=$?
check net-two-setup "cannot set up br0 and the default route (status $br_status)" [ "$br_status" = 0 ]
mkdir -p /tmp/www
pattern host 65536 >/tmp/www/index.html
httpd -p 8080 -h /tmp/www

# wait_said OUT PID MARKER SECS: succeeds once the guest has said MARKER; fails after SECS, or
# as soon as its lguest (PID) has exited.
wait_said() {
    n=0
    until tr -d '\r' <"$1" | grep -q "^$3"; do
        [ $n -lt "$4" ] && kill -0 "$2" 2>/dev/null || return 1
        sleep 1
        n=$((n + 1))
    done
}

page_md5=$(md5 </tmp/www/index.html)
for i in 1 2; do
    cmdline="console=ttyS0 reboot=k panic=-1 quiet lguest.scenario=netuser lguest.net.hosts=169.254.1.254"
    cmdline="$cmdline lguest.net.fetch=8080:$page_md5 lguest.net.serve=80 lguest.net.await=81"
    cat >run-lguest-$i.sh <<EOS
exec timeout 600 lguest run $guest --net user,hostfwd=tcp:127.0.0.1:808$i-:80,hostfwd=tcp:127.0.0.1:908$i-:81 --cmdline "$cmdline"
EOS
    chmod 755 run-lguest-$i.sh
    : >guest-$i.out
    echo "== net-two: guest $i on --net user,hostfwd=tcp:127.0.0.1:808$i-:80,hostfwd=tcp:127.0.0.1:908$i-:81"
    as_nobody /tmp/run-lguest-$i.sh </dev/null >guest-$i.out 2>&1 &
    eval "pid_$i=\$!"
done

want=$(pattern guest 4096 | md5)
for i in 1 2; do
    eval "pid=\$pid_$i"
    got= wget_status="never (guest $i did not say LGUEST-NET-SERVING in 400 s)"
    if wait_said guest-$i.out "$pid" LGUEST-NET-SERVING 400; then
        timeout 60 wget -q -O from-guest-$i http://127.0.0.1:808$i/index.html 2>wget-$i.err
        wget_status=$?
        got=$(md5 <from-guest-$i)
    fi
    check "net-two-hostfwd-$i" "wget from guest $i: status $wget_status, md5=$got, want $want" [ "$got" = "$want" ]
done
# Both served while both ran; now each is let go.
for i in 1 2; do
    echo bye | timeout 60 nc 127.0.0.1 908$i >/dev/null 2>&1
done
for i in 1 2; do
    eval "pid=\$pid_$i"
    wait "$pid"
    status=$?
    echo "== net-two: guest $i's lguest exited with status $status"
    cat guest-$i.out
    check "net-two-exit-$i" "lguest $i exited with $status" [ "$status" = 0 ]
    check "net-two-dhcp-$i" "guest $i got no address by DHCP" grep -q '^LGUEST-NET-DHCP-OK ip=169.254.1.1/16' guest-$i.out
    check "net-two-fetch-$i" "guest $i did not fetch the lab's page" grep -q "^LGUEST-NET-FETCH-OK host=169.254.1.254 md5=$page_md5" guest-$i.out
    check "net-two-released-$i" "guest $i was not released" [ "$(tr -d '\r' <guest-$i.out | grep -x LGUEST-NET-RELEASED)" ]
done
check net-two-no-passt-left "a passt is still running: $(pidof passt)" [ -z "$(pidof passt)" ]
