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

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::mock::MockSplitQueue;

const MEM_SIZE: usize = 0x100_0000;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Everything we offer, as a Linux driver accepts it.
const LINUX: u64 = OFFERED_FEATURES | feature::VERSION_1 | feature::RING_EVENT_IDX;

fn memory() -> GuestMemoryMmap {
    crate::memory::from_ranges(&[(GuestAddress(0), MEM_SIZE)], crate::memory::Tracking::DirtyPages).expect("guest memory")
}

/// The driver's side of one queue: it posts chains and reads the used ring, in raw memory,
/// so that it can write whatever a hostile driver would.
struct Driver {
    mem: GuestMemoryMmap,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    next_buffer: u64,
}

impl Driver {
    fn new(mem: &GuestMemoryMmap, ring_at: u64, buffers_at: u64) -> (Driver, Queue) {
        let mock = MockSplitQueue::create(mem, GuestAddress(ring_at), QUEUE_SIZE);
        let mut queue: Queue = mock.create_queue().expect("queue");
        // The mock's used ring overlaps the available ring (virtio-queue 0.18 sizes it in entries)
        let used = (mock.avail_addr().0 + 6 + 2 * u64::from(QUEUE_SIZE)).next_multiple_of(4);
        queue.try_set_used_ring_address(GuestAddress(used)).expect("aligned");
        let driver = Driver {
            mem: mem.clone(),
            desc: mock.desc_table_addr().0,
            avail: mock.avail_addr().0,
            used,
            next_desc: 0,
            avail_idx: 0,
            next_buffer: buffers_at,
        };
        (driver, queue)
    }

    fn buffer(&mut self, len: u32) -> u64 {
        let at = self.next_buffer;
        self.next_buffer += u64::from(len).next_multiple_of(64);
        at
    }

