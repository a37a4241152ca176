# Lab side of bench/run.sh's row 5 (network); bench/run.sh prepends RUNS=N SECS=S ROUNDS=R PIN=0|1.
# The lab side of the link: tap0 = 169.254.100.1/24 (link-local; the traffic never leaves
# the lab machine), an iperf3 server and a tcp-rr server on it. The guest (bench.scenario=net,
# 256 MiB) takes 169.254.100.2 on its virtio NIC and runs iperf3 guest → host, host → guest
# (-R) and tcp-rr's 1-byte round trips, SECS seconds each, ROUNDS times over (every number is
# a sample). VMMs: lguest (--net tap=tap0) against QEMU with vhost=off (virtio-net in the
# VMM's own process, both) as row `net`, and, when the lab's kernel has vhost_net
# (/bench/lab-mods), lguest with vhost=on against QEMU with vhost=on (the kernel's datapath
# under both) as row `net-vhost`, whose lguest line says vmm=lguest. RUNS runs each, alternating;
# a run whose guest died is noted and retried once; a VMM whose guest has no NIC is noted
# and not run again. PIN=1: the VMM's vCPU thread on lab CPU 0, all else (its other threads,
# the vhost kernel thread, the iperf3 and tcp-rr servers) on CPU 1 (lib.sh).
. /bench/lib.sh
[ "$PIN" = 1 ] && taskset -p -c 1 $$ >/dev/null
initrd=/bench/initrd-net.img
while read -r m; do insmod "/bench/lab-mods/$m" 2>/dev/null; done </bench/lab-mods/order
vmms="lguest qemu"
if [ -c /dev/vhost-net ]; then
    vmms="$vmms lguest-vhost qemu-vhost"
else
    note net "no /dev/vhost-net in the lab (vhost_net did not load): vhost=on not measured"
fi
tunctl -t $TAP >/dev/null || note net "cannot make $TAP"
ip addr add $HOST_IP/24 dev $TAP
ip link set $TAP up
skip=""

# Fresh servers for every boot: a guest that dies in the middle of a test leaves iperf3's
# server busy with it ("the server is busy running a test") for every boot after.
start_servers() {
    iperf3 -s >>/tmp/iperf3-server.log 2>&1 &
    iperf_pid=$!
    tcp-rr server 5202 &
    rr_pid=$!
}
stop_servers() {
    stop_pid $iperf_pid
    stop_pid $rr_pid
}

# net_once VMM: one boot, ROUNDS × three measurements. Fails (for a retry) only when the guest died.
net_once() {
    start_servers
    net_boot "$@"
    _status=$?
    stop_servers
    return $_status
}

# net_boot VMM: net_once's boot, with the servers up.
net_boot() {
    vmm_cmd "$1" 256 1 $initrd "$CMDLINE bench.scenario=net bench.secs=$SECS bench.rounds=$ROUNDS bench.host=$HOST_IP" net=$TAP
    # A boot takes ~10-20 s, a test SECS + ~2 s (iperf3 also runs a first second it leaves out).
    _limit=$((ROUNDS * 3 * (SECS + 5) + 80))
    case $1 in
        lguest-vhost) io_boot net-vhost lguest $_limit "no eth0" ;;
        qemu-vhost) io_boot net-vhost qemu-vhost $_limit "no eth0" ;;
        *) io_boot net "$1" $_limit "no eth0" ;;
    esac
}

alternate net_once $vmms
drain
