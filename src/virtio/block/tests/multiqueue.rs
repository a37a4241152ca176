//! A disk with several request queues (VIRTIO_BLK_F_MQ): how many it offers, each queue served
//! by its own worker and interrupting through its own vector, a hostile queue breaking the
//! device without its sibling's requests going astray, and the rate limiter's timer reaching
//! every worker.

use super::*;
use crate::config::MAX_DISK_QUEUES;
use crate::virtio::worker::DeviceWorker;

/// Where the second queue's rings and buffers go, clear of the first's.
const SECOND_RINGS: u64 = 0x8_0000;
const SECOND_BUFFERS: u64 = 0x28_0000;

fn num_queues(block: &Block) -> u16 {
    let mut bytes = [0u8; 2];
    block.read_config(std::mem::offset_of!(virtio_blk_config, num_queues) as u64, &mut bytes);
    u16::from_le_bytes(bytes)
}

fn multiqueue(block: &Block) -> bool {
    block.features() & bit(VIRTIO_BLK_F_MQ) != 0
}

#[test]
fn a_disk_has_as_many_queues_as_asked_and_offers_multiqueue_with_more_than_one() {
    let file = image();
    for queues in [1, 2, 3, MAX_DISK_QUEUES] {
        let block = Block::new(&DiskConfig { queues, ..config(&file, true) }).expect("disk");
        assert_eq!(block.queue_max_sizes(), vec![QUEUE_SIZE; usize::from(queues)], "queues={queues}");
        assert_eq!(num_queues(&block), queues, "the config space's num_queues");
        assert_eq!(multiqueue(&block), queues > 1, "VIRTIO_BLK_F_MQ is offered with more than one queue");
    }
    assert_eq!(config(&file, true).queues, 1, "one unless asked");
}

/// A two-queue disk's activation: both queues enabled (or only the first, as a driver that
/// did not accept VIRTIO_BLK_F_MQ leaves them), with their kicks.
struct TwoQueues {
    drivers: Vec<Driver>,
    kicks: Vec<EventFd>,
    activation: Activation,
    signals: Signals,
}

fn two_queues(enable_second: bool) -> TwoQueues {
    let (first, queue0) = Driver::new();
    let (second, queue1) = first.beside(SECOND_RINGS, SECOND_BUFFERS);
    let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")).collect();
    let active = |queue, kick: &EventFd| Some(ActiveQueue { queue, kick: kick.try_clone().expect("kick") });
    let queues = vec![active(queue0, &kicks[0]), if enable_second { active(queue1, &kicks[1]) } else { None }];
    let signals = Signals::standalone(2);
    let features = bit(VIRTIO_BLK_F_FLUSH) | bit(VIRTIO_BLK_F_MQ) | feature::VERSION_1;
    let activation = Activation { mem: first.mem.clone(), queues, features, signals: signals.clone() };
    TwoQueues { drivers: vec![first, second], kicks, activation, signals }
}

fn two_queue_disk(file: &tempfile::NamedTempFile) -> Block {
    Block::new(&DiskConfig { queues: 2, ..config(file, false) }).expect("disk")
}

fn writes_on_both_queues_reach_the_file_each_interrupting_through_its_own_vector() {
    let file = image();
    let mut block = two_queue_disk(&file);
    let TwoQueues { mut drivers, kicks, activation, signals } = two_queues(true);
    block.activate(activation).expect("activate");
    let mut statuses = Vec::new();
    for (index, driver) in drivers.iter_mut().enumerate() {
        let sector = index as u64;
        let parts = [Part::Out(header(VIRTIO_BLK_T_OUT, sector)), Part::Out(vec![0xa0 + index as u8; 512]), Part::In(1)];
        statuses.push(driver.submit(&parts)[2]);
    }
    kicks.iter().for_each(|kick| kick.write(1).expect("kick"));
    let interrupts = [std::cell::Cell::new(0), std::cell::Cell::new(0)];
    wait_until(|| {
        for (index, seen) in interrupts.iter().enumerate() {
            seen.set(seen.get() + signals.take_queue_interrupts(index));
        }
        interrupts.iter().all(|seen| seen.get() > 0)
    });
    block.reset();
    for (index, driver) in drivers.iter().enumerate() {
        assert_eq!((driver.used_idx(), driver.byte(statuses[index])), (1, S_OK), "queue {index}'s request");
    }
    let bytes = file_bytes(&file);
    assert_eq!((bytes[0], bytes[512]), (0xa0, 0xa1), "both queues' writes are in the image");
    assert!(!signals.is_broken());
}

