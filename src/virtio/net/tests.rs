//! virtio-net's tests: the worker driven by hand with a socket pair standing in for the tap,
//! the device activated on its thread, and a real tap in a network namespace of the test's own.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use virtio_bindings::virtio_net::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use crate::memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::tap::{Tap, VNET_HDR_LEN};
use super::*;
use crate::virtio::worker::DeviceWorker;
use crate::virtio::{ActiveQueue, Signals, VirtioDevice};

use crate::virtio::ring_driver::{RingDriver, WRITE};

const MEM_SIZE: usize = 0x100_0000;
/// Everything we offer, as a Linux driver accepts it.
const LINUX: u64 = OFFERED_FEATURES | feature::VERSION_1 | feature::RING_EVENT_IDX;

fn memory() -> GuestMemoryMmap {
    crate::memory::from_ranges(&[(GuestAddress(0), MEM_SIZE)], crate::memory::Tracking::DirtyPages).expect("guest memory")
}

/// A header (no offloads) and an Ethernet frame of `len` bytes with a recognisable body.
/// A card's handle with limiters (which may limit nothing) each way, as `Net::new` makes them.
fn limits(rx: RateLimit, tx: RateLimit) -> NetHandle {
    let (rx, tx) = (SharedLimiter::new(rx).expect("timerfd"), SharedLimiter::new(tx).expect("timerfd"));
    NetHandle { tap: None, rx, tx, metrics: Arc::default() }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut bytes = vec![0u8; VNET_HDR_LEN];
    bytes.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    bytes
}

/// A worker driven by hand, on this thread, with a socket standing in for the tap.
struct Bench {
    rx: RingDriver,
    tx: RingDriver,
    worker: NetWorker,
    epoll: Epoll,
    host: File,
    signals: Signals,
    live: NetHandle,
}

impl Bench {
    fn new(features: u64) -> Bench {
        Bench::with_queues(features, |_, _| {})
    }

    fn with_queues(features: u64, adjust: impl FnOnce(&mut Queue, &mut Queue)) -> Bench {
        Bench::build(features, adjust, limits(RateLimit::default(), RateLimit::default()))
    }

    fn build(features: u64, adjust: impl FnOnce(&mut Queue, &mut Queue), live: NetHandle) -> Bench {
        let mem = memory();
        let (rx, mut rx_queue) = RingDriver::new(&mem, QUEUE_SIZE, 0, 0x10_0000);
        let (tx, mut tx_queue) = RingDriver::new(&mem, QUEUE_SIZE, 0x1_0000, 0x80_0000);
        adjust(&mut rx_queue, &mut tx_queue);
        let (tap, host) = Tap::socket_pair().expect("socketpair");
        let signals = Signals::standalone(2);
        let kick = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut worker = NetWorker::new(
            mem,
            ActiveQueue { queue: rx_queue, kick: kick() },
            ActiveQueue { queue: tx_queue, kick: kick() },
            super::Backend::Tap(Arc::new(tap)),
            signals.clone(),
            features,
            live.clone(),
        );
        let epoll = Epoll::new().expect("epoll");
        worker.register(&epoll).expect("register");
        Bench { rx, tx, worker, epoll, host: File::from(host), signals, live }
    }

    fn handle(&mut self, token: u64) -> std::result::Result<(), NetError> {
        self.worker.handle(&self.epoll, token, EventSet::IN)
    }

    fn transmit(&mut self) {
        self.handle(TX_KICK).expect("transmit");
    }

    fn tap_readable(&mut self) {
        self.handle(TAP).expect("receive");
    }

    fn stats(&self) -> NetStats {
        NetStats::of(&self.live.metrics)
    }

    /// The host sends a frame into the tap.
    fn host_sends(&self, frame: &[u8]) {
        assert_eq!(io::Write::write(&mut &self.host, frame).expect("host send"), frame.len());
    }

    /// Frames the guest sent, as the host's side of the tap sees them.
    fn host_receives(&self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buffer = vec![0u8; 2 * MAX_FRAME_LEN];
        while let Ok(len) = io::Read::read(&mut &self.host, &mut buffer) {
            frames.push(buffer[..len].to_vec());
        }
        frames
    }
}

