//! virtio-net at work, on its worker thread: the transmit path (guest to tap) and the receive
//! path (tap to the guest's held buffers), each served in batches with one interrupt a batch.
//! passt ([`Backend::Passt`]) takes the tap's place the same way, with two differences: its
//! socket can be full (the transmit queue then waits for [`BACKEND_OUT`]), and it can die (the
//! guest's link then goes down, once, with a config-change interrupt, and frames the guest
//! still sends are dropped).
//!
//! A transmit kick sends every waiting frame, up to [`BATCH`], each in one writev straight from
//! guest memory; a malformed chain is dropped and counted, never sent. While a look finds
//! frames, the worker looks again after its other events with the driver's kicks still off
//! (a kick is an exit of the guest's vCPU); only a look that finds nothing turns them back on.
//! The tap becoming readable delivers frames into receive buffers held from the ring
//! ([`HeldBuffers`]) and publishes their used entries ([`UsedBatch`]): each frame's as it
//! lands when the driver has EVENT_IDX (a driver polling meanwhile takes it at once), else the
//! batch's together; either way with at most one interrupt a batch, at its end. While the
//! guest has posted too little room for the next frame, the tap is not watched and a receive
//! kick is asked for instead; the same while the receive rate limiter is owed for frames
//! already delivered (its timer brings the tap back). A frame over the transmit limiter's
//! budget waits in the ring for its timer.

use std::io;
use std::sync::Arc;

use virtio_bindings::virtio_net::*;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use crate::memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::ctrl::{Control, QueuePairs};
use super::rx_buffers::{HeldBuffers, Hold};
use super::tap::VNET_HDR_LEN;
use super::{
    bit, tap_offloads, Backend, NetError, BACKEND_OUT, BATCH, HDR_FLAGS, HDR_NUM_BUFFERS, MAX_FRAME_LEN,
    MAX_UNSEGMENTED_FRAME_LEN, CTRL_KICK, RX, RX_KICK, RX_RATE_TIMER, TAP, TX, TX_KICK, TX_RATE_TIMER,
};
use crate::control::NetHandle;
use crate::rate_limiter::{self, RateLimiter, TimerDuty};
use crate::seccomp::Role;
use crate::virtio::iovec::{HostAccess, IoVecs, MAX_IOVECS};
use crate::virtio::queue::{
    clear_kick, interrupt_if_wanted, next_chain, serve_until_idle, Chain, Pass, QueueError, UsedBatch,
};
use crate::virtio::worker::{watch, DeviceWorker};
use crate::virtio::{ActiveQueue, Signals};

/// The card at work: both queues, the backend, and the receive buffers taken from the ring but
/// not yet filled.
pub struct NetWorker {
    mem: GuestMemoryMmap,
    rx: ActiveQueue,
    pub(super) tx: ActiveQueue,
    backend: Backend,
    signals: Signals,
    /// The limiters and counters, shared with the device and the API.
    live: NetHandle,
    /// MRG_RXBUF: a frame may fill several receive chains.
    mergeable: bool,
    /// GUEST_CSUM: the driver takes frames with partial checksums and their header flags.
    guest_csum: bool,
    /// With mergeable buffers, the room held before we read a frame: the largest one the tap
    /// may give us, so that none is cut short for want of buffers the guest was about to post.
    rx_room_needed: usize,
    held: HeldBuffers,
    rx_used: UsedBatch,
    /// A frame published quietly passed the driver's used_event: the batch ends with an interrupt.
    rx_interrupt_owed: bool,
    pub(super) tap_polled: bool,
    tx_error_reported: bool,
    /// The guest has been told its link went down.
    link_down_told: bool,
    /// The pair's queue indices among the card's, for their interrupts.
    rx_index: usize,
    tx_index: usize,
    /// Which pair of a multi-queue card this is, and the card's pairs (`None`: one pair).
    pair: usize,
    pairs: Option<Arc<QueuePairs>>,
    /// The control queue, on the first pair's worker of a multi-queue card.
    control: Option<Control>,
    /// Whether this worker watches the card's receive and transmit limiters' timers (the first
    /// pair's does, and kicks the other pairs' queues when one fires) or is kicked.
    rx_timer: TimerDuty,
    tx_timer: TimerDuty,
}

