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
use crate::rate_limiter::{BucketConfig, RateLimit, SharedLimiter};
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
        let engine = engine::choose(&DiskConfig { engine: ENGINE.get(), ..DiskConfig::new("test.img") }).expect("the engine");
        let active = ActiveQueue { queue, kick };
        let queue = RequestQueue::new(medium, engine, driver.mem.clone(), active, signals.clone(), true, limiter);
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

fn file_bytes(file: &tempfile::NamedTempFile) -> Vec<u8> {
    std::fs::read(file.path()).expect("read image")
}

fn a_read_returns_the_files_bytes() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let (status, len, data) = bench.read(2, 3);
    assert_eq!((status, len), (S_OK, 3 * 512 + 1));
    assert_eq!(data, file_bytes(&file)[2 * 512..5 * 512]);
}

fn a_read_scattered_over_many_descriptors_and_an_indirect_table() {
    let file = image();
    let expected = file_bytes(&file)[512..3 * 512].to_vec();
    let mut bench = Bench::new(disk(&file, false));
    let parts = [Part::Out(header(VIRTIO_BLK_T_IN, 1)), Part::In(100), Part::In(412), Part::In(512), Part::In(1)];
    let ((status, len), addrs) = bench.run(&parts);
    assert_eq!((status, len), (S_OK, 1025));
    let got = [bench.driver.bytes(addrs[1], 100), bench.driver.bytes(addrs[2], 412), bench.driver.bytes(addrs[3], 512)].concat();
    assert_eq!(got, expected);

    let addrs = bench.driver.submit_indirect(&[Part::Out(header(VIRTIO_BLK_T_IN, 1)), Part::In(1024), Part::In(1)]);
    assert_eq!(bench.serve_last(&addrs), (S_OK, 1025));
    assert_eq!(bench.driver.bytes(addrs[1], 1024), expected);
}

fn any_layout_split_header_and_status_sharing_the_data_buffer() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let head = header(VIRTIO_BLK_T_IN, 4);
    let ((_, len), addrs) = bench.run(&[Part::Out(head[..5].to_vec()), Part::Out(head[5..].to_vec()), Part::In(513)]);
    assert_eq!((bench.driver.byte(addrs[2] + 512), len), (S_OK, 513), "the status is the last byte");
    assert_eq!(bench.driver.bytes(addrs[2], 512), file_bytes(&file)[4 * 512..5 * 512]);
}

fn a_write_reaches_the_file() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let data: Vec<u8> = (0..1024).map(|i| (i % 13) as u8 + 100).collect();
    let ((status, len), _) = bench.run(&[
        Part::Out(header(VIRTIO_BLK_T_OUT, 3)),
        Part::Out(data[..300].to_vec()),
        Part::Out(data[300..].to_vec()),
        Part::In(1),
    ]);
    assert_eq!((status, len), (S_OK, 1));
    let mut expected = pattern(SECTORS as usize * 512);
    expected[3 * 512..5 * 512].copy_from_slice(&data);
    assert_eq!(file_bytes(&file), expected);
}

fn flush_succeeds() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    assert_eq!(bench.write(0, vec![1; 512]), (S_OK, 1));
    assert_eq!(bench.simple(VIRTIO_BLK_T_FLUSH, vec![]), S_OK);
    assert_eq!(file_bytes(&file)[..512], [1; 512]);
}

fn a_read_only_disk_refuses_every_change_and_leaves_the_file_alone() {
    let file = image();
    let block = Block::new(&config(&file, true)).expect("read-only disk");
    assert_ne!(block.features() & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(block.features() & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)), 0);
    let mut bench = Bench::new(lock(&block.medium).clone());
    assert_eq!(bench.write(0, vec![1; 512]), (S_IOERR, 1));
    assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, range(0, 1, 0)), S_IOERR);
    assert_eq!(bench.simple(VIRTIO_BLK_T_WRITE_ZEROES, range(0, 1, 0)), S_IOERR);
    assert_eq!(bench.read(0, 1).0, S_OK, "reads still work");
    assert_eq!(bench.simple(VIRTIO_BLK_T_FLUSH, vec![]), S_OK);
    assert_eq!(file_bytes(&file), pattern(SECTORS as usize * 512));
}

