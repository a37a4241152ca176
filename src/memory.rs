//! The guest-physical address map.
//!
//! A guest sees RAM from address zero, a hole from 3 GiB to 4 GiB where the interrupt
//! controllers (and later PCI) live, and the rest of its RAM above 4 GiB. The low megabyte keeps
//! the PC's traditional shape because Linux still looks there: it scans 0xE0000..0x100000 for
//! the ACPI RSDP, and expects the EBDA below 640 KiB to be off-limits.
//!
//! Every guest address that comes from outside (the kernel image, and later the guest's own
//! descriptors) is checked by `vm-memory`'s bounds-checked accessors; nothing here hands out
//! raw pointers.
//!
//! Dirty pages: with tracking on (`track_dirty_pages`, for Diff snapshots) each RAM range
//! carries a bitmap with a bit per page, which vm-memory sets on every write made through
//! it (devices, loaders, queues). The vCPUs' writes are KVM's to log (see
//! [`crate::snapshot::dirty`]). Off, the bitmap is `None`: a branch per write, nothing more.

use std::num::NonZeroUsize;
use std::sync::{Arc, Weak};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::GuestAddress;

use crate::error::{Error, Result};

/// What notes a range's dirty pages: a bitmap when tracking is on, nothing when it is off.
pub type DirtyBitmap = Option<AtomicBitmap>;
/// The guest's RAM as every part of lguest sees it (vm-memory's, with [`DirtyBitmap`]s).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyBitmap>;
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<DirtyBitmap>;
type MmapRegion = vm_memory::MmapRegion<DirtyBitmap>;

/// Whether writes to guest memory are noted page by page, for a Diff snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    Off,
    DirtyPages,
}

/// The unit of dirty tracking, and of a snapshot's memory file: the host's (and guest's) page.
pub const PAGE_SIZE: usize = 4096;

impl Tracking {
    fn bitmap(self, len: usize) -> DirtyBitmap {
        let page = NonZeroUsize::new(PAGE_SIZE)?;
        (self == Tracking::DirtyPages).then(|| AtomicBitmap::new(len, page))
    }
}

/// Notes that the `len` bytes at `addr` were written behind vm-memory's back (by the kernel,
/// or through another view of the same mappings). Bytes outside guest memory are skipped: no
/// write could have reached them.
pub fn mark_dirty(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestMemoryBackend;
    for slice in mem.get_slices(addr, len).flatten() {
        slice.bitmap().mark_dirty(0, slice.len());
    }
}

/// Guest memory over fresh anonymous mappings at `ranges`, for tests, fuzzers and tools that
/// need no [`GuestRam`]: vm-memory's own `from_ranges`, with dirty tracking as asked.
pub fn from_ranges(ranges: &[(GuestAddress, usize)], tracking: Tracking) -> Result<GuestMemoryMmap> {
    let regions = ranges
        .iter()
        .map(|&(start, len)| {
            let builder = MmapRegionBuilder::new_with_bitmap(len, tracking.bitmap(len)).with_mmap_prot(PROT);
            let region = builder.build().map_err(|e| Error::Memory(e.to_string()))?;
            GuestRegionMmap::new(region, start).ok_or_else(too_large)
        })
        .collect::<Result<Vec<_>>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Memory(e.to_string()))
}

