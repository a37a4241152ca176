#!/usr/bin/env bash
# bench/run.sh: every headline benchmark of lguest, side by side with QEMU, in one command.
# Prints one Markdown table and writes the same numbers as JSON (see bench/README.md):
#   OUT/latest.md    the table           OUT/latest.json  the numbers, every sample
#   OUT/latest.raw   the raw BENCH lines OUT/logs/        each lab session's console
# How: builds lguest, stopwatch and bench/tools (static), the benchmark guest's initramfs
# images (bench/overlay.sh), then runs each row, lguest and its peer in the same session:
#   boot     rows 1-2  boot time at 1 and 2 vCPUs; lguest's start → first KVM_RUN   (lab)
#   memory   row 3     VMM RSS and overhead: 256 MiB, 2 GiB, 256 MiB + 4 devices    (lab)
#   disk     row 4     fio in the guest on a virtio disk                              (lab)
#   net      row 5     iperf3 and tcp-rr over virtio-net on a tap; QEMU vhost off/on  (lab)
#   exits    row 6     ns per exit, lguest against a bare KVM_RUN loop (this host, then lab)
#   density  row 7     8 VMs of 96 MiB at once: time to all at /init, total RSS      (lab)
#   vsock    row 8     vsock streams both ways, 1-byte round trips; QEMU vhost-vsock  (lab)
#   usernet  row 9     TCP on a user-mode network: lguest's passt against QEMU's slirp (lab)
#   snapshot row 10    save a guest and restore it to its first answer, 256 MiB and 2 GiB;
#                      QEMU: migrate to a file, -incoming                             (lab)
#   fs       row 11    a shared directory: untar, find, read, rm -rf of 5 000 files;
#                      lguest's virtio-fs against QEMU's 9p and virtme-ng's virtiofsd (lab)
#   exec     row 12    `lguest exec -- true` against virtme-ng's `vng --run KERNEL -- true`
#                      (QEMU + virtiofsd; bench/vng/build.sh brings them into the lab) (lab)
# Lab rows run one lab session each (lab/run.sh), one after the other. Installs what it
# needs with apt (python3, fio, iperf3, QEMU, passt, ...). On 2 cores rows 1-7 take 11-20 min
# (more when the lab machine dies and a session is run again), rows 8-9 ~15 min more.
# The whole script is one { ... } block: bash reads it all before running any of it, so
# editing this file during a (long) run can't change what that run does.
{
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
source "$repo/lab/lib.sh"

usage() {
    cat <<'EOF'
usage: bench/run.sh [--rows LIST] [--runs N] [--quick] [--out DIR] [--bin-dir DIR]
  --rows LIST   comma-separated, from: boot memory disk net exits exits-host density vsock
                usernet snapshot fs exec (default: all; exits-host is row 6 on this host only, no lab)
  --runs N      runs per VMM and configuration (default 3; disk, net, vsock, usernet: 2 boots of 2 rounds; fs: 2 boots;
                memory and density: 1)
  --quick       one run each, 2 s per disk/network/vsock test, fewer exits: checks the harness
  --out DIR     where the results go (default bench/results)
  --bin-dir DIR take lguest, stopwatch, exit-cost, tcp-rr and vsock-io from DIR instead of building
                them (a missing lguest leaves its column empty)
Environment: LGUEST_CACHE, LAB_OUT as for lab/run.sh; BENCH_PIN=0|1: the disk and network rows'
thread placement (default 0: left to the lab's scheduler; see bench/README.md).
BENCH_DISK_VARS='CPUS=2 VMMS="lguest lguest-mq qemu-uring"': only part of the disk row (developing).
BENCH_FS_VMMS='lguest vng': only some of row 11's VMMs (default "lguest qemu vng"; QEMU's 9p takes > 900 s).
EOF
    exit 2
}

rows=boot,memory,disk,net,exits,density,vsock,usernet,snapshot,fs,exec runs='' quick=0 out=$here/results bin_dir=''
while (($#)); do
    case $1 in
        --rows) rows=${2:?--rows needs a LIST}; shift ;;
        --runs) runs=${2:?--runs needs N}; shift ;;
        --quick) quick=1 ;;
        --out) out=${2:?--out needs a DIR}; shift ;;
        --bin-dir) bin_dir=${2:?--bin-dir needs a DIR}; shift ;;
        -h | --help) usage ;;
        *) echo "bench: unknown argument $1" >&2; usage ;;
    esac
    shift
done
for row in ${rows//,/ }; do
    case $row in boot | memory | disk | net | exits | exits-host | density | vsock | usernet | snapshot | fs | exec) ;;
        *) die "unknown row '$row' (want boot, memory, disk, net, exits, exits-host, density, vsock, usernet, snapshot, fs, exec)" ;; esac
