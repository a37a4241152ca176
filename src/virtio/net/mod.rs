//! The guest's network card: virtio-net (virtio spec 1.2, 5.1) on a host tap device, or on
//! passt, the user-mode network (`--net user`, [`crate::passt`]).
//!
//! The driver finds the card on the PCI bus, reads its MAC address and link status from the
//! config space, and posts two queues: receive (0), where it leaves empty buffers, and transmit
//! (1), where it leaves frames. Each frame, either way, starts with the 12-byte virtio-net
//! header, and the tap ([`tap`]) speaks that same header: a frame goes between guest memory and
//! the tap's fd in one readv or writev, never copied by us. The offloads (partial
//! checksums; TCP segments of up to 64 KiB, cut into packets by whoever finally needs packets)
//! are what make bulk TCP fast, and mergeable receive buffers let a 64 KiB segment land in the
//! small buffers a Linux driver posts, spread over several chains.
//!
//! Once activated, the card lives on its worker thread ([`worker`]): a transmit kick sends every
//! waiting frame; the tap becoming readable delivers frames into held receive buffers
//! ([`rx_buffers`]). When the guest has posted too little room for the next frame, we stop
//! watching the tap (frames wait in the tap's own queue, nothing is lost by us) and ask for a
//! receive kick instead. Used entries are published, and the guest interrupted, once per batch.
//!
//! Each direction may have a rate limiter (`rx_rate_limiter`/`tx_rate_limiter` in Firecracker's
//! API, `rx_bw_*`/`tx_ops_*` on `--net`): a frame to send is charged before it goes, and
//! waits in the ring while the budget is spent; a received frame's size is only known once
//! it is read, so it is charged after, and the backend is not read again while that leaves
//! a debt (Firecracker does the same). The limiters' timers wake the worker; the API can
//! change the buckets while the guest runs ([`crate::control::NetHandle`]), and reads the
//! card's counters ([`crate::virtio::metrics::NetMetrics`]) for the metrics file.
//!
//! Nothing the guest wrote is trusted. A transmit chain with a writable part, no room for a
//! header, more than 64 KiB of frame, a buffer outside memory, or a loop, is dropped and
//! counted; a receive chain unfit to take a frame goes back unused. A ring we can no longer
//! read or write makes the device need a reset. The tap's side is trusted as the host kernel is.
//!
//! A tap card may have several queue pairs (`queues=N`, one per vCPU by default): each pair
//! has its own fd of a multi-queue tap and its own worker thread, so that the guest's vCPUs
//! send and receive in parallel, and the driver chooses how many it uses through the control
//! queue ([`ctrl`]), which the first pair's worker serves.
//!
//! With passt at the other end ([`Backend::Passt`]) there is no header on the wire and nobody
//! to hand offloads to, so the card offers none: just the MAC, the link status and mergeable
//! buffers. The link is up while passt runs; when it dies, the worker takes the link down
//! (VIRTIO_NET_S_LINK_UP cleared, a config-change interrupt) and the guest carries on without
//! a network. Frames for passt queue in our buffer and go out as its socket takes them: the
//! transmit queue waits while the socket is full, rather than dropping frames.

pub mod backend;
pub mod ctrl;
mod rx_buffers;
pub mod tap;
#[cfg(test)]
mod tests;
pub mod vhost;
mod worker;

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net::*;
use vm_memory::GuestMemoryError;

pub use self::backend::Backend;
use self::tap::{Tap, TapError, VNET_HDR_LEN};
pub use self::worker::NetWorker;
use super::queue::QueueError;
use super::{DeviceState, StateMismatch, device_type, feature, ActivateError, Activation, Device, VirtioCommon};
use crate::config::{NetBackend, NetConfig, DEFAULT_NET_QUEUE_PAIRS};
use crate::control::NetHandle;
use crate::error::{Error, Result};
use crate::passt::link::PasstLink;
use crate::rate_limiter::{RateLimit, SharedLimiter, TimerDuty};

/// Queue sizes: enough buffers in flight for a 64 KiB segment several times over.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

/// The largest frame either way, header included: 64 KiB of IP packet and an Ethernet header
/// behind the virtio-net header (the spec's 65562 bytes).
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65550;
/// Without receive segmentation offloads no frame outgrows an Ethernet MTU and a VLAN tag.
const MAX_UNSEGMENTED_FRAME_LEN: usize = VNET_HDR_LEN + 1518;

/// How many chains one transmit kick sends, or one tap wake-up fills, before the worker looks
/// at its other work: a guest that keeps a queue full can't starve the other direction.
const BATCH: usize = 64;

