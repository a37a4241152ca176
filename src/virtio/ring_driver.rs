//! The driver's side of one split virtqueue, for device tests: it lays the rings out in guest
//! memory, posts chains and reads the used ring, all as raw bytes, so that a test can write
//! whatever a hostile driver would (loops, lengths past memory, an index run ahead) and see
//! what the device made of it. The device under test gets the matching `Queue`; nothing here
//! goes through the device's own queue code, so a bug there can't hide behind it.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// A descriptor's flag: the device writes this buffer.
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// One queue's rings and buffers, as its driver sees them.
pub struct RingDriver {
    pub mem: GuestMemoryMmap,
    size: u16,
    desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    next_buffer: u64,
}

impl RingDriver {
    /// A queue of `size` entries, its rings laid out from `ring_at` (the descriptor table, then
    /// the available ring, then the used ring), its buffers handed out upwards from
    /// `buffers_at`; and the device's side of it, ready.
    pub fn new(mem: &GuestMemoryMmap, size: u16, ring_at: u64, buffers_at: u64) -> (RingDriver, Queue) {
        let entries = u64::from(size);
        let (desc, avail) = (ring_at, ring_at + 16 * entries);
        let used = (avail + 6 + 2 * entries).next_multiple_of(4);
        let mut queue = Queue::new(size).expect("queue");
        let split = |at: u64| (Some(at as u32), Some((at >> 32) as u32));
        let ((dl, dh), (al, ah), (ul, uh)) = (split(desc), split(avail), split(used));
        queue.set_desc_table_address(dl, dh);
        queue.set_avail_ring_address(al, ah);
        queue.set_used_ring_address(ul, uh);
        queue.set_ready(true);
        let driver = RingDriver { mem: mem.clone(), size, desc, avail, used, next_desc: 0, avail_idx: 0, next_buffer: buffers_at };
        (driver, queue)
    }

    /// A buffer of `len` bytes of guest memory nobody else uses; returns its address.
    pub fn buffer(&mut self, len: u32) -> u64 {
        let at = self.next_buffer;
        self.next_buffer += u64::from(len.max(1)).next_multiple_of(64);
        at
    }

    /// The descriptor the next chain starts at.
    pub fn next_head(&self) -> u16 {
        self.next_desc
    }

    /// Posts one chain of descriptors (address, length, flags, next) and makes it available;
    /// returns its head. NEXT and the next index are filled in to link them in order, unless
    /// `next` is given (a hostile chain's loop or a next outside the table).
    pub fn post_descriptors(&mut self, descriptors: &[(u64, u32, u16, Option<u16>)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags, next)) in descriptors.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
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
        self.make_available(head);
        head
    }

    fn make_available(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot)).expect("avail entry");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// A chain of one device-readable buffer per piece, holding it; returns its head.
    pub fn post_readable(&mut self, pieces: &[&[u8]]) -> u16 {
        let descriptors: Vec<_> = pieces
            .iter()
            .map(|piece| {
                let len = u32::try_from(piece.len()).expect("small piece");
                let at = self.buffer(len);
                self.mem.write_slice(piece, GuestAddress(at)).expect("piece");
                (at, len, 0, None)
            })
            .collect();
        self.post_descriptors(&descriptors)
    }

    /// A chain of one empty device-writable buffer; returns its head and address.
    pub fn post_writable(&mut self, len: u32) -> (u16, u64) {
        let at = self.buffer(len);
        (self.post_descriptors(&[(at, len, WRITE, None)]), at)
    }

    /// Writes the available index as a driver may, right or wrong.
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2)).expect("avail idx");
    }

    /// Where the driver's used_event (EVENT_IDX) lives: after the available ring.
    pub fn used_event_at(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }

    pub fn set_used_event(&self, value: u16) {
        self.mem.write_obj(value.to_le(), GuestAddress(self.used_event_at())).expect("used_event");
    }

    /// The used ring's flags: the device's "don't kick me" without EVENT_IDX.
    pub fn used_flags(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(self.used)).expect("used flags"))
    }

    /// The used ring's entries: (head, length).
    pub fn used(&self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).expect("used idx");
        (0..idx)
            .map(|i| {
                let at = GuestAddress(self.used + 4 + 8 * u64::from(i % self.size));
                let element: [u32; 2] = self.mem.read_obj(at).expect("used element");
                (u32::from_le(element[0]), u32::from_le(element[1]))
            })
            .collect()
    }

    /// `len` bytes of guest memory from `at`.
    pub fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.mem.read_slice(&mut bytes, GuestAddress(at)).expect("guest bytes");
        bytes
    }
}
