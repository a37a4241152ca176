# Inside the lab: virtio-net on a tap device (guest side: guest/init's `net` scenario). The
# lab machine has tap0 at 169.254.1.1/16; the guest puts 169.254.1.2/16 on eth0, pings the
# lab, sends it 4 MiB over TCP and receives 4 MiB from it (busybox nc), and each end checks
# what it got against what the other sent (the guest's pattern, or the md5 of ours, which
# the guest is given on its command line). Link-local addresses: nothing leaves the
# lab machine. Two boots: lguest's own datapath (cases net-*), then the kernel's vhost-net
# (`vhost=on`, cases vhost-*), where a vhost kernel thread must have carried the frames. Then
# a multi-queue card (cases mq-*): 2 vCPUs, `queues=2` on a tap lguest makes itself
# (multi-queue): the guest's driver must have switched the second pair on through the control
# queue (the tap then has two queues attached), each pair with its own worker thread.
# Each check prints "CASE NAME status=0" (or status=1 and "FAIL NAME: why");
# the guest's console is always printed. Every wait is bounded.
set -o pipefail
. /tests/lib.sh
cd /tmp
guest="--kernel /guest/vmlinux --initrd /guest/initramfs.cpio.gz --memory 256M"
bytes=$((4 * 1048576))

# The lab's end: tap0 (busybox tunctl: a persistent tap, IFF_TAP|IFF_NO_PI), with an address.
tunctl -t tap0 >/dev/null && ip addr add 169.254.1.1/16 dev tap0 && ip link set tap0 up
tap_status=$?
check net-tap "cannot set up tap0 with 169.254.1.1/16 (status $tap_status)" [ "$tap_status" = 0 ]
pattern host $bytes >to-guest
want=$(pattern guest $bytes | md5)

# The most CPU ticks (user + system) any vhost kernel thread has used, 0 without one.
vhost_ticks() {
    most=0
    for comm in /proc/[0-9]*/comm; do
        case $(cat "$comm" 2>/dev/null) in vhost-*) ;; *) continue ;; esac
        set -- $(cat "${comm%/comm}/stat" 2>/dev/null | sed 's/.*) //')
        [ $# -ge 13 ] && [ $((${12} + ${13})) -gt $most ] && most=$((${12} + ${13}))
    done
    echo $most
}

# session NAME FLAGS...: one boot with `lguest run ... FLAGS`, its checks named NAME-*.
session() {
    name=$1
    shift
    : >from-guest
    # Two one-shot TCP servers: 5001 stores what the guest sends, 5002 sends the host pattern.
    # (With -e the program gets the socket: cat ends at the guest's EOF, and the socket
    # closes when the program exits.)
    nc -l -p 5001 -e sh -c 'cat >/tmp/from-guest' &
    recv_pid=$!
    nc -l -p 5002 -e cat /tmp/to-guest &
    send_pid=$!
    # vhost's worker is a kernel thread named vhost-<owner's pid>: note the CPU time (ticks)
    # the busiest one has used so far, every 0.2 s while the boot lasts.
    echo 0 >vhost-ticks
    (while sleep 0.2; do vhost_ticks >>vhost-ticks; done) &
    watch_pid=$!

    echo "== $name: lguest run $*"
    cmdline="console=ttyS0 reboot=k panic=-1 quiet lguest.scenario=net lguest.net.addr=169.254.1.2/16"
    cmdline="$cmdline lguest.net.peer=169.254.1.1 lguest.net.send=5001:$bytes lguest.net.recv=5002:$bytes:$(md5 <to-guest)"
    timeout 300 lguest run $guest "$@" --cmdline "$cmdline" </dev/null 2>&1 | tee $name.out
    status=$?
    echo "== $name: lguest exited with status $status"
    kill $recv_pid $send_pid $watch_pid 2>/dev/null
    s=/sys/class/net/tap0/statistics
    echo "tap0: rx_packets=$(cat $s/rx_packets) tx_packets=$(cat $s/tx_packets) rx_bytes=$(cat $s/rx_bytes) tx_bytes=$(cat $s/tx_bytes)"

    check $name-exit "lguest exited with $status (124/143: timed out after 300 s)" [ "$status" = 0 ]
    check $name-done "the guest did not finish its scenario" grep -q '^LGUEST-SCENARIO-DONE' $name.out
    check $name-ping "the guest did not say LGUEST-NET-PING-OK" grep -q '^LGUEST-NET-PING-OK' $name.out
    got=$(md5 <from-guest)
    check $name-guest-to-host "the lab got $(wc -c <from-guest) bytes with md5=$got; the guest pattern of $bytes bytes has md5=$want" \
        [ "$got" = "$want" ]
    check $name-guest-to-host-guest-side "the guest did not say LGUEST-NET-SEND-OK bytes=$bytes md5=$want" \
        [ "$(said $name.out LGUEST-NET-SEND-OK)" = "bytes=$bytes md5=$want" ]
    check $name-host-to-guest "the guest did not say LGUEST-NET-RECV-OK bytes=$bytes md5=$(md5 <to-guest)" \
        [ "$(said $name.out LGUEST-NET-RECV-OK)" = "bytes=$bytes md5=$(md5 <to-guest)" ]
}

session net --net tap=tap0
ticks=$(sort -n vhost-ticks | tail -n 1)
check net-no-vhost "a vhost kernel thread used $ticks ticks without vhost=on" [ "$ticks" = 0 ]
check vhost-dev "no /dev/vhost-net in the lab (did vhost_net load? lab/run.sh lists the lab's modules)" [ -c /dev/vhost-net ]
session vhost --net tap=tap0,vhost=on
ticks=$(sort -n vhost-ticks | tail -n 1)
echo "== vhost: the vhost kernel thread used $ticks ticks of CPU"
check vhost-thread "no vhost kernel thread did any work (its CPU time stayed $ticks ticks): the frames did not go through vhost-net" \
    [ "$ticks" -gt 0 ]

# The multi-queue card: tap0 made again by lguest, multi-queue; the lab's end gets its address
# once it exists. lguest says (at debug, for its control queue) how many pairs the driver set;
# every 0.2 s the lab counts lguest's virtio-net worker threads, and keeps the most.
tunctl -d tap0 >/dev/null
(i=0; until [ -e /sys/class/net/tap0 ] || [ $i -ge 600 ]; do sleep 0.1; i=$((i + 1)); done
 ip addr add 169.254.1.1/16 dev tap0 && ip link set tap0 up) &
echo 0 >mq-samples
(while sleep 0.2; do
    workers=0
    for comm in /proc/$(pidof lguest)/task/*/comm; do [ "$(cat "$comm" 2>/dev/null)" = virtio-net ] && workers=$((workers + 1)); done
    echo "$workers" >>mq-samples
done) &
sampler=$!
export LGUEST_LOG=warn,lguest::virtio::net::ctrl=debug
session mq --cpus 2 --net tap=tap0,queues=2
kill $sampler 2>/dev/null
workers=$(sort -n mq-samples | tail -n 1)
echo "== mq: lguest ran at most $workers virtio-net workers"
check mq-pairs-set "lguest never said 'the driver uses 2 queue pairs': the guest's driver did not set them through the control queue" \
    grep -q 'the driver uses 2 queue pairs' mq.out
check mq-workers "lguest ran at most $workers virtio-net worker threads, not one per pair (2)" [ "$workers" = 2 ]
