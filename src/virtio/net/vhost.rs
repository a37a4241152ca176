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
//! A multi-queue card (`queues=N`) has one vhost-net instance per queue pair, each on its own
//! fd of the multi-queue tap (vhost runs one kernel thread per instance); the control queue
//! stays with lguest, on the worker, which detaches the tap queues of pairs the driver does
//! not use ([`super::ctrl`]).
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

use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ};

use super::ctrl::{Control, QueuePairs};
use super::tap::Tap;
use super::{
    bit, config_space, open_taps, queue_sizes, random_mac, tap_offloads, MULTIQUEUE_FEATURES, OFFERED_FEATURES, RX, TX,
};
use crate::seccomp::Role;
use crate::virtio::queue::{clear_kick, QueueError};
use crate::config::NetConfig;
use crate::virtio::worker::{watch, DeviceWorker};
use crate::virtio::{device_type, feature, ActivateError, ActiveQueue, Activation, Device, Signals, VirtioCommon};

/// The transport features vhost must support for us to offer them: virtio 1, indirect
/// descriptors, event-index suppression. Mergeable receive buffers are vhost's to support too.
const NEEDED_FROM_VHOST: u64 =
    feature::VERSION_1 | feature::RING_INDIRECT_DESC | feature::RING_EVENT_IDX | 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;