fn get_id_returns_the_configured_serial_zero_padded() {
    let file = image();
    let disk = Disk::open(&DiskConfig { id: Some("data-disk".into()), ..config(&file, false) }).expect("disk");
    let mut bench = Bench::new(Arc::new(disk));
    let ((status, len), addrs) = bench.run(&[Part::Out(header(VIRTIO_BLK_T_GET_ID, 0)), Part::In(20), Part::In(1)]);
    assert_eq!((status, len), (S_OK, 21));
    let mut expected = b"data-disk".to_vec();
    expected.resize(20, 0);
    assert_eq!(bench.driver.bytes(addrs[1], 20), expected);

    let ((status, len), addrs) = bench.run(&[Part::Out(header(VIRTIO_BLK_T_GET_ID, 0)), Part::In(4), Part::In(1)]);
    assert_eq!((status, len), (S_OK, 5), "a smaller buffer gets what fits");
    assert_eq!(bench.driver.bytes(addrs[1], 4), b"data");
}

fn without_a_configured_serial_the_id_is_the_file_name() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let ((status, _), addrs) = bench.run(&[Part::Out(header(VIRTIO_BLK_T_GET_ID, 0)), Part::In(20), Part::In(1)]);
    assert_eq!(status, S_OK);
    let name = file.path().file_name().expect("name").as_encoded_bytes();
    let mut expected = name[..name.len().min(20)].to_vec();
    expected.resize(20, 0);
    assert_eq!(bench.driver.bytes(addrs[1], 20), expected);
}

fn sectors_past_the_end_fail_and_the_last_sector_does_not() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    assert_eq!(bench.read(SECTORS - 1, 1).0, S_OK);
    assert_eq!(bench.read(SECTORS - 1, 2).0, S_IOERR);
    assert_eq!(bench.read(SECTORS, 1).0, S_IOERR);
    assert_eq!(bench.read(u64::MAX, 1).0, S_IOERR, "sector + length overflows");
    assert_eq!(bench.read(u64::MAX >> 9, 1).0, S_IOERR);
    assert_eq!(bench.write(SECTORS, vec![0; 512]).0, S_IOERR);
    assert_eq!(bench.simple(VIRTIO_BLK_T_WRITE_ZEROES, range(SECTORS - 1, 2, 0)), S_IOERR);
    assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, range(u64::MAX, 1, 0)), S_IOERR);
    assert_eq!(file_bytes(&file), pattern(SECTORS as usize * 512));
}

fn data_that_is_not_whole_sectors_fails() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let ((status, len), _) = bench.run(&[Part::Out(header(VIRTIO_BLK_T_IN, 0)), Part::In(100), Part::In(1)]);
    assert_eq!((status, len), (S_IOERR, 1));
    assert_eq!(bench.write(0, vec![9; 700]).0, S_IOERR);
    assert_eq!(file_bytes(&file), pattern(SECTORS as usize * 512));
}

fn a_short_header_fails() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let ((status, len), _) = bench.run(&[Part::Out(vec![0; 8]), Part::In(512), Part::In(1)]);
    assert_eq!((status, len), (S_IOERR, 1));
}

fn an_unknown_request_type_is_unsupported() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    assert_eq!(bench.simple(99, vec![]), S_UNSUPP);
    assert_eq!(bench.simple(2, vec![]), S_UNSUPP, "SCSI commands are legacy only");
}

fn a_chain_without_a_writable_status_byte_is_returned_untouched() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    // No writable descriptor at all.
    let ((_, len), addrs) = bench.run(&[Part::Out(header(VIRTIO_BLK_T_FLUSH, 0)), Part::Out(vec![0xee])]);
    assert_eq!(len, 0);
    assert_eq!(bench.driver.byte(addrs[1]), 0xee);
    // The status in a read-only descriptor after the data: readable after writable.
    let ((_, len), addrs) = bench.run(&[Part::Out(header(VIRTIO_BLK_T_IN, 0)), Part::In(512), Part::Out(vec![0xee])]);
    assert_eq!(len, 0);
    assert_eq!(bench.driver.byte(addrs[2]), 0xee);
    assert_eq!(bench.driver.bytes(addrs[1], 512), vec![0xee; 512], "nothing was read");
    // The device keeps serving.
    assert_eq!(bench.read(0, 1).0, S_OK);
}

