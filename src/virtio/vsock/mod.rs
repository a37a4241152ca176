//! virtio-vsock (device type 19): sockets between the guest and host programs, with
//! Firecracker's "hybrid" host side: the host end is a Unix socket, no kernel module needed.
//!
//! - [`packet`]: the 44-byte header every packet starts with, and its checks.
//! - [`connection`]: one stream and its credit-based flow control.
//! - [`muxer`]: all streams of one device, the Unix listener host programs connect to, and
//!   the `CONNECT <port>` / `OK <port>` handshake.
//! - [`worker`]: the device at work: packets between the guest's queues and the muxer.
//!
//! The device itself ([`Vsock`]) is three queues (receive, transmit, events), the guest's CID
//! in its config space, and no feature of its own (streams only, no SEQPACKET). Its muxer is
//! made when the VM is built, on the main thread, because binding the listener touches the
//! file system, which a worker thread may not. It outlives activations: each one moves it into
//! the worker, and the reset that stops the worker hands it back ([`Device::stopped`]) with
//! every stream closed, so host programs keep one socket path for the VM's whole life.

pub mod connection;
pub mod muxer;
pub mod packet;
#[cfg(test)]
mod tests;
mod worker;

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use self::muxer::{Muxer, MuxerError};
pub use self::worker::VsockWorker;
use super::queue::QueueError;
use super::{DeviceState, StateMismatch, device_type, feature, ActivateError, Activation, Device, VirtioCommon};

/// Queue sizes, as Firecracker's: enough receive buffers for a burst of 64 KiB packets.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;

/// The worker's epoll tokens: the queues' kicks (by queue index), then the muxer's epoll set.
pub const RX_KICK: u64 = RX as u64;
pub const TX_KICK: u64 = TX as u64;
pub const EVENT_KICK: u64 = EVENT as u64;
pub const MUXER: u64 = 3;

/// The smallest CID a guest may have: 0 and 1 are reserved, 2 is the host.
pub const MIN_GUEST_CID: u64 = 3;

/// A virtio-vsock device, whose host side is the Unix socket its muxer listens on.
pub struct Vsock {
    /// `guest_cid`, little-endian: the whole config space.
    config: [u8; 8],
    /// Here between activations; in the worker while one runs. A `Mutex` only because
    /// [`Device::handler`] takes `&self`: nothing else ever holds it.
    muxer: Mutex<Option<Muxer>>,
    /// Set by a restore: the restored driver's next activation tells it its transport was reset
    /// (its connections were not saved), so that it drops them and rereads its CID.
    reset_on_activation: AtomicBool,
    common: VirtioCommon<VsockWorker>,
}

impl Vsock {
    /// Listens on `uds_path` for host programs; the guest's CID is `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, MuxerError> {
        Ok(Vsock::with_muxer(Muxer::new(guest_cid, uds_path)?))
    }

    /// A device around a muxer that is already listening (its CID is the guest's).
    pub fn with_muxer(muxer: Muxer) -> Vsock {
        Vsock {
            config: muxer.guest_cid().to_le_bytes(),
            muxer: Mutex::new(Some(muxer)),
            reset_on_activation: AtomicBool::new(false),
            common: VirtioCommon::default(),
        }
    }

    /// How many streams are open, while no worker holds the muxer (for tests).
    #[cfg(any(test, feature = "test-utils"))]
    pub fn idle_connection_count(&self) -> Option<usize> {
        self.muxer.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(Muxer::connection_count)
    }
}

impl Device for Vsock {
    type Handler = VsockWorker;
    const DEVICE_TYPE: u32 = device_type::VSOCK;
    const WORKER_NAME: &'static str = "virtio-vsock";

    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    /// Takes the queues first and the muxer last, so that a refused activation leaves the
    /// muxer here for the next one.
    fn handler(&self, mut activation: Activation) -> Result<VsockWorker, ActivateError> {
        if activation.features & feature::VERSION_1 == 0 {
            return Err(ActivateError::LegacyDriver);
        }
        let rx = activation.take_queue(RX, "receive")?;
        let tx = activation.take_queue(TX, "transmit")?;
        let event = activation.take_queue(EVENT, "event")?;
        let muxer = self.muxer.lock().unwrap_or_else(PoisonError::into_inner).take().ok_or(ActivateError::Backend {
            what: "the vsock device's host side was lost with an earlier worker",
            source: io::Error::from(io::ErrorKind::NotFound),
        })?;
        let mut worker = VsockWorker::new(activation.mem, [rx, tx, event], muxer, activation.signals);
        if self.reset_on_activation.swap(false, Ordering::SeqCst) {
            let told = worker.transport_reset().map_err(|e| ActivateError::Backend { what: "cannot reset the restored transport", source: io::Error::other(e.to_string()) })?;
            if !told {
                tracing::warn!("the restored guest posted no vsock event buffer: it was not told its connections are gone");
            }
        }
        Ok(worker)
    }

    fn common(&mut self) -> &mut VirtioCommon<VsockWorker> {
        &mut self.common
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::Vsock { cid: u64::from_le_bytes(self.config) }
    }

    fn restore_state(&mut self, saved: &DeviceState) -> Result<(), StateMismatch> {
        let DeviceState::Vsock { cid } = saved else { return Err(StateMismatch::Kind { saved: saved.clone() }) };
        let here = u64::from_le_bytes(self.config);
        if *cid != here {
            return Err(StateMismatch::Changed(format!("the guest was CID {cid} and is configured as CID {here} now")));
        }
        self.reset_on_activation.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// The muxer comes back with every stream closed: the guest's driver starts afresh.
    fn stopped(&mut self, handler: VsockWorker) {
        let mut muxer = handler.into_muxer();
        muxer.reset_streams();
        *self.muxer.get_mut().unwrap_or_else(PoisonError::into_inner) = Some(muxer);
    }
}

/// Why the device stops until the driver resets it: the guest broke one of its queues, or we
/// could not wake our own worker.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("the {queue} queue is unusable: {source}")]
    Queue { queue: &'static str, source: QueueError },
    #[error("cannot kick our own {queue} queue: {source}")]
    Rekick { queue: &'static str, source: io::Error },
}