done
[[ -z $runs || $runs =~ ^[1-9][0-9]*$ ]] || die "--runs wants a positive number, not '$runs'"
want() { [[ ,$rows, == *,$1,* ]]; }
lab_rows=0
for row in boot memory disk net exits density vsock usernet snapshot fs exec; do want $row && lab_rows=1; done

# The numbers of a run. --quick: enough to see every row work, not to compare.
if ((quick)); then
    runs=${runs:-1} secs=2 rounds=1 host_exits=2000 lab_exits=2000
else
    runs=${runs:-3} secs=5 rounds=2 host_exits=20000 lab_exits=20000
fi
# The I/O rows' thread placement (bench/scenarios/lib.sh): BENCH_PIN=1 pins the VMM's vCPU
# thread to lab CPU 0 and the rest to CPU 1. Off by default: pinned, the disk row's QEMU aio
# workers locked the lab kernel up in 3 of 4 sessions, and the network row went wrong in 3
# full runs in a row (a guest's triple fault, a lab kernel death, a frozen lab machine).
pin_net=${BENCH_PIN:-0} pin_disk=${BENCH_PIN:-0}
# Fewer runs where that is plenty, so the whole run stays under 20 minutes on 2 cores: RSS
# hardly moves from run to run (±1 %); one density run is K boots' work (and a failed one is
# run again); a disk or network boot does every test `rounds` times (samples of the same
# boot, taken in turn), so 2 boots per VMM give 4 samples of each number.
memory_runs=1 density_runs=1 io_runs=$((runs < 2 ? runs : 2))
# The disk row boots each VMM at 1 and at 2 vCPUs, each boot running 8 tests (4 with 1 fio
# job, 4 with 4) `rounds` times: one boot per VMM and vCPU count gives `rounds` samples.
disk_runs=1
# Debian's cloud kernel panics at boot in 64 MiB ("System is deadlocked on memory", under
# both VMMs); 80 MiB boots; 96 MiB leaves it some room.
density_vms=8 density_mib=96

ensure_cmds python3:python3 timeout:coreutils
# The usernet row's lguest side (its peer, QEMU's slirp, comes with QEMU).
# passt: trixie's, built from Debian's source (lab/passt.sh says why not Debian 12's).
if want usernet; then passt_dir=$("$repo/lab/passt.sh"); fi
# The snapshot row's API calls to lguest.
if want snapshot; then ensure_cmds curl:curl; fi
start=$SECONDS
# A lab session whose machine died is run again only if another try as long as the failed
# one would still end within this many seconds of the run's start: 18 minutes, so that a
# run with a lab death or two still ends within 20.
retry_budget=${BENCH_RETRY_BUDGET:-1080}
note "building"
if [[ -n $bin_dir ]]; then
    lguest=$bin_dir/lguest stopwatch=$bin_dir/stopwatch exit_cost=$bin_dir/exit-cost tcp_rr=$bin_dir/tcp-rr
    vsock_io=$bin_dir/vsock-io
else
    (cd "$repo" && cargo build --release --locked --quiet -p lguest -p stopwatch)
    # Static, so the same binaries run on this host, in the lab and inside the guest.
    (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --quiet \
        -p bench-tools --target x86_64-unknown-linux-gnu)
    lguest=$repo/target/release/lguest stopwatch=$repo/target/release/stopwatch
    exit_cost=$repo/target/x86_64-unknown-linux-gnu/release/exit-cost
    tcp_rr=$repo/target/x86_64-unknown-linux-gnu/release/tcp-rr
    vsock_io=$repo/target/x86_64-unknown-linux-gnu/release/vsock-io
fi
[[ -x $exit_cost ]] || die "no exit-cost at $exit_cost"
if ((lab_rows)); then
    for b in "$lguest" "$stopwatch" "$tcp_rr" "$vsock_io"; do [[ -x $b ]] || die "no $b (build it, or drop --bin-dir)"; done
    note "preparing the lab and the benchmark guest"
    "$repo/lab/fetch.sh" >/dev/null
    "$here/overlay.sh" "$here/out" "$tcp_rr" "$vsock_io"
fi

mkdir -p "$out/logs"
raw=$out/latest.raw
cat >"$raw" <<EOF
BENCH-PARAM date=$(date -u +%Y-%m-%dT%H:%MZ) commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo none) host_cpus=$(nproc)
BENCH-PARAM rows=$rows runs=$runs memory_runs=$memory_runs density_runs=$density_runs io_runs=$io_runs disk_runs=$disk_runs io_rounds=$rounds secs_per_io_test=$secs pinned_disk=$pin_disk pinned_net=$pin_net density_vms=$density_vms density_mib=$density_mib host_exits=$host_exits lab_exits=$lab_exits
EOF
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# bench_lines LOG: the BENCH lines of a lab session's output, up to the copy of the whole
# console that lab/run.sh adds when the lab machine did not finish (it has them again).
bench_lines() {
    awk '/^---- the lab machine.s whole console/ { exit } /^BENCH/' "$1"
}

