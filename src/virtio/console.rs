//! The virtio console (virtio spec 1.2, 5.3): the guest's `hvc0`, a console without a UART.
//!
//! With `--console virtio` and `console=hvc0` the guest's shell talks to us through two queues
//! instead of one byte per port-I/O exit. The guest fills the *transmit* queue (1) with what it
//! prints; we copy those bytes to our output, in order, and hand the buffers back. It posts
//! empty buffers on the *receive* queue (0); we fill them with what the user typed. One port,
//! no MULTIPORT control queues, no F_SIZE: Linux only reads the window size on a config
//! interrupt, so a size fixed at boot would never reach the shell.
//!
//! Keystrokes come from the stdin pump ([`crate::terminal`]) through a [`ConsoleInput`], which
//! keeps them in a bounded buffer until the guest has posted somewhere to put them: a guest
//! that never reads its console costs us at most [`INPUT_LIMIT`] bytes, and the rest is
//! dropped. Everything in the queues is the guest's to forge: a descriptor outside memory, a
//! read-only receive buffer or a write-only transmit buffer fails that buffer alone (it is
//! returned empty); only rings we can no longer read or write stop the device.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use crate::memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{clear_kick, interrupt_if_wanted, next_chain, serve_until_idle, Chain, Pass, QueueError};
use super::worker::{watch, DeviceWorker};
use super::{device_type, ActivateError, Activation, ActiveQueue, Device, Signals, VirtioCommon};
use crate::bus::lock;

/// Queue indices (virtio spec 5.3.2: receiveq, transmitq for port 0).
const RECEIVE: usize = 0;
const TRANSMIT: usize = 1;

/// How much typed input we hold while the guest posts no receive buffers.
pub const INPUT_LIMIT: usize = 64 * 1024;

/// Worker epoll tokens: the queues' kicks (by queue index), then typed input.
pub const RECEIVE_KICK: u64 = RECEIVE as u64;
pub const TRANSMIT_KICK: u64 = TRANSMIT as u64;
pub const INPUT_ARRIVED: u64 = 2;

/// What the user typed and the guest has not taken yet, shared by the pump and the worker.
struct PendingInput {
    bytes: Mutex<VecDeque<u8>>,
    /// Written by the pump when input arrives, so the worker looks for receive buffers.
    arrived: EventFd,
}

/// Where the stdin pump delivers typed bytes. Cheap to clone; safe to use from any thread,
/// before, during and between activations.
#[derive(Clone)]
pub struct ConsoleInput(Arc<PendingInput>);

impl ConsoleInput {
    /// Queues `bytes` for the guest and wakes the worker. Returns how many were kept: the rest
    /// is dropped when [`INPUT_LIMIT`] bytes are already waiting for a guest that isn't reading.
    pub fn send(&self, bytes: &[u8]) -> usize {
        let kept = {
            let mut pending = lock(&self.0.bytes);
            let kept = bytes.len().min(INPUT_LIMIT.saturating_sub(pending.len()));
            pending.extend(&bytes[..kept]);
            kept
        };
        if kept < bytes.len() {
            tracing::debug!(dropped = bytes.len() - kept, "the guest is not reading hvc0: console input dropped");
        }
        if kept > 0 {
            self.wake_worker();
        }
        kept
    }

    /// What is waiting for the guest (tests only).
    #[cfg(test)]
    pub(crate) fn pending(&self) -> Vec<u8> {
        lock(&self.0.bytes).iter().copied().collect()
    }

    fn wake_worker(&self) {
        // Only fails if the counter would overflow 2^64, and then the worker is awake anyway.
        let _ = self.0.arrived.write(1);
    }
}

/// The virtio console device, as the transport sees it.
pub struct Console {
    input: ConsoleInput,
    output: Arc<Mutex<Box<dyn Write + Send>>>,
    common: VirtioCommon<ConsoleWorker>,
}

