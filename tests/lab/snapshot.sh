# Inside the lab: snapshots of a stock kernel. One small guest (128 MiB; count scenario, a
# virtio disk it writes each count into, a network card on tap0 with 169.254.1.2/16) is
# booted with the API, paused (its counter stops), saved, and killed; then restored:
#  1. by `lguest restore`: the counter goes on from where it stopped (not from 0), a count
#     written after the restore reaches the disk image, and the lab pings the guest over tap0;
#  2. as two clones at once from the same files, each on a tap of its own: one by PUT
#     /snapshot/load on `lguest firecracker` (network_overrides: tap1; paused, its drive moved
#     to a copy of the image with PATCH /drives, then resumed), one by `lguest restore --net
#     net0=tap2`. The lab pings each through its own tap (`ping -I`: both clones have the
#     same address and MAC), and both keep counting;
#  3. from a Diff snapshot: the booted guest tracks dirty pages; after the Full snapshot it
#     is resumed, counts (each count also a file in its memory), is paused again and saved as
#     a Diff, whose memory file must take far less disk than the Full one's. Merged onto a
#     copy of the Full memory file by `lguest rebase-snap`, it restores in a new process: the
#     counter goes on from the Diff's point and every file written before it is there.
# Addresses are link-local; nothing leaves the lab machine. Every wait re-asks its condition
# and is bounded; each check prints "CASE NAME status=0" (or status=1 and "FAIL NAME: why").
set -o pipefail
. /tests/lib.sh
cd /tmp
MiB=1048576

# api SOCKET METHOD PATH [BODY]: the answer's body, then its status on a line of its own.
api() {
    curl -s --max-time 120 --unix-socket "$1" -X "$2" -H 'Content-Type: application/json' \
        ${4:+-d "$4"} -w '\n%{http_code}\n' "http://localhost$3"
}
# call NAME SOCKET METHOD PATH BODY: a call that must answer 204.
call() {
    answer=$(api "$2" "$3" "$4" "$5")
    check "$1" "$3 $4 answered: $answer" [ "$(echo "$answer" | tail -n1)" = 204 ]
}
# count_in OUT: the last LGUEST-COUNT number in OUT (empty if none); first_count_in likewise.
count_in() { tr -d '\r' <"$1" | sed -n 's/^LGUEST-COUNT \([0-9]*\)$/\1/p' | tail -n1; }
first_count_in() { tr -d '\r' <"$1" | sed -n 's/^LGUEST-COUNT \([0-9]*\)$/\1/p' | head -n1; }
counts() { tr -d '\r' <"$1" | grep -c '^LGUEST-COUNT '; }
# counted OUT N: OUT has more than N counts (a function, so until_true asks again each time).
counted() { [ "$(counts "$1")" -gt "$2" ]; }
# until_true SECS CONDITION...: asks again every 0.2 s until it holds or SECS have passed (a
# deadline, not a count of tries: a try may itself take seconds, as a ping that goes unanswered).
until_true() {
    deadline=$(($(date +%s) + $1)); shift
    until "$@" || [ "$(date +%s)" -ge $deadline ]; do sleep 0.2; done
}
disk_count() { head -c 64 "$1" | tr -d '\0' | sed -n 's/^LGUEST-COUNT \([0-9]*\).*/\1/p' | head -n1; }

# pings TAP: the lab reaches the guest (169.254.1.2) through TAP, whose address is its own.
pings() { ping -c 1 -W 2 -I "$1" 169.254.1.2 >/dev/null 2>&1; }
# stop PID: SIGTERM (the guest sees Ctrl-Alt-Del), then wait for it; its exit status.
stop_vmm() {
    kill "$1"
    wait "$1"
}
# One tap per running guest, each with an address of its own in 169.254.0.0/16.
for n in 0 1 2; do
    tunctl -t tap$n >/dev/null && ip addr add 169.254.$((n + 1)).1/16 dev tap$n && ip link set tap$n up ||
        echo "FAIL snap-taps: cannot set up tap$n"
done

