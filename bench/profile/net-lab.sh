# Lab side of bench/profile/net.sh: where row 5's time goes. bench/profile/net.sh prepends
# CASES='CPUS:TEST ...' VMMS='lguest qemu' SECS=S FREQ=HZ.
# Row 5's set-up (bench/scenarios/net.sh): tap0 = 169.254.100.1/24 in the lab, the guest's
# virtio NIC 169.254.100.2, lguest --net tap=tap0 against QEMU virtio-net-pci vhost=off
# (lguest-vhost and qemu-vhost: both vhost=on); at 2 vCPUs, two queue pairs on a
# multi-queue tap0 the VMM makes. For each case and VMM one
# boot runs the test (iperf3 tcp-tx or tcp-rx, SECS s) twice, and the lab side watches:
#   1st run  counts: perf stat -a on KVM's, the scheduler's and the network's tracepoints;
#            perf stat --per-thread on the VMM (CPU time, context switches, syscalls by
#            thread); perf record of kvm:kvm_exit for the exit reasons
#   2nd run  CPU time: perf record -a -g (cpu-clock at FREQ Hz: TCG has no PMU), reported by
#            thread (comm), by symbol, and inclusive (children) by symbol
# Every number is also given per MiB moved: the run's iperf3 rate × (SECS + 1) s (iperf3's
# left-out first second runs too), as row 5's cpu_watch counts. Output: PROFILE lines.
. /bench/lib.sh
initrd=/bench/initrd-net.img
# vhost_net, for lguest-vhost and qemu-vhost.
while read -r m; do insmod "/bench/lab-mods/$m" 2>/dev/null; done </bench/lab-mods/order
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
# The kernel's symbols for perf report (we are root in a lab of our own).
echo 0 >/proc/sys/kernel/kptr_restrict
echo -1 >/proc/sys/kernel/perf_event_paranoid

# Counted in the first run: those this lab kernel has (perf stat refuses a list with one it
# has not).
events=""
for ev in kvm:kvm_exit kvm:kvm_userspace_exit kvm:kvm_mmio kvm:kvm_pio kvm:kvm_msi_set_irq \
    kvm:kvm_inj_virq kvm:kvm_vcpu_wakeup sched:sched_switch sched:sched_wakeup \
    raw_syscalls:sys_enter net:netif_receive_skb net:net_dev_xmit irq:softirq_entry; do
    if perf stat -e "$ev" true >/dev/null 2>&1; then
        events="$events${events:+,}$ev"
    else
        echo "PROFILE-NOTE this lab kernel has no $ev"
    fi
done

# seen FILE TEXT: how many lines of the guest's console in FILE start with TEXT.
seen() { tr -d '\r' <"$1" | grep -c "^$2"; }

# wait_seen FILE TEXT N SECS PID: until FILE has N such lines; fails after SECS seconds or
# once the VMM (PID) is gone.
wait_seen() {
    _i=0
    until [ "$(seen "$1" "$2")" -ge "$3" ]; do
        [ $_i -ge $(($4 * 5)) ] && return 1
        kill -0 "$5" 2>/dev/null || return 1
        sleep 0.2
        _i=$((_i + 1))
    done
}

# mib_of FILE TEST N: MiB moved in the Nth run of TEST, from its Mbit/s.
mib_of() {
    tr -d '\r' <"$1" | sed -n "s/^BENCH-RESULT metric=$2 value=\([^ ]*\) .*/\1/p" | sed -n "$3p" |
        awk -v s="$SECS" '{ printf "%.1f", $1 * 1e6 / 8 * (s + 1) / 1048576 }'
}

# counts LABEL MIB: the first run's counters, in all and per MiB.
counts() {
    awk -F, -v l="$1" -v mib="$2" '$1 ~ /^[0-9]+$/ {
        printf "PROFILE-COUNT %s %s %d %.1f/MiB\n", l, $3, $1, $1 / mib }' /tmp/$1.sys
    # --per-thread -x,: COMM-TID,COUNT,UNIT,EVENT,...
    awk -F, -v l="$1" -v mib="$2" '$2 ~ /^[0-9.]+$/ && $2 > 0 {
        printf "PROFILE-THREAD %s %s %s %s %.2f/MiB\n", l, $1, $4, $2, $2 / mib }' /tmp/$1.threads
    perf script -i /tmp/$1.exits -F trace 2>/dev/null |
        awk '{ for (i = 1; i < NF; i++) if ($i == "reason") n[$(i + 1)]++ } END { for (r in n) print n[r], r }' |
        sort -rn | awk -v l="$1" -v mib="$2" '{ printf "PROFILE-EXIT %s %s %d %.1f/MiB\n", l, $2, $1, $1 / mib }'
}