#[test]
fn offers_offloads_and_mergeable_buffers_and_sets_the_tap_to_match() {
    let offered = OFFERED_FEATURES;
    for f in [VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF] {
        assert_ne!(offered & bit(f), 0, "feature {f}");
    }
    assert_eq!(offered & bit(VIRTIO_NET_F_CTRL_VQ), 0, "no control queue is implemented");
    let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
    assert_eq!(tap_offloads(LINUX), all);
    assert_eq!(tap_offloads(LINUX & !bit(VIRTIO_NET_F_GUEST_CSUM)), 0, "segments need partial checksums");
    assert_eq!(tap_offloads(LINUX & !bit(VIRTIO_NET_F_GUEST_TSO4) & !bit(VIRTIO_NET_F_GUEST_TSO6)), libc::TUN_F_CSUM);
    assert_eq!(tap_offloads(feature::VERSION_1), 0);
}

#[test]
fn config_space_has_the_mac_a_link_that_is_up_and_one_queue_pair() {
    let (tap, _host) = Tap::socket_pair().expect("socketpair");
    let net = Net::with_tap(tap, Some([0x52, 0x54, 0, 1, 2, 3]));
    let mut config = [0xffu8; 12];
    net.read_config(0, &mut config);
    assert_eq!(config, [0x52, 0x54, 0, 1, 2, 3, 1, 0, 1, 0, 0, 0]);
    let mut status = [0u8; 2];
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16);
    let mut past = [0xffu8; 4];
    net.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4], "bytes past the end read as zero");
    assert_eq!((net.device_type(), net.queue_max_sizes()), (device_type::NET, &[256u16, 256][..]));
}

#[test]
fn a_random_mac_is_unicast_locally_administered_and_differs() {
    let (a, b) = (random_mac(), random_mac());
    assert_eq!(a[..3], [0x52, 0x54, 0x00]);
    assert_eq!(a[0] & 1, 0, "unicast");
    assert_eq!(a[0] & 2, 2, "locally administered");
    // Three random bytes: a clash is a one in sixteen million event.
    assert_ne!(a, b);
}

#[test]
fn transmitted_frames_reach_the_tap_whole_and_are_returned() {
    let mut bench = Bench::new(LINUX);
    let first = frame(100, 1);
    let second = frame(300, 2);
    let h1 = bench.tx.post_readable(&[&first[..VNET_HDR_LEN], &first[VNET_HDR_LEN..]]);
    // A header split over two buffers, an empty buffer, and the rest.
    let h2 = bench.tx.post_readable(&[&second[..5], &second[5..40], &[], &second[40..]]);
    bench.transmit();
    assert_eq!(bench.host_receives(), vec![first, second]);
    assert_eq!(bench.tx.used(), vec![(u32::from(h1), 0), (u32::from(h2), 0)]);
    assert_eq!(bench.signals.take_queue_interrupts(TX), 1, "one interrupt for the batch");
    assert_eq!(bench.stats().tx_frames, 2);
}

#[test]
fn malformed_transmit_chains_are_dropped_and_counted_and_the_queue_goes_on() {
    let mut bench = Bench::new(LINUX);
    let good = frame(60, 3);
    let tx = &mut bench.tx;
    let header = tx.buffer(12);
    let body = tx.buffer(100);
    let big = tx.buffer(65551);
    let mut heads = vec![
        tx.post_descriptors(&[(header, 12, 0, None), (body, 100, WRITE, None)]),
        tx.post_descriptors(&[(header, 5, 0, None)]),
        tx.post_descriptors(&[(header, 12, 0, None), (big, 65551, 0, None)]),
        tx.post_descriptors(&[(header, 12, 0, None), (MEM_SIZE as u64 - 8, 100, 0, None)]),
        tx.post_descriptors(&[(u64::MAX - 4, 100, 0, None)]),
    ];
    // A chain whose second descriptor points back at its first.
    let looping = tx.next_head();
    heads.push(tx.post_descriptors(&[(header, 12, 0, None), (body, 100, 0, Some(looping))]));
    heads.push(tx.post_descriptors(&[(header, 12, 0, Some(QUEUE_SIZE + 10))]));
    let bad = heads.len() as u64;
    heads.push(tx.post_readable(&[&good]));
    bench.transmit();
    assert_eq!(bench.host_receives(), vec![good], "only the good frame goes out");
    let used: Vec<_> = heads.iter().map(|&h| (u32::from(h), 0)).collect();
    assert_eq!(bench.tx.used(), used, "every chain is returned");
    assert_eq!((bench.stats().tx_dropped, bench.stats().tx_frames), (bad, 1));
}