impl Console {
    /// A console whose guest output goes to `output` (our stdout, in practice). Fails only if
    /// the host can't give us an eventfd.
    pub fn new(output: Box<dyn Write + Send>) -> io::Result<Console> {
        let pending = PendingInput { bytes: Mutex::default(), arrived: EventFd::new(libc::EFD_NONBLOCK)? };
        Ok(Console {
            input: ConsoleInput(Arc::new(pending)),
            output: Arc::new(Mutex::new(output)),
            common: VirtioCommon::default(),
        })
    }

    /// The handle the stdin pump delivers typed bytes to.
    pub fn input(&self) -> ConsoleInput {
        self.input.clone()
    }
}

impl Device for Console {
    type Handler = ConsoleWorker;
    const DEVICE_TYPE: u32 = device_type::CONSOLE;
    const WORKER_NAME: &'static str = "virtio-console";

    fn queue_sizes(&self) -> &[u16] {
        &[256, 256]
    }

    // No features, and so nothing in the config space (5.3.4: cols, rows, max_nr_ports,
    // emerg_wr) means anything to a driver without F_SIZE, MULTIPORT or EMERG_WRITE: all of it
    // reads as zero.

    /// Either queue may be missing: a driver that never reads its console needs no receive
    /// queue, and its input just waits.
    fn handler(&self, mut activation: Activation) -> Result<ConsoleWorker, ActivateError> {
        Ok(ConsoleWorker {
            receive: activation.take_optional_queue(RECEIVE),
            transmit: activation.take_optional_queue(TRANSMIT),
            mem: activation.mem,
            input: self.input.clone(),
            output: Arc::clone(&self.output),
            signals: activation.signals,
        })
    }

    fn common(&mut self) -> &mut VirtioCommon<ConsoleWorker> {
        &mut self.common
    }
}

/// The console's side of its worker thread.
pub struct ConsoleWorker {
    receive: Option<ActiveQueue>,
    transmit: Option<ActiveQueue>,
    mem: GuestMemoryMmap,
    input: ConsoleInput,
    output: Arc<Mutex<Box<dyn Write + Send>>>,
    signals: Signals,
}

impl DeviceWorker for ConsoleWorker {
    type Error = QueueError;

    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        if let Some(receive) = &self.receive {
            watch(epoll, &receive.kick, RECEIVE_KICK)?;
        }
        if let Some(transmit) = &self.transmit {
            watch(epoll, &transmit.kick, TRANSMIT_KICK)?;
        }
        watch(epoll, &self.input.0.arrived, INPUT_ARRIVED)?;
        // Input typed before the driver was ready may be waiting with no wake-up left to see.
        self.input.wake_worker();
        Ok(())
    }

    fn handle(&mut self, _: &Epoll, token: u64, _: EventSet) -> Result<(), QueueError> {
        match token {
            TRANSMIT_KICK => {
                if let Some(transmit) = &self.transmit {
                    clear_kick(&transmit.kick);
                }
                self.transmit()
            }
            RECEIVE_KICK => {
                if let Some(receive) = &self.receive {
                    clear_kick(&receive.kick);
                }
                self.receive()
            }
            INPUT_ARRIVED => {
                clear_kick(&self.input.0.arrived);
                self.receive()
            }
            _ => Ok(()),
        }
    }
}

impl ConsoleWorker {
    /// Copies every buffer the guest queued for transmission to our output, in order.
    fn transmit(&mut self) -> Result<(), QueueError> {
        let Some(transmit) = self.transmit.as_mut() else { return Ok(()) };
        let mem = &self.mem;
        let mut output = lock(&self.output);
        let pass = serve_until_idle(&mut transmit.queue, mem, |queue| {
            let mut served = 0;
            while let Some(popped) = pop_skipping_bad_heads(queue, mem)? {
                served += 1;
                if let Some(chain) = popped {
                    let head = chain.head_index();
                    print_buffer(chain, mem, &mut **output);
                    queue.add_used(mem, head, 0)?;
                }
            }
            Ok::<_, QueueError>(Pass::Drained(served))
        })?;
        if let Err(e) = output.flush() {
            tracing::debug!("console output lost: {e}");
        }
        drop(output);
        interrupt_if_wanted(&mut transmit.queue, mem, &self.signals, TRANSMIT, pass.served())
    }

