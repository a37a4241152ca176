//! virtio-vsock at work, on its worker thread: packets from the transmit queue go to the
//! muxer, packets from the muxer go into the receive queue's buffers, each direction in
//! batches with one interrupt a batch.
//!
//! A transmit kick hands every waiting packet to the muxer ([`Muxer::from_guest`]), which
//! checks it and answers a bad one as the spec says (RST, or nothing); a chain too short for
//! a header goes back unused. The muxer's epoll set becoming readable (a host program
//! connected, wrote, or read) and a receive kick both fill the guest's receive buffers while
//! the muxer has packets for it: a packet is taken from the muxer only once a chain is there
//! to hold it, at most as long as the chain has room for, so nothing is ever held back here.
//! Payloads go through one reused 64 KiB buffer of ours: the muxer's sockets are read and
//! written with plain `read`/`write`, and the buffer is what keeps a packet's bytes whole.
//!
//! The event queue's buffers stay on the ring until we have something to say: the only event
//! there is, TRANSPORT_RESET ([`VsockWorker::transport_reset`]), for a guest whose connections
//! were all dropped under it (after a snapshot is restored).

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use virtio_queue::{QueueOwnedT, QueueT};
use crate::memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EventSet};

use super::muxer::Muxer;
use super::packet::{Header, HEADER_LEN, MAX_PAYLOAD};
use super::{VsockError, EVENT, EVENT_KICK, MUXER, RX, RX_KICK, TX, TX_KICK};
use crate::seccomp::Role;
use crate::virtio::queue::{clear_kick, interrupt_if_wanted, next_chain, serve_until_idle, Chain, Pass, QueueError};
use crate::virtio::worker::{watch, DeviceWorker};
use crate::virtio::{ActiveQueue, Signals};

/// Packets one pass moves either way before the worker looks at its other work: a guest that
/// keeps its transmit queue full can't starve its receive queue, nor the reverse.
const BATCH: usize = 64;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the guest must drop every connection and read its CID
/// again.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// The device at work: its three queues and the muxer.
pub struct VsockWorker {
    mem: GuestMemoryMmap,
    rx: ActiveQueue,
    tx: ActiveQueue,
    event: ActiveQueue,
    muxer: Muxer,
    signals: Signals,
    /// One packet's payload, either way.
    payload: Vec<u8>,
}

/// What became of one receive chain.
enum Fill {
    /// A packet of this many bytes, header included, is in it.
    Delivered(u32),
    /// It can't hold a packet (too small, outside memory, read-only): back with nothing.
    Unfit,
    /// The muxer had nothing after all; the chain stays on the ring.
    NothingToSend,
}

impl VsockWorker {
    pub(super) fn new(mem: GuestMemoryMmap, [rx, tx, event]: [ActiveQueue; 3], muxer: Muxer, signals: Signals) -> VsockWorker {
        VsockWorker { mem, rx, tx, event, muxer, signals, payload: vec![0; MAX_PAYLOAD as usize] }
    }

    /// The muxer, back for the device to keep while no worker runs.
    pub(super) fn into_muxer(self) -> Muxer {
        self.muxer
    }

    /// Hands every packet waiting in the transmit queue (up to a batch) to the muxer, then
    /// fills the receive queue with its answers.
    fn transmit(&mut self) -> Result<(), VsockError> {
        let (mem, muxer, payload) = (&self.mem, &mut self.muxer, &mut self.payload);
        let mut taken = 0;
        let pass = serve_until_idle(&mut self.tx.queue, mem, |queue| {
            let before = taken;
            while let Some(chain) = next_chain(queue, mem)? {
                let head = chain.head_index();
                take_packet(mem, chain, muxer, payload);
                queue.add_used(mem, head, 0)?;
                taken += 1;
                if taken == BATCH {
                    return Ok::<_, QueueError>(Pass::Yielded(taken - before));
                }
            }
            Ok(Pass::Drained(taken - before))
        })
        .map_err(queue_error("transmit"))?;
        if let Pass::Yielded(_) = pass {
            // Come back for the rest after the other work: our own kick says when.
            self.tx.kick.write(1).map_err(|source| VsockError::Rekick { queue: "transmit", source })?;
        }
        interrupt_if_wanted(&mut self.tx.queue, mem, &self.signals, TX, pass.served()).map_err(queue_error("transmit"))?;
        self.fill_rx()
    }

    /// Puts the muxer's packets into the guest's receive buffers while it has packets and the
    /// guest has buffers, up to a batch.
    fn fill_rx(&mut self) -> Result<(), VsockError> {
        if !self.muxer.has_work_for_guest() {
            return Ok(());
        }
        let (mem, muxer, payload) = (&self.mem, &mut self.muxer, &mut self.payload);
        let mut filled = 0;
        let pass = serve_until_idle(&mut self.rx.queue, mem, |queue| {
            let before = filled;
            while muxer.has_work_for_guest() && filled < BATCH {
                let Some(chain) = next_chain(queue, mem)? else { return Ok::<_, QueueError>(Pass::Drained(filled - before)) };
                let head = chain.head_index();
                let len = match put_packet(mem, chain, muxer, payload) {
                    Fill::Delivered(len) => len,
                    Fill::Unfit => 0,
                    Fill::NothingToSend => {
                        queue.go_to_previous_position();
                        break;
                    }
                };
                queue.add_used(mem, head, len)?;
                filled += 1;
            }
            Ok(Pass::Yielded(filled - before))
        })
        .map_err(queue_error("receive"))?;
        if let Pass::Yielded(_) = pass {
            if self.muxer.has_work_for_guest() {
                // A full batch: the rest after the other work.
                self.rx.kick.write(1).map_err(|source| VsockError::Rekick { queue: "receive", source })?;
            } else {
                // Nothing more to send: the guest's next buffers need not wake us, but packets
                // the muxer finds later need to hear of them, so notifications go back on.
                self.rx.queue.enable_notification(mem).map_err(|e| queue_error("receive")(e.into()))?;
            }
        }
        interrupt_if_wanted(&mut self.rx.queue, mem, &self.signals, RX, pass.served()).map_err(queue_error("receive"))
    }

