//! virtio-net's rate limiters: a frame to send waits in the ring while the transmit budget is
//! spent; received frames are charged once read, and the tap is not read while they leave a
//! debt; the API's change of a limiter reaches the worker at once. (A child of `net::tests`,
//! whose bench it drives.)

use super::*;
use crate::rate_limiter::{BucketConfig, BucketUpdate};

impl Bench {
    fn limited(rx: RateLimit, tx: RateLimit) -> Bench {
        Bench::build(LINUX, |_, _| {}, limits(rx, tx))
    }

    /// Serves what the worker's epoll reports, as its thread would, until `done` (5 s at most).
    fn serve_until(&mut self, done: impl Fn(&Bench) -> bool) {
        let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 8];
        for _ in 0..500 {
            if done(self) {
                return;
            }
            let n = self.epoll.wait(10, &mut events).expect("epoll_wait");
            for event in &events[..n] {
                self.worker.handle(&self.epoll, event.data(), event.event_set()).expect("handled");
            }
        }
        panic!("the worker never got there: {:?}", self.stats());
    }
}

fn ops(size: u64, refill_ms: u64) -> RateLimit {
    RateLimit { bandwidth: None, ops: BucketConfig::new(size, 0, refill_ms).ok() }
}

/// A card whose transmit queue may send `ops` frames every `refill_ms`, with `frames` frames
/// of `len` bytes posted and a transmit kick served.
fn sending(ops_size: u64, refill_ms: u64, frames: u8, len: usize) -> Bench {
    let mut bench = Bench::limited(RateLimit::default(), ops(ops_size, refill_ms));
    for seed in 0..frames {
        bench.tx.post_readable(&[&frame(len, seed)]);
    }
    bench.transmit();
    bench
}

#[test]
fn frames_over_the_transmit_budget_wait_in_the_ring_for_the_timer() {
    // Two frames, then one more every 10 ms.
    let mut bench = sending(2, 20, 5, 100);
    assert_eq!(bench.tx.used().len(), 2, "two frames within the budget, three held back");
    assert_eq!(bench.host_receives().len(), 2);
    bench.transmit();
    assert_eq!(bench.tx.used().len(), 2, "a kick while throttled sends nothing");
    bench.serve_until(|b| b.tx.used().len() == 5);
    assert_eq!(bench.host_receives().len(), 3, "the rest went once the timer fired");
    let metrics = &bench.live.metrics;
    assert_eq!((metrics.tx_packets_count.get(), metrics.tx_bytes_count.get()), (5, 500));
    assert!(metrics.tx_rate_limiter_throttled.get() >= 1 && metrics.tx_rate_limiter_event_count.get() >= 1);
}

#[test]
fn received_frames_are_charged_after_reading_and_the_tap_waits_out_the_debt() {
    // 1000 bytes every 20 ms: a 1500-byte frame leaves 500 owed.
    let bandwidth = RateLimit { bandwidth: BucketConfig::new(1000, 0, 20).ok(), ops: None };
    let mut bench = Bench::limited(bandwidth, RateLimit::default());
    post_linux_rx_buffers(&mut bench.rx, 40);
    for seed in 0..3 {
        bench.host_sends(&frame(1500, seed));
    }
    bench.tap_readable();
    assert_eq!(bench.stats().rx_frames, 1, "one frame read, then the debt stops the reading");
    assert!(!bench.worker.tap_polled, "the tap is not watched while the debt is owed");
    bench.handle(RX_KICK).expect("a kick while in debt");
    assert!(!bench.worker.tap_polled, "nor after a kick");
    bench.serve_until(|b| b.stats().rx_frames == 3);
    bench.serve_until(|b| b.worker.tap_polled); // the last frame's debt paid too
    let metrics = &bench.live.metrics;
    assert_eq!(metrics.rx_bytes_count.get(), 4500);
    assert!(metrics.rx_rate_limiter_throttled.get() >= 2 && metrics.rx_event_rate_limiter_count.get() >= 2);
    assert_eq!(bench.stats().rx_dropped, 0, "nothing lost while waiting");
}

#[test]
fn a_limiter_changed_while_frames_wait_lets_them_go_at_once() {
    let mut bench = sending(1, 86_400_000, 3, 60);
    assert_eq!(bench.tx.used().len(), 1, "one frame a day");
    bench.live.tx.update(BucketUpdate::Keep, BucketUpdate::Remove).expect("update");
    bench.serve_until(|b| b.tx.used().len() == 3);
}
