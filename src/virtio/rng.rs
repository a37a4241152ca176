//! virtio-rng: an entropy source for the guest (`/dev/hwrng`), fed from the host's getrandom.
//!
//! The simplest virtio device, and a good first one to read: one queue, no config space, no
//! features. The guest posts write-only buffers; we fill them with random bytes and give them
//! back. A guest could post huge buffers to keep us busy, so one request gets at most
//! [`MAX_BYTES_PER_REQUEST`]; the driver just asks again. docs/adding-a-device.md uses it as
//! the worked example of a device.

use std::io::{self, Write};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use crate::memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{clear_kick, interrupt_if_wanted, next_chain, serve_until_idle, Chain, Pass, QueueError};
use super::worker::{watch, DeviceWorker};
use super::{device_type, ActivateError, Activation, Device, Signals, VirtioCommon};
use crate::rate_limiter::{self, RateLimit, SharedLimiter, TimerDuty};

const QUEUE_SIZE: u16 = 256;
pub const MAX_BYTES_PER_REQUEST: usize = 64 << 10;
/// The request queue's index, and its kick's token.
pub const REQUESTS: usize = 0;

/// The rate limiter's timer token, after the queue's kick.
pub const RATE_LIMIT_TIMER: u64 = REQUESTS as u64 + 1;

#[derive(Default)]
pub struct Rng {
    common: VirtioCommon<RngWorker>,
    /// Firecracker's entropy `rate_limiter`, if any: kept here so the budget outlives a reset.
    limiter: SharedLimiter,
}

impl Rng {
    pub fn new() -> Rng {
        Rng::default()
    }

    /// An entropy source that gives at most what `limit` allows. Fails only when the host
    /// gives us no timerfd.
    pub fn limited(limit: RateLimit) -> io::Result<Rng> {
        Ok(Rng { limiter: SharedLimiter::new(limit)?, ..Rng::default() })
    }
}

impl Device for Rng {
    type Handler = RngWorker;
    const DEVICE_TYPE: u32 = device_type::RNG;
    const WORKER_NAME: &'static str = "virtio-rng";

    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn handler(&self, mut activation: Activation) -> Result<RngWorker, ActivateError> {
        let active = activation.take_queue(REQUESTS, "request")?;
        let limiter = self.limiter.clone();
        Ok(RngWorker { mem: activation.mem, queue: active.queue, kick: active.kick, signals: activation.signals, limiter })
    }

    fn common(&mut self) -> &mut VirtioCommon<RngWorker> {
        &mut self.common
    }
}

/// The device's side of its worker thread.
pub struct RngWorker {
    mem: GuestMemoryMmap,
    queue: Queue,
    kick: EventFd,
    signals: Signals,
    limiter: SharedLimiter,
}

impl DeviceWorker for RngWorker {
    type Error = QueueError;

    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        watch(epoll, &self.kick, REQUESTS as u64)?;
        self.limiter.watch(epoll, RATE_LIMIT_TIMER, &TimerDuty::alone())
    }

    fn handle(&mut self, _: &Epoll, token: u64, _: EventSet) -> Result<(), QueueError> {
        if !self.limiter.timer_event(token, RATE_LIMIT_TIMER, &TimerDuty::alone()) {
            clear_kick(&self.kick);
        }
        self.serve_queue()
    }
}

impl RngWorker {
    /// Fills every posted buffer, then interrupts the guest once if it wants to hear.
    fn serve_queue(&mut self) -> Result<(), QueueError> {
        let mem = &self.mem;
        let mut limiter = self.limiter.lock();
        if limiter.as_ref().is_some_and(|limiter| limiter.is_blocked()) {
            return Ok(()); // its timer brings us back
        }
        let pass = serve_until_idle(&mut self.queue, mem, |queue| {
            let mut served = 0;
            while let Some(chain) = next_chain(queue, mem)? {
                let wanted = chain.clone().writer(mem).map_or(0, |w| w.available_bytes().min(MAX_BYTES_PER_REQUEST));
                if !rate_limiter::admit(limiter.as_deref_mut(), wanted as u64, "virtio-rng") {
                    // Over the rate: back to the ring until the limiter's timer fires.
                    queue.go_to_previous_position();
                    return Ok(Pass::Yielded(served));
                }
                let head = chain.head_index();
                let written = fill_with_random(mem, chain);
                queue.add_used(mem, head, written)?;
                served += 1;
            }
            Ok::<_, QueueError>(Pass::Drained(served))
        })?;
        interrupt_if_wanted(&mut self.queue, mem, &self.signals, REQUESTS, pass.served())
    }
}

