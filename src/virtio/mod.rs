//! Virtio devices: the console, disks, network and entropy a guest drives through queues in
//! its own memory, as lguest's launcher gave its guests.
//!
//! The split follows the virtio spec. The *transport* ([`transport`], virtio over PCI) is what
//! the guest sees on the PCI bus: registers for features, status and queue addresses, MSI-X vectors, and notify
//! addresses that KVM turns into eventfd wake-ups (ioeventfd) without a trip through a vCPU
//! thread. A *device* ([`Device`]) only knows its own type, features and config space, and
//! how to build the handler that serves its queues. When the guest's driver says DRIVER_OK,
//! the transport hands the device an [`Activation`]: the queues, their kick eventfds, and the
//! [`Signals`] to interrupt the guest with. The handler then works on the device's own
//! [`worker`] thread, so that no device can stall a vCPU; [`queue`] is how every handler walks
//! its rings, and [`iovec`] how guest buffers reach a vectored syscall.
//!
//! Nothing in a queue is trusted: descriptor addresses, lengths, chain shapes and request
//! headers are the guest's to forge. A bad request fails alone (the guest gets an error
//! status); a queue that can't be used any more marks the device NEEDS_RESET
//! ([`Signals::device_broken`]); the VMM and the other devices carry on.

pub mod block;
pub mod console;
pub mod fs;
pub mod iovec;
pub mod metrics;
pub mod net;
pub mod queue;
#[cfg(test)]
pub(crate) mod ring_driver;
pub mod rng;
pub mod transport;
pub mod vsock;
pub mod worker;

use std::fmt::Display;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use crate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use self::worker::{DeviceWorker, Worker};
pub use crate::snapshot::state::DeviceState;
use crate::pci::msix::{MsixVectors, NO_VECTOR};

/// The device types we implement (virtio spec 5: "Device Types").
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const VSOCK: u32 = 19;
    pub const FS: u32 = 26;
}

/// Feature bits every device gets from the transport; devices offer only their own.
pub mod feature {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// A virtio device as the transport sees it. Devices don't implement it by hand: every
/// [`Device`] is one. (Test doubles of the transport's own tests do.)
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

    /// Changes the backend under the device (see [`BackendUpdate`]); the transport then tells
    /// the driver its config space changed.
    fn update_backend(&mut self, update: BackendUpdate) -> Result<(), UpdateError> {
        Err(UpdateError::Unsupported(update.what()))
    }

    /// The driver has reset the device (status 0) or the VM is going away: stop the worker,
    /// forget the queues, and be ready for another activation. Calling it twice is harmless.
    fn reset(&mut self);

    /// The VM is being paused: stop serving the queues (the worker stops between two events,
    /// keeping its handler), so that nothing of the device moves while a snapshot is taken.
    fn pause(&mut self) {}

    /// The VM resumes: serve the queues again, from where the worker stopped.
    fn resume(&mut self) -> Result<(), ActivateError> {
        Ok(())
    }

    /// What the device keeps for a snapshot beyond its configuration and its transport.
    fn save_state(&self) -> DeviceState {
        DeviceState::None
    }

    /// Takes back what [`VirtioDevice::save_state`] gave, before the restored driver's
    /// activation; refuses a state that isn't this device's.
    fn restore_state(&mut self, saved: &DeviceState) -> Result<(), StateMismatch> {
        stateless(saved)
    }
}

/// The restore of a device that saves nothing: only "nothing" fits it.
pub fn stateless(saved: &DeviceState) -> Result<(), StateMismatch> {
    match saved {
        DeviceState::None => Ok(()),
        other => Err(StateMismatch::Kind { saved: other.clone() }),
    }
}

/// Why a device refuses the state a snapshot saved for it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateMismatch {
    #[error("the snapshot saved {saved:?} for a device of another kind")]
    Kind { saved: DeviceState },
    #[error("{0}")]
    Changed(String),
}

/// A virtio device as its author writes it: its type, queues, features and config space, and
/// the handler that serves its queues. Activation and reset are the same for every device and
/// are provided (see the [`VirtioDevice`] impl below): the handler is built from the
/// [`Activation`] and run on a [`Worker`] thread, which [`VirtioCommon`] keeps until reset.
/// docs/adding-a-device.md walks through virtio-rng as the example.
pub trait Device: Send {
    /// What serves the queues, on the worker thread or driven by hand in tests and fuzzing.
    type Handler: DeviceWorker;
    /// The virtio device ID (see [`device_type`]).
    const DEVICE_TYPE: u32;
    /// The name of the worker thread (Linux keeps 15 bytes of it).
    const WORKER_NAME: &'static str;
    /// The largest size of each of this instance's queues; their number is its queue count,
    /// which may be the user's choice (a disk's `queues=N`), so it is asked of the instance.
    fn queue_sizes(&self) -> &[u16];

