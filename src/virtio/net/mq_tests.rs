//! Multi-queue cards: the queues and features a card of several pairs shows, one worker per
//! pair, the control queue switching pairs, hostile commands failing alone, and a real
//! multi-queue tap. (A child of `net::tests`, whose ring driver it uses.)

use super::*;
use crate::seccomp::Role;
use crate::virtio::Device;

const MQ_LINUX: u64 = LINUX | MULTIQUEUE_FEATURES;
const SET_PAIRS: [u8; 2] = [VIRTIO_NET_CTRL_MQ as u8, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8];

/// A card of `pairs` pairs on socket-pair stand-ins, and the host's ends.
fn card(pairs: usize) -> (Net, Vec<File>) {
    let mut taps = Vec::new();
    let mut hosts = Vec::new();
    for _ in 0..pairs {
        let (tap, host) = Tap::socket_pair().expect("socketpair");
        taps.push(tap);
        hosts.push(File::from(host));
    }
    let first = taps.remove(0);
    (Net::with_taps(first, taps, None), hosts)
}

/// A card's workers driven by hand, each with its own epoll, and the driver's side of every
/// queue the activation had (receive, transmit, ..., control).
struct MqBench {
    net: Net,
    drivers: Vec<RingDriver>,
    workers: Vec<NetWorker>,
    epolls: Vec<Epoll>,
    hosts: Vec<File>,
    signals: Signals,
}

impl MqBench {
    /// A card of `pairs` pairs activated with `features` and `queues` queues enabled.
    fn new(pairs: usize, features: u64, queues: usize) -> MqBench {
        MqBench::with_card(card(pairs), features, queues)
    }

    fn with_card((net, hosts): (Net, Vec<File>), features: u64, queues: usize) -> MqBench {
        let mem = memory();
        let (mut drivers, mut active) = (Vec::new(), Vec::new());
        for i in 0..queues as u64 {
            let (driver, queue) = RingDriver::new(&mem, QUEUE_SIZE, 0x1_0000 * i, 0x10_0000 * (i + 1));
            drivers.push(driver);
            active.push(Some(ActiveQueue { queue, kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd") }));
        }
        let signals = Signals::standalone(queues);
        let activation = Activation { mem, queues: active, features, signals: signals.clone() };
        let mut workers = net.handlers(activation).expect("activation");
        let epolls: Vec<Epoll> = workers.iter_mut().map(|worker| {
            let epoll = Epoll::new().expect("epoll");
            worker.register(&epoll).expect("register");
            epoll
        }).collect();
        MqBench { net, drivers, workers, epolls, hosts, signals }
    }

    fn handle(&mut self, worker: usize, token: u64) {
        self.workers[worker].handle(&self.epolls[worker], token, EventSet::IN).expect("handled");
    }

    fn control(&mut self) -> &mut RingDriver {
        self.drivers.last_mut().expect("a control queue")
    }

    /// Posts a command (`bytes` readable, then `answer` writable bytes) and has the first
    /// pair's worker serve the control queue; returns the answer's address.
    fn command(&mut self, bytes: &[u8], answer: u32) -> u64 {
        let control = self.control();
        let at = control.buffer(64);
        control.mem.write_slice(bytes, GuestAddress(at)).expect("command");
        let answer_at = control.buffer(8);
        control.mem.write_obj(0xaau8, GuestAddress(answer_at)).expect("answer byte");
        let mut descriptors = vec![(at, bytes.len() as u32, 0, None)];
        if answer > 0 {
            descriptors.push((answer_at, answer, WRITE, None));
        }
        control.post_descriptors(&descriptors);
        self.handle(0, CTRL_KICK);
        answer_at
    }

    fn answer(&self, at: u64) -> u8 {
        self.drivers.last().expect("a control queue").read(at, 1)[0]
    }

    /// The tokens worker `worker`'s epoll reports now.
    fn ready(&self, worker: usize) -> Vec<u64> {
        let mut events = [EpollEvent::default(); 8];
        let n = self.epolls[worker].wait(0, &mut events).expect("epoll_wait");
        events[..n].iter().map(|event| event.data()).collect()
    }

    /// Serves worker `worker`'s other events, as its thread would, until its epoll reports
    /// `token` (true), or nothing for 5 s (false).
    fn serve_until_ready(&mut self, worker: usize, token: u64) -> bool {
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = self.epolls[worker].wait(5000, &mut events).expect("epoll_wait");
            let tokens: Vec<u64> = events[..n].iter().map(|event| event.data()).collect();
            if tokens.contains(&token) || tokens.is_empty() {
                return !tokens.is_empty();
            }
            tokens.into_iter().for_each(|other| self.handle(worker, other));
        }
    }
}

fn set_pairs(count: u16) -> Vec<u8> {
    [&SET_PAIRS[..], &count.to_le_bytes()].concat()
}

#[test]
fn a_card_of_several_pairs_offers_mq_and_a_control_queue_after_them() {
    let (net, _hosts) = card(3);
    assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE; 7][..], "three pairs and the control queue");
    assert_eq!(net.features() & MULTIQUEUE_FEATURES, MULTIQUEUE_FEATURES);
    let mut max_pairs = [0u8; 2];
    net.read_config(8, &mut max_pairs);
    assert_eq!(u16::from_le_bytes(max_pairs), 3);
    let (single, _host) = card(1);
    assert_eq!(single.queue_max_sizes().len(), 2);
    assert_eq!(single.features() & MULTIQUEUE_FEATURES, 0, "one pair: no control queue to offer");
}

