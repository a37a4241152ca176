# Inside the lab: snapshots of a stock kernel. One guest (count scenario, a virtio disk it
# writes each count into) is booted with the API, paused (its counter stops), saved, and
# killed; then restored:
#  1. by `lguest restore`: the counter goes on from where it stopped (not from 0), and a
#     count written after the restore reaches the disk image;
#  2. as a clone by PUT /snapshot/load on `lguest firecracker` (paused, its drive moved to a
#     copy of the image with PATCH /drives, then resumed): it goes on counting. (Two clones at
#     once are tests/snapshot.rs's, on tiny guests: two Debian guests on the lab's one emulated
#     CPU outran the lab's 600 s.)
# Each check prints "CASE NAME status=0" (or status=1 and "FAIL NAME: why").
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
until_true() {
    limit=$(($1 * 5)); shift
    n=0
    until "$@" || [ $n -ge $limit ]; do sleep 0.2; n=$((n + 1)); done
}
disk_count() { head -c 64 "$1" | tr -d '\0' | sed -n 's/^LGUEST-COUNT \([0-9]*\).*/\1/p' | head -n1; }

dd if=/dev/zero of=disk.img bs=$MiB count=4 2>/dev/null
timeout 600 lguest run --memory 256M --kernel /guest/vmlinux --initrd /guest/initramfs.cpio.gz \
    --cmdline "console=ttyS0 reboot=k panic=1 quiet lguest.scenario=count lguest.count.disk=vda" \
    --disk /tmp/disk.img --api-sock /tmp/boot.sock </dev/null >boot.out 2>&1 &
boot=$!
until_true 180 grep -q '^LGUEST-COUNT 5' boot.out
check snap-booted "the guest did not count to 5" grep -q '^LGUEST-COUNT 5' boot.out
call snap-pause /tmp/boot.sock PATCH /vm '{"state": "Paused"}'
before=$(counts boot.out)
sleep 2
check snap-pause-stops "the counter went from $before to $(counts boot.out) while paused" [ "$before" = "$(counts boot.out)" ]
last=$(count_in boot.out)
call snap-create /tmp/boot.sock PUT /snapshot/create '{"snapshot_path": "/tmp/vm.snap", "mem_file_path": "/tmp/vm.mem"}'
echo "SNAPSHOT-SIZES state_bytes=$(wc -c <vm.snap) memory_bytes=$(wc -c <vm.mem)"
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
kill $a
wait $a
status=$?
check snap-restore-exit "lguest restore exited with $status after SIGTERM" [ "$status" = 0 ]
check snap-restore-ctrl-alt-del "the restored guest did not see Ctrl-Alt-Del" grep -q LGUEST-CTRL-ALT-DEL a.out

# 2. A clone through the API, which takes its own copy of the disk before it runs.
cp disk.img clone.img
timeout 300 lguest firecracker --api-sock /tmp/b.sock </dev/null >b.out 2>&1 &
b=$!
until_true 20 [ -S /tmp/b.sock ]
call snap-load /tmp/b.sock PUT /snapshot/load '{"snapshot_path": "/tmp/vm.snap", "mem_backend": {"backend_type": "File", "backend_path": "/tmp/vm.mem"}, "resume_vm": false}'
drive=$(api /tmp/b.sock GET /vm/config | head -n1 | sed -n 's/.*"drive_id":"\([^"]*\)".*/\1/p')
call snap-clone-drive /tmp/b.sock PATCH "/drives/$drive" "{\"drive_id\": \"$drive\", \"path_on_host\": \"/tmp/clone.img\"}"
call snap-clone-resume /tmp/b.sock PATCH /vm '{"state": "Resumed"}'
until_true 60 counted b.out 3
check snap-clone-api "the API's clone counted from '$(first_count_in b.out)' (paused at $last): $(head -c 600 b.out)" [ "$(first_count_in b.out)" = $((last + 1)) ]
on_clone=$(disk_count clone.img)
check snap-clone-disk "the clone's image has count '$on_clone' (paused at $last)" [ "${on_clone:-0}" -gt "$last" ]
kill $b
wait $b
cat boot.out a.out b.out | grep -v '^LGUEST-COUNT ' | head -n 80
