# Lab side of bench/run.sh's row 4 (disk); bench/run.sh prepends RUNS=N SECS=S ROUNDS=R PIN=0|1.
# A 256 MiB raw image in the lab's RAM-backed root file system, given to the guest as its
# only virtio disk (lguest --disk, on its default engine, io_uring; QEMU virtio-blk-pci with
# cache=writeback and aio=threads, and again with aio=io_uring: all go through the lab's page
# cache). The guest (bench.scenario=disk, 512 MiB: its initramfs
# carries fio and ~80 MB of libraries) runs fio on /dev/vda with direct I/O: sequential read
# and write (1 MiB, 4 in flight), random read and write (4 KiB, 16 in flight), SECS seconds
# each, ROUNDS times over, and prints every number (each one sample). VMMs alternate, RUNS
# boots each; a run whose guest died is noted and retried once. A VMM whose guest has no disk
# is noted and not run again. PIN=1: vCPU thread on lab CPU 0, all else on CPU 1 (lib.sh).
. /bench/lib.sh
[ "$PIN" = 1 ] && taskset -p -c 1 $$ >/dev/null
initrd=/bench/initrd-disk.img
dd if=/dev/zero of=/tmp/disk.img bs=1M count=256 2>/dev/null
skip=""

# disk_once VMM: one boot, ROUNDS × four fio jobs. Fails (for a retry) only when the guest died.
disk_once() {
    vmm_cmd "$1" 512 1 $initrd "$CMDLINE bench.scenario=disk bench.secs=$SECS bench.rounds=$ROUNDS" disk=/tmp/disk.img
    # A boot takes ~15-25 s (loading the 87 MB initramfs), a fio job SECS + ~2 s.
    io_boot disk "$1" $((ROUNDS * 4 * (SECS + 5) + 90)) "no /dev/vda"
}

for run in $(seq 1 "$RUNS"); do
    for vmm in lguest qemu qemu-uring; do
        case " $skip " in *" $vmm "*) continue ;; esac
        disk_once $vmm || disk_once $vmm || true
    done
done
drain
