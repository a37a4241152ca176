#!/usr/bin/env bash
# Boot time, lguest against QEMU microvm, in one lab session: process start → the guest's
# /init, and → exit after the guest reboots; plus each VMM's peak RSS. Prints a Markdown table
# with median, min and max of RUNS runs each and the ratio lguest/QEMU of the medians.
# Usage: bench/boot.sh [RUNS (default 5)] [CPUS (default 1)] [KERNEL: vmlinux (PVH, default) | bzImage]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5} cpus=${2:-1} kernel=${3:-vmlinux}
cargo build --release --locked --quiet -p lguest -p stopwatch
scenario=$(mktemp)
trap 'rm -f "$scenario"' EXIT
{ echo "RUNS=$runs CPUS=$cpus KERNEL=$kernel"; cat bench/scenarios/boot.sh; } >"$scenario"
lab/run.sh --with-qemu --timeout 3000 --bin target/release/lguest --bin target/release/stopwatch "$scenario" |
    grep '^STOPWATCH' | python3 bench/summarize.py "boot, $kernel, $cpus vCPU, 256 MiB, $runs runs"
