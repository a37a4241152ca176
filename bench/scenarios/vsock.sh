# Lab side of bench/run.sh's vsock row; bench/run.sh prepends RUNS=N SECS=S ROUNDS=R.
# The guest (bench.scenario=vsock, 256 MiB, vsock-io in its initramfs) runs ROUNDS rounds of:
# a stream to host port 5000 for SECS seconds (the lab's receiver times it), a stream from
# the lab to its port 5001 (it times it), and 1-byte round trips with the lab's echo on port
# 5002 (bench/guest/init's stream_rounds); every timed stream is checked byte for byte.
# VMMs: lguest --vsock cid=3,uds=/tmp/v.sock (Firecracker's hybrid vsock: the lab's ends are
# Unix sockets, /tmp/v.sock_PORT for the guest's connections and /tmp/v.sock with
# CONNECT/OK for the lab's) against QEMU's vhost-vsock-pci (the lab kernel's vhost_vsock;
# the lab's ends are AF_VSOCK sockets). RUNS runs each, alternating; a run whose guest died
# is noted and retried once.
. /bench/lib.sh
initrd=/bench/initrd-vsock.img
UDS=/tmp/v.sock CID=3
while read -r m; do insmod "/bench/lab-mods/$m" 2>/dev/null; done </bench/lab-mods/order
vmms=lguest
if [ -c /dev/vhost-vsock ]; then
    vmms="lguest qemu"
else
    note vsock "no /dev/vhost-vsock in the lab (vhost_vsock did not load): QEMU not measured"
fi
skip=""

# lab_ends VMM: how this VMM's guest is reached from the lab: LISTEN (host_listeners) and TO
# (the lab's connections to the guest).
lab_ends() {
    case $1 in
        lguest) LISTEN="uds-listen ${UDS}_" TO="uds-connect $UDS" ;;
        *) LISTEN="listen " TO="connect $CID" ;;
    esac
}

# vsock_host VMM PID: the lab's sends to the guest during a boot (io_boot's HOST_SIDE).
vsock_host() { host_sends "$1" "$2" vsock $TO 5001; }

# vsock_once VMM: one boot, ROUNDS × the three measurements. Fails (for a retry) only when
# the guest died.
vsock_once() {
    lab_ends "$1"
    rm -f "$UDS" "${UDS}"_*
    host_listeners "$LISTEN"
    vmm_cmd "$1" 256 1 $initrd "$CMDLINE bench.scenario=vsock bench.secs=$SECS bench.rounds=$ROUNDS" vsock=$CID:$UDS
    HOST_SIDE=vsock_host io_boot vsock "$1" $((ROUNDS * 3 * (SECS + 5) + 80)) "no vsock"
    _status=$?
    host_results vsock "$1" stream-tx
    return $_status
}

alternate vsock_once $vmms
drain