    /// Tells the guest its transport was reset: every stream is gone (host programs see their
    /// sockets close), and the guest drops its side of them and reads its CID again. Returns
    /// whether the guest was told: not if it posted no usable event buffer.
    pub fn transport_reset(&mut self) -> Result<bool, VsockError> {
        self.muxer.reset_streams();
        let mem = &self.mem;
        let mut told = false;
        let mut used = 0;
        while !told {
            let Some(chain) = next_chain(&mut self.event.queue, mem).map_err(queue_error("event"))? else { break };
            let head = chain.head_index();
            let written = write_event(mem, chain, EVENT_TRANSPORT_RESET);
            self.event.queue.add_used(mem, head, written).map_err(|e| queue_error("event")(e.into()))?;
            told = written > 0;
            used += 1;
        }
        interrupt_if_wanted(&mut self.event.queue, mem, &self.signals, EVENT, used).map_err(queue_error("event"))?;
        Ok(told)
    }

    /// How many streams are open (for tests).
    #[cfg(any(test, feature = "test-utils"))]
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }
}

impl DeviceWorker for VsockWorker {
    type Error = VsockError;

    fn role(&self) -> Role {
        Role::VsockWorker
    }

    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        watch(epoll, &self.rx.kick, RX_KICK)?;
        watch(epoll, &self.tx.kick, TX_KICK)?;
        watch(epoll, &self.event.kick, EVENT_KICK)?;
        watch(epoll, &self.muxer.as_raw_fd(), MUXER)?;
        // Buffers and packets the driver queued before DRIVER_OK came with kicks nobody heard.
        self.rx.kick.write(1)?;
        self.tx.kick.write(1)
    }

    fn handle(&mut self, _: &Epoll, token: u64, _: EventSet) -> Result<(), VsockError> {
        match token {
            RX_KICK => {
                clear_kick(&self.rx.kick);
                self.fill_rx()
            }
            TX_KICK => {
                clear_kick(&self.tx.kick);
                self.transmit()
            }
            // Event buffers wait on the ring until there is an event.
            EVENT_KICK => {
                clear_kick(&self.event.kick);
                Ok(())
            }
            MUXER => {
                self.muxer.process_host_events();
                self.fill_rx()
            }
            _ => Ok(()),
        }
    }
}

fn queue_error(queue: &'static str) -> impl Fn(QueueError) -> VsockError {
    move |source| VsockError::Queue { queue, source }
}

/// Reads one packet from a transmit chain and hands it to the muxer. A chain too short for a
/// header, or outside memory, is dropped; what is wrong with a header is the muxer's to
/// answer.
fn take_packet(mem: &GuestMemoryMmap, chain: Chain<'_>, muxer: &mut Muxer, payload: &mut [u8]) {
    let Ok(mut reader) = chain.reader(mem) else {
        tracing::debug!("vsock: dropped a transmit chain outside guest memory");
        return;
    };
    let mut header = [0u8; HEADER_LEN];
    if reader.read_exact(&mut header).is_err() {
        tracing::debug!("vsock: dropped a transmit chain too short for a packet header");
        return;
    }
    let header = Header::from_bytes(&header);
    // The payload the header claims, or as much of it as the chain holds (the muxer then
    // sees the lie); never more than one packet's worth.
    let len = reader.available_bytes().min(header.len as usize).min(payload.len());
    if reader.read_exact(&mut payload[..len]).is_err() {
        return;
    }
    if let Err(bad) = muxer.from_guest(&header, &payload[..len]) {
        tracing::debug!("vsock: a bad packet from the guest: {bad}");
    }
}

/// Fills one receive chain with the muxer's next packet, at most as long as the chain holds.
fn put_packet(mem: &GuestMemoryMmap, chain: Chain<'_>, muxer: &mut Muxer, payload: &mut [u8]) -> Fill {
    let Ok(mut writer) = chain.writer(mem) else { return Fill::Unfit };
    let Some(room) = writer.available_bytes().checked_sub(HEADER_LEN) else { return Fill::Unfit };
    let room = room.min(payload.len());
    let Some((header, len)) = muxer.next_for_guest(&mut payload[..room]) else { return Fill::NothingToSend };
    // The writer's buffers are in guest memory and hold `room` bytes past the header, so
    // neither write can fail; if one did, the guest gets what was written.
    if writer.write_all(&header.to_bytes()).is_ok() {
        let _ = writer.write_all(&payload[..len]);
    }
    u32::try_from(writer.bytes_written()).map_or(Fill::Unfit, Fill::Delivered)
}

/// Writes a `virtio_vsock_event` into an event chain; returns its length, or 0 when the chain
/// can't hold it.
fn write_event(mem: &GuestMemoryMmap, chain: Chain<'_>, id: u32) -> u32 {
    let Ok(mut writer) = chain.writer(mem) else { return 0 };
    if writer.available_bytes() < 4 || writer.write_all(&id.to_le_bytes()).is_err() {
        return 0;
    }
    4
}
