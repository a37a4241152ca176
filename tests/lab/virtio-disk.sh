# Inside the lab: virtio-blk, in two lguest boots (guest side: guest/init's `disk` scenario).
#  1. one disk, id=lguest-rw: the guest reads the pattern written here before the boot
#     (checksums compared), writes its own pattern at 1 MiB, fsyncs and powers off; the
#     image must then hold exactly our first MiB and the guest's second MiB. Twice: on the
#     default engine (io_uring) and on engine=sync.
#  2. two disks: vda readonly (the guest's write must fail, the image stay unchanged) and
#     vdb an ext4 image made here with mkfs.ext4 -d, which the guest mounts to read a file
#     (vdb asks for engine=io_uring by name).
#  3. kill -9 (on the default engine, io_uring): the guest writes and fsyncs its pattern, then holds; we kill lguest with
#     SIGKILL at once, and the image must hold what the guest was told is on disk.
#  4. a disk limited to 4 MiB/s (bw_size, bw_refill_time): the guest's timed direct read.
# Each check prints "CASE NAME status=0" (or status=1 and "FAIL NAME: why"); the guest's
# console is always printed. Every lguest run is bounded by `timeout`.
set -o pipefail
. /tests/lib.sh
cd /tmp
guest="--kernel /guest/vmlinux --initrd /guest/initramfs.cpio.gz --memory 256M"
cmdline="console=ttyS0 reboot=k panic=-1 quiet lguest.scenario=disk"
MiB=1048576

# lacks TEXT FILE: FILE does not contain TEXT.
lacks() { ! grep -q "$1" "$2"; }
# boot NAME FLAGS...: one guest boot, its console on stdout and in NAME.out.
boot() {
    name=$1
    shift
    echo "== $name: lguest run $*"
    timeout 180 lguest run $guest "$@" </dev/null 2>&1 | tee "$name.out"
    status=$?
    echo "== $name: lguest exited with status $status"
    check "$name-exit" "lguest exited with $status (124/143: timed out after 180 s)" [ "$status" = 0 ]
    check "$name-done" "the guest did not finish its scenario" grep -q '^LGUEST-SCENARIO-DONE' "$name.out"
}

# 1. Read what the host wrote, write what the host then reads: on the default engine
#    (io_uring, which the lab's kernel has: no note may say lguest fell back), and again on
#    engine=sync.
#    The default engine's boot has 2 vCPUs and a disk with queues=2 (multiqueue), which the
#    guest's driver must take up, one queue per vCPU: the reads and writes go through both.
# rw NAME ,OPTIONS [FLAGS...]: case 1 as NAME, with OPTIONS added to the --disk and FLAGS to lguest.
rw() {
    name=$1 options=$2
    shift 2
    pattern host $((2 * MiB)) >rw.img
    host_md5=$(md5 <rw.img)
    { pattern host $MiB; pattern guest $MiB; } >rw.expected
    boot "$name" --disk "/tmp/rw.img,id=lguest-rw$options" --cmdline "$cmdline lguest.disk.write=vda" "$@"
    vda=$(said "$name.out" "LGUEST-DISK vda")
    check "$name-read" "the guest's vda: '${vda:-none}'; the host file has size=$((2 * MiB)) md5=$host_md5" \
        [ "$(field "$vda" size)/$(field "$vda" md5)" = "$((2 * MiB))/$host_md5" ]
    check "$name-id" "the guest's vda has serial '$(field "$vda" serial)', not lguest-rw" \
        [ "$(field "$vda" serial)" = lguest-rw ]
    check "$name-guest-write" "the guest did not say LGUEST-DISK-WRITE-OK vda md5=$(pattern guest $MiB | md5)" \
        [ "$(said "$name.out" LGUEST-DISK-WRITE-OK)" = "vda md5=$(pattern guest $MiB | md5)" ]
    check "$name-host-file" "the image is not the host's first MiB + the guest's second MiB: $(cmp rw.img rw.expected 2>&1)" \
        cmp -s rw.img rw.expected
}
rw disk-rw ,queues=2 --cpus 2
check disk-rw-queues "the guest's vda has $(field "$vda" queues) hardware queues, not the 2 of queues=2" \
    [ "$(field "$vda" queues)" = 2 ]
check disk-rw-io-uring "lguest fell back to the sync engine: $(grep -m1 'sync engine' disk-rw.out)" \
    lacks 'serving it with the sync engine' disk-rw.out
rw disk-rw-sync ,engine=sync

