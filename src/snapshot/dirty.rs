//! Which pages of guest memory changed since the last snapshot: what a Diff snapshot saves.
//!
//! Two logs see the writes, and a page is dirty if either saw it. KVM logs what the vCPUs
//! write (the memory slots carry `KVM_MEM_LOG_DIRTY_PAGES` when tracking is on, see
//! [`crate::vm`]); everything lguest writes goes through vm-memory, whose per-range bitmap
//! ([`crate::memory::DirtyBitmap`]) notes it, and the few writers behind vm-memory's back
//! (the kernel filling disk reads and received frames, the FUSE crate's view of memory) mark
//! their pages themselves ([`crate::virtio::iovec::HostAccess`], `virtio::fs::bridge`).
//! Taking the pages clears both logs, so each snapshot, Full or Diff, starts the next
//! Diff afresh. Nothing here comes from outside: the bitmaps are KVM's and ours.

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::SnapshotError;
use crate::memory::GuestMemoryMmap;

/// Dirty pages, range by range in the order of guest memory: a bit per page, 64 to a word
/// (page `n` of a range is bit `n % 64` of word `n / 64`), as KVM and vm-memory both lay them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPages(pub Vec<Vec<u64>>);

impl DirtyPages {
    /// Whether page `page` of range `range` is dirty.
    pub fn contains(&self, range: usize, page: usize) -> bool {
        self.0.get(range).and_then(|words| words.get(page / 64)).is_some_and(|word| word & (1 << (page % 64)) != 0)
    }

    /// How many pages are dirty.
    pub fn count(&self) -> u64 {
        self.0.iter().flatten().map(|word| u64::from(word.count_ones())).sum()
    }
}

/// The pages written since the last call, by the vCPUs (KVM's log, memory slot `n` for range
/// `n`) or by lguest (the ranges' bitmaps); both logs are cleared. Fails if tracking is off.
pub fn take(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<DirtyPages, SnapshotError> {
    let mut pages = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let len = usize::try_from(region.len()).map_err(|_| SnapshotError::Invalid("guest memory does not fit this host".into()))?;
        let mut words = vm.get_dirty_log(slot as u32, len).map_err(|source| SnapshotError::Kvm { what: "give its dirty page log", source })?;
        merge(&mut words, &take_marked(region)?);
        pages.push(words);
    }
    Ok(DirtyPages(pages))
}

/// What lguest's own writes marked in `region`'s bitmap, cleared.
fn take_marked(region: &crate::memory::GuestRegionMmap) -> Result<Vec<u64>, SnapshotError> {
    bitmap_of(region).map(|bitmap| bitmap.get_and_reset()).ok_or(SnapshotError::NotTracking)
}

/// The range's own bitmap (the mapping's, not vm-memory's view of a slice of it).
fn bitmap_of(region: &crate::memory::GuestRegionMmap) -> Option<&vm_memory::bitmap::AtomicBitmap> {
    std::ops::Deref::deref(region).bitmap().as_ref()
}

fn merge(into: &mut [u64], from: &[u64]) {
    into.iter_mut().zip(from).for_each(|(word, marked)| *word |= marked);
}

/// The pages lguest's writes marked since the last call, as page numbers from the start of
/// guest memory (ranges one after the other, as in the memory file), cleared: for tests,
/// which ask what one step of a device marked.
pub fn take_marked_pages(mem: &GuestMemoryMmap) -> Vec<u64> {
    let mut pages = Vec::new();
    let mut first = 0u64;
    for region in mem.iter() {
        let words = take_marked(region).unwrap_or_default();
        let marked = (0..words.len() * 64).filter(|&page| words[page / 64] & (1 << (page % 64)) != 0);
        pages.extend(marked.map(|page| first + page as u64));
        first += region.len() / crate::memory::PAGE_SIZE as u64;
    }
    pages
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::memory::Tracking;

    #[test]
    fn pages_are_merged_bit_by_bit() {
        let mut kvm = vec![0b0101, 0];
        merge(&mut kvm, &[0b0011, 1 << 63]);
        let pages = DirtyPages(vec![kvm]);
        assert_eq!(pages.count(), 4);
        assert!(pages.contains(0, 0) && pages.contains(0, 1) && pages.contains(0, 2) && pages.contains(0, 127));
        assert!(!pages.contains(0, 3) && !pages.contains(1, 0) && !pages.contains(0, 128));
    }

    #[test]
    fn writes_through_vm_memory_are_marked_across_ranges_and_taking_them_clears_them() {
        let mem = crate::memory::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x10000), 0x4000)], Tracking::DirtyPages).expect("memory");
        mem.write_obj(1u8, GuestAddress(0x1000)).expect("write");
        mem.write_slice(&[2u8; 0x1001], GuestAddress(0x10fff)).expect("write");
        // Pages 4..8 are the second range's (the memory file puts ranges one after the other).
        assert_eq!(take_marked_pages(&mem), vec![1, 4, 5]);
        assert!(take_marked_pages(&mem).is_empty(), "taking the marks clears them");
        mem.write_obj(3u8, GuestAddress(0x3fff)).expect("write");
        let marked: Vec<_> = mem.iter().map(|region| take_marked(region).expect("tracked")).collect();
        assert_eq!(marked, vec![vec![0b1000], vec![0]]);
    }

    #[test]
    fn memory_without_tracking_has_no_marks_to_take() {
        let mem = crate::memory::from_ranges(&[(GuestAddress(0), 0x4000)], Tracking::Off).expect("memory");
        mem.write_obj(1u8, GuestAddress(0)).expect("write");
        assert!(take_marked_pages(&mem).is_empty());
        let region = mem.iter().next().expect("a region");
        assert!(matches!(take_marked(region), Err(SnapshotError::NotTracking)));
    }
}