impl NetWorker {
    pub(super) fn new(
        mem: GuestMemoryMmap,
        rx: ActiveQueue,
        tx: ActiveQueue,
        backend: Backend,
        signals: Signals,
        features: u64,
        live: NetHandle,
    ) -> NetWorker {
        // passt sends frames as large as the MTU it offers (65520) to a guest that took it.
        let segmented = matches!(backend, Backend::Passt(_))
            || tap_offloads(features) & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0;
        NetWorker {
            mem,
            rx,
            tx,
            backend,
            signals,
            live,
            mergeable: features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
            guest_csum: features & bit(VIRTIO_NET_F_GUEST_CSUM) != 0,
            rx_room_needed: if segmented { MAX_FRAME_LEN } else { MAX_UNSEGMENTED_FRAME_LEN },
            held: HeldBuffers::default(),
            rx_used: UsedBatch::default(),
            rx_interrupt_owed: false,
            tap_polled: false,
            tx_error_reported: false,
            link_down_told: false,
            rx_index: RX,
            tx_index: TX,
            pair: 0,
            pairs: None,
            control: None,
            rx_timer: TimerDuty::alone(),
            tx_timer: TimerDuty::alone(),
        }
    }

    /// Makes this the worker of pair `pair` (queues `2 * pair` and `2 * pair + 1`) of a
    /// multi-queue card.
    pub(super) fn for_pair(mut self, pair: usize, pairs: Arc<QueuePairs>) -> NetWorker {
        (self.pair, self.rx_index, self.tx_index, self.pairs) = (pair, 2 * pair, 2 * pair + 1, Some(pairs));
        self
    }

    /// Gives this worker the card's control queue to serve too.
    pub(super) fn with_control(mut self, control: Control) -> NetWorker {
        self.control = Some(control);
        self
    }

    /// Gives this worker its part in the card's limiters' timers, which its pairs share.
    pub(super) fn with_timers(mut self, rx: TimerDuty, tx: TimerDuty) -> NetWorker {
        (self.rx_timer, self.tx_timer) = (rx, tx);
        self
    }

    /// Whether the driver uses this pair: a pair past its count has its tap queue detached.
    fn pair_active(&self) -> bool {
        self.pairs.as_ref().is_none_or(|pairs| pairs.is_active(self.pair))
    }

