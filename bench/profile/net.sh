#!/usr/bin/env bash
# bench/profile/net.sh [--cases LIST] [--vmms LIST] [--secs S] [--freq HZ] [--bin-dir DIR]
#
# Where row 5's (network) time goes, lguest against QEMU vhost=off, in one lab session:
# system-wide perf profiles (perf record -g), KVM's exits by reason, and every thread's CPU
# time and syscalls, each per MiB moved. The lab side is bench/profile/net-lab.sh (it says
# what is measured, and how); bench/README.md ("Profiles") how to read it.
#   --cases LIST  CPUS:TEST pairs, 1-vCPU ones first (default 1:tcp-tx,2:tcp-tx); TEST is
#                 tcp-tx (guest → host) or tcp-rx (host → guest)
#   --vmms LIST   from lguest, qemu (vhost=off), lguest-vhost, qemu-vhost (vhost=on); default
#                 lguest,qemu
#   --secs S      each run's length (default 8)
#   --freq HZ     perf record's sampling rate on each lab CPU (default 499)
# Installs linux-perf (perf goes into the lab with its libraries) and what bench/run.sh's row 5
# needs. Prints the PROFILE lines and writes them with the whole console to bench/out/profile-net/.
# A benchmark: run it in a lab of its own (the project's machines: /work/bin/labslot --bench).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bench=$(dirname "$here")
repo=$(dirname "$bench")
source "$repo/lab/lib.sh"

cases=1:tcp-tx,2:tcp-tx vmms=lguest,qemu secs=8 freq=499 bin_dir=''
while (($#)); do
    case $1 in
        --cases) cases=${2:?--cases needs a LIST}; shift ;;
        --vmms) vmms=${2:?--vmms needs a LIST}; shift ;;
        --secs) secs=${2:?--secs needs S}; shift ;;
        --freq) freq=${2:?--freq needs HZ}; shift ;;
        --bin-dir) bin_dir=${2:?--bin-dir needs DIR}; shift ;;
        *) die "unknown argument '$1' (see the top of bench/profile/net.sh)" ;;
    esac
    shift
done
for case in ${cases//,/ }; do
    [[ $case =~ ^[12]:tcp-(tx|rx)$ ]] || die "--cases: '$case' is not CPUS:TEST (1 or 2 vCPUs; tcp-tx or tcp-rx)"
done
for vmm in ${vmms//,/ }; do
    [[ $vmm =~ ^(lguest|qemu)(-vhost)?$ ]] || die "--vmms: no VMM '$vmm' (lguest, qemu, lguest-vhost, qemu-vhost)"
done
[[ $secs =~ ^[1-9][0-9]*$ && $freq =~ ^[1-9][0-9]*$ ]] || die "--secs and --freq take whole numbers"

ensure_cmds perf:linux-perf iperf3:iperf3
if [[ -n $bin_dir ]]; then
    lguest=$bin_dir/lguest tcp_rr=$bin_dir/tcp-rr vsock_io=$bin_dir/vsock-io
else
    (cd "$repo" && cargo build --release --locked --quiet -p lguest)
    # Static, as bench/run.sh builds them: they run in the lab and inside the guest.
    (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --quiet \
        -p bench-tools --target x86_64-unknown-linux-gnu)
    lguest=$repo/target/release/lguest
    tcp_rr=$repo/target/x86_64-unknown-linux-gnu/release/tcp-rr
    vsock_io=$repo/target/x86_64-unknown-linux-gnu/release/vsock-io
fi
for b in "$lguest" "$tcp_rr" "$vsock_io"; do [[ -x $b ]] || die "no $b (build it, or drop --bin-dir)"; done
"$repo/lab/fetch.sh" >/dev/null
"$bench/overlay.sh" "$bench/out" "$tcp_rr" "$vsock_io"

out=$bench/out/profile-net
mkdir -p "$out"
scenario=$(mktemp)
trap 'rm -f "$scenario"' EXIT
{
    echo "CASES='${cases//,/ }' VMMS='${vmms//,/ }' SECS=$secs FREQ=$freq"
    cat "$here/net-lab.sh"
} >"$scenario"
n_cases=$(wc -w <<<"${cases//,/ }") n_vmms=$(wc -w <<<"${vmms//,/ }")
# A boot: ~20 s, two runs of secs + ~3 s, and perf's reports (a minute or two under TCG).
limit=$((n_cases * n_vmms * (180 + 2 * (secs + 5)) + 120))
note "profiling ${cases} with ${vmms} (at most $limit s; console: $out/console.log)"
status=0
"$repo/lab/run.sh" --with-qemu --timeout "$limit" --bin "$lguest" --bin "$(command -v perf)" \
    --bin "$tcp_rr" --bin "$(command -v iperf3)" --file "$bench/scenarios/lib.sh:/bench/lib.sh" \
    --file "$bench/out/initrd-net.img:/bench/initrd-net.img" --file "$bench/out/lab-mods:/bench/lab-mods" "$scenario" >"$out/console.log" 2>&1 || status=$?
grep -a '^PROFILE' "$out/console.log" | tee "$out/profile.txt" || true
((status == 0)) || die "the lab session failed with status $status (console: $out/console.log)"
