//! Guest buffers as an iovec array, for one `readv`/`writev`/`preadv`/`pwritev` straight
//! between a host fd (a tap, a disk image) and the guest's own memory: no bounce buffer, no copy
//! of ours.
//!
//! [`IoVecs`] can only be built from ranges vm-memory has found inside guest memory (or from
//! other `VolatileSlice`s), and borrows that memory for as long as it lives, so that every iovec
//! stays valid until the syscall is done. Which ranges to add is the device's business: it has
//! checked them against what the guest may use.
//!
//! Guest memory the host will write into (a disk read, a received frame) is written by the
//! kernel, behind vm-memory's back, so vm-memory's dirty bitmap can't see it: such slices are
//! added with [`IoVecs::push_written`] (or [`HostAccess::Writes`]), which marks their pages
//! dirty for a Diff snapshot as they are added. Devices are paused before any snapshot, so the
//! write lands before the snapshot reads the marks.

use std::marker::PhantomData;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryError, VolatileSlice};
use crate::memory::GuestMemoryMmap;

/// The most iovecs Linux takes in one vectored call (`UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// What the host's syscall does with guest buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostAccess {
    /// It reads them (a frame to send, data for the disk).
    Reads,
    /// It writes them (a frame received, data from the disk): their pages are dirtied.
    Writes,
}

/// Host addresses of guest buffers, ready for one vectored syscall.
pub struct IoVecs<'m> {
    iov: Vec<libc::iovec>,
    bytes: usize,
    _mapping: PhantomData<VolatileSlice<'m>>,
}

impl<'m> IoVecs<'m> {
    pub fn with_capacity(capacity: usize) -> IoVecs<'m> {
        IoVecs { iov: Vec::with_capacity(capacity), bytes: 0, _mapping: PhantomData }
    }

    /// Adds a slice of memory the host only reads.
    pub fn push<B: BitmapSlice>(&mut self, slice: VolatileSlice<'m, B>) {
        // The pointer stays valid for 'm: the slice borrows the mapping for that long, and
        // without vm-memory's xen feature its guard maps nothing of its own.
        let base = slice.ptr_guard_mut().as_ptr();
        self.iov.push(libc::iovec { iov_base: base.cast(), iov_len: slice.len() });
        self.bytes += slice.len();
    }

    /// Adds a slice of memory the host will write into, its pages marked dirty.
    pub fn push_written<B: BitmapSlice>(&mut self, slice: VolatileSlice<'m, B>) {
        slice.bitmap().mark_dirty(0, slice.len());
        self.push(slice);
    }

    /// Adds the `len` bytes of guest memory at `addr`, which may span memory regions (one iovec
    /// a region), for the host to read or to write. Fails, having added part of it, if any byte
    /// is outside guest memory.
    pub fn push_guest(&mut self, mem: &'m GuestMemoryMmap, addr: GuestAddress, len: usize, access: HostAccess) -> Result<(), GuestMemoryError> {
        for slice in mem.get_slices(addr, len) {
            match access {
                HostAccess::Reads => self.push(slice?),
                HostAccess::Writes => self.push_written(slice?),
            }
        }
        Ok(())
    }

    /// How many bytes the iovecs cover.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many iovecs there are.
    pub fn len(&self) -> usize {
        self.iov.len()
    }

    pub fn is_empty(&self) -> bool {
        self.iov.is_empty()
    }

    /// The iovecs, for a vectored syscall; each points into memory borrowed for `'m`.
    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// The iovecs, for a call that resumes after a short transfer by trimming their fronts
    /// (never by pointing them anywhere else).
    pub fn as_mut_slice(&mut self) -> &mut [libc::iovec] {
        &mut self.iov
    }
}

impl Default for IoVecs<'_> {
    fn default() -> Self {
        IoVecs::with_capacity(0)
    }
}

/// An iovec count as the syscalls want it; callers pass at most [`MAX_IOVECS`].
pub fn iovec_count(iovecs: &[libc::iovec]) -> libc::c_int {
    libc::c_int::try_from(iovecs.len()).unwrap_or(libc::c_int::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iovecs_cover_the_slices_pushed() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let mut iovecs = IoVecs::default();
        iovecs.push(VolatileSlice::from(&mut a[..]));
        iovecs.push(VolatileSlice::from(&mut b[..]));
        assert_eq!((iovecs.len(), iovecs.bytes()), (2, 8));
    }

    #[test]
    fn a_guest_range_across_two_regions_takes_one_iovec_each_and_a_range_outside_fails() {
        let mem = crate::memory::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)], crate::memory::Tracking::Off).expect("memory");
        let mut iovecs = IoVecs::default();
        iovecs.push_guest(&mem, GuestAddress(0xff0), 0x20, HostAccess::Reads).expect("inside");
        assert_eq!((iovecs.len(), iovecs.bytes()), (2, 0x20));
        assert!(iovecs.push_guest(&mem, GuestAddress(0x1ff0), 0x20, HostAccess::Reads).is_err());
    }

    #[test]
    fn only_buffers_the_host_writes_are_marked_dirty() {
        use crate::memory::Tracking;
        use crate::snapshot::dirty::take_marked_pages;
        let mem = crate::memory::from_ranges(&[(GuestAddress(0), 0x10000)], Tracking::DirtyPages).expect("memory");
        let mut iovecs = IoVecs::default();
        iovecs.push_guest(&mem, GuestAddress(0x1000), 0x10, HostAccess::Reads).expect("inside");
        iovecs.push_guest(&mem, GuestAddress(0x3ff0), 0x20, HostAccess::Writes).expect("inside");
        assert_eq!(take_marked_pages(&mem), vec![3, 4], "the written range's two pages only");
    }
}