    /// Sends every frame waiting in the transmit queue (up to a batch), then interrupts the
    /// guest once if it wants to hear.
    fn transmit(&mut self) -> Result<(), NetError> {
        let (mem, backend, live) = (&self.mem, &self.backend, &self.live);
        let mut limiter = live.tx.lock();
        if limiter.as_ref().is_some_and(|limiter| limiter.is_blocked()) {
            return Ok(()); // its timer brings us back
        }
        let tx_error_reported = &mut self.tx_error_reported;
        let mut sent = 0;
        let mut pass_over_ring = |queue: &mut Queue| {
            let sent_before = sent;
            loop {
                if !backend.can_send() {
                    // passt's socket is full: the rest waits for BACKEND_OUT, not for a kick.
                    return Ok(Pass::Yielded(sent - sent_before));
                }
                let Some(chain) = next_chain(queue, mem)? else { break };
                let head = chain.head_index();
                if let Sent::Throttled = send(mem, backend, live, limiter.as_deref_mut(), tx_error_reported, chain) {
                    // Over the rate: back to the ring until the limiter's timer fires.
                    queue.go_to_previous_position();
                    live.metrics.tx_rate_limiter_throttled.inc();
                    return Ok(Pass::Yielded(sent - sent_before));
                }
                queue.add_used(mem, head, 0)?;
                sent += 1;
                if sent == BATCH {
                    return Ok::<_, QueueError>(Pass::Yielded(sent - sent_before));
                }
            }
            Ok(Pass::Drained(sent - sent_before))
        };
        // While the last look found frames, the driver is likely still sending: look again
        // after the worker's other events, its kicks still off (each kick costs the guest's
        // vCPU an exit), as QEMU's transmit bottom half does. Only a look that finds nothing
        // turns them back on, and sleeps until the next kick.
        self.tx.queue.disable_notification(mem).map_err(|e| transmit_queue(e.into()))?;
        let pass = match pass_over_ring(&mut self.tx.queue).map_err(transmit_queue)? {
            Pass::Drained(0) => serve_until_idle(&mut self.tx.queue, mem, &mut pass_over_ring).map_err(transmit_queue)?,
            pass => pass,
        };
        let look_again = match pass {
            Pass::Drained(served) => served > 0,
            // A batch is done: come back for the rest after the other work. (Otherwise the
            // limiter's timer or passt's room brings us back.)
            Pass::Yielded(_) => sent == BATCH,
        };
        if look_again {
            self.tx.kick.write(1).map_err(|source| NetError::Rekick { queue: "transmit", source })?;
        }
        interrupt_if_wanted(&mut self.tx.queue, mem, &self.signals, self.tx_index, sent).map_err(transmit_queue)
    }

    /// The backend has frames: deliver them while the guest has room, then publish the batch.
    fn receive(&mut self, epoll: &Epoll) -> Result<(), NetError> {
        let mut whole_batch = true;
        for _ in 0..BATCH {
            if !self.rx_paid_up() {
                // The limiter's timer brings the backend back once the debt is paid.
                self.poll_tap(epoll, false).map_err(NetError::Watch)?;
                whole_batch = false;
                break;
            }
            if !self.rx_room_ready()? {
                self.poll_tap(epoll, false).map_err(NetError::Watch)?;
                whole_batch = false;
                break;
            }
            if !self.receive_frame()? {
                whole_batch = false;
                break;
            }
            if self.rx.queue.event_idx_enabled() {
                // A driver polling now sees each frame as it lands; the interrupt it may ask
                // for waits for the batch's end (see publish_quietly).
                self.publish_quietly()?;
            }
        }
        if whole_batch && self.backend.has_frame() {
            // Frames in our own buffer make the socket no more readable: come back for them.
            self.rx.kick.write(1).map_err(|source| NetError::Rekick { queue: "receive", source })?;
        }
        self.publish_received()
    }

    /// Whether frames may be read from the backend: nothing is owed to the receive limiter.
    fn rx_paid_up(&mut self) -> bool {
        let paid_up = rate_limiter::paid_up(self.live.rx.lock().as_deref_mut(), "virtio-net receive");
        if !paid_up {
            self.live.metrics.rx_rate_limiter_throttled.inc();
        }
        paid_up
    }

    /// The guest posted receive buffers (or the receive limiter's debt is paid): take them,
    /// and watch the backend again if they make room (and deliver what already waits on our
    /// side of it).
    fn on_rx_kick(&mut self, epoll: &Epoll) -> Result<(), NetError> {
        let ready = self.rx_room_ready()?;
        // Chains unfit for frames go back at once.
        self.publish_received()?;
        if !self.pair_active() {
            // Switched off by the control queue: its detached tap queue would only report errors.
            return self.poll_tap(epoll, false).map_err(NetError::Watch);
        }
        if ready && self.backend.is_up() && !self.live.rx.lock().is_some_and(|limiter| limiter.is_blocked()) {
            self.poll_tap(epoll, true).map_err(NetError::Watch)?;
            if self.backend.has_frame() {
                return self.receive(epoll);
            }
        }
        Ok(())
    }

