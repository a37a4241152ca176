//! Virtio devices: the console, disks, network and entropy a guest drives through queues in
//! its own memory, as lguest's launcher gave its guests.
//!
//! The split follows the virtio spec. The *transport* ([`transport`], virtio over PCI) is what the guest sees on the
//! PCI bus: registers for features, status and queue addresses, MSI-X vectors, and notify
//! addresses that KVM turns into eventfd wake-ups (ioeventfd) without a trip through a vCPU
//! thread. A *device* ([`VirtioDevice`]) only knows its own type, features and config space,
//! and what to do with the requests in its queues. When the guest's driver says DRIVER_OK, the
//! transport hands the device an [`Activation`]: the queues, their kick eventfds, and the
//! [`Signals`] to interrupt the guest with. The device then works on its own [`worker`]
//! thread, so that no device can stall a vCPU.
//!
//! Nothing in a queue is trusted: descriptor addresses, lengths, chain shapes and request
//! headers are the guest's to forge. A bad request fails alone (the guest gets an error
//! status); a queue that can't be used any more marks the device NEEDS_RESET
//! ([`Signals::device_broken`]); the VMM and the other devices carry on.

pub mod block;
pub mod console;
pub mod net;
pub mod rng;
pub mod tap;
pub mod transport;
pub mod worker;

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::pci::msix::{MsixVectors, NO_VECTOR};

/// The device types we implement (virtio spec 5: "Device Types").
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
}

/// Feature bits every device gets from the transport; devices offer only their own.
pub mod feature {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (see [`device_type`]).
    fn device_type(&self) -> u32;

    /// How many queues the device has, and the largest size each may have.
    fn queue_max_sizes(&self) -> &[u16];

    /// The device-specific feature bits offered to the driver. The transport adds
    /// [`feature::VERSION_1`], [`feature::RING_INDIRECT_DESC`] and [`feature::RING_EVENT_IDX`].
    fn features(&self) -> u64;

    /// Reads the device-specific config space. `offset` and `data.len()` come from the guest:
    /// bytes past the end of the config space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific config space. Most devices have nothing writable.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// The driver has set DRIVER_OK: start serving the queues. An error is reported and the
    /// device is marked NEEDS_RESET; the rest of the VM carries on.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;

    /// The driver has reset the device (status 0) or the VM is going away: stop the worker,
    /// forget the queues, and be ready for another activation. Calling it twice is harmless.
    fn reset(&mut self);
}

/// Everything a device needs to serve its queues once the driver is ready.
pub struct Activation {
    /// The guest's memory, where the queues and buffers live.
    pub mem: GuestMemoryMmap,
    /// One entry per queue the driver enabled, in queue-index order; a queue the driver left
    /// disabled is `None`.
    pub queues: Vec<Option<ActiveQueue>>,
    /// The features the driver accepted (device bits and transport bits).
    pub features: u64,
    /// How to interrupt the guest, or tell it the device is broken.
    pub signals: Signals,
}

/// A queue the driver configured, and the eventfd its notifications arrive on.
pub struct ActiveQueue {
    pub queue: Queue,
    pub kick: EventFd,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ActivateError(pub String);

/// How a device's worker reaches the guest: an interrupt per queue, a config-change
/// interrupt, and the NEEDS_RESET bit. Cheap to clone; safe to use from any thread.
#[derive(Clone)]
pub struct Signals {
    name: Arc<str>,
    vectors: Arc<MsixVectors>,
    queue_vectors: Arc<[u16]>,
    config_vector: u16,
    isr: Arc<AtomicU8>,
    broken: Arc<AtomicBool>,
}

/// ISR status bits (virtio spec 4.1.4.5), read by drivers that use INTx rather than MSI-X.
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

impl Signals {
    pub(crate) fn new(
        name: Arc<str>,
        vectors: Arc<MsixVectors>,
        queue_vectors: Arc<[u16]>,
        config_vector: u16,
        isr: Arc<AtomicU8>,
        broken: Arc<AtomicBool>,
    ) -> Signals {
        Signals { name, vectors, queue_vectors, config_vector, isr, broken }
    }

    /// Tells the guest that queue `index` has new used buffers. Callers check
    /// `Queue::needs_notification` first, so that event-index suppression works.
    pub fn used_queue(&self, index: usize) {
        self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        self.vectors.trigger(self.queue_vectors.get(index).copied().unwrap_or(NO_VECTOR));
    }

    /// Tells the guest the device's config space changed (a resized disk, a link going down).
    pub fn config_changed(&self) {
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        self.vectors.trigger(self.config_vector);
    }

    /// The guest broke the device beyond one failed request (a queue in memory that doesn't
    /// exist, a chain that can't be walked): report it, set NEEDS_RESET, and tell the driver.
    pub fn device_broken(&self, why: &dyn Display) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            tracing::warn!(device = %self.name, "guest broke the device, it needs a reset: {why}");
        }
        self.config_changed();
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Signals wired to bare eventfds, one vector per queue (vector i for queue i) and one for
    /// config changes (vector `queues`), for testing a device without a VM.
    pub fn standalone(queues: usize) -> Signals {
        let vectors = Arc::new(MsixVectors::unmasked(queues + 1));
        let queue_vectors: Arc<[u16]> = (0..queues as u16).collect();
        Signals::new("test".into(), vectors, queue_vectors, queues as u16, Arc::default(), Arc::default())
    }

    /// How many times queue `index`'s interrupt fired since the last call (tests only).
    pub fn take_queue_interrupts(&self, index: usize) -> u64 {
        self.queue_vectors.get(index).map_or(0, |&vector| self.vectors.take_count(vector))
    }
}

/// Waits (up to 5 s) for a worker thread to have done something, in tests.
#[cfg(test)]
pub(crate) fn wait_until(what: impl Fn() -> bool) {
    for _ in 0..1000 {
        if what() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("condition never became true");
}