/// Where the header's fields sit (`virtio_net_hdr_v1`).
const HDR_FLAGS: usize = 0;
const HDR_NUM_BUFFERS: usize = 10;

/// The worker's epoll tokens: the queues' kicks (by queue index), then the tap.
pub const RX_KICK: u64 = RX as u64;
pub const TX_KICK: u64 = TX as u64;
pub const TAP: u64 = 2;
/// passt's socket has room again, or hung up (edge-triggered, on a second fd of the socket).
pub const BACKEND_OUT: u64 = 3;
/// The rate limiters' timers: the debt of received frames is paid, a frame to send may go.
pub const RX_RATE_TIMER: u64 = 4;
pub const TX_RATE_TIMER: u64 = 5;
/// The control queue's kick, on the first pair's worker of a multi-queue card.
pub const CTRL_KICK: u64 = 6;

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// What we offer: a MAC and a link that is up, checksum and TCP segmentation offloads both
/// ways, and mergeable receive buffers. No control queue: the offloads are fixed at activation.
const OFFERED_FEATURES: u64 = bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_MRG_RXBUF);

/// What a multi-queue card offers on top: the control queue, and queue pairs set through it.
const MULTIQUEUE_FEATURES: u64 = bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_MQ);

/// What we offer with passt: its frames carry no header, so no offloads.
const PASST_FEATURES: u64 = bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS) | bit(VIRTIO_NET_F_MRG_RXBUF);

/// The tap offloads (`TUN_F_*`) matching the receive offloads the driver accepted: the host
/// may then hand us frames with partial checksums and large segments, unsplit.
fn tap_offloads(features: u64) -> u32 {
    let accepted = |feature: u32| features & bit(feature) != 0;
    // Segments without partial checksums are impossible; so is ECN without segments.
    if !accepted(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut offloads = libc::TUN_F_CSUM;
    if accepted(VIRTIO_NET_F_GUEST_TSO4) {
        offloads |= libc::TUN_F_TSO4;
    }
    if accepted(VIRTIO_NET_F_GUEST_TSO6) {
        offloads |= libc::TUN_F_TSO6;
    }
    if accepted(VIRTIO_NET_F_GUEST_ECN) && offloads & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        offloads |= libc::TUN_F_TSO_ECN;
    }
    offloads
}

/// Every queue a card of the most pairs can have: a pair's two, then the control queue.
const ALL_QUEUE_SIZES: [u16; 2 * crate::config::MAX_NET_QUEUE_PAIRS as usize + 1] =
    [QUEUE_SIZE; 2 * crate::config::MAX_NET_QUEUE_PAIRS as usize + 1];

/// The queues of a card with `pairs` queue pairs: two a pair, and a control queue when there
/// are several.
fn queue_sizes(pairs: usize) -> &'static [u16] {
    let count = if pairs > 1 { 2 * pairs + 1 } else { 2 };
    &ALL_QUEUE_SIZES[..count.min(ALL_QUEUE_SIZES.len())]
}

/// A virtio network card on a tap or on passt.
pub struct Net {
    /// The first pair's backend: the card's only one, but for the other fds of a multi-queue tap.
    backend: Backend,
    /// The other pairs' fds of a multi-queue tap (empty for a single pair).
    more_taps: Vec<Arc<Tap>>,
    /// `virtio_net_config` up to `max_virtqueue_pairs`: the MAC, the link, and one queue pair;
    /// as it reads with the link up (`[1]`: a tap's always is, passt's while it runs) and down.
    config: [[u8; 10]; 2],
    /// The limiters and counters, shared with the worker and the API; they outlive resets.
    live: NetHandle,
    /// A multi-queue card's pairs as the driver last switched them, from its activation on:
    /// what a snapshot saves of them.
    switched: Mutex<Option<Arc<ctrl::QueuePairs>>>,
    /// How many pairs the next activation starts with: one (spec 5.1.6.5.5), or, once, as many
    /// as the restored snapshot's driver had in use (it will not say so again).
    pairs_at_activation: AtomicUsize,
    /// Reset stops the worker; the held receive buffers and the queues go with its handler,
    /// the tap stays ours.
    common: VirtioCommon<NetWorker>,
}

