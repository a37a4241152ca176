# shellcheck shell=sh
# Helpers for the lab side of bench/run.sh, sourced by every bench scenario as /bench/lib.sh
# (busybox sh inside the lab machine). bench/run.sh puts before each scenario the variables
# it uses (RUNS=..., SECS=...). Results are printed as lines that bench/summarize.py reads:
#   BENCH row=ROW vmm=VMM metric=METRIC value=NUMBER unit=UNIT
#   BENCH-NOTE row=ROW free text (a failed or retried run, a missing device, ...)
# VMMs: lguest, lguest-mq (its disks with a request queue per vCPU), qemu (QEMU microvm, virtio with vhost=off, disks aio=threads), qemu-vhost
# (vhost=on) and qemu-uring (disks aio=io_uring).
# Every wait is bounded: a VMM run has `timeout` around it or a deadline in a poll loop.

KERNEL=/guest/vmlinux
# reboot=t: a guest that panics (panic=-1) resets by triple fault, which ends either VMM
# (microvm has no keyboard controller: with reboot=k, QEMU would sit there until killed).
CMDLINE="console=ttyS0 panic=-1 reboot=t quiet"
MAC=52:54:00:12:34:56     # both VMMs' NIC, so the lab's neighbour cache never goes stale
TAP=tap0
HOST_IP=169.254.100.1
# QEMU's user network (slirp): its gateway (the lab machine) and the guest's DHCP address.
SLIRP_NET=169.254.3.0/24 SLIRP_HOST=169.254.3.2 SLIRP_GUEST=169.254.3.15
CR=$(printf "\r")

emit() { echo "BENCH row=$1 vmm=$2 metric=$3 value=$4 unit=$5"; }
note() { row=$1; shift; echo "BENCH-NOTE row=$row $*"; }

# lab_busy_ticks: the lab machine's CPU time so far over all its CPUs, idle and iowait left
# out, in clock ticks (USER_HZ, 100 a second): the VMM's threads, its guest's vCPUs and the
# kernel's vhost threads alike. Two readings around a transfer give its whole CPU cost, which
# on 2 emulated CPUs trades against throughput (issue 17 asks for both).
lab_busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat; }
# emit_cpu_per_gib ROW VMM START_TICKS BYTES [METRIC]: the lab's CPU-seconds per GiB moved
# since START_TICKS (a lab_busy_ticks reading), as metric METRIC (default cpu-s-per-gib;
# lower is better).
emit_cpu_per_gib() {
    _busy=$(($(lab_busy_ticks) - $3))
    emit "$1" "$2" "${5:-cpu-s-per-gib}" "$(awk -v t="$_busy" -v b="$4" 'BEGIN { printf "%.2f", t / 100 / (b / 1073741824) }')" s/GiB
}

