//! The disk's request queue, served on its worker thread: each chain the guest makes available
//! is one request (virtio spec 1.2, 5.2.6), a 16-byte header, the data, and a status byte.
//!
//! The chain is read as the spec's VERSION_1 layout allows: the device-readable bytes come first
//! (header, then a write's data or the discard ranges), the device-writable bytes last (a read's
//! data, then the status byte, which is the very last byte), however the driver cut them into
//! descriptors. Requests are served in batches: each chain is checked and turned into host
//! operations ([`Op`]), the disk's engine carries out the batch's operations together, and then
//! every status byte is written and the chains returned at once; between batches the worker
//! polls for more while the guest keeps submitting, its interrupt held ([`Coalescer`]).
//! Everything in a chain is the
//! guest's to forge. A request we can't make sense of gets
//! IOERR (or UNSUPP for what we don't do) in its status byte; one without a status byte we could
//! write is handed back with nothing written. Only a queue that can't be walked any more (rings
//! outside memory, an available index running ahead of the ring) stops the device.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use crate::memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EventSet};

use super::coalesce::Coalescer;
use super::disk::{Disk, SECTOR_SHIFT, SECTOR_SIZE};
use super::engine::{Job, Op, SharedEngine};
use super::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use crate::bus::lock;
use crate::config::MAX_DISK_QUEUES;
use crate::control::DiskHandle;
use crate::rate_limiter::{self, RateLimiter, TimerDuty};
use crate::seccomp::Role;
use crate::virtio::metrics::BlockMetrics;
use crate::virtio::iovec::{HostAccess, IoVecs};
use crate::virtio::queue::{clear_kick, next_chain, serve_until_idle, Chain, Pass, QueueError, UsedBatch};
use crate::virtio::worker::{watch, DeviceWorker};
use crate::virtio::{ActiveQueue, Signals};

/// `struct virtio_blk_outhdr`: type, reserved (ioprio), sector.
const HEADER_LEN: u64 = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
const RANGE_LEN: u64 = 16;
/// The most descriptors we follow in one chain (indirect tables can hold 65535). Linux never
/// sends more than seg_max + 2; a guest that does is refused rather than walked for long.
pub const MAX_DESCRIPTORS: usize = 1024;
/// The largest read or write we serve. Linux's requests are a few MiB at most; beyond this a
/// length is a forgery, and failing it keeps one request from holding the disk for long.
pub const MAX_REQUEST_BYTES: u64 = 1 << 30;

/// The token of the rate limiter's timer, after every queue's kick.
pub const RATE_LIMIT_TIMER: u64 = MAX_DISK_QUEUES as u64;

/// One of the disk's request queues, as its worker gets it.
pub struct QueueSlot {
    /// The queue's index: its kick's token and its interrupt.
    pub index: usize,
    pub active: ActiveQueue,
    /// The queue's own engine (an io_uring is driven by one thread).
    pub engine: SharedEngine,
    /// Whether this queue's worker watches the rate limiter's timer (and wakes the others).
    pub timer: TimerDuty,
}

/// A request queue and everything needed to serve it.
pub struct RequestQueue {
    index: usize,
    timer: TimerDuty,
    active: ActiveQueue,
    mem: GuestMemoryMmap,
    signals: Signals,
    /// The drive's image, which the API may change between two passes (see `Block`).
    medium: Arc<Mutex<Arc<Disk>>>,
    /// How the batch's operations reach the image: the device's, taken for each batch.
    engine: SharedEngine,
    requests: Requests,
    /// The disk's rate limiter and counters, shared with the device (they outlive an
    /// activation) and the API.
    live: DiskHandle,
    /// The requests taken in this batch, returned to the guest together.
    taken: Vec<Taken>,
    /// Their used entries, written as they are reported and published with one index update.
    used_batch: UsedBatch,
    /// When to send the interrupt the published requests are owed.
    coalescer: Coalescer,
}

impl RequestQueue {
    /// A driver that did not accept FLUSH expects every write to be durable when it completes
    /// (virtio spec 1.2, 5.2.5: no FLUSH means a write-through cache).
    pub fn new(
        medium: Arc<Mutex<Arc<Disk>>>,
        slot: QueueSlot,
        mem: GuestMemoryMmap,
        signals: Signals,
        flush_negotiated: bool,
        live: DiskHandle,
    ) -> RequestQueue {
        let QueueSlot { index, active, engine, timer } = slot;
        let taken = Vec::with_capacity(usize::from(active.queue.size()));
        let disk = lock(&medium).clone();
        let requests = Requests {
            disk,
            write_through: !flush_negotiated,
            readable: Vec::new(),
            writable: Vec::new(),
            host_error_reported: false,
            metrics: Arc::clone(&live.metrics),
        };
        RequestQueue {
            index,
            timer,
            active,
            mem,
            signals,
            medium,
            engine,
            requests,
            live,
            taken,
            used_batch: UsedBatch::default(),
            coalescer: Coalescer::default(),
        }
    }