impl Net {
    /// Opens the tap, or starts passt, as `config` says; the MAC is `config.mac`, or a random
    /// locally administered one. A tap card gets `config.queues` pairs, or one per vCPU of
    /// `cpus` (see [`open_taps`]).
    pub fn new(config: &NetConfig, cpus: u8) -> Result<Net> {
        let net = match &config.backend {
            NetBackend::Tap { name, .. } => {
                let mut taps = open_taps(name, config.queues, cpus)?.into_iter();
                let no_queues = || Error::Tap { name: name.clone(), why: TapError::NoQueues.to_string() };
                Net::with_taps(taps.next().ok_or_else(no_queues)?, taps.collect(), config.mac)
            }
            NetBackend::User { forwards } => Net::with_backend(Backend::Passt(Arc::new(PasstLink::start(forwards)?)), config.mac),
        };
        net
            .limited(config.rx_rate_limit, config.tx_rate_limit)
            .map_err(|source| Error::Host { what: "cannot create a network card's rate-limit timers", source })
    }

    /// The card with limiters on receive and transmit (which the API may change later, even
    /// when they limit nothing yet). Fails only when the host gives us no timerfd.
    pub fn limited(mut self, rx: RateLimit, tx: RateLimit) -> io::Result<Net> {
        self.live.rx = SharedLimiter::new(rx)?;
        self.live.tx = SharedLimiter::new(tx)?;
        Ok(self)
    }

    /// What the API reaches of the card while it runs.
    pub fn handle(&self) -> NetHandle {
        self.live.clone()
    }

    /// A card on a tap that is already open.
    pub fn with_tap(tap: Tap, mac: Option<[u8; 6]>) -> Net {
        Net::with_backend(Backend::Tap(Arc::new(tap)), mac)
    }

    /// A card with one queue pair per tap fd: `first`, then `more` (the fds of one
    /// multi-queue tap, or stand-ins).
    pub fn with_taps(first: Tap, more: Vec<Tap>, mac: Option<[u8; 6]>) -> Net {
        let mac = mac.unwrap_or_else(random_mac);
        let mut net = Net::with_backend(Backend::Tap(Arc::new(first)), Some(mac));
        net.more_taps = more.into_iter().map(Arc::new).collect();
        net.set_config(mac);
        net
    }

    pub fn with_backend(backend: Backend, mac: Option<[u8; 6]>) -> Net {
        let mac = mac.unwrap_or_else(random_mac);
        let tap = match &backend {
            Backend::Tap(tap) => Some(tap.name().to_string()),
            Backend::Passt(_) => None,
        };
        let live = NetHandle { tap, rx: SharedLimiter::default(), tx: SharedLimiter::default(), metrics: Arc::default() };
        let config = [config_space(mac, false, 1), config_space(mac, true, 1)];
        let (switched, pairs_at_activation) = (Mutex::new(None), AtomicUsize::new(1));
        Net { backend, more_taps: Vec::new(), config, live, switched, pairs_at_activation, common: VirtioCommon::default() }
    }

    /// The config space for `mac`, with as many queue pairs as the card has.
    fn set_config(&mut self, mac: [u8; 6]) {
        let pairs = self.pairs() as u16;
        self.config = [config_space(mac, false, pairs), config_space(mac, true, pairs)];
    }

    /// How many queue pairs the card has.
    pub fn pairs(&self) -> usize {
        1 + self.more_taps.len()
    }

