//! Fuzzes virtio-net's two queues: the fuzzer is a malicious guest that forges transmit chains
//! (header and frame cut anywhere, writable parts, frames over 64 KiB, buffers outside memory,
//! loops) and receive buffers (too small, read-only, indirect), while the host's side of the
//! tap (a socket pair standing in for it) sends frames of any size in between. A guest could
//! otherwise crash the VMM, hang its worker, or get a frame written past the buffers it posted.
//! With a control queue, the card has two queue pairs and the fuzzer forges its commands too
//! (any class, command and length; no answer byte, data after it): each fails alone.
//! Every chain is used, dropped and counted, or the device reports NEEDS_RESET.
#![no_main]

use std::fs::File;
use std::io::{Read, Write};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lguest::virtio::net::tap::Tap;
use lguest::virtio::net::{Net, CTRL_KICK, RX_KICK, TAP, TX_KICK};
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
    ControlKick,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// The driver's accepted feature bits, low word (VERSION_1 is added).
    features: u32,
    receive: Guest,
    transmit: Guest,
    /// A two-pair card's control queue (the second pair's rings alias the first's).
    control: Option<Guest>,
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
    let features = u64::from(input.features) | lguest::virtio::feature::VERSION_1;
    let mac = Some([0x52, 0x54, 0, 0, 0, 1]);
    let mut queues = vec![Some(active(rx)), Some(active(tx))];
    let net = match &input.control {
        Some(control) => {
            // Queues 2 and 3 are the second pair's when the driver took MQ; the control queue follows.
            if features & 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MQ != 0 {
                let (Some(rx1), Some(tx1)) = (input.receive.install(&mem, 256), input.transmit.install(&mem, 256)) else { return };
                queues.extend([Some(active(rx1)), Some(active(tx1))]);
            }
            let Some(control) = control.install(&mem, 256) else { return };
            queues.push(Some(active(control)));
            let (second, _second_host) = Tap::socket_pair().expect("socket pair");
            Net::with_taps(tap, vec![second], mac)
        }
        None => Net::with_tap(tap, mac),
    };
    let signals = Signals::standalone(queues.len());
    let activation = Activation { mem, queues, features, signals };
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
            Op::ControlKick => worker.handle(CTRL_KICK),
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