fn a_driver_without_multiqueue_is_served_on_the_first_queue_alone() {
    let file = image();
    let block = two_queue_disk(&file);
    let TwoQueues { mut drivers, activation, .. } = two_queues(false);
    let mut handlers = block.handlers(activation).expect("activate");
    assert_eq!(handlers.len(), 1, "one worker for the one queue the driver enabled");
    let status = drivers[0].submit(&[Part::Out(header(VIRTIO_BLK_T_IN, 0)), Part::In(512), Part::In(1)])[2];
    handlers[0].serve().expect("served");
    assert_eq!(drivers[0].byte(status), S_OK);
}

fn a_broken_second_queue_breaks_the_device_and_the_first_still_fails_bad_requests_alone() {
    let file = image();
    let block = two_queue_disk(&file);
    let TwoQueues { mut drivers, activation, .. } = two_queues(true);
    let mut handlers = block.handlers(activation).expect("activate");
    assert_eq!(handlers.len(), 2);
    // Queue 1: an available index a whole ring ahead of the device.
    drivers[1].set_avail_idx(QUEUE_SIZE + 1);
    assert!(handlers[1].serve().is_err(), "an unwalkable ring breaks its queue");
    // Queue 0: a request past the disk's end fails alone; the next one is served.
    let past_end = drivers[0].submit(&[Part::Out(header(VIRTIO_BLK_T_IN, SECTORS)), Part::In(512), Part::In(1)])[2];
    let good = drivers[0].submit(&[Part::Out(header(VIRTIO_BLK_T_IN, 0)), Part::In(512), Part::In(1)])[2];
    handlers[0].serve().expect("the first queue stays usable");
    assert_eq!((drivers[0].byte(past_end), drivers[0].byte(good)), (S_IOERR, S_OK));
}

fn the_first_queues_worker_watches_the_rate_limiters_timer_and_wakes_the_other_queues() {
    let file = image();
    let ops = BucketConfig::new(1, 0, 10).expect("valid");
    let config = DiskConfig { queues: 2, rate_limit: RateLimit { bandwidth: None, ops: Some(ops) }, ..config(&file, false) };
    let block = Block::new(&config).expect("disk");
    let TwoQueues { mut drivers, kicks, activation, .. } = two_queues(true);
    let mut handlers = block.handlers(activation).expect("activate");
    for driver in &mut drivers {
        driver.submit(&[Part::Out(header(VIRTIO_BLK_T_IN, 0)), Part::In(512), Part::In(1)]);
    }
    handlers[0].serve().expect("served");
    handlers[1].serve().expect("served");
    assert_eq!((drivers[0].used_idx(), drivers[1].used_idx()), (1, 0), "one operation in the budget: queue 1's waits");
    // The timer fires; queue 0's worker is the one that watches it.
    let second = vmm_sys_util::epoll::Epoll::new().expect("epoll");
    handlers[1].register(&second).expect("register");
    let epoll = vmm_sys_util::epoll::Epoll::new().expect("epoll");
    handlers[0].register(&epoll).expect("register");
    let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 4];
    let timer = loop {
        let ready = epoll.wait(5000, &mut events).expect("wait");
        assert!(ready > 0, "the rate limiter's timer never fired");
        if let Some(event) = events[..ready].iter().find(|event| event.data() == RATE_LIMIT_TIMER) {
            break *event;
        }
    };
    assert_eq!(second.wait(0, &mut events).expect("wait"), 0, "queue 1's worker does not watch the timer");
    handlers[0].handle(&epoll, timer.data(), vmm_sys_util::epoll::EventSet::IN).expect("served");
    assert_eq!(kicks[1].read().ok(), Some(1), "queue 1's worker is kicked to look again");
    handlers[1].handle(&epoll, 1, vmm_sys_util::epoll::EventSet::IN).expect("served");
    assert_eq!(drivers[1].used_idx(), 1, "and serves the request the limit held back");
}

on_both_engines!(
    writes_on_both_queues_reach_the_file_each_interrupting_through_its_own_vector,
    a_driver_without_multiqueue_is_served_on_the_first_queue_alone,
    a_broken_second_queue_breaks_the_device_and_the_first_still_fails_bad_requests_alone,
    the_first_queues_worker_watches_the_rate_limiters_timer_and_wakes_the_other_queues,
);