# lab_session NAME SCENARIO VARS LIMIT [lab/run.sh args...]: runs bench/scenarios/SCENARIO
# in the lab with VARS set, for at most LIMIT seconds (a lab machine wedged by its nested
# virtualization must not eat the whole run: the limits are ~2-3 times a normal session);
# appends its BENCH lines to the raw file. A lab machine that died or hung (lab/run.sh's
# 125) gets one more try; any other failure is a note.
lab_session() {
    local name=$1 scenario=$2 vars=$3 limit=$4 log=$out/logs/$1.log t=$SECONDS status=0 try attempt
    shift 4
    { echo "$vars"; cat "$here/scenarios/$scenario"; } >"$work/$name.sh"
    for try in 1 2; do
        note "$name: lab session (console: $log)"
        status=0 wedged=0 attempt=$SECONDS
        timeout -k 10 $((limit + 60)) "$repo/lab/run.sh" --with-qemu --timeout "$limit" \
            --bin "$lguest" --bin "$stopwatch" --file "$here/scenarios/lib.sh:/bench/lib.sh" \
            "$@" "$work/$name.sh" >"$log" 2>&1 &
        local lab=$!
        # A lab kernel that reports a soft lockup a second time (stuck for 50 s and more) is
        # wedged for good (seen in the disk row: a QEMU aio worker stuck, reported every 26 s
        # until the session's limit, minutes later): end it now and count it as a lab death.
        # timeout(1) leads its own process group: killing the group takes the lab with it.
        while kill -0 $lab 2>/dev/null; do
            if grep -aqs 'soft lockup - CPU#[0-9]* stuck for [5-9][0-9]s' "$log"; then
                wedged=1
                kill -- -$lab 2>/dev/null || true
                break
            fi
            sleep 5
        done
        wait $lab || status=$?
        if ((wedged)); then
            status=125
            echo "BENCH-NOTE row=$name the lab machine's kernel locked up: $(grep -a -m1 'soft lockup' "$log")" >>"$raw"
        fi
        ((status == 125 && try == 1)) || break
        if ((SECONDS - start + SECONDS - attempt > retry_budget)); then
            # Another try could take the whole run past 20 minutes: the row stays short.
            echo "BENCH-NOTE row=$name the lab machine died; not run again (the run has used $((SECONDS - start)) s)" >>"$raw"
            break
        fi
        note "$name: the lab machine died; once more"
        echo "BENCH-NOTE row=$name the lab machine died (console: lab/out/logs/); its session was run once more" >>"$raw"
        bench_lines "$log" | grep -v '^BENCH ' >>"$raw" || true   # its notes, not its numbers
    done
    bench_lines "$log" >>"$raw" || true
    if ((status != 0)); then
        echo "BENCH-NOTE row=$name the lab session failed with status $status (console: $log)" >>"$raw"
    fi
    note "$name: $((SECONDS - t)) s"
}

if want exits || want exits-host; then
    note "exits-host: on this host's /dev/kvm"
    lguest_arg=()
    [[ -x $lguest ]] && lguest_arg=(--lguest "$lguest")
    [[ -x $lguest ]] || echo "BENCH-NOTE row=exits-host no lguest at $lguest: bare loop only" >>"$raw"
    timeout 600 "$exit_cost" --row exits-host --exits "$host_exits" --runs "$runs" "${lguest_arg[@]}" \
        >>"$raw" 2>"$work/exit-cost.err" ||
        echo "BENCH-NOTE row=exits-host exit-cost failed: $(tr '\n' ' ' <"$work/exit-cost.err")" >>"$raw"
fi
if want boot; then
    lab_session boot boot.sh "RUNS=$runs" $((runs * 150))
fi
if want memory; then
    lab_session memory memory.sh "RUNS=$memory_runs" $((memory_runs * 150)) --file "$here/out/initrd-idle.img:/bench/initrd-idle.img"
fi
if want disk; then
    lab_session disk disk.sh "RUNS=$disk_runs SECS=$secs ROUNDS=$rounds PIN=$pin_disk ${BENCH_DISK_VARS:-}" $((disk_runs * (3 + 4) * (40 + rounds * 8 * (secs + 4)) + 120)) --file "$here/out/initrd-disk.img:/bench/initrd-disk.img"