#[test]
fn a_full_transmit_queue_is_served_in_batches_without_starving_receive() {
    let mut bench = Bench::new(LINUX);
    let frames: Vec<_> = (0..100).map(|i| frame(60, i)).collect();
    for f in &frames {
        bench.tx.post_readable(&[f]);
    }
    bench.transmit();
    assert_eq!(bench.host_receives().len(), BATCH);
    assert_eq!(bench.worker.tx.kick.read().expect("the worker kicked itself"), 1);
    bench.transmit();
    assert_eq!(bench.host_receives().len(), 100 - BATCH);
    assert_eq!(bench.tx.used().len(), 100);
}

#[test]
fn a_ring_that_claims_more_than_it_holds_breaks_the_device() {
    for (queue, kick, name) in [(TX, TX_KICK, "transmit"), (RX, RX_KICK, "receive")] {
        let mut bench = Bench::new(LINUX);
        let driver = if queue == TX { &bench.tx } else { &bench.rx };
        driver.set_avail_idx(QUEUE_SIZE + 1);
        let err = bench.handle(kick).expect_err("an unusable ring");
        assert!(err.to_string().contains(&format!("{name} queue is unusable")), "{err}");
    }
}

/// Posts enough 2 KiB receive buffers for a 64 KiB segment, as Linux does.
fn post_linux_rx_buffers(driver: &mut RingDriver, count: usize) -> Vec<(u16, u64)> {
    (0..count).map(|_| driver.post_writable(2048)).collect()
}

#[test]
fn a_received_frame_fills_mergeable_buffers_in_order() {
    let mut bench = Bench::new(LINUX);
    let buffers = post_linux_rx_buffers(&mut bench.rx, 40);
    let mut big = frame(3000, 5);
    big[HDR_NUM_BUFFERS..VNET_HDR_LEN].copy_from_slice(&[0xff, 0xff]);
    bench.host_sends(&big);
    bench.tap_readable();
    let [(h0, a0), (h1, a1), (h2, a2)] = [buffers[0], buffers[1], buffers[2]];
    assert_eq!(bench.rx.used(), vec![(u32::from(h0), 2048), (u32::from(h1), 964)]);
    let mut landed = bench.rx.read(a0, 2048);
    landed.extend(bench.rx.read(a1, 964));
    assert_eq!(landed[HDR_NUM_BUFFERS..VNET_HDR_LEN], [2, 0], "num_buffers");
    assert_eq!(landed[VNET_HDR_LEN..], big[VNET_HDR_LEN..]);
    assert_eq!(bench.signals.take_queue_interrupts(RX), 1);

    let small = frame(100, 6);
    bench.host_sends(&small);
    bench.tap_readable();
    assert_eq!(bench.rx.used()[2], (u32::from(h2), 112));
    assert_eq!(bench.rx.read(a2, 112)[HDR_NUM_BUFFERS..], [[1, 0].as_slice(), &small[VNET_HDR_LEN..]].concat());
    assert_eq!(bench.stats().rx_frames, 2);
}

/// The tap's readv writes received frames into guest memory behind vm-memory's back: the
/// buffers are marked dirty for a Diff snapshot as they are handed to it.
#[test]
fn a_received_frame_marks_its_buffers_pages_dirty() {
    let mut bench = Bench::new(LINUX);
    let at = post_linux_rx_buffers(&mut bench.rx, 40)[0].1;
    crate::snapshot::dirty::take_marked_pages(&bench.rx.mem); // the driver's own writes
    bench.host_sends(&frame(6000, 3));
    bench.tap_readable();
    assert_eq!(bench.rx.used().len(), 3, "the frame was received, into three buffers");
    let marked = crate::snapshot::dirty::take_marked_pages(&bench.rx.mem);
    // The third buffer's page is reached by the readv alone (the header's fix-up is in the first).
    assert!(marked.contains(&(at / 4096 + 1)), "buffers from {at:#x}: pages {marked:x?} marked");
}

