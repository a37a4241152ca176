//! A virtio-pci function's part of a snapshot: its configuration space, MSI-X table and
//! common-configuration registers, and its device's own [`DeviceState`].
//!
//! Restoring goes through the guest's own paths where there is one (configuration space and
//! MSI-X table writes are replayed, so only what the guest could have written changes, and the
//! interrupt routes follow), and checks the rest as a driver's writes are checked: queue sizes,
//! vectors, and rings inside guest memory. A driver that had said DRIVER_OK gets its device
//! started again, each queue taken up at the index it was at.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress};

use super::{status, VirtioPci, BAR_SIZE};
use crate::pci::config::CONFIG_SIZE;
use crate::pci::msix::NO_VECTOR;
use crate::pci::PciDevice;
use crate::snapshot::state::{QueueState, TransportState, VirtioState};
use crate::bus::BusDevice;

/// The offset of the MSI-X table in the BAR, and the size of one of its entries.
const MSIX_TABLE: u64 = super::MSIX_TABLE;
const MSIX_ENTRY: u64 = 16;

impl VirtioPci {
    /// Everything of this function a snapshot keeps. The device must be paused: its queues'
    /// positions are read from the used rings in guest memory.
    pub fn save_state(&self) -> VirtioState {
        let mut pci_config = vec![0u8; CONFIG_SIZE];
        self.config.read(0, &mut pci_config);
        VirtioState {
            device_type: self.device.device_type(),
            pci_config,
            msix: self.msix.entries().to_vec(),
            transport: self.transport_state(),
            device: self.device.save_state(),
        }
    }

    fn transport_state(&self) -> TransportState {
        let queues = self.queues.iter().map(|q| QueueState {
            size: q.size,
            vector: q.vector,
            enabled: q.enabled,
            desc: q.desc,
            driver: q.driver,
            device: q.device,
            // The used ring's `idx` follows its 2-byte flags.
            next_used: if q.enabled { self.mem.read_obj(GuestAddress(q.device.wrapping_add(2))).unwrap_or(0) } else { 0 },
        });
        TransportState {
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            config_vector: self.config_vector,
            queue_select: self.queue_select,
            isr: self.isr.load(Ordering::SeqCst),
            broken: self.broken.load(Ordering::SeqCst),
            queues: queues.collect(),
        }
    }

    /// Puts a saved function back into this freshly made one, or says why it doesn't fit.
    pub fn restore_state(&mut self, saved: &VirtioState) -> Result<(), String> {
        if saved.device_type != self.device.device_type() {
            return Err(format!("it is device type {} in the snapshot, {} here", saved.device_type, self.device.device_type()));
        }
        self.restore_config_space(&saved.pci_config)?;
        self.restore_msix(&saved.msix)?;
        self.device.restore_state(&saved.device).map_err(|e| e.to_string())?;
        self.restore_transport(&saved.transport)?;
        let running = self.status & status::DRIVER_OK != 0 && !saved.transport.broken;
        if running {
            self.start_device()?;
        }
        Ok(())
    }

    /// Replays the saved bytes as the guest's writes, a dword at a time.
    fn restore_config_space(&mut self, bytes: &[u8]) -> Result<(), String> {
        if bytes.len() != CONFIG_SIZE {
            return Err(format!("its configuration space is {} bytes, not {CONFIG_SIZE}", bytes.len()));
        }
        for (offset, dword) in bytes.chunks_exact(4).enumerate() {
            self.config_write(offset * 4, dword);
        }
        Ok(())
    }

    /// Replays the saved MSI-X entries as the guest's writes (the vector control word last, so
    /// that an unmasked vector's route is set first).
    fn restore_msix(&mut self, entries: &[[u32; 4]]) -> Result<(), String> {
        let vectors = self.msix.vectors().len();
        if entries.len() != vectors {
            return Err(format!("it has {} MSI-X vectors in the snapshot, {vectors} here", entries.len()));
        }
        for (index, entry) in entries.iter().enumerate() {
            for (word, value) in entry.iter().enumerate() {
                let offset = MSIX_TABLE + index as u64 * MSIX_ENTRY + word as u64 * 4;
                debug_assert!(offset < BAR_SIZE);
                self.write(offset, &value.to_le_bytes());
            }
        }
        Ok(())
    }