fn buffers_outside_guest_memory_fail_the_request_alone() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let outside = MEM_SIZE + 0x1000;
    let ((status, len), _) =
        bench.run(&[Part::Out(header(VIRTIO_BLK_T_IN, 0)), Part::Raw(outside, 512, NEXT | WRITE), Part::In(1)]);
    assert_eq!((status, len), (S_IOERR, 1));
    // Straddling the end of memory.
    let ((status, _), _) =
        bench.run(&[Part::Out(header(VIRTIO_BLK_T_OUT, 0)), Part::Raw(MEM_SIZE - 256, 512, NEXT), Part::In(1)]);
    assert_eq!(status, S_IOERR);
    let ((status, _), _) = bench.run(&[Part::Raw(u64::MAX - 4, 16, NEXT), Part::In(1)]);
    assert_eq!(status, S_IOERR, "a header at the top of the address space");
    // A status byte outside memory can't be written: the chain comes back with nothing in it.
    let addrs = bench.driver.submit(&[Part::Out(header(VIRTIO_BLK_T_FLUSH, 0)), Part::Raw(outside, 1, WRITE)]);
    assert_eq!(bench.serve_last(&addrs[..0]).1, 0);
    let addrs = bench.driver.submit(&[Part::Out(header(VIRTIO_BLK_T_FLUSH, 0)), Part::Raw(u64::MAX, 2, WRITE)]);
    assert_eq!(bench.serve_last(&addrs[..0]).1, 0);
    assert_eq!(bench.read(0, 1).0, S_OK);
    assert_eq!(file_bytes(&file), pattern(SECTORS as usize * 512));
}

fn a_looping_chain_is_dropped_and_the_next_request_served() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    // Descriptor 1 leads back to descriptor 0.
    let status = bench.driver.alloc(1);
    let head = bench.driver.alloc(16);
    bench.driver.mem.write_slice(&header(VIRTIO_BLK_T_FLUSH, 0), GuestAddress(head)).expect("header");
    bench.driver.write_desc(bench.driver.desc_table, 0, head, 16, NEXT, 1);
    bench.driver.write_desc(bench.driver.desc_table, 1, status, 1, NEXT | WRITE, 0);
    bench.driver.next_desc = 2;
    bench.driver.make_available(0);
    assert_eq!(bench.serve_last(&[]).1, 0);
    // A next index past the table.
    bench.driver.write_desc(bench.driver.desc_table, 2, head, 16, NEXT, QUEUE_SIZE + 5);
    bench.driver.next_desc = 3;
    bench.driver.make_available(2);
    assert_eq!(bench.serve_last(&[]).1, 0);
    assert_eq!(bench.read(0, 1).0, S_OK);
}

fn an_over_long_indirect_chain_is_dropped() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let mut parts = vec![Part::Out(header(VIRTIO_BLK_T_IN, 0))];
    parts.extend((0..MAX_DESCRIPTORS).map(|_| Part::In(512)));
    parts.push(Part::In(1));
    let addrs = bench.driver.submit_indirect(&parts);
    assert_eq!(bench.serve_last(&[]).1, 0);
    assert_eq!(bench.driver.byte(addrs[addrs.len() - 1]), 0xee, "no status written");
    assert_eq!(bench.read(0, 1).0, S_OK);
}

fn an_available_index_running_ahead_of_the_ring_breaks_the_queue() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    bench.driver.set_avail_idx(QUEUE_SIZE + 1);
    assert!(bench.queue.serve().is_err());
}

