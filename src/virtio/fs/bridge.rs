//! The fs device's view of guest memory and of its queues, in the versions its FUSE crate speaks.
//!
//! fuse-backend-rs builds its request reader and reply writer from a `virtio_queue` 0.17
//! descriptor chain over `vm_memory` 0.17 memory; the rest of lguest uses 0.18 of both. The two
//! can't be mixed, and a chain can only be made by a queue of the same version. So when the
//! driver activates the device, this module lays a 0.17 view over the very same host mappings
//! (no copy, no second mmap: [`memory_view`]) and rebuilds each queue as a 0.17 queue from the
//! addresses the driver gave ([`queue_view`]). [`serve`] is the one loop that walks them, with
//! the same guards as `virtio::queue::serve_until_idle`: notifications off while it works, an
//! available index that runs too far breaks the device instead of spinning.
//!
//! Dirty pages: the FUSE crate writes replies through the 0.17 view, which has no dirty
//! bitmap, so [`serve`] marks in the 0.18 memory's bitmap what each reply wrote (the first
//! bytes of the chain's writable buffers) and the used ring, for Diff snapshots.
//!
//! Trust: the views trust nothing more than the 0.18 originals did. Every descriptor address
//! is still checked against the regions when a chain is walked.

use virtio_queue::{Queue, QueueT};
use virtio_queue_fs::{DescriptorChain, Queue as Queue17, QueueOwnedT, QueueT as QueueT17};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use crate::memory::GuestMemoryMmap;
use vm_memory_fs::{GuestAddress as GuestAddress17, GuestMemoryMmap as Memory17, GuestRegionMmap, MmapRegion};

use super::super::Signals;

/// The guest's memory in the FUSE crate's types. It borrows the mappings of the 0.18
/// `GuestMemoryMmap` it was made from, which must outlive it: [`Bridged`] keeps both.
pub type Memory = Memory17;
/// A chain as the FUSE crate reads and writes it.
pub type Chain<'m> = DescriptorChain<&'m Memory>;

/// Why a view could not be made, or a queue could not be walked.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("guest memory region at {start:#x} cannot be viewed: {why}")]
    Region { start: u64, why: String },
    #[error("the driver's available index moved backwards (its rings overlap)")]
    IndexMovedBackwards,
    #[error("queue is unusable: {0}")]
    Queue(#[from] virtio_queue_fs::Error),
}

/// The 0.18 memory (owner of the mappings) and its 0.17 view, kept together so that the view
/// can never outlive what it points at.
pub struct Bridged {
    view: Memory,
    /// Holds the mappings the view borrows, and their dirty bitmaps.
    owner: GuestMemoryMmap,
    /// Whether the owner's writes are tracked (`track_dirty_pages`).
    tracking: bool,
}

impl Bridged {
    pub fn new(owner: GuestMemoryMmap) -> Result<Bridged, BridgeError> {
        let tracking = owner.iter().any(|region| std::ops::Deref::deref(region).bitmap().is_some());
        Ok(Bridged { view: memory_view(&owner)?, owner, tracking })
    }

    pub fn view(&self) -> &Memory {
        &self.view
    }

    /// Marks dirty the first `written` bytes of `chain`'s writable buffers.
    fn mark_reply(&self, chain: &Chain<'_>, written: u32) {
        let mut left = written as usize;
        for descriptor in chain.clone().writable() {
            if left == 0 {
                break;
            }
            let len = left.min(descriptor.len() as usize);
            crate::memory::mark_dirty(&self.owner, GuestAddress(descriptor.addr().0), len);
            left -= len;
        }
    }

    /// Marks dirty the used ring of `queue` (its entries, index and event index).
    fn mark_used_ring(&self, queue: &Queue17) {
        let len = USED_RING_HEADER + USED_ELEMENT * usize::from(queue.size()) + EVENT_INDEX;
        crate::memory::mark_dirty(&self.owner, GuestAddress(queue.used_ring()), len);
    }
}

/// The used ring's flags and index, each of its elements, and the event index after them.
const USED_RING_HEADER: usize = 4;
const USED_ELEMENT: usize = 8;
const EVENT_INDEX: usize = 2;

/// A 0.17 memory over `owner`'s host mappings, region for region.
fn memory_view(owner: &GuestMemoryMmap) -> Result<Memory, BridgeError> {
    let mut regions = Vec::new();
    for region in owner.iter() {
        let start = region.start_addr().0;
        let bad = |why: String| BridgeError::Region { start, why };
        let host = region.as_ptr();
        let size = usize::try_from(region.len()).map_err(|e| bad(e.to_string()))?;
        // SAFETY: `host..host + size` is a live mapping of `owner`'s, readable and writable
        // (guest RAM); `build_raw` makes a region that does not unmap on drop, and `Bridged`
        // keeps `owner` (whose regions are reference-counted) alive as long as the view.
        let mapping = unsafe {
            MmapRegion::<()>::build_raw(host, size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_ANONYMOUS)
        }
        .map_err(|e| bad(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress17(start)).ok_or_else(|| bad("it wraps around".into()))?;
        regions.push(region);
    }
    Memory::from_regions(regions).map_err(|e| BridgeError::Region { start: 0, why: e.to_string() })
}

/// The same queue, as a 0.17 queue: size, ring addresses, event-index and the positions the
/// 0.18 queue had reached (zero at activation, but a copy should be a copy).
pub fn queue_view(queue: &Queue) -> Result<Queue17, BridgeError> {
    let mut view = Queue17::new(queue.max_size())?;
    view.try_set_size(queue.size())?;
    view.try_set_desc_table_address(GuestAddress17(queue.desc_table()))?;
    view.try_set_avail_ring_address(GuestAddress17(queue.avail_ring()))?;
    view.try_set_used_ring_address(GuestAddress17(queue.used_ring()))?;
    view.set_event_idx(queue.event_idx_enabled());
    view.set_next_avail(queue.next_avail());
    view.set_next_used(queue.next_used());
    view.set_ready(true);
    Ok(view)
}

/// Serves every chain the driver has made available on `queue` (queue number `index`) with
/// `serve_one`, which returns how many bytes it wrote; then interrupts the guest once, if it
/// wants to hear. Returns how many chains were served.
pub fn serve(
    queue: &mut Queue17,
    bridged: &Bridged,
    signals: &Signals,
    index: usize,
    mut serve_one: impl FnMut(Chain<'_>) -> u32,
) -> Result<usize, BridgeError> {
    let mem = bridged.view();
    let mut served = 0;
    let mut more_promised = false;
    loop {
        queue.disable_notification(mem)?;
        // `iter` checks that the driver made at most a ring's worth available: an index
        // that ran ahead is an error, not an endless loop.
        let chains: Vec<Chain<'_>> = queue.iter(mem)?.collect();
        if more_promised && chains.is_empty() {
            // The index said "more" and then took it back: it lies on a ring we write
            // (rings laid over each other), and would say so forever.
            return Err(BridgeError::IndexMovedBackwards);
        }
        for chain in chains {
            let head = chain.head_index();
            let reply = bridged.tracking.then(|| chain.clone());
            let written = serve_one(chain);
            if let Some(chain) = reply {
                bridged.mark_reply(&chain, written);
            }
            queue.add_used(mem, head, written)?;
            served += 1;
        }
        if !queue.enable_notification(mem)? {
            break;
        }
        more_promised = true;
    }
    if bridged.tracking {
        bridged.mark_used_ring(queue);
    }
    if served > 0 && queue.needs_notification(mem)? {
        signals.used_queue(index);
    }
    Ok(served)
}
