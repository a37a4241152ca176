//! The worker's polling while it holds an interrupt (`coalesce`), against a driver on another
//! thread that behaves as Linux's does with EVENT_IDX: it makes a request available, kicks
//! only if the device's avail_event asks for it, waits for the request's used entry, and then
//! moves its used_event past it (as `virtqueue_enable_cb` does after reaping). However the
//! two threads' timing falls, no request may be lost and no interrupt the driver asked for
//! may be missing.

use std::sync::atomic::{fence, Ordering};

use super::*;

/// Requests the driver submits, one at a time.
const REQUESTS_MADE: u16 = 24;

/// Waits (up to 5 s) as a busy guest does: without sleeping, so that it answers the worker
/// within its quiet wait and the requests come while it polls.
fn spin_until(what: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !what() {
        assert!(std::time::Instant::now() < deadline, "condition never became true");
        std::thread::yield_now();
    }
}

fn a_guest_submitting_while_the_worker_polls_loses_nothing() {
    let file = image();
    let mut block = Block::new(&config(&file, false)).expect("disk");
    let (mut driver, mut queue) = Driver::new();
    queue.set_event_idx(true);
    let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let signals = Signals::standalone(1);
    let mut activation = activation(&driver, queue, kick.try_clone().expect("kick"), &signals);
    activation.features |= feature::RING_EVENT_IDX;
    block.activate(activation).expect("activate");
    let (mut kicks, mut interrupts) = (0, 0);
    for request in 0..REQUESTS_MADE {
        let old = driver.avail_idx();
        let sector = u64::from(request) % SECTORS;
        let addrs = driver.submit(&[Part::Out(header(VIRTIO_BLK_T_IN, sector)), Part::In(512), Part::In(1)]);
        // The driver's side of the handshake: its index is seen before it reads avail_event.
        fence(Ordering::SeqCst);
        if driver.avail_event() == old {
            kick.write(1).expect("kick");
            kicks += 1;
        }
        spin_until(|| driver.used_idx() == request + 1);
        assert_eq!(driver.byte(addrs[2]), S_OK, "request {request}");
        driver.set_used_event(request + 1);
        interrupts += signals.take_queue_interrupts(0);
    }
    // The last request's interrupt is owed: it comes once the worker sees the guest gone quiet.
    let late = std::cell::Cell::new(0);
    wait_until(|| {
        late.set(late.get() + signals.take_queue_interrupts(0));
        interrupts + late.get() > 0 && driver.avail_event() == REQUESTS_MADE
    });
    block.reset();
    let interrupts = interrupts + late.get() + signals.take_queue_interrupts(0);
    assert!((1..=u64::from(REQUESTS_MADE)).contains(&interrupts), "{interrupts} interrupts");
    assert!((1..=REQUESTS_MADE).contains(&kicks), "{kicks} kicks");
    assert!(!signals.is_broken());
}

on_both_engines!(a_guest_submitting_while_the_worker_polls_loses_nothing);
