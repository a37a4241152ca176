//! The kernel's vhost-net under a tap card (`--net tap=NAME,vhost=on`): the guest sees the same
//! virtio-net card as [`super::Net`] (features, MAC, link), but its frames move between the
//! guest's rings and the tap inside the host kernel, on vhost's own kernel thread: no trip
//! through lguest's process per frame, and no copy by us.
//!
//! lguest keeps the control path. When the driver says DRIVER_OK, [`VhostNet::handler`] tells
//! vhost the features the driver accepted, where guest memory lies in our address space (the
//! memory table), where each ring is and where the driver's next entry is, the ioeventfd the
//! queue's notify lands on (the kick: KVM signals vhost directly), and the irqfd of the queue's
//! MSI-X vector (the call: vhost interrupts the guest directly); then it hands vhost the tap.
//! The worker thread only watches vhost's error eventfds: a ring vhost can no longer use marks
//! the device NEEDS_RESET, as our own worker would. Reset takes the tap back from vhost.
//!
//! Trust: the rings are the guest's, and the kernel checks every descriptor against the
//! memory table as it does for any VMM; ring addresses outside guest memory are refused here
//! (by the vhost crate's check, before the kernel sees them) and fail the activation alone.
//!
//! What vhost does not do for us is MSI-X masking: it writes the vector's irqfd whether or not
//! the guest masked the vector. Linux's virtio drivers mask vectors only while setting them up
//! and tearing them down, when vhost has no tap; a driver that masked a live vector would get
//! an interrupt early, which virtio drivers tolerate (they look at the used ring first).

use std::io;
use std::sync::Arc;

use vhost::net::VhostNet as _;
use vhost::vhost_kern::net::Net as KernelNet;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use crate::memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::tap::Tap;
use super::{config_space, random_mac, tap_offloads, OFFERED_FEATURES, QUEUE_SIZE, RX, TX};
use crate::config::NetConfig;
use crate::virtio::worker::{watch, DeviceWorker};
use crate::virtio::{device_type, feature, ActivateError, ActiveQueue, Activation, Device, Signals, VirtioCommon};

/// The transport features vhost must support for us to offer them: virtio 1, indirect
/// descriptors, event-index suppression. Mergeable receive buffers are vhost's to support too.
const NEEDED_FROM_VHOST: u64 =
    feature::VERSION_1 | feature::RING_INDIRECT_DESC | feature::RING_EVENT_IDX | 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;

/// A virtio network card whose datapath is the kernel's vhost-net, on a tap.
pub struct VhostNet {
    vhost: Arc<KernelNet<Arc<GuestMemoryMmap>>>,
    /// The features vhost itself implements (the ring's and the header's; the offloads are
    /// the tap's business): vhost refuses to be told of any other.
    vhost_features: u64,
    tap: Arc<Tap>,
    config: [u8; 10],
    common: VirtioCommon<VhostRings>,
}

/// Why vhost-net could not be set up for a card: the host's doing, reported before the boot.
#[derive(Debug, thiserror::Error)]
pub enum VhostOpenError {
    #[error("/dev/vhost-net does not exist: load the kernel's vhost_net module (modprobe vhost_net), or drop vhost=on")]
    Missing,
    #[error("no permission to open /dev/vhost-net: run as root, or give your user access to it (a udev rule), or drop vhost=on")]
    Permission,
    #[error("cannot open /dev/vhost-net: {0}")]
    Open(#[source] io::Error),
    #[error("vhost-net refused {what}: {source}")]
    Refused { what: &'static str, source: vhost::Error },
    #[error("this kernel's vhost-net lacks virtio features lguest needs (has {has:#x}, needs {needs:#x})")]
    Features { has: u64, needs: u64 },
}

/// Why vhost stopped serving a card that was running: the device then needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("vhost-net reported an error on the {0} queue (a descriptor or ring it could not use)")]
    Ring(&'static str),
}

impl VhostNet {
    /// Opens the tap and a vhost-net instance for guest memory `mem`, and makes this process
    /// its owner. Done while the VM is built, on the main thread: workers may not open files.
    pub fn new(config: &NetConfig, name: &str, mem: &GuestMemoryMmap) -> crate::error::Result<VhostNet> {
        let tap = Tap::open(name)?;
        let (vhost, vhost_features) = open(mem).map_err(|e| crate::error::Error::Vhost { name: name.to_string(), source: e })?;
        let mac = config.mac.unwrap_or_else(random_mac);
        Ok(VhostNet {
            vhost: Arc::new(vhost),
            vhost_features,
            tap: Arc::new(tap),
            config: config_space(mac, true),
            common: VirtioCommon::default(),
        })
    }
}

/// A vhost-net instance owned by this process, and the features it implements.
fn open(mem: &GuestMemoryMmap) -> Result<(KernelNet<Arc<GuestMemoryMmap>>, u64), VhostOpenError> {
    let vhost = KernelNet::new(Arc::new(mem.clone())).map_err(|e| match e {
        vhost::Error::VhostOpen(e) if e.kind() == io::ErrorKind::NotFound => VhostOpenError::Missing,
        vhost::Error::VhostOpen(e) if e.kind() == io::ErrorKind::PermissionDenied => VhostOpenError::Permission,
        vhost::Error::VhostOpen(e) => VhostOpenError::Open(e),
        other => VhostOpenError::Refused { what: "to open", source: other },
    })?;
    vhost.set_owner().map_err(|source| VhostOpenError::Refused { what: "VHOST_SET_OWNER", source })?;
    let has = vhost.get_features().map_err(|source| VhostOpenError::Refused { what: "VHOST_GET_FEATURES", source })?;
    if has & NEEDED_FROM_VHOST != NEEDED_FROM_VHOST {
        return Err(VhostOpenError::Features { has, needs: NEEDED_FROM_VHOST });
    }
    Ok((vhost, has))
}

impl Device for VhostNet {
    type Handler = VhostRings;
    const DEVICE_TYPE: u32 = device_type::NET;
    const WORKER_NAME: &'static str = "vhost-net";

    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn offered_features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn handler(&self, mut activation: Activation) -> Result<VhostRings, ActivateError> {
        if activation.features & feature::VERSION_1 == 0 {
            return Err(ActivateError::LegacyDriver);
        }
        let queues = [activation.take_queue(RX, "receive")?, activation.take_queue(TX, "transmit")?];
        let what = "the tap refused the offloads the driver accepted";
        self.tap.set_offloads(tap_offloads(activation.features)).map_err(|source| ActivateError::Backend { what, source })?;
        let errors = [error_eventfd()?, error_eventfd()?];
        let mut rings = VhostRings { vhost: Arc::clone(&self.vhost), errors, attached: [false; 2], _queues: queues };
        let vhost = &*self.vhost;
        let refused = |what: &'static str| move |source| ActivateError::Vhost { what, source };
        vhost.set_features(activation.features & self.vhost_features).map_err(refused("the driver's features"))?;
        vhost.set_mem_table(&memory_table(&activation.mem)).map_err(refused("the memory table"))?;
        for (index, active) in rings._queues.iter().enumerate() {
            start_ring(vhost, index, active, &rings.errors[index], &activation.signals)?;
        }
        for index in [RX, TX] {
            vhost.set_backend(index, Some(self.tap.file())).map_err(refused("the tap"))?;
            // From here on, dropping `rings` takes the tap back from this queue, whatever fails.
            rings.attached[index] = true;
        }
        Ok(rings)
    }

    fn common(&mut self) -> &mut VirtioCommon<VhostRings> {
        &mut self.common
    }
}

fn error_eventfd() -> Result<EventFd, ActivateError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::WorkerThread)
}

