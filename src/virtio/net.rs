//! The guest's network card: virtio-net (virtio spec 1.2, 5.1) on a host tap device.
//!
//! The driver finds the card on the PCI bus, reads its MAC address and link status from the
//! config space, and posts two queues: receive (0), where it leaves empty buffers, and transmit
//! (1), where it leaves frames. Each frame, either way, starts with the 12-byte virtio-net
//! header, and the tap ([`super::tap`]) speaks that same header: a frame goes between guest
//! memory and the tap's fd in one readv or writev, never copied by us. The offloads (partial
//! checksums; TCP segments of up to 64 KiB, cut into packets by whoever finally needs packets)
//! are what make bulk TCP fast, and mergeable receive buffers let a 64 KiB segment land in the
//! small buffers a Linux driver posts, spread over several chains.
//!
//! Once activated, the card lives on its worker thread: a transmit kick sends every waiting
//! frame; the tap becoming readable delivers frames into held receive buffers. When the guest
//! has posted too little room for the next frame, we stop watching the tap (frames wait in the
//! tap's own queue, nothing is lost by us) and ask for a receive kick instead. Used entries are
//! published, and the guest interrupted, once per batch.
//!
//! Nothing the guest wrote is trusted. A transmit chain with a writable part, no room for a
//! header, more than 64 KiB of frame, a buffer outside memory, or a loop, is dropped and
//! counted; a receive chain unfit to take a frame goes back unused. A ring we can no longer
//! read or write makes the device need a reset. The tap's side is trusted as the host kernel is.

use std::collections::VecDeque;
use std::io;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_net::*;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::tap::{IoVecs, Tap, MAX_IOVECS, VNET_HDR_LEN};
use super::worker::{watch, DeviceWorker, Worker};
use super::{device_type, feature, ActivateError, Activation, ActiveQueue, Signals, VirtioDevice};
use crate::config::NetConfig;
use crate::error::Result;

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

/// Receive buffers one readv fills: all the iovecs but the spill byte (see `receive_frame`).
const MAX_RX_SEGMENTS: usize = MAX_IOVECS - 1;

/// Where the header's fields sit (`virtio_net_hdr_v1`).
const HDR_FLAGS: usize = 0;
const HDR_NUM_BUFFERS: usize = 10;

/// The worker's epoll tokens (public for driving a [`Net::handler`] by hand).
pub const RX_KICK: u64 = 0;
pub const TX_KICK: u64 = 1;
pub const TAP: u64 = 2;

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

/// A virtio network card on a tap.
pub struct Net {
    tap: Arc<Tap>,
    mac: [u8; 6],
    counters: Arc<Counters>,
    worker: Option<Worker<NetWorker>>,
}

/// What the card has seen since it was made, for diagnostics and tests.
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

#[derive(Default)]
struct Counters {
    rx_frames: AtomicU64,
    rx_dropped: AtomicU64,
    rx_bad_buffers: AtomicU64,
    tx_frames: AtomicU64,
    tx_dropped: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> NetStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        NetStats {
            rx_frames: get(&self.rx_frames),
            rx_dropped: get(&self.rx_dropped),
            rx_bad_buffers: get(&self.rx_bad_buffers),
            tx_frames: get(&self.tx_frames),
            tx_dropped: get(&self.tx_dropped),
        }
    }
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Net {
    /// Opens the tap `config.tap`; the MAC is `config.mac`, or a random locally administered one.
    pub fn new(config: &NetConfig) -> Result<Net> {
        Ok(Net::with_tap(Tap::open(&config.tap)?, config.mac))
    }

    /// A card on a tap that is already open.
    pub fn with_tap(tap: Tap, mac: Option<[u8; 6]>) -> Net {
        Net { tap: Arc::new(tap), mac: mac.unwrap_or_else(random_mac), counters: Arc::default(), worker: None }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }

    /// What [`VirtioDevice::activate`] runs on the worker thread, for driving by hand (register
    /// it with an epoll, then `handle` the tokens above): the fuzz targets and property tests
    /// serve the queues with it synchronously. The tap's offloads are left as they are.
    pub fn handler(&self, activation: Activation) -> std::result::Result<NetWorker, ActivateError> {
        let Activation { mem, queues, features, signals } = activation;
        let mut queues = queues.into_iter();
        let (Some(Some(rx)), Some(Some(tx))) = (queues.next(), queues.next()) else {
            return Err(ActivateError("the driver did not enable both the receive and the transmit queue".into()));
        };
        Ok(NetWorker::new(mem, rx, tx, Arc::clone(&self.tap), signals, features, Arc::clone(&self.counters)))
    }

    /// `virtio_net_config` up to `max_virtqueue_pairs`: the MAC, the link (always up; the tap
    /// itself says nothing we could report), and one queue pair.
    fn config_space(&self) -> [u8; 10] {
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config
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

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let config = self.config_space();
        let Some(tail) = usize::try_from(offset).ok().and_then(|offset| config.get(offset..)) else { return };
        let n = tail.len().min(data.len());
        data[..n].copy_from_slice(&tail[..n]);
    }

    fn activate(&mut self, activation: Activation) -> std::result::Result<(), ActivateError> {
        self.reset();
        let Activation { mem, queues, features, signals } = activation;
        if features & feature::VERSION_1 == 0 {
            return Err(ActivateError("the driver did not accept VIRTIO_F_VERSION_1; legacy virtio-net is not supported".into()));
        }
        let mut queues = queues.into_iter();
        let (Some(Some(rx)), Some(Some(tx))) = (queues.next(), queues.next()) else {
            return Err(ActivateError("the driver did not enable both the receive and the transmit queue".into()));
        };
        let name = self.tap.name().to_string();
        self.tap
            .set_offloads(tap_offloads(features))
            .map_err(|e| ActivateError(format!("tap {name} refused the offloads the driver accepted: {e}")))?;
        let handler = NetWorker::new(mem, rx, tx, Arc::clone(&self.tap), signals.clone(), features, Arc::clone(&self.counters));
        let worker = Worker::spawn(&format!("net-{name}"), handler, signals)
            .map_err(|e| ActivateError(format!("cannot start the worker thread for tap {name}: {e}")))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // The held receive buffers and the queues go with the handler; the tap stays ours.
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }
}

/// The card at work: both queues, the tap, and the receive buffers taken from the ring but
/// not yet filled.
pub struct NetWorker {
    mem: GuestMemoryMmap,
    rx: ActiveQueue,
    tx: ActiveQueue,
    tap: Arc<Tap>,
    signals: Signals,
    counters: Arc<Counters>,
    /// MRG_RXBUF: a frame may fill several receive chains.
    mergeable: bool,
    /// GUEST_CSUM: the driver takes frames with partial checksums and their header flags.
    guest_csum: bool,
    /// With mergeable buffers, the room held before we read a frame: the largest one the tap
    /// may give us, so that none is cut short for want of buffers the guest was about to post.
    rx_room_needed: usize,
    held: HeldBuffers,
    rx_used: UsedBatch,
    tap_polled: bool,
    tx_error_reported: bool,
}

impl NetWorker {
    fn new(
        mem: GuestMemoryMmap,
        rx: ActiveQueue,
        tx: ActiveQueue,
        tap: Arc<Tap>,
        signals: Signals,
        features: u64,
        counters: Arc<Counters>,
    ) -> NetWorker {
        let segmented = tap_offloads(features) & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0;
        NetWorker {
            mem,
            rx,
            tx,
            tap,
            signals,
            counters,
            mergeable: features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
            guest_csum: features & bit(VIRTIO_NET_F_GUEST_CSUM) != 0,
            rx_room_needed: if segmented { MAX_FRAME_LEN } else { MAX_UNSEGMENTED_FRAME_LEN },
            held: HeldBuffers::default(),
            rx_used: UsedBatch::default(),
            tap_polled: false,
            tx_error_reported: false,
        }
    }

