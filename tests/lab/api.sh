# Inside the lab: Firecracker's API (lguest firecracker), spoken with curl --unix-socket.
#  1. A guest configured and started only through the API, with the boot arguments
#     Firecracker's clients send (pci=off, and Kata's acpi=off): boot source, machine config
#     (2 vCPUs), a drive, a network card, entropy, InstanceStart. The guest must reach /init
#     with both CPUs and its three virtio devices; GET / says Running; Paused stops the
#     guest's counter, Resumed continues it; SendCtrlAltDel powers it off and lguest exits 0,
#     removing its socket.
#  2. A --no-api --config-file boot.
# Each check prints "CASE NAME status=0" (or status=1 and "FAIL NAME: why").
set -o pipefail
. /tests/lib.sh
cd /tmp
sock=/tmp/fc.sock
MiB=1048576

# api METHOD PATH [BODY]: the answer's body, then its status on a line of its own.
api() {
    if [ -n "$3" ]; then
        curl -s --max-time 60 --unix-socket "$sock" -X "$1" -H 'Content-Type: application/json' \
            -d "$3" -w '\n%{http_code}\n' "http://localhost$2"
    else
        curl -s --max-time 60 --unix-socket "$sock" -X "$1" -w '\n%{http_code}\n' "http://localhost$2"
    fi
}
status_of() { api "$@" | tail -n1; }
# put NAME PATH BODY: a PUT (or PATCH with METHOD=PATCH) that must answer 204.
call() {
    answer=$(api "$2" "$3" "$4")
    check "$1" "$2 $3 answered: $answer" [ "$(echo "$answer" | tail -n1)" = 204 ]
}
state() { api GET / | head -n1 | sed -n 's/.*"state":"\([^"]*\)".*/\1/p'; }
counts() { grep -c '^LGUEST-COUNT ' fc.out; }
# until_true SECS COMMAND...: waits until COMMAND succeeds, for at most SECS seconds.
until_true() {
    limit=$(($1 * 5)); shift
    n=0
    until "$@" || [ $n -ge $limit ]; do sleep 0.2; n=$((n + 1)); done
}

tunctl -t fctap0 >/dev/null && ip link set fctap0 up
pattern host $MiB >disk.img

timeout 300 lguest firecracker --api-sock "$sock" --id lab-api </dev/null >fc.out 2>&1 &
pid=$!
until_true 20 [ -S "$sock" ]
check api-socket "no socket at $sock" [ -S "$sock" ]
check api-not-started "GET / says '$(state)'" [ "$(state)" = "Not started" ]
call api-boot-source PUT /boot-source '{"kernel_image_path": "/guest/vmlinux", "initrd_path": "/guest/initramfs.cpio.gz",
    "boot_args": "console=ttyS0 reboot=k panic=1 pci=off acpi=off iommu=off net.ifnames=0 quiet lguest.scenario=count"}'
call api-machine PUT /machine-config '{"vcpu_count": 2, "mem_size_mib": 256}'
call api-drive PUT /drives/data '{"drive_id": "data", "path_on_host": "/tmp/disk.img", "is_root_device": false, "is_read_only": true}'
call api-net PUT /network-interfaces/eth0 '{"iface_id": "eth0", "host_dev_name": "fctap0", "guest_mac": "06:00:ac:10:00:02"}'
call api-entropy PUT /entropy '{}'
call api-start PUT /actions '{"action_type": "InstanceStart"}'
until_true 120 grep -q '^LGUEST-COUNT 3' fc.out
check api-init "the guest did not reach /init" grep -q LGUEST-GUEST-INIT fc.out
counting=$(said fc.out LGUEST-COUNTING)
check api-devices "the guest found '$counting', not 2 CPUs and 3 virtio devices" [ "$counting" = "cpus=2 virtio=3" ]
check api-running "GET / says '$(state)'" [ "$(state)" = Running ]

call api-pause PATCH /vm '{"state": "Paused"}'
check api-paused "GET / says '$(state)'" [ "$(state)" = Paused ]
before=$(counts)
sleep 3
after=$(counts)
check api-pause-stops "the counter went from $before to $after while paused" [ "$before" = "$after" ]
call api-resume PATCH /vm '{"state": "Resumed"}'
until_true 30 [ "$(counts)" -gt $((after + 3)) ]
check api-resume-continues "the counter stayed at $(counts) after the resume" [ "$(counts)" -gt $((after + 3)) ]

call api-ctrl-alt-del PUT /actions '{"action_type": "SendCtrlAltDel"}'
wait $pid
status=$?
cat fc.out
check api-exit "lguest exited with $status" [ "$status" = 0 ]
check api-powered-off "the guest did not see Ctrl-Alt-Del" grep -q LGUEST-CTRL-ALT-DEL fc.out
check api-socket-removed "$sock is still there" [ ! -e "$sock" ]

cat >vm.json <<JSON
{"boot-source": {"kernel_image_path": "/guest/vmlinux", "initrd_path": "/guest/initramfs.cpio.gz",
                 "boot_args": "console=ttyS0 reboot=k panic=1 pci=off quiet lguest.scenario=poweroff"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
 "drives": [], "network-interfaces": []}
JSON
timeout 300 lguest firecracker --no-api --config-file vm.json </dev/null >file.out 2>&1
status=$?
cat file.out
check config-file-exit "lguest exited with $status" [ "$status" = 0 ]
check config-file-done "the guest did not finish its scenario" grep -q '^LGUEST-SCENARIO-DONE' file.out