    fn restore_transport(&mut self, saved: &TransportState) -> Result<(), String> {
        if saved.queues.len() != self.queues.len() {
            return Err(format!("it has {} queues in the snapshot, {} here", saved.queues.len(), self.queues.len()));
        }
        let vectors = self.msix.vectors().len();
        let check_vector = |vector: u16| match vector == NO_VECTOR || usize::from(vector) < vectors {
            true => Ok(vector),
            false => Err(format!("MSI-X vector {vector} does not exist")),
        };
        for (index, (regs, queue)) in self.queues.iter_mut().zip(&saved.queues).enumerate() {
            if queue.size == 0 || queue.size > regs.max_size || !queue.size.is_power_of_two() {
                return Err(format!("queue {index} has size {}, which this device can't have", queue.size));
            }
            regs.size = queue.size;
            regs.vector = check_vector(queue.vector)?;
            regs.enabled = queue.enabled;
            (regs.desc, regs.driver, regs.device) = (queue.desc, queue.driver, queue.device);
            regs.resume_at = queue.next_used;
        }
        self.device_feature_select = saved.device_feature_select;
        self.driver_feature_select = saved.driver_feature_select;
        self.driver_features = saved.driver_features;
        if saved.status & status::FEATURES_OK != 0 && !self.features_acceptable() {
            return Err(format!("its driver accepted features {:#x}, which this device does not offer", saved.driver_features));
        }
        self.status = saved.status & !status::NEEDS_RESET;
        self.config_vector = check_vector(saved.config_vector)?;
        self.queue_select = saved.queue_select;
        self.isr.store(saved.isr, Ordering::SeqCst);
        self.broken.store(saved.broken, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use crate::memory::GuestMemoryMmap;

    use std::sync::Arc;

    use super::super::tests::{memory, negotiate, rng_device, start, write, ACKNOWLEDGE_DRIVER};
    use super::super::MsiRoutes;
    use super::*;
    use crate::virtio::feature;
    use crate::virtio::rng::Rng;
    use crate::virtio::{wait_until, DeviceState, VirtioDevice};

    /// The driver's path to DRIVER_OK with queue 0 on `vq`, MSI-X on and vector 0 unmasked.
    fn drive(dev: &mut VirtioPci, vq: &MockSplitQueue<GuestMemoryMmap>) {
        write(dev, MSIX_TABLE + 12, 0, 4);
        dev.config_write(dev.msix_cap + 3, &[0x80]);
        start(dev, vq);
    }

    /// Offers one 32-byte buffer as descriptor `index` and waits until the device used it.
    fn request(dev: &mut VirtioPci, vq: &MockSplitQueue<GuestMemoryMmap>, index: u16) {
        let flags = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        let desc = Descriptor::new(0x10_0000 + u64::from(index) * 64, 32, flags, 0);
        vq.add_desc_chains(&[desc.into()], index).expect("chain");
        write(dev, NOTIFY_AT, 0, 2);
        wait_until(|| vq.used().idx().load() == index + 1);
    }

    const NOTIFY_AT: u64 = super::super::NOTIFY;

    #[test]
    fn a_restored_function_goes_on_serving_its_queue_where_it_stopped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut dev = rng_device(&mem);
        drive(&mut dev, &vq);
        request(&mut dev, &vq, 0);
        dev.pause();
        let saved = dev.save_state();
        assert_eq!(saved.transport.queues[0].next_used, 1);
        drop(dev);

        let mut back = rng_device(&mem);
        back.restore_state(&saved).expect("restored");
        assert_eq!(back.save_state(), saved, "everything saved comes back");
        request(&mut back, &vq, 1);
        assert_eq!(back.status & status::NEEDS_RESET, 0);
    }

    #[test]
    fn a_saved_function_that_does_not_fit_is_refused() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut dev = rng_device(&mem);
        drive(&mut dev, &vq);
        dev.pause();
        let saved = dev.save_state();
        let refused = |change: &dyn Fn(&mut VirtioState)| {
            let mut state = saved.clone();
            change(&mut state);
            rng_device(&mem).restore_state(&state).is_err()
        };
        assert!(refused(&|s| s.device_type = 2), "a disk's state for an entropy source");
        assert!(refused(&|s| s.pci_config.truncate(100)));
        assert!(refused(&|s| s.msix.push([0; 4])));
        assert!(refused(&|s| s.transport.queues.push(QueueState::default())));
        assert!(refused(&|s| s.transport.queues[0].size = 3), "not a power of two");
        assert!(refused(&|s| s.transport.queues[0].size = 4096), "larger than the queue may be");
        assert!(refused(&|s| s.transport.queues[0].vector = 9), "a vector that does not exist");
        assert!(refused(&|s| s.transport.config_vector = 77));
        assert!(refused(&|s| s.transport.queues[0].desc = 0x1_0000_0000), "a ring outside guest memory");
        assert!(refused(&|s| s.transport.queues[0].device = u64::MAX - 1), "a ring that wraps");
        assert!(refused(&|s| s.transport.driver_features = 1 << 50), "a feature never offered");
        assert!(refused(&|s| s.device = DeviceState::Vsock { cid: 3 }));
        assert!(!refused(&|_| ()), "the state as saved fits");
    }

    /// A disk with `queues` request queues on PCI, over a 1 MiB image.
    fn disk_device(mem: &GuestMemoryMmap, image: &tempfile::NamedTempFile, queues: u16) -> VirtioPci {
        let config = crate::config::DiskConfig { queues, ..crate::config::DiskConfig::new(image.path()) };
        let disk = crate::virtio::block::Block::new(&config).expect("disk");
        VirtioPci::new("disk".into(), Box::new(disk), mem.clone(), 0xc000_0000, Arc::new(MsiRoutes::detached())).expect("device")
    }

