//! What the fuzz targets share: a small guest memory, and a virtqueue the fuzzer lays out in it.
//!
//! Every virtio device reads its requests out of guest memory: descriptor tables, the available
//! ring and the buffers are all written by the guest, so a malicious guest can forge any byte of
//! them. The targets let the fuzzer be that guest. [`Guest`] is a structured description the
//! fuzzer mutates (ring placement, descriptors with addresses near or far, the available ring,
//! indirect tables, and raw pokes anywhere last, so nothing is out of reach); [`Guest::install`]
//! writes it into memory and returns the queue the device would be handed at DRIVER_OK, checked
//! exactly as the transport checks it. The device then serves it synchronously, through the
//! handler its worker thread runs ([`by_hand`]).
//!
//! The memory has three regions, two of them adjacent and one behind a hole, so that buffers
//! spanning regions and buffers running into a hole are both within reach.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

use arbitrary::Arbitrary;
use lguest::virtio::worker::HandDriven;
use lguest::virtio::{Activation, Device};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use lguest::memory::GuestMemoryMmap;

/// Guest memory: `[0, 0x8000)` and `[0x8000, 0xc000)` back to back, a hole, `[0xd000, 0x10000)`.
pub const REGIONS: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x4000), (0xd000, 0x3000)];
/// One past the last guest byte.
pub const MEM_END: u64 = 0x1_0000;

/// Where a fuzz target's vsock device listens: one path per process, reused by every input
/// (a device removes its socket when dropped, and a stale one is replaced).
pub fn vsock_path() -> PathBuf {
    std::env::temp_dir().join(format!("lguest-fuzz-vsock-{}.sock", std::process::id()))
}

/// The directory a fuzz target's virtio-fs device shares: one per process, made on first use
/// (a forged request may change what is in it, never what is outside).
pub fn fs_share() -> lguest::config::ShareConfig {
    let dir = std::env::temp_dir().join(format!("lguest-fuzz-share-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("the fuzz share");
    lguest::config::ShareConfig { dir, tag: "fuzz".into(), readonly: false }
}

/// A fresh guest memory, all zeros.
pub fn memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS.iter().map(|&(at, len)| (GuestAddress(at), len)).collect();
    lguest::memory::from_ranges(&ranges, lguest::memory::Tracking::Off).expect("guest memory")
}

/// Writes what fits; bytes that fall in the hole or past the end are the guest's loss.
pub fn poke(mem: &GuestMemoryMmap, at: u64, bytes: &[u8]) {
    for (i, byte) in bytes.iter().enumerate() {
        let _ = mem.write_obj(*byte, GuestAddress(at.wrapping_add(i as u64)));
    }
}

/// Every handler of `device` for `activation` (one per worker it would start), each driven by
/// hand as [`by_hand`]'s.
pub fn each_by_hand<D: Device>(device: &D, activation: Activation) -> Vec<HandDriven<D::Handler>> {
    HandDriven::activate_each(device, activation).expect("the activation has the queues the device needs")
}

/// `device`'s handler for `activation`, driven by hand as its worker thread would drive it:
/// `handle(token)` is an event on the fd registered as `token` (queue *i*'s kick is token *i*).
pub fn by_hand<D: Device>(device: &D, activation: Activation) -> HandDriven<D::Handler> {
    HandDriven::activate(device, activation).expect("the activation has the queues the device needs")
}

/// A descriptor's address: mostly inside guest memory, sometimes anywhere at all.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    Near(u16),
    Far(u64),
}

impl Addr {
    pub fn raw(self) -> u64 {
        match self {
            Addr::Near(at) => u64::from(at),
            Addr::Far(at) => at,
        }
    }
}

/// A descriptor's length: mostly small, sometimes huge.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    Small(u8),
    Page(u16),
    Any(u32),
}

impl Len {
    pub fn raw(self) -> u32 {
        match self {
            Len::Small(n) => u32::from(n),
            Len::Page(n) => u32::from(n),
            Len::Any(n) => n,
        }
    }
}

/// `struct virtq_desc`, as the guest writes it.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Desc {
    pub addr: Addr,
    pub len: Len,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub fn bytes(&self) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&self.addr.raw().to_le_bytes());
        raw[8..12].copy_from_slice(&self.len.raw().to_le_bytes());
        raw[12..14].copy_from_slice(&self.flags.to_le_bytes());
        raw[14..].copy_from_slice(&self.next.to_le_bytes());
        raw
    }
}

/// One split virtqueue as a malicious driver might set it up.
#[derive(Arbitrary, Debug)]
pub struct Guest {
    /// The queue size is `1 << (size_log2 % 9)`, capped at the device's maximum.
    pub size_log2: u8,
    /// Ring addresses, aligned as the spec requires (the transport refuses misaligned ones).
    pub desc_table: u16,
    pub avail_ring: u16,
    pub used_ring: u16,
    pub event_idx: bool,
    pub avail_flags: u16,
    pub avail_idx: u16,
    pub used_event: u16,
    /// The available ring's entries: head indices, which may name any descriptor or none.
    pub heads: Vec<u16>,
    /// The descriptor table, from entry 0 (more entries than the size spill past its end).
    pub descs: Vec<Desc>,
    /// Extra descriptor tables (for INDIRECT descriptors to point at), anywhere.
    pub tables: Vec<(u16, Vec<Desc>)>,
    /// Raw bytes written last: buffers' contents, or corruption of anything above.
    pub pokes: Vec<(u16, Vec<u8>)>,
}

