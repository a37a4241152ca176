//! The block device against a scripted driver: requests are laid out in guest memory by hand,
//! served synchronously (or, for activation, on the real worker), and the image file checked.
//! Every test that serves requests runs once per engine ([`on_both_engines`]): the guest's
//! hostile chains must meet the same answers whichever engine carries out the rest.

use crate::virtio::wait_until;
use std::io::Write;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use crate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::disk::Disk;
use super::request::{RequestQueue, MAX_DESCRIPTORS};
use super::*;
use crate::config::DiskEngine;
use crate::error::Error;
use crate::control::DiskHandle;
use crate::rate_limiter::{BucketConfig, RateLimit, SharedLimiter, TimerDuty};
use crate::virtio::{feature, ActiveQueue, Signals, VirtioDevice};

thread_local! {
    /// The engine this test thread's disks get (each test runs on its own thread).
    static ENGINE: std::cell::Cell<DiskEngine> = const { std::cell::Cell::new(DiskEngine::Sync) };
}

/// Makes each named function a module with one test per engine, `NAME::sync` and
/// `NAME::io_uring`, so that `cargo test NAME` runs both and a failure names the engine.
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[test]
            fn sync() {
                ENGINE.set(DiskEngine::Sync);
                super::$name();
            }

            #[test]
            fn io_uring() {
                ENGINE.set(DiskEngine::IoUring);
                super::$name();
            }
        }
    )*};
}

const MEM_SIZE: u64 = 0x40_0000;
/// Where the test driver's buffers start, well past the rings.
const BUFFERS: u64 = 0x10_0000;
const SECTORS: u64 = 16;
const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
}

fn image_with(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(bytes).expect("write image");
    file
}

fn image() -> tempfile::NamedTempFile {
    image_with(&pattern(SECTORS as usize * 512))
}

/// The image as a disk on this test's engine.
fn config(file: &tempfile::NamedTempFile, readonly: bool) -> DiskConfig {
    DiskConfig { readonly, engine: ENGINE.get(), ..DiskConfig::new(file.path().to_path_buf()) }
}

fn disk(file: &tempfile::NamedTempFile, readonly: bool) -> Arc<Disk> {
    Arc::new(Disk::open(&config(file, readonly)).expect("open disk"))
}

fn header(kind: u32, sector: u64) -> Vec<u8> {
    let mut header = kind.to_le_bytes().to_vec();
    header.extend_from_slice(&[0; 4]);
    header.extend_from_slice(&sector.to_le_bytes());
    header
}

fn range(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut range = sector.to_le_bytes().to_vec();
    range.extend_from_slice(&sectors.to_le_bytes());
    range.extend_from_slice(&flags.to_le_bytes());
    range
}

/// One piece of a request, as the driver lays it out.
enum Part {
    /// Device-readable bytes.
    Out(Vec<u8>),
    /// This many device-writable bytes.
    In(u32),
    /// A descriptor the test writes as it likes: (addr, len, flags).
    Raw(u64, u32, u16),
}

/// The driver's side of one queue: the rings (placed by the mock), descriptors handed out in
/// order, buffers allocated upwards from [`BUFFERS`].
struct Driver {
    mem: GuestMemoryMmap,
    desc_table: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    next_buffer: u64,
}

