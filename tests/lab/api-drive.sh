# Inside the lab: a drive's image swapped with PATCH /drives while the guest runs (Kata's way
# of hot-plugging disks), through Firecracker's API, and read by the guest: it must see the
# new size and the new contents. The guest runs guest/init's shell on the serial console,
# fed from a fifo; its page cache is dropped before it reads.
set -o pipefail
. /tests/lib.sh
cd /tmp
sock=/tmp/fc-drive.sock
MiB=1048576

api() {
    curl -s --max-time 60 --unix-socket "$sock" -X "$1" -H 'Content-Type: application/json' \
        -d "$3" -w '\n%{http_code}\n' "http://localhost$2"
}
call() {
    answer=$(api "$2" "$3" "$4")
    check "$1" "$2 $3 answered: $answer" [ "$(echo "$answer" | tail -n1)" = 204 ]
}
until_true() {
    limit=$(($1 * 5)); shift
    n=0
    until "$@" || [ $n -ge $limit ]; do sleep 0.2; n=$((n + 1)); done
}

pattern first $MiB >first.img
pattern later $((2 * MiB)) >second.img
second_md5=$(md5 <second.img)

mkfifo drive-in
timeout 300 lguest firecracker --api-sock "$sock" <drive-in >drive.out 2>&1 &
pid=$!
exec 3>drive-in
until_true 20 [ -S "$sock" ]
call drive-boot-source PUT /boot-source '{"kernel_image_path": "/guest/vmlinux", "initrd_path": "/guest/initramfs.cpio.gz",
    "boot_args": "console=ttyS0 reboot=k panic=1 pci=off quiet"}'
call drive-machine PUT /machine-config '{"vcpu_count": 1, "mem_size_mib": 256}'
call drive-put PUT /drives/data '{"drive_id": "data", "path_on_host": "/tmp/first.img", "is_root_device": false, "is_read_only": true}'
call drive-start PUT /actions '{"action_type": "InstanceStart"}'
until_true 120 grep -q LGUEST-SHELL-READY drive.out
call drive-patch PATCH /drives/data '{"drive_id": "data", "path_on_host": "/tmp/second.img"}'
sleep 1
echo 'echo 3 >/proc/sys/vm/drop_caches; echo "LGUEST-SWAPPED size=$(cat /sys/block/vda/size) md5=$(md5sum </dev/vda | cut -d" " -f1)"' >&3
until_true 60 grep -q '^LGUEST-SWAPPED' drive.out
echo 'exit' >&3
wait $pid
status=$?
exec 3>&-
cat drive.out
swapped=$(said drive.out LGUEST-SWAPPED)
check drive-guest-sees-new-image "the guest saw '$swapped', not size=$((2 * MiB / 512)) md5=$second_md5" \
    [ "$swapped" = "size=$((2 * MiB / 512)) md5=$second_md5" ]
check drive-exit "lguest exited with $status" [ "$status" = 0 ]
