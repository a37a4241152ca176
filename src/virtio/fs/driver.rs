//! A guest's virtio-fs driver in miniature, for the unit tests and the fuzz target: it lays
//! each FUSE request into guest memory as the Linux driver does (one buffer the device reads,
//! one it writes the reply into), makes it available on the request queue, and has the real
//! device serve it, driven by hand instead of on its thread.
//!
//! The request bytes are whatever the caller gives: a well-formed request from [`request`], or
//! the fuzzer's noise.

use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use crate::memory::GuestMemoryMmap;
use vm_memory_fs::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use super::{BridgeError, Fs, FsServer, FsWorker, REQUESTS};
use crate::snapshot::dirty::take_marked_pages;
use crate::virtio::worker::HandDriven;
use crate::virtio::{feature, ActiveQueue, Activation, Signals};

const RING: u16 = 16;
const DESC_TABLE: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
/// The hiprio queue's rings, which the driver never fills.
const HIPRIO_RINGS: u64 = 0x4000;
/// Where the request goes, and where the reply buffer starts.
pub const REQUEST_AT: u64 = 0x10_0000;
pub const REPLY_AT: u64 = 0x40_0000;
/// Guest memory: room for a 2 MiB request and a 2 MiB reply buffer after them.
const MEMORY: usize = 0x80_0000;

/// The reply to one request.
#[derive(Debug)]
pub struct Reply {
    /// What the device said it wrote (the used entry's length).
    pub written: u32,
    /// The reply buffer from its start, `written` bytes of it.
    pub bytes: Vec<u8>,
    /// The pages of guest memory the device marked dirty while it served the request (for
    /// Diff snapshots), by number.
    pub dirtied: Vec<u64>,
}

impl Reply {
    /// The reply's header, if the device wrote one.
    pub fn header(&self) -> Option<OutHeader> {
        let header = self.bytes.get(..std::mem::size_of::<OutHeader>())?;
        OutHeader::from_slice(header).copied()
    }

    /// The errno the reply carries (0 for success); `None` without a reply.
    pub fn errno(&self) -> Option<i32> {
        self.header().map(|h| -h.error)
    }

    /// The reply's body, after its header, read as `T`.
    pub fn body<T: ByteValued>(&self) -> Option<T> {
        self.body_at(0)
    }

    /// What is `offset` bytes into the reply's body, read as `T`.
    pub fn body_at<T: ByteValued>(&self, offset: usize) -> Option<T> {
        let start = std::mem::size_of::<OutHeader>() + offset;
        T::from_slice(self.bytes.get(start..start + std::mem::size_of::<T>())?).copied()
    }
}

/// One device, its memory and its request queue, as a driver sees them.
pub struct FuseDriver {
    mem: GuestMemoryMmap,
    worker: HandDriven<FsWorker>,
    next_unique: u64,
    made_available: u16,
}

impl FuseDriver {
    /// Activates a device serving `server`.
    pub fn new(server: FsServer) -> FuseDriver {
        let mem = crate::memory::from_ranges(&[(GuestAddress(0), MEMORY)], crate::memory::Tracking::DirtyPages).expect("test memory");
        let queues = vec![Some(active_queue(HIPRIO_RINGS, HIPRIO_RINGS + 0x400, HIPRIO_RINGS + 0x800)), Some(active_queue(DESC_TABLE, AVAIL, USED))];
        let features = feature::VERSION_1;
        let activation = Activation { mem: mem.clone(), queues, features, signals: Signals::standalone(2) };
        let device = Fs::with_server("test", Arc::clone(&server));
        let worker = HandDriven::activate(&device, activation).expect("both queues are there");
        FuseDriver { mem, worker, next_unique: 1, made_available: 0 }
    }

    /// Sends `request` (its bytes as they are) with a reply buffer of `reply_len` bytes, and
    /// has the device serve it. `Err` is the device declaring itself broken.
    pub fn send(&mut self, request: &[u8], reply_len: u32) -> Result<Reply, BridgeError> {
        let request = &request[..request.len().min(REPLY_AT as usize - REQUEST_AT as usize)];
        let reply_len = reply_len.min((MEMORY as u64 - REPLY_AT) as u32);
        self.mem.write_slice(request, GuestAddress(REQUEST_AT)).expect("request fits");
        self.mem.write_slice(&vec![0; reply_len as usize], GuestAddress(REPLY_AT)).expect("reply buffer fits");
        self.describe(0, REQUEST_AT, request.len() as u32, VRING_DESC_F_NEXT, 1);
        self.describe(1, REPLY_AT, reply_len, VRING_DESC_F_WRITE, 0);
        self.make_available(0);
        take_marked_pages(&self.mem); // the driver's own writes
        self.worker.handle(REQUESTS as u64)?;
        let dirtied = take_marked_pages(&self.mem);
        let used_index = u64::from((self.made_available - 1) % RING);
        let written: u32 = self.mem.read_obj(GuestAddress(USED + 4 + used_index * 8 + 4)).expect("used entry");
        let mut bytes = vec![0; written.min(reply_len) as usize];
        self.mem.read_slice(&mut bytes, GuestAddress(REPLY_AT)).expect("reply");
        Ok(Reply { written, bytes, dirtied })
    }

    /// Sends a well-formed request: `opcode` on `nodeid`, with `body` after the header.
    pub fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Reply {
        self.call_into(opcode, nodeid, body, 1 << 20)
    }

    /// As [`FuseDriver::call`], with a reply buffer of `reply_len` bytes.
    pub fn call_into(&mut self, opcode: u32, nodeid: u64, body: &[u8], reply_len: u32) -> Reply {
        let unique = self.next_unique;
        self.next_unique += 1;
        self.send(&request(opcode, unique, nodeid, body), reply_len).expect("the device carries on")
    }

    fn describe(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC_TABLE + u64::from(index) * 16);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).expect("descriptor");
    }

    fn make_available(&mut self, head: u16) {
        let slot = u64::from(self.made_available % RING);
        self.mem.write_obj(head, GuestAddress(AVAIL + 4 + slot * 2)).expect("avail entry");
        self.made_available = self.made_available.wrapping_add(1);
        self.mem.write_obj(self.made_available, GuestAddress(AVAIL + 2)).expect("avail idx");
    }
}

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

fn active_queue(desc: u64, avail: u64, used: u64) -> ActiveQueue {
    let mut queue = Queue::new(RING).expect("queue");
    queue.set_size(RING);
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_ready(true);
    ActiveQueue { queue, kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd") }
}

/// A FUSE request's bytes: its header (with the length filled in) and `body`.
pub fn request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let len = (std::mem::size_of::<InHeader>() + body.len()) as u32;
    let header = InHeader { len, opcode, unique, nodeid, uid: 1000, gid: 1000, pid: 1, padding: 0 };
    let mut bytes = header.as_slice().to_vec();
    bytes.extend_from_slice(body);
    bytes
}