impl Driver {
    fn new() -> (Driver, Queue) {
        let mem = crate::memory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)], crate::memory::Tracking::DirtyPages).expect("guest memory");
        let (queue, desc_table, avail, used) = {
            let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
            let queue: Queue = mock.create_queue().expect("queue");
            (queue, mock.desc_table_addr().0, mock.avail_addr().0, mock.used_addr().0)
        };
        (Driver { mem, desc_table, avail, used, next_desc: 0, next_buffer: BUFFERS }, queue)
    }

    /// The driver of another queue in the same guest memory: its rings at `rings`, its buffers
    /// from `buffers` up (clear of this driver's).
    fn beside(&self, rings: u64, buffers: u64) -> (Driver, Queue) {
        let mem = self.mem.clone();
        let (queue, desc_table, avail, used) = {
            let mock = MockSplitQueue::create(&mem, GuestAddress(rings), QUEUE_SIZE);
            let queue: Queue = mock.create_queue().expect("queue");
            (queue, mock.desc_table_addr().0, mock.avail_addr().0, mock.used_addr().0)
        };
        (Driver { mem, desc_table, avail, used, next_desc: 0, next_buffer: buffers }, queue)
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += u64::from(len).next_multiple_of(64);
        addr
    }

    fn write_desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(table + u64::from(index) * 16);
        let mut raw = addr.to_le_bytes().to_vec();
        raw.extend_from_slice(&len.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
        raw.extend_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).expect("descriptor");
    }

    /// Writes the parts as a chain in the table at `table` starting at `first`; returns each
    /// part's address.
    fn lay_out(&mut self, table: u64, first: u16, parts: &[Part]) -> Vec<u64> {
        let mut addrs = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let index = first + i as u16;
            let more = if i + 1 < parts.len() { NEXT } else { 0 };
            let (addr, len, flags) = match part {
                Part::Out(bytes) => {
                    let addr = self.alloc(bytes.len() as u32);
                    self.mem.write_slice(bytes, GuestAddress(addr)).expect("buffer");
                    (addr, bytes.len() as u32, more)
                }
                Part::In(len) => {
                    let addr = self.alloc(*len);
                    self.mem.write_slice(&vec![0xee; *len as usize], GuestAddress(addr)).expect("buffer");
                    (addr, *len, more | WRITE)
                }
                Part::Raw(addr, len, flags) => (*addr, *len, *flags),
            };
            self.write_desc(table, index, addr, len, flags, index + 1);
            addrs.push(addr);
        }
        addrs
    }

    /// Makes a chain of `parts` available; returns each part's address.
    fn submit(&mut self, parts: &[Part]) -> Vec<u64> {
        let head = self.next_desc;
        let addrs = self.lay_out(self.desc_table, head, parts);
        self.next_desc += parts.len() as u16;
        self.make_available(head);
        addrs
    }

    /// Makes a one-descriptor chain pointing at an indirect table holding `parts`.
    fn submit_indirect(&mut self, parts: &[Part]) -> Vec<u64> {
        let table = self.alloc(parts.len() as u32 * 16);
        let addrs = self.lay_out(table, 0, parts);
        let head = self.next_desc;
        self.write_desc(self.desc_table, head, table, parts.len() as u32 * 16, VRING_DESC_F_INDIRECT as u16, 0);
        self.next_desc += 1;
        self.make_available(head);
        addrs
    }

    fn make_available(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = self.avail + 4 + 2 * u64::from(idx % QUEUE_SIZE);
        self.mem.write_obj(head.to_le(), GuestAddress(slot)).expect("avail ring");
        self.set_avail_idx(idx.wrapping_add(1));
    }

    fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.avail + 2)).expect("avail idx")
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mem.write_obj(idx, GuestAddress(self.avail + 2)).expect("avail idx");
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).expect("used idx")
    }

    /// (head, length) of used entry `i`.
    fn used_entry(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % QUEUE_SIZE);
        let id = self.mem.read_obj(GuestAddress(at)).expect("used id");
        let len = self.mem.read_obj(GuestAddress(at + 4)).expect("used len");
        (id, len)
    }

    fn set_used_event(&self, value: u16) {
        self.mem.write_obj(value, GuestAddress(self.avail + 4 + 2 * u64::from(QUEUE_SIZE))).expect("used_event");
    }

    fn avail_event(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 4 + 8 * u64::from(QUEUE_SIZE))).expect("avail_event")
    }

    fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).expect("byte")
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).expect("bytes");
        buf
    }
}

/// A disk's request queue with a driver to feed it.
struct Bench {
    driver: Driver,
    queue: RequestQueue,
    signals: Signals,
}