fn a_batch_gets_one_interrupt_and_event_idx_is_honoured() {
    let file = image();
    let mut bench = Bench::with(disk(&file, false), true);
    let mut statuses = Vec::new();
    for sector in 0..3 {
        statuses.push(*bench.driver.submit(&[Part::Out(header(VIRTIO_BLK_T_IN, sector)), Part::In(512), Part::In(1)]).last().expect("status"));
    }
    bench.serve();
    assert_eq!(bench.driver.used_idx(), 3);
    assert!(statuses.iter().all(|&s| bench.driver.byte(s) == S_OK));
    assert_eq!(bench.signals.take_queue_interrupts(0), 1, "three requests, one interrupt");
    assert_eq!(bench.driver.avail_event(), 3, "the driver is asked to kick for the next request");

    // The driver wants an interrupt only once the used index passes 10.
    bench.driver.set_used_event(10);
    bench.run(&[Part::Out(header(VIRTIO_BLK_T_FLUSH, 0)), Part::In(1)]);
    assert_eq!(bench.signals.take_queue_interrupts(0), 0);
}

fn without_event_idx_every_pass_interrupts() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    bench.read(0, 1);
    bench.read(1, 1);
    assert_eq!(bench.signals.take_queue_interrupts(0), 2);
}

fn discard_and_write_zeroes_when_the_file_system_can() {
    let file = image();
    let disk = disk(&file, false);
    let block_features = features(&disk);
    let mut bench = Bench::new(Arc::clone(&disk));
    if !disk.can_punch_holes {
        assert_eq!(block_features & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)), 0);
        assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, range(0, 1, 0)), S_UNSUPP);
        return;
    }
    assert_ne!(block_features & bit(VIRTIO_BLK_F_DISCARD), 0);
    let mut expected = pattern(SECTORS as usize * 512);
    let two_ranges = [range(1, 2, 0), range(8, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)].concat();
    assert_eq!(bench.simple(VIRTIO_BLK_T_WRITE_ZEROES, two_ranges), S_OK);
    expected[512..3 * 512].fill(0);
    expected[8 * 512..9 * 512].fill(0);
    assert_eq!(file_bytes(&file), expected);
    assert_eq!(bench.read(1, 2).2, vec![0; 1024]);

    assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, range(4, 2, 0)), S_OK);
    expected[4 * 512..6 * 512].fill(0);
    assert_eq!(file_bytes(&file), expected, "a punched hole reads as zeros; the size is kept");

    assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, range(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)), S_UNSUPP);
    assert_eq!(bench.simple(VIRTIO_BLK_T_WRITE_ZEROES, range(0, 1, 4)), S_UNSUPP, "reserved flag");
    assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, vec![]), S_IOERR, "no range");
    assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, vec![0; 20]), S_IOERR, "a partial range");
    let too_many = (0..=MAX_DISCARD_SEGMENTS).flat_map(|_| range(0, 1, 0)).collect();
    assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, too_many), S_IOERR);
    // One bad range spoils the request before anything is changed.
    let one_bad = [range(0, 1, 0), range(SECTORS, 1, 0)].concat();
    assert_eq!(bench.simple(VIRTIO_BLK_T_WRITE_ZEROES, one_bad), S_IOERR);
    assert_eq!(file_bytes(&file), expected);
}

#[test]
fn a_writable_image_is_locked_against_a_second_vmm() {
    let file = image();
    let first = Block::new(&config(&file, false)).expect("first open");
    for readonly in [false, true] {
        match Block::new(&config(&file, readonly)) {
            Err(e @ Error::Disk { .. }) => assert!(e.to_string().contains("in use by another VMM"), "{e}"),
            other => panic!("a second open (readonly: {readonly}) should fail, got {:?}", other.map(|_| ())),
        }
    }
    drop(first);
    Block::new(&config(&file, false)).expect("free again once the first is gone");
}

#[test]
fn read_only_images_can_be_shared_but_not_written_meanwhile() {
    let file = image();
    let first = Block::new(&config(&file, true)).expect("first reader");
    let second = Block::new(&config(&file, true)).expect("second reader");
    assert!(matches!(Block::new(&config(&file, false)), Err(Error::Disk { .. })));
    drop((first, second));
    Block::new(&config(&file, false)).expect("writable once the readers are gone");
}