    /// The workers of an activation: the first pair's, with the control queue if the driver
    /// took it, then (if it accepted VIRTIO_NET_F_MQ) each other pair's, on queues `2k` and
    /// `2k + 1` and a tap queue of its own. Without MQ the driver has one pair, and the
    /// control queue follows it (spec 5.1.2).
    fn pair_workers(&self, mut activation: Activation) -> std::result::Result<Vec<NetWorker>, ActivateError> {
        if activation.features & feature::VERSION_1 == 0 {
            return Err(ActivateError::LegacyDriver);
        }
        let what = "the tap refused the offloads the driver accepted";
        let offloads = tap_offloads(activation.features);
        for tap in self.taps() {
            tap.set_offloads(offloads).map_err(|source| ActivateError::Backend { what, source })?;
        }
        let features = activation.features;
        let serving = if features & bit(VIRTIO_NET_F_MQ) != 0 { self.pairs() } else { 1 };
        let mut queues = Vec::with_capacity(serving);
        for pair in 0..serving {
            queues.push((activation.take_queue(2 * pair, "receive")?, activation.take_queue(2 * pair + 1, "transmit")?));
        }
        let takes_control = self.pairs() > 1 && features & bit(VIRTIO_NET_F_CTRL_VQ) != 0;
        let control = if takes_control { Some(activation.take_queue(2 * serving, "control")?) } else { None };
        let kicks = |direction: usize| {
            let kicks = queues.iter().map(|pair| [&pair.0, &pair.1][direction].kick.try_clone());
            kicks.collect::<io::Result<Vec<_>>>().map_err(ActivateError::WorkerThread)
        };
        let wake = kicks(0)?;
        // The card's limiters' timers wake the first pair's worker, which kicks the others.
        let others = |direction: usize| Ok::<_, ActivateError>(TimerDuty::of_queues(kicks(direction)?.split_off(1)));
        let timers = others(0)?.into_iter().zip(others(1)?);
        let backends = std::iter::once(self.backend.clone()).chain(self.more_taps.iter().cloned().map(Backend::Tap));
        let (mem, signals) = (&activation.mem, &activation.signals);
        let workers = queues
            .into_iter()
            .zip(backends)
            .map(|((rx, tx), backend)| NetWorker::new(mem.clone(), rx, tx, backend, signals.clone(), features, self.live.clone()));
        if self.pairs() == 1 {
            return Ok(workers.collect());
        }
        let pairs = Arc::new(ctrl::QueuePairs::new(self.taps().cloned().collect(), wake));
        // Until the driver says otherwise, only the first pair is in use (spec 5.1.6.5.5); a
        // restored driver said so before its snapshot.
        let in_use = self.pairs_at_activation.swap(1, Ordering::SeqCst).clamp(1, serving);
        pairs.set_active(in_use).map_err(|source| ActivateError::Backend { what: "the tap would not detach its other queues", source })?;
        if let Ok(mut switched) = self.switched.lock() {
            *switched = Some(Arc::clone(&pairs));
        }
        let workers = workers.zip(timers).enumerate();
        let mut workers: Vec<NetWorker> =
            workers.map(|(pair, (worker, (rx, tx)))| worker.for_pair(pair, Arc::clone(&pairs)).with_timers(rx, tx)).collect();
        let mut first = workers.remove(0);
        if let Some(queue) = control {
            first = first.with_control(ctrl::Control { queue, index: 2 * serving, multiqueue: serving > 1, pairs });
        }
        workers.insert(0, first);
        Ok(workers)
    }

    /// The card's tap fds, one per pair (none on passt).
    fn taps(&self) -> impl Iterator<Item = &Arc<Tap>> {
        let first = match &self.backend {
            Backend::Tap(tap) => Some(tap),
            Backend::Passt(_) => None,
        };
        first.into_iter().chain(&self.more_taps)
    }

    /// What the card has seen since it was made.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn stats(&self) -> NetStats {
        NetStats::of(&self.live.metrics)
    }
}

impl Device for Net {
    type Handler = NetWorker;
    const DEVICE_TYPE: u32 = device_type::NET;
    const WORKER_NAME: &'static str = "virtio-net";

    fn queue_sizes(&self) -> &[u16] {
        queue_sizes(self.pairs())
    }

    fn offered_features(&self) -> u64 {
        match self.backend {
            Backend::Tap(_) if self.pairs() > 1 => OFFERED_FEATURES | MULTIQUEUE_FEATURES,
            Backend::Tap(_) => OFFERED_FEATURES,
            Backend::Passt(_) => PASST_FEATURES,
        }
    }

    fn config_space(&self) -> &[u8] {
        &self.config[usize::from(self.backend.is_up())]
    }

    /// The first pair's worker (with the control queue of a multi-queue card): the whole card
    /// when it has one pair. Also tells the tap which offloads the driver accepted.
    fn handler(&self, activation: Activation) -> std::result::Result<NetWorker, ActivateError> {
        let mut workers = self.pair_workers(activation)?;
        Ok(workers.swap_remove(0))
    }

    /// One worker per queue pair.
    fn handlers(&self, activation: Activation) -> std::result::Result<Vec<NetWorker>, ActivateError> {
        self.pair_workers(activation)
    }

    fn common(&mut self) -> &mut VirtioCommon<NetWorker> {
        &mut self.common
    }

    fn save_state(&self) -> DeviceState {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config[0][..6]);
        let switched = self.switched.lock().ok().and_then(|switched| switched.as_ref().map(|pairs| pairs.active_count()));
        DeviceState::Net { mac, active_pairs: switched.unwrap_or(1) as u16 }
    }

    /// The guest keeps the MAC it had, which may have been made up at random, and the queue
    /// pairs it had switched on.
    fn restore_state(&mut self, saved: &DeviceState) -> std::result::Result<(), StateMismatch> {
        let DeviceState::Net { mac, active_pairs } = saved else { return Err(StateMismatch::Kind { saved: saved.clone() }) };
        let in_use = usize::from(*active_pairs);
        if !(1..=self.pairs()).contains(&in_use) {
            let why = format!("the snapshot's card had {in_use} queue pairs in use and this card has {}; give it queues={in_use} or more", self.pairs());
            return Err(StateMismatch::Changed(why));
        }
        self.set_config(*mac);
        self.pairs_at_activation.store(in_use, Ordering::SeqCst);
        Ok(())
    }
}