#[test]
fn frames_wait_in_the_tap_until_the_guest_posts_room_for_them() {
    let mut bench = Bench::new(LINUX);
    // 20 KiB: not room enough for the 64 KiB segment the tap may hand over next.
    let first = post_linux_rx_buffers(&mut bench.rx, 10);
    let sent = frame(500, 7);
    bench.host_sends(&sent);
    bench.tap_readable();
    assert!(!bench.worker.tap_polled, "the tap is not watched while there is no room");
    assert!(bench.rx.used().is_empty());
    // An event that was already queued for the tap is ignored.
    bench.tap_readable();
    assert!(bench.rx.used().is_empty());

    post_linux_rx_buffers(&mut bench.rx, 30);
    bench.handle(RX_KICK).expect("receive kick");
    assert!(bench.worker.tap_polled, "room again: the tap is watched again");
    bench.tap_readable();
    assert_eq!(bench.rx.used(), vec![(u32::from(first[0].0), 512)]);
    assert_eq!(bench.rx.read(first[0].1 + VNET_HDR_LEN as u64, 500), sent[VNET_HDR_LEN..]);
    assert_eq!(bench.stats().rx_dropped, 0, "nothing was lost while waiting");
}

#[test]
fn a_handler_registered_on_a_new_epoll_watches_its_tap_there() {
    // What a resume after a pause does: the parked handler, with the tap watched by the old
    // worker's epoll, is registered on the new worker's.
    let mut bench = Bench::new(LINUX);
    post_linux_rx_buffers(&mut bench.rx, 40);
    let resumed = Epoll::new().expect("epoll");
    bench.worker.register(&resumed).expect("register again");
    bench.host_sends(&frame(100, 3));
    let mut events = vec![EpollEvent::default(); 8];
    let ready = resumed.wait(0, &mut events).expect("epoll wait");
    assert!(events[..ready].iter().any(|event| event.data() == TAP), "the new epoll does not hear the tap");
}

#[test]
fn without_segmentation_offloads_an_mtu_of_room_is_enough() {
    let mut bench = Bench::new(feature::VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_GUEST_CSUM));
    let (head, _) = bench.rx.post_writable(1600);
    bench.host_sends(&frame(1514, 8));
    bench.tap_readable();
    assert_eq!(bench.rx.used(), vec![(u32::from(head), 1526)]);
}

#[test]
fn without_mergeable_buffers_each_frame_takes_one_chain() {
    let mut bench = Bench::new(LINUX & !bit(VIRTIO_NET_F_MRG_RXBUF));
    let (h0, a0) = {
        let rx = &mut bench.rx;
        let header = rx.buffer(12);
        let body = rx.buffer(65550);
        (rx.post_descriptors(&[(header, 12, WRITE, None), (body, 65550, WRITE, None)]), body)
    };
    let (h1, _) = bench.rx.post_writable(1000);
    let sent = frame(40000, 9);
    bench.host_sends(&sent);
    bench.host_sends(&frame(100, 10));
    bench.tap_readable();
    assert_eq!(bench.rx.used(), vec![(u32::from(h0), 40012), (u32::from(h1), 112)]);
    assert_eq!(bench.rx.read(a0, 40000), sent[VNET_HDR_LEN..]);
}

#[test]
fn a_driver_without_guest_csum_sees_no_header_flags() {
    let mut bench = Bench::new(feature::VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF));
    let (_, at) = bench.rx.post_writable(2048);
    let mut sent = frame(60, 11);
    sent[HDR_FLAGS] = VIRTIO_NET_HDR_F_DATA_VALID as u8;
    bench.host_sends(&sent);
    bench.tap_readable();
    assert_eq!(bench.rx.read(at, 1), [0]);
}

#[test]
fn unfit_receive_chains_go_back_unused_and_the_queue_goes_on() {
    let mut bench = Bench::new(LINUX);
    let rx = &mut bench.rx;
    let some = rx.buffer(2048);
    let looping = rx.next_head();
    let bad = [
        rx.post_descriptors(&[(some, 2048, 0, None)]),
        rx.post_descriptors(&[(MEM_SIZE as u64 - 100, 2048, WRITE, None)]),
        rx.post_descriptors(&[(some, 8, WRITE, None)]),
        rx.post_descriptors(&[(some, 2048, WRITE, Some(looping + 3))]),
    ];
    let good = post_linux_rx_buffers(rx, 40);
    bench.host_sends(&frame(200, 12));
    bench.tap_readable();
    let mut expected: Vec<_> = bad.iter().map(|&h| (u32::from(h), 0)).collect();
    expected.push((u32::from(good[0].0), 212));
    assert_eq!(bench.rx.used(), expected);
    assert_eq!(bench.stats().rx_bad_buffers, 4);
    assert_eq!(bench.signals.take_queue_interrupts(RX), 1, "one interrupt for the batch");
}