#[test]
fn images_that_cannot_be_disks_are_refused_with_a_reason() {
    let why = |path: &std::path::Path, readonly: bool| match Block::new(&DiskConfig { readonly, ..DiskConfig::new(path) }) {
        Err(Error::Disk { why, .. }) => why,
        Err(other) => panic!("not a disk error: {other}"),
        Ok(_) => panic!("{} should be refused", path.display()),
    };
    let dir = tempfile::tempdir().expect("temp dir");
    assert!(why(&dir.path().join("missing.img"), false).contains("no such file"));
    assert!(why(dir.path(), false).contains("directory"));
    assert!(why(dir.path(), true).contains("directory"));
    assert!(why(image_with(&[]).path(), false).contains("0 bytes"));
    assert!(why(image_with(&[1; 100]).path(), true).contains("100 bytes"));
    assert!(why(std::path::Path::new("/dev/null"), true).contains("neither a regular file nor a block device"));

    let locked_out = image();
    std::fs::set_permissions(locked_out.path(), std::os::unix::fs::PermissionsExt::from_mode(0o444)).expect("chmod");
    // Root opens it anyway; only an ordinary user can see the message.
    if std::fs::OpenOptions::new().write(true).open(locked_out.path()).is_err() {
        assert!(why(locked_out.path(), false).contains(",readonly"));
    }
}

#[test]
fn a_size_that_is_not_whole_sectors_is_rounded_down() {
    let file = image_with(&pattern(3 * 512 + 100));
    let block = Block::new(&config(&file, false)).expect("disk");
    assert_eq!(block.sectors(), 3);
    let mut bench = Bench::new(lock(&block.medium).clone());
    assert_eq!(bench.read(3, 1).0, S_IOERR, "the partial sector is not part of the disk");
}

fn an_image_truncated_under_us_gives_io_errors() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    file.as_file().set_len(512).expect("truncate");
    assert_eq!(bench.read(4, 1).0, S_IOERR);
    assert_eq!(bench.read(0, 1).0, S_OK);
}

#[test]
fn config_space_follows_the_spec() {
    let file = image();
    let block = Block::new(&config(&file, false)).expect("disk");
    let read = |offset: u64, len: usize| {
        let mut data = vec![0xaa; len];
        block.read_config(offset, &mut data);
        data
    };
    assert_eq!(read(0, 8), SECTORS.to_le_bytes());
    assert_eq!(read(12, 4), SEG_MAX.to_le_bytes());
    assert_eq!(read(20, 4), 512u32.to_le_bytes());
    if lock(&block.medium).can_punch_holes {
        assert_eq!(read(36, 4), MAX_DISCARD_SECTORS.to_le_bytes());
        assert_eq!(read(40, 4), MAX_DISCARD_SEGMENTS.to_le_bytes());
        assert_eq!(read(56, 1), [1]);
    }
    assert_eq!(read(CONFIG_LEN as u64 - 2, 4), [0; 4], "past the end reads as zero");
    assert_eq!(read(u64::MAX, 4), [0; 4]);
    assert_eq!(block.device_type(), device_type::BLOCK);
    assert_eq!(block.queue_max_sizes(), [QUEUE_SIZE]);
    let offered = block.features();
    assert_eq!(offered & bit(VIRTIO_BLK_F_RO), 0);
    for wanted in [VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE] {
        assert_ne!(offered & bit(wanted), 0, "feature {wanted}");
    }
}


fn activation(driver: &Driver, queue: Queue, kick: EventFd, signals: &Signals) -> Activation {
    Activation {
        mem: driver.mem.clone(),
        queues: vec![Some(ActiveQueue { queue, kick })],
        features: bit(VIRTIO_BLK_F_FLUSH) | feature::VERSION_1,
        signals: signals.clone(),
    }
}