# vmm_cmd VMM MEM_MIB CPUS INITRD CMDLINE [DEVICE...]: sets CMD to the command (a string
# for eval) that boots $KERNEL with INITRD under VMM. DEVICEs: disk=PATH, net=TAP (with
# NET_QUEUES=N set, N queue pairs on a multi-queue tap the VMM makes itself), rng,
# vsock=CID:PATH (lguest's hybrid vsock on the Unix socket PATH; QEMU's vhost-vsock-pci, whose
# host side is the lab kernel's AF_VSOCK), user=HOSTPORT:GUESTPORT (a user-mode network, the
# lab's 127.0.0.1:HOSTPORT forwarded to the guest's GUESTPORT: lguest's passt, QEMU's slirp),
# share=DIR:TAG (a host directory: lguest's virtio-fs, QEMU's 9p).
# The same devices, the same kernel, initramfs and command line for every VMM. QEMU runs
# as microvm, with PCIe when there are devices (or QEMU_PCIE=1), like lguest's PCI root.
# lguest's disks go through the host page cache (io_uring, its default engine here): QEMU gets
# cache=writeback, the same semantics, with aio=threads (qemu) or aio=io_uring (qemu-uring).
vmm_cmd() {
    _vmm=$1 _mem=$2 _cpus=$3 _initrd=$4 _cmdline=$5
    shift 5
    case $_vmm in
        lguest | lguest-vhost | lguest-mq)
            _vhost= _queues=
            [ "$_vmm" = lguest-vhost ] && _vhost=,vhost=on
            # lguest-mq: the disk with a request queue per vCPU (its default is one queue).
            [ "$_vmm" = lguest-mq ] && _queues=,queues=$_cpus
            CMD="lguest run --kernel $KERNEL --initrd $_initrd --memory ${_mem}M --cpus $_cpus --cmdline '$_cmdline'"
            for _dev in "$@"; do
                case $_dev in
                    disk=*) CMD="$CMD --disk ${_dev#disk=}$_queues" ;;
                    net=*) CMD="$CMD --net tap=${_dev#net=}$_vhost${NET_QUEUES:+,queues=$NET_QUEUES},mac=$MAC" ;;
                    rng) CMD="$CMD --rng" ;;
                    vsock=*) _v=${_dev#vsock=}; CMD="$CMD --vsock cid=${_v%%:*},uds=${_v#*:}" ;;
                    user=*) _f=${_dev#user=}; CMD="$CMD --net user,hostfwd=tcp:127.0.0.1:${_f%%:*}-:${_f#*:},mac=$MAC" ;;
                    share=*) CMD="$CMD --share ${_dev#share=}" ;;
                esac
            done
            ;;
        qemu | qemu-vhost | qemu-uring | qemu-passt)
            _vhost=off _aio=threads _passt=
            [ "$_vmm" = qemu-vhost ] && _vhost=on
            [ "$_vmm" = qemu-uring ] && _aio=io_uring
            _machine=microvm
            if [ $# -gt 0 ] || [ -n "${QEMU_PCIE:-}" ]; then _machine=microvm,pcie=on; fi
            # debug-threads=on names QEMU's threads ("CPU 0/KVM", "worker", ...): nothing else
            # changes, and watch_vmm can tell the vCPU threads from the others.
            CMD="qemu-system-x86_64 -name bench,debug-threads=on -M $_machine -enable-kvm -cpu host -m $_mem -smp $_cpus -nodefaults"
            CMD="$CMD -no-user-config -nographic -serial stdio -no-reboot -kernel $KERNEL"
            CMD="$CMD -initrd $_initrd -append '$_cmdline'"
            _n=0
            for _dev in "$@"; do
                _n=$((_n + 1))
                case $_dev in
                    disk=*) CMD="$CMD -drive file=${_dev#disk=},if=none,id=d$_n,format=raw,cache=writeback,aio=$_aio -device virtio-blk-pci,drive=d$_n" ;;
                    net=*)
                        _tapq="" _nicq=""
                        if [ "${NET_QUEUES:-1}" -gt 1 ]; then
                            # Two vectors a pair, one for config changes, one for the control queue.
                            _tapq=",queues=$NET_QUEUES" _nicq=",mq=on,vectors=$((2 * NET_QUEUES + 2))"
                        fi
                        CMD="$CMD -netdev tap,id=n$_n,ifname=${_dev#net=},script=no,downscript=no,vhost=$_vhost$_tapq -device virtio-net-pci,netdev=n$_n,mac=$MAC,romfile=$_nicq" ;;
                    rng) CMD="$CMD -object rng-random,id=r$_n,filename=/dev/urandom -device virtio-rng-pci,rng=r$_n" ;;
                    vsock=*) _v=${_dev#vsock=}; CMD="$CMD -device vhost-vsock-pci,guest-cid=${_v%%:*}" ;;
                    # QEMU's built-in 9p (what -virtfs local,...,security_model=none makes).
                    share=*) _s=${_dev#share=}; CMD="$CMD -fsdev local,id=f$_n,path=${_s%%:*},security_model=none -device virtio-9p-pci,fsdev=f$_n,mount_tag=${_s#*:}" ;;
                    # slirp's network made link-local like everything here (its default is 10.0.2.0/24).
                    # qemu-passt: the same passt lguest starts, behind QEMU's stream netdev
                    # (passt's own way of serving QEMU): whose bug is it when both stall.
                    user=*) if [ "$_vmm" = qemu-passt ]; then
                        _f=${_dev#user=}; _passt="passt -f -q -1 -s /tmp/passt-qemu.sock -t 127.0.0.1/${_f%%:*}:${_f#*:}"
                        CMD="$CMD -netdev stream,id=n$_n,server=off,addr.type=unix,addr.path=/tmp/passt-qemu.sock -device virtio-net-pci,netdev=n$_n,mac=$MAC,romfile="
                        continue
                    fi ;;
                esac
                case $_dev in
                    user=*) _f=${_dev#user=}; CMD="$CMD -netdev user,id=n$_n,net=$SLIRP_NET,host=$SLIRP_HOST,dhcpstart=$SLIRP_GUEST,hostfwd=tcp:127.0.0.1:${_f%%:*}-:${_f#*:} -device virtio-net-pci,netdev=n$_n,mac=$MAC,romfile=" ;;
                esac
            done
            [ -z "$_passt" ] || with_passt "$_passt" /tmp/passt-qemu.sock
            ;;
        *)
            echo "lib.sh: unknown VMM $_vmm" >&2
            return 1
            ;;
    esac
}

