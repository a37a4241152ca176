# Inside the lab: `--net user`, the user-mode network (passt), with lguest run by a user who
# is not root (nobody, given /dev/kvm). The lab machine has br0 with 169.254.1.1/16 and
# 169.254.2.1/16 and a default route through it: passt needs one to learn what to offer the
# guest (the lab machine's own address, 169.254.1.1, and its router, 169.254.1.254, which
# passt maps to the lab machine itself). The lab's resolver is a dnsmasq on 169.254.2.1 that
# knows lab.test, and passt hands it on to the guest. The guest (guest/init's `netuser`
# scenario) gets its address by DHCP, fetches a page from the lab's httpd through the router's
# address, through 169.254.2.1 and by name (lab.test), and serves a page that the lab fetches through a forwarded port
# (127.0.0.1:8081 to the guest's 80). The guest waits for the lab's word (a connection through
# a second forward, 127.0.0.1:9081 to its 81) before it starts the stream below: passt reset the
# forwarded fetch in half the first attempts when it raced that bulk stream into the guest.
# Then, while the guest reads an endless stream from the
# lab, passt is killed: lguest must say so, keep the VM running, and the guest must see its
# link go down and power off by itself (status 0). Link-local addresses only, and no interface
# with a wire: nothing leaves the lab machine. No IPv6: passt (Debian 12's and trixie's alike,
# conf_ip6/nl_addr_get) offers the guest IPv6 only when the host's default-route interface has
# an address of global scope, and test networks may carry link-local addresses only.
# Every wait is bounded.
set -o pipefail
. /tests/lib.sh
cd /tmp
guest="--kernel /guest/vmlinux --initrd /guest/initramfs.cpio.gz --memory 256M"

ip link add br0 type bridge && ip addr add 169.254.1.1/16 dev br0 && ip addr add 169.254.2.1/16 dev br0 &&
    ip link set br0 up && ip route add default via 169.254.1.254 dev br0
br_status=$?
check net-user-setup "cannot set up br0 and its default route (status $br_status)" [ "$br_status" = 0 ]
# The lab's resolver, read by passt at its start: lab.test is 169.254.2.1.
grep -q '^root:' /etc/passwd 2>/dev/null || echo 'root:x:0:0:root:/root:/bin/sh' >>/etc/passwd
echo 'nameserver 169.254.2.1' >/etc/resolv.conf
dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --pid-file= --user=root \
    --listen-address=169.254.2.1 --bind-interfaces --address=/lab.test/169.254.2.1 &
dns_pid=$!
mkdir -p /tmp/www
pattern host 65536 >/tmp/www/index.html
httpd -p 8080 -h /tmp/www
# The endless stream the guest is reading when passt dies.
nc -l -p 5003 -e cat /dev/zero &
stream_pid=$!

# wait_said OUT MARKER SECS: succeeds once the guest has said MARKER; fails after SECS, or
# as soon as lguest ($lguest_pid) has exited.
wait_said() {
    n=0
    until tr -d '\r' <"$1" | grep -q "^$2"; do
        [ $n -lt "$3" ] && kill -0 "$lguest_pid" 2>/dev/null || return 1
        sleep 1
        n=$((n + 1))
    done
}

fwd="hostfwd=tcp:127.0.0.1:8081-:80,hostfwd=tcp:127.0.0.1:9081-:81"
echo "== net-user: lguest run --net user,$fwd (as nobody)"
cmdline="console=ttyS0 reboot=k panic=-1 quiet lguest.scenario=netuser lguest.net.hosts=169.254.1.254,169.254.2.1,lab.test"
cmdline="$cmdline lguest.net.fetch=8080:$(md5 </tmp/www/index.html) lguest.net.serve=80 lguest.net.await=81 lguest.net.stream=5003"
: >user.out
cat >run-lguest.sh <<EOF
id -u >/tmp/lguest-user
exec timeout 600 lguest run $guest --net user,$fwd --cmdline "$cmdline"
EOF
chmod 755 run-lguest.sh
# A user without root: nobody, who may open /dev/kvm here (the lab's own device) and nothing
# else of root's (as_nobody in lib.sh).
as_nobody /tmp/run-lguest.sh </dev/null >user.out 2>&1 &
lguest_pid=$!

if wait_said user.out LGUEST-NET-SERVING 300; then
    timeout 60 wget -q -O /tmp/from-guest http://127.0.0.1:8081/index.html 2>/tmp/wget.err
    wget_status=$?
else
    wget_status="never (the guest did not say LGUEST-NET-SERVING in 300 s)"
fi
want=$(pattern guest 4096 | md5)
got=$(md5 </tmp/from-guest 2>/dev/null)
check net-user-hostfwd "wget through the forwarded port: status $wget_status, md5=$got, want $want: $(cat /tmp/wget.err 2>/dev/null)" \
    [ "$got" = "$want" ]
# The word that lets the guest start its stream.
echo go | timeout 60 nc 127.0.0.1 9081 >/dev/null 2>&1

if wait_said user.out LGUEST-NET-STREAMING 120; then
    passt_pid=$(pidof passt)
    echo "== net-user: killing passt (pid $passt_pid) mid-stream"
    kill -9 $passt_pid
fi
wait $lguest_pid
status=$?
kill $stream_pid $dns_pid 2>/dev/null
echo "== net-user: lguest exited with status $status"
cat user.out
check net-user-unprivileged "lguest did not run as nobody (uid $(cat lguest-user 2>/dev/null))" [ "$(cat lguest-user 2>/dev/null)" = 65534 ]

check net-user-exit "lguest exited with $status (124: timed out after 600 s)" [ "$status" = 0 ]
check net-user-done "the guest did not finish its scenario" grep -q '^LGUEST-SCENARIO-DONE' user.out
check net-user-dhcp "the guest got no address by DHCP" grep -q '^LGUEST-NET-DHCP-OK ip=169.254.1.1/16 router=169.254.1.254' user.out
check net-user-dns "the guest was not given the lab's resolver" grep -q '^LGUEST-NET-DHCP-OK .* dns=169.254.2.1' user.out
for host in 169.254.1.254 169.254.2.1 lab.test; do
    check "net-user-fetch-$host" "the guest did not fetch the lab's page from $host" \
        grep -q "^LGUEST-NET-FETCH-OK host=$host md5=$(md5 </tmp/www/index.html)" user.out
done
check net-user-killed-reported "lguest did not say that passt died" \
    grep -q "^lguest: passt (pid $passt_pid) was killed by signal 9; the guest's network link is down, the VM keeps running" user.out
check net-user-released "the guest never heard the lab's word on its second forwarded port" \
    [ "$(tr -d '\r' <user.out | grep -x LGUEST-NET-RELEASED)" ]
check net-user-link-down "the guest did not see its link go down" grep -q '^LGUEST-NET-LINK-DOWN bytes=' user.out
check net-user-no-passt-left "a passt is still running: $(pidof passt)" [ -z "$(pidof passt)" ]
