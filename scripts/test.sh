#!/usr/bin/env bash
# Runs every test: unit tests, tiny guests run directly on this host's /dev/kvm, and Debian's
# stock kernel booted by lguest inside the nested lab (lab/README.md). Installs what it needs
# from Debian's packages; downloads are cached in ${LGUEST_CACHE:-~/.cache/lguest}.
set -euo pipefail
cd "$(dirname "$0")/.."
source lab/lib.sh

command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) first"
[[ -e /dev/kvm ]] || die "/dev/kvm not found: the tiny-guest tests need KVM on this host"
# setpriv and unshare (util-linux) drop privileges and hide /dev/kvm for the error tests;
# strip (binutils) slims the binary copied into the lab; passt is --net user's network stack
# (its unit tests run it here, and the lab scenario copies it into the lab machine, with
# dnsmasq as the lab's resolver); make and tcc (a C compiler small enough to copy into the
# lab, with the C library's start files that Rust's own linker setup already installed) build
# a small C project in the lab's `lguest exec` scenario.
ensure_cmds setpriv:util-linux unshare:util-linux strip:binutils passt:passt dnsmasq:dnsmasq-base \
    make:make tcc:tcc
lab/fetch.sh >/dev/null
# The lab's --net user tests run trixie's passt, built from Debian's source (lab/passt.sh says why).
lab/passt.sh >/dev/null
guest/build.sh >/dev/null
# The API's contract test: schemathesis, socat and Firecracker's spec (scripts/contract-deps.sh).
eval "$(scripts/contract-deps.sh | sed 's/^/export /')"
# test-utils: the test doubles tests/proptest_virtio_queues.rs drives the devices with.
cargo test --workspace --locked --features lguest/test-utils "$@"
# Every fuzz target for a bounded time (about 4 minutes in all); skipped when a filter is given.
if (($# == 0)); then scripts/fuzz.sh --ci; fi
# The README's benchmark command on its cheapest lab row, as a fresh clone runs it (into a
# folder of its own, not bench/results): a harness that can't start fails here, not in a
# user's hands. Speed is not judged here, only that both VMMs were measured.
if (($# == 0)); then
    bench_out=$(mktemp -d)
    bench/run.sh --quick --rows boot --out "$bench_out"
    for vmm in lguest qemu; do
        grep -q "^BENCH row=boot-1cpu vmm=$vmm metric=init " "$bench_out/latest.raw" ||
            die "bench/run.sh --quick --rows boot measured no boot of $vmm (see $bench_out/logs)"
    done
    rm -rf "$bench_out"
fi