    /// The driver's path to DRIVER_OK with a disk's queue `i` on `vqs[i]`, multiqueue accepted.
    fn start_disk(dev: &mut VirtioPci, vqs: &[MockSplitQueue<GuestMemoryMmap>]) {
        let mq = 1 << virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_F_MQ;
        negotiate(dev, feature::VERSION_1 | mq);
        for (index, vq) in vqs.iter().enumerate() {
            write(dev, 0x16, index as u64, 2);
            write(dev, 0x18, 16, 2);
            write(dev, 0x20, vq.desc_table_addr().0, 8);
            write(dev, 0x28, vq.avail_addr().0, 8);
            write(dev, 0x30, vq.used_addr().0, 8);
            write(dev, 0x1c, 1, 2);
        }
        let ready = ACKNOWLEDGE_DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        write(dev, 0x14, u64::from(ready), 1);
    }

    /// Reads sector 0 on queue `index` as the chain at descriptor `at` and waits until the
    /// device used it.
    fn read_on(dev: &mut VirtioPci, vqs: &[MockSplitQueue<GuestMemoryMmap>], index: usize, at: u16) {
        let written = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        let next = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        let base = 0x10_0000 + index as u64 * 0x4000 + u64::from(at) * 0x400;
        let chain = [
            Descriptor::new(base, 16, next, at + 1),
            Descriptor::new(base + 0x100, 512, written | next, at + 2),
            Descriptor::new(base + 0x300, 1, written, 0),
        ];
        let before = vqs[index].used().idx().load();
        vqs[index].add_desc_chains(&chain.map(Into::into), at).expect("chain");
        write(dev, NOTIFY_AT + index as u64 * 4, index as u64, 2);
        wait_until(|| vqs[index].used().idx().load() == before + 1);
    }

    #[test]
    fn a_multiqueue_disk_saves_every_queue_and_goes_on_serving_each_where_it_stopped() {
        let mem = memory();
        let image = tempfile::NamedTempFile::new().expect("image");
        image.as_file().set_len(1 << 20).expect("size");
        let vqs = [MockSplitQueue::new(&mem, 16), MockSplitQueue::create(&mem, vm_memory::GuestAddress(0x8000), 16)];
        let mut dev = disk_device(&mem, &image, 2);
        start_disk(&mut dev, &vqs);
        read_on(&mut dev, &vqs, 0, 0);
        read_on(&mut dev, &vqs, 1, 0);
        read_on(&mut dev, &vqs, 1, 3);
        dev.pause();
        let saved = dev.save_state();
        let positions: Vec<u16> = saved.transport.queues.iter().map(|queue| queue.next_used).collect();
        assert_eq!(positions, [1, 2], "each queue's own position");
        drop(dev);

        assert!(disk_device(&mem, &image, 1).restore_state(&saved).is_err(), "a disk with one queue refuses two");
        let mut back = disk_device(&mem, &image, 2);
        back.restore_state(&saved).expect("restored");
        assert_eq!(back.save_state(), saved, "everything saved comes back");
        read_on(&mut back, &vqs, 0, 3);
        read_on(&mut back, &vqs, 1, 6);
        assert_eq!(back.status & status::NEEDS_RESET, 0);
    }

    #[test]
    fn devices_check_and_keep_their_own_state() {
        use crate::config::DiskConfig;
        use crate::virtio::block::Block;
        let image = tempfile::NamedTempFile::new().expect("image");
        image.as_file().set_len(1 << 20).expect("size");
        let mut disk = Block::new(&DiskConfig::new(image.path())).expect("disk");
        let saved = VirtioDevice::save_state(&disk);
        assert_eq!(saved, DeviceState::Block { sectors: 2048 });
        assert!(VirtioDevice::restore_state(&mut disk, &saved).is_ok());
        let grown = DeviceState::Block { sectors: 4096 };
        assert!(VirtioDevice::restore_state(&mut disk, &grown).is_err(), "an image whose size changed");
        assert!(VirtioDevice::restore_state(&mut disk, &DeviceState::None).is_err(), "another device's state");

        let (tap, _host) = crate::virtio::net::tap::Tap::socket_pair().expect("socketpair");
        let mut card = crate::virtio::net::Net::with_tap(tap, None);
        let mac = [6, 1, 2, 3, 4, 5];
        VirtioDevice::restore_state(&mut card, &DeviceState::Net { mac, active_pairs: 1 }).expect("restored");
        assert_eq!(VirtioDevice::save_state(&card), DeviceState::Net { mac, active_pairs: 1 });
        let mut config = [0u8; 6];
        card.read_config(0, &mut config);
        assert_eq!(config, mac, "the guest reads the saved MAC");

        let mut rng = Rng::new();
        assert_eq!(VirtioDevice::save_state(&rng), DeviceState::None);
        assert!(VirtioDevice::restore_state(&mut rng, &DeviceState::Net { mac, active_pairs: 1 }).is_err());
    }
}
