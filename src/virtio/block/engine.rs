//! How a disk's requests reach the host: the one small interface ([`Engine`]) both of its I/O
//! engines implement, and the choice between them when the VM is built.
//!
//! The request code ([`super::request`]) turns each chain the guest made available into host
//! operations ([`Op`]), already checked against the disk and the guest's memory, and hands a
//! whole batch of them to the engine at once. The engine carries them all out and fills in each
//! one's outcome; only then does the request code write status bytes and return the chains. So
//! no operation is ever still running when a batch is over: a reset, a new medium or the VM's
//! end never meets I/O in flight into guest memory.
//!
//! - [`SyncEngine`]: one `preadv`/`pwritev`/`fdatasync`/`fallocate` after the other, on the
//!   worker thread. Every host has it.
//! - [`super::uring::Ring`]: the whole batch in one `io_uring_enter`, the host running its
//!   operations side by side. Used when the host has io_uring (`engine=io_uring`, the default
//!   when detected).
//!
//! An engine trusts what it is handed (the request code checked it) and nothing the file
//! system answers: a short transfer or an error fails that operation alone.

use std::io;
use std::sync::{Arc, Mutex};

use super::disk::Disk;
use super::uring::Ring;
use crate::config::{DiskConfig, DiskEngine};
use crate::error::Error;
use crate::seccomp::Role;
use crate::virtio::iovec::IoVecs;

/// One host operation of a request.
pub enum Op<'m> {
    /// Fill the guest's buffers from the image at a byte offset.
    Read { buffers: IoVecs<'m>, offset: u64 },
    /// Write the guest's buffers to the image at a byte offset.
    Write { buffers: IoVecs<'m>, offset: u64 },
    /// Make every write that completed before it durable: `fdatasync`.
    Flush,
    /// Give a byte range back to the file system.
    Discard { offset: u64, len: u64 },
    /// Make a byte range read as zeros.
    WriteZeroes { offset: u64, len: u64, may_unmap: bool },
}

impl Op<'_> {
    /// What the operation is, for a message about its failure.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Flush => "flush",
            Op::Discard { .. } => "discard",
            Op::WriteZeroes { .. } => "write-zeroes",
        }
    }
}

/// An operation, the request it belongs to (an index the request code chose), and, once the
/// engine has run it, its outcome.
pub struct Job<'m> {
    pub op: Op<'m>,
    pub request: usize,
    pub outcome: io::Result<()>,
}

impl<'m> Job<'m> {
    pub fn new(op: Op<'m>, request: usize) -> Job<'m> {
        Job { op, request, outcome: Ok(()) }
    }
}

/// What every engine does with a batch.
pub trait Engine: Send {
    /// Carries out every job in `jobs` on `disk` and sets each one's outcome; returns once all
    /// are done. Jobs may run side by side, but a [`Op::Flush`] starts only after every job
    /// before it in the batch has completed, so the writes the guest had seen complete before
    /// its flush are durable when the flush is.
    fn run(&mut self, disk: &Disk, jobs: &mut [Job<'_>]);

    /// The seccomp filter the disk's worker needs to drive this engine.
    fn worker_role(&self) -> Role {
        Role::DeviceWorker
    }
}

/// An engine as the device and its worker share it: the worker takes it for each batch.
pub type SharedEngine = Arc<Mutex<dyn Engine>>;

/// Picks the engine `config` asks for, one for each of the disk's `queues` (each queue's worker
/// drives its own: an io_uring is not shared between threads): io_uring when asked or, by
/// default, when the host has it (with a note when it hasn't); one line saying what to do when
/// asked for and missing.
pub fn choose(config: &DiskConfig, queues: usize) -> crate::error::Result<Vec<SharedEngine>> {
    if config.engine == DiskEngine::Sync {
        return Ok(sync_engines(queues));
    }
    match (0..queues).map(|_| Ring::new()).collect::<io::Result<Vec<Ring>>>() {
        Ok(rings) => Ok(rings.into_iter().map(|ring| Arc::new(Mutex::new(ring)) as SharedEngine).collect()),
        Err(e) if config.engine == DiskEngine::IoUring => Err(Error::Disk {
            path: config.path.clone(),
            why: format!("engine=io_uring: this host's io_uring can't be used ({e}); use engine=sync"),
        }),
        Err(e) => {
            tracing::warn!(
                "disk image '{}': io_uring can't be used on this host ({e}); serving it with the sync engine \
                 (add engine=sync to say so and silence this note)",
                config.path.display()
            );
            Ok(sync_engines(queues))
        }
    }
}

fn sync_engines(queues: usize) -> Vec<SharedEngine> {
    (0..queues).map(|_| Arc::new(Mutex::new(SyncEngine)) as SharedEngine).collect()
}

/// One system call per operation, in order, on the worker thread.
pub struct SyncEngine;

impl Engine for SyncEngine {
    fn run(&mut self, disk: &Disk, jobs: &mut [Job<'_>]) {
        for job in jobs {
            job.outcome = run_one(disk, &mut job.op);
        }
    }
}

/// Carries out one operation with plain system calls: the sync engine's whole work, and
/// io_uring's way of finishing what its ring could not (a short transfer, a file system that
/// can't zero a range in place).
pub fn run_one(disk: &Disk, op: &mut Op<'_>) -> io::Result<()> {
    match op {
        Op::Read { buffers, offset } => disk.read_into(buffers, *offset),
        Op::Write { buffers, offset } => disk.write_from(buffers, *offset),
        Op::Flush => disk.flush(),
        Op::Discard { offset, len } => disk.discard(*offset, *len),
        Op::WriteZeroes { offset, len, may_unmap } => disk.write_zeroes(*offset, *len, *may_unmap),
    }
}
