//! How the worker paces itself: the transmit path looks at the ring again, kicks still off,
//! while the driver keeps sending; the receive path publishes each frame as it lands when the
//! driver has EVENT_IDX, with one interrupt all the same. (A child of `net::tests`.)

use super::*;

const NO_NOTIFY: u16 = virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16;

impl Driver {
    /// The used ring's flags: the device's "don't kick me" without EVENT_IDX.
    fn used_flags(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(self.used)).expect("used flags"))
    }
}

#[test]
fn while_frames_keep_coming_the_worker_looks_again_with_kicks_off() {
    let mut bench = Bench::new(LINUX);
    bench.tx.post_frame(&[&frame(100, 1)]);
    bench.transmit();
    assert_eq!(bench.host_receives().len(), 1);
    assert_eq!(bench.tx.used_flags() & NO_NOTIFY, NO_NOTIFY, "kicks stay off");
    assert_eq!(bench.worker.tx.kick.read().ok(), Some(1), "the worker kicked itself to look again");
    // The driver sends again without kicking, as it may while kicks are off.
    bench.tx.post_frame(&[&frame(100, 2)]);
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