    /// Serves every available request, a batch at a time: each batch's operations go to the
    /// engine together, and its chains come back with one used-index update. The interrupt is
    /// held while the guest keeps submitting ([`Coalescer`]): between batches the worker polls
    /// the available ring, the guest's kicks still off, and signals once the guest has
    /// submitted all it will or has gone quiet. Returns once the driver has added nothing more
    /// since we re-enabled its notifications, with no interrupt left owed.
    pub(super) fn serve(&mut self) -> Result<(), QueueError> {
        let Self { index, timer: _, active, mem, signals, medium, engine, requests, live, taken, used_batch, coalescer } = self;
        let index = *index;
        let current = lock(medium);
        if !Arc::ptr_eq(&current, &requests.disk) {
            requests.disk = Arc::clone(&current);
        }
        drop(current);
        let mut limiter = live.limiter.lock();
        if limiter.as_ref().is_some_and(|limiter| limiter.is_blocked()) {
            return Ok(()); // its timer brings us back
        }
        let batch_size = usize::from(active.queue.size());
        let polling_ends = Instant::now() + MAX_POLLING;
        // Whether the driver asked for an interrupt for what was published since the last one.
        let mut owed = false;
        let active_kick = &active.kick;
        let served = serve_until_idle(&mut active.queue, mem, |queue| {
            let mut served = 0;
            loop {
                let mut jobs = Vec::new();
                let mut throttled = false;
                while taken.len() < batch_size {
                    let Some(chain) = next_chain(queue, mem)? else { break };
                    if !requests.take(mem, chain, limiter.as_deref_mut(), taken, &mut jobs) {
                        // Over the rate: the chain goes back to the ring until the timer fires.
                        queue.go_to_previous_position();
                        live.metrics.rate_limiter_throttled_events.inc();
                        throttled = true;
                        break;
                    }
                }
                requests.carry_out(taken, &mut jobs, engine);
                served += taken.len();
                coalescer.completed(taken.len(), Instant::now());
                for request in taken.drain(..) {
                    let used = requests.report(mem, &request);
                    used_batch.add(queue, mem, request.head, used)?;
                }
                // The whole batch appears to the driver at once.
                owed |= used_batch.publish(queue, mem)?;
                if throttled {
                    return Ok::<_, QueueError>(Pass::Yielded(served));
                }
                if !owed {
                    // Nothing to hold back: the driver asked for no interrupt yet.
                    coalescer.signalled(Instant::now());
                }
                if !owed {
                    return Ok(Pass::Drained(served));
                }
                match wait_for_more(queue, mem, coalescer, (signals, index), &mut owed, polling_ends)? {
                    Polled::More => {}
                    Polled::Quiet => return Ok(Pass::Drained(served)),
                    Polled::TimeUp => {
                        // Back to the epoll loop (and its stop eventfd) with a kick of our own,
                        // since the guest's are still off.
                        let _ = active_kick.write(1);
                        return Ok(Pass::Yielded(served));
                    }
                }
            }
        });
        // Whatever ended the serving (an idle ring, the rate limit, a broken ring), what was
        // published is announced.
        if owed {
            signal((signals, index), coalescer, &mut owed);
        }
        served.map(drop)
    }
}

/// How long one wake-up of the worker may serve and poll before it goes back to its epoll
/// loop: a guest that never stops submitting can't keep a reset or pause waiting for long.
const MAX_POLLING: Duration = Duration::from_millis(100);

/// How polling for more requests ended.
enum Polled {
    /// The guest made more available; the interrupt is still held.
    More,
    /// The interrupt went out: the guest went quiet, or the hold is over.
    Quiet,
    /// The worker has polled long enough; the interrupt went out.
    TimeUp,
}