#[test]
fn each_pair_gets_a_worker_and_only_the_first_serves_the_control_queue() {
    let bench = MqBench::new(3, MQ_LINUX, 7);
    assert_eq!(bench.workers.len(), 3);
    let roles: Vec<Role> = bench.workers.iter().map(|worker| worker.role()).collect();
    assert_eq!(roles, [Role::NetControl, Role::DeviceWorker, Role::DeviceWorker]);
    let watched: Vec<bool> = bench.workers.iter().map(|worker| worker.tap_polled).collect();
    assert_eq!(watched, [true, false, false], "until the driver sets its pairs, only the first is in use");
}

#[test]
fn setting_the_pairs_switches_them_on_and_their_frames_reach_their_own_queue() {
    let mut bench = MqBench::new(2, MQ_LINUX, 5);
    let answer_at = bench.command(&set_pairs(2), 1);
    assert_eq!(bench.answer(answer_at), VIRTIO_NET_OK as u8);
    assert_eq!(bench.control().used().len(), 1);
    assert_eq!(bench.control().used()[0].1, 1, "the answer byte was written");
    assert_eq!(bench.signals.take_queue_interrupts(4), 1, "the control queue's own vector");
    // Pair 1's worker hears of it through its receive kick, and watches its tap again (the
    // guest has posted room for the largest frame).
    let (head, _) = bench.drivers[2].post_writable(MAX_FRAME_LEN as u32);
    bench.handle(1, RX_KICK);
    assert!(bench.workers[1].tap_polled);
    io::Write::write_all(&mut bench.hosts[1], &frame(100, 1)).expect("host sends");
    bench.handle(1, TAP);
    assert_eq!(bench.drivers[2].used(), [(u32::from(head), (VNET_HDR_LEN + 100) as u32)], "pair 1's receive queue");
    assert_eq!(bench.signals.take_queue_interrupts(2), 1, "pair 1's receive vector");
    assert!(bench.drivers[0].used().is_empty(), "nothing on pair 0's");
    // Back to one pair: pair 1 stops watching its (detached) tap queue.
    let answer_at = bench.command(&set_pairs(1), 1);
    assert_eq!(bench.answer(answer_at), VIRTIO_NET_OK as u8);
    bench.handle(1, RX_KICK);
    assert!(!bench.workers[1].tap_polled);
}

#[test]
fn hostile_control_commands_fail_alone_and_the_queue_goes_on() {
    let mut bench = MqBench::new(2, MQ_LINUX, 5);
    let err = VIRTIO_NET_ERR as u8;
    for hostile in [set_pairs(0), set_pairs(3), set_pairs(u16::MAX), SET_PAIRS.to_vec(), vec![0, 0, 1], vec![]] {
        let answer_at = bench.command(&hostile, 1);
        assert_eq!(bench.answer(answer_at), err, "{hostile:?}");
    }
    // No room for an answer: the chain goes back used, with nothing written.
    let answer_at = bench.command(&set_pairs(2), 0);
    assert_eq!(bench.answer(answer_at), 0xaa);
    assert_eq!(bench.control().used().last().map(|used| used.1), Some(0));
    // A loop: the chain is cut short.
    let control = bench.control();
    let at = control.buffer(8);
    let head = control.next_head();
    control.post_descriptors(&[(at, 4, 0, Some(head))]);
    bench.handle(0, CTRL_KICK);
    assert!(!bench.workers[1].tap_polled, "no hostile command switched a pair");
    let answer_at = bench.command(&set_pairs(2), 1);
    assert_eq!(bench.answer(answer_at), VIRTIO_NET_OK as u8, "the queue still serves honest commands");
    assert_eq!(bench.control().used().len(), 9);
}

