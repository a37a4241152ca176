//! How every device walks its rings: pops the chains the driver made available, returns them
//! used, and decides when to interrupt. One contract each, so that a device only says what it
//! does with a chain.
//!
//! A device's handler runs on its worker thread when a kick arrives. [`serve_until_idle`] is the
//! loop every queue is served with: notifications off while we work, every chain popped with
//! [`next_chain`], notifications back on, and once more round if the driver added chains in
//! between ("the driver promised more"). [`UsedBatch`] is for a device that must publish several
//! used entries at once (a network frame spread over several receive chains).
//!
//! Everything in a ring is the guest's to forge. What this module reports as a [`QueueError`] is
//! a ring that can't be used any more (outside memory, an index running ahead of or back behind
//! the ring, a head past the descriptor table): the device needs a reset. What is wrong inside
//! one chain is the device's business, and fails that chain alone.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryError};
use crate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::Signals;

/// A chain of descriptors the driver made available, walked lazily in guest memory.
pub type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

/// The guest has made a queue unusable: the device needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue's rings can't be used: {0}")]
    Ring(#[from] virtio_queue::Error),
    #[error("the available ring can't be read")]
    AvailableRingUnreadable,
    #[error("the available ring names descriptor {head} of a {size}-entry table")]
    HeadOutOfRange { head: u16, size: u16 },
    /// Re-enabling notifications said more chains had arrived, yet the next pass found none: the
    /// available index moved backwards. A guest that puts its available index where we write
    /// the used ring's flags (the two rings overlap) gets exactly that from every flags write,
    /// and would otherwise keep the worker serving forever, deaf to its stop eventfd.
    #[error("the available index moved backwards (do the guest's rings overlap?)")]
    IndexMovedBackwards,
    #[error("the used ring can't be written: {0}")]
    UsedRing(#[source] GuestMemoryError),
    #[error("the used event can't be read: {0}")]
    UsedEvent(#[source] GuestMemoryError),
    #[error("the rings wrap around the address space")]
    Wraps,
}

/// The next chain the driver made available, or `None` when it has made none since the last.
/// The chain's head is inside the descriptor table. `Err` when the ring can't be walked: an
/// index further ahead than the ring is long, an entry outside memory, a head past the table
/// (that one is consumed: a device may choose to skip it and go on).
pub fn next_chain<'m>(queue: &mut Queue, mem: &'m GuestMemoryMmap) -> Result<Option<Chain<'m>>, QueueError> {
    let available = queue.avail_idx(mem, Ordering::Acquire)?;
    if available.0 == queue.next_avail() {
        return Ok(None);
    }
    match queue.iter(mem)?.next() {
        Some(chain) if chain.head_index() < queue.size() => Ok(Some(chain)),
        Some(chain) => Err(QueueError::HeadOutOfRange { head: chain.head_index(), size: queue.size() }),
        None => Err(QueueError::AvailableRingUnreadable),
    }
}

/// How one pass over the available ring ended, and how many chains it served.
pub enum Pass {
    /// The ring is empty (as far as [`next_chain`] sees).
    Drained(usize),
    /// The device stopped with chains left (a batch is done, or it has nothing to give them);
    /// it comes back for them on its own.
    Yielded(usize),
}

impl Pass {
    pub fn served(&self) -> usize {
        match *self {
            Pass::Drained(served) | Pass::Yielded(served) => served,
        }
    }
}

/// Serves `queue` with `pass` until the driver has made nothing more available since we
/// re-enabled its notifications, so that no chain waits for a kick that never comes. Returns
/// how the last pass ended, with the chains served by all of them. Notifications stay off
/// after a [`Pass::Yielded`].
pub fn serve_until_idle<E: From<QueueError>>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut pass: impl FnMut(&mut Queue) -> Result<Pass, E>,
) -> Result<Pass, E> {
    let mut total = 0;
    let mut more_promised = false;
    loop {
        queue.disable_notification(mem).map_err(QueueError::from)?;
        let served = match pass(queue)? {
            Pass::Drained(served) => served,
            Pass::Yielded(served) => return Ok(Pass::Yielded(total + served)),
        };
        total += served;
        if more_promised && served == 0 {
            return Err(QueueError::IndexMovedBackwards.into());
        }
        if !queue.enable_notification(mem).map_err(QueueError::from)? {
            return Ok(Pass::Drained(total));
        }
        more_promised = true;
    }
}

/// Interrupts the guest for queue `index` if the device has `used` new used entries for it
/// (since the last call) and the driver wants to hear about them (always, without EVENT_IDX).
/// Nothing used, nothing to say: no interrupt.
pub fn interrupt_if_wanted(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    signals: &Signals,
    index: usize,
    used: usize,
) -> Result<(), QueueError> {
    if used > 0 && queue.needs_notification(mem)? {
        signals.used_queue(index);
    }
    Ok(())
}

/// Empties a kick (or any wake-up) eventfd, so that level-triggered epoll doesn't report it
/// again. A kick is a hint to look at the ring; its count means nothing.
pub fn clear_kick(kick: &EventFd) {
    // WouldBlock only means someone else read it first: nothing is lost, we look at the queue.
    let _ = kick.read();
}

/// Used entries written but not yet published. A driver must see some entries all at once (a
/// network frame's chains: it reads `num_buffers` from the first and expects the rest already
/// there), so the used index moves once per batch, as vhost does; `Queue::add_used` would move
/// it per entry.
#[derive(Default)]
pub struct UsedBatch {
    pending: u16,
}

/// Used ring layout (virtio spec 2.7.8): flags, idx, then 8-byte elements.
const USED_IDX: u64 = 2;
const USED_RING: u64 = 4;
/// The driver's used_event sits after the available ring's flags, idx and entries.
const AVAIL_RING: u64 = 4;

impl UsedBatch {
    /// Writes a used entry after those pending, unseen by the driver until [`UsedBatch::publish`].
    pub fn add(&mut self, queue: &Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> Result<(), QueueError> {
        // The transport refuses a queue of size 0.
        let slot = queue.next_used().wrapping_add(self.pending).checked_rem(queue.size()).unwrap_or(0);
        let addr =
            GuestAddress(queue.used_ring()).checked_add(USED_RING + 8 * u64::from(slot)).ok_or(QueueError::Wraps)?;
        let mut element = [0u8; 8];
        element[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        element[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&element, addr).map_err(QueueError::UsedRing)?;
        self.pending = self.pending.wrapping_add(1);
        Ok(())
    }

    /// Moves the used index past the pending entries. Returns whether the driver asked to be
    /// interrupted for them (its used_event among them, with EVENT_IDX).
    pub fn publish(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        if self.pending == 0 {
            return Ok(false);
        }
        let old = Wrapping(queue.next_used());
        let new = old + Wrapping(self.pending);
        let idx = GuestAddress(queue.used_ring()).checked_add(USED_IDX).ok_or(QueueError::Wraps)?;
        // Release: the entries and the data in the buffers are visible before the index.
        mem.store(u16::to_le(new.0), idx, Ordering::Release).map_err(QueueError::UsedRing)?;
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
            .ok_or(QueueError::Wraps)?;
        let used_event: u16 = mem.load(used_event, Ordering::Acquire).map_err(QueueError::UsedEvent)?;
        // vring_need_event: did the index pass used_event on its way from old to new?
        Ok(new - Wrapping(u16::from_le(used_event)) - Wrapping(1) < new - old)
    }
}
