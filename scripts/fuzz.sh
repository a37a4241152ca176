#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo fuzz, libFuzzer with AddressSanitizer) of everything lguest
# parses from a guest or a user: virtio queues and requests, the virtio PCI transport, PCI
# configuration space, MSI-X, the UART, kernel images and the command line. The targets and
# what each one fuzzes are in fuzz/fuzz_targets/ (one story at the top of each file).
#
#   scripts/fuzz.sh --ci                    every target, ${LGUEST_FUZZ_SECONDS:-25} s each (CI)
#   scripts/fuzz.sh [--seconds N] [TARGET]  longer runs of one target or all (default 300 s)
#
# Targets run one at a time on one core. The corpus grows in fuzz/corpus/TARGET (not in git;
# fuzz/seeds/TARGET holds the hand-made starting points). A crash stops that target, leaves its
# input in fuzz/artifacts/TARGET/, and fails the script: reproduce it with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...`, fix the bug, and
# keep the input as a regression test in tests/proptest_*.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=300
targets=()
while (($#)); do
    case "$1" in
        --ci) seconds="${LGUEST_FUZZ_SECONDS:-25}" ;;
        --seconds) seconds="$2"; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) targets+=("$1") ;;
    esac
    shift
done

# cargo fuzz passes nightly-only flags (-Zsanitizer=address); the stable toolchain ships the
# sanitizer runtimes, and this lets it accept the flags.
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo fuzz list)
fi
echo "fuzz: building ${#targets[@]} targets" >&2
cargo fuzz build

passed=0
failed=()
report=()
for target in "${targets[@]}"; do
    corpus="fuzz/corpus/$target"
    mkdir -p "$corpus" "fuzz/artifacts/$target"
    dirs=("$corpus")
    [[ -d "fuzz/seeds/$target" ]] && dirs+=("fuzz/seeds/$target")
    log="fuzz/artifacts/$target/last-run.log"
    echo "fuzz: $target for ${seconds}s" >&2
    # -timeout: a unit that runs 10 s is a hang (an endless serve loop is a bug like a panic).
    if cargo fuzz run "$target" "${dirs[@]}" -- -max_total_time="$seconds" -timeout=10 \
        -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
        passed=$((passed + 1))
    else
        failed+=("$target")
        tail -n 40 "$log" >&2
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    report+=("$(printf '%-16s %12s runs in %ss' "$target" "${runs:-?}" "$seconds")")
done

printf 'fuzz: %s\n' "${report[@]}"
if ((${#failed[@]})); then
    echo "fuzz: crashed or hung: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
fi
echo "fuzz: $passed passed, ${#failed[@]} failed"
((${#failed[@]} == 0))
