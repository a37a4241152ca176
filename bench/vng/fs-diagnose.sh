# shellcheck shell=sh
# bench/vng/fs-diagnose.sh: a lab scenario that runs row 11's virtme-ng boot once, as
# bench/scenarios/fs.sh does, and records why it ended. vng answers 255 for every way its VM
# can end without the guest's script reporting a status (QEMU gone, the guest's kernel
# panicked or reset, the script killed by a signal) and sends the guest's console to
# /dev/null, so its status alone tells nothing. Here, wrappers first on PATH stand in for
# QEMU and virtiofsd (vng finds both by name) and log:
#   QEMU       its exit status, the script's status as the guest wrote it (vng's ret file:
#              empty when the guest never wrote one, -1 when the script died of a signal),
#              the guest's console at loglevel 4 (errors, oopses and panics) and QEMU's
#              CPU resets (-d cpu_reset: a triple fault shows as a reset);
#   virtiofsd  its exit status and its own log (vng's --syslog dropped: the lab has no syslog);
# and every 10 s the files the untar has made so far, virtiofsd's open fds, QEMU's RSS and
# the lab's free memory. Run it (after bench/run.sh --rows fs has built bench/out) with:
#   labslot lab/run.sh --with-qemu --timeout 600 --file bench/scenarios/lib.sh:/bench/lib.sh \
#     --file bench/out/vng/usr:/usr --file bench/out/k-generic:/bench/k-generic \
#     --file bench/out/tree.tar:/bench/tree.tar --file bench/fs/phases.sh:/bench/fs-phases.sh \
#     --file bench/fs/vng-guest.sh:/bench/fs-vng-guest.sh bench/vng/fs-diagnose.sh
# (prepend `ENTRIES=N MD5=M SECS=S` lines to a copy for another tree or time limit).
. /bench/lib.sh
ENTRIES=${ENTRIES:-5051} MD5=${MD5:-b7a1fb18bfb165b035bda96893d9ad73} SECS=${SECS:-420}
ulimit -n 1048576
share=/tmp/fsbench log=/tmp/diagnose.log
mkdir -p $share /fsbench /fsbench-ram /diagnose
truncate -s 256M /tmp/fsbench.img && mkfs.ext4 -q -F /tmp/fsbench.img && mount -o loop /tmp/fsbench.img $share ||
    { echo "cannot make the ext4 share"; exit 1; }
rm -rf $share/lost+found

cat >/diagnose/qemu-system-x86_64 <<'EOF'
#!/bin/sh
# vng's probes (-version, -device help) go straight through; its VM's run is logged.
case " $* " in *" -kernel "*) ;; *) exec /usr/bin/qemu-system-x86_64 "$@" ;; esac
ret=""
for a; do
    shift
    case $a in
        *id=console,path=/dev/null) a=${a%/dev/null}/tmp/vng-console.log ;;
        file,id=ret,path=*) ret=${a#file,id=ret,path=} ;;
        *virtme.exec=*) a="$a loglevel=4" ;;
    esac
    set -- "$@" "$a"
done
/usr/bin/qemu-system-x86_64 "$@" -d cpu_reset -D /tmp/qemu-resets.log
s=$?
echo "QEMU exited: status $s at $(cut -d' ' -f1 /proc/uptime) s; the guest's script status: [$(cat "$ret" 2>/dev/null)]" >>/tmp/diagnose.log
exit $s
EOF
cat >/diagnose/virtiofsd <<'EOF'
#!/bin/sh
case " $* " in *" --socket-path "*) ;; *) exec /usr/bin/virtiofsd "$@" ;; esac
for a; do shift; [ "$a" = --syslog ] || set -- "$@" "$a"; done
/usr/bin/virtiofsd "$@" 2>>/tmp/virtiofsd.log
echo "virtiofsd ($*) exited: status $? at $(cut -d' ' -f1 /proc/uptime) s" >>/tmp/diagnose.log
EOF
chmod +x /diagnose/*

# largest VALUE over the processes named NAME, from `reader PID` (the wrappers share the names).
largest() { for _p in $(pidof "$1"); do $2 "$_p"; done | sort -n | tail -1; }
open_fds() { ls /proc/$1/fd | wc -l; }
rss_kib() { awk '/VmRSS/ { print $2 }' /proc/$1/status; }
sample() {
    while sleep 10; do
        echo "at $(cut -d' ' -f1 /proc/uptime) s: $(find $share -type f | wc -l) files," \
            "virtiofsd fds $(largest virtiofsd open_fds), QEMU RSS $(largest qemu-system-x86_64 rss_kib) KiB," \
            "lab available $(awk '/MemAvailable/ { print $2 }' /proc/meminfo) KiB"
    done
}
sample &
sampler=$!
_k=/bench/k-generic
echo "vng started at $(cut -d' ' -f1 /proc/uptime) s"
# Through a pipe: vng's QEMU reopens /proc/self/fd/1 and 2, which then append to it.
{
    PATH=/diagnose:$PATH timeout "$SECS" vng --run $_k/boot/vmlinuz-$(ls $_k/lib/modules) --memory 512M --cpus 1 \
        --rwdir /fsbench=$share -- sh /bench/fs-vng-guest.sh "$ENTRIES" "$MD5" </dev/null
    echo "vng exited: status $? at $(cut -d' ' -f1 /proc/uptime) s" >>$log
    killall -9 qemu-system-x86_64 virtiofsd 2>/dev/null   # what a timed-out vng leaves
} 2>&1 | cat >/tmp/vng.out
kill $sampler
for part in $log /tmp/vng.out /tmp/virtiofsd.log /tmp/vng-console.log; do
    echo "---- $part"
    tail -c 3000 $part 2>/dev/null | tr -cd '\n -~'
done
echo "---- QEMU's CPU resets: $(grep -c 'CPU Reset' /tmp/qemu-resets.log 2>/dev/null) (the first is the boot's)"
echo "---- files left on the host: $(find $share -type f | wc -l)"
echo "---- the lab's kernel log"
dmesg | tail -15
drain