    /// Sends every frame waiting in the transmit queue (up to a batch), then interrupts the
    /// guest once if it wants to hear.
    fn transmit(&mut self) -> std::result::Result<(), String> {
        let mut sent = 0;
        let mut more_promised = false;
        loop {
            self.tx.queue.disable_notification(&self.mem).map_err(ring_error("transmit"))?;
            let sent_before = sent;
            while let Some(chain) = next_chain(&mut self.tx.queue, &self.mem, "transmit")? {
                let head = chain.head_index();
                send(&self.mem, &self.tap, &self.counters, &mut self.tx_error_reported, chain);
                self.tx.queue.add_used(&self.mem, head, 0).map_err(ring_error("transmit"))?;
                sent += 1;
                if sent == BATCH {
                    // Come back for the rest after the other work: our own kick says when.
                    self.tx.kick.write(1).map_err(|e| format!("cannot re-kick the transmit queue: {e}"))?;
                    return self.notify_transmitted();
                }
            }
            // More was promised and nothing came: the available index moved backwards, as it
            // does when the guest lays it on the used ring's flags, which every pass writes.
            if more_promised && sent == sent_before {
                return Err("the transmit queue is unusable: its available index moved backwards (do the rings overlap?)".into());
            }
            // Frames queued between the last look and this call are seen by the loop.
            if !self.tx.queue.enable_notification(&self.mem).map_err(ring_error("transmit"))? {
                break;
            }
            more_promised = true;
        }
        self.notify_transmitted()
    }

    fn notify_transmitted(&mut self) -> std::result::Result<(), String> {
        if self.tx.queue.needs_notification(&self.mem).map_err(ring_error("transmit"))? {
            self.signals.used_queue(TX);
        }
        Ok(())
    }

    /// The tap has frames: deliver them while the guest has room, then publish the batch.
    fn receive(&mut self, epoll: &Epoll) -> std::result::Result<(), String> {
        for _ in 0..BATCH {
            if !self.rx_room_ready()? {
                self.poll_tap(epoll, false).map_err(|e| format!("cannot stop watching tap {}: {e}", self.tap.name()))?;
                break;
            }
            if !self.receive_frame()? {
                break;
            }
        }
        self.publish_received()
    }

    /// The guest posted receive buffers: take them, and watch the tap again if they make room.
    fn on_rx_kick(&mut self, epoll: &Epoll) -> std::result::Result<(), String> {
        let ready = self.rx_room_ready()?;
        // Chains unfit for frames go back at once.
        self.publish_received()?;
        if ready {
            self.poll_tap(epoll, true).map_err(|e| format!("cannot watch tap {}: {e}", self.tap.name()))?;
        }
        Ok(())
    }

    /// Takes receive chains from the ring until the next frame surely fits. When it doesn't,
    /// asks the driver for a kick when it posts more.
    fn rx_room_ready(&mut self) -> std::result::Result<bool, String> {
        // Honest drivers post at most a ring's worth between two looks; one that keeps us
        // busy with unfit chains waits for its next turn (our own kick).
        let mut budget = 2 * usize::from(self.rx.queue.size());
        loop {
            self.hold_rx_chains(&mut budget)?;
            if self.held.chains.is_empty() {
                // Nothing to read into.
            } else if !self.mergeable || self.held.room >= self.rx_room_needed || self.held.is_full() {
                return Ok(true);
            }
            if budget == 0 {
                self.rx.kick.write(1).map_err(|e| format!("cannot re-kick the receive queue: {e}"))?;
                return Ok(false);
            }
            if !self.rx.queue.enable_notification(&self.mem).map_err(ring_error("receive"))? {
                return Ok(false);
            }
        }
    }

    /// Moves chains from the receive ring into `held`, as many as one frame may need.
    fn hold_rx_chains(&mut self, budget: &mut usize) -> std::result::Result<(), String> {
        while *budget > 0 && self.wants_more_rx_room() {
            let Some(chain) = next_chain(&mut self.rx.queue, &self.mem, "receive")? else { break };
            *budget -= 1;
            let head = chain.head_index();
            match self.held.hold(&self.mem, chain) {
                Ok(Hold::Held) => {}
                Ok(Hold::NoRoom) => {
                    // Back to the ring, for when the held chains have been filled.
                    self.rx.queue.go_to_previous_position();
                    break;
                }
                Err(why) => {
                    tracing::debug!(tap = self.tap.name(), "returned a receive chain unused: {why}");
                    count(&self.counters.rx_bad_buffers);
                    self.rx_used.add(&self.rx.queue, &self.mem, head, 0)?;
                }
            }
        }
        Ok(())
    }

    fn wants_more_rx_room(&self) -> bool {
        if self.mergeable {
            self.held.room < MAX_FRAME_LEN && !self.held.is_full()
        } else {
            self.held.chains.is_empty()
        }
    }

    /// Reads one frame from the tap into the held buffers. `false` when the tap had none.
    fn receive_frame(&mut self) -> std::result::Result<bool, String> {
        // One byte of ours after the guest's buffers: the kernel cuts a frame too big for them
        // short without saying so, but a byte landing here says it.
        let mut spill = [0u8; 1];
        let iovecs = self.held.iovecs(&self.mem, self.mergeable, &mut spill)?;
        let room = iovecs.bytes() - 1;
        let len = match self.tap.read_frame(&iovecs) {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            // The kernel refused to cut the frame short, and dropped it.
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                self.drop_received(room);
                return Ok(true);
            }
            Err(e) => return Err(format!("cannot read from tap {}: {e}", self.tap.name())),
        };
        drop(iovecs);
        if len > room || len < VNET_HDR_LEN {
            // Cut short: what was written is garbage, and the buffers wait for the next frame.
            self.drop_received(room);
            return Ok(true);
        }
        self.deliver(len)?;
        Ok(true)
    }

    fn drop_received(&self, room: usize) {
        tracing::debug!(tap = self.tap.name(), "dropped a received frame larger than the {room} bytes of buffers the guest posted");
        count(&self.counters.rx_dropped);
    }

    /// The frame of `len` bytes is in the held buffers: finish its header and give the chains
    /// it filled back to the guest (published with the batch).
    fn deliver(&mut self, len: usize) -> std::result::Result<(), String> {
        let chains = self.held.chains_filled_by(len);
        // At most a ring's worth of chains, far below u16::MAX.
        let num_buffers = u16::try_from(chains).unwrap_or(u16::MAX);
        self.held.write_in_first(&self.mem, HDR_NUM_BUFFERS, &num_buffers.to_le_bytes())?;
        if !self.guest_csum {
            // A driver without GUEST_CSUM must see no header flags (spec 5.1.6.4.1).
            self.held.write_in_first(&self.mem, HDR_FLAGS, &[0])?;
        }
        let mut left = len;
        for _ in 0..chains {
            let Some(chain) = self.held.take_first() else { break };
            let used = chain.room.min(left);
            left -= used;
            // A chain holds at most 2^32 bytes, so `used` fits.
            self.rx_used.add(&self.rx.queue, &self.mem, chain.head, u32::try_from(used).unwrap_or(u32::MAX))?;
        }
        count(&self.counters.rx_frames);
        Ok(())
    }

    fn publish_received(&mut self) -> std::result::Result<(), String> {
        if self.rx_used.publish(&mut self.rx.queue, &self.mem)? {
            self.signals.used_queue(RX);
        }
        Ok(())
    }

    /// Starts or stops watching the tap: it is not watched while the guest has no room, so
    /// that its readiness can't spin the worker.
    fn poll_tap(&mut self, epoll: &Epoll, on: bool) -> io::Result<()> {
        if on == self.tap_polled {
            return Ok(());
        }
        let op = if on { ControlOperation::Add } else { ControlOperation::Delete };
        epoll.ctl(op, self.tap.as_raw_fd(), EpollEvent::new(EventSet::IN, TAP))?;
        self.tap_polled = on;
        Ok(())
    }
}