    /// The device-specific feature bits offered to the driver (the transport adds its own).
    fn offered_features(&self) -> u64 {
        0
    }

    /// The device-specific config space, read-only to the driver.
    fn config_space(&self) -> &[u8] {
        &[]
    }

    /// Builds the handler for an activation: takes the queues, checks what the driver accepted,
    /// readies the backend. Everything [`VirtioDevice::activate`] does but start the thread, so
    /// that fuzz targets and property tests can serve the queues synchronously with it.
    fn handler(&self, activation: Activation) -> Result<Self::Handler, ActivateError>;

    /// The handlers an activation is served by, each on a worker thread of its own: one
    /// ([`Device::handler`]) unless the device splits its queues between threads (a network
    /// card's queue pairs).
    fn handlers(&self, activation: Activation) -> Result<Vec<Self::Handler>, ActivateError> {
        Ok(vec![self.handler(activation)?])
    }

    /// The state every device keeps the same way.
    fn common(&mut self) -> &mut VirtioCommon<Self::Handler>;

    /// Changes the backend under a running device, from outside the guest (the API's PATCH);
    /// reached through [`VirtioDevice::update_backend`]. Most devices have nothing to change.
    fn change_backend(&mut self, update: BackendUpdate) -> Result<(), UpdateError> {
        Err(UpdateError::Unsupported(update.what()))
    }

    /// The worker stopped (a reset, or a new activation) and gave its handler back: a device
    /// whose backend must outlive activations (vsock's listening socket) takes it back here.
    /// By default the handler, with its queues, is dropped.
    fn stopped(&mut self, _handler: Self::Handler) {}

    /// What a snapshot keeps of the device beyond its configuration (see [`DeviceState`]).
    fn save_state(&self) -> DeviceState {
        DeviceState::None
    }

    /// Takes a snapshot's [`DeviceState`] back, or says why it doesn't fit this device (an
    /// image whose size changed since). Called before the restored driver's activation.
    fn restore_state(&mut self, saved: &DeviceState) -> Result<(), StateMismatch> {
        stateless(saved)
    }
}

/// A change to a device's backend that the guest didn't ask for: a new disk image in the
/// drive (how Kata and Firecracker's clients hot-plug disks).
#[derive(Debug, Clone)]
pub enum BackendUpdate {
    Medium(crate::config::DiskConfig),
}

impl BackendUpdate {
    fn what(&self) -> &'static str {
        match self {
            BackendUpdate::Medium(_) => "a disk image",
        }
    }
}