impl Bench {
    fn new(disk: Arc<Disk>) -> Bench {
        Bench::with(disk, false)
    }

    fn with(disk: Arc<Disk>, event_idx: bool) -> Bench {
        Bench::limited(disk, event_idx, DiskHandle::default())
    }

    fn limited(disk: Arc<Disk>, event_idx: bool, limiter: DiskHandle) -> Bench {
        Bench::on_medium(Arc::new(std::sync::Mutex::new(disk)), event_idx, limiter)
    }

    fn on_medium(medium: Arc<std::sync::Mutex<Arc<Disk>>>, event_idx: bool, limiter: DiskHandle) -> Bench {
        let (driver, mut queue) = Driver::new();
        queue.set_event_idx(event_idx);
        let signals = Signals::standalone(1);
        let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let slot = slot(REQUESTS, ActiveQueue { queue, kick });
        let queue = RequestQueue::new(medium, slot, driver.mem.clone(), signals.clone(), true, limiter);
        Bench { driver, queue, signals }
    }

    fn serve(&mut self) {
        self.queue.serve().expect("the queue stays usable");
    }

    /// Submits one request, serves it, and returns (status, used length) and the parts' addresses.
    fn run(&mut self, parts: &[Part]) -> ((u8, u32), Vec<u64>) {
        let addrs = self.driver.submit(parts);
        let outcome = self.serve_last(&addrs);
        (outcome, addrs)
    }

    fn serve_last(&mut self, addrs: &[u64]) -> (u8, u32) {
        let before = self.driver.used_idx();
        self.serve();
        assert_eq!(self.driver.used_idx(), before.wrapping_add(1), "one request, one used entry");
        let (_, len) = self.driver.used_entry(before);
        let status = addrs.last().map_or(0xff, |&a| self.driver.byte(a));
        (status, len)
    }

    /// Reads `sectors` at `sector` into one buffer: (status, used length, data).
    fn read(&mut self, sector: u64, sectors: u32) -> (u8, u32, Vec<u8>) {
        let ((status, len), addrs) = self.run(&[Part::Out(header(VIRTIO_BLK_T_IN, sector)), Part::In(sectors * 512), Part::In(1)]);
        (status, len, self.driver.bytes(addrs[1], sectors as usize * 512))
    }

    fn write(&mut self, sector: u64, data: Vec<u8>) -> (u8, u32) {
        self.run(&[Part::Out(header(VIRTIO_BLK_T_OUT, sector)), Part::Out(data), Part::In(1)]).0
    }

    fn simple(&mut self, kind: u32, payload: Vec<u8>) -> u8 {
        let mut parts = vec![Part::Out(header(kind, 0))];
        if !payload.is_empty() {
            parts.push(Part::Out(payload));
        }
        parts.push(Part::In(1));
        self.run(&parts).0 .0
    }
}

/// The only queue of a disk as its worker gets it, on an engine of this test's kind.
fn slot(index: usize, active: ActiveQueue) -> QueueSlot {
    let engines = engine::choose(&DiskConfig { engine: ENGINE.get(), ..DiskConfig::new("test.img") }, 1).expect("the engine");
    QueueSlot { index, active, engine: Arc::clone(&engines[0]), timer: TimerDuty::alone() }
}

/// An activation of a disk's first queue alone, FLUSH accepted.
fn activation(driver: &Driver, queue: Queue, kick: EventFd, signals: &Signals) -> Activation {
    Activation {
        mem: driver.mem.clone(),
        queues: vec![Some(ActiveQueue { queue, kick })],
        features: bit(VIRTIO_BLK_F_FLUSH) | feature::VERSION_1,
        signals: signals.clone(),
    }
}

fn file_bytes(file: &tempfile::NamedTempFile) -> Vec<u8> {
    std::fs::read(file.path()).expect("read image")
}

// The tests, by topic.
mod device;
mod hostile;
mod multiqueue;
mod requests;
// The worker's polling, against a driver on a thread of its own.
mod polling;