/// Polls the available ring while an interrupt is held, until the guest makes more available
/// or the interrupt is due.
fn wait_for_more(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    coalescer: &mut Coalescer,
    interrupt: (&Signals, usize),
    owed: &mut bool,
    polling_ends: Instant,
) -> Result<Polled, QueueError> {
    loop {
        let now = Instant::now();
        if now >= polling_ends {
            signal(interrupt, coalescer, owed);
            return Ok(Polled::TimeUp);
        }
        if coalescer.due(now) {
            signal(interrupt, coalescer, owed);
            return Ok(Polled::Quiet);
        }
        if queue.avail_idx(mem, Ordering::Acquire)?.0 != queue.next_avail() {
            return Ok(Polled::More);
        }
        // Another thread of the host (the guest's other vCPU) may want this CPU more than we do.
        std::thread::yield_now();
    }
}

/// Sends the held interrupt (of queue `index`), if the driver asked for one.
fn signal((signals, index): (&Signals, usize), coalescer: &mut Coalescer, owed: &mut bool) {
    if std::mem::take(owed) {
        signals.used_queue(index);
    }
    coalescer.signalled(Instant::now());
}

impl DeviceWorker for RequestQueue {
    type Error = QueueError;

    fn role(&self) -> Role {
        lock(&self.engine).worker_role()
    }

    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        watch(epoll, &self.active.kick, self.index as u64)?;
        self.live.limiter.watch(epoll, RATE_LIMIT_TIMER, &self.timer)
    }

    fn handle(&mut self, _: &Epoll, token: u64, _: EventSet) -> Result<(), QueueError> {
        if self.live.limiter.timer_event(token, RATE_LIMIT_TIMER, &self.timer) {
            self.live.metrics.rate_limiter_event_count.inc();
        } else {
            // Only the count is consumed; what was kicked is whatever the ring says.
            clear_kick(&self.active.kick);
            self.live.metrics.queue_event_count.inc();
        }
        self.serve()
    }
}

/// A request taken from the ring in this batch.
struct Taken {
    head: u16,
    /// Where its status byte goes; `None` for a chain handed back with nothing written.
    status: Option<GuestAddress>,
    /// The bytes it put in the guest's buffers, or why it failed: as planned, until one of its
    /// operations fails.
    outcome: Result<u32, Failed>,
}

/// A guest buffer: one descriptor's worth of guest memory.
#[derive(Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// Where a request's bytes are, once its chain has been walked.
struct Layout {
    /// Device-readable bytes: the header, then a write's data or the discard ranges.
    readable: u64,
    /// Device-writable bytes before the status byte: a read's data, or room for the ID.
    writable: u64,
    status: GuestAddress,
}

/// Why a request failed: the guest's doing (IOERR, UNSUPP), or the host's file (IOERR too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failed {
    IoErr,
    Unsupported,
    HostErr,
}

/// Why a chain can't be a request at all: it is handed back with nothing written. Logged at
/// debug level only, since a guest can make as many as it likes.
#[derive(Debug, thiserror::Error)]
enum Malformed {
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the chain's first descriptor can't be read")]
    Unreadable,
    #[error("the chain loops, is too long, or leads outside the descriptor table")]
    CutShort,
    #[error("no device-writable status byte")]
    NoStatus,
    #[error("the status byte's address overflows")]
    StatusOverflows,
}

/// What the guest can make a request fail with; logged at debug level only, since a guest can
/// make as many as it likes.
fn refuse(disk: &Disk, why: &str) -> Failed {
    tracing::debug!(disk = %disk.name, "virtio-blk request refused: {why}");
    Failed::IoErr
}

/// Serves one request at a time; the segment lists are kept between requests so that a steady
/// stream of requests allocates nothing.
struct Requests {
    disk: Arc<Disk>,
    write_through: bool,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    host_error_reported: bool,
    metrics: Arc<BlockMetrics>,
}

