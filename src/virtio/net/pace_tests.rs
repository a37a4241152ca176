//! How the worker paces itself: the transmit path looks at the ring again, kicks still off,
//! while the driver keeps sending; the receive path publishes each frame as it lands when the
//! driver has EVENT_IDX, with one interrupt a batch all the same, even for a driver that
//! re-arms its interrupt as each frame lands. (A child of `net::tests`.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::thread::{self, JoinHandle};

use super::*;

const NO_NOTIFY: u16 = virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16;

#[test]
fn while_frames_keep_coming_the_worker_looks_again_with_kicks_off() {
    let mut bench = Bench::new(LINUX);
    bench.tx.post_readable(&[&frame(100, 1)]);
    bench.transmit();
    assert_eq!(bench.host_receives().len(), 1);
    assert_eq!(bench.tx.used_flags() & NO_NOTIFY, NO_NOTIFY, "kicks stay off");
    assert_eq!(bench.worker.tx.kick.read().ok(), Some(1), "the worker kicked itself to look again");
    // The driver sends again without kicking, as it may while kicks are off.
    bench.tx.post_readable(&[&frame(100, 2)]);
    bench.transmit();
    assert_eq!(bench.host_receives().len(), 1);
    assert!(bench.worker.tx.kick.read().is_ok(), "it found a frame: once more");
    bench.transmit();
    assert_eq!(bench.tx.used_flags() & NO_NOTIFY, 0, "a look that found nothing turns kicks back on");
    assert!(bench.worker.tx.kick.read().is_err(), "and the worker sleeps until the driver kicks");
    assert_eq!(bench.signals.take_queue_interrupts(TX), 2, "one interrupt per look that sent frames");
}

#[test]
fn with_event_idx_frames_received_together_still_interrupt_once() {
    let mut bench = Bench::with_queues(LINUX, |rx, _| rx.set_event_idx(true));
    post_linux_rx_buffers(&mut bench.rx, 40);
    for seed in 0..3 {
        bench.host_sends(&frame(60, seed));
    }
    bench.tap_readable();
    assert_eq!(bench.rx.used().len(), 3);
    assert_eq!(bench.signals.take_queue_interrupts(RX), 1, "used_event 0: one interrupt for the three");
}

/// A driver that polls while frames land, on a thread of its own: each time the used index
/// moves it takes the frames and re-arms its interrupt at the new index, as Linux's NAPI does
/// when a poll completes. Returns how many times it re-armed.
fn rearm_while_frames_land(rx: &RingDriver, stop: Arc<AtomicBool>) -> JoinHandle<u32> {
    let (mem, used, used_event) = (rx.mem.clone(), rx.used, rx.used_event_at());
    let running = Arc::new(Barrier::new(2));
    let started = Arc::clone(&running);
    let driver = thread::spawn(move || {
        started.wait();
        let (mut seen, mut rearms) = (0u16, 0);
        while !stop.load(Ordering::SeqCst) {
            let idx = u16::from_le(mem.load(GuestAddress(used + 2), Ordering::Acquire).expect("used idx"));
            if idx != seen {
                mem.store(idx.to_le(), GuestAddress(used_event), Ordering::SeqCst).expect("used_event");
                (seen, rearms) = (idx, rearms + 1);
            }
        }
        rearms
    });
    running.wait();
    driver
}

/// One tap wake-up of `BATCH - 4` frames while a driver re-arms as they land: the interrupts
/// the guest got, and how many times the driver re-armed meanwhile.
fn one_wake_up_with_a_rearming_driver() -> (u64, u32) {
    let mut bench = Bench::with_queues(LINUX, |rx, _| rx.set_event_idx(true));
    // Room for 64 KiB more after the last frame: all of them are read in the one wake-up.
    post_linux_rx_buffers(&mut bench.rx, 240);
    let frames = BATCH as u8 - 4;
    for seed in 0..frames {
        bench.host_sends(&frame(1500, seed));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let driver = rearm_while_frames_land(&bench.rx, Arc::clone(&stop));
    bench.tap_readable();
    stop.store(true, Ordering::SeqCst);
    let rearms = driver.join().expect("driver thread");
    assert_eq!(bench.rx.used().len(), usize::from(frames));
    (bench.signals.take_queue_interrupts(RX), rearms)
}

#[test]
fn a_driver_rearming_as_each_frame_lands_is_still_interrupted_once_a_batch() {
    // The driver's thread must run while the frames land for a wake-up to test anything; on a
    // busy host it may not, so wake-ups go on until one had it re-arm several times.
    for _ in 0..50 {
        let (interrupts, rearms) = one_wake_up_with_a_rearming_driver();
        assert_eq!(interrupts, 1, "one interrupt for the wake-up, at its end (the driver re-armed {rearms} times)");
        if rearms > 2 {
            return;
        }
    }
}
