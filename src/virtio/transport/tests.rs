//! The transport's tests: a driver's path through the registers, and hostile writes.

use super::*;
use crate::virtio::rng::Rng;
use virtio_queue::mock::MockSplitQueue;

pub(super) const ACKNOWLEDGE_DRIVER: u8 = 1 | 2;

pub(super) fn memory() -> GuestMemoryMmap {
    crate::memory::from_ranges(&[(GuestAddress(0), 0x20_0000)], crate::memory::Tracking::Off).expect("memory")
}

pub(super) fn rng_device(mem: &GuestMemoryMmap) -> VirtioPci {
    VirtioPci::new("rng".into(), Box::new(Rng::new()), mem.clone(), 0xc000_0000, Arc::new(MsiRoutes::detached()))
        .expect("device")
}

pub(super) fn write(dev: &mut VirtioPci, offset: u64, value: u64, len: usize) {
    dev.write(offset, &value.to_le_bytes()[..len]);
}

fn read(dev: &mut VirtioPci, offset: u64, len: usize) -> u64 {
    let mut bytes = [0u8; 8];
    dev.read(offset, &mut bytes[..len]);
    u64::from_le_bytes(bytes)
}

fn status(dev: &mut VirtioPci) -> u8 {
    read(dev, 0x14, 1) as u8
}

pub(super) fn negotiate(dev: &mut VirtioPci, features: u64) {
    write(dev, 0x14, u64::from(ACKNOWLEDGE_DRIVER), 1);
    for select in 0..2 {
        write(dev, 0x08, select, 4);
        write(dev, 0x0c, features >> (32 * select), 4);
    }
    write(dev, 0x14, u64::from(ACKNOWLEDGE_DRIVER | status::FEATURES_OK), 1);
}

/// Points queue 0 at the mock queue's rings, enables it, and says DRIVER_OK.
pub(super) fn start(dev: &mut VirtioPci, vq: &MockSplitQueue<GuestMemoryMmap>) {
    negotiate(dev, feature::VERSION_1);
    write(dev, 0x16, 0, 2);
    write(dev, 0x18, 16, 2);
    write(dev, 0x1a, 0, 2);
    write(dev, 0x20, vq.desc_table_addr().0, 8);
    write(dev, 0x28, vq.avail_addr().0, 4);
    write(dev, 0x30, vq.used_addr().0, 4);
    write(dev, 0x1c, 1, 2);
    write(dev, 0x14, u64::from(ACKNOWLEDGE_DRIVER | status::FEATURES_OK | status::DRIVER_OK), 1);
}

fn config_read(dev: &mut VirtioPci, offset: usize, len: usize) -> u64 {
    let mut bytes = [0u8; 8];
    dev.config_read(offset, &mut bytes[..len]);
    u64::from_le_bytes(bytes)
}

#[test]
fn pci_identity_and_capabilities() {
    let mut dev = rng_device(&memory());
    assert_eq!(config_read(&mut dev, 0, 4), 0x1044_1af4);
    assert_eq!(config_read(&mut dev, 0x10, 4), 0xc000_0000);
    // Walk the capability list: MSI-X, then common, ISR, device and notify.
    let mut at = config_read(&mut dev, 0x34, 1) as usize;
    let mut found = Vec::new();
    while at != 0 {
        let id = config_read(&mut dev, at, 1) as u8;
        let kind = if id == cap::VENDOR { config_read(&mut dev, at + 3, 1) as u8 } else { id };
        found.push((kind, config_read(&mut dev, at + 8, 4)));
        at = config_read(&mut dev, at + 1, 1) as usize;
    }
    assert_eq!(found[1..], [(cap::COMMON, COMMON), (cap::ISR, ISR), (cap::DEVICE, DEVICE), (cap::NOTIFY, NOTIFY)]);
    assert_eq!(found[0].0, cap::MSIX);
}