# with_passt PASST SOCK: $CMD becomes a script that starts PASST (one-off: it ends when the
# VMM closes SOCK), waits up to 10 s for SOCK, then execs the VMM, so that the VMM's pid is the
# one timed and watched.
with_passt() {
    cat >/tmp/with-passt.sh <<EOF
rm -f $2
$1 &
i=0
while [ ! -S $2 ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i + 1)); done
exec $CMD
EOF
    CMD="sh /tmp/with-passt.sh"
}

# guest_said FILE TEXT: the guest's console in FILE has a line starting with TEXT.
guest_said() { grep -q "^$2" "$1"; }

# wait_said FILE TEXT SECS [PID]: polls (every 0.5 s) until the guest said TEXT; fails after
# SECS seconds, or at once when PID (the VMM) is gone.
wait_said() {
    _i=0
    until guest_said "$1" "$2"; do
        [ $_i -ge $(($3 * 2)) ] && return 1
        [ -n "${4:-}" ] && ! kill -0 "$4" 2>/dev/null && { guest_said "$1" "$2"; return; }
        sleep 0.5
        _i=$((_i + 1))
    done
}

# stop_pid PID: SIGTERM, then SIGKILL if it is still there after 10 s; reaps it.
stop_pid() {
    kill "$1" 2>/dev/null
    _i=0
    while kill -0 "$1" 2>/dev/null && [ $_i -lt 20 ]; do sleep 0.5; _i=$((_i + 1)); done
    kill -9 "$1" 2>/dev/null
    wait "$1" 2>/dev/null
    return 0
}

# smaps_kib PID MEM_MIB: prints "RSS GUEST" in KiB: the process's whole resident set (the
# sum of Rss over its mappings) and the Rss of the guest's RAM, which is the anonymous
# mapping (no file name) whose size is closest to MEM_MIB. Overhead = RSS - GUEST.
smaps_kib() {
    awk -v want=$(($2 * 1024)) '
        /^[0-9a-f]+-[0-9a-f]+ / { anon = (NF == 5); next }
        /^Size:/ { size = $2 }
        /^Rss:/ {
            total += $2
            if (anon) {
                d = size - want; if (d < 0) d = -d
                if (best == "" || d < best) { best = d; guest = $2 }
            }
        }
        END { print total + 0, guest + 0 }' "/proc/$1/smaps"
}