impl DeviceWorker for NetWorker {
    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        watch(epoll, &self.rx.kick, RX_KICK)?;
        watch(epoll, &self.tx.kick, TX_KICK)?;
        self.poll_tap(epoll, true)?;
        // Buffers and frames the driver queued before DRIVER_OK came with kicks nobody heard.
        self.rx.kick.write(1)?;
        self.tx.kick.write(1)
    }

    fn handle(&mut self, epoll: &Epoll, token: u64, events: EventSet) -> std::result::Result<(), String> {
        match token {
            RX_KICK => {
                drain(&self.rx.kick);
                self.on_rx_kick(epoll)
            }
            TX_KICK => {
                drain(&self.tx.kick);
                self.transmit()
            }
            // An event from before we stopped watching it.
            TAP if !self.tap_polled => Ok(()),
            TAP if events.intersects(EventSet::ERROR | EventSet::HANG_UP) => {
                Err(format!("tap {} failed or was deleted", self.tap.name()))
            }
            TAP => self.receive(epoll),
            _ => Ok(()),
        }
    }
}

/// Empties a kick eventfd; a kick is a hint to look at the ring, its count means nothing.
fn drain(kick: &EventFd) {
    let _ = kick.read();
}

fn ring_error(queue: &'static str) -> impl Fn(virtio_queue::Error) -> String {
    move |e| format!("the {queue} queue is unusable: {e}")
}

/// The next chain the driver made available. `Err` when the ring itself can't be walked: an
/// index further ahead than the ring is long, an entry outside memory, a head past the table.
fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    name: &'static str,
) -> std::result::Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, String> {
    let available = queue.avail_idx(mem, Ordering::Acquire).map_err(ring_error(name))?;
    if available.0 == queue.next_avail() {
        return Ok(None);
    }
    let chain = queue.iter(mem).map_err(ring_error(name))?.next();
    match chain {
        Some(chain) if chain.head_index() < queue.size() => Ok(Some(chain)),
        Some(chain) => Err(format!("the {name} queue is unusable: it names descriptor {} of {}", chain.head_index(), queue.size())),
        None => Err(format!("the {name} queue is unusable: its available ring can't be read")),
    }
}

/// One frame from the guest to the tap, or dropped and counted.
fn send(mem: &GuestMemoryMmap, tap: &Tap, counters: &Counters, error_reported: &mut bool, chain: DescriptorChain<&GuestMemoryMmap>) {
    let iovecs = match gather_frame(mem, chain) {
        Ok(iovecs) => iovecs,
        Err(why) => {
            tracing::debug!(tap = tap.name(), "dropped a transmitted frame: {why}");
            count(&counters.tx_dropped);
            return;
        }
    };
    match tap.write_frame(&iovecs) {
        Ok(_) => count(&counters.tx_frames),
        Err(e) => {
            // A tap that is down, a header the host's kernel finds invalid: the frame is lost
            // as on a real wire, and the guest's TCP sends it again.
            if !*error_reported {
                *error_reported = true;
                tracing::warn!("tap {} refused a frame from the guest ({e}); is it up? (ip link set {} up)", tap.name(), tap.name());
            }
            count(&counters.tx_dropped);
        }
    }
}

/// The frame a transmit chain holds (header first), as host iovecs, or why it must be dropped.
fn gather_frame<'m>(mem: &'m GuestMemoryMmap, chain: DescriptorChain<&'m GuestMemoryMmap>) -> std::result::Result<IoVecs<'m>, &'static str> {
    let mut iovecs = IoVecs::new();
    let mut cut_short = false;
    for descriptor in chain {
        cut_short = descriptor.has_next();
        if descriptor.is_write_only() {
            return Err("a transmit chain has a write-only descriptor");
        }
        let len = descriptor.len() as usize;
        if iovecs.bytes() + len > MAX_FRAME_LEN {
            return Err("a frame larger than 64 KiB");
        }
        for slice in mem.get_slices(descriptor.addr(), len) {
            let slice = slice.map_err(|_| "a transmit buffer lies outside guest memory")?;
            if iovecs.len() == MAX_IOVECS {
                return Err("a frame in more pieces than one writev takes");
            }
            iovecs.push(slice);
        }
    }
    if cut_short {
        // The chain iterator stops at a loop, or at a next index outside the table.
        return Err("a transmit chain loops or names a descriptor outside its table");
    }
    if iovecs.bytes() < VNET_HDR_LEN {
        return Err("a frame shorter than the virtio-net header");
    }
    Ok(iovecs)
}

/// Receive chains taken from the ring but not yet filled, oldest first. The guest may see
/// them filled only in this order, which is the order it posted them.
#[derive(Default)]
struct HeldBuffers {
    chains: VecDeque<HeldChain>,
    /// Every held chain's buffers, in order: (guest address, length), all checked to be in
    /// memory when taken.
    segments: VecDeque<(GuestAddress, usize)>,
    /// Bytes all held chains can take.
    room: usize,
}

struct HeldChain {
    head: u16,
    segments: usize,
    room: usize,
}

enum Hold {
    Held,
    /// Holding it would make more buffers than one readv takes; the chain is untouched.
    NoRoom,
}

impl HeldBuffers {
    /// Takes a receive chain's buffers, or says why the chain can't take a frame.
    fn hold(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> std::result::Result<Hold, &'static str> {
        let head = chain.head_index();
        let first = self.segments.len();
        let result = self.hold_segments(mem, chain);
        let room = match result {
            Ok(room) => room,
            Err(why) => {
                self.segments.truncate(first);
                return match why {
                    // Too many for what's held already, but it might do alone.
                    Unfitness::TooMany if first > 0 => Ok(Hold::NoRoom),
                    Unfitness::TooMany => Err("a receive chain in more pieces than one readv takes"),
                    Unfitness::Unfit(why) => Err(why),
                };
            }
        };
        self.chains.push_back(HeldChain { head, segments: self.segments.len() - first, room });
        self.room += room;
        Ok(Hold::Held)
    }

    fn hold_segments(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> std::result::Result<usize, Unfitness> {
        let mut room = 0usize;
        let mut cut_short = false;
        for descriptor in chain {
            cut_short = descriptor.has_next();
            if !descriptor.is_write_only() {
                return Err(Unfitness::Unfit("a receive chain has a read-only descriptor"));
            }
            let len = descriptor.len() as usize;
            if len == 0 {
                continue;
            }
            if !mem.check_range(descriptor.addr(), len) {
                return Err(Unfitness::Unfit("a receive buffer lies outside guest memory"));
            }
            if self.segments.len() == MAX_RX_SEGMENTS {
                return Err(Unfitness::TooMany);
            }
            self.segments.push_back((descriptor.addr(), len));
            room += len;
        }
        if cut_short {
            return Err(Unfitness::Unfit("a receive chain loops or names a descriptor outside its table"));
        }
        if room < VNET_HDR_LEN {
            return Err(Unfitness::Unfit("a receive chain too small for the virtio-net header"));
        }
        Ok(room)
    }

    /// No more buffers fit in one readv.
    fn is_full(&self) -> bool {
        self.segments.len() >= MAX_RX_SEGMENTS
    }

    /// Host iovecs over the held buffers (all of them, or the first chain's only), then `spill`.
    fn iovecs<'m>(&self, mem: &'m GuestMemoryMmap, all: bool, spill: &'m mut [u8]) -> std::result::Result<IoVecs<'m>, String> {
        let count = if all { self.segments.len() } else { self.chains.front().map_or(0, |c| c.segments) };
        let mut iovecs = IoVecs::new();
        'segments: for &(addr, len) in self.segments.iter().take(count) {
            for slice in mem.get_slices(addr, len) {
                // Checked when the chain was taken, and guest memory doesn't change under us.
                let slice = slice.map_err(|e| format!("a held receive buffer left guest memory: {e}"))?;
                if iovecs.len() == MAX_RX_SEGMENTS {
                    // A buffer split across memory regions: the frame gets the room before it.
                    break 'segments;
                }
                iovecs.push(slice);
            }
        }
        iovecs.push(VolatileSlice::from(spill));
        Ok(iovecs)
    }