impl Guest {
    pub fn size(&self, max_size: u16) -> u16 {
        (1u16 << (self.size_log2 % 9)).min(max_size)
    }

    /// Writes the guest's side into `mem` and returns the queue the transport would hand the
    /// device at DRIVER_OK, or `None` where the transport would refuse it (NEEDS_RESET).
    pub fn install(&self, mem: &GuestMemoryMmap, max_size: u16) -> Option<Queue> {
        let size = self.size(max_size);
        let (desc, avail, used) =
            (u64::from(self.desc_table & !15), u64::from(self.avail_ring & !1), u64::from(self.used_ring & !3));
        for (i, d) in self.descs.iter().enumerate().take(1024) {
            poke(mem, desc + 16 * i as u64, &d.bytes());
        }
        poke(mem, avail, &self.avail_flags.to_le_bytes());
        poke(mem, avail + 2, &self.avail_idx.to_le_bytes());
        for (i, head) in self.heads.iter().enumerate().take(usize::from(size)) {
            poke(mem, avail + 4 + 2 * i as u64, &head.to_le_bytes());
        }
        poke(mem, avail + 4 + 2 * u64::from(size), &self.used_event.to_le_bytes());
        for (at, table) in &self.tables {
            for (i, d) in table.iter().enumerate().take(1024) {
                poke(mem, u64::from(*at) + 16 * i as u64, &d.bytes());
            }
        }
        for (at, bytes) in &self.pokes {
            poke(mem, u64::from(*at), bytes);
        }
        queue(mem, max_size, size, desc, avail, used, self.event_idx)
    }
}

/// A queue set up and checked as `transport::active_queue` does it.
pub fn queue(
    mem: &GuestMemoryMmap,
    max_size: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
) -> Option<Queue> {
    let mut queue = Queue::new(max_size).ok()?;
    queue.try_set_size(size).ok()?;
    queue.try_set_desc_table_address(GuestAddress(desc)).ok()?;
    queue.try_set_avail_ring_address(GuestAddress(avail)).ok()?;
    queue.try_set_used_ring_address(GuestAddress(used)).ok()?;
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    queue.is_valid(mem).then_some(queue)
}

/// An anonymous in-memory file holding `bytes`, and a path that opens it (`/proc/self/fd/N`):
/// kernel images and disk images without touching a file system.
pub struct MemFile {
    pub file: File,
    pub path: PathBuf,
}

impl MemFile {
    pub fn new(bytes: &[u8]) -> MemFile {
        // SAFETY: the name is a NUL-terminated literal; memfd_create reads nothing else.
        let fd = unsafe { libc::memfd_create(c"lguest-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let mut file = unsafe { File::from_raw_fd(fd) };
        file.write_all(bytes).expect("fill memfd");
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        MemFile { file, path }
    }
}

/// The first `len % 9` bytes of `value`, little-endian: the data of one MMIO or port I/O access,
/// in every width from 0 to 8 bytes (including widths KVM never produces).
pub fn value_bytes(value: u64, len: u8) -> Vec<u8> {
    value.to_le_bytes()[..usize::from(len % 9)].to_vec()
}

/// A virtio device that only checks what the transport hands it: the fuzzer picks its queues,
/// features and config space, and every activation must bring queues the transport has checked
/// against guest memory and features the device offered.
pub struct Probe {
    pub sizes: Vec<u16>,
    pub features: u64,
    pub config: Vec<u8>,
    pub refuse: bool,
    pub activations: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl lguest::virtio::VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        lguest::virtio::device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = at.and_then(|at| self.config.get(at)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, value) in data.iter().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(byte) = at.and_then(|at| self.config.get_mut(at)) {
                *byte = *value;
            }
        }
    }

    fn activate(&mut self, activation: lguest::virtio::Activation) -> Result<(), lguest::virtio::ActivateError> {
        use lguest::virtio::feature;
        let offered = self.features | feature::VERSION_1 | feature::RING_INDIRECT_DESC | feature::RING_EVENT_IDX;
        assert_eq!(activation.features & !offered, 0, "activated with features never offered");
        assert_ne!(activation.features & feature::VERSION_1, 0, "activated without VERSION_1");
        assert_eq!(activation.queues.len(), self.sizes.len(), "one entry per queue");
        for (active, &max) in activation.queues.iter().zip(&self.sizes) {
            let Some(active) = active else { continue };
            let queue = &active.queue;
            assert!(queue.ready() && queue.is_valid(&activation.mem), "activated with a queue outside memory");
            assert!(queue.size().is_power_of_two() && queue.size() <= max, "queue size {}", queue.size());
        }
        self.activations.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.refuse {
            return Err(lguest::virtio::ActivateError::QueueNotEnabled("refused by the fuzzer"));
        }
        Ok(())
    }

    fn reset(&mut self) {}
}