/// Writes random bytes into a chain's writable buffers; returns how many. A chain with bad
/// addresses or read-only buffers gets nothing, which the driver sees as an empty read.
fn fill_with_random(mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
    let Ok(mut writer) = chain.writer(mem) else { return 0 };
    let mut left = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
    let mut buf = [0u8; 4096];
    while left > 0 {
        let n = left.min(buf.len());
        if getrandom(&mut buf[..n]).is_err() || writer.write_all(&buf[..n]).is_err() {
            break;
        }
        left -= n;
    }
    writer.bytes_written() as u32
}

fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into the buffer we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn memory() -> GuestMemoryMmap {
        crate::memory::from_ranges(&[(GuestAddress(0), 0x20_0000)], crate::memory::Tracking::Off).expect("memory")
    }

    fn worker_for(mem: &GuestMemoryMmap, queue: Queue) -> RngWorker {
        let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        RngWorker { mem: mem.clone(), queue, kick, signals: Signals::standalone(1), limiter: SharedLimiter::default() }
    }

    fn descriptor(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    }

    #[test]
    fn buffers_come_back_full_of_random_bytes() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[descriptor(0x10_0000, 64, VRING_DESC_F_WRITE, 0)], 0).expect("chain");
        let mut worker = worker_for(&mem, vq.create_queue().expect("queue"));
        worker.serve_queue().expect("served");
        let used = vq.used().ring().ref_at(0).expect("used").load();
        assert_eq!(used.len(), 64);
        let mut bytes = [0u8; 64];
        mem.read_slice(&mut bytes, GuestAddress(0x10_0000)).expect("read");
        assert_ne!(bytes, [0u8; 64]);
        assert_eq!(worker.signals.take_queue_interrupts(0), 1);
    }

    #[test]
    fn hostile_chains_get_nothing_and_the_device_carries_on() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(
            &[
                descriptor(0x10_0000, 64, 0, 0),                        // read-only buffer
                descriptor(0xfff_0000, 64, VRING_DESC_F_WRITE, 0),      // outside guest memory
                descriptor(0x10_1000, u32::MAX, VRING_DESC_F_WRITE, 0), // runs off the end of memory
                descriptor(0x10_2000, 8, VRING_DESC_F_WRITE, 0),
                descriptor(0x10_3000, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 4), // loops to itself
            ],
            0,
        )
        .expect("chains");
        let mut worker = worker_for(&mem, vq.create_queue().expect("queue"));
        worker.serve_queue().expect("the device survives");
        let lens: Vec<u32> = (0..5).filter_map(|i| vq.used().ring().ref_at(i).ok()).map(|r| r.load().len()).collect();
        assert_eq!(lens[..4], [0, 0, 0, 8], "bad buffers get nothing, the good one is filled");
        assert!(lens[4] <= 16 * 16, "virtio-queue cuts a looping chain at the queue size: {}", lens[4]);
    }

    #[test]
    fn huge_buffers_are_capped() {
        let mem = crate::memory::from_ranges(&[(GuestAddress(0), 0x40_0000)], crate::memory::Tracking::Off).expect("memory");
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[descriptor(0x10_0000, 0x20_0000, VRING_DESC_F_WRITE, 0)], 0).expect("chain");
        let mut worker = worker_for(&mem, vq.create_queue().expect("queue"));
        worker.serve_queue().expect("served");
        assert_eq!(vq.used().ring().ref_at(0).expect("used").load().len() as usize, MAX_BYTES_PER_REQUEST);
    }

    #[test]
    fn a_rate_limit_holds_requests_in_the_ring_until_its_timer_fires() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let chains: Vec<RawDescriptor> = (0..4).map(|i| descriptor(0x10_0000 + i * 0x1000, 1024, VRING_DESC_F_WRITE, 0)).collect();
        vq.add_desc_chains(&chains, 0).expect("chains");
        let limit = RateLimit { bandwidth: Some(crate::rate_limiter::BucketConfig::new(2048, 0, 20).expect("valid")), ops: None };
        let rng = Rng::limited(limit).expect("timerfd");
        let mut worker = worker_for(&mem, vq.create_queue().expect("queue"));
        worker.limiter = rng.limiter.clone();
        worker.serve_queue().expect("served");
        assert_eq!(vq.used().idx().load(), 2, "2 KiB of budget: two requests of 1 KiB");
        let epoll = Epoll::new().expect("epoll");
        worker.register(&epoll).expect("register");
        while vq.used().idx().load() < 4 {
            let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 2];
            let ready = epoll.wait(5000, &mut events).expect("wait");
            assert!(ready > 0, "the limiter's timer never fired");
            for event in &events[..ready] {
                worker.handle(&epoll, event.data(), EventSet::IN).expect("served");
            }
        }
    }
}
