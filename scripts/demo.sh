#!/usr/bin/env bash
# Boots lguest's reference guest (Debian's stock cloud kernel and a busybox initramfs) to a
# shell on this terminal. Ctrl-A x quits; so does `poweroff -f` in the guest.
# Where this host's KVM can't boot stock Linux (no KVM, or PVM), the guest runs inside the
# nested lab instead, a QEMU machine whose emulated CPU has real KVM (slower, but the same).
set -euo pipefail
cd "$(dirname "$0")/.."
source lab/lib.sh

command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) first"
note "building lguest"
cargo build --release --locked --quiet
lab/fetch.sh >/dev/null
guest=$(dirname "$(guest/build.sh | head -n1)")
cmdline="console=ttyS0 reboot=k panic=-1 quiet"
if [[ -w /dev/kvm && ! -e /sys/module/kvm_pvm ]]; then
    exec target/release/lguest run --kernel "$guest/bzImage" --initrd "$guest/initramfs.cpio.gz" --cmdline "$cmdline"
fi
note "this host's KVM can't boot a stock kernel (missing, or PVM): booting it in the nested lab"
exec lab/run.sh --interactive --bin target/release/lguest lab/scenarios/demo.sh