    /// Takes receive chains from the ring until the next frame surely fits. When it doesn't,
    /// asks the driver for a kick when it posts more.
    fn rx_room_ready(&mut self) -> Result<bool, NetError> {
        // Honest drivers post at most a ring's worth between two looks; one that keeps us
        // busy with unfit chains waits for its next turn (our own kick).
        let mut budget = 2 * usize::from(self.rx.queue.size());
        loop {
            self.hold_rx_chains(&mut budget)?;
            if self.held.is_empty() {
                // Nothing to read into.
            } else if !self.mergeable || self.held.room() >= self.rx_room_needed || self.held.is_full() {
                return Ok(true);
            }
            if budget == 0 {
                self.rx.kick.write(1).map_err(|source| NetError::Rekick { queue: "receive", source })?;
                return Ok(false);
            }
            if !self.rx.queue.enable_notification(&self.mem).map_err(|e| receive_queue(e.into()))? {
                return Ok(false);
            }
        }
    }

    /// Moves chains from the receive ring into `held`, as many as one frame may need.
    fn hold_rx_chains(&mut self, budget: &mut usize) -> Result<(), NetError> {
        while *budget > 0 && self.wants_more_rx_room() {
            let Some(chain) = next_chain(&mut self.rx.queue, &self.mem).map_err(receive_queue)? else { break };
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
                    tracing::debug!(backend = self.backend.name(), "returned a receive chain unused: {why}");
                    self.live.metrics.rx_bad_buffers.inc();
                    self.rx_used.add(&self.rx.queue, &self.mem, head, 0).map_err(receive_queue)?;
                }
            }
        }
        Ok(())
    }

    fn wants_more_rx_room(&self) -> bool {
        if self.mergeable {
            self.held.room() < MAX_FRAME_LEN && !self.held.is_full()
        } else {
            self.held.is_empty()
        }
    }

    /// Reads one frame from the backend into the held buffers. `false` when it had none.
    fn receive_frame(&mut self) -> Result<bool, NetError> {
        // One byte of ours after the guest's buffers: the kernel cuts a frame too big for them
        // short without saying so, but a byte landing here says it.
        let mut spill = [0u8; 1];
        let iovecs = self.held.iovecs(&self.mem, self.mergeable, &mut spill).map_err(NetError::HeldBuffer)?;
        let room = iovecs.bytes() - 1;
        let len = match self.backend.read_frame(&iovecs) {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            // The control queue detached this pair's tap queue under us (EBADFD).
            Err(_) if !self.pair_active() => return Ok(false),
            // passt died or broke the protocol: the link goes down (see settle_link).
            Err(e) if let Backend::Passt(link) = &self.backend => {
                link.take_down(&e);
                return Ok(false);
            }
            // The kernel refused to cut the frame short, and dropped it.
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                self.drop_received(room);
                return Ok(true);
            }
            Err(e) => return Err(NetError::TapRead(e)),
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
        tracing::debug!(backend = self.backend.name(), "dropped a received frame larger than the {room} bytes of buffers the guest posted");
        self.live.metrics.rx_fails.inc();
    }

    /// The frame of `len` bytes is in the held buffers: finish its header and give the chains
    /// it filled back to the guest (published with the batch).
    fn deliver(&mut self, len: usize) -> Result<(), NetError> {
        let chains = self.held.chains_filled_by(len);
        // At most a ring's worth of chains, far below u16::MAX.
        let num_buffers = u16::try_from(chains).unwrap_or(u16::MAX);
        self.held.write_in_first(&self.mem, HDR_NUM_BUFFERS, &num_buffers.to_le_bytes()).map_err(NetError::HeldBuffer)?;
        if !self.guest_csum {
            // A driver without GUEST_CSUM must see no header flags (spec 5.1.6.4.1).
            self.held.write_in_first(&self.mem, HDR_FLAGS, &[0]).map_err(NetError::HeldBuffer)?;
        }
        let mut left = len;
        for _ in 0..chains {
            let Some(chain) = self.held.take_first() else { break };
            let used = chain.room.min(left);
            left -= used;
            // A chain holds at most 2^32 bytes, so `used` fits.
            let used = u32::try_from(used).unwrap_or(u32::MAX);
            self.rx_used.add(&self.rx.queue, &self.mem, chain.head, used).map_err(receive_queue)?;
        }
        let bytes = (len - VNET_HDR_LEN) as u64;
        self.live.metrics.rx_packets_count.inc();
        self.live.metrics.rx_bytes_count.add(bytes);
        if let Some(mut limiter) = self.live.rx.lock() {
            limiter.charge(bytes);
        }
        Ok(())
    }

    /// Publishes the frames delivered so far and interrupts the guest once if any of them (since
    /// the last interrupt) passed its used_event.
    fn publish_received(&mut self) -> Result<(), NetError> {
        self.publish_quietly()?;
        if std::mem::take(&mut self.rx_interrupt_owed) {
            self.signals.used_queue(self.rx_index);
        }
        Ok(())
    }

    /// Publishes the frames delivered so far without interrupting: an interrupt the driver asked
    /// for is owed until [`NetWorker::publish_received`], at the batch's end. A driver that is
    /// not polling re-arms its used_event after every poll, so interrupting as each frame lands
    /// would wake it once a frame: each wake-up a poll of one frame (no GRO), its own ACK, and
    /// the exits of an interrupt: a 1-vCPU guest in the lab then received 427 KiB/s where it
    /// receives 2,190 with one interrupt a batch.
    fn publish_quietly(&mut self) -> Result<(), NetError> {
        self.rx_interrupt_owed |= self.rx_used.publish(&mut self.rx.queue, &self.mem).map_err(receive_queue)?;
        Ok(())
    }

    /// Starts or stops watching the backend: it is not watched while the guest has no room,
    /// so that its readiness can't spin the worker.
    fn poll_tap(&mut self, epoll: &Epoll, on: bool) -> io::Result<()> {
        if on == self.tap_polled {
            return Ok(());
        }
        let op = if on { ControlOperation::Add } else { ControlOperation::Delete };
        epoll.ctl(op, self.backend.read_fd(), EpollEvent::new(EventSet::IN, TAP))?;
        self.tap_polled = on;
        Ok(())
    }

    /// Once passt is gone: the guest hears of it (its link goes down), we stop watching a
    /// socket that would only say "hung up" again, and what the guest queued is dropped.
    fn settle_link(&mut self, epoll: &Epoll) -> Result<(), NetError> {
        let Backend::Passt(link) = &self.backend else { return Ok(()) };
        if self.link_down_told || link.is_up() {
            return Ok(());
        }
        self.link_down_told = true;
        self.signals.config_changed();
        let write_fd = link.write_fd();
        self.poll_tap(epoll, false).map_err(NetError::Watch)?;
        epoll.ctl(ControlOperation::Delete, write_fd, EpollEvent::default()).map_err(NetError::Watch)?;
        self.transmit()
    }

    fn handle_event(&mut self, epoll: &Epoll, token: u64, events: EventSet) -> Result<(), NetError> {
        let hung_up = events.intersects(EventSet::ERROR | EventSet::HANG_UP);
        match token {
            RX_KICK => {
                clear_kick(&self.rx.kick);
                self.live.metrics.rx_queue_event_count.inc();
                self.on_rx_kick(epoll)
            }
            TX_KICK => {
                clear_kick(&self.tx.kick);
                self.live.metrics.tx_queue_event_count.inc();
                self.transmit()
            }
            RX_RATE_TIMER if self.live.rx.timer_event(token, RX_RATE_TIMER, &self.rx_timer) => {
                self.live.metrics.rx_event_rate_limiter_count.inc();
                self.on_rx_kick(epoll)
            }
            TX_RATE_TIMER if self.live.tx.timer_event(token, TX_RATE_TIMER, &self.tx_timer) => {
                self.live.metrics.tx_rate_limiter_event_count.inc();
                self.transmit()
            }
            // An event from before we stopped watching it.
            TAP if !self.tap_polled => Ok(()),
            // The control queue detached this pair's tap queue (which now polls as an error).
            TAP if !self.pair_active() => self.poll_tap(epoll, false).map_err(NetError::Watch),
            CTRL_KICK => self.serve_control(),
            TAP | BACKEND_OUT if hung_up && let Backend::Passt(link) = &self.backend => {
                // Frames passt sent before it went are no use to a link that is going down.
                link.take_down(&io::ErrorKind::BrokenPipe.into());
                Ok(())
            }
            TAP if hung_up => Err(NetError::TapGone),
            TAP => {
                self.live.metrics.rx_tap_event_count.inc();
                self.receive(epoll)
            }
            BACKEND_OUT => self.transmit(),
            _ => Ok(()),
        }
    }
}

