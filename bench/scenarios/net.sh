# Lab side of bench/run.sh's row 5 (network); bench/run.sh prepends RUNS=N SECS=S ROUNDS=R PIN=0|1.
# The lab side of the link: tap0 = 169.254.100.1/24 (link-local; the traffic never leaves
# the lab machine), an iperf3 server and a tcp-rr server on it. The guest (bench.scenario=net,
# 256 MiB) takes 169.254.100.2 on its virtio NIC and runs iperf3 guest → host, host → guest
# (-R) and tcp-rr's 1-byte round trips, SECS seconds each, ROUNDS times over (every number is
# a sample). VMMs: lguest (--net tap=tap0) against QEMU with vhost=off (virtio-net in the
# VMM's own process, both) as row `net`, and, when the lab's kernel has vhost_net
# (/bench/lab-mods), lguest with vhost=on against QEMU with vhost=on (the kernel's datapath
# under both) as row `net-vhost`, whose lguest line says vmm=lguest. All of that at 1 vCPU on
# the persistent single-queue tap0 busybox's tunctl makes, then lguest and QEMU vhost=off at
# 2 vCPUs with two queue pairs (row net-2cpu): there each VMM makes tap0 itself, multi-queue, and
# tap_when_made gives it the lab's address. CPU cost: beside every boot, cpu_watch reads the
# lab's busy ticks when each iperf3 test begins and when its result comes, and emits cpu-tx
# and cpu-rx, the lab's CPU-seconds per GiB moved, and from the lab kernel's KVM counters
# (debugfs) the guest's exits and injected interrupts per MiB (exits-tx, irqs-tx, ...), which
# say where a datapath's time goes. RUNS runs each, alternating;
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
skip=""
# KVM's counters, summed over every VM and vCPU: /sys/kernel/debug/kvm/exits, irq_injections.
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
kvm_stat() { cat /sys/kernel/debug/kvm/$1 2>/dev/null || echo 0; }

# cpu_watch CONSOLE PID: beside a boot (io_boot's HOST_SIDE), until the VMM (PID) ends. The
# guest says `BENCH-BEGIN M` half a second before test M starts (its lab CPU time is read
# then) and prints M's result when it ends (read again): for tcp-tx and tcp-rx, the bytes
# moved are the rate times SECS + 1 (iperf3's left-out first second runs too). Polls every
# 0.2 s, so each window is up to that much longer than the test (with no traffic in it).
cpu_watch() {
    _seen=0 _start=""
    while kill -0 "$2" 2>/dev/null; do
        # One grep a look (the lab's CPU is what is measured); the rest only when a line came.
        if [ "$(grep -c '^BENCH-' "$1")" -le "$_seen" ]; then sleep 0.2; continue; fi
        tr -d '\r' <"$1" | grep '^BENCH-' | tail -n +$((_seen + 1)) >/tmp/cpu-watch.new
        while read -r _tag _what _value _; do
            _seen=$((_seen + 1))
            case "$_tag $_what" in
                "BENCH-BEGIN tcp-tx" | "BENCH-BEGIN tcp-rx")
                    _start=$(lab_busy_ticks) _exits=$(kvm_stat exits) _irqs=$(kvm_stat irq_injections)
                    ;;
                "BENCH-RESULT metric=tcp-tx" | "BENCH-RESULT metric=tcp-rx")
                    [ -n "$_start" ] || continue
                    _m=${_what#metric=tcp-}
                    _bytes=$(awk -v v="${_value#value=}" -v s="$SECS" 'BEGIN { printf "%.0f", v * 1e6 / 8 * (s + 1) }')
                    emit_cpu_per_gib "$cw_row" "$cw_vmm" "$_start" "$_bytes" "cpu-$_m"
                    per_mib "exits-$_m" $(($(kvm_stat exits) - _exits)) exits/MiB
                    per_mib "irqs-$_m" $(($(kvm_stat irq_injections) - _irqs)) irqs/MiB
                    _start=""
                    ;;
            esac
        done </tmp/cpu-watch.new
        sleep 0.2
    done
}
HOST_SIDE=cpu_watch
# per_mib METRIC COUNT UNIT: COUNT over cpu_watch's $_bytes, per MiB.
per_mib() { emit "$cw_row" "$cw_vmm" "$1" "$(awk -v c="$2" -v b="$_bytes" 'BEGIN { printf "%.1f", c / (b / 1048576) }')" "$3"; }

# net_once VMM: one boot, ROUNDS × three measurements. Fails (for a retry) only when the guest died.
net_once() {
    start_servers
    net_boot "$@"
    _status=$?
    stop_servers
    return $_status
}

# net_boot VMM: net_once's boot, with the servers up, at $CPUS vCPUs.
net_boot() {
    vmm_cmd "$1" 256 $CPUS $initrd "$CMDLINE bench.scenario=net bench.secs=$SECS bench.rounds=$ROUNDS bench.host=$HOST_IP" net=$TAP
    # A boot takes ~10-20 s, a test SECS + ~2 s (iperf3 also runs a first second it leaves out).
    _limit=$((ROUNDS * 3 * (SECS + 5) + 80))
    cw_row=net cw_vmm=$1
    case $1 in
        lguest-vhost) cw_row=net-vhost cw_vmm=lguest ;;
        qemu-vhost) cw_row=net-vhost ;;
    esac
    [ "$CPUS" = 1 ] || cw_row=$cw_row-${CPUS}cpu
    [ -z "${NET_QUEUES:-}" ] || tap_when_made &
    io_boot $cw_row $cw_vmm $_limit "no eth0"
}

CPUS=1
tunctl -t $TAP >/dev/null || note net "cannot make $TAP"
ip addr add $HOST_IP/24 dev $TAP
ip link set $TAP up
alternate net_once $vmms
tunctl -d $TAP >/dev/null || note net-2cpu "cannot delete the single-queue $TAP"
# lguest's vhost=on with two pairs stalled the lab machine's kernel (RCU stalls on its CPU 0,
# then nothing) in both runs that tried it, so the 2-vCPU round is the userspace datapaths'.
CPUS=2 NET_QUEUES=2
alternate net_once lguest qemu
drain
