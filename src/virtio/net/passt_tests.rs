//! virtio-net on passt's link: the worker driven by hand, with a shell script standing in
//! for passt (a child of `net::tests`, whose helpers it uses).

use super::*;
use crate::passt::link::{stand_in, ECHO};
use crate::rate_limiter::BucketConfig;

/// What a Linux driver accepts of what we offer with passt.
const LINUX_ON_PASST: u64 = PASST_FEATURES | feature::VERSION_1 | feature::RING_EVENT_IDX;

struct PasstBench {
    rx: RingDriver,
    tx: RingDriver,
    worker: NetWorker,
    epoll: Epoll,
    signals: Signals,
    live: NetHandle,
    net: Net,
    _dir: tempfile::TempDir,
}

impl PasstBench {
    fn new(body: &str) -> PasstBench {
        PasstBench::limited(body, limits(RateLimit::default(), RateLimit::default()))
    }

    fn limited(body: &str, live: NetHandle) -> PasstBench {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = Arc::new(stand_in(dir.path(), body));
        let mem = memory();
        let (rx, rx_queue) = RingDriver::new(&mem, QUEUE_SIZE, 0, 0x10_0000);
        let (tx, tx_queue) = RingDriver::new(&mem, QUEUE_SIZE, 0x1_0000, 0x80_0000);
        let signals = Signals::standalone(2);
        let kick = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let backend = Backend::Passt(Arc::clone(&link));
        let mut worker = NetWorker::new(
            mem,
            ActiveQueue { queue: rx_queue, kick: kick() },
            ActiveQueue { queue: tx_queue, kick: kick() },
            backend.clone(),
            signals.clone(),
            LINUX_ON_PASST,
            live.clone(),
        );
        let epoll = Epoll::new().expect("epoll");
        worker.register(&epoll).expect("register");
        let net = Net::with_backend(backend, Some([0x52, 0x54, 0, 1, 2, 3]));
        PasstBench { rx, tx, worker, epoll, signals, live, net, _dir: dir }
    }

    /// Serves events as the worker thread would, until `done` (or 60 s: a hung stand-in).
    fn serve_until(&mut self, done: impl Fn(&PasstBench) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 8];
        while !done(self) {
            assert!(
                std::time::Instant::now() < deadline,
                "the worker never got there: {:?}, link up {}, tx used {:?}, rx used {:?}",
                NetStats::of(&self.live.metrics),
                self.net.backend.is_up(),
                self.tx.used(),
                self.rx.used()
            );
            let n = self.epoll.wait(1000, &mut events).expect("epoll_wait");
            for event in &events[..n] {
                self.worker.handle(&self.epoll, event.data(), event.event_set()).expect("handled");
            }
        }
    }

    fn link_status(&self) -> u16 {
        let mut status = [0u8; 2];
        self.net.read_config(6, &mut status);
        u16::from_le_bytes(status)
    }
}

#[test]
fn offers_no_offloads_only_the_mac_the_status_and_mergeable_buffers() {
    let bench = PasstBench::new("exec sleep 1000");
    let offered = bench.net.offered_features();
    assert_eq!(offered, bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS) | bit(VIRTIO_NET_F_MRG_RXBUF));
    assert_eq!(bench.link_status(), VIRTIO_NET_S_LINK_UP as u16);
}

#[test]
fn frames_go_without_the_guests_header_and_come_back_behind_a_zeroed_one() {
    let mut bench = PasstBench::new(ECHO);
    let buffers = post_linux_rx_buffers(&mut bench.rx, 40);
    // A header a driver with offloads would write: passt must never see it.
    let mut sent = frame(1500, 9);
    sent[..VNET_HDR_LEN].fill(0xee);
    bench.tx.post_readable(&[&sent[..5], &sent[5..]]);
    bench.worker.tx.kick.write(1).expect("kick");
    bench.serve_until(|b| !b.rx.used().is_empty());
    let (head, at) = buffers[0];
    assert_eq!(bench.rx.used(), vec![(u32::from(head), sent.len() as u32)]);
    let landed = bench.rx.read(at, sent.len());
    assert_eq!(landed[..VNET_HDR_LEN], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "a zeroed header, one buffer");
    assert_eq!(landed[VNET_HDR_LEN..], sent[VNET_HDR_LEN..]);
    let stats = NetStats::of(&bench.live.metrics);
    assert_eq!((stats.tx_frames, stats.rx_frames), (1, 1));
}

#[test]
fn when_passt_dies_the_link_goes_down_once_and_the_guests_frames_are_dropped() {
    let mut bench = PasstBench::new("exit 0");
    post_linux_rx_buffers(&mut bench.rx, 40);
    bench.serve_until(|b| b.signals.take_config_interrupts() == 1);
    assert_eq!(bench.link_status(), 0, "VIRTIO_NET_S_LINK_UP cleared");
    bench.tx.post_readable(&[&frame(60, 1)]);
    bench.worker.handle(&bench.epoll, TX_KICK, EventSet::IN).expect("transmit");
    assert_eq!(bench.tx.used().len(), 1, "the frame is returned");
    assert_eq!(NetStats::of(&bench.live.metrics).tx_dropped, 1);
    assert_eq!(bench.signals.take_config_interrupts(), 0, "the guest is told once");
}