impl DeviceWorker for NetWorker {
    type Error = NetError;

    /// The control queue's worker switches the tap's queues (TUNSETQUEUE).
    fn role(&self) -> Role {
        if self.control.is_some() { Role::NetControl } else { Role::DeviceWorker }
    }

    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        watch(epoll, &self.rx.kick, RX_KICK)?;
        watch(epoll, &self.tx.kick, TX_KICK)?;
        if let Some(control) = &self.control {
            watch(epoll, &control.queue.kick, CTRL_KICK)?;
            // Commands queued before DRIVER_OK.
            control.queue.kick.write(1)?;
        }
        // A card's limiters, and their timers, are shared by its pairs (the rate is the card's):
        // the first pair's worker watches the timers and kicks the others (see TimerDuty).
        self.live.rx.watch(epoll, RX_RATE_TIMER, &self.rx_timer)?;
        self.live.tx.watch(epoll, TX_RATE_TIMER, &self.tx_timer)?;
        // A new epoll watches nothing yet, whatever the last one did: a resumed worker (its
        // handler parked by a pause) would otherwise never hear its tap again.
        self.tap_polled = false;
        if self.pair_active() {
            self.poll_tap(epoll, true)?;
        }
        if let Backend::Passt(link) = &self.backend {
            // Always watched: it says when a full socket has room, and when passt hangs up.
            let events = EventSet::OUT | EventSet::EDGE_TRIGGERED;
            epoll.ctl(ControlOperation::Add, link.write_fd(), EpollEvent::new(events, BACKEND_OUT))?;
        }
        // Buffers and frames the driver queued before DRIVER_OK came with kicks nobody heard.
        self.rx.kick.write(1)?;
        self.tx.kick.write(1)
    }

    fn handle(&mut self, epoll: &Epoll, token: u64, events: EventSet) -> Result<(), NetError> {
        self.handle_event(epoll, token, events)?;
        self.settle_link(epoll)
    }
}