/// Where the fixed boot structures go, all in the first 640 KiB of RAM.
pub mod layout {
    /// The boot GDT: null, null, code at selector 0x10, data at 0x18, TSS at 0x20.
    pub const GDT: u64 = 0x500;
    /// An empty IDT: nothing should fault before the kernel loads its own.
    pub const IDT: u64 = 0x520;
    /// PVH's `hvm_start_info`, followed by its module list and memory map.
    pub const PVH_START_INFO: u64 = 0x6000;
    pub const PVH_MODLIST: u64 = 0x6040;
    pub const PVH_MEMMAP: u64 = 0x6080;
    /// The Linux boot protocol's "zero page" (`boot_params`).
    pub const ZERO_PAGE: u64 = 0x7000;
    /// A little stack for the first instructions; the kernel switches to its own at once.
    pub const BOOT_STACK: u64 = 0x8ff0;
    /// Identity page tables for the 64-bit entry: one PML4, one PDPT, four PDs (4 GiB).
    pub const PML4: u64 = 0x9000;
    pub const PDPT: u64 = 0xa000;
    pub const PD: u64 = 0xb000;
    /// The kernel command line.
    pub const CMDLINE: u64 = 0x2_0000;
    pub const CMDLINE_MAX: u64 = 0x1_0000;
    /// The extended BIOS data area and the legacy hole: not RAM to the guest.
    pub const EBDA: u64 = 0x9_fc00;
    /// ACPI tables, where Linux's RSDP scan finds them.
    pub const ACPI: u64 = 0xe_0000;
    pub const ACPI_END: u64 = 0x10_0000;
    /// Where an x86 CPU starts after a reset (F000:FFF0), inside the reserved area above.
    pub const RESET_VECTOR: u64 = 0xf_fff0;
    /// Kernels are loaded from 1 MiB up.
    pub const HIGH_RAM: u64 = 0x10_0000;
    /// The hole below 4 GiB for the IOAPIC, the local APICs and device MMIO.
    pub const MMIO_HOLE: u64 = 0xc000_0000;
    /// Where PCI BARs go: the first 512 MiB of the hole, described to the guest as the PCI
    /// root's memory window in the DSDT.
    pub const PCI_WINDOW: u64 = MMIO_HOLE;
    pub const PCI_WINDOW_SIZE: u64 = 0x2000_0000;
    pub const FOUR_GIB: u64 = 0x1_0000_0000;
    pub const IOAPIC: u64 = 0xfec0_0000;
    pub const LAPIC: u64 = 0xfee0_0000;
    /// Scratch pages KVM needs for the TSS of real-mode emulation on Intel hosts.
    pub const KVM_TSS: u64 = 0xfffb_d000;
}

/// The e820 memory types we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
}

/// One entry of the memory map given to the guest (through boot_params or PVH's memmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

/// The guest's RAM as (start, length) ranges: below the MMIO hole, and the rest above 4 GiB.
pub fn ram_ranges(memory_bytes: u64) -> Vec<(GuestAddress, u64)> {
    let low = memory_bytes.min(layout::MMIO_HOLE);
    let mut ranges = vec![(GuestAddress(0), low)];
    if memory_bytes > low {
        ranges.push((GuestAddress(layout::FOUR_GIB), memory_bytes - low));
    }
    ranges
}

/// The end of RAM below the hole: boot structures and the initrd must sit below it.
pub fn low_ram_end(memory_bytes: u64) -> u64 {
    memory_bytes.min(layout::MMIO_HOLE)
}

/// The memory map the guest is told about: RAM, minus the EBDA and the legacy hole, with the
/// ACPI area reserved so the kernel keeps its hands off our tables.
pub fn e820_map(memory_bytes: u64) -> Vec<E820Entry> {
    let ram = |addr, end: u64| E820Entry { addr, size: end - addr, kind: E820Type::Ram };
    let mut map = vec![
        ram(0, layout::EBDA),
        E820Entry { addr: layout::ACPI, size: layout::ACPI_END - layout::ACPI, kind: E820Type::Reserved },
        ram(layout::HIGH_RAM, low_ram_end(memory_bytes)),
    ];
    if memory_bytes > layout::MMIO_HOLE {
        map.push(ram(layout::FOUR_GIB, layout::FOUR_GIB + memory_bytes - layout::MMIO_HOLE));
    }
    map
}

/// The guest's RAM: the `vm-memory` view that loaders, vCPUs and devices share (clones of it are
/// cheap), and the mappings behind that view, which this owns. Dropping it unmaps the RAM once
/// every clone is gone, so a VM that is torn down (to restart a rebooted guest) gives its memory
/// back. Dereferences to the `GuestMemoryMmap`.
pub struct GuestRam {
    // Declared first, so it is dropped before the mappings look for remaining users.
    mem: GuestMemoryMmap,
    // Held for their `Drop`, which unmaps them.
    _mappings: Vec<AlignedMapping>,
}

impl std::ops::Deref for GuestRam {
    type Target = GuestMemoryMmap;