    /// Posts one chain of descriptors (address, length, flags, next): NEXT and the next
    /// index are filled in to link them in order, unless `next` is given.
    fn post_descriptors(&mut self, descriptors: &[(u64, u32, u16, Option<u16>)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags, next)) in descriptors.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QUEUE_SIZE;
            let last = i + 1 == descriptors.len();
            let (flags, next) = match next {
                Some(next) => (flags | NEXT, next),
                None if last => (flags, 0),
                None => (flags | NEXT, self.next_desc),
            };
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            self.mem.write_slice(&raw, GuestAddress(self.desc + 16 * u64::from(index))).expect("descriptor");
        }
        self.publish(head);
        head
    }

    fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot)).expect("avail entry");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2)).expect("avail idx");
    }

    fn set_used_event(&self, value: u16) {
        self.mem.write_obj(value.to_le(), GuestAddress(self.avail + 4 + 2 * u64::from(QUEUE_SIZE))).expect("used_event");
    }

    /// A frame to send, in one readable buffer per piece.
    fn post_frame(&mut self, pieces: &[&[u8]]) -> u16 {
        let descriptors: Vec<_> = pieces
            .iter()
            .map(|piece| {
                let len = u32::try_from(piece.len()).expect("small piece");
                let at = self.buffer(len.max(1));
                self.mem.write_slice(piece, GuestAddress(at)).expect("frame");
                (at, len, 0, None)
            })
            .collect();
        self.post_descriptors(&descriptors)
    }

    /// An empty receive chain of one writable buffer; returns its head and address.
    fn post_rx_buffer(&mut self, len: u32) -> (u16, u64) {
        let at = self.buffer(len);
        (self.post_descriptors(&[(at, len, WRITE, None)]), at)
    }

    /// The used ring's entries: (head, length).
    fn used(&self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).expect("used idx");
        (0..idx)
            .map(|i| {
                let at = GuestAddress(self.used + 4 + 8 * u64::from(i % QUEUE_SIZE));
                let element: [u32; 2] = self.mem.read_obj(at).expect("used element");
                (u32::from_le(element[0]), u32::from_le(element[1]))
            })
            .collect()
    }

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.mem.read_slice(&mut bytes, GuestAddress(at)).expect("guest bytes");
        bytes
    }
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
    rx: Driver,
    tx: Driver,
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
        let (rx, mut rx_queue) = Driver::new(&mem, 0, 0x10_0000);
        let (tx, mut tx_queue) = Driver::new(&mem, 0x1_0000, 0x80_0000);
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
    let h1 = bench.tx.post_frame(&[&first[..VNET_HDR_LEN], &first[VNET_HDR_LEN..]]);
    // A header split over two buffers, an empty buffer, and the rest.
    let h2 = bench.tx.post_frame(&[&second[..5], &second[5..40], &[], &second[40..]]);
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
    let looping = tx.next_desc;
    heads.push(tx.post_descriptors(&[(header, 12, 0, None), (body, 100, 0, Some(looping))]));
    heads.push(tx.post_descriptors(&[(header, 12, 0, Some(QUEUE_SIZE + 10))]));
    let bad = heads.len() as u64;
    heads.push(tx.post_frame(&[&good]));
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
        bench.tx.post_frame(&[f]);
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
fn post_linux_rx_buffers(driver: &mut Driver, count: usize) -> Vec<(u16, u64)> {
    (0..count).map(|_| driver.post_rx_buffer(2048)).collect()
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
    let (head, _) = bench.rx.post_rx_buffer(1600);
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
    let (h1, _) = bench.rx.post_rx_buffer(1000);
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
    let (_, at) = bench.rx.post_rx_buffer(2048);
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
    let looping = rx.next_desc;
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
fn activation(mem: &GuestMemoryMmap, features: u64) -> (Activation, Driver, Driver, EventFd) {
    let (rx, rx_queue) = Driver::new(mem, 0, 0x10_0000);
    let (tx, tx_queue) = Driver::new(mem, 0x1_0000, 0x80_0000);
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
        tx.post_frame(&[&sent]);
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

/// A real tap in a network namespace of this thread's own, so that the host's interfaces
/// are never touched; the host's side of the wire is a packet socket on the tap.
mod real_tap {
    use super::*;

    const ETHERTYPE: [u8; 2] = [0x88, 0xb5]; // local experimental
    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];
    const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

    fn ethernet(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut bytes = [&dst[..], &src, &ETHERTYPE, payload].concat();
        bytes.resize(bytes.len().max(60), 0);
        bytes
    }

    /// The only reasons a real-tap test may skip.
    #[derive(Debug, thiserror::Error)]
    enum Unavailable {
        #[error("cannot make a network namespace: {0}")]
        NoNamespace(io::Error),
        #[error("this host has no /dev/net/tun")]
        NoTun,
    }

    /// Moves this thread into a new network namespace, unless this host gives us none (we may
    /// not make one, or the kernel has none) or no /dev/net/tun. Any other failure fails the test.
    fn private_network() -> std::result::Result<(), Unavailable> {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET changes only this thread's view.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::ENOSYS) => return Err(Unavailable::NoNamespace(e)),
                _ => panic!("unshare(CLONE_NEWNET) failed unexpectedly: {e}"),
            }
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err(Unavailable::NoTun);
        }
        // Keep IPv6's router solicitations off the wire; harmless if IPv6 is absent.
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
        Ok(())
    }

    fn packet_socket(ifname: &str) -> OwnedFd {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket takes no pointers; the fd is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, i32::from(protocol)) };
        assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
        // SAFETY: a fresh fd nobody else owns.
        let socket = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).expect("name");
        // SAFETY: sockaddr_ll is plain data; zero is valid.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        // SAFETY: reads the NUL-terminated name we own.
        address.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        let size = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: bind reads `size` bytes of the address we pass.
        let ret = unsafe { libc::bind(fd, (&address as *const libc::sockaddr_ll).cast(), size) };
        assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
        socket
    }

    /// Waits for a frame with our EtherType carrying `payload`, skipping the host's chatter.
    fn host_receives(socket: &OwnedFd, payload: &[u8]) -> Vec<u8> {
        let socket = File::from(socket.try_clone().expect("dup"));
        let mut buffer = vec![0u8; 70000];
        loop {
            assert!(wait_readable(&socket), "no frame with our payload reached the host");
            let Ok(len) = io::Read::read(&mut &socket, &mut buffer) else { continue };
            if carries(&buffer[..len], payload) {
                return buffer[..len].to_vec();
            }
        }
    }

    fn wait_until(what: impl Fn() -> bool) -> bool {
        (0..2000).any(|_| {
            let done = what();
            if !done {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            done
        })
    }

    /// Whether an Ethernet frame is ours and carries `payload`.
    fn carries(frame: &[u8], payload: &[u8]) -> bool {
        frame.len() >= 14 + payload.len() && frame[12..14] == ETHERTYPE && &frame[14..14 + payload.len()] == payload
    }

    /// The frame (header first) in a used receive buffer that carries `payload`, if any.
    fn guest_received(rx: &Driver, buffers: &[(u16, u64)], payload: &[u8]) -> Option<Vec<u8>> {
        rx.used().iter().find_map(|&(head, len)| {
            let &(_, at) = buffers.iter().find(|&&(h, _)| u32::from(h) == head)?;
            let got = rx.read(at, len as usize);
            carries(got.get(VNET_HDR_LEN..)?, payload).then_some(got)
        })
    }

    /// A card on a new tap `name`, activated with `features` once `post` has posted the
    /// receive buffers (whose heads and addresses it returns), and the host's end of the wire.
    struct Wired {
        net: Net,
        wire: OwnedFd,
        rx: Driver,
        tx: Driver,
        tx_kick: EventFd,
        buffers: Vec<(u16, u64)>,
    }

    fn wired(name: &str, features: u64, post: impl FnOnce(&mut Driver) -> Vec<(u16, u64)>) -> Wired {
        let tap = Tap::open(name).expect("a tap in our own namespace");
        let wire = packet_socket(name);
        let mut net = Net::with_tap(tap, Some(GUEST_MAC));
        let (activation, mut rx, tx, tx_kick) = activation(&memory(), features);
        let buffers = post(&mut rx);
        net.activate(activation).expect("activation");
        Wired { net, wire, rx, tx, tx_kick, buffers }
    }

    fn carry_frames_both_ways() {
        let Wired { mut net, wire, rx, mut tx, tx_kick, buffers } = wired("lgtest0", LINUX, |rx| post_linux_rx_buffers(rx, 60));
        let busy = Tap::open("lgtest0").expect_err("a tap serves one VM");
        assert!(busy.to_string().contains("already in use"), "{busy}");
        let not_a_tap = Tap::open("lo").expect_err("lo is no tap");
        assert!(not_a_tap.to_string().contains("not a single-queue tap"), "{not_a_tap}");

        // Guest to host.
        let out = ethernet([0xff; 6], GUEST_MAC, b"lguest says hello");
        tx.post_frame(&[&[0u8; VNET_HDR_LEN], &out]);
        tx_kick.write(1).expect("kick");
        assert_eq!(host_receives(&wire, b"lguest says hello"), out);

        // Host to guest.
        let back = ethernet(GUEST_MAC, HOST_MAC, b"the host answers");
        // SAFETY: send reads `back.len()` bytes of the buffer we own.
        let sent = unsafe { libc::send(wire.as_raw_fd(), back.as_ptr().cast(), back.len(), 0) };
        assert_eq!(usize::try_from(sent).ok(), Some(back.len()), "send: {}", io::Error::last_os_error());
        assert!(wait_until(|| guest_received(&rx, &buffers, b"the host answers").is_some()), "the frame reached the guest");
        let got = guest_received(&rx, &buffers, b"the host answers").expect("received");
        assert_eq!(got[HDR_NUM_BUFFERS..VNET_HDR_LEN], [1, 0], "num_buffers");
        assert_eq!(got[VNET_HDR_LEN..], back[..]);
        assert_eq!(net.stats().rx_dropped, 0);
        net.reset();
    }

    fn drop_a_frame_too_big_for_the_buffers() {
        // No mergeable buffers and no offloads: each frame must fit one small chain.
        let post = |rx: &mut Driver| (0..8).map(|_| rx.post_rx_buffer(300)).collect();
        let Wired { mut net, wire, rx, buffers, .. } = wired("lgtest1", feature::VERSION_1, post);
        for frame in [ethernet(GUEST_MAC, HOST_MAC, &[b'x'; 1000]), ethernet(GUEST_MAC, HOST_MAC, b"small enough")] {
            // SAFETY: send reads `frame.len()` bytes of the buffer we own.
            let sent = unsafe { libc::send(wire.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(usize::try_from(sent).ok(), Some(frame.len()), "send: {}", io::Error::last_os_error());
        }
        assert!(wait_until(|| guest_received(&rx, &buffers, b"small enough").is_some()), "the small frame got through");
        assert_eq!(net.stats().rx_dropped, 1, "the big one was dropped and counted");
        assert!(guest_received(&rx, &buffers, &[b'x'; 20]).is_none());
        net.reset();
    }

    /// An Ethernet frame with one TCP segment of `payload` bytes between link-local
    /// addresses, and the virtio-net header that offloads its checksum and segmentation.
    fn tcp_segment(dst: [u8; 6], src: [u8; 6], payload: usize) -> ([u8; VNET_HDR_LEN], Vec<u8>) {
        let ip_len = u16::try_from(40 + payload).expect("fits an IP packet");
        let mut ip = [0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 169, 254, 1, 1, 169, 254, 1, 2];
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        let sum = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
        let sum = !((sum & 0xffff) + (sum >> 16)) as u16;
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        // Ports, sequence, acknowledgement, data offset 5, ACK|PSH, window; the checksum
        // is left to the offload.
        let tcp = [0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0];
        let body: Vec<u8> = (0..payload).map(|i| (i % 251) as u8).collect();
        let frame = [&dst[..], &src, &[0x08, 0x00], &ip, &tcp, &body].concat();
        let mut header = [0u8; VNET_HDR_LEN];
        header[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        header[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
        header[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
        header[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
        header[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
        header[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
        (header, frame)
    }

    fn carry_64k_segments_unsplit() {
        let Wired { mut net, wire, rx, mut tx, tx_kick, buffers } = wired("lgtest2", LINUX, |rx| post_linux_rx_buffers(rx, 100));

        // Guest to host: the host's stack takes the 60 KB segment whole.
        let (header, out) = tcp_segment([0xff; 6], GUEST_MAC, 60000);
        tx.post_frame(&[&header, &out[..100], &out[100..]]);
        tx_kick.write(1).expect("kick");
        let socket = File::from(wire.try_clone().expect("dup"));
        let mut got = vec![0u8; 70000];
        let len = loop {
            assert!(wait_readable(&socket), "the segment never reached the host");
            let Ok(len) = io::Read::read(&mut &socket, &mut got) else { continue };
            if len > 14 && got[12..14] == [0x08, 0x00] {
                break len;
            }
        };
        assert_eq!(got[..len].len(), out.len(), "one frame, not segmented on the way");
        assert_eq!(got[54..len], out[54..]);

        // Host to guest: a packet socket with a virtio-net header of its own sends a 60 KB
        // segment out of the tap, which hands it to us unsplit as the guest accepted TSO4.
        const PACKET_VNET_HDR: libc::c_int = 15;
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads one int, which `on` is.
        let ret = unsafe {
            libc::setsockopt(wire.as_raw_fd(), libc::SOL_PACKET, PACKET_VNET_HDR, (&on as *const libc::c_int).cast(), 4)
        };
        assert_eq!(ret, 0, "PACKET_VNET_HDR: {}", io::Error::last_os_error());
        let (header, back) = tcp_segment(GUEST_MAC, HOST_MAC, 60000);
        let packet = [&header[..10], &back].concat();
        // SAFETY: send reads `packet.len()` bytes of the buffer we own.
        let sent = unsafe { libc::send(wire.as_raw_fd(), packet.as_ptr().cast(), packet.len(), 0) };
        assert_eq!(usize::try_from(sent).ok(), Some(packet.len()), "send: {}", io::Error::last_os_error());
        let first_used = |rx: &Driver| {
            rx.used().into_iter().position(|(head, _)| {
                let at = buffers.iter().find(|&&(h, _)| u32::from(h) == head).map_or(0, |b| b.1);
                rx.read(at + VNET_HDR_LEN as u64 + 12, 2) == [0x08, 0x00]
            })
        };
        assert!(wait_until(|| first_used(&rx).is_some()), "the segment reached the guest");
        let used = rx.used();
        let start = first_used(&rx).expect("found");
        let header_at = buffers.iter().find(|&&(h, _)| u32::from(h) == used[start].0).map_or(0, |b| b.1);
        let header = rx.read(header_at, VNET_HDR_LEN);
        let num_buffers = usize::from(u16::from_le_bytes([header[10], header[11]]));
        assert_eq!(num_buffers, (VNET_HDR_LEN + back.len()).div_ceil(2048), "spread over mergeable buffers");
        assert_eq!(header[1], VIRTIO_NET_HDR_GSO_TCPV4 as u8, "still one TCP segment");
        assert_eq!(u16::from_le_bytes([header[4], header[5]]), 1448, "gso_size");
        let mut landed = Vec::new();
        for &(head, len) in &used[start..start + num_buffers] {
            let at = buffers.iter().find(|&&(h, _)| u32::from(h) == head).map_or(0, |b| b.1);
            landed.extend(rx.read(at, len as usize));
        }
        assert_eq!(landed[VNET_HDR_LEN..], back[..]);
        net.reset();
    }

    /// Runs `test` on a thread of its own (the namespace is per thread), skipping it with a
    /// printed reason only when this host gives us no namespace or no /dev/net/tun.
    pub(super) fn in_private_network(name: &str, test: fn()) {
        let ran = std::thread::spawn(move || private_network().map(|()| test()));
        match ran.join() {
            Ok(Ok(())) => {}
            Ok(Err(why)) => eprintln!("SKIPPED {name}: {why} (needs root or CAP_NET_ADMIN, and /dev/net/tun)"),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    #[test]
    fn a_real_tap_carries_frames_both_ways() {
        in_private_network("a_real_tap_carries_frames_both_ways", carry_frames_both_ways);
    }

    #[test]
    fn a_real_tap_carries_64k_tcp_segments_unsplit_both_ways() {
        in_private_network("a_real_tap_carries_64k_tcp_segments_unsplit_both_ways", carry_64k_segments_unsplit);
    }

    #[test]
    fn a_real_tap_frame_too_big_for_the_buffers_is_dropped_and_counted() {
        in_private_network("a_real_tap_frame_too_big_for_the_buffers_is_dropped_and_counted", drop_a_frame_too_big_for_the_buffers);
    }
}

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