dd if=/dev/zero of=disk.img bs=$MiB count=4 2>/dev/null
timeout 600 lguest run --memory 128M --kernel /guest/vmlinux --initrd /guest/initramfs.cpio.gz \
    --cmdline "console=ttyS0 reboot=k panic=1 quiet lguest.scenario=count lguest.count.disk=vda lguest.count.files=1 lguest.net.addr=169.254.1.2/16" \
    --disk /tmp/disk.img --net tap=tap0 --api-sock /tmp/boot.sock --track-dirty-pages </dev/null >boot.out 2>&1 &
boot=$!
until_true 180 grep -q '^LGUEST-COUNT 5' boot.out
check snap-booted "the guest did not count to 5" grep -q '^LGUEST-COUNT 5' boot.out
until_true 10 pings tap0
check snap-boot-ping "the booted guest does not answer a ping on tap0" pings tap0
call snap-pause /tmp/boot.sock PATCH /vm '{"state": "Paused"}'
before=$(counts boot.out)
sleep 2
check snap-pause-stops "the counter went from $before to $(counts boot.out) while paused" [ "$before" = "$(counts boot.out)" ]
last=$(count_in boot.out)
call snap-create /tmp/boot.sock PUT /snapshot/create '{"snapshot_path": "/tmp/vm.snap", "mem_file_path": "/tmp/vm.mem"}'
echo "SNAPSHOT-SIZES state_bytes=$(wc -c <vm.snap) memory_bytes=$(wc -c <vm.mem) memory_on_disk_kib=$(du -k vm.mem | cut -f1)"

# The Diff: a few counts (and files) after the Full snapshot.
call snap-diff-resume /tmp/boot.sock PATCH /vm '{"state": "Resumed"}'
until_true 30 counted boot.out $((before + 5))
call snap-diff-pause /tmp/boot.sock PATCH /vm '{"state": "Paused"}'
diff_last=$(count_in boot.out)
call snap-diff-create /tmp/boot.sock PUT /snapshot/create '{"snapshot_path": "/tmp/diff.snap", "mem_file_path": "/tmp/diff.mem", "snapshot_type": "Diff"}'
full_kib=$(du -k vm.mem | cut -f1) diff_kib=$(du -k diff.mem | cut -f1)
echo "SNAPSHOT-DIFF-SIZES counts_between=$((diff_last - last)) memory_bytes=$(wc -c <diff.mem) memory_on_disk_kib=$diff_kib full_on_disk_kib=$full_kib"
check snap-diff-small "the Diff's memory file takes $diff_kib KiB, the Full one's $full_kib KiB" [ "$diff_kib" -lt $((full_kib / 4)) ]
kill -9 $boot
wait $boot 2>/dev/null

# 1. lguest restore: the counter and the disk go on.
timeout 300 lguest restore --snapshot /tmp/vm.snap --memory-file /tmp/vm.mem --api-sock /tmp/a.sock </dev/null >a.out 2>&1 &
a=$!
until_true 60 counted a.out 3
first=$(first_count_in a.out)
check snap-restore-continues "the restored guest counted from '$first' (paused at $last): $(head -c 600 a.out)" [ "$first" = $((last + 1)) ]
on_disk=$(disk_count disk.img)
check snap-restore-disk "the image's count is '$on_disk', the guest's $(count_in a.out) (paused at $last)" [ "${on_disk:-0}" -gt "$last" ]
until_true 10 pings tap0
check snap-restore-ping "the restored guest does not answer a ping on tap0" pings tap0
stop_vmm $a
status=$?
check snap-restore-exit "lguest restore exited with $status after SIGTERM" [ "$status" = 0 ]
check snap-restore-ctrl-alt-del "the restored guest did not see Ctrl-Alt-Del" grep -q LGUEST-CTRL-ALT-DEL a.out

