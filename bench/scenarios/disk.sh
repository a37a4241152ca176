# Lab side of bench/run.sh's row 4 (disk); bench/run.sh prepends RUNS=N SECS=S ROUNDS=R PIN=0|1.
# A 256 MiB raw image in the lab's RAM-backed root file system, given to the guest as its
# only virtio disk (lguest --disk, on its default engine, io_uring; QEMU virtio-blk-pci with
# cache=writeback and aio=threads, and again with aio=io_uring: all go through the lab's page
# cache). The guest (bench.scenario=disk, 512 MiB: its initramfs
# carries fio and ~80 MB of libraries) runs fio on /dev/vda with direct I/O: sequential read
# and write (1 MiB, 4 in flight), random read and write (4 KiB, 16 in flight), each with 1 fio
# job and with 4, SECS seconds each, ROUNDS times over, and prints every number (each one
# sample) with the disk's interrupts per I/O. Beside it, disk_meter reads the lab's CPU time
# and KVM exits at each test's start and end: the CPU-seconds per GiB moved (lower is better)
# and the exits per I/O. Rows: disk (1 vCPU) and disk-2cpu (2 vCPUs). VMMs alternate, RUNS
# boots each per row; a run whose guest died is noted and retried once. A VMM whose guest has
# no disk is noted and not run again. PIN=1: vCPU thread on lab CPU 0, all else on CPU 1.
# At 2 vCPUs lguest runs twice: with its default (one request queue) and as lguest-mq
# (queues=2, one per vCPU); QEMU's num-queues is its default (one per vCPU).
# CPUS="1 2" and VMMS (default: all of them) narrow the row down while developing.
. /bench/lib.sh
[ "$PIN" = 1 ] && taskset -p -c 1 $$ >/dev/null
initrd=/bench/initrd-disk.img
dd if=/dev/zero of=/tmp/disk.img bs=1M count=256 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
skip=""

# kvm_exits: exits of every vCPU in the lab so far (KVM's debugfs sum over its VMs).
kvm_exits() { cat /sys/kernel/debug/kvm/exits 2>/dev/null || echo 0; }

# disk_meter CONSOLE PID: while PID runs, one line in /tmp/disk-meter per guest BENCH-TEST
# or BENCH-RESULT line as it appears: "BUSY_TICKS EXITS LINE".
disk_meter() {
    _seen=0
    : >/tmp/disk-meter
    while kill -0 "$2" 2>/dev/null; do
        _n=$(grep -c '^BENCH-\(TEST\|RESULT\) ' "$1")
        if [ "$_n" -gt "$_seen" ]; then
            _ticks=$(lab_busy_ticks) _exits=$(kvm_exits)
            grep '^BENCH-\(TEST\|RESULT\) ' "$1" | tail -n +$((_seen + 1)) | tr -d '\r' |
                while read -r _line; do echo "$_ticks $_exits $_line"; done >>/tmp/disk-meter
            _seen=$_n
        fi
        sleep 0.1
    done
}

# disk_costs ROW VMM: disk_meter's readings as BENCH lines: for each test, cpu-METRIC (the
# lab's CPU-seconds per GiB moved, as emit_cpu_per_gib) and exits-METRIC (per fio I/O).
disk_costs() {
    awk -v row="$1" -v vmm="$2" -v secs="$SECS" '
        $3 == "BENCH-TEST" { name = $4; ticks = $1; exits = $2; next }
        $3 == "BENCH-RESULT" && name != "" && index($0, "metric=" name " ") {
            split($5, v, "="); split($6, u, "=")
            ios = v[2] * secs; bytes = u[2] == "MiB/s" ? ios * 1048576 : ios * 4096
            if (ios > 0)
                printf "BENCH row=%s vmm=%s metric=cpu-%s value=%.2f unit=s/GiB\n", row, vmm, name, ($1 - ticks) / 100 / (bytes / 1073741824)
            # KVM forgets a VM'"'"'s exits when it ends: a reading after the guest powered off is none.
            if (ios > 0 && $2 >= exits)
                printf "BENCH row=%s vmm=%s metric=exits-%s value=%.2f unit=exits/IO\n", row, vmm, name, ($2 - exits) / ios
            name = ""
        }' /tmp/disk-meter
}

# disk_once ROW VMM CPUS: one boot, ROUNDS × eight fio tests. Fails (for a retry) only when
# the guest died.
disk_once() {
    vmm_cmd "$2" 512 "$3" $initrd "$CMDLINE bench.scenario=disk bench.secs=$SECS bench.rounds=$ROUNDS bench.jobs=1,4" disk=/tmp/disk.img
    # A boot takes ~15-25 s (loading the 87 MB initramfs), a fio test SECS + ~2 s.
    HOST_SIDE=disk_meter io_boot "$1" "$2" $((ROUNDS * 8 * (SECS + 5) + 90)) "no /dev/vda" || return 1
    disk_costs "$1" "$2"
}

for cpus in ${CPUS:-1 2}; do
    row=disk
    [ $cpus = 1 ] || row=disk-${cpus}cpu
    for run in $(seq 1 "$RUNS"); do
        vmms="lguest qemu qemu-uring"
        [ $cpus = 1 ] || vmms="lguest lguest-mq qemu qemu-uring"
        for vmm in $vmms; do
            case " $skip " in *" $vmm "*) continue ;; esac
            case " ${VMMS:-$vmm} " in *" $vmm "*) ;; *) continue ;; esac
            disk_once $row $vmm $cpus || disk_once $row $vmm $cpus || true
        done
    done
done
drain
