#!/usr/bin/env bash
# scripts/soak.sh [SECONDS]: issue 6's soak test in the lab (not part of the test suite): disk
# and network load on one guest for SECONDS (default 600); prints lguest's RSS, fds and
# threads every 30 s and the guest's count of failed operations. Flat numbers and 0 errors pass.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
cargo build --release --locked --quiet
scenario=$(mktemp)
trap 'rm -f "$scenario"' EXIT
{ echo "SOAK_SECONDS=$seconds"; cat lab/scenarios/soak.sh; } >"$scenario"
lab/run.sh --bin target/release/lguest --timeout $((seconds + 900)) "$scenario" | grep -E '^SOAK'