    /// Moves pending input into the guest's receive buffers, for as long as there are both.
    fn receive(&mut self) -> Result<(), QueueError> {
        let Some(receive) = self.receive.as_mut() else { return Ok(()) };
        let mem = &self.mem;
        let mut pending = lock(&self.input.0.bytes);
        let pass = serve_until_idle(&mut receive.queue, mem, |queue| {
            let mut served = 0;
            while !pending.is_empty() {
                let Some(popped) = pop_skipping_bad_heads(queue, mem)? else { return Ok(Pass::Drained(served)) };
                served += 1;
                if let Some(chain) = popped {
                    let head = chain.head_index();
                    let written = fill_buffer(chain, mem, &mut pending);
                    queue.add_used(mem, head, written)?;
                }
            }
            // Buffers may be left for the next input, which wakes us itself.
            Ok::<_, QueueError>(Pass::Yielded(served))
        })?;
        drop(pending);
        interrupt_if_wanted(&mut receive.queue, mem, &self.signals, RECEIVE, pass.served())
    }
}

/// The next chain, as [`next_chain`] gives it, except that a head index past the queue's end is
/// popped and dropped (`Some(None)`) rather than breaking the console: it names no buffer the
/// guest could get back, and hvc0 is what a user needs to find out what went wrong.
fn pop_skipping_bad_heads<'m>(queue: &mut Queue, mem: &'m GuestMemoryMmap) -> Result<Option<Option<Chain<'m>>>, QueueError> {
    match next_chain(queue, mem) {
        Ok(chain) => Ok(chain.map(Some)),
        Err(QueueError::HeadOutOfRange { head, .. }) => {
            tracing::debug!(head, "hvc0: the guest made a descriptor past the queue's end available");
            Ok(Some(None))
        }
        Err(e) => Err(e),
    }
}

/// Writes a transmit buffer's readable bytes to `output`. A buffer that isn't all in guest
/// memory is dropped whole; write-only descriptors in it are ignored.
fn print_buffer(chain: Chain<'_>, mem: &GuestMemoryMmap, output: &mut dyn Write) {
    let mut reader = match chain.reader(mem) {
        Ok(reader) => reader,
        Err(e) => return tracing::debug!("hvc0: transmit buffer dropped: {e}"),
    };
    let mut bytes = [0u8; 4096];
    loop {
        match reader.read(&mut bytes) {
            Ok(0) => return,
            Ok(count) => {
                if let Err(e) = output.write_all(&bytes[..count]) {
                    // Our stdout is gone (a closed pipe): the guest keeps running, unheard.
                    return tracing::debug!("console output lost: {e}");
                }
            }
            Err(e) => return tracing::debug!("hvc0: transmit buffer unreadable: {e}"),
        }
    }
}