/// A virtio network card whose datapath is the kernel's vhost-net, on a tap.
pub struct VhostNet {
    /// One vhost-net instance per queue pair, each with its own fd of the tap.
    vhosts: Vec<Arc<KernelNet<Arc<GuestMemoryMmap>>>>,
    /// The features vhost itself implements (the ring's and the header's; the offloads are
    /// the tap's business): vhost refuses to be told of any other.
    vhost_features: u64,
    taps: Vec<Arc<Tap>>,
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
    #[error("vhost-net reported an error on a {0} queue (a descriptor or ring it could not use)")]
    Ring(&'static str),
    #[error("the control queue is unusable: {0}")]
    Control(#[source] QueueError),
}

impl VhostNet {
    /// Opens the tap and a vhost-net instance for guest memory `mem`, and makes this process
    /// its owner. Done while the VM is built, on the main thread: workers may not open files.
    /// A card gets `config.queues` pairs, or one: several vhost-net instances at 2 vCPUs
    /// stalled the lab machine's kernel in both benchmark runs that tried them (not explained
    /// yet), so they are asked for, not given by default.
    pub fn new(config: &NetConfig, name: &str, mem: &GuestMemoryMmap, cpus: u8) -> crate::error::Result<VhostNet> {
        let taps: Vec<Arc<Tap>> = open_taps(name, Some(config.queues.unwrap_or(1)), cpus)?.into_iter().map(Arc::new).collect();
        let mut vhosts = Vec::with_capacity(taps.len());
        let mut vhost_features = u64::MAX;
        for _ in &taps {
            let (vhost, features) = open(mem).map_err(|e| crate::error::Error::Vhost { name: name.to_string(), source: e })?;
            vhosts.push(Arc::new(vhost));
            vhost_features &= features;
        }
        let config = config_space(config.mac.unwrap_or_else(random_mac), true, taps.len() as u16);
        Ok(VhostNet { vhosts, vhost_features, taps, config, common: VirtioCommon::default() })
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
        queue_sizes(self.taps.len())
    }

    fn offered_features(&self) -> u64 {
        if self.taps.len() > 1 { OFFERED_FEATURES | MULTIQUEUE_FEATURES } else { OFFERED_FEATURES }
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    /// Hands each pair the driver uses to its vhost instance; the control queue (and vhost's
    /// error eventfds) stay with the worker.
    fn handler(&self, mut activation: Activation) -> Result<VhostRings, ActivateError> {
        if activation.features & feature::VERSION_1 == 0 {
            return Err(ActivateError::LegacyDriver);
        }
        let what = "the tap refused the offloads the driver accepted";
        for tap in &self.taps {
            tap.set_offloads(tap_offloads(activation.features)).map_err(|source| ActivateError::Backend { what, source })?;
        }
        let serving = if activation.features & bit(VIRTIO_NET_F_MQ) != 0 { self.taps.len() } else { 1 };
        let (mem, signals) = (activation.mem.clone(), activation.signals.clone());
        let mut rings = VhostRings { pairs: Vec::with_capacity(serving), control: None, mem, signals };
        for pair in 0..serving {
            let queues = [activation.take_queue(2 * pair, "receive")?, activation.take_queue(2 * pair + 1, "transmit")?];
            let errors = [error_eventfd()?, error_eventfd()?];
            rings.pairs.push(VhostPair { vhost: Arc::clone(&self.vhosts[pair]), errors, attached: [false; 2], _queues: queues });
            self.start_pair(&activation, pair, &mut rings.pairs[pair])?;
        }
        if self.taps.len() > 1 {
            let pairs = Arc::new(QueuePairs::new(self.taps.clone(), Vec::new()));
            // Until the driver says otherwise, only the first pair is in use (spec 5.1.6.5.5).
            pairs.set_active(1).map_err(|source| ActivateError::Backend { what: "the tap would not detach its other queues", source })?;
            if activation.features & bit(VIRTIO_NET_F_CTRL_VQ) != 0 {
                let queue = activation.take_queue(2 * serving, "control")?;
                rings.control = Some(Control { queue, index: 2 * serving, multiqueue: serving > 1, pairs });
            }
        }
        Ok(rings)
    }

    fn common(&mut self) -> &mut VirtioCommon<VhostRings> {
        &mut self.common
    }
}

impl VhostNet {
    /// Tells pair `pair`'s vhost instance the features, the memory table and its two rings,
    /// then gives it the pair's tap queue.
    fn start_pair(&self, activation: &Activation, pair: usize, rings: &mut VhostPair) -> Result<(), ActivateError> {
        let vhost = &*rings.vhost;
        let refused = |what: &'static str| move |source| ActivateError::Vhost { what, source };
        vhost.set_features(activation.features & self.vhost_features).map_err(refused("the driver's features"))?;
        vhost.set_mem_table(&memory_table(&activation.mem)).map_err(refused("the memory table"))?;
        for (index, active) in rings._queues.iter().enumerate() {
            start_ring(vhost, index, 2 * pair + index, active, &rings.errors[index], &activation.signals)?;
        }
        for index in [RX, TX] {
            vhost.set_backend(index, Some(self.taps[pair].file())).map_err(refused("the tap"))?;
            // From here on, dropping the pair takes the tap back from this queue, whatever fails.
            rings.attached[index] = true;
        }
        Ok(())
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

/// Hands vhost one ring (`index` of its pair's two, `card_index` among the card's queues): its
/// size, addresses and next entry, and the kick, call and error fds.
fn start_ring(
    vhost: &KernelNet<Arc<GuestMemoryMmap>>,
    index: usize,
    card_index: usize,
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
    let call = signals.queue_irqfd(card_index).ok_or(ActivateError::NoVector)?;
    vhost.set_vring_num(index, queue.size()).map_err(refused("a ring's size"))?;
    vhost.set_vring_addr(index, &ring).map_err(refused("a ring's addresses"))?;
    vhost.set_vring_base(index, queue.next_avail()).map_err(refused("a ring's first entry"))?;
    vhost.set_vring_call(index, call).map_err(refused("a ring's interrupt"))?;
    vhost.set_vring_kick(index, &active.kick).map_err(refused("a ring's notify eventfd"))?;
    vhost.set_vring_err(index, error).map_err(refused("a ring's error eventfd"))
}

/// A card vhost is serving: its pairs, and the control queue of a multi-queue card, which the
/// worker serves itself.
pub struct VhostRings {
    pairs: Vec<VhostPair>,
    control: Option<Control>,
    mem: GuestMemoryMmap,
    signals: Signals,
}

/// One pair vhost is serving: what the worker watches (vhost's error eventfds, one per
/// queue), and the queues whose kick eventfds vhost polls. Dropping it takes the tap back.
struct VhostPair {
    vhost: Arc<KernelNet<Arc<GuestMemoryMmap>>>,
    errors: [EventFd; 2],
    /// Which queues vhost has the tap on.
    attached: [bool; 2],
    _queues: [ActiveQueue; 2],
}

/// The worker's token for the control queue's kick; below it, queue `i`'s error eventfd is `i`.
const CONTROL_TOKEN: u64 = u64::MAX - 1;

impl DeviceWorker for VhostRings {
    type Error = VhostError;

    /// The control queue's worker switches the tap's queues (TUNSETQUEUE).
    fn role(&self) -> Role {
        if self.control.is_some() { Role::NetControl } else { Role::DeviceWorker }
    }

    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        for (pair, rings) in self.pairs.iter().enumerate() {
            for (index, error) in rings.errors.iter().enumerate() {
                watch(epoll, error, (2 * pair + index) as u64)?;
            }
        }
        if let Some(control) = &self.control {
            watch(epoll, &control.queue.kick, CONTROL_TOKEN)?;
            // Commands queued before DRIVER_OK.
            control.queue.kick.write(1)?;
        }
        Ok(())
    }

    fn handle(&mut self, _epoll: &Epoll, token: u64, _events: EventSet) -> Result<(), VhostError> {
        match &mut self.control {
            Some(control) if token == CONTROL_TOKEN => {
                clear_kick(&control.queue.kick);
                control.serve(&self.mem, &self.signals).map_err(VhostError::Control)
            }
            _ => Err(VhostError::Ring(if token % 2 == RX as u64 { "receive" } else { "transmit" })),
        }
    }
}

impl Drop for VhostPair {
    fn drop(&mut self) {
        for index in [RX, TX].into_iter().filter(|&index| self.attached[index]) {
            if let Err(e) = self.vhost.set_backend(index, None) {
                tracing::warn!("vhost-net would not give the tap back from queue {index}: {e}");
            }
        }
    }
}
