//! The device around the queue: opening and locking images, the config space, activation and
//! reset on the real worker, the rate limiter, and a new medium in a running drive.

use super::*;

#[test]
fn a_writable_image_is_locked_against_a_second_vmm() {
    let file = image();
    let first = Block::new(&config(&file, false)).expect("first open");
    for readonly in [false, true] {
        match Block::new(&config(&file, readonly)) {
            Err(e @ Error::Disk { .. }) => assert!(e.to_string().contains("in use by another VMM"), "{e}"),
            other => panic!("a second open (readonly: {readonly}) should fail, got {:?}", other.map(|_| ())),
        }
    }
    drop(first);
    Block::new(&config(&file, false)).expect("free again once the first is gone");
}

#[test]
fn read_only_images_can_be_shared_but_not_written_meanwhile() {
    let file = image();
    let first = Block::new(&config(&file, true)).expect("first reader");
    let second = Block::new(&config(&file, true)).expect("second reader");
    assert!(matches!(Block::new(&config(&file, false)), Err(Error::Disk { .. })));
    drop((first, second));
    Block::new(&config(&file, false)).expect("writable once the readers are gone");
}

#[test]
fn images_that_cannot_be_disks_are_refused_with_a_reason() {
    let why = |path: &std::path::Path, readonly: bool| match Block::new(&DiskConfig { readonly, ..DiskConfig::new(path) }) {
        Err(Error::Disk { why, .. }) => why,
        Err(other) => panic!("not a disk error: {other}"),
        Ok(_) => panic!("{} should be refused", path.display()),
    };
    let dir = tempfile::tempdir().expect("temp dir");
    assert!(why(&dir.path().join("missing.img"), false).contains("no such file"));
    assert!(why(dir.path(), false).contains("directory"));
    assert!(why(dir.path(), true).contains("directory"));
    assert!(why(image_with(&[]).path(), false).contains("0 bytes"));
    assert!(why(image_with(&[1; 100]).path(), true).contains("100 bytes"));
    assert!(why(std::path::Path::new("/dev/null"), true).contains("neither a regular file nor a block device"));

    let locked_out = image();
    std::fs::set_permissions(locked_out.path(), std::os::unix::fs::PermissionsExt::from_mode(0o444)).expect("chmod");
    // Root opens it anyway; only an ordinary user can see the message.
    if std::fs::OpenOptions::new().write(true).open(locked_out.path()).is_err() {
        assert!(why(locked_out.path(), false).contains(",readonly"));
    }
}

#[test]
fn a_size_that_is_not_whole_sectors_is_rounded_down() {
    let file = image_with(&pattern(3 * 512 + 100));
    let block = Block::new(&config(&file, false)).expect("disk");
    assert_eq!(block.sectors(), 3);
    let mut bench = Bench::new(lock(&block.medium).clone());
    assert_eq!(bench.read(3, 1).0, S_IOERR, "the partial sector is not part of the disk");
}

#[test]
fn config_space_follows_the_spec() {
    let file = image();
    let block = Block::new(&config(&file, false)).expect("disk");
    let read = |offset: u64, len: usize| {
        let mut data = vec![0xaa; len];
        block.read_config(offset, &mut data);
        data
    };
    assert_eq!(read(0, 8), SECTORS.to_le_bytes());
    assert_eq!(read(12, 4), SEG_MAX.to_le_bytes());
    assert_eq!(read(20, 4), 512u32.to_le_bytes());
    if lock(&block.medium).can_punch_holes {
        assert_eq!(read(36, 4), MAX_DISCARD_SECTORS.to_le_bytes());
        assert_eq!(read(40, 4), MAX_DISCARD_SEGMENTS.to_le_bytes());
        assert_eq!(read(56, 1), [1]);
    }
    assert_eq!(read(CONFIG_LEN as u64 - 2, 4), [0; 4], "past the end reads as zero");
    assert_eq!(read(u64::MAX, 4), [0; 4]);
    assert_eq!(block.device_type(), device_type::BLOCK);
    assert_eq!(block.queue_max_sizes(), [QUEUE_SIZE]);
    let offered = block.features();
    assert_eq!(offered & bit(VIRTIO_BLK_F_RO), 0);
    for wanted in [VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE] {
        assert_ne!(offered & bit(wanted), 0, "feature {wanted}");
    }
}