# 2. Two disks: vda readonly, vdb ext4.
pattern host $MiB >ro.img
ro_md5=$(md5 <ro.img)
mkdir -p ext4-root/dir
pattern ext4 $((256 * 1024)) >ext4-root/dir/hello.txt
file_md5=$(md5 <ext4-root/dir/hello.txt)
truncate -s 8M ext4.img
mkfs.ext4 -q -L lguest -d ext4-root ext4.img || echo "FAIL mkfs.ext4 exited with $?"
ext4_md5=$(md5 <ext4.img)
boot disk-two --disk /tmp/ro.img,readonly,id=lguest-ro --disk /tmp/ext4.img,id=lguest-ext4,engine=io_uring \
    --cmdline "$cmdline lguest.disk.readonly=vda lguest.disk.ext4=vdb:dir/hello.txt"
vda=$(said disk-two.out "LGUEST-DISK vda") vdb=$(said disk-two.out "LGUEST-DISK vdb")
check disk-two-vda "the guest's vda: '${vda:-none}'; want size=$MiB serial=lguest-ro md5=$ro_md5" \
    [ "$(field "$vda" size)/$(field "$vda" serial)/$(field "$vda" md5)" = "$MiB/lguest-ro/$ro_md5" ]
check disk-two-vdb "the guest's vdb: '${vdb:-none}'; want size=$((8 * MiB)) serial=lguest-ext4 md5=$ext4_md5" \
    [ "$(field "$vdb" size)/$(field "$vdb" serial)/$(field "$vdb" md5)" = "$((8 * MiB))/lguest-ext4/$ext4_md5" ]
check disk-two-readonly "the guest did not say LGUEST-DISK-READONLY-OK vda" \
    grep -q '^LGUEST-DISK-READONLY-OK vda' disk-two.out
check disk-two-readonly-host-file "the readonly image changed: md5 $(md5 <ro.img), was $ro_md5" \
    [ "$(md5 <ro.img)" = "$ro_md5" ]
check disk-two-ext4 "the guest did not say LGUEST-DISK-EXT4-OK vdb dir/hello.txt md5=$file_md5" \
    [ "$(said disk-two.out LGUEST-DISK-EXT4-OK | cut -d' ' -f1-3)" = "vdb dir/hello.txt md5=$file_md5" ]

# 3. A write the guest has flushed survives kill -9 of the VMM at that moment: the flush is
#    acknowledged only after fdatasync, so nothing the guest counts on is left in lguest.
pattern host $((2 * MiB)) >k9.img
lguest run $guest --disk /tmp/k9.img --cmdline "$cmdline lguest.disk.write=vda lguest.hold=1" </dev/null >k9.out 2>&1 &
pid=$!
n=0
until grep -q '^LGUEST-HOLDING' k9.out || ! kill -0 $pid 2>/dev/null || [ $n -ge 1800 ]; do
    sleep 0.1
    n=$((n + 1))
done
kill -9 $pid 2>/dev/null
wait $pid
status=$?
echo "== disk-kill9: lguest ended with status $status"
tr -d '\r' <k9.out | grep '^LGUEST-'
check disk-kill9-held "the guest never wrote, flushed and held (no LGUEST-HOLDING)" grep -q '^LGUEST-HOLDING' k9.out
check disk-kill9-killed "lguest was not killed by SIGKILL while the guest held (status $status, want 137)" [ "$status" = 137 ]
check disk-kill9-host-file "after kill -9 the image lacks the guest's flushed MiB: $(cmp k9.img rw.expected 2>&1)" \
    cmp -s k9.img rw.expected

# 4. A rate-limited disk: 4 MiB/s (0.4 MiB every 100 ms) read by the guest past its page
#    cache; the guest's own clock must see 4 MiB/s within 20 %. 16 MiB: about 4 s.
truncate -s 16M rate.img
boot disk-rate --disk /tmp/rate.img,bw_size=419430,bw_refill_time=100 --cmdline "$cmdline lguest.disk.rate=vda"
rate=$(said disk-rate.out "LGUEST-DISK-RATE vda")
bytes=$(field "$rate" bytes) ms=$(field "$rate" ms)
kib_s=$((${bytes:-0} * 1000 / 1024 / ${ms:-1}))
echo "== disk-rate: ${bytes:-?} bytes in ${ms:-?} ms: $kib_s KiB/s (limit 4096 KiB/s)"
check disk-rate "the guest read at $kib_s KiB/s, not 4096 KiB/s within 20 % ('${rate:-no LGUEST-DISK-RATE line}')" \
    [ "$kib_s" -ge 3276 -a "$kib_s" -le 4915 ]