fn config_space(mac: [u8; 6], link_up: bool, pairs: u16) -> [u8; 10] {
    let mut config = [0u8; 10];
    config[..6].copy_from_slice(&mac);
    let status = if link_up { VIRTIO_NET_S_LINK_UP as u16 } else { 0 };
    config[6..8].copy_from_slice(&status.to_le_bytes());
    config[8..10].copy_from_slice(&pairs.to_le_bytes());
    config
}

/// The tap fds of a card on tap `name`: `queues` of them when the user said so; else one per
/// vCPU (up to [`DEFAULT_NET_QUEUE_PAIRS`]), or one when the tap exists and is single-queue
/// (as `ip tuntap add NAME mode tap` makes it), so that a tap made for one queue still works.
pub fn open_taps(name: &str, queues: Option<u16>, cpus: u8) -> Result<Vec<Tap>> {
    let pairs = queues.unwrap_or_else(|| u16::from(cpus).clamp(1, DEFAULT_NET_QUEUE_PAIRS));
    if queues.is_some() || pairs == 1 {
        return Tap::open_queues(name, pairs);
    }
    match Tap::try_open_queues(name, pairs) {
        Err(TapError::NotMultiQueue(_)) => {
            tracing::info!("tap {name} is single-queue: its card gets one queue pair (for one per vCPU: ip tuntap add {name} mode tap multi_queue)");
            Tap::open_queues(name, 1)
        }
        opened => opened.map_err(|why| Error::Tap { name: name.to_string(), why: why.to_string() }),
    }
}

/// 52:54:00 followed by three random bytes: unicast, locally administered, and the prefix
/// users already recognise from QEMU.
fn random_mac() -> [u8; 6] {
    let mut tail = [0u8; 3];
    // SAFETY: getrandom writes at most `tail.len()` bytes into the buffer we own.
    let got = unsafe { libc::getrandom(tail.as_mut_ptr().cast(), tail.len(), 0) };
    if usize::try_from(got).ok() != Some(tail.len()) {
        // A kernel without getrandom: the clock and our pid still tell two VMs apart.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let mix = nanos ^ std::process::id().rotate_left(16);
        tail.copy_from_slice(&mix.to_le_bytes()[..3]);
    }
    [0x52, 0x54, 0x00, tail[0], tail[1], tail[2]]
}

/// Why the card stops until the driver resets it: the guest broke a queue ([`NetError::Queue`],
/// [`NetError::HeldBuffer`]), or the host failed us (the rest).
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the {queue} queue is unusable: {source}")]
    Queue { queue: &'static str, source: QueueError },
    #[error("a held receive buffer left guest memory: {0}")]
    HeldBuffer(#[source] GuestMemoryError),
    #[error("cannot read from the tap: {0}")]
    TapRead(#[source] io::Error),
    #[error("the tap failed or was deleted")]
    TapGone,
    #[error("cannot start or stop watching the backend: {0}")]
    Watch(#[source] io::Error),
    #[error("cannot kick our own {queue} queue: {source}")]
    Rekick { queue: &'static str, source: io::Error },
}

/// What the card has seen since it was made, for tests: its counters in short.
#[cfg(any(test, feature = "test-utils"))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames the tap gave us that didn't fit the guest's buffers.
    pub rx_dropped: u64,
    /// Receive chains the guest posted that couldn't take a frame, returned unused.
    pub rx_bad_buffers: u64,
    /// Frames the guest sent that reached the tap.
    pub tx_frames: u64,
    /// Frames the guest sent that were malformed or that the tap refused.
    pub tx_dropped: u64,
}

#[cfg(any(test, feature = "test-utils"))]
impl NetStats {
    fn of(metrics: &crate::virtio::metrics::NetMetrics) -> NetStats {
        NetStats {
            rx_frames: metrics.rx_packets_count.get(),
            rx_dropped: metrics.rx_fails.get(),
            rx_bad_buffers: metrics.rx_bad_buffers.get(),
            tx_frames: metrics.tx_packets_count.get(),
            tx_dropped: metrics.tx_malformed_frames.get() + metrics.tx_fails.get(),
        }
    }
}