# 2. Two clones at once. The API's clone takes its own copy of the disk and tap1 before it
# runs; the command line's keeps disk.img (nothing else writes it now) and goes on tap2.
cp disk.img clone.img
timeout 300 lguest firecracker --api-sock /tmp/b.sock </dev/null >b.out 2>&1 &
b=$!
until_true 20 [ -S /tmp/b.sock ]
call snap-load /tmp/b.sock PUT /snapshot/load '{"snapshot_path": "/tmp/vm.snap", "mem_backend": {"backend_type": "File", "backend_path": "/tmp/vm.mem"}, "resume_vm": false, "network_overrides": [{"iface_id": "net0", "host_dev_name": "tap1"}]}'
drive=$(api /tmp/b.sock GET /vm/config | head -n1 | sed -n 's/.*"drive_id":"\([^"]*\)".*/\1/p')
call snap-clone-drive /tmp/b.sock PATCH "/drives/$drive" "{\"drive_id\": \"$drive\", \"path_on_host\": \"/tmp/clone.img\"}"
call snap-clone-resume /tmp/b.sock PATCH /vm '{"state": "Resumed"}'
# The drive lets go of disk.img (its lock) when it serves its first request on clone.img: the
# second clone opens disk.img only after the first has written a count there (its second line).
until_true 60 counted b.out 1
timeout 300 lguest restore --snapshot /tmp/vm.snap --memory-file /tmp/vm.mem --net net0=tap2 </dev/null >c.out 2>&1 &
c=$!
# both_counted N: each clone has more than N counts.
both_counted() { counted b.out "$1" && counted c.out "$1"; }
until_true 90 both_counted 3
check snap-clone-api "the API's clone counted from '$(first_count_in b.out)' (paused at $last): $(head -c 600 b.out)" [ "$(first_count_in b.out)" = $((last + 1)) ]
check snap-clone-cli "the second clone counted from '$(first_count_in c.out)' (paused at $last): $(head -c 600 c.out)" [ "$(first_count_in c.out)" = $((last + 1)) ]
until_true 10 pings tap1
check snap-clone-api-ping "the API's clone does not answer a ping on tap1" pings tap1
until_true 10 pings tap2
check snap-clone-cli-ping "the second clone does not answer a ping on tap2" pings tap2
# Both go on counting after the pings, side by side.
b_then=$(counts b.out) c_then=$(counts c.out)
goes_on() { counted b.out $((b_then + 2)) && counted c.out $((c_then + 2)); }
until_true 60 goes_on
check snap-clones-together "in the same minute the clones counted from $b_then to $(counts b.out) and from $c_then to $(counts c.out)" goes_on
on_clone=$(disk_count clone.img)
check snap-clone-disk "the clone's image has count '$on_clone' (paused at $last)" [ "${on_clone:-0}" -gt "$last" ]
stop_vmm $b
stop_vmm $c

# 3. The Diff, rebased onto a copy of the Full memory file.
cp vm.mem merged.mem
lguest rebase-snap --base-file merged.mem --diff-file diff.mem
rebased=$?
check snap-diff-rebase "lguest rebase-snap exited with $rebased" [ $rebased = 0 ]
timeout 300 lguest restore --snapshot /tmp/diff.snap --memory-file /tmp/merged.mem </dev/null >d.out 2>&1 &
d=$!
until_true 60 counted d.out 2
check snap-diff-continues "the Diff's guest counted from '$(first_count_in d.out)' (saved at $diff_last): $(head -c 600 d.out)" [ "$(first_count_in d.out)" = $((diff_last + 1)) ]
# The files line that follows the first count after the restore (count diff_last + 1).
files=$(tr -d '\r' <d.out | awk '/^LGUEST-COUNT / { seen = 1 } seen && /^LGUEST-FILES / { print $2; exit }')
check snap-diff-files "the Diff's guest has $files good files after count $((diff_last + 1)), not $((diff_last + 2))" [ "$files" = $((diff_last + 2)) ]
stop_vmm $d
s=/sys/class/net
echo "taps: tap1 rx_packets=$(cat $s/tap1/statistics/rx_packets) tap2 rx_packets=$(cat $s/tap2/statistics/rx_packets)"
cat boot.out a.out b.out c.out d.out | grep -v '^LGUEST-COUNT \|^LGUEST-FILES ' | head -n 100