/// Moves as much of `pending` as fits into a receive buffer's writable descriptors, in order.
/// Returns how many bytes it wrote; a buffer that isn't all in guest memory gets none.
fn fill_buffer(chain: Chain<'_>, mem: &GuestMemoryMmap, pending: &mut VecDeque<u8>) -> u32 {
    let mut writer = match chain.writer(mem) {
        Ok(writer) => writer,
        Err(e) => {
            tracing::debug!("hvc0: receive buffer returned empty: {e}");
            return 0;
        }
    };
    let (front, back) = pending.as_slices();
    let mut written = 0;
    for part in [front, back] {
        let count = writer.write(part).unwrap_or(0);
        written += count;
        if count < part.len() {
            break;
        }
    }
    pending.drain(..written);
    // At most INPUT_LIMIT bytes were pending.
    u32::try_from(written).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{wait_until, VirtioDevice};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const MEM_SIZE: usize = 0x10_0000;
    const RX_RING: u64 = 0;
    const TX_RING: u64 = 0x4000;
    const BUFFERS: u64 = 0x8000;
    const OUTSIDE: u64 = 0x4000_0000;

    /// Captures what the device writes to its output.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        fn bytes(&self) -> Vec<u8> {
            lock(&self.0).clone()
        }
    }

    fn memory() -> GuestMemoryMmap {
        crate::memory::from_ranges(&[(GuestAddress(0), MEM_SIZE)], crate::memory::Tracking::Off).expect("guest memory")
    }

    fn descriptor(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    }

    /// The guest's side: two mock queues, and where its next descriptor goes in each table.
    struct Guest<'m> {
        mem: &'m GuestMemoryMmap,
        rx: MockSplitQueue<'m, GuestMemoryMmap>,
        tx: MockSplitQueue<'m, GuestMemoryMmap>,
        rx_next: u16,
        tx_next: u16,
    }

    impl<'m> Guest<'m> {
        fn new(mem: &'m GuestMemoryMmap) -> Guest<'m> {
            let rx = MockSplitQueue::create(mem, GuestAddress(RX_RING), 16);
            let tx = MockSplitQueue::create(mem, GuestAddress(TX_RING), 16);
            Guest { mem, rx, tx, rx_next: 0, tx_next: 0 }
        }

        fn queues(&self) -> Vec<Option<ActiveQueue>> {
            let active = |mock: &MockSplitQueue<'m, GuestMemoryMmap>| ActiveQueue {
                queue: mock.create_queue().expect("queue"),
                kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            };
            vec![Some(active(&self.rx)), Some(active(&self.tx))]
        }

        /// Posts `descs` as one transmit chain (the NEXT links are the caller's).
        fn transmit_chain(&mut self, descs: &[RawDescriptor]) {
            self.tx.add_desc_chains(descs, self.tx_next).expect("tx chain");
            self.tx_next += descs.len() as u16;
        }

        /// Prints `text` from a fresh buffer at `addr`.
        fn print(&mut self, addr: u64, text: &[u8]) {
            self.mem.write_slice(text, GuestAddress(addr)).expect("write text");
            self.transmit_chain(&[descriptor(addr, text.len() as u32, 0, 0)]);
        }

        fn post_receive_chain(&mut self, descs: &[RawDescriptor]) {
            self.rx.add_desc_chains(descs, self.rx_next).expect("rx chain");
            self.rx_next += descs.len() as u16;
        }

        /// Posts one writable receive buffer of `len` bytes at `addr`.
        fn post_receive(&mut self, addr: u64, len: u32) {
            self.post_receive_chain(&[descriptor(addr, len, VRING_DESC_F_WRITE, 0)]);
        }

        fn rx_used(&self) -> Vec<(u32, u32)> {
            used(&self.rx)
        }

        fn tx_used(&self) -> Vec<(u32, u32)> {
            used(&self.tx)
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut bytes = vec![0u8; len];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).expect("read back");
            bytes
        }
    }

    /// The (head, len) pairs in a used ring.
    fn used(mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let count = mock.used().idx().load();
        (0..count)
            .map(|i| {
                let elem = mock.used().ring().ref_at(usize::from(i)).expect("used entry").load();
                (elem.id(), elem.len())
            })
            .collect()
    }

    /// A device's worker, driven by hand instead of by its thread.
    struct Harness {
        worker: ConsoleWorker,
        epoll: Epoll,
        output: Capture,
        signals: Signals,
    }

    impl Harness {
        fn new(guest: &Guest<'_>) -> Harness {
            let output = Capture::default();
            let console = Console::new(Box::new(output.clone())).expect("console");
            Harness::with_console(&console, guest, output)
        }

        fn with_console(console: &Console, guest: &Guest<'_>, output: Capture) -> Harness {
            let mut queues = guest.queues().into_iter();
            let signals = Signals::standalone(2);
            let worker = ConsoleWorker {
                receive: queues.next().flatten(),
                transmit: queues.next().flatten(),
                mem: guest.mem.clone(),
                input: console.input(),
                output: Arc::clone(&console.output),
                signals: signals.clone(),
            };
            Harness { worker, epoll: Epoll::new().expect("epoll"), output, signals }
        }

        fn event(&mut self, token: u64) -> Result<(), QueueError> {
            self.worker.handle(&self.epoll, token, EventSet::IN)
        }

        fn kick_tx(&mut self) {
            self.event(TRANSMIT_KICK).expect("tx served");
        }

        fn kick_rx(&mut self) {
            self.event(RECEIVE_KICK).expect("rx served");
        }

        fn type_in(&mut self, bytes: &[u8]) {
            self.worker.input.send(bytes);
            self.event(INPUT_ARRIVED).expect("input served");
        }

        fn pending(&self) -> usize {
            lock(&self.worker.input.0.bytes).len()
        }
    }

    #[test]
    fn it_is_a_two_queue_console_with_no_features_and_a_zero_config() {
        let console = Console::new(Box::new(io::sink())).expect("console");
        assert_eq!(console.device_type(), device_type::CONSOLE);
        assert_eq!(console.queue_max_sizes().len(), 2);
        assert_eq!(console.features(), 0);
        let mut config = [0xaau8; 16];
        console.read_config(0, &mut config);
        assert_eq!(config, [0; 16]);
        console.read_config(u64::MAX, &mut config[..3]);
        assert_eq!(config[..3], [0; 3]);
    }

    #[test]
    fn output_arrives_in_order_and_buffers_come_back_empty() {
        let mem = memory();
        let mut guest = Guest::new(&mem);
        let mut harness = Harness::new(&guest);
        guest.print(BUFFERS, b"hello ");
        guest.print(BUFFERS + 0x100, b"world");
        harness.kick_tx();
        guest.print(BUFFERS + 0x200, b"\r\n$ ");
        harness.kick_tx();
        assert_eq!(harness.output.bytes(), b"hello world\r\n$ ");
        assert_eq!(guest.tx_used(), [(0, 0), (1, 0), (2, 0)]);
        assert!(harness.signals.take_queue_interrupts(TRANSMIT) > 0);
    }

    #[test]
    fn a_chain_of_several_descriptors_prints_them_in_order() {
        let mem = memory();
        let mut guest = Guest::new(&mem);
        let mut harness = Harness::new(&guest);
        mem.write_slice(b"abc", GuestAddress(BUFFERS)).expect("write");
        mem.write_slice(b"def", GuestAddress(BUFFERS + 0x100)).expect("write");
        guest.transmit_chain(&[descriptor(BUFFERS, 3, VRING_DESC_F_NEXT, 1), descriptor(BUFFERS + 0x100, 3, 0, 0)]);
        harness.kick_tx();
        assert_eq!(harness.output.bytes(), b"abcdef");
        assert_eq!(guest.tx_used(), [(0, 0)]);
    }

    #[test]
    fn input_lands_in_the_guests_receive_buffers() {
        let mem = memory();
        let mut guest = Guest::new(&mem);
        let mut harness = Harness::new(&guest);
        guest.post_receive(BUFFERS, 64);
        harness.kick_rx();
        assert!(guest.rx_used().is_empty(), "no input yet: the buffer stays with us");
        harness.type_in(b"ls -l\r");
        assert_eq!(guest.rx_used(), [(0, 6)]);
        assert_eq!(guest.read(BUFFERS, 6), b"ls -l\r");
        assert_eq!(harness.pending(), 0);
        assert!(harness.signals.take_queue_interrupts(RECEIVE) > 0);
    }

    #[test]
    fn input_larger_than_a_buffer_spreads_over_several() {
        let mem = memory();
        let mut guest = Guest::new(&mem);
        let mut harness = Harness::new(&guest);
        guest.post_receive(BUFFERS, 4);
        guest.post_receive(BUFFERS + 0x100, 4);
        harness.type_in(b"abcdefghij");
        assert_eq!(guest.rx_used(), [(0, 4), (1, 4)]);
        assert_eq!(guest.read(BUFFERS, 4), b"abcd");
        assert_eq!(guest.read(BUFFERS + 0x100, 4), b"efgh");
        assert_eq!(harness.pending(), 2, "the rest waits for the next buffer");
        guest.post_receive(BUFFERS + 0x200, 64);
        harness.kick_rx();
        assert_eq!(guest.read(BUFFERS + 0x200, 2), b"ij");
        assert_eq!(guest.rx_used()[2], (2, 2));
    }

    #[test]
    fn input_with_no_buffers_is_held_until_buffers_arrive() {
        let mem = memory();
        let mut guest = Guest::new(&mem);
        let mut harness = Harness::new(&guest);
        harness.type_in(b"echo ");
        harness.type_in(b"hi\r");
        assert_eq!(harness.pending(), 8);
        guest.post_receive(BUFFERS, 64);
        harness.kick_rx();
        assert_eq!(guest.rx_used(), [(0, 8)]);
        assert_eq!(guest.read(BUFFERS, 8), b"echo hi\r");
    }

    #[test]
    fn input_is_bounded_while_the_guest_reads_nothing() {
        let mem = memory();
        let mut guest = Guest::new(&mem);
        let mut harness = Harness::new(&guest);
        let input = harness.worker.input.clone();
        assert_eq!(input.send(&vec![b'a'; INPUT_LIMIT - 10]), INPUT_LIMIT - 10);
        assert_eq!(input.send(&[b'b'; 100]), 10, "only what fits under the limit is kept");
        assert_eq!(input.send(b"c"), 0);
        assert_eq!(harness.pending(), INPUT_LIMIT);
        guest.post_receive(BUFFERS, INPUT_LIMIT as u32);
        harness.kick_rx();
        assert_eq!(guest.rx_used(), [(0, INPUT_LIMIT as u32)]);
        assert_eq!(guest.read(BUFFERS + INPUT_LIMIT as u64 - 11, 11), b"abbbbbbbbbb");
        assert_eq!(input.send(b"d"), 1, "room again once the guest has read");
    }

    #[test]
    fn a_write_only_transmit_descriptor_is_not_printed() {
        let mem = memory();
        let mut guest = Guest::new(&mem);
        let mut harness = Harness::new(&guest);
        mem.write_slice(b"secret", GuestAddress(BUFFERS)).expect("write");
        guest.transmit_chain(&[descriptor(BUFFERS, 6, VRING_DESC_F_WRITE, 0)]);
        guest.print(BUFFERS + 0x100, b"ok");
        harness.kick_tx();
        assert_eq!(harness.output.bytes(), b"ok");
        assert_eq!(guest.tx_used(), [(0, 0), (1, 0)]);
    }

    #[test]
    fn a_transmit_buffer_outside_memory_fails_alone() {
        let mem = memory();
        let mut guest = Guest::new(&mem);
        let mut harness = Harness::new(&guest);
        guest.transmit_chain(&[descriptor(OUTSIDE, 16, 0, 0)]);
        guest.transmit_chain(&[descriptor(MEM_SIZE as u64 - 4, 16, 0, 0)]);
        guest.transmit_chain(&[descriptor(u64::MAX - 2, u32::MAX, 0, 0)]);
        guest.print(BUFFERS, b"still here");
        harness.kick_tx();
        assert_eq!(harness.output.bytes(), b"still here");
        assert_eq!(guest.tx_used(), [(0, 0), (1, 0), (2, 0), (3, 0)]);
        assert!(!harness.signals.is_broken());
    }

    #[test]
    fn a_read_only_or_outside_receive_buffer_comes_back_empty_and_input_waits() {
        let mem = memory();
        let mut guest = Guest::new(&mem);
        let mut harness = Harness::new(&guest);
        guest.post_receive_chain(&[descriptor(BUFFERS, 64, 0, 0)]);
        guest.post_receive(OUTSIDE, 64);
        guest.post_receive(BUFFERS + 0x100, 64);
        harness.type_in(b"x");
        assert_eq!(guest.rx_used(), [(0, 0), (1, 0), (2, 1)]);
        assert_eq!(guest.read(BUFFERS, 1), [0], "the read-only buffer was not written");
        assert_eq!(guest.read(BUFFERS + 0x100, 1), b"x");
    }

    #[test]
    fn a_looping_chain_ends_and_the_device_keeps_serving() {
        let mem = memory();
        let mut guest = Guest::new(&mem);
        let mut harness = Harness::new(&guest);
        mem.write_slice(b"ab", GuestAddress(BUFFERS)).expect("write");
        // Two descriptors pointing at each other: the walk stops at the queue size.
        guest.tx.desc_table().store(0, descriptor(BUFFERS, 1, VRING_DESC_F_NEXT, 1)).expect("desc");
        guest.tx.desc_table().store(1, descriptor(BUFFERS + 1, 1, VRING_DESC_F_NEXT, 0)).expect("desc");
        guest.tx.avail().ring().ref_at(0).expect("avail").store(0);
        guest.tx.avail().idx().store(1);
        guest.tx_next = 2;
        harness.kick_tx();
        assert!(harness.output.bytes().len() <= 16, "bounded by the queue size");
        assert_eq!(guest.tx_used(), [(0, 0)]);
        harness.output.0.lock().expect("capture").clear();
        guest.print(BUFFERS + 0x100, b"next");
        harness.kick_tx();
        assert_eq!(harness.output.bytes(), b"next");
    }

    #[test]
    fn a_head_index_past_the_queue_is_dropped_not_returned() {
        let mem = memory();
        let mut guest = Guest::new(&mem);
        let mut harness = Harness::new(&guest);
        guest.tx.avail().ring().ref_at(0).expect("avail").store(999);
        guest.tx.avail().idx().store(1);
        harness.kick_tx();
        assert!(guest.tx_used().is_empty());
        guest.print(BUFFERS, b"fine");
        harness.kick_tx();
        assert_eq!(harness.output.bytes(), b"fine");
        assert!(!harness.signals.is_broken());
    }

    #[test]
    fn an_available_index_running_ahead_of_the_ring_breaks_the_queue() {
        let mem = memory();
        let guest = Guest::new(&mem);
        let mut harness = Harness::new(&guest);
        guest.tx.avail().idx().store(1000);
        assert!(harness.event(TRANSMIT_KICK).is_err());
    }

    #[test]
    fn a_disabled_queue_is_harmless() {
        let mem = memory();
        let guest = Guest::new(&mem);
        let mut harness = Harness::new(&guest);
        harness.worker.receive = None;
        harness.worker.transmit = None;
        harness.type_in(b"nobody listens");
        harness.event(TRANSMIT_KICK).expect("nothing to do");
        harness.event(RECEIVE_KICK).expect("nothing to do");
        assert_eq!(harness.pending(), 14);
    }


    fn activation(guest: &Guest<'_>, signals: &Signals) -> (Activation, EventFd, EventFd) {
        let queues = guest.queues();
        let rx_kick = queues[RECEIVE].as_ref().expect("rx").kick.try_clone().expect("clone");
        let tx_kick = queues[TRANSMIT].as_ref().expect("tx").kick.try_clone().expect("clone");
        let activation = Activation { mem: guest.mem.clone(), queues, features: 0, signals: signals.clone() };
        (activation, rx_kick, tx_kick)
    }

    #[test]
    fn the_worker_thread_serves_both_queues_and_survives_reset_and_reactivation() {
        let mem = memory();
        let mut guest = Guest::new(&mem);
        let output = Capture::default();
        let mut console = Console::new(Box::new(output.clone())).expect("console");
        let input = console.input();
        input.send(b"early");
        let signals = Signals::standalone(2);
        let (first, rx_kick, tx_kick) = activation(&guest, &signals);
        console.activate(first).expect("activate");

        guest.post_receive(BUFFERS, 64);
        rx_kick.write(1).expect("kick");
        wait_until(|| guest.rx_used().len() == 1);
        assert_eq!(guest.read(BUFFERS, 5), b"early", "input typed before activation arrives");
        guest.print(BUFFERS + 0x100, b"one");
        tx_kick.write(1).expect("kick");
        wait_until(|| output.bytes() == b"one");

        console.reset();
        console.reset();
        input.send(b"between");

        // The driver starts again on fresh rings.
        let mem = memory();
        let mut guest = Guest::new(&mem);
        let (second, rx_kick, tx_kick) = activation(&guest, &signals);
        console.activate(second).expect("reactivate");
        guest.print(BUFFERS, b" two");
        tx_kick.write(1).expect("kick");
        wait_until(|| output.bytes() == b"one two");
        guest.post_receive(BUFFERS + 0x100, 64);
        rx_kick.write(1).expect("kick");
        wait_until(|| guest.rx_used().len() == 1);
        assert_eq!(guest.read(BUFFERS + 0x100, 7), b"between");
        console.reset();
        assert!(!signals.is_broken());
    }
}