#[test]
fn with_event_idx_the_guest_is_interrupted_only_when_it_asked() {
    let mut bench = Bench::with_queues(LINUX, |rx, _| rx.set_event_idx(true));
    post_linux_rx_buffers(&mut bench.rx, 40);
    bench.rx.set_used_event(1);
    bench.host_sends(&frame(60, 13));
    bench.tap_readable();
    assert_eq!(bench.signals.take_queue_interrupts(RX), 0, "used_event 1: not yet");
    bench.host_sends(&frame(60, 14));
    bench.tap_readable();
    assert_eq!(bench.signals.take_queue_interrupts(RX), 1, "the index passed used_event");
}

/// A device on a socket pair, with kick eventfds the test keeps a copy of.
fn activation(mem: &GuestMemoryMmap, features: u64) -> (Activation, RingDriver, RingDriver, EventFd) {
    let (rx, rx_queue) = RingDriver::new(mem, QUEUE_SIZE, 0, 0x10_0000);
    let (tx, tx_queue) = RingDriver::new(mem, QUEUE_SIZE, 0x1_0000, 0x80_0000);
    let kick = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let tx_kick = kick();
    let trigger = tx_kick.try_clone().expect("clone");
    let queues = vec![Some(ActiveQueue { queue: rx_queue, kick: kick() }), Some(ActiveQueue { queue: tx_queue, kick: tx_kick })];
    (Activation { mem: mem.clone(), queues, features, signals: Signals::standalone(2) }, rx, tx, trigger)
}

/// Waits (bounded) for `fd` to become readable.
fn wait_readable(fd: &impl AsRawFd) -> bool {
    let mut poll = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll reads and writes the one pollfd we pass.
    unsafe { libc::poll(&mut poll, 1, 10_000) == 1 }
}

#[test]
fn activation_serves_frames_queued_before_it_and_reset_keeps_the_tap() {
    let (tap, host) = Tap::socket_pair().expect("socketpair");
    let host = File::from(host);
    let mut net = Net::with_tap(tap, None);
    for round in 0..2u8 {
        let mem = memory();
        let (activation, _rx, mut tx, _kick) = activation(&mem, LINUX);
        let sent = frame(80, round);
        tx.post_readable(&[&sent]);
        net.activate(activation).expect("activate");
        assert!(wait_readable(&host), "the frame posted before DRIVER_OK goes out");
        let mut got = vec![0u8; 256];
        let len = io::Read::read(&mut &host, &mut got).expect("host read");
        assert_eq!(got[..len], sent[..]);
        net.reset();
        net.reset();
    }
    assert_eq!(net.stats().tx_frames, 2);
}

#[test]
fn activation_refuses_a_legacy_driver_or_a_missing_queue() {
    let (tap, _host) = Tap::socket_pair().expect("socketpair");
    let mut net = Net::with_tap(tap, None);
    let mem = memory();
    let (legacy, ..) = activation(&mem, LINUX & !feature::VERSION_1);
    assert!(matches!(net.activate(legacy), Err(ActivateError::LegacyDriver)));
    let (mut missing, ..) = activation(&mem, LINUX);
    missing.queues[TX] = None;
    assert!(matches!(net.activate(missing), Err(ActivateError::QueueNotEnabled("transmit"))));
}

/// A real tap in a network namespace of the test's own.
#[path = "real_tap_tests.rs"]
mod real_tap;
/// The rate limiters each way, on the worker driven by hand.
#[path = "limit_tests.rs"]
mod limits_each_way;
/// The worker on passt's link, driven by hand, with a shell script standing in for passt.
#[path = "passt_tests.rs"]
mod on_passt;
/// Multi-queue cards: one worker per pair, the control queue, hostile commands.
#[path = "mq_tests.rs"]
mod multiqueue;
/// How the worker paces itself (looking again, publishing as frames land).
#[path = "pace_tests.rs"]
mod pacing;
