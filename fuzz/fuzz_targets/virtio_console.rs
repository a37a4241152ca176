//! Fuzzes the virtio console's two queues: the fuzzer is a malicious guest that forges the
//! transmit chains (what it prints) and the receive buffers (where typed input goes), while
//! the user's input arrives in between. A guest could otherwise crash the VMM with a looping or
//! out-of-memory chain, a read-only receive buffer, a head index past the ring, or make the VMM
//! hold more typed input than its limit. Every buffer is served or the queue reports
//! NEEDS_RESET.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lguest::virtio::console::{Console, INPUT_LIMIT, RECEIVE_KICK, TRANSMIT_KICK};
use lguest::virtio::{feature, ActiveQueue, Activation, Signals};
use lguest_fuzz::{by_hand, memory, Guest};
use vmm_sys_util::eventfd::EventFd;

#[derive(Arbitrary, Debug)]
enum Op {
    Type(Vec<u8>),
    Receive,
    Transmit,
}

#[derive(Arbitrary, Debug)]
struct Input {
    receive: Guest,
    transmit: Guest,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let mem = memory();
    let rx = input.receive.install(&mem, 256);
    let tx = input.transmit.install(&mem, 256);
    let active = |queue| ActiveQueue { queue, kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd") };
    let console = Console::new(Box::new(std::io::sink())).expect("console");
    let typed = console.input();
    let activation = Activation {
        mem,
        queues: vec![rx.map(active), tx.map(active)],
        features: feature::VERSION_1,
        signals: Signals::standalone(2),
    };
    let mut worker = by_hand(&console, activation);
    for op in input.ops.iter().take(64) {
        match op {
            Op::Type(bytes) => {
                let kept = typed.send(bytes);
                assert!(kept <= bytes.len().min(INPUT_LIMIT), "more input kept than sent");
            }
            // Errors are the device declaring itself broken (NEEDS_RESET): allowed.
            Op::Receive => {
                let _ = worker.handle(RECEIVE_KICK);
            }
            Op::Transmit => {
                let _ = worker.handle(TRANSMIT_KICK);
            }
        }
    }
});