impl NetWorker {
    fn serve_control(&mut self) -> Result<(), NetError> {
        let Some(control) = &mut self.control else { return Ok(()) };
        clear_kick(&control.queue.kick);
        control.serve(&self.mem, &self.signals).map_err(|source| NetError::Queue { queue: "control", source })
    }
}

fn transmit_queue(source: QueueError) -> NetError {
    NetError::Queue { queue: "transmit", source }
}

fn receive_queue(source: QueueError) -> NetError {
    NetError::Queue { queue: "receive", source }
}

/// What became of a transmit chain.
enum Sent {
    /// Sent, or dropped and counted: the chain goes back to the guest.
    Done,
    /// Over the transmit limiter's budget: the chain stays in the ring.
    Throttled,
}

/// One frame from the guest to the backend (once the limiter admits it), or dropped and
/// counted.
fn send(
    mem: &GuestMemoryMmap,
    backend: &Backend,
    live: &NetHandle,
    limiter: Option<&mut RateLimiter>,
    error_reported: &mut bool,
    chain: Chain<'_>,
) -> Sent {
    let metrics = &live.metrics;
    let iovecs = match gather_frame(mem, chain) {
        Ok(iovecs) => iovecs,
        Err(why) => {
            tracing::debug!(backend = backend.name(), "dropped a transmitted frame: {why}");
            metrics.tx_malformed_frames.inc();
            return Sent::Done;
        }
    };
    let bytes = (iovecs.bytes() - VNET_HDR_LEN) as u64;
    if !rate_limiter::admit(limiter, bytes, "virtio-net transmit") {
        return Sent::Throttled;
    }
    let sent = match backend {
        Backend::Passt(link) => match link.is_up().then(|| link.write_frame(&iovecs)) {
            Some(Ok(_)) => true,
            // Not a frame passt can take, or (can_send said otherwise) no room: this one is lost.
            Some(Err(e)) if matches!(e.kind(), io::ErrorKind::InvalidInput | io::ErrorKind::WouldBlock) => false,
            Some(Err(e)) => {
                link.take_down(&e);
                false
            }
            // The link is down: the frame goes nowhere, as on a cut wire.
            None => false,
        },
        Backend::Tap(tap) => match tap.write_frame(&iovecs) {
            Ok(_) => true,
            Err(e) => {
                // A tap that is down, a header the host's kernel finds invalid: the frame is
                // lost as on a real wire, and the guest's TCP sends it again.
                if !*error_reported {
                    *error_reported = true;
                    tracing::warn!("tap {} refused a frame from the guest ({e}); is it up? (ip link set {} up)", tap.name(), tap.name());
                }
                false
            }
        },
    };
    if sent {
        metrics.tx_packets_count.inc();
        metrics.tx_bytes_count.add(bytes);
    } else {
        metrics.tx_fails.inc();
    }
    Sent::Done
}