fn activate_reset_and_activate_again() {
    let file = image();
    let mut block = Block::new(&config(&file, false)).expect("disk");
    for round in 0..2u8 {
        let (mut driver, queue) = Driver::new();
        let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let signals = Signals::standalone(1);
        block.activate(activation(&driver, queue, kick.try_clone().expect("kick"), &signals)).expect("activate");
        let addrs = driver.submit(&[Part::Out(header(VIRTIO_BLK_T_OUT, u64::from(round))), Part::Out(vec![round + 1; 512]), Part::In(1)]);
        kick.write(1).expect("kick");
        // The interrupt follows the used entry once the worker sees the guest has gone quiet.
        let interrupts = std::cell::Cell::new(0);
        wait_until(|| {
            interrupts.set(interrupts.get() + signals.take_queue_interrupts(0));
            interrupts.get() > 0
        });
        assert_eq!((driver.used_idx(), driver.byte(addrs[2])), (1, S_OK));
        block.reset();
        assert_eq!(interrupts.get() + signals.take_queue_interrupts(0), 1);
        block.reset();
        block.reset();
        assert!(!signals.is_broken());
    }
    let bytes = file_bytes(&file);
    assert_eq!((bytes[0], bytes[512]), (1, 2), "both activations wrote");
}

#[test]
fn activation_without_the_request_queue_fails() {
    let file = image();
    let mut block = Block::new(&config(&file, false)).expect("disk");
    let (driver, _) = Driver::new();
    let activation = Activation { mem: driver.mem.clone(), queues: vec![None], features: 0, signals: Signals::standalone(1) };
    assert!(block.activate(activation).is_err());
}

fn the_rate_limiter_holds_requests_back_in_the_ring_until_its_timer_fires() {
    use crate::virtio::worker::DeviceWorker;
    use vmm_sys_util::epoll::{Epoll, EventSet};
    let file = image();
    // Two operations, then one more every 20 ms.
    let ops = BucketConfig::new(2, 0, 40).expect("valid");
    let limiter = SharedLimiter::new(RateLimit { bandwidth: None, ops: Some(ops) }).expect("timerfd");
    let limiter = DiskHandle { limiter, ..DiskHandle::default() };
    let mut bench = Bench::limited(disk(&file, false), false, limiter);
    for sector in 0..5 {
        bench.driver.submit(&[Part::Out(header(VIRTIO_BLK_T_IN, sector)), Part::In(512), Part::In(1)]);
    }
    bench.serve();
    assert_eq!(bench.driver.used_idx(), 2, "two requests within the budget, three held back");
    bench.serve();
    assert_eq!(bench.driver.used_idx(), 2, "a kick while throttled serves nothing");
    // The worker's epoll wakes on the timer; then the queue is served again.
    let epoll = Epoll::new().expect("epoll");
    bench.queue.register(&epoll).expect("register");
    let mut served = 2;
    while served < 5 {
        let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 2];
        let ready = epoll.wait(5000, &mut events).expect("wait");
        assert!(ready > 0, "the rate limiter's timer never fired");
        for event in &events[..ready] {
            bench.queue.handle(&epoll, event.data(), EventSet::IN).expect("served");
        }
        served = bench.driver.used_idx();
    }
    for i in 0..5 {
        assert_eq!(bench.driver.used_entry(i).1, 513, "every read completed in full");
    }
}

fn a_new_medium_in_a_running_drive_is_read_from_the_next_request_on() {
    let first = image();
    let second = image_with(&vec![0x5a; 32 * 512]);
    let mut block = Block::new(&DiskConfig { id: Some("swap".into()), ..config(&first, true) }).expect("block");
    let mut bench = Bench::on_medium(Arc::clone(&block.medium), false, block.handle());
    let (status, _, data) = bench.read(0, 1);
    assert_eq!((status, data), (S_OK, pattern(512)));

    let missing = DiskConfig::new("/no/such/image");
    assert!(block.update_backend(BackendUpdate::Medium(missing)).is_err(), "a missing image is refused");
    assert_eq!(bench.read(0, 1).2, pattern(512), "and the old one stays");

    block.update_backend(BackendUpdate::Medium(DiskConfig::new(second.path()))).expect("swap");
    let mut capacity = [0u8; 8];
    block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 32, "the config space has the new size");
    let (status, _, data) = bench.read(20, 1);
    assert_eq!((status, data), (S_OK, vec![0x5a; 512]), "the new image, past the old one's end");
    assert_eq!(bench.write(0, vec![1; 512]).0, S_IOERR, "still read-only, as the drive was opened");
    assert_eq!(&lock(&block.medium).id[..4], b"swap", "and still the same serial");
}

// Every test here that serves requests runs on both engines.
on_both_engines!(
    activate_reset_and_activate_again,
    the_rate_limiter_holds_requests_back_in_the_ring_until_its_timer_fires,
    a_new_medium_in_a_running_drive_is_read_from_the_next_request_on,
);