# cpu LABEL MIB: the second run's CPU time by thread, by symbol, and inclusive by symbol.
cpu() {
    _r="perf report -i /tmp/$1.data --stdio -q -g none"
    # Samples at FREQ Hz on each CPU: samples / FREQ is CPU-seconds ("swapper" is idle).
    $_r --no-children --sort comm -F sample,comm 2>/dev/null | sort -rn |
        awk -v l="$1" -v f="$FREQ" -v mib="$2" 'NF > 1 { s = $1; $1 = "";
            printf "PROFILE-CPU %s%s: %.2f s, %.2f ms/MiB\n", l, $0, s / f, s / f * 1000 / mib }'
    $_r --no-children --sort comm,dso,sym --percent-limit 0.7 2>/dev/null | sed "/^ *$/d; s/^/PROFILE-SELF $1 /"
    $_r --children --sort comm,sym --percent-limit 4 2>/dev/null | sed "/^ *$/d; s/^/PROFILE-INCL $1 /"
}

# profile_boot VMM TEST: one boot, TEST twice, watched as above.
profile_boot() {
    _label=$1-${CPUS}cpu-$2
    _out=/tmp/$_label.out
    start_servers
    vmm_cmd "$1" 256 $CPUS $initrd "$CMDLINE bench.scenario=net bench.secs=$SECS bench.rounds=2 bench.tests=$2 bench.host=$HOST_IP" net=$TAP
    [ -z "${NET_QUEUES:-}" ] || tap_when_made &
    eval "timeout $((2 * (SECS + 10) + 150)) $CMD" </dev/null >"$_out" 2>&1 &
    _pid=$!
    _window=$((SECS + 1))
    if wait_seen "$_out" BENCH-BEGIN 1 150 $_pid && _vmm=$(vmm_pid $_pid); then
        perf stat -a -x, -o /tmp/$_label.sys -e "$events" -- sleep $_window &
        _stat=$!
        perf stat --per-thread -p "$_vmm" -x, -o /tmp/$_label.threads \
            -e task-clock,context-switches,raw_syscalls:sys_enter -- sleep $_window >/dev/null 2>&1 &
        _threads=$!
        perf record -a -e kvm:kvm_exit -o /tmp/$_label.exits -- sleep $_window >/dev/null 2>&1
        wait $_stat $_threads
    fi
    if wait_seen "$_out" BENCH-BEGIN 2 $((SECS * 3 + 60)) $_pid; then
        perf record -a -g -F "$FREQ" -e cpu-clock -o /tmp/$_label.data -- sleep $_window >/dev/null 2>&1
    fi
    wait $_pid
    stop_servers
    _mib1=$(mib_of "$_out" "$2" 1) _mib2=$(mib_of "$_out" "$2" 2)
    if [ -z "$_mib1" ] || [ -z "$_mib2" ]; then
        echo "PROFILE-NOTE $_label: the guest gave no two results; its console's end:"
        tail -n 40 "$_out" | tr -d '\r' | sed "s/^/PROFILE-CONSOLE $_label /"
        return
    fi
    tr -d '\r' <"$_out" | grep "^BENCH-RESULT" | sed "s/^/PROFILE-RESULT $_label /"
    echo "PROFILE-MIB $_label counted=$_mib1 profiled=$_mib2"
    counts "$_label" "$_mib1"
    cpu "$_label" "$_mib2"
    rm -f /tmp/$_label.*
}

tunctl -t $TAP >/dev/null || echo "PROFILE-NOTE cannot make $TAP"
ip addr add $HOST_IP/24 dev $TAP
ip link set $TAP up
single_queue=1
for c in $CASES; do
    CPUS=${c%%:*} test=${c#*:}
    if [ "$CPUS" -gt 1 ] && [ $single_queue = 1 ]; then
        # As row 5: at 2 vCPUs two queue pairs, on a multi-queue tap0 each VMM makes itself.
        tunctl -d $TAP >/dev/null || echo "PROFILE-NOTE cannot delete the single-queue $TAP"
        NET_QUEUES=2 single_queue=0
    elif [ "$CPUS" = 1 ] && [ $single_queue = 0 ]; then
        echo "PROFILE-NOTE list the 1-vCPU cases first (tap0 is multi-queue now): $c skipped"
        continue
    fi
    for vmm in $VMMS; do
        profile_boot "$vmm" "$test"
    done
done
drain