/// Why a transmit chain is dropped rather than sent.
#[derive(Debug, thiserror::Error)]
enum BadFrame {
    #[error("a transmit chain has a write-only descriptor")]
    WriteOnly,
    #[error("a frame larger than 64 KiB")]
    TooLarge,
    #[error("a transmit buffer lies outside guest memory")]
    OutsideMemory,
    #[error("a frame in more pieces than one writev takes")]
    TooManyPieces,
    #[error("a transmit chain loops or names a descriptor outside its table")]
    CutShort,
    #[error("a frame shorter than the virtio-net header")]
    TooShort,
}

/// The frame a transmit chain holds (header first), as host iovecs, or why it must be dropped.
fn gather_frame<'m>(mem: &'m GuestMemoryMmap, chain: Chain<'m>) -> Result<IoVecs<'m>, BadFrame> {
    let mut iovecs = IoVecs::default();
    let mut cut_short = false;
    for descriptor in chain {
        cut_short = descriptor.has_next();
        if descriptor.is_write_only() {
            return Err(BadFrame::WriteOnly);
        }
        let len = descriptor.len() as usize;
        if iovecs.bytes() + len > MAX_FRAME_LEN {
            return Err(BadFrame::TooLarge);
        }
        iovecs.push_guest(mem, descriptor.addr(), len, HostAccess::Reads).map_err(|_| BadFrame::OutsideMemory)?;
        if iovecs.len() > MAX_IOVECS {
            return Err(BadFrame::TooManyPieces);
        }
    }
    if cut_short {
        // The chain iterator stops at a loop, or at a next index outside the table.
        return Err(BadFrame::CutShort);
    }
    if iovecs.bytes() < VNET_HDR_LEN {
        return Err(BadFrame::TooShort);
    }
    Ok(iovecs)
}