#[test]
fn features_are_offered_in_two_words_and_checked_at_features_ok() {
    let mut dev = rng_device(&memory());
    write(&mut dev, 0x00, 1, 4);
    assert_eq!(read(&mut dev, 0x04, 4), 1, "VERSION_1 is bit 32");
    negotiate(&mut dev, 1 << 40); // a feature we never offered
    assert_eq!(status(&mut dev) & status::FEATURES_OK, 0);
    write(&mut dev, 0x14, 0, 1);
    negotiate(&mut dev, feature::RING_EVENT_IDX); // legacy-only driver: no VERSION_1
    assert_eq!(status(&mut dev) & status::FEATURES_OK, 0);
    write(&mut dev, 0x14, 0, 1);
    negotiate(&mut dev, feature::VERSION_1 | feature::RING_EVENT_IDX);
    assert_eq!(status(&mut dev) & status::FEATURES_OK, status::FEATURES_OK);
}

#[test]
fn a_started_device_serves_its_queue_and_interrupts() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut dev = rng_device(&mem);
    write(&mut dev, MSIX_TABLE + 12, 0, 4); // unmask vector 0
    dev.config_write(dev.msix_cap + 3, &[0x80]); // MSI-X enable
    start(&mut dev, &vq);
    assert_eq!(status(&mut dev) & status::NEEDS_RESET, 0);
    let desc = virtio_queue::desc::split::Descriptor::new(0x10_0000, 32, virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16, 0);
    vq.add_desc_chains(&[desc.into()], 0).expect("chain");
    write(&mut dev, NOTIFY, 0, 2); // no ioeventfd here: the BAR write kicks by hand
    for _ in 0..1000 {
        if vq.used().idx().load() == 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(vq.used().ring().ref_at(0).expect("used").load().len(), 32);
    write(&mut dev, 0x14, 0, 1); // reset stops the worker
    assert_eq!(status(&mut dev), 0);
}

#[test]
fn a_paused_device_serves_nothing_until_it_resumes() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut dev = rng_device(&mem);
    start(&mut dev, &vq);
    dev.pause();
    let desc = virtio_queue::desc::split::Descriptor::new(0x10_0000, 32, virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16, 0);
    vq.add_desc_chains(&[desc.into()], 0).expect("chain");
    write(&mut dev, NOTIFY, 0, 2);
    // Paused, the device has no worker thread at all: nothing can serve the kick.
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(vq.used().idx().load(), 0, "a paused device served its queue");
    dev.resume();
    crate::virtio::wait_until(|| vq.used().idx().load() == 1);
    assert_eq!(status(&mut dev) & status::NEEDS_RESET, 0);
    write(&mut dev, 0x14, 0, 1); // a reset stops the resumed worker
}

#[test]
fn a_queue_outside_memory_sets_needs_reset_and_reset_clears_it() {
    let mem = memory();
    let mut dev = rng_device(&mem);
    negotiate(&mut dev, feature::VERSION_1);
    write(&mut dev, 0x20, 0x1_0000_0000, 8);
    write(&mut dev, 0x1c, 1, 2);
    write(&mut dev, 0x14, u64::from(ACKNOWLEDGE_DRIVER | status::FEATURES_OK | status::DRIVER_OK), 1);
    assert_eq!(status(&mut dev) & status::NEEDS_RESET, status::NEEDS_RESET);
    write(&mut dev, 0x14, 0, 1);
    assert_eq!(status(&mut dev), 0);
}

#[test]
fn bad_queue_sizes_and_late_writes_are_refused() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut dev = rng_device(&mem);
    negotiate(&mut dev, feature::VERSION_1);
    write(&mut dev, 0x18, 17, 2); // not a power of two
    write(&mut dev, 0x20, vq.desc_table_addr().0, 8);
    write(&mut dev, 0x28, vq.avail_addr().0, 8);
    write(&mut dev, 0x30, vq.used_addr().0, 8);
    write(&mut dev, 0x1c, 1, 2);
    write(&mut dev, 0x18, 16, 2); // too late: the queue is enabled
    assert_eq!(read(&mut dev, 0x18, 2), 17);
    write(&mut dev, 0x14, u64::from(ACKNOWLEDGE_DRIVER | status::FEATURES_OK | status::DRIVER_OK), 1);
    assert_eq!(status(&mut dev) & status::NEEDS_RESET, status::NEEDS_RESET);
}

