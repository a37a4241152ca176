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