#[test]
fn without_mq_the_driver_has_one_pair_and_the_control_queue_follows_it() {
    let features = LINUX | bit(VIRTIO_NET_F_CTRL_VQ);
    let mut bench = MqBench::new(2, features, 3);
    assert_eq!(bench.workers.len(), 1);
    let answer_at = bench.command(&set_pairs(2), 1);
    assert_eq!(bench.answer(answer_at), VIRTIO_NET_ERR as u8, "queue pairs without MQ");
    assert_eq!(bench.signals.take_queue_interrupts(2), 1, "queue 2 is the control queue");
}

/// A real multi-queue tap: one fd per queue, a queue that detaches and attaches again, and
/// the clear refusal of queues=N on a single-queue tap.
fn open_a_multi_queue_tap() {
    let taps = Tap::open_queues("mq0", 3).expect("a multi-queue tap in our own namespace");
    assert_eq!(taps.len(), 3);
    taps[2].set_queue_enabled(false).expect("detach");
    taps[2].set_queue_enabled(true).expect("attach again");
    let _single = Tap::open("sq0").expect("a single-queue tap");
    let refused = Tap::try_open_queues("sq0", 2).expect_err("a single-queue tap takes one fd");
    assert!(refused.to_string().contains("ip tuntap add sq0 mode tap multi_queue"), "{refused}");
    assert!(matches!(refused, TapError::NotMultiQueue(_)));
}

#[test]
fn a_real_multi_queue_tap_gives_a_queue_per_fd() {
    super::real_tap::in_private_network("a_real_multi_queue_tap_gives_a_queue_per_fd", open_a_multi_queue_tap);
}

#[test]
fn the_first_pair_watches_the_cards_shared_limiter_and_wakes_the_pair_it_held_back() {
    // 1000 bytes every 20 ms for the whole card: a 1500-byte frame on pair 1 leaves 500 owed.
    let limit = RateLimit { bandwidth: crate::rate_limiter::BucketConfig::new(1000, 0, 20).ok(), ops: None };
    let (net, hosts) = card(2);
    let net = net.limited(limit, RateLimit::default()).expect("timerfds");
    let mut bench = MqBench::with_card((net, hosts), MQ_LINUX, 5);
    bench.command(&set_pairs(2), 1);
    post_linux_rx_buffers(&mut bench.drivers[2], 40);
    bench.handle(1, RX_KICK);
    for seed in 0..2 {
        io::Write::write_all(&mut bench.hosts[1], &frame(1500, seed)).expect("host sends");
    }
    bench.handle(1, TAP);
    assert_eq!(bench.drivers[2].used().len(), 1, "one frame, then the card's debt holds pair 1 back");
    assert!(!bench.workers[1].tap_polled);
    // The timer fires in the first pair's epoll only (see TimerDuty).
    assert!(bench.serve_until_ready(0, RX_RATE_TIMER), "the first pair hears the timer");
    assert!(!bench.ready(1).contains(&RX_RATE_TIMER), "pair 1 does not watch it");
    bench.handle(0, RX_RATE_TIMER);
    assert!(bench.ready(1).contains(&RX_KICK), "the first pair woke pair 1");
    bench.handle(1, RX_KICK);
    assert!(bench.workers[1].tap_polled, "pair 1 reads its tap again");
    bench.handle(1, TAP);
    assert_eq!(bench.drivers[2].used().len(), 2);
}

#[test]
fn a_snapshot_keeps_the_pairs_in_use_and_the_restored_card_starts_with_them() {
    use crate::snapshot::state::DeviceState;
    let mut bench = MqBench::new(2, MQ_LINUX, 5);
    assert!(matches!(Device::save_state(&bench.net), DeviceState::Net { active_pairs: 1, .. }));
    let answer_at = bench.command(&set_pairs(2), 1);
    assert_eq!(bench.answer(answer_at), VIRTIO_NET_OK as u8);
    let saved = Device::save_state(&bench.net);
    assert!(matches!(saved, DeviceState::Net { active_pairs: 2, .. }), "saved {saved:?}");
    // The restoring process's card: both pairs in use from its activation on, and the
    // config space still says two.
    let (mut restored, hosts) = card(2);
    Device::restore_state(&mut restored, &saved).expect("restored");
    let mut max_pairs = [0u8; 2];
    restored.read_config(8, &mut max_pairs);
    assert_eq!(u16::from_le_bytes(max_pairs), 2);
    let bench = MqBench::with_card((restored, hosts), MQ_LINUX, 5);
    let watched: Vec<bool> = bench.workers.iter().map(|worker| worker.tap_polled).collect();
    assert_eq!(watched, [true, true]);
    // Hostile or mismatched: no pair, or more pairs than this card has.
    let DeviceState::Net { mac, .. } = saved else { unreachable!("matched above") };
    for active_pairs in [0, 3] {
        let (mut other, _hosts) = card(2);
        assert!(Device::restore_state(&mut other, &DeviceState::Net { mac, active_pairs }).is_err(), "{active_pairs} pairs in use");
    }
}