# results ROW VMM FILE: turns the guest's BENCH-RESULT lines in FILE into BENCH lines, and
# its BENCH-ERROR into a note. Fails when there was no result.
results() {
    _found=1
    while IFS= read -r _line; do
        _line=${_line%"$CR"}
        case $_line in
            BENCH-RESULT\ *)
                # metric=M value=V unit=U → "M V U"
                emit "$1" "$2" $(echo "$_line" | sed 's/.*metric=\([^ ]*\) value=\([^ ]*\) unit=\([^ ]*\).*/\1 \2 \3/')
                _found=0
                ;;
            BENCH-ERROR\ *) note "$1" "$2: the guest said: ${_line#BENCH-ERROR }" ;;
        esac
    done <"$3"
    return $_found
}

# Thread placement for the I/O rows (disk, net), the same for every VMM. The lab has 2 CPUs;
# left to its scheduler, a VMM's vCPU thread and its I/O thread (lguest's device worker,
# QEMU's main loop and aio workers, the vhost kernel thread) shared one CPU for part of a
# run, which can halve the throughput (bench/README.md has what was seen). With
# PIN=1 the scenario runs on lab CPU 1 (so the lab-side servers and every VMM thread start
# there) and watch_vmm moves the vCPU threads to CPU 0: each side of the I/O path has a CPU.
# bench/run.sh pins neither row unless BENCH_PIN=1: pinned, the lab went wrong too often
# (bench/README.md). watch_vmm reports the placement either way.

# is_vcpu COMM: the thread is a vCPU (lguest "vcpuN"; QEMU, with debug-threads=on, "CPU N/KVM").
is_vcpu() { case $1 in vcpu[0-9]* | "CPU "*/KVM) return 0 ;; esac; return 1; }

# vmm_pid PID: PID itself or its first descendant (a few levels down: timeout, stopwatch;
# vng's python, sh and virtme-run) that is a VMM, once it has exec'd; fails while there is
# none (yet).
vmm_pid() {
    _p=$1
    for _ in 1 2 3 4 5; do
        read -r _c 2>/dev/null </proc/$_p/comm || return 1
        case $_c in lguest | qemu-system-x86) echo "$_p"; return 0 ;; esac
        # (read fails at the end of the file, which has no newline, but fills _p all the same)
        _q=""
        read -r _q _ 2>/dev/null </proc/$_p/task/$_p/children
        [ -n "$_q" ] || return 1
        _p=$_q
    done
    return 1
}

# watch_vmm PID LABEL: run in the background, returns when PID has exited. Every second:
# with PIN=1 pins each thread of the VMM (PID or below it) that is not pinned yet (vCPU →
# CPU 0, any other → CPU 1; re-checked every time, as threads come and go: lguest starts a
# device's worker from the vCPU thread, which would inherit CPU 0, and QEMU's aio workers
# come and go) and the VMM's vhost kernel thread (→ CPU 1); then notes on which CPU each
# thread was (field 39 of its stat) and its CPU time. At the end prints one line:
#   PLACEMENT LABEL COMM[TID]: cpu0 N/cpu1 M samples, T s of CPU ...
# (the evidence for the placement: the console shows where every thread ran).
watch_vmm() {
    _w=$1 _label=$2 _vmm="" _vhost="" _pinned="" _log=/tmp/placement.$1
    : >"$_log"
    while kill -0 "$_w" 2>/dev/null; do
        # (Found again once gone: virtme-ng's python runs short QEMUs, probes, before its VM's.)
        [ -n "$_vmm" ] && [ -d /proc/$_vmm ] || _vmm=$(vmm_pid "$_w") || _vmm=""
        if [ -n "$_vmm" ]; then
            if [ -z "$_vhost" ]; then
                for _f in /proc/[0-9]*/comm; do
                    read -r _c 2>/dev/null <"$_f" && [ "$_c" = "vhost-$_vmm" ] && { _vhost=${_f%/comm}; _vhost=${_vhost#/proc/}; break; }
                done
            fi
            for _t in /proc/$_vmm/task/* ${_vhost:+/proc/$_vhost}; do
                read -r _c 2>/dev/null <"$_t/comm" || continue
                _tid=${_t##*/}
                if [ "${PIN:-0}" = 1 ]; then
                    _cpu=1
                    is_vcpu "$_c" && _cpu=0
                    case " $_pinned " in
                        *" $_tid:$_cpu "*) ;;
                        *) taskset -p -c $_cpu "$_tid" >/dev/null 2>&1 && _pinned="$_pinned $_tid:$_cpu" ;;
                    esac
                fi
                read -r _s 2>/dev/null <"$_t/stat" || continue
                # After "(comm) " come fields 3...: 14 utime and 15 stime are ${12} ${13}, 39 processor ${37}.
                set -- ${_s##*") "}
                echo "$_tid ${37} $((${12} + ${13})) $_c" >>"$_log"
            done
        fi
        sleep 1
    done
    awk -v label="$_label" '
        { tid = $1; cpu = $2; t = $3; $1 = $2 = $3 = ""; sub(/^ +/, ""); k = $0 "[" tid "]"
          if (!(k in first)) { first[k] = t; order[++n] = k }
          last[k] = t; on[k, cpu]++ }
        END { line = "PLACEMENT " label
              for (i = 1; i <= n; i++) { k = order[i]
                  line = line sprintf(" | %s: cpu0 %d/cpu1 %d samples, %.1f s of CPU", k, on[k, 0], on[k, 1], (last[k] - first[k]) / 100) }
              print line }' "$_log"
    rm -f "$_log"
}