/// Guest memory as vhost sees it: each region's guest address, size and our mapping of it.
fn memory_table(mem: &GuestMemoryMmap) -> Vec<VhostUserMemoryRegionInfo> {
    mem.iter()
        .map(|region| VhostUserMemoryRegionInfo {
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            // Only vhost-user passes memory by file; the kernel reads our own mapping.
            mmap_offset: 0,
            mmap_handle: -1,
        })
        .collect()
}

/// Hands vhost one ring: its size, addresses and next entry, and the kick, call and error fds.
fn start_ring(
    vhost: &KernelNet<Arc<GuestMemoryMmap>>,
    index: usize,
    active: &ActiveQueue,
    error: &EventFd,
    signals: &Signals,
) -> Result<(), ActivateError> {
    let refused = |what: &'static str| move |source| ActivateError::Vhost { what, source };
    let queue = &active.queue;
    let ring = VringConfigData {
        queue_max_size: queue.max_size(),
        queue_size: queue.size(),
        flags: 0,
        desc_table_addr: queue.desc_table(),
        used_ring_addr: queue.used_ring(),
        avail_ring_addr: queue.avail_ring(),
        log_addr: None,
    };
    let call = signals.queue_irqfd(index).ok_or(ActivateError::NoVector)?;
    vhost.set_vring_num(index, queue.size()).map_err(refused("a ring's size"))?;
    vhost.set_vring_addr(index, &ring).map_err(refused("a ring's addresses"))?;
    vhost.set_vring_base(index, queue.next_avail()).map_err(refused("a ring's first entry"))?;
    vhost.set_vring_call(index, call).map_err(refused("a ring's interrupt"))?;
    vhost.set_vring_kick(index, &active.kick).map_err(refused("a ring's notify eventfd"))?;
    vhost.set_vring_err(index, error).map_err(refused("a ring's error eventfd"))
}

/// A card vhost is serving: what the worker watches (vhost's error eventfds, one per queue),
/// and the queues whose kick eventfds vhost polls. Dropping it takes the tap back from vhost.
pub struct VhostRings {
    vhost: Arc<KernelNet<Arc<GuestMemoryMmap>>>,
    errors: [EventFd; 2],
    /// Which queues vhost has the tap on.
    attached: [bool; 2],
    _queues: [ActiveQueue; 2],
}

impl DeviceWorker for VhostRings {
    type Error = VhostError;

    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        for (index, error) in self.errors.iter().enumerate() {
            watch(epoll, error, index as u64)?;
        }
        Ok(())
    }

    fn handle(&mut self, _epoll: &Epoll, token: u64, _events: EventSet) -> Result<(), VhostError> {
        Err(VhostError::Ring(if token == RX as u64 { "receive" } else { "transmit" }))
    }
}

impl Drop for VhostRings {
    fn drop(&mut self) {
        for index in [RX, TX].into_iter().filter(|&index| self.attached[index]) {
            if let Err(e) = self.vhost.set_backend(index, None) {
                tracing::warn!("vhost-net would not give the tap back from queue {index}: {e}");
            }
        }
    }
}