    /// How many held chains, in order, a frame of `len` bytes fills.
    fn chains_filled_by(&self, len: usize) -> usize {
        let mut left = len;
        let mut chains = 0;
        for chain in &self.chains {
            if left == 0 && chains > 0 {
                break;
            }
            chains += 1;
            left = left.saturating_sub(chain.room);
        }
        chains
    }

    /// Writes `bytes` at `offset` into the first chain's buffers (the header's place, which may
    /// straddle buffers).
    fn write_in_first(&self, mem: &GuestMemoryMmap, offset: usize, bytes: &[u8]) -> std::result::Result<(), String> {
        let segments = self.chains.front().map_or(0, |c| c.segments);
        let (mut skip, mut bytes) = (offset, bytes);
        for &(addr, len) in self.segments.iter().take(segments) {
            if bytes.is_empty() {
                break;
            }
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = bytes.len().min(len - skip);
            let at = addr.checked_add(skip as u64).ok_or("a receive buffer wraps around the address space")?;
            mem.write_slice(&bytes[..n], at).map_err(|e| format!("cannot write a received frame's header: {e}"))?;
            bytes = &bytes[n..];
            skip = 0;
        }
        Ok(())
    }

    /// Forgets the first chain (it has been filled) and its buffers.
    fn take_first(&mut self) -> Option<HeldChain> {
        let chain = self.chains.pop_front()?;
        self.segments.drain(..chain.segments.min(self.segments.len()));
        self.room -= chain.room;
        Some(chain)
    }
}

/// Why a chain can't be held.
enum Unfitness {
    /// More buffers than fit beside those held already.
    TooMany,
    /// Not for any frame, ever.
    Unfit(&'static str),
}

/// Receive-queue used entries written but not yet published. The driver must see a frame's
/// chains all at once (it reads `num_buffers` from the first and expects the rest already
/// there), so the used index moves once per batch, as vhost does; `Queue::add_used` would
/// move it per entry.
#[derive(Default)]
struct UsedBatch {
    pending: u16,
}

/// Used ring layout (virtio spec 2.7.8): flags, idx, then 8-byte elements.
const USED_IDX: u64 = 2;
const USED_RING: u64 = 4;
/// The driver's used_event sits after the available ring's flags, idx and entries.
const AVAIL_RING: u64 = 4;

impl UsedBatch {
    fn add(&mut self, queue: &Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> std::result::Result<(), String> {
        let slot = queue.next_used().wrapping_add(self.pending).checked_rem(queue.size()).ok_or("the receive queue has size 0")?;
        let addr = GuestAddress(queue.used_ring())
            .checked_add(USED_RING + 8 * u64::from(slot))
            .ok_or("the receive queue's used ring wraps around the address space")?;
        let mut element = [0u8; 8];
        element[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        element[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&element, addr).map_err(|e| format!("the receive queue is unusable: its used ring can't be written: {e}"))?;
        self.pending = self.pending.wrapping_add(1);
        Ok(())
    }

    /// Moves the used index past the pending entries. Returns whether the driver asked to be
    /// interrupted for them (its used_event among them, with EVENT_IDX).
    fn publish(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> std::result::Result<bool, String> {
        if self.pending == 0 {
            return Ok(false);
        }
        let old = Wrapping(queue.next_used());
        let new = old + Wrapping(self.pending);
        let idx = GuestAddress(queue.used_ring()).checked_add(USED_IDX).ok_or("the receive queue's used ring wraps around the address space")?;
        // Release: the entries and the frames in the buffers are visible before the index.
        mem.store(u16::to_le(new.0), idx, Ordering::Release)
            .map_err(|e| format!("the receive queue is unusable: its used index can't be written: {e}"))?;
        queue.set_next_used(new.0);
        self.pending = 0;
        if !queue.event_idx_enabled() {
            return Ok(true);
        }
        // The index store must be seen before we read what the driver wants (it does the
        // mirror image), or both sides may miss each other's update.
        fence(Ordering::SeqCst);
        let used_event = GuestAddress(queue.avail_ring())
            .checked_add(AVAIL_RING + 2 * u64::from(queue.size()))
            .ok_or("the receive queue's available ring wraps around the address space")?;
        let used_event: u16 = mem
            .load(used_event, Ordering::Acquire)
            .map_err(|e| format!("the receive queue is unusable: its used_event can't be read: {e}"))?;
        // vring_need_event: did the index pass used_event on its way from old to new?
        Ok(new - Wrapping(u16::from_le(used_event)) - Wrapping(1) < new - old)
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::OwnedFd;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::mock::MockSplitQueue;

    const MEM_SIZE: usize = 0x100_0000;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    /// Everything we offer, as a Linux driver accepts it.
    const LINUX: u64 = OFFERED_FEATURES | feature::VERSION_1 | feature::RING_EVENT_IDX;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
    }

    /// The driver's side of one queue: it posts chains and reads the used ring, in raw memory,
    /// so that it can write whatever a hostile driver would.
    struct Driver {
        mem: GuestMemoryMmap,
        desc: u64,
        avail: u64,
        used: u64,
        next_desc: u16,
        avail_idx: u16,
        next_buffer: u64,
    }

    impl Driver {
        fn new(mem: &GuestMemoryMmap, ring_at: u64, buffers_at: u64) -> (Driver, Queue) {
            let mock = MockSplitQueue::create(mem, GuestAddress(ring_at), QUEUE_SIZE);
            let queue: Queue = mock.create_queue().expect("queue");
            let driver = Driver {
                mem: mem.clone(),
                desc: mock.desc_table_addr().0,
                avail: mock.avail_addr().0,
                used: mock.used_addr().0,
                next_desc: 0,
                avail_idx: 0,
                next_buffer: buffers_at,
            };
            (driver, queue)
        }

        fn buffer(&mut self, len: u32) -> u64 {
            let at = self.next_buffer;
            self.next_buffer += u64::from(len).next_multiple_of(64);
            at
        }

        /// Posts one chain of descriptors (address, length, flags, next): NEXT and the next
        /// index are filled in to link them in order, unless `next` is given.
        fn post_descriptors(&mut self, descriptors: &[(u64, u32, u16, Option<u16>)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, flags, next)) in descriptors.iter().enumerate() {
                let index = self.next_desc;
                self.next_desc = (self.next_desc + 1) % QUEUE_SIZE;
                let last = i + 1 == descriptors.len();
                let (flags, next) = match next {
                    Some(next) => (flags | NEXT, next),
                    None if last => (flags, 0),
                    None => (flags | NEXT, self.next_desc),
                };
                let mut raw = [0u8; 16];
                raw[..8].copy_from_slice(&addr.to_le_bytes());
                raw[8..12].copy_from_slice(&len.to_le_bytes());
                raw[12..14].copy_from_slice(&flags.to_le_bytes());
                raw[14..].copy_from_slice(&next.to_le_bytes());
                self.mem.write_slice(&raw, GuestAddress(self.desc + 16 * u64::from(index))).expect("descriptor");
            }
            self.publish(head);
            head
        }

        fn publish(&mut self, head: u16) {
            let slot = u64::from(self.avail_idx % QUEUE_SIZE);
            self.mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot)).expect("avail entry");
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.set_avail_idx(self.avail_idx);
        }

        fn set_avail_idx(&self, idx: u16) {
            self.mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2)).expect("avail idx");
        }

        fn set_used_event(&self, value: u16) {
            self.mem.write_obj(value.to_le(), GuestAddress(self.avail + 4 + 2 * u64::from(QUEUE_SIZE))).expect("used_event");
        }

        /// A frame to send, in one readable buffer per piece.
        fn post_frame(&mut self, pieces: &[&[u8]]) -> u16 {
            let descriptors: Vec<_> = pieces
                .iter()
                .map(|piece| {
                    let len = u32::try_from(piece.len()).expect("small piece");
                    let at = self.buffer(len.max(1));
                    self.mem.write_slice(piece, GuestAddress(at)).expect("frame");
                    (at, len, 0, None)
                })
                .collect();
            self.post_descriptors(&descriptors)
        }