# alternate ONCE VMM...: RUNS rounds of `ONCE VMM` for each VMM in turn (the VMMs' samples
# interleaved in time, so a slow spell of the lab hits both), each retried once when it fails
# (its guest died); a VMM on $skip (no such device) is not run again.
alternate() {
    _once=$1
    shift
    for _run in $(seq 1 "$RUNS"); do
        for vmm in "$@"; do
            case " $skip " in *" $vmm "*) continue ;; esac
            $_once $vmm || $_once $vmm || true
        done
    done
}

# printable: stdin on one line, without control characters (a guest console's tail, for a note).
printable() { tr '\r\n\t' '   ' | tr -cd ' -~'; }

# drain: the last thing a scenario does. Gives the lab's serial console time to send what is
# still buffered: the end of the scenario hangs the console up, and output not sent yet is lost.
drain() { sleep 2; }

# kib_to_mib KIB: MiB with one decimal.
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# io_boot ROW VMM SECS NODEV: the disk and network rows' boot. Runs $CMD (from vmm_cmd) for
# at most SECS seconds (the deadline is for the lab's occasional hung guest, which must not
# eat the session) with watch_vmm beside it, its console in /tmp/ROW.out, and turns the
# guest's results into BENCH lines. Fails (for a retry) only when the guest died before any
# result; a guest whose BENCH-ERROR says NODEV has no such device: VMM goes on $skip.
# With HOST_SIDE set, `$HOST_SIDE CONSOLE PID` runs beside the VMM too: the host's part of
# the tests (ended with the VMM if it is still going).
io_boot() {
    _io_out=/tmp/$1.out
    eval "timeout $3 $CMD" </dev/null >"$_io_out" 2>&1 &
    _io_pid=$!
    watch_vmm $_io_pid "$1 $2" &
    _io_watcher=$!
    _io_host=""
    if [ -n "${HOST_SIDE:-}" ]; then
        $HOST_SIDE "$_io_out" $_io_pid &
        _io_host=$!
    fi
    wait $_io_pid
    _io_status=$?
    wait $_io_watcher   # it ends within a second of the VMM
    [ -z "$_io_host" ] || stop_pid $_io_host
    if results "$1" "$2" "$_io_out"; then
        # Some numbers, not all: the guest died after them (they count; say so).
        guest_said "$_io_out" BENCH-DONE ||
            note "$1" "$2: the guest stopped before its last test (status $_io_status): $(tail -c 300 "$_io_out" | printable)"
        return 0
    fi
    if guest_said "$_io_out" BENCH-ERROR; then
        grep -q "BENCH-ERROR $4" "$_io_out" && skip="$skip $2"
        return 0
    fi
    note "$1" "$2 run failed (status $_io_status): $(tail -c 300 "$_io_out" | printable)"
    return 1
}

