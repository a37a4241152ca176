# Lab side of bench/run.sh's usernet row; bench/run.sh prepends RUNS=N SECS=S ROUNDS=R.
# The guest (bench.scenario=usernet, 256 MiB) takes its address by DHCP and runs ROUNDS rounds
# of bench/guest/init's stream_rounds over TCP: a stream to the gateway's port 5000 (the
# user network takes it to the lab's own port 5000, whose receiver times it), a stream from
# the lab's 127.0.0.1:5301, forwarded to the guest's 5001 (the guest times it), and 1-byte
# round trips with the lab's echo on 5002 through the gateway; and one stream of 32 KiB from
# the lab into the guest, which arrives intact where a bulk one does not (passt, see
# bench/README.md). Every timed stream is checked
# byte for byte: a transfer the user network corrupted or reset is a note, never a number.
# VMMs: lguest --net user,hostfwd=tcp:127.0.0.1:5301-:5001 (passt) against QEMU -netdev
# user,hostfwd=... (slirp, on 169.254.3.0/24), and against QEMU on the same passt
# (qemu-passt: -netdev stream to passt's socket), which tells passt's share from the VMM's.
# USERNET_VMMS picks others. RUNS runs each, alternating; a run whose guest died is noted
# and retried once.
# passt needs what tests/lab/virtio-net-user.sh gives it: an interface with an address and
# a default route (br0, 169.254.1.1/16, via 169.254.1.254: link-local, no wire), and a root
# it can pivot_root from, which the initramfs is not: the scenario runs itself again in a
# mount namespace whose root is a bind mount of the lab's root (for both VMMs alike).
if [ -z "${USERNET_ROOT:-}" ]; then
    mkdir -p /mnt/root
    exec unshare -m sh -c "mount -o rbind / /mnt/root && cd /mnt/root && mount -o move . / && exec chroot . env USERNET_ROOT=1 sh $0"
fi
. /bench/lib.sh
initrd=/bench/initrd-usernet.img
FWD=5301
vmms=${USERNET_VMMS:-lguest qemu qemu-passt}
ip link add br0 type bridge && ip addr add 169.254.1.1/16 dev br0 && ip link set br0 up &&
    ip route add default via 169.254.1.254 dev br0 || note usernet "cannot set up br0 and its default route"
grep -q '^root:' /etc/passwd 2>/dev/null || echo 'root:x:0:0:root:/root:/bin/sh' >>/etc/passwd
grep -q '^nobody:' /etc/passwd || echo 'nobody:x:65534:65534:nobody:/nonexistent:/bin/sh' >>/etc/passwd
grep -q '^nogroup:' /etc/group 2>/dev/null || echo 'nogroup:x:65534:' >>/etc/group
skip=""

# usernet_host CONSOLE PID: the lab's sends to the guest through the forwarded port.
usernet_host() { host_sends "$1" "$2" usernet tcp-connect 127.0.0.1 $FWD; }

# usernet_once VMM: one boot, ROUNDS × the three measurements. Fails (for a retry) only
# when the guest died.
usernet_once() {
    host_listeners "tcp-listen "
    vmm_cmd "$1" 256 1 $initrd "$CMDLINE bench.scenario=usernet bench.secs=$SECS bench.rounds=$ROUNDS" user=$FWD:5001
    HOST_SIDE=usernet_host io_boot usernet "$1" $((ROUNDS * (4 * SECS + 90) + 100)) "no eth0"
    _status=$?
    host_results usernet "$1" tcp-tx
    grep -a '^BENCH-LEASE' /tmp/usernet.out | head -1 | sed "s/^/BENCH-NOTE row=usernet $1: /"
    return $_status
}

alternate usernet_once $vmms
drain