    fn deref(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

/// Maps the guest's RAM into our address space. Pages are not touched here: the kernel only
/// hands us memory as the guest first writes it, which keeps an idle VM's footprint small.
pub fn create_guest_memory(memory_bytes: u64, tracking: Tracking) -> Result<GuestRam> {
    map_ram(memory_bytes, tracking, |_, _| Ok(()))
}

/// Maps a snapshot's memory file as the guest's RAM (its ranges one after the other, as
/// [`ram_ranges`] lays them out), privately: pages are read from the file when the guest first
/// touches them, and its writes stay in our copy. So a restore costs the same for any size of
/// guest, and many guests can be restored from one file at once.
pub fn map_guest_memory_file(file: &std::fs::File, memory_bytes: u64, tracking: Tracking) -> Result<GuestRam> {
    use std::os::fd::AsRawFd;
    let mut offset = 0i64;
    map_ram(memory_bytes, tracking, |mapping, len| {
        // SAFETY: MAP_FIXED over the anonymous mapping `map_ram` just made and owns, at its
        // start and of its length: nothing else is there. The file's length was checked by the
        // caller.
        let placed = unsafe {
            let flags = libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE;
            libc::mmap(mapping.addr as *mut libc::c_void, len, PROT, flags, file.as_raw_fd(), offset)
        };
        if placed == libc::MAP_FAILED {
            return Err(Error::Memory(format!("cannot map the memory file: {}", std::io::Error::last_os_error())));
        }
        offset += len as i64;
        Ok(())
    })
}

/// Maps each RAM range on a 2 MiB boundary, lets `fill` put something there (a file) first,
/// and makes the `vm-memory` view over them.
fn map_ram(memory_bytes: u64, tracking: Tracking, mut fill: impl FnMut(&AlignedMapping, usize) -> Result<()>) -> Result<GuestRam> {
    let mut mappings = Vec::new();
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(memory_bytes) {
        let len = usize::try_from(len).map_err(|_| too_large())?;
        let mut mapping = map_aligned(len)?;
        fill(&mapping, len)?;
        let region = Arc::new(mapping.region(tracking)?);
        mapping.region = Arc::downgrade(&region);
        mappings.push(mapping);
        regions.push(GuestRegionMmap::with_arc(region, start).ok_or_else(too_large)?);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Memory(e.to_string()))?;
    Ok(GuestRam { mem, _mappings: mappings })
}

fn too_large() -> Error {
    Error::Memory("guest memory does not fit this host's address space; try a smaller --memory".into())
}

/// 2 MiB: the size of a huge page, and of a large page in the guest's nested page tables.
const HUGE_PAGE: usize = 2 << 20;
const PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;
const FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// One range of guest RAM, mapped by us on a 2 MiB boundary and unmapped when dropped.
///
/// `vm-memory` sees it through an `MmapRegion` built from a raw pointer, and such a region
/// never unmaps what it did not map itself. So the unmap is ours, and it must wait until the
/// last `MmapRegion` of the range is gone: `region` tells us. Should one still be alive (a
/// thread we failed to stop holds a clone of the memory), we leave the range mapped: a leak,
/// where unmapping would let that thread write into whatever the kernel maps there next.
struct AlignedMapping {
    addr: usize,
    len: usize,
    region: Weak<MmapRegion>,
}

impl AlignedMapping {
    /// The `vm-memory` region over this range.
    fn region(&self, tracking: Tracking) -> Result<MmapRegion> {
        let builder = MmapRegionBuilder::new_with_bitmap(self.len, tracking.bitmap(self.len));
        // SAFETY: [addr, addr+len) is a live read-write mapping that `self` unmaps only once no
        // `MmapRegion` over it is left (see `Drop`), so it stays valid for every user of the region.
        let builder = unsafe { builder.with_raw_mmap_pointer(self.addr as *mut u8) };
        builder.with_mmap_prot(PROT).with_mmap_flags(FLAGS).build().map_err(|e| Error::Memory(e.to_string()))
    }
}

impl Drop for AlignedMapping {
    fn drop(&mut self) {
        if self.region.strong_count() > 0 {
            tracing::warn!("guest memory is still in use after its VM stopped: leaving it mapped");
            return;
        }
        // SAFETY: we mapped this range, and no `MmapRegion` over it is left (a `Weak` that counts
        // zero can't be upgraded again), so nothing can reach it any more.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// An anonymous mapping of `len` bytes that starts on a 2 MiB boundary. KVM can back guest
/// memory with 2 MiB pages in its nested page tables only where guest-physical and host
/// addresses agree modulo 2 MiB; our RAM ranges start 2 MiB-aligned, so aligning the host
/// side lets every guest access after the first go through large pages, and lets the host
/// kernel use transparent huge pages behind them.
fn map_aligned(len: usize) -> Result<AlignedMapping> {
    let host_error = |what: &str| Error::Memory(format!("{what}: {}; try a smaller --memory", std::io::Error::last_os_error()));
    let padded = len.checked_add(HUGE_PAGE).ok_or_else(too_large)?;
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; nothing else
    // refers to it yet.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), padded, PROT, FLAGS, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(host_error("cannot map guest memory"));
    }
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    let (head, tail) = (start - base, base + padded - (start + len));
    // SAFETY: both trimmed ranges lie inside the mapping made above and outside [start, start+len).
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    Ok(AlignedMapping { addr: start, len, region: Weak::new() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let ranges = ram_ranges(5 << 30);
        assert_eq!(ranges, vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 2 << 30)]);
    }

    #[test]
    fn e820_of_a_small_guest() {
        let map = e820_map(256 << 20);
        assert_eq!(
            map,
            vec![
                E820Entry { addr: 0, size: 0x9fc00, kind: E820Type::Ram },
                E820Entry { addr: 0xe0000, size: 0x20000, kind: E820Type::Reserved },
                E820Entry { addr: 0x100000, size: (256 << 20) - 0x100000, kind: E820Type::Ram },
            ]
        );
    }

    #[test]
    fn e820_of_a_large_guest_covers_all_ram_and_never_the_hole() {
        let memory = 6u64 << 30;
        let map = e820_map(memory);
        let ram: u64 = map.iter().filter(|e| e.kind == E820Type::Ram).map(|e| e.size).sum();
        // All RAM but the EBDA-to-1MiB gap is offered to the guest.
        assert_eq!(ram, memory - (layout::HIGH_RAM - layout::EBDA));
        for entry in &map {
            let end = entry.addr + entry.size;
            assert!(end <= layout::MMIO_HOLE || entry.addr >= layout::FOUR_GIB, "{entry:?} overlaps the hole");
        }
    }

    #[test]
    fn guest_ram_is_mapped_on_huge_page_boundaries() {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mem = create_guest_memory(64 << 20, Tracking::Off).expect("memory");
        for region in mem.iter() {
            let host = mem.get_host_address(region.start_addr()).expect("host address") as usize;
            assert_eq!(host % HUGE_PAGE, 0);
            assert_eq!(region.len(), 64 << 20);
        }
    }

    #[test]
    fn memory_still_in_use_stays_mapped_after_its_owner_is_dropped() {
        use vm_memory::{Bytes, GuestAddress};
        let ram = create_guest_memory(64 << 20, Tracking::Off).expect("memory");
        let clone = ram.clone();
        drop(ram);
        // The clone's region would dangle had the owner unmapped it.
        clone.write_obj(0x1234_5678u32, GuestAddress(0x1000)).expect("write");
        assert_eq!(clone.read_obj::<u32>(GuestAddress(0x1000)).expect("read"), 0x1234_5678);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        use layout::*;
        let mut areas = [
            (GDT, 0x20), (IDT, 0x10), (PVH_START_INFO, 0x40), (PVH_MODLIST, 0x40), (PVH_MEMMAP, 0x100),
            (ZERO_PAGE, 0x1000), (PML4, 0x1000), (PDPT, 0x1000), (PD, 0x4000), (CMDLINE, CMDLINE_MAX),
            (EBDA, 0),
        ];
        areas.sort();
        for pair in areas.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{:x?} overlaps {:x?}", pair[0], pair[1]);
        }
    }
}