# The vsock and usernet rows (bench/guest/init's stream_rounds): the host's ends of a boot.
# A receiver on port 5000 (the guest's stream, timed and checked here) and an echo on 5002,
# ROUNDS connections each, started by host_listeners LISTEN (vsock-io's listen mode and its
# argument's start: "listen " for AF_VSOCK, "uds-listen /tmp/v.sock_" for lguest's hybrid
# vsock, "tcp-listen " for TCP); host_sends sends to the guest's 5001 when it asks.

# host_listeners LISTEN: starts both; their output in /tmp/host-5000.out and /tmp/host-5002.out.
host_listeners() {
    vsock-io ${1}5000 --count "$ROUNDS" >/tmp/host-5000.out 2>&1 &
    rx_pid=$!
    vsock-io ${1}5002 --count "$ROUNDS" --echo >/tmp/host-5002.out 2>&1 &
    echo_pid=$!
}

# host_results ROW VMM METRIC: after a boot, the receiver's connections as METRIC (MiB/s) or,
# for a failed or corrupted one, a note; then both listeners end.
host_results() {
    stop_pid $rx_pid
    stop_pid $echo_pid
    grep '^VSOCK-IO ' /tmp/host-5000.out | grep -v '^VSOCK-IO listening' | while IFS= read -r _line; do
        if _rate=$(vsock-io rate "$_line" 2>&1); then
            emit "$1" "$2" "$3" "$_rate" MiB/s
        else
            note "$1" "$2: $3: $_rate"
        fi
    done
}

# host_sends CONSOLE PID ROW TO...: each time the guest's console says `BENCH-SERVING K OPTS`
# (K counting from 1), sends with `vsock-io TO... OPTS` (TO: the mode and the address that
# reach the guest's port 5001; OPTS: --send-secs or --send; the guest times and checks what
# arrives); a send that fails is a note. Ends when the VMM (PID) does.
host_sends() {
    _hs_out=$1 _hs_pid=$2 _hs_row=$3
    shift 3
    _k=1
    while wait_said "$_hs_out" "BENCH-SERVING $_k " $((SECS * 3 + 200)) "$_hs_pid"; do
        _opts=$(tr -d '\r' <"$_hs_out" | sed -n "s/^BENCH-SERVING $_k //p" | head -n 1)
        timeout $((SECS + 30)) vsock-io "$@" $_opts >/tmp/host-send.out 2>&1 ||
            note "$_hs_row" "$vmm: host → guest, stream $_k ($_opts): the sender failed (status $?; 124: still sending $((SECS + 30)) s on) $(printable </tmp/host-send.out)"
        _k=$((_k + 1))
    done
}

# The network rows' lab side (net.sh, bench/profile/net-lab.sh).
# tap_when_made: the VMM makes tap0 (multi-queue); the lab's end gets its address once it exists.
tap_when_made() {
    _i=0
    until ip link show $TAP >/dev/null 2>&1 || [ $_i -ge 600 ]; do sleep 0.1; _i=$((_i + 1)); done
    ip addr add $HOST_IP/24 dev $TAP
    ip link set $TAP up
}

# Fresh servers for every boot: a guest that dies in the middle of a test leaves iperf3's
# server busy with it ("the server is busy running a test") for every boot after.
start_servers() {
    iperf3 -s >>/tmp/iperf3-server.log 2>&1 &
    iperf_pid=$!
    tcp-rr server 5202 &
    rr_pid=$!
}
stop_servers() {
    stop_pid $iperf_pid
    stop_pid $rr_pid
}
