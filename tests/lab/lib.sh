# shellcheck shell=sh
# Helpers for the lab test scenarios (tests/lab/*.sh), sourced as /tests/lib.sh inside the lab
# machine (busybox sh; tests/lab.rs puts it there).

# The pattern guest/init writes too: BYTES/32 numbered 32-byte lines, so data at a wrong
# offset never matches.
pattern() {  # pattern TAG BYTES
    awk -v tag="$1" -v n=$(($2 / 32)) 'BEGIN { for (i = 0; i < n; i++) printf "lguest %-5s %018d\n", tag, i }'
}
md5() { md5sum | cut -d' ' -f1; }
# said OUT MARKER: the rest of the guest's first line that starts with "MARKER " (no \r).
said() { tr -d '\r' <"$1" | sed -n "s/^$2 //p" | head -n1; }
# field LINE NAME: the value of NAME=VALUE in LINE.
field() { echo " $1 " | sed -n "s/.* $2=\([^ ]*\) .*/\1/p"; }
# check NAME WHY CONDITION...: CASE NAME status=0 if the condition holds, else status=1
# and the why.
check() {
    local name=$1 why=$2
    shift 2
    if "$@"; then
        echo "CASE $name status=0"
    else
        echo "CASE $name status=1"
        echo "FAIL $name: $why"
    fi
}

# as_nobody SCRIPT: runs SCRIPT as nobody (busybox su; busybox's setpriv can't change users),
# with /dev/kvm open to it, in a mount namespace whose root is a bind mount of the lab's root
# moved onto "/", as a real system's is after switch_root. passt needs that: it sandboxes
# itself with pivot_root, which the initramfs itself (rootfs) refuses, and with a user
# namespace, which a chroot may not make.
as_nobody() {
    chmod 666 /dev/kvm
    chmod 1777 /tmp
    grep -q '^nobody:' /etc/passwd 2>/dev/null || echo 'nobody:x:65534:65534:nobody:/nonexistent:/bin/sh' >>/etc/passwd
    grep -q '^nogroup:' /etc/group 2>/dev/null || echo 'nogroup:x:65534:' >>/etc/group
    mkdir -p /mnt/root
    unshare -m sh -c "mount -o rbind / /mnt/root && cd /mnt/root && mount -o move . / && exec chroot . su -s /bin/sh -c '$1' nobody"
}