/// Why a backend could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("this device has no {0} to change")]
    Unsupported(&'static str),
    #[error(transparent)]
    Backend(#[from] crate::error::Error),
}

impl<D: Device> VirtioDevice for D {
    fn device_type(&self) -> u32 {
        D::DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.queue_sizes()
    }

    fn features(&self) -> u64 {
        self.offered_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        copy_config(self.config_space(), offset, data);
    }

    fn update_backend(&mut self, update: BackendUpdate) -> Result<(), UpdateError> {
        self.change_backend(update)
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        for handler in self.common().stop() {
            self.stopped(handler);
        }
        let signals = activation.signals.clone();
        let handlers = self.handlers(activation)?;
        self.common().start(D::WORKER_NAME, handlers, signals)
    }

    fn reset(&mut self) {
        for handler in self.common().stop() {
            self.stopped(handler);
        }
    }

    fn pause(&mut self) {
        self.common().park();
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        self.common().unpark(D::WORKER_NAME)
    }

    fn save_state(&self) -> DeviceState {
        Device::save_state(self)
    }

    fn restore_state(&mut self, saved: &DeviceState) -> Result<(), StateMismatch> {
        Device::restore_state(self, saved)
    }
}

/// Copies the bytes of `config` at `offset` into `data`; bytes past its end read as zero.
fn copy_config(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(tail) = usize::try_from(offset).ok().and_then(|offset| config.get(offset..)) else { return };
    let len = tail.len().min(data.len());
    data[..len].copy_from_slice(&tail[..len]);
}

/// What every device keeps the same way: the worker threads serving its queues while the
/// driver has it activated (one, or one per queue pair of a network card), or, while the VM is
/// paused, the handlers those workers gave back. Dropping it stops the threads, so that no
/// device outlives its VM's memory on a thread of its own.
pub struct VirtioCommon<H: DeviceWorker> {
    workers: Vec<Worker<H>>,
    /// The handlers of a paused device, and the signals their workers had, until it resumes.
    parked: Option<(Vec<H>, Signals)>,
}

impl<H: DeviceWorker> Default for VirtioCommon<H> {
    fn default() -> Self {
        VirtioCommon { workers: Vec::new(), parked: None }
    }
}

impl<H: DeviceWorker> VirtioCommon<H> {
    fn start(&mut self, name: &str, handlers: Vec<H>, signals: Signals) -> Result<(), ActivateError> {
        for handler in handlers {
            let worker = Worker::spawn(name, handler, signals.clone()).map_err(ActivateError::WorkerThread)?;
            self.workers.push(worker);
        }
        Ok(())
    }

    /// Stops the workers, if any run (or are parked), and gives back their handlers (with the
    /// queues).
    fn stop(&mut self) -> Vec<H> {
        match self.parked.take() {
            Some((handlers, _)) => handlers,
            None => self.workers.drain(..).filter_map(Worker::stop).collect(),
        }
    }

    /// Stops the workers between two events and keeps their handlers for
    /// [`VirtioCommon::unpark`]. A worker's epoll is dropped with its thread; a kick that comes
    /// meanwhile stays in its eventfd and is seen by the next worker.
    fn park(&mut self) {
        let Some(signals) = self.workers.first().map(|worker| worker.signals().clone()) else { return };
        let handlers = self.workers.drain(..).filter_map(Worker::stop).collect();
        self.parked = Some((handlers, signals));
    }

    /// Starts workers again on the parked handlers, which register their fds afresh. A device
    /// the guest broke stays parked: it serves nothing until the driver resets it.
    fn unpark(&mut self, name: &str) -> Result<(), ActivateError> {
        match self.parked.take() {
            Some((handlers, signals)) if !signals.is_broken() => self.start(name, handlers, signals),
            parked => {
                self.parked = parked;
                Ok(())
            }
        }
    }

    /// The first handler while the device is paused: what a snapshot reads a device's queues
    /// from.
    pub fn parked(&mut self) -> Option<&mut H> {
        self.parked.as_mut().and_then(|(handlers, _)| handlers.first_mut())
    }
}

impl<H: DeviceWorker> Drop for VirtioCommon<H> {
    fn drop(&mut self) {
        drop(self.stop());
    }
}

/// Why a device could not start. The driver's doing ([`QueueNotEnabled`], [`LegacyDriver`]) or
/// the host's ([`WorkerThread`], [`Backend`]); either way the device needs a reset and the VM
/// carries on.
///
/// [`QueueNotEnabled`]: ActivateError::QueueNotEnabled
/// [`LegacyDriver`]: ActivateError::LegacyDriver
/// [`WorkerThread`]: ActivateError::WorkerThread
/// [`Backend`]: ActivateError::Backend
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver did not enable the {0} queue")]
    QueueNotEnabled(&'static str),
    #[error("the driver did not accept VIRTIO_F_VERSION_1; legacy devices are not supported")]
    LegacyDriver,
    #[error("cannot start the worker thread: {0}")]
    WorkerThread(#[source] io::Error),
    /// The device's backend refused what the driver asked for.
    #[error("{what}: {source}")]
    Backend { what: &'static str, source: io::Error },
    /// The kernel's vhost refused part of the driver's set-up (a ring outside memory, say).
    #[error("vhost refused {what}: {source}")]
    Vhost { what: &'static str, source: vhost::Error },
    /// A device whose interrupts the kernel raises (vhost) needs an MSI-X vector per queue.
    #[error("the driver gave a queue no MSI-X vector; this device needs MSI-X")]
    NoVector,
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

impl Activation {
    /// Takes queue `index`, which the device can't work without; `name` is for the error.
    pub fn take_queue(&mut self, index: usize, name: &'static str) -> Result<ActiveQueue, ActivateError> {
        self.take_optional_queue(index).ok_or(ActivateError::QueueNotEnabled(name))
    }

    /// Takes queue `index`, if the driver enabled it.
    pub fn take_optional_queue(&mut self, index: usize) -> Option<ActiveQueue> {
        self.queues.get_mut(index).and_then(Option::take)
    }
}

/// A queue the driver configured, and the eventfd its notifications arrive on.
pub struct ActiveQueue {
    pub queue: Queue,
    pub kick: EventFd,
}

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

    /// The eventfd that interrupts the guest through queue `index`'s MSI-X vector (an irqfd),
    /// for a datapath in the kernel (vhost) to signal directly; `None` without a vector.
    pub fn queue_irqfd(&self, index: usize) -> Option<&EventFd> {
        self.vectors.eventfd(*self.queue_vectors.get(index)?)
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
    #[cfg(any(test, feature = "test-utils"))]
    pub fn standalone(queues: usize) -> Signals {
        let vectors = MsixVectors::unmasked(queues + 1).expect("eventfds for a test's interrupts");
        let queue_vectors: Arc<[u16]> = (0..queues as u16).collect();
        Signals::new("test".into(), Arc::new(vectors), queue_vectors, queues as u16, Arc::default(), Arc::default())
    }

    /// How many times the config-change interrupt fired since the last call.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn take_config_interrupts(&self) -> u64 {
        self.vectors.take_count(self.config_vector)
    }

    /// How many times queue `index`'s interrupt fired since the last call.
    #[cfg(any(test, feature = "test-utils"))]
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
