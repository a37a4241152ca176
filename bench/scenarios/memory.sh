# Lab side of bench/run.sh's row 3 (memory); bench/run.sh prepends RUNS=N.
# Boots the benchmark guest (bench.scenario=idle: it loads the virtio modules, brings eth0
# up, prints BENCH-IDLE and sleeps) under each VMM, waits for BENCH-IDLE plus 2 s, then reads
# the VMM's /proc/PID/smaps: its RSS, and its own overhead = RSS minus the resident part of
# the guest's RAM mapping (see smaps_kib in lib.sh). Configurations: 256 MiB and 2 GiB with
# no device, and 256 MiB with 4 virtio devices (rng, two disks, one NIC on a tap). QEMU is
# microvm with PCIe in all three, so only the devices differ. The guest reports how many
# virtio devices it found; a VMM that gave fewer than asked is noted, not measured.
. /bench/lib.sh
QEMU_PCIE=1
initrd=/bench/initrd-idle.img
dd if=/dev/zero of=/tmp/disk-a.img bs=1M count=16 2>/dev/null
dd if=/dev/zero of=/tmp/disk-b.img bs=1M count=16 2>/dev/null
tunctl -t $TAP >/dev/null && ip link set $TAP up || note memory-256m-4dev "cannot make $TAP"

# measure_once VMM ROW MEM_MIB DEVICES-WANTED [DEVICE...]
measure_once() {
    _vmm=$1 row=$2 mem=$3 want=$4
    shift 4
    vmm_cmd "$_vmm" "$mem" 1 $initrd "$CMDLINE bench.scenario=idle" "$@"
    (eval "exec $CMD") </dev/null >/tmp/mem.out 2>&1 &
    pid=$!
    if ! wait_said /tmp/mem.out BENCH-IDLE 240 $pid; then
        note "$row" "$_vmm: the guest never went idle: $(tail -c 300 /tmp/mem.out | printable)"
        stop_pid $pid
        return 1
    fi
    sleep 2
    set -- $(smaps_kib $pid "$mem")
    stop_pid $pid
    seen=$(sed -n 's/^BENCH-IDLE devices=\([0-9]*\).*/\1/p' /tmp/mem.out)
    if [ "${seen:-0}" -lt "$want" ]; then
        note "$row" "$_vmm gave the guest ${seen:-0} of the $want virtio devices asked for: not measured." \
            "The guest said: $(grep -a -i 'virtio\|pci\|BENCH\|insmod' /tmp/mem.out | tail -n 8 | printable)"
        return 0
    fi
    [ "$1" -gt 0 ] && [ "$2" -gt 0 ] || { note "$row" "$_vmm: no guest RAM mapping found in smaps"; return 1; }
    emit "$row" "$_vmm" rss "$(kib_to_mib "$1")" MiB
    emit "$row" "$_vmm" overhead "$(kib_to_mib $(($1 - $2)))" MiB
}

for run in $(seq 1 "$RUNS"); do
    for vmm in lguest qemu; do
        measure_once $vmm memory-256m 256 0 || measure_once $vmm memory-256m 256 0 || true
        measure_once $vmm memory-2g 2048 0 || measure_once $vmm memory-2g 2048 0 || true
        measure_once $vmm memory-256m-4dev 256 4 rng disk=/tmp/disk-a.img disk=/tmp/disk-b.img net=$TAP ||
            measure_once $vmm memory-256m-4dev 256 4 rng disk=/tmp/disk-a.img disk=/tmp/disk-b.img net=$TAP || true
    done
done
drain
