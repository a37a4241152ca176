# Inside the lab, through Firecracker's API, on one guest:
#  1. A drive's image swapped with PATCH /drives while the guest runs (Kata's way of
#     hot-plugging disks), and read by the guest: it must see the new size and contents.
#  2. A second drive limited to 10 MiB/s by PATCH /drives while the guest runs: the guest's
#     own clock must see 10 MiB/s within 20 % when it reads it past its page cache.
#  3. A network card whose rx_rate_limiter (PUT before the start) is 1 MiB/s: the guest
#     receives 4 MiB from the lab and its clock must see 1 MiB/s within 20 %. (Not 2 MiB/s: a
#     debug build's card moves only ~2.2 MiB/s unlimited in a busy lab, so a 2 MiB/s limit
#     measured the lab's spare CPU, not the limiter.) A PATCH of its
#     tx_rate_limiter shows in GET /vm/config; the metrics file counts both devices' bytes.
# The guest runs guest/init's shell on the serial console, fed from a fifo; its page cache is
# dropped before it reads.
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
truncate -s 24M rated.img
# The lab's end of the card, and a one-shot server that sends the guest 8 MiB.
tunctl -t apitap0 >/dev/null && ip addr add 169.254.1.1/16 dev apitap0 && ip link set apitap0 up
nc -l -p 5002 -e sh -c "head -c $((4 * MiB)) /dev/zero" &
server=$!
# rate NAME LIMIT_KIB_S: checks the guest's "LGUEST-API-RATE NAME bytes=N start=S end=E"
# (uptimes in s) against LIMIT_KIB_S within 20 %.
rate() {
    line=$(said drive.out "LGUEST-API-RATE $1")
    bytes=$(field "$line" bytes) start=$(field "$line" start) end=$(field "$line" end)
    kib_s=$(awk "BEGIN { t = ${end:-0} - ${start:-0}; print (t > 0) ? int(${bytes:-0} / 1024 / t) : 0 }")
    echo "== api-$1-rate: ${bytes:-?} bytes in $(awk "BEGIN { print ${end:-0} - ${start:-0} }") s: $kib_s KiB/s (limit $2 KiB/s)"
    check "api-$1-rate" "the guest saw $kib_s KiB/s, not $2 KiB/s within 20 % ('${line:-no LGUEST-API-RATE line}')" \
        [ "$kib_s" -ge $(($2 * 8 / 10)) -a "$kib_s" -le $(($2 * 12 / 10)) ]
}

mkfifo drive-in
timeout 300 lguest firecracker --api-sock "$sock" <drive-in >drive.out 2>&1 &
pid=$!
exec 3>drive-in
until_true 20 [ -S "$sock" ]
call drive-boot-source PUT /boot-source '{"kernel_image_path": "/guest/vmlinux", "initrd_path": "/guest/initramfs.cpio.gz",
    "boot_args": "console=ttyS0 reboot=k panic=1 pci=off quiet"}'
call drive-machine PUT /machine-config '{"vcpu_count": 1, "mem_size_mib": 256}'
call drive-put PUT /drives/data '{"drive_id": "data", "path_on_host": "/tmp/first.img", "is_root_device": false, "is_read_only": true}'
call drive-put-rated PUT /drives/rated '{"drive_id": "rated", "path_on_host": "/tmp/rated.img", "is_root_device": false, "is_read_only": true}'
call net-put-limited PUT /network-interfaces/eth0 '{"iface_id": "eth0", "host_dev_name": "apitap0",
    "rx_rate_limiter": {"bandwidth": {"size": 104857, "refill_time": 100}}}'
call metrics-put PUT /metrics '{"metrics_path": "/tmp/metrics.json"}'
call drive-start PUT /actions '{"action_type": "InstanceStart"}'
until_true 120 grep -q LGUEST-SHELL-READY drive.out
call drive-patch PATCH /drives/data '{"drive_id": "data", "path_on_host": "/tmp/second.img"}'
sleep 1
echo 'echo 3 >/proc/sys/vm/drop_caches; echo "LGUEST-SWAPPED size=$(cat /sys/block/vda/size) md5=$(md5sum </dev/vda | cut -d" " -f1)"' >&3
until_true 60 grep -q '^LGUEST-SWAPPED' drive.out

# 10 MiB/s: 1 MiB every 100 ms.
call drive-patch-rate PATCH /drives/rated '{"drive_id": "rated", "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100}}}'
echo 'read a _ </proc/uptime; dd if=/dev/vdb of=/dev/null bs=65536 iflag=direct 2>/dev/null; read b _ </proc/uptime; echo "LGUEST-API-RATE disk bytes=$(($(cat /sys/block/vdb/size) * 512)) start=$a end=$b"' >&3
until_true 60 grep -q '^LGUEST-API-RATE disk' drive.out
echo 'ip link set eth0 up; ip addr add 169.254.1.2/16 dev eth0; sleep 1; read a _ </proc/uptime; nc 169.254.1.1 5002 </dev/null >/tmp/got; read b _ </proc/uptime; echo "LGUEST-API-RATE net bytes=$(wc -c </tmp/got) start=$a end=$b"' >&3
until_true 60 grep -q '^LGUEST-API-RATE net' drive.out
call net-patch-tx PATCH /network-interfaces/eth0 '{"iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 1000, "refill_time": 1000}}}'
curl -s --max-time 60 --unix-socket "$sock" http://localhost/vm/config >vm-config.json
call metrics-flush PUT /actions '{"action_type": "FlushMetrics"}'
echo 'exit' >&3
wait $pid
status=$?
exec 3>&-
kill $server 2>/dev/null
cat drive.out
echo "== GET /vm/config: $(cat vm-config.json)"
echo "== metrics: $(cat metrics.json)"
swapped=$(said drive.out LGUEST-SWAPPED)
check drive-guest-sees-new-image "the guest saw '$swapped', not size=$((2 * MiB / 512)) md5=$second_md5" \
    [ "$swapped" = "size=$((2 * MiB / 512)) md5=$second_md5" ]
check drive-exit "lguest exited with $status" [ "$status" = 0 ]
rate disk 10240
rate net 1024
check net-received-all "the guest did not get all 4 MiB: '$(said drive.out "LGUEST-API-RATE net")'" \
    [ "$(field "$(said drive.out "LGUEST-API-RATE net")" bytes)" = $((4 * MiB)) ]
check net-patch-shows "GET /vm/config has no tx_rate_limiter of 1000 ops: $(cat vm-config.json)" \
    grep -q '"tx_rate_limiter":{"ops":{[^}]*"size":1000' vm-config.json
# The direct read of the whole rated disk (24 MiB) and the 4 MiB received, in the counters.
check metrics-disk "the metrics line lacks block_rated's 24 MiB read: $(cat metrics.json)" \
    grep -q '"block_rated":{[^}]*"read_bytes":[0-9]\{8,\}' metrics.json
check metrics-net "the metrics line lacks net_eth0's 4 MiB received: $(cat metrics.json)" \
    grep -q '"net_eth0":{[^}]*"rx_bytes_count":[0-9]\{7,\}' metrics.json