        /// An empty receive chain of one writable buffer; returns its head and address.
        fn post_rx_buffer(&mut self, len: u32) -> (u16, u64) {
            let at = self.buffer(len);
            (self.post_descriptors(&[(at, len, WRITE, None)]), at)
        }

        /// The used ring's entries: (head, length).
        fn used(&self) -> Vec<(u32, u32)> {
            let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).expect("used idx");
            (0..idx)
                .map(|i| {
                    let at = GuestAddress(self.used + 4 + 8 * u64::from(i % QUEUE_SIZE));
                    let element: [u32; 2] = self.mem.read_obj(at).expect("used element");
                    (u32::from_le(element[0]), u32::from_le(element[1]))
                })
                .collect()
        }

        fn read(&self, at: u64, len: usize) -> Vec<u8> {
            let mut bytes = vec![0u8; len];
            self.mem.read_slice(&mut bytes, GuestAddress(at)).expect("guest bytes");
            bytes
        }
    }

    /// A header (no offloads) and an Ethernet frame of `len` bytes with a recognisable body.
    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut bytes = vec![0u8; VNET_HDR_LEN];
        bytes.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
        bytes
    }

    /// A worker driven by hand, on this thread, with a socket standing in for the tap.
    struct Bench {
        rx: Driver,
        tx: Driver,
        worker: NetWorker,
        epoll: Epoll,
        host: File,
        signals: Signals,
        counters: Arc<Counters>,
    }

    impl Bench {
        fn new(features: u64) -> Bench {
            Bench::with_queues(features, |_, _| {})
        }

        fn with_queues(features: u64, adjust: impl FnOnce(&mut Queue, &mut Queue)) -> Bench {
            let mem = memory();
            let (rx, mut rx_queue) = Driver::new(&mem, 0, 0x10_0000);
            let (tx, mut tx_queue) = Driver::new(&mem, 0x1_0000, 0x80_0000);
            adjust(&mut rx_queue, &mut tx_queue);
            let (tap, host) = Tap::socket_pair().expect("socketpair");
            let signals = Signals::standalone(2);
            let counters = Arc::<Counters>::default();
            let kick = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            let mut worker = NetWorker::new(
                mem,
                ActiveQueue { queue: rx_queue, kick: kick() },
                ActiveQueue { queue: tx_queue, kick: kick() },
                Arc::new(tap),
                signals.clone(),
                features,
                Arc::clone(&counters),
            );
            let epoll = Epoll::new().expect("epoll");
            worker.register(&epoll).expect("register");
            Bench { rx, tx, worker, epoll, host: File::from(host), signals, counters }
        }

        fn handle(&mut self, token: u64) -> std::result::Result<(), String> {
            self.worker.handle(&self.epoll, token, EventSet::IN)
        }

        fn transmit(&mut self) {
            self.handle(TX_KICK).expect("transmit");
        }

        fn tap_readable(&mut self) {
            self.handle(TAP).expect("receive");
        }

        fn stats(&self) -> NetStats {
            self.counters.snapshot()
        }

        /// The host sends a frame into the tap.
        fn host_sends(&self, frame: &[u8]) {
            assert_eq!(io::Write::write(&mut &self.host, frame).expect("host send"), frame.len());
        }

        /// Frames the guest sent, as the host's side of the tap sees them.
        fn host_receives(&self) -> Vec<Vec<u8>> {
            let mut frames = Vec::new();
            let mut buffer = vec![0u8; 2 * MAX_FRAME_LEN];
            while let Ok(len) = io::Read::read(&mut &self.host, &mut buffer) {
                frames.push(buffer[..len].to_vec());
            }
            frames
        }
    }

    #[test]
    fn offers_offloads_and_mergeable_buffers_and_sets_the_tap_to_match() {
        let offered = OFFERED_FEATURES;
        for f in [VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF] {
            assert_ne!(offered & bit(f), 0, "feature {f}");
        }
        assert_eq!(offered & bit(VIRTIO_NET_F_CTRL_VQ), 0, "no control queue is implemented");
        let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
        assert_eq!(tap_offloads(LINUX), all);
        assert_eq!(tap_offloads(LINUX & !bit(VIRTIO_NET_F_GUEST_CSUM)), 0, "segments need partial checksums");
        assert_eq!(tap_offloads(LINUX & !bit(VIRTIO_NET_F_GUEST_TSO4) & !bit(VIRTIO_NET_F_GUEST_TSO6)), libc::TUN_F_CSUM);
        assert_eq!(tap_offloads(feature::VERSION_1), 0);
    }

    #[test]
    fn config_space_has_the_mac_a_link_that_is_up_and_one_queue_pair() {
        let (tap, _host) = Tap::socket_pair().expect("socketpair");
        let net = Net::with_tap(tap, Some([0x52, 0x54, 0, 1, 2, 3]));
        let mut config = [0xffu8; 12];
        net.read_config(0, &mut config);
        assert_eq!(config, [0x52, 0x54, 0, 1, 2, 3, 1, 0, 1, 0, 0, 0]);
        let mut status = [0u8; 2];
        net.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16);
        let mut past = [0xffu8; 4];
        net.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0; 4], "bytes past the end read as zero");
        assert_eq!((net.device_type(), net.queue_max_sizes()), (device_type::NET, &[256u16, 256][..]));
    }

    #[test]
    fn a_random_mac_is_unicast_locally_administered_and_differs() {
        let (a, b) = (random_mac(), random_mac());
        assert_eq!(a[..3], [0x52, 0x54, 0x00]);
        assert_eq!(a[0] & 1, 0, "unicast");
        assert_eq!(a[0] & 2, 2, "locally administered");
        // Three random bytes: a clash is a one in sixteen million event.
        assert_ne!(a, b);
    }

    #[test]
    fn transmitted_frames_reach_the_tap_whole_and_are_returned() {
        let mut bench = Bench::new(LINUX);
        let first = frame(100, 1);
        let second = frame(300, 2);
        let h1 = bench.tx.post_frame(&[&first[..VNET_HDR_LEN], &first[VNET_HDR_LEN..]]);
        // A header split over two buffers, an empty buffer, and the rest.
        let h2 = bench.tx.post_frame(&[&second[..5], &second[5..40], &[], &second[40..]]);
        bench.transmit();
        assert_eq!(bench.host_receives(), vec![first, second]);
        assert_eq!(bench.tx.used(), vec![(u32::from(h1), 0), (u32::from(h2), 0)]);
        assert_eq!(bench.signals.take_queue_interrupts(TX), 1, "one interrupt for the batch");
        assert_eq!(bench.stats().tx_frames, 2);
    }

    #[test]
    fn malformed_transmit_chains_are_dropped_and_counted_and_the_queue_goes_on() {
        let mut bench = Bench::new(LINUX);
        let good = frame(60, 3);
        let tx = &mut bench.tx;
        let header = tx.buffer(12);
        let body = tx.buffer(100);
        let big = tx.buffer(65551);
        let mut heads = vec![
            tx.post_descriptors(&[(header, 12, 0, None), (body, 100, WRITE, None)]),
            tx.post_descriptors(&[(header, 5, 0, None)]),
            tx.post_descriptors(&[(header, 12, 0, None), (big, 65551, 0, None)]),
            tx.post_descriptors(&[(header, 12, 0, None), (MEM_SIZE as u64 - 8, 100, 0, None)]),
            tx.post_descriptors(&[(u64::MAX - 4, 100, 0, None)]),
        ];
        // A chain whose second descriptor points back at its first.
        let looping = tx.next_desc;
        heads.push(tx.post_descriptors(&[(header, 12, 0, None), (body, 100, 0, Some(looping))]));
        heads.push(tx.post_descriptors(&[(header, 12, 0, Some(QUEUE_SIZE + 10))]));
        let bad = heads.len() as u64;
        heads.push(tx.post_frame(&[&good]));
        bench.transmit();
        assert_eq!(bench.host_receives(), vec![good], "only the good frame goes out");
        let used: Vec<_> = heads.iter().map(|&h| (u32::from(h), 0)).collect();
        assert_eq!(bench.tx.used(), used, "every chain is returned");
        assert_eq!((bench.stats().tx_dropped, bench.stats().tx_frames), (bad, 1));
    }

    #[test]
    fn a_full_transmit_queue_is_served_in_batches_without_starving_receive() {
        let mut bench = Bench::new(LINUX);
        let frames: Vec<_> = (0..100).map(|i| frame(60, i)).collect();
        for f in &frames {
            bench.tx.post_frame(&[f]);
        }
        bench.transmit();
        assert_eq!(bench.host_receives().len(), BATCH);
        assert_eq!(bench.worker.tx.kick.read().expect("the worker kicked itself"), 1);
        bench.transmit();
        assert_eq!(bench.host_receives().len(), 100 - BATCH);
        assert_eq!(bench.tx.used().len(), 100);
    }

    #[test]
    fn a_transmit_ring_that_claims_more_than_it_holds_breaks_the_device() {
        let mut bench = Bench::new(LINUX);
        bench.tx.set_avail_idx(QUEUE_SIZE + 1);
        let err = bench.handle(TX_KICK).expect_err("an unusable ring");
        assert!(err.contains("transmit queue is unusable"), "{err}");
    }

    /// Posts enough 2 KiB receive buffers for a 64 KiB segment, as Linux does.
    fn post_linux_rx_buffers(driver: &mut Driver, count: usize) -> Vec<(u16, u64)> {
        (0..count).map(|_| driver.post_rx_buffer(2048)).collect()
    }

    #[test]
    fn a_received_frame_fills_mergeable_buffers_in_order() {
        let mut bench = Bench::new(LINUX);
        let buffers = post_linux_rx_buffers(&mut bench.rx, 40);
        let mut big = frame(3000, 5);
        big[HDR_NUM_BUFFERS..VNET_HDR_LEN].copy_from_slice(&[0xff, 0xff]);
        bench.host_sends(&big);
        bench.tap_readable();
        let [(h0, a0), (h1, a1), (h2, a2)] = [buffers[0], buffers[1], buffers[2]];
        assert_eq!(bench.rx.used(), vec![(u32::from(h0), 2048), (u32::from(h1), 964)]);
        let mut landed = bench.rx.read(a0, 2048);
        landed.extend(bench.rx.read(a1, 964));
        assert_eq!(landed[HDR_NUM_BUFFERS..VNET_HDR_LEN], [2, 0], "num_buffers");
        assert_eq!(landed[VNET_HDR_LEN..], big[VNET_HDR_LEN..]);
        assert_eq!(bench.signals.take_queue_interrupts(RX), 1);

        let small = frame(100, 6);
        bench.host_sends(&small);
        bench.tap_readable();
        assert_eq!(bench.rx.used()[2], (u32::from(h2), 112));
        assert_eq!(bench.rx.read(a2, 112)[HDR_NUM_BUFFERS..], [[1, 0].as_slice(), &small[VNET_HDR_LEN..]].concat());
        assert_eq!(bench.stats().rx_frames, 2);
    }

    #[test]
    fn frames_wait_in_the_tap_until_the_guest_posts_room_for_them() {
        let mut bench = Bench::new(LINUX);
        // 20 KiB: not room enough for the 64 KiB segment the tap may hand over next.
        let first = post_linux_rx_buffers(&mut bench.rx, 10);
        let sent = frame(500, 7);
        bench.host_sends(&sent);
        bench.tap_readable();
        assert!(!bench.worker.tap_polled, "the tap is not watched while there is no room");
        assert!(bench.rx.used().is_empty());
        // An event that was already queued for the tap is ignored.
        bench.tap_readable();
        assert!(bench.rx.used().is_empty());

        post_linux_rx_buffers(&mut bench.rx, 30);
        bench.handle(RX_KICK).expect("receive kick");
        assert!(bench.worker.tap_polled, "room again: the tap is watched again");
        bench.tap_readable();
        assert_eq!(bench.rx.used(), vec![(u32::from(first[0].0), 512)]);
        assert_eq!(bench.rx.read(first[0].1 + VNET_HDR_LEN as u64, 500), sent[VNET_HDR_LEN..]);
        assert_eq!(bench.stats().rx_dropped, 0, "nothing was lost while waiting");
    }

    #[test]
    fn without_segmentation_offloads_an_mtu_of_room_is_enough() {
        let mut bench = Bench::new(feature::VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_GUEST_CSUM));
        let (head, _) = bench.rx.post_rx_buffer(1600);
        bench.host_sends(&frame(1514, 8));
        bench.tap_readable();
        assert_eq!(bench.rx.used(), vec![(u32::from(head), 1526)]);
    }

    #[test]
    fn without_mergeable_buffers_each_frame_takes_one_chain() {
        let mut bench = Bench::new(LINUX & !bit(VIRTIO_NET_F_MRG_RXBUF));
        let (h0, a0) = {
            let rx = &mut bench.rx;
            let header = rx.buffer(12);
            let body = rx.buffer(65550);
            (rx.post_descriptors(&[(header, 12, WRITE, None), (body, 65550, WRITE, None)]), body)
        };
        let (h1, _) = bench.rx.post_rx_buffer(1000);
        let sent = frame(40000, 9);
        bench.host_sends(&sent);
        bench.host_sends(&frame(100, 10));
        bench.tap_readable();
        assert_eq!(bench.rx.used(), vec![(u32::from(h0), 40012), (u32::from(h1), 112)]);
        assert_eq!(bench.rx.read(a0, 40000), sent[VNET_HDR_LEN..]);
    }

    #[test]
    fn a_driver_without_guest_csum_sees_no_header_flags() {
        let mut bench = Bench::new(feature::VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF));
        let (_, at) = bench.rx.post_rx_buffer(2048);
        let mut sent = frame(60, 11);
        sent[HDR_FLAGS] = VIRTIO_NET_HDR_F_DATA_VALID as u8;
        bench.host_sends(&sent);
        bench.tap_readable();
        assert_eq!(bench.rx.read(at, 1), [0]);
    }

    #[test]
    fn unfit_receive_chains_go_back_unused_and_the_queue_goes_on() {
        let mut bench = Bench::new(LINUX);
        let rx = &mut bench.rx;
        let some = rx.buffer(2048);
        let looping = rx.next_desc;
        let bad = [
            rx.post_descriptors(&[(some, 2048, 0, None)]),
            rx.post_descriptors(&[(MEM_SIZE as u64 - 100, 2048, WRITE, None)]),
            rx.post_descriptors(&[(some, 8, WRITE, None)]),
            rx.post_descriptors(&[(some, 2048, WRITE, Some(looping + 3))]),
        ];
        let good = post_linux_rx_buffers(rx, 40);
        bench.host_sends(&frame(200, 12));
        bench.tap_readable();
        let mut expected: Vec<_> = bad.iter().map(|&h| (u32::from(h), 0)).collect();
        expected.push((u32::from(good[0].0), 212));
        assert_eq!(bench.rx.used(), expected);
        assert_eq!(bench.stats().rx_bad_buffers, 4);
        assert_eq!(bench.signals.take_queue_interrupts(RX), 1, "one interrupt for the batch");
    }

    #[test]
    fn with_event_idx_the_guest_is_interrupted_only_when_it_asked() {
        let mut bench = Bench::with_queues(LINUX, |rx, _| rx.set_event_idx(true));
        post_linux_rx_buffers(&mut bench.rx, 40);
        bench.rx.set_used_event(1);
        bench.host_sends(&frame(60, 13));
        bench.tap_readable();
        assert_eq!(bench.signals.take_queue_interrupts(RX), 0, "used_event 1: not yet");
        bench.host_sends(&frame(60, 14));
        bench.tap_readable();
        assert_eq!(bench.signals.take_queue_interrupts(RX), 1, "the index passed used_event");
    }

    #[test]
    fn a_receive_ring_that_claims_more_than_it_holds_breaks_the_device() {
        let mut bench = Bench::new(LINUX);
        bench.rx.set_avail_idx(QUEUE_SIZE + 1);
        let err = bench.handle(RX_KICK).expect_err("an unusable ring");
        assert!(err.contains("receive queue is unusable"), "{err}");
    }

    /// A device on a socket pair, with kick eventfds the test keeps a copy of.
    fn activation(mem: &GuestMemoryMmap, features: u64) -> (Activation, Driver, Driver, EventFd) {
        let (rx, rx_queue) = Driver::new(mem, 0, 0x10_0000);
        let (tx, tx_queue) = Driver::new(mem, 0x1_0000, 0x80_0000);
        let kick = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let tx_kick = kick();
        let trigger = tx_kick.try_clone().expect("clone");
        let queues = vec![Some(ActiveQueue { queue: rx_queue, kick: kick() }), Some(ActiveQueue { queue: tx_queue, kick: tx_kick })];
        (Activation { mem: mem.clone(), queues, features, signals: Signals::standalone(2) }, rx, tx, trigger)
    }

    /// Waits (bounded) for `fd` to become readable.
    fn wait_readable(fd: &impl AsRawFd) -> bool {
        let mut poll = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll reads and writes the one pollfd we pass.
        unsafe { libc::poll(&mut poll, 1, 10_000) == 1 }
    }

    #[test]
    fn activation_serves_frames_queued_before_it_and_reset_keeps_the_tap() {
        let (tap, host) = Tap::socket_pair().expect("socketpair");
        let host = File::from(host);
        let mut net = Net::with_tap(tap, None);
        for round in 0..2u8 {
            let mem = memory();
            let (activation, _rx, mut tx, _kick) = activation(&mem, LINUX);
            let sent = frame(80, round);
            tx.post_frame(&[&sent]);
            net.activate(activation).expect("activate");
            assert!(wait_readable(&host), "the frame posted before DRIVER_OK goes out");
            let mut got = vec![0u8; 256];
            let len = io::Read::read(&mut &host, &mut got).expect("host read");
            assert_eq!(got[..len], sent[..]);
            net.reset();
            net.reset();
        }
        assert_eq!(net.stats().tx_frames, 2);
    }

    #[test]
    fn activation_refuses_a_legacy_driver_or_a_missing_queue() {
        let (tap, _host) = Tap::socket_pair().expect("socketpair");
        let mut net = Net::with_tap(tap, None);
        let mem = memory();
        let (legacy, ..) = activation(&mem, LINUX & !feature::VERSION_1);
        assert!(net.activate(legacy).expect_err("legacy").0.contains("VERSION_1"));
        let (mut missing, ..) = activation(&mem, LINUX);
        missing.queues[TX] = None;
        assert!(net.activate(missing).expect_err("no tx queue").0.contains("both"));
    }

    /// A real tap in a network namespace of this thread's own, so that the host's interfaces
    /// are never touched; the host's side of the wire is a packet socket on the tap.
    mod real_tap {
        use super::*;

        const ETHERTYPE: [u8; 2] = [0x88, 0xb5]; // local experimental
        const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];
        const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

        fn ethernet(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
            let mut bytes = [&dst[..], &src, &ETHERTYPE, payload].concat();
            bytes.resize(bytes.len().max(60), 0);
            bytes
        }

        /// Moves this thread into a new network namespace, or says why it can't.
        fn private_network() -> std::result::Result<(), String> {
            // SAFETY: unshare takes no pointers; CLONE_NEWNET changes only this thread's view.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!("cannot make a network namespace: {}", io::Error::last_os_error()));
            }
            // Keep IPv6's router solicitations off the wire; harmless if IPv6 is absent.
            let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
            Ok(())
        }

        fn packet_socket(ifname: &str) -> OwnedFd {
            let protocol = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: socket takes no pointers; the fd is checked.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, i32::from(protocol)) };
            assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
            // SAFETY: a fresh fd nobody else owns.
            let socket = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let name = std::ffi::CString::new(ifname).expect("name");
            // SAFETY: sockaddr_ll is plain data; zero is valid.
            let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_protocol = protocol;
            // SAFETY: reads the NUL-terminated name we own.
            address.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
            let size = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: bind reads `size` bytes of the address we pass.
            let ret = unsafe { libc::bind(fd, (&address as *const libc::sockaddr_ll).cast(), size) };
            assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
            socket
        }

        /// Waits for a frame with our EtherType carrying `payload`, skipping the host's chatter.
        fn host_receives(socket: &OwnedFd, payload: &[u8]) -> Vec<u8> {
            let socket = File::from(socket.try_clone().expect("dup"));
            let mut buffer = vec![0u8; 70000];
            loop {
                assert!(wait_readable(&socket), "no frame with our payload reached the host");
                let Ok(len) = io::Read::read(&mut &socket, &mut buffer) else { continue };
                if carries(&buffer[..len], payload) {
                    return buffer[..len].to_vec();
                }
            }
        }

        fn wait_until(what: impl Fn() -> bool) -> bool {
            (0..2000).any(|_| {
                let done = what();
                if !done {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                done
            })
        }

        /// Whether an Ethernet frame is ours and carries `payload`.
        fn carries(frame: &[u8], payload: &[u8]) -> bool {
            frame.len() >= 14 + payload.len() && frame[12..14] == ETHERTYPE && &frame[14..14 + payload.len()] == payload
        }

        /// The frame (header first) in a used receive buffer that carries `payload`, if any.
        fn guest_received(rx: &Driver, buffers: &[(u16, u64)], payload: &[u8]) -> Option<Vec<u8>> {
            rx.used().iter().find_map(|&(head, len)| {
                let &(_, at) = buffers.iter().find(|&&(h, _)| u32::from(h) == head)?;
                let got = rx.read(at, len as usize);
                carries(got.get(VNET_HDR_LEN..)?, payload).then_some(got)
            })
        }

        fn carry_frames_both_ways() -> std::result::Result<(), String> {
            private_network()?;
            let tap = Tap::open("lgtest0").map_err(|e| format!("cannot open a tap: {e}"))?;
            let busy = Tap::open("lgtest0").expect_err("a tap serves one VM");
            assert!(busy.to_string().contains("already in use"), "{busy}");
            let not_a_tap = Tap::open("lo").expect_err("lo is no tap");
            assert!(not_a_tap.to_string().contains("not a single-queue tap"), "{not_a_tap}");
            let wire = packet_socket("lgtest0");

            let mut net = Net::with_tap(tap, Some(GUEST_MAC));
            let mem = memory();
            let (activation, mut rx, mut tx, tx_kick) = activation(&mem, LINUX);
            let buffers = post_linux_rx_buffers(&mut rx, 60);
            net.activate(activation).map_err(|e| format!("activation: {e}"))?;

            // Guest to host.
            let out = ethernet([0xff; 6], GUEST_MAC, b"lguest says hello");
            tx.post_frame(&[&[0u8; VNET_HDR_LEN], &out]);
            tx_kick.write(1).expect("kick");
            assert_eq!(host_receives(&wire, b"lguest says hello"), out);

            // Host to guest.
            let back = ethernet(GUEST_MAC, HOST_MAC, b"the host answers");
            // SAFETY: send reads `back.len()` bytes of the buffer we own.
            let sent = unsafe { libc::send(wire.as_raw_fd(), back.as_ptr().cast(), back.len(), 0) };
            assert_eq!(usize::try_from(sent).ok(), Some(back.len()), "send: {}", io::Error::last_os_error());
            assert!(wait_until(|| guest_received(&rx, &buffers, b"the host answers").is_some()), "the frame reached the guest");
            let got = guest_received(&rx, &buffers, b"the host answers").expect("received");
            assert_eq!(got[HDR_NUM_BUFFERS..VNET_HDR_LEN], [1, 0], "num_buffers");
            assert_eq!(got[VNET_HDR_LEN..], back[..]);
            assert_eq!(net.stats().rx_dropped, 0);
            net.reset();
            Ok(())
        }

        fn drop_a_frame_too_big_for_the_buffers() -> std::result::Result<(), String> {
            private_network()?;
            let tap = Tap::open("lgtest1").map_err(|e| format!("cannot open a tap: {e}"))?;
            let wire = packet_socket("lgtest1");
            let mut net = Net::with_tap(tap, Some(GUEST_MAC));
            let mem = memory();
            // No mergeable buffers and no offloads: each frame must fit one small chain.
            let (activation, mut rx, ..) = activation(&mem, feature::VERSION_1);
            let buffers: Vec<_> = (0..8).map(|_| rx.post_rx_buffer(300)).collect();
            net.activate(activation).map_err(|e| format!("activation: {e}"))?;
            for frame in [ethernet(GUEST_MAC, HOST_MAC, &[b'x'; 1000]), ethernet(GUEST_MAC, HOST_MAC, b"small enough")] {
                // SAFETY: send reads `frame.len()` bytes of the buffer we own.
                let sent = unsafe { libc::send(wire.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
                assert_eq!(usize::try_from(sent).ok(), Some(frame.len()), "send: {}", io::Error::last_os_error());
            }
            assert!(wait_until(|| guest_received(&rx, &buffers, b"small enough").is_some()), "the small frame got through");
            assert_eq!(net.stats().rx_dropped, 1, "the big one was dropped and counted");
            assert!(guest_received(&rx, &buffers, &[b'x'; 20]).is_none());
            net.reset();
            Ok(())
        }

        /// An Ethernet frame with one TCP segment of `payload` bytes between link-local
        /// addresses, and the virtio-net header that offloads its checksum and segmentation.
        fn tcp_segment(dst: [u8; 6], src: [u8; 6], payload: usize) -> ([u8; VNET_HDR_LEN], Vec<u8>) {
            let ip_len = u16::try_from(40 + payload).expect("fits an IP packet");
            let mut ip = [0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 169, 254, 1, 1, 169, 254, 1, 2];
            ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
            let sum = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
            let sum = !((sum & 0xffff) + (sum >> 16)) as u16;
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            // Ports, sequence, acknowledgement, data offset 5, ACK|PSH, window; the checksum
            // is left to the offload.
            let tcp = [0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0];
            let body: Vec<u8> = (0..payload).map(|i| (i % 251) as u8).collect();
            let frame = [&dst[..], &src, &[0x08, 0x00], &ip, &tcp, &body].concat();
            let mut header = [0u8; VNET_HDR_LEN];
            header[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
            header[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
            header[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
            header[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
            header[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
            header[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
            (header, frame)
        }

        fn carry_64k_segments_unsplit() -> std::result::Result<(), String> {
            private_network()?;
            let tap = Tap::open("lgtest2").map_err(|e| format!("cannot open a tap: {e}"))?;
            let wire = packet_socket("lgtest2");
            let mut net = Net::with_tap(tap, Some(GUEST_MAC));
            let mem = memory();
            let (activation, mut rx, mut tx, tx_kick) = activation(&mem, LINUX);
            let buffers = post_linux_rx_buffers(&mut rx, 100);
            net.activate(activation).map_err(|e| format!("activation: {e}"))?;

            // Guest to host: the host's stack takes the 60 KB segment whole.
            let (header, out) = tcp_segment([0xff; 6], GUEST_MAC, 60000);
            tx.post_frame(&[&header, &out[..100], &out[100..]]);
            tx_kick.write(1).expect("kick");
            let socket = File::from(wire.try_clone().expect("dup"));
            let mut got = vec![0u8; 70000];
            let len = loop {
                assert!(wait_readable(&socket), "the segment never reached the host");
                let Ok(len) = io::Read::read(&mut &socket, &mut got) else { continue };
                if len > 14 && got[12..14] == [0x08, 0x00] {
                    break len;
                }
            };
            assert_eq!(got[..len].len(), out.len(), "one frame, not segmented on the way");
            assert_eq!(got[54..len], out[54..]);

            // Host to guest: a packet socket with a virtio-net header of its own sends a 60 KB
            // segment out of the tap, which hands it to us unsplit as the guest accepted TSO4.
            const PACKET_VNET_HDR: libc::c_int = 15;
            let on: libc::c_int = 1;
            // SAFETY: setsockopt reads one int, which `on` is.
            let ret = unsafe {
                libc::setsockopt(wire.as_raw_fd(), libc::SOL_PACKET, PACKET_VNET_HDR, (&on as *const libc::c_int).cast(), 4)
            };
            assert_eq!(ret, 0, "PACKET_VNET_HDR: {}", io::Error::last_os_error());
            let (header, back) = tcp_segment(GUEST_MAC, HOST_MAC, 60000);
            let packet = [&header[..10], &back].concat();
            // SAFETY: send reads `packet.len()` bytes of the buffer we own.
            let sent = unsafe { libc::send(wire.as_raw_fd(), packet.as_ptr().cast(), packet.len(), 0) };
            assert_eq!(usize::try_from(sent).ok(), Some(packet.len()), "send: {}", io::Error::last_os_error());
            let first_used = |rx: &Driver| {
                rx.used().into_iter().position(|(head, _)| {
                    let at = buffers.iter().find(|&&(h, _)| u32::from(h) == head).map_or(0, |b| b.1);
                    rx.read(at + VNET_HDR_LEN as u64 + 12, 2) == [0x08, 0x00]
                })
            };
            assert!(wait_until(|| first_used(&rx).is_some()), "the segment reached the guest");
            let used = rx.used();
            let start = first_used(&rx).expect("found");
            let header_at = buffers.iter().find(|&&(h, _)| u32::from(h) == used[start].0).map_or(0, |b| b.1);
            let header = rx.read(header_at, VNET_HDR_LEN);
            let num_buffers = usize::from(u16::from_le_bytes([header[10], header[11]]));
            assert_eq!(num_buffers, (VNET_HDR_LEN + back.len()).div_ceil(2048), "spread over mergeable buffers");
            assert_eq!(header[1], VIRTIO_NET_HDR_GSO_TCPV4 as u8, "still one TCP segment");
            assert_eq!(u16::from_le_bytes([header[4], header[5]]), 1448, "gso_size");
            let mut landed = Vec::new();
            for &(head, len) in &used[start..start + num_buffers] {
                let at = buffers.iter().find(|&&(h, _)| u32::from(h) == head).map_or(0, |b| b.1);
                landed.extend(rx.read(at, len as usize));
            }
            assert_eq!(landed[VNET_HDR_LEN..], back[..]);
            net.reset();
            Ok(())
        }

        /// Runs `test` on a thread of its own (the namespace is per thread), skipping it with a
        /// printed reason when this host gives us no namespace or no tap.
        fn in_private_network(name: &str, test: fn() -> std::result::Result<(), String>) {
            match std::thread::spawn(test).join() {
                Ok(Ok(())) => {}
                Ok(Err(why)) => eprintln!("SKIPPED {name}: {why} (needs root or CAP_NET_ADMIN, and /dev/net/tun)"),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }

        #[test]
        fn a_real_tap_carries_frames_both_ways() {
            in_private_network("a_real_tap_carries_frames_both_ways", carry_frames_both_ways);
        }

        #[test]
        fn a_real_tap_carries_64k_tcp_segments_unsplit_both_ways() {
            in_private_network("a_real_tap_carries_64k_tcp_segments_unsplit_both_ways", carry_64k_segments_unsplit);
        }

        #[test]
        fn a_real_tap_frame_too_big_for_the_buffers_is_dropped_and_counted() {
            in_private_network("a_real_tap_frame_too_big_for_the_buffers_is_dropped_and_counted", drop_a_frame_too_big_for_the_buffers);
        }
    }
}