fn activate_reset_and_activate_again() {
    let file = image();
    let mut block = Block::new(&config(&file, false)).expect("disk");
    for round in 0..2u8 {
        let (mut driver, queue) = Driver::new();
        let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let signals = Signals::standalone(1);
        block.activate(activation(&driver, queue, kick.try_clone().expect("kick"), &signals)).expect("activate");
        let addrs = driver.submit(&[Part::Out(header(VIRTIO_BLK_T_OUT, u64::from(round))), Part::Out(vec![round + 1; 512]), Part::In(1)]);
        kick.write(1).expect("kick");
        // The interrupt follows the used entry once the worker sees the guest has gone quiet.
        let interrupts = std::cell::Cell::new(0);
        wait_until(|| {
            interrupts.set(interrupts.get() + signals.take_queue_interrupts(0));
            interrupts.get() > 0
        });
        assert_eq!((driver.used_idx(), driver.byte(addrs[2])), (1, S_OK));
        block.reset();
        assert_eq!(interrupts.get() + signals.take_queue_interrupts(0), 1);
        block.reset();
        block.reset();
        assert!(!signals.is_broken());
    }
    let bytes = file_bytes(&file);
    assert_eq!((bytes[0], bytes[512]), (1, 2), "both activations wrote");
}

#[test]
fn activation_without_the_request_queue_fails() {
    let file = image();
    let mut block = Block::new(&config(&file, false)).expect("disk");
    let (driver, _) = Driver::new();
    let activation = Activation { mem: driver.mem.clone(), queues: vec![None], features: 0, signals: Signals::standalone(1) };
    assert!(block.activate(activation).is_err());
}

fn the_rate_limiter_holds_requests_back_in_the_ring_until_its_timer_fires() {
    use crate::virtio::worker::DeviceWorker;
    use vmm_sys_util::epoll::{Epoll, EventSet};
    let file = image();
    // Two operations, then one more every 20 ms.
    let ops = BucketConfig::new(2, 0, 40).expect("valid");
    let limiter = SharedLimiter::new(RateLimit { bandwidth: None, ops: Some(ops) }).expect("timerfd");
    let limiter = DiskHandle { limiter, ..DiskHandle::default() };
    let mut bench = Bench::limited(disk(&file, false), false, limiter);
    for sector in 0..5 {
        bench.driver.submit(&[Part::Out(header(VIRTIO_BLK_T_IN, sector)), Part::In(512), Part::In(1)]);
    }
    bench.serve();
    assert_eq!(bench.driver.used_idx(), 2, "two requests within the budget, three held back");
    bench.serve();
    assert_eq!(bench.driver.used_idx(), 2, "a kick while throttled serves nothing");
    // The worker's epoll wakes on the timer; then the queue is served again.
    let epoll = Epoll::new().expect("epoll");
    bench.queue.register(&epoll).expect("register");
    let mut served = 2;
    while served < 5 {
        let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 2];
        let ready = epoll.wait(5000, &mut events).expect("wait");
        assert!(ready > 0, "the rate limiter's timer never fired");
        for event in &events[..ready] {
            bench.queue.handle(&epoll, event.data(), EventSet::IN).expect("served");
        }
        served = bench.driver.used_idx();
    }
    for i in 0..5 {
        assert_eq!(bench.driver.used_entry(i).1, 513, "every read completed in full");
    }
}

fn a_new_medium_in_a_running_drive_is_read_from_the_next_request_on() {
    let first = image();
    let second = image_with(&vec![0x5a; 32 * 512]);
    let mut block = Block::new(&DiskConfig { id: Some("swap".into()), ..config(&first, true) }).expect("block");
    let mut bench = Bench::on_medium(Arc::clone(&block.medium), false, block.handle());
    let (status, _, data) = bench.read(0, 1);
    assert_eq!((status, data), (S_OK, pattern(512)));

    let missing = DiskConfig::new("/no/such/image");
    assert!(block.update_backend(BackendUpdate::Medium(missing)).is_err(), "a missing image is refused");
    assert_eq!(bench.read(0, 1).2, pattern(512), "and the old one stays");

    block.update_backend(BackendUpdate::Medium(DiskConfig::new(second.path()))).expect("swap");
    let mut capacity = [0u8; 8];
    block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 32, "the config space has the new size");
    let (status, _, data) = bench.read(20, 1);
    assert_eq!((status, data), (S_OK, vec![0x5a; 512]), "the new image, past the old one's end");
    assert_eq!(bench.write(0, vec![1; 512]).0, S_IOERR, "still read-only, as the drive was opened");
    assert_eq!(&lock(&block.medium).id[..4], b"swap", "and still the same serial");
}

