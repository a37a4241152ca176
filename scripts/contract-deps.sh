#!/usr/bin/env bash
# What the API's contract test (tests/api_contract.rs) needs, installed once and cached:
# socat (the TCP-to-Unix-socket bridge), schemathesis from PyPI in a venv of its own under
# ${LGUEST_CACHE:-~/.cache/lguest}/schemathesis, and Firecracker's OpenAPI spec as the fc-api
# crate ships it (spec/firecracker.yaml), fetched by cargo into its registry, never committed.
# Prints the two paths the test reads, as shell assignments.
set -euo pipefail
cd "$(dirname "$0")/.."
source lab/lib.sh

SCHEMATHESIS_VERSION=4.32.5
FC_API_VERSION=0.2.3

ensure_cmds socat:socat curl:curl python3:python3
venv="$LGUEST_CACHE/schemathesis"
if [[ "$("$venv/bin/st" --version 2>/dev/null)" != *"$SCHEMATHESIS_VERSION"* ]]; then
    note "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
    # Debian's python3 makes venvs only with python3-venv installed (it has no command to test).
    python3 -m venv "$venv" 2>/dev/null || { apt-get install -y -q python3-venv >&2; python3 -m venv "$venv"; }
    "$venv/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION" >&2
fi

# A throwaway cargo project that depends on fc-api: `cargo fetch` puts the crate's source,
# spec included, into cargo's registry.
project="$LGUEST_CACHE/fc-api-fetch"
mkdir -p "$project/src"
cat >"$project/Cargo.toml" <<TOML
[package]
name = "fc-api-fetch"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
fc-api = "=$FC_API_VERSION"
[workspace]
TOML
echo 'fn main() {}' >"$project/src/main.rs"
cargo fetch --quiet --manifest-path "$project/Cargo.toml" >&2
spec=$(cargo metadata --format-version 1 --manifest-path "$project/Cargo.toml" |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "fc-api"))')
spec="$(dirname "$spec")/spec/firecracker.yaml"
[[ -f "$spec" ]] || die "fc-api $FC_API_VERSION has no spec/firecracker.yaml"
echo "LGUEST_SCHEMATHESIS=$venv/bin/st"
echo "LGUEST_FC_SPEC=$spec"
