//! Fuzzes virtio-rng's request handling: the fuzzer is a malicious guest that lays out the
//! descriptor table, the available ring and the buffers however it likes, and the device serves
//! the queue once, as its worker does on a kick. A guest could otherwise crash or hang the VMM
//! with a looping chain, a buffer running off the end of memory or into a hole, an indirect
//! table inside an indirect table, or an available index running ahead of the ring. Every such
//! queue must end in used entries or NEEDS_RESET; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lguest::virtio::rng::{Rng, REQUESTS};
use lguest::virtio::{feature, ActiveQueue, Activation, Signals};
use lguest_fuzz::{by_hand, memory, Guest};
use vmm_sys_util::eventfd::EventFd;

fuzz_target!(|guest: Guest| {
    let mem = memory();
    let Some(queue) = guest.install(&mem, 256) else { return };
    let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let features = feature::VERSION_1 | if guest.event_idx { feature::RING_EVENT_IDX } else { 0 };
    let activation = Activation { mem, queues: vec![Some(ActiveQueue { queue, kick })], features, signals: Signals::standalone(1) };
    let mut worker = by_hand(&Rng::new(), activation);
    // An Err is the device declaring itself broken (NEEDS_RESET): allowed. A panic is not.
    let _ = worker.handle(REQUESTS as u64);
});