#[test]
fn on_passt_too_the_limiters_hold_frames_back_and_let_them_all_through_in_time() {
    // 2000 bytes every 20 ms each way: three 1500-byte frames need two waits either way.
    let bucket = || RateLimit { bandwidth: BucketConfig::new(2000, 0, 20).ok(), ops: None };
    let mut bench = PasstBench::limited(ECHO, limits(bucket(), bucket()));
    post_linux_rx_buffers(&mut bench.rx, 40);
    let sent: Vec<Vec<u8>> = (0..3).map(|seed| frame(1500, seed)).collect();
    for frame in &sent {
        bench.tx.post_readable(&[frame]);
    }
    bench.worker.tx.kick.write(1).expect("kick");
    bench.serve_until(|b| b.rx.used().len() == 3);
    let metrics = &bench.live.metrics;
    assert_eq!((metrics.tx_packets_count.get(), metrics.rx_packets_count.get()), (3, 3));
    assert_eq!((metrics.tx_bytes_count.get(), metrics.rx_bytes_count.get()), (4500, 4500), "the frames' own bytes");
    assert!(metrics.tx_rate_limiter_throttled.get() > 0 && metrics.tx_rate_limiter_event_count.get() > 0);
    assert!(metrics.rx_rate_limiter_throttled.get() > 0 && metrics.rx_event_rate_limiter_count.get() > 0);
}

impl PasstBench {
    /// Serves whatever is ready, round after round, until nothing is; returns the rounds that
    /// took. A worker that spins (an fd it watches stays ready while it makes no progress)
    /// never gets there: past 1000 rounds that is what this says, with the counters.
    fn serve_ready(&mut self) -> usize {
        let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 8];
        let mut rounds = 0;
        loop {
            let n = self.epoll.wait(0, &mut events).expect("epoll_wait");
            if n == 0 {
                return rounds;
            }
            rounds += 1;
            assert!(rounds <= 1000, "the worker is woken again and again: {:?}", NetStats::of(&self.live.metrics));
            for event in &events[..n] {
                self.worker.handle(&self.epoll, event.data(), event.event_set()).expect("handled");
            }
        }
    }
}

#[test]
fn a_passt_that_stops_reading_leaves_the_guests_frames_queued_and_the_worker_idle() {
    // Alive, holding its end, never reading: its socket and our buffer fill, then nothing moves.
    let mut bench = PasstBench::new("exec sleep 1000");
    for seed in 0..100 {
        bench.tx.post_readable(&[&frame(30_000, seed)]);
    }
    bench.worker.tx.kick.write(1).expect("kick");
    bench.serve_ready();
    let taken = bench.tx.used().len();
    assert!(taken > 0 && taken < 100, "{taken} of 100 frames taken: the socket and our buffer hold some, not all");
    assert_eq!(NetStats::of(&bench.live.metrics).tx_dropped, 0, "the rest wait in the ring, none is dropped");
    // The guest kicks again: nothing more is taken, and nothing is left ready to wake us.
    bench.worker.tx.kick.write(1).expect("kick");
    assert_eq!(bench.serve_ready(), 1, "one round: the kick itself");
    assert_eq!(bench.tx.used().len(), taken);
    assert!(bench.net.backend.is_up(), "a slow passt is not a dead one");
}

#[test]
fn a_passt_that_floods_a_guest_without_room_leaves_its_frames_in_the_socket_and_the_worker_idle() {
    // 512 frames of 1500 bytes, as fast as the socket takes them: more than it holds. (cat
    // is the stand-in itself, so that stopping it stops the writer.)
    let flood = r#"f=$(mktemp); { printf '\000\000\005\334'; head -c 1500 /dev/zero; } >$f
        for i in 1 2 3; do cat $f $f $f $f $f $f $f $f >$f.8; mv $f.8 $f; done
        exec 3<$f; rm $f; exec cat <&3 >&$fd"#;
    let mut bench = PasstBench::new(flood);
    // Room for a few frames, not for the largest one passt may send: none is read.
    post_linux_rx_buffers(&mut bench.rx, 4);
    bench.serve_until(|b| !b.worker.tap_polled);
    assert_eq!(bench.serve_ready(), 0, "nothing stays ready while the guest has no room");
    assert!(bench.rx.used().is_empty());
    // Room for 80 KiB: frames are delivered until the room left could not take a largest one,
    // then the socket is left alone again.
    post_linux_rx_buffers(&mut bench.rx, 36);
    bench.worker.handle(&bench.epoll, RX_KICK, EventSet::IN).expect("receive kick");
    bench.serve_until(|b| !b.rx.used().is_empty());
    bench.serve_ready();
    let delivered = bench.rx.used().len();
    assert!(!bench.worker.tap_polled);
    assert_eq!(bench.serve_ready(), 0);
    assert_eq!(bench.rx.used().len(), delivered);
}
