//! Fuzzes virtio-net's two queues: the fuzzer is a malicious guest that forges transmit chains
//! (header and frame cut anywhere, writable parts, frames over 64 KiB, buffers outside memory,
//! loops) and receive buffers (too small, read-only, indirect), while the host's side of the
//! tap (a socket pair standing in for it) sends frames of any size in between. A guest could
//! otherwise crash the VMM, hang its worker, or get a frame written past the buffers it posted.
//! Every chain is used, dropped and counted, or the device reports NEEDS_RESET.
#![no_main]

use std::fs::File;
use std::io::{Read, Write};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lguest::virtio::net::tap::Tap;
use lguest::virtio::net::{Net, RX_KICK, TAP, TX_KICK};
use lguest::virtio::{ActiveQueue, Activation, Signals};
use lguest_fuzz::{by_hand, memory, Guest};
use vmm_sys_util::eventfd::EventFd;

#[derive(Arbitrary, Debug)]
enum Op {
    TransmitKick,
    ReceiveKick,
    /// The host sends a frame of `len` bytes (header included) into the tap.
    HostSends { len: u16, fill: u8 },
    TapReadable,
    HostDrains,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// The driver's accepted feature bits, low word (VERSION_1 is added).
    features: u32,
    receive: Guest,
    transmit: Guest,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let mem = memory();
    let rx = input.receive.install(&mem, 256);
    let tx = input.transmit.install(&mem, 256);
    let (Some(rx), Some(tx)) = (rx, tx) else { return };
    let active = |queue| ActiveQueue { queue, kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd") };
    let (tap, host) = Tap::socket_pair().expect("socket pair");
    let mut host = File::from(host);
    let net = Net::with_tap(tap, Some([0x52, 0x54, 0, 0, 0, 1]));
    let features = u64::from(input.features) | lguest::virtio::feature::VERSION_1;
    let activation = Activation { mem, queues: vec![Some(active(rx)), Some(active(tx))], features, signals: Signals::standalone(2) };
    let mut worker = by_hand(&net, activation);
    for op in input.ops.iter().take(64) {
        // Errors are the device declaring itself broken (NEEDS_RESET): allowed, and final.
        let served = match *op {
            Op::TransmitKick => worker.handle(TX_KICK),
            Op::ReceiveKick => worker.handle(RX_KICK),
            Op::HostSends { len, fill } => {
                let _ = host.write(&vec![fill; usize::from(len)]);
                worker.handle(TAP)
            }
            Op::TapReadable => worker.handle(TAP),
            Op::HostDrains => {
                let mut frame = vec![0u8; 70_000];
                while host.read(&mut frame).is_ok() {}
                Ok(())
            }
        };
        if served.is_err() {
            break;
        }
    }
});