fi
if want net; then
    # Four VMMs at 1 vCPU, then again at 2 vCPUs: 8 boots a run.
    lab_session net net.sh "RUNS=$io_runs SECS=$secs ROUNDS=$rounds PIN=$pin_net" $((io_runs * 8 * (30 + rounds * 3 * (secs + 4)) + 180)) --file "$here/out/initrd-net.img:/bench/initrd-net.img" \
        --file "$here/out/lab-mods:/bench/lab-mods" --bin "$tcp_rr" --bin "$(command -v iperf3)"
fi
if want vsock; then
    lab_session vsock vsock.sh "RUNS=$io_runs SECS=$secs ROUNDS=$rounds" $((io_runs * 2 * (40 + rounds * 3 * (secs + 6)) + 120)) \
        --file "$here/out/initrd-vsock.img:/bench/initrd-vsock.img" --file "$here/out/lab-mods:/bench/lab-mods" --bin "$vsock_io"
fi
if want usernet; then
    # A host → guest stream that stalls (passt, bench/README.md) costs secs + 30 s.
    lab_session usernet usernet.sh "RUNS=$io_runs SECS=$secs ROUNDS=$rounds USERNET_VMMS='${USERNET_VMMS:-lguest qemu qemu-passt}'" $((io_runs * 3 * (40 + rounds * (4 * secs + 90)) + 120)) \
        --file "$here/out/initrd-usernet.img:/bench/initrd-usernet.img" --bin "$vsock_io" --bin "$passt_dir/passt" --bin "$passt_dir/passt.avx2"
fi
if want fs; then
    # Its own guest: Debian's generic kernel (the cloud kernel has no 9p) and bench/fs/init;
    # virtme-ng (BENCH_FS_VMMS: which VMMs, default all three) boots the same kernel over the
    # lab's / with vng and what it runs at /usr (as row 12), the tree's tar and phases in /bench.
    fs_vmms=${BENCH_FS_VMMS:-lguest qemu vng}
    read -r fs_entries fs_md5 < <("$here/fs/build.sh" "$here/out")
    fs_vng=()
    if [[ " $fs_vmms " == *" vng "* ]]; then
        fs_vng=(--file "$("$here/vng/build.sh" "$here/out")/usr:/usr" --file "$here/out/k-generic:/bench/k-generic"
            --file "$here/out/tree.tar:/bench/tree.tar" --file "$here/fs/phases.sh:/bench/fs-phases.sh"
            --file "$here/fs/vng-guest.sh:/bench/fs-vng-guest.sh")
    fi
    lab_session fs fs.sh "RUNS=$io_runs ENTRIES=$fs_entries MD5=$fs_md5 FS_VMMS='$fs_vmms'" \
        $((io_runs * $(wc -w <<<"$fs_vmms") * 900 + 120)) \
        --file "$here/out/initrd-fs.img:/bench/initrd-fs.img" --file "$here/out/bzImage-generic:/bench/bzImage-generic" \
        "${fs_vng[@]}"
fi
if want exec; then
    # virtme-ng, python, virtiofsd, kmod and file at the lab's /usr; the kernel and modules at /k.
    # A vng run took 54-83 s in a loaded lab, lguest's 11-14 s.
    vng_dir=$("$here/vng/build.sh" "$here/out")
    lab_session exec exec.sh "RUNS=$runs" $((runs * 2 * 150 + 120)) \
        --file "$vng_dir/usr:/usr" --file "$vng_dir/k:/k"
fi
if want snapshot; then
    # Per run and VMM: two boots (256 MiB, 2 GiB), each saved and restored.
    lab_session snapshot snapshot.sh "RUNS=$runs" $((runs * 2 * 2 * 90 + 120)) --bin "$(command -v curl)"
fi
if want exits; then
    lab_session exits-lab exits.sh "RUNS=$runs EXITS=$lab_exits" $((runs * 40 + 60)) --bin "$exit_cost"
fi
if want density; then
    # One lab session per VMM: the lab machine's own kernel now and then dies under 8 nested
    # guests (seen in QEMU's part: "stack guard page was hit"); that costs only this VMM's
    # part, which lab_session runs again. QEMU's boots take ~4 times lguest's.
    lab_session density-lguest density.sh "RUNS=$density_runs K=$density_vms MEM=$density_mib VMMS=lguest" $((density_runs * 250))
    lab_session density-qemu density.sh "RUNS=$density_runs K=$density_vms MEM=$density_mib VMMS=qemu" $((density_runs * 500))
fi

echo "BENCH-PARAM total_s=$((SECONDS - start))" >>"$raw"
python3 "$here/summarize.py" "$raw" "$out/latest.md" "$out/latest.json"
cat "$out/latest.md"
note "results: $out/latest.md, $out/latest.json (raw lines: $raw); $((SECONDS - start)) s"
exit
}