#[test]
fn driver_ok_without_features_ok_is_refused() {
    let mut dev = rng_device(&memory());
    write(&mut dev, 0x14, u64::from(ACKNOWLEDGE_DRIVER | status::DRIVER_OK), 1);
    assert_eq!(status(&mut dev), ACKNOWLEDGE_DRIVER);
}

#[test]
fn vectors_that_do_not_exist_read_back_as_no_vector() {
    let mut dev = rng_device(&memory());
    write(&mut dev, 0x10, 7, 2);
    assert_eq!(read(&mut dev, 0x10, 2), u64::from(NO_VECTOR));
    write(&mut dev, 0x1a, 1, 2);
    assert_eq!(read(&mut dev, 0x1a, 2), 1);
    write(&mut dev, 0x16, 9, 2); // a queue that doesn't exist
    write(&mut dev, 0x18, 4, 2);
    assert_eq!(read(&mut dev, 0x18, 2), 0);
}

/// A device that only counts its resets.
struct Counted(Arc<std::sync::atomic::AtomicUsize>);

impl VirtioDevice for Counted {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[8]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, _: u64, _: &mut [u8]) {}
    fn activate(&mut self, _: Activation) -> Result<(), super::super::ActivateError> {
        Ok(())
    }
    fn reset(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn dropping_the_transport_resets_its_device() {
    let resets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let device = Box::new(Counted(resets.clone()));
    let dev = VirtioPci::new("counted".into(), device, memory(), 0xc000_0000, Arc::new(MsiRoutes::detached()))
        .expect("device");
    assert_eq!(resets.load(Ordering::SeqCst), 0);
    drop(dev);
    assert_eq!(resets.load(Ordering::SeqCst), 1);
}

#[test]
fn a_backend_change_is_refused_by_a_device_without_one_and_sets_the_config_bit_when_taken() {
    let mem = memory();
    let mut dev = rng_device(&mem);
    let update = || BackendUpdate::Medium(crate::config::DiskConfig::new("/nowhere"));
    assert!(matches!(dev.update_backend(update()), Err(UpdateError::Unsupported(_))));
    let image = tempfile::NamedTempFile::new().expect("image");
    image.as_file().set_len(1 << 20).expect("size");
    let block = crate::virtio::block::Block::new(&crate::config::DiskConfig::new(image.path())).expect("disk");
    let mut disk = VirtioPci::new("disk".into(), Box::new(block), mem.clone(), 0xc000_0000, Arc::new(MsiRoutes::detached()))
        .expect("device");
    let vq = MockSplitQueue::new(&mem, 16);
    negotiate(&mut disk, feature::VERSION_1);
    start(&mut disk, &vq);
    let other = tempfile::NamedTempFile::new().expect("image");
    other.as_file().set_len(2 << 20).expect("size");
    let handle = DriveHandle::new(Arc::new(std::sync::Mutex::new(disk)));
    handle.change_medium(other.path().to_path_buf()).expect("a new medium");
    let mut dev = crate::bus::lock(&handle.0);
    assert_eq!(read(&mut dev, ISR, 1) & u64::from(super::super::ISR_CONFIG), u64::from(super::super::ISR_CONFIG));
    assert_eq!(read(&mut dev, DEVICE, 8), 4096, "the new capacity in sectors");
}

#[test]
fn every_offset_and_width_is_survivable() {
    let mut dev = rng_device(&memory());
    for offset in (0..BAR_SIZE + 16).step_by(3) {
        for len in [1, 2, 4, 8] {
            let mut data = [0xa5u8; 8];
            dev.read(offset, &mut data[..len]);
            dev.write(offset, &data[..len]);
        }
    }
    for offset in 0..260 {
        let mut data = [0x5au8; 4];
        dev.config_read(offset, &mut data);
        dev.config_write(offset, &data);
    }
}