// Every test that serves requests runs on both engines.
on_both_engines!(
    a_read_returns_the_files_bytes, a_read_scattered_over_many_descriptors_and_an_indirect_table,
    any_layout_split_header_and_status_sharing_the_data_buffer, a_write_reaches_the_file, flush_succeeds,
    a_read_only_disk_refuses_every_change_and_leaves_the_file_alone,
    get_id_returns_the_configured_serial_zero_padded, without_a_configured_serial_the_id_is_the_file_name,
    sectors_past_the_end_fail_and_the_last_sector_does_not, data_that_is_not_whole_sectors_fails,
    a_short_header_fails, an_unknown_request_type_is_unsupported,
    a_chain_without_a_writable_status_byte_is_returned_untouched,
    buffers_outside_guest_memory_fail_the_request_alone,
    a_looping_chain_is_dropped_and_the_next_request_served, an_over_long_indirect_chain_is_dropped,
    an_available_index_running_ahead_of_the_ring_breaks_the_queue,
    a_batch_gets_one_interrupt_and_event_idx_is_honoured, without_event_idx_every_pass_interrupts,
    discard_and_write_zeroes_when_the_file_system_can, an_image_truncated_under_us_gives_io_errors,
    activate_reset_and_activate_again, the_rate_limiter_holds_requests_back_in_the_ring_until_its_timer_fires,
    a_new_medium_in_a_running_drive_is_read_from_the_next_request_on, a_read_marks_its_buffers_pages_dirty_and_a_write_does_not,
);

/// The engines' preadv and io_uring reads fill guest memory behind vm-memory's back: the
/// buffers are marked dirty for a Diff snapshot; a write's buffers, only read, are not.
fn a_read_marks_its_buffers_pages_dirty_and_a_write_does_not() {
    use crate::snapshot::dirty::take_marked_pages;
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    // The data's first page is the header's (which is only read), so only the data marks it.
    let data_page = |addrs: &[u64]| addrs[1] / 4096;
    for (kind, data, marked) in [(VIRTIO_BLK_T_IN, Part::In(8 * 512), true), (VIRTIO_BLK_T_OUT, Part::Out(vec![1; 8 * 512]), false)] {
        let addrs = bench.driver.submit(&[Part::Out(header(kind, 0)), data, Part::In(1)]);
        take_marked_pages(&bench.driver.mem); // the driver's own writes
        assert_eq!(bench.serve_last(&addrs).0, S_OK);
        let pages = take_marked_pages(&bench.driver.mem);
        assert_eq!(pages.contains(&data_page(&addrs)), marked, "request {kind}: pages {pages:x?} marked, data at {:#x}", addrs[1]);
    }
}
#[test]
fn the_counters_see_reads_writes_flushes_and_bad_requests() {
    let file = image();
    let live = DiskHandle::default();
    let mut bench = Bench::limited(disk(&file, false), false, live.clone());
    assert_eq!(bench.read(0, 2).0, S_OK);
    assert_eq!(bench.write(4, vec![7; 512]).0, S_OK);
    assert_eq!(bench.simple(VIRTIO_BLK_T_FLUSH, vec![]), S_OK);
    assert_eq!(bench.read(1 << 40, 1).0, S_IOERR, "past the end");
    let taken: std::collections::HashMap<_, _> = live.metrics.take().into_iter().collect();
    assert_eq!((taken["read_count"], taken["read_bytes"]), (1, 1024), "the refused read is not counted as one");
    assert_eq!((taken["write_count"], taken["write_bytes"], taken["flush_count"]), (1, 512, 1));
    assert_eq!((taken["invalid_reqs_count"], taken["execute_fails"]), (1, 0));
}

// The worker's polling, against a driver on a thread of its own.
mod polling;
