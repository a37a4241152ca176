//! The receive buffers virtio-net holds: chains taken from the receive ring, checked, and kept
//! until a frame from the tap fills them, oldest first.
//!
//! With mergeable receive buffers a frame may fill several chains, so before reading a frame we
//! hold as many as the largest frame needs (or as many as one readv takes); without, one chain
//! a frame. Each chain is checked when taken: writable, inside guest memory, not looping, room
//! for the virtio-net header. A chain unfit for any frame is [`Unfit`], and goes back unused.

use std::collections::VecDeque;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, VolatileSlice};
use crate::memory::GuestMemoryMmap;

use super::tap::VNET_HDR_LEN;
use crate::virtio::iovec::{IoVecs, MAX_IOVECS};
use crate::virtio::queue::Chain;

/// Receive buffers one readv fills: all the iovecs but the spill byte (see `receive_frame`).
const MAX_RX_SEGMENTS: usize = MAX_IOVECS - 1;

/// Receive chains taken from the ring but not yet filled, oldest first. The guest may see
/// them filled only in this order, which is the order it posted them.
#[derive(Default)]
pub(super) struct HeldBuffers {
    chains: VecDeque<HeldChain>,
    /// Every held chain's buffers, in order: (guest address, length), all checked to be in
    /// memory when taken.
    segments: VecDeque<(GuestAddress, usize)>,
    /// Bytes all held chains can take.
    room: usize,
}

pub(super) struct HeldChain {
    pub(super) head: u16,
    segments: usize,
    pub(super) room: usize,
}

pub(super) enum Hold {
    Held,
    /// Holding it would make more buffers than one readv takes; the chain is untouched.
    NoRoom,
}

impl HeldBuffers {
    /// Takes a receive chain's buffers, or says why the chain can't take a frame.
    pub(super) fn hold(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> Result<Hold, Unfit> {
        let head = chain.head_index();
        let first = self.segments.len();
        let result = self.hold_segments(mem, chain);
        let room = match result {
            Ok(room) => room,
            Err(why) => {
                self.segments.truncate(first);
                return match why {
                    // Too many for what's held already, but it might do alone.
                    Unfit::TooManyPieces if first > 0 => Ok(Hold::NoRoom),
                    why => Err(why),
                };
            }
        };
        self.chains.push_back(HeldChain { head, segments: self.segments.len() - first, room });
        self.room += room;
        Ok(Hold::Held)
    }

    fn hold_segments(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> Result<usize, Unfit> {
        let mut room = 0usize;
        let mut cut_short = false;
        for descriptor in chain {
            cut_short = descriptor.has_next();
            if !descriptor.is_write_only() {
                return Err(Unfit::ReadOnly);
            }
            let len = descriptor.len() as usize;
            if len == 0 {
                continue;
            }
            if !mem.check_range(descriptor.addr(), len) {
                return Err(Unfit::OutsideMemory);
            }
            if self.segments.len() == MAX_RX_SEGMENTS {
                return Err(Unfit::TooManyPieces);
            }
            self.segments.push_back((descriptor.addr(), len));
            room += len;
        }
        if cut_short {
            return Err(Unfit::CutShort);
        }
        if room < VNET_HDR_LEN {
            return Err(Unfit::TooSmall);
        }
        Ok(room)
    }

    /// No chain is held.
    pub(super) fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Bytes all held chains can take.
    pub(super) fn room(&self) -> usize {
        self.room
    }

    /// No more buffers fit in one readv.
    pub(super) fn is_full(&self) -> bool {
        self.segments.len() >= MAX_RX_SEGMENTS
    }

    /// Host iovecs over the held buffers (all of them, or the first chain's only), then `spill`.
    pub(super) fn iovecs<'m>(&self, mem: &'m GuestMemoryMmap, all: bool, spill: &'m mut [u8]) -> Result<IoVecs<'m>, GuestMemoryError> {
        let count = if all { self.segments.len() } else { self.chains.front().map_or(0, |c| c.segments) };
        let mut iovecs = IoVecs::default();
        'segments: for &(addr, len) in self.segments.iter().take(count) {
            for slice in mem.get_slices(addr, len) {
                // Checked when the chain was taken, and guest memory doesn't change under us.
                let slice = slice?;
                if iovecs.len() == MAX_RX_SEGMENTS {
                    // A buffer split across memory regions: the frame gets the room before it.
                    break 'segments;
                }
                iovecs.push_written(slice);
            }
        }
        iovecs.push(VolatileSlice::from(spill));
        Ok(iovecs)
    }

    /// How many held chains, in order, a frame of `len` bytes fills.
    pub(super) fn chains_filled_by(&self, len: usize) -> usize {
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
    pub(super) fn write_in_first(&self, mem: &GuestMemoryMmap, offset: usize, bytes: &[u8]) -> Result<(), GuestMemoryError> {
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
            let at = addr.checked_add(skip as u64).ok_or(GuestMemoryError::InvalidGuestAddress(addr))?;
            mem.write_slice(&bytes[..n], at)?;
            bytes = &bytes[n..];
            skip = 0;
        }
        Ok(())
    }

    /// Forgets the first chain (it has been filled) and its buffers.
    pub(super) fn take_first(&mut self) -> Option<HeldChain> {
        let chain = self.chains.pop_front()?;
        self.segments.drain(..chain.segments.min(self.segments.len()));
        self.room -= chain.room;
        Some(chain)
    }
}

/// Why a receive chain can't be held: not for any frame, ever (but for
/// [`Unfit::TooManyPieces`] beside chains held already, which may do alone).
#[derive(Debug, thiserror::Error)]
pub(super) enum Unfit {
    #[error("a receive chain has a read-only descriptor")]
    ReadOnly,
    #[error("a receive buffer lies outside guest memory")]
    OutsideMemory,
    #[error("a receive chain in more pieces than one readv takes")]
    TooManyPieces,
    #[error("a receive chain loops or names a descriptor outside its table")]
    CutShort,
    #[error("a receive chain too small for the virtio-net header")]
    TooSmall,
}