impl Requests {
    /// Takes the request in `chain` into the batch: checks it, and queues in `jobs` the
    /// operations it needs (none for a request that fails its checks, or needs no host I/O).
    /// False when the rate limiter holds it back (nothing was taken).
    fn take<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
        chain: Chain<'_>,
        limiter: Option<&mut RateLimiter>,
        taken: &mut Vec<Taken>,
        jobs: &mut Vec<Job<'m>>,
    ) -> bool {
        let head = chain.head_index();
        let layout = match self.walk(chain) {
            Ok(layout) => layout,
            Err(why) => {
                tracing::debug!(disk = %self.disk.name, "virtio-blk chain dropped: {why}");
                self.metrics.invalid_reqs_count.inc();
                taken.push(Taken { head, status: None, outcome: Ok(0) });
                return true;
            }
        };
        // The data either way: a write's readable bytes past the header, a read's writable.
        let bytes = layout.readable.saturating_sub(HEADER_LEN) + layout.writable;
        if !rate_limiter::admit(limiter, bytes, &self.disk.name) {
            return false;
        }
        let outcome = self.plan(mem, &layout, taken.len(), jobs);
        taken.push(Taken { head, status: Some(layout.status), outcome });
        true
    }

    /// Has the engine carry out the batch's operations; a failed one fails its request.
    fn carry_out(&mut self, taken: &mut [Taken], jobs: &mut [Job<'_>], engine: &SharedEngine) {
        if jobs.is_empty() {
            return;
        }
        lock(engine).run(&self.disk, jobs);
        for job in jobs.iter() {
            if let Err(e) = &job.outcome {
                let failed = self.host_failed(job.op.name(), e);
                if let Some(request) = taken.get_mut(job.request) {
                    request.outcome = Err(failed);
                }
            }
        }
    }

    /// Writes a carried-out request's status byte; returns the used length to report: the
    /// bytes written into its buffers and the status, or 0 for a chain handed back untouched.
    fn report(&self, mem: &GuestMemoryMmap, request: &Taken) -> u32 {
        let Some(status_addr) = request.status else { return 0 };
        let (status, written) = match request.outcome {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(Failed::HostErr) => {
                self.metrics.execute_fails.inc();
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Err(failed) => {
                self.metrics.invalid_reqs_count.inc();
                (if failed == Failed::Unsupported { VIRTIO_BLK_S_UNSUPP } else { VIRTIO_BLK_S_IOERR }, 0)
            }
        };
        // The status is u8 in the spec; the bindings spell it u32.
        if mem.write_obj(status as u8, status_addr).is_err() {
            tracing::debug!(disk = %self.disk.name, "virtio-blk chain dropped: its status byte is outside memory");
            return 0;
        }
        written + 1
    }

    /// Sorts the chain's descriptors into readable and writable segments, and finds the status
    /// byte. The chain must end where the driver ended it: a walk cut short (a loop, a next
    /// index past the table, a descriptor outside memory, 4 GiB of buffers) fails the request.
    fn walk(&mut self, chain: Chain<'_>) -> Result<Layout, Malformed> {
        self.readable.clear();
        self.writable.clear();
        let (mut count, mut cut_short) = (0, false);
        for desc in chain {
            count += 1;
            if count > MAX_DESCRIPTORS {
                return Err(Malformed::TooManyDescriptors);
            }
            cut_short = desc.has_next();
            if desc.len() == 0 {
                continue;
            }
            let segment = Segment { addr: desc.addr(), len: desc.len() };
            if desc.is_write_only() {
                self.writable.push(segment);
            } else if self.writable.is_empty() {
                self.readable.push(segment);
            } else {
                return Err(Malformed::ReadableAfterWritable);
            }
        }
        if count == 0 {
            return Err(Malformed::Unreadable);
        }
        if cut_short {
            return Err(Malformed::CutShort);
        }
        let last = self.writable.last().ok_or(Malformed::NoStatus)?;
        let status = last.addr.checked_add(u64::from(last.len) - 1).ok_or(Malformed::StatusOverflows)?;
        Ok(Layout { readable: total(&self.readable), writable: total(&self.writable) - 1, status })
    }

    /// Checks a walked request and queues its operations in `jobs` as request number `request`;
    /// returns the bytes it will write into its data buffers if they succeed.
    fn plan<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
        layout: &Layout,
        request: usize,
        jobs: &mut Vec<Job<'m>>,
    ) -> Result<u32, Failed> {
        let mut header = [0u8; HEADER_LEN as usize];
        if layout.readable < HEADER_LEN || !read_stream(mem, &self.readable, 0, &mut header) {
            return Err(refuse(&self.disk, "the header is short or outside guest memory"));
        }
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let mut queue = |op| jobs.push(Job::new(op, request));
        match u32::from_le_bytes([t0, t1, t2, t3]) {
            VIRTIO_BLK_T_IN => self.read(mem, sector, layout.writable, &mut queue),
            VIRTIO_BLK_T_OUT => self.write(mem, sector, layout.readable - HEADER_LEN, &mut queue).map(|()| 0),
            VIRTIO_BLK_T_FLUSH => {
                self.metrics.flush_count.inc();
                queue(Op::Flush);
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, layout.writable),
            VIRTIO_BLK_T_DISCARD => self.discard_or_zero(mem, false, layout.readable - HEADER_LEN, &mut queue).map(|()| 0),
            VIRTIO_BLK_T_WRITE_ZEROES => {
                self.discard_or_zero(mem, true, layout.readable - HEADER_LEN, &mut queue).map(|()| 0)
            }
            other => {
                tracing::debug!(disk = %self.disk.name, "virtio-blk request type {other} is not supported");
                Err(Failed::Unsupported)
            }
        }
    }

    fn read<'m>(&self, mem: &'m GuestMemoryMmap, sector: u64, len: u64, queue: &mut impl FnMut(Op<'m>)) -> Result<u32, Failed> {
        let offset = self.data_offset(sector, len)?;
        let buffers = self.map(mem, Direction::IntoGuest, len)?;
        queue(Op::Read { buffers, offset });
        self.metrics.read_count.inc();
        self.metrics.read_bytes.add(len);
        // `data_offset` bounded `len` by MAX_REQUEST_BYTES.
        Ok(u32::try_from(len).unwrap_or(u32::MAX))
    }

    fn write<'m>(&self, mem: &'m GuestMemoryMmap, sector: u64, len: u64, queue: &mut impl FnMut(Op<'m>)) -> Result<(), Failed> {
        if self.disk.readonly {
            return Err(refuse(&self.disk, "a write to a read-only disk"));
        }
        let offset = self.data_offset(sector, len)?;
        let buffers = self.map(mem, Direction::FromGuest, len)?;
        queue(Op::Write { buffers, offset });
        self.metrics.write_count.inc();
        self.metrics.write_bytes.add(len);
        if self.write_through {
            queue(Op::Flush);
        }
        Ok(())
    }

    /// The serial, cut to the room the driver gave (Linux gives exactly 20 bytes).
    fn get_id(&mut self, mem: &GuestMemoryMmap, room: u64) -> Result<u32, Failed> {
        let id = &self.disk.id[..self.disk.id.len().min(usize::try_from(room).unwrap_or(usize::MAX))];
        if !write_stream(mem, &self.writable, 0, id) {
            return Err(refuse(&self.disk, "the ID buffer is outside guest memory"));
        }
        Ok(id.len() as u32)
    }

    /// DISCARD or WRITE_ZEROES: every range is checked before any is queued, so that a request
    /// the guest got wrong changes nothing.
    fn discard_or_zero<'m>(
        &mut self,
        mem: &GuestMemoryMmap,
        zero: bool,
        payload: u64,
        queue: &mut impl FnMut(Op<'m>),
    ) -> Result<(), Failed> {
        if self.disk.readonly {
            return Err(refuse(&self.disk, "a discard or write-zeroes on a read-only disk"));
        }
        if !self.disk.can_punch_holes {
            return Err(Failed::Unsupported);
        }
        let count = payload / RANGE_LEN;
        if !payload.is_multiple_of(RANGE_LEN) || count == 0 || count > u64::from(MAX_DISCARD_SEGMENTS) {
            return Err(refuse(&self.disk, "the discard ranges are malformed or too many"));
        }
        let mut ranges = [(0u64, 0u64, false); MAX_DISCARD_SEGMENTS as usize];
        for (index, range) in ranges.iter_mut().enumerate().take(count as usize) {
            *range = self.discard_range(mem, zero, HEADER_LEN + index as u64 * RANGE_LEN)?;
        }
        for &(offset, len, may_unmap) in ranges[..count as usize].iter().filter(|range| range.1 > 0) {
            queue(if zero { Op::WriteZeroes { offset, len, may_unmap } } else { Op::Discard { offset, len } });
        }
        Ok(())
    }

    /// Reads and checks the range at `at` in the readable bytes: (byte offset, byte length,
    /// may unmap).
    fn discard_range(&self, mem: &GuestMemoryMmap, zero: bool, at: u64) -> Result<(u64, u64, bool), Failed> {
        let mut raw = [0u8; RANGE_LEN as usize];
        if !read_stream(mem, &self.readable, at, &mut raw) {
            return Err(refuse(&self.disk, "a discard range is outside guest memory"));
        }
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = raw;
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);
        // The spec: UNSUPP for unknown flags, and for "unmap" on a discard, which always unmaps.
        let known = if zero { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP } else { 0 };
        if flags & !known != 0 {
            return Err(Failed::Unsupported);
        }
        if sectors > MAX_DISCARD_SECTORS {
            return Err(refuse(&self.disk, "a discard range is longer than max_discard_sectors"));
        }
        let offset = self.sector_offset(sector, u64::from(sectors))?;
        Ok((offset, u64::from(sectors) << SECTOR_SHIFT, flags != 0))
    }

    /// The byte offset of a read or write of `len` bytes at `sector`, if the request is whole
    /// sectors, not absurdly long, and lies inside the disk.
    fn data_offset(&self, sector: u64, len: u64) -> Result<u64, Failed> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(refuse(&self.disk, "the data is not a whole number of sectors"));
        }
        if len > MAX_REQUEST_BYTES {
            return Err(refuse(&self.disk, "the request is absurdly long"));
        }
        self.sector_offset(sector, len >> SECTOR_SHIFT)
    }

    fn sector_offset(&self, sector: u64, sectors: u64) -> Result<u64, Failed> {
        match sector.checked_add(sectors) {
            // The disk's size in bytes fits in u64, so any sector up to its end does too.
            Some(end) if end <= self.disk.sectors => Ok(sector << SECTOR_SHIFT),
            _ => Err(refuse(&self.disk, "the sectors lie past the end of the disk")),
        }
    }

    /// The request's data buffers as iovecs: the writable bytes before the status for a read,
    /// the readable bytes after the header for a write.
    fn map<'m>(&self, mem: &'m GuestMemoryMmap, direction: Direction, len: u64) -> Result<IoVecs<'m>, Failed> {
        let (segments, skip, access) = match direction {
            Direction::IntoGuest => (&self.writable, 0, HostAccess::Writes),
            Direction::FromGuest => (&self.readable, HEADER_LEN, HostAccess::Reads),
        };
        let mut buffers = IoVecs::with_capacity(segments.len());
        let mapped = for_each_piece(segments, skip, len, |addr, piece| buffers.push_guest(mem, addr, piece, access).is_ok());
        if !mapped {
            return Err(refuse(&self.disk, "a data buffer is outside guest memory"));
        }
        Ok(buffers)
    }

    /// A failure of the host's file: worth telling the user about once (a full disk, a dying
    /// drive), then only at debug level, since the guest will likely retry.
    fn host_failed(&mut self, what: &str, e: &io::Error) -> Failed {
        if !self.host_error_reported {
            self.host_error_reported = true;
            tracing::warn!("disk image '{}': {what} failed: {e} (the guest sees an I/O error)", self.disk.name);
        } else {
            tracing::debug!(disk = %self.disk.name, "{what} failed: {e}");
        }
        Failed::HostErr
    }
}

#[derive(Clone, Copy)]
enum Direction {
    IntoGuest,
    FromGuest,
}

fn total(segments: &[Segment]) -> u64 {
    // At most MAX_DESCRIPTORS lengths of u32 each: no overflow in u64.
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// Calls `each` on the pieces of guest memory holding bytes `skip..skip + len` of the stream
/// the segments form. False if `each` refuses a piece or the stream is shorter than that.
fn for_each_piece(
    segments: &[Segment],
    mut skip: u64,
    mut len: u64,
    mut each: impl FnMut(GuestAddress, usize) -> bool,
) -> bool {
    for segment in segments {
        if len == 0 {
            break;
        }
        let seg_len = u64::from(segment.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let piece = (seg_len - skip).min(len);
        let Some(addr) = segment.addr.checked_add(skip) else { return false };
        // A piece is at most a u32 long.
        if !each(addr, piece as usize) {
            return false;
        }
        len -= piece;
        skip = 0;
    }
    len == 0
}

/// Copies bytes `at..at + buf.len()` of the stream into `buf`.
fn read_stream(mem: &GuestMemoryMmap, segments: &[Segment], at: u64, buf: &mut [u8]) -> bool {
    let mut done = 0;
    for_each_piece(segments, at, buf.len() as u64, |addr, piece| {
        let ok = buf.get_mut(done..done + piece).is_some_and(|part| mem.read_slice(part, addr).is_ok());
        done += piece;
        ok
    })
}

/// Copies `data` into bytes `at..at + data.len()` of the stream.
fn write_stream(mem: &GuestMemoryMmap, segments: &[Segment], at: u64, data: &[u8]) -> bool {
    let mut done = 0;
    for_each_piece(segments, at, data.len() as u64, |addr, piece| {
        let ok = data.get(done..done + piece).is_some_and(|part| mem.write_slice(part, addr).is_ok());
        done += piece;
        ok
    })
}
