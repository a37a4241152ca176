//! virtio-vsock's tests: the worker driven by hand against real Unix sockets, a hostile
//! driver's chains, the event queue, and the device on its thread across a reset.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use crate::memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::MAX_CONNECTIONS;
use super::packet::{Header, Op, HEADER_LEN, HOST_CID, TYPE_STREAM};
use super::worker::EVENT_TRANSPORT_RESET;
use super::*;
use crate::virtio::ring_driver::{RingDriver, WRITE};
use crate::virtio::worker::DeviceWorker;
use crate::virtio::{wait_until, ActiveQueue, DeviceState, Signals, VirtioDevice};

const MEM_SIZE: usize = 0x100_0000;
const GUEST: u64 = 3;
const HDR: u32 = HEADER_LEN as u32;

fn memory() -> GuestMemoryMmap {
    crate::memory::from_ranges(&[(GuestAddress(0), MEM_SIZE)], crate::memory::Tracking::Off).expect("guest memory")
}

impl RingDriver {
    /// A packet as Linux sends it: the header in one buffer, the payload (if any) in the next.
    fn post_packet(&mut self, header: &Header, payload: &[u8]) -> u16 {
        let header = header.to_bytes();
        if payload.is_empty() {
            return self.post_readable(&[&header]);
        }
        self.post_readable(&[&header, payload])
    }
}

/// A header from the guest's `guest_port` to the host's `host_port`.
fn from_guest(op: Op, guest_port: u32, host_port: u32, len: u32) -> Header {
    Header {
        src_cid: GUEST,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len,
        kind: TYPE_STREAM,
        op: op as u16,
        buf_alloc: 1 << 20,
        ..Header::default()
    }
}

/// A worker driven by hand on this thread, its muxer listening in a directory of the test's.
struct Bench {
    dir: tempfile::TempDir,
    rx: RingDriver,
    tx: RingDriver,
    event: RingDriver,
    /// Receive buffers posted, in order, not yet looked at by [`Bench::received`].
    rx_buffers: std::collections::VecDeque<u64>,
    worker: VsockWorker,
    epoll: Epoll,
    signals: Signals,
}

impl Bench {
    fn new() -> Bench {
        let dir = tempfile::tempdir().expect("tempdir");
        let muxer = Muxer::new(GUEST, &dir.path().join("v.sock")).expect("muxer");
        let mem = memory();
        let (rx, rx_queue) = RingDriver::new(&mem, QUEUE_SIZE, 0, 0x10_0000);
        let (tx, tx_queue) = RingDriver::new(&mem, QUEUE_SIZE, 0x1_0000, 0x80_0000);
        let (event, event_queue) = RingDriver::new(&mem, QUEUE_SIZE, 0x2_0000, 0xf0_0000);
        let active = |queue| ActiveQueue { queue, kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd") };
        let signals = Signals::standalone(3);
        let mut worker = VsockWorker::new(mem, [active(rx_queue), active(tx_queue), active(event_queue)], muxer, signals.clone());
        let epoll = Epoll::new().expect("epoll");
        worker.register(&epoll).expect("register");
        Bench { dir, rx, tx, event, rx_buffers: Default::default(), worker, epoll, signals }
    }

    fn handle(&mut self, token: u64) -> Result<(), VsockError> {
        self.worker.handle(&self.epoll, token, EventSet::IN)
    }

    fn send(&mut self, header: &Header, payload: &[u8]) {
        self.tx.post_packet(header, payload);
        self.handle(TX_KICK).expect("transmit");
    }

    fn post_rx(&mut self, count: usize, len: u32) {
        for _ in 0..count {
            let (_, at) = self.rx.post_writable(len);
            self.rx_buffers.push_back(at);
        }
        self.handle(RX_KICK).expect("receive");
    }

    /// The packets delivered into receive buffers since the last call.
    fn received(&mut self, seen: &mut usize) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx.used();
        let mut packets = Vec::new();
        for &(_, len) in &used[*seen..] {
            let at = self.rx_buffers.pop_front().expect("a posted buffer");
            if len == 0 {
                continue;
            }
            let bytes = self.rx.read(at, len as usize);
            let header = Header::from_bytes(bytes[..HEADER_LEN].try_into().expect("a header"));
            assert_eq!(header.len as usize, bytes.len() - HEADER_LEN, "the used length is the packet's");
            packets.push((header, bytes[HEADER_LEN..].to_vec()));
        }
        *seen = used.len();
        packets
    }

    /// Fills an event buffer with something other than the event we expect in it.
    fn mem_poison(&self, at: u64) {
        self.event.mem.write_slice(&[0xff; 4], GuestAddress(at)).expect("poison");
    }

    fn host_listener(&self, port: u32) -> UnixListener {
        super::muxer::tests::host_listener(self.dir.path(), port)
    }

    fn host_connect(&self) -> UnixStream {
        super::muxer::tests::host_connect(self.dir.path())
    }
}

fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
    packets.iter().map(|(h, _)| h.op).collect()
}

#[test]
fn a_guest_connection_reaches_a_host_program_and_data_flows_both_ways() {
    let mut b = Bench::new();
    let listener = b.host_listener(52);
    let mut seen = 0;
    b.post_rx(8, 4096);
    b.send(&from_guest(Op::Request, 1000, 52, 0), b"");
    let answer = b.received(&mut seen);
    assert_eq!(ops(&answer), [Op::Response as u16]);
    assert_eq!((answer[0].0.src_cid, answer[0].0.dst_cid, answer[0].0.src_port), (HOST_CID, GUEST, 52));
    assert!(b.signals.take_queue_interrupts(RX) >= 1);
    let (mut host, _) = listener.accept().expect("accept");
    b.send(&from_guest(Op::Rw, 1000, 52, 5), b"hello");
    let mut got = [0u8; 5];
    host.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"hello");
    assert_eq!(b.tx.used().len(), 2, "every transmit chain comes back");
    assert!(b.signals.take_queue_interrupts(TX) >= 1);
    host.write_all(b"world").expect("write");
    b.handle(MUXER).expect("host events");
    let packets = b.received(&mut seen);
    assert_eq!(ops(&packets), [Op::Rw as u16]);
    assert_eq!(packets[0].1, b"world");
}

#[test]
fn a_host_program_reaches_a_guest_listener_with_connect_and_ok() {
    let mut b = Bench::new();
    let mut seen = 0;
    b.post_rx(4, 4096);
    let mut host = b.host_connect();
    host.write_all(b"CONNECT 1234\n").expect("connect line");
    b.handle(MUXER).expect("accept");
    b.handle(MUXER).expect("the line");
    let request = b.received(&mut seen);
    assert_eq!(ops(&request), [Op::Request as u16]);
    let host_port = request[0].0.src_port;
    assert_eq!(request[0].0.dst_port, 1234);
    b.send(&from_guest(Op::Response, 1234, host_port, 0), b"");
    let mut line = vec![0u8; format!("OK {host_port}\n").len()];
    host.read_exact(&mut line).expect("ok line");
    assert_eq!(line, format!("OK {host_port}\n").as_bytes());
}

#[test]
fn packets_wait_in_the_muxer_until_the_guest_posts_room() {
    let mut b = Bench::new();
    let mut seen = 0;
    b.send(&from_guest(Op::Request, 1000, 99, 0), b""); // nobody listens: RST owed
    assert!(b.rx.used().is_empty());
    // A buffer too small for a header goes back empty; the RST waits for the next one.
    b.post_rx(1, HDR - 1);
    assert_eq!(b.rx.used(), [(0, 0)]);
    b.post_rx(1, HDR);
    assert_eq!(ops(&b.received(&mut seen)), [Op::Rst as u16]);
}

#[test]
fn data_is_cut_to_the_room_of_each_receive_buffer() {
    let mut b = Bench::new();
    let listener = b.host_listener(52);
    let mut seen = 0;
    b.post_rx(1, 4096);
    b.send(&from_guest(Op::Request, 1000, 52, 0), b"");
    let _ = b.received(&mut seen);
    let (mut host, _) = listener.accept().expect("accept");
    let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    host.write_all(&data).expect("write");
    b.post_rx(3, HDR + 100);
    b.handle(MUXER).expect("host events");
    let packets = b.received(&mut seen);
    assert_eq!(packets.iter().map(|p| p.1.len()).collect::<Vec<_>>(), [100, 100, 100]);
    assert_eq!(packets.iter().flat_map(|p| p.1.clone()).collect::<Vec<_>>(), data);
}

#[test]
fn hostile_transmit_chains_are_returned_and_the_device_carries_on() {
    let mut b = Bench::new();
    let mut seen = 0;
    b.post_rx(16, 4096);
    let at = b.tx.buffer(64);
    b.tx.post_descriptors(&[(at, HDR - 1, 0, None)]); // too short for a header
    b.tx.post_descriptors(&[(0xfff_0000_0000, HDR, 0, None)]); // outside memory
    b.tx.post_descriptors(&[(at, HDR, WRITE, None)]); // write-only
    b.handle(TX_KICK).expect("the device survives");
    assert_eq!(b.tx.used().len(), 3);
    assert!(b.received(&mut seen).is_empty(), "nothing to answer");
    // Lies in headers: a length beyond the chain, beyond 64 KiB, an unknown op: RST.
    b.tx.post_packet(&from_guest(Op::Rw, 1000, 52, 10), b"short");
    b.tx.post_packet(&from_guest(Op::Rw, 1001, 52, u32::MAX), b"x");
    b.tx.post_packet(&Header { op: 99, ..from_guest(Op::Rw, 1002, 52, 0) }, b"");
    // A forged source: dropped without a word.
    b.tx.post_packet(&Header { src_cid: 77, ..from_guest(Op::Request, 1003, 52, 0) }, b"");
    b.handle(TX_KICK).expect("the device survives");
    assert_eq!(b.tx.used().len(), 7);
    let answers = b.received(&mut seen);
    assert_eq!(ops(&answers), [Op::Rst as u16; 3]);
    assert_eq!(answers.iter().map(|p| p.0.dst_port).collect::<Vec<_>>(), [1000, 1001, 1002]);
    assert!(!b.signals.is_broken());
}

#[test]
fn thousands_of_connection_requests_stay_within_the_limit() {
    let mut b = Bench::new();
    let _listener = b.host_listener(52);
    for round in 0..12u32 {
        for port in 0..200 {
            b.tx.post_packet(&from_guest(Op::Request, round * 1000 + port, 52, 0), b"");
        }
        // The ring is 256 long: serve each round before the next.
        while b.tx.used().len() < ((round + 1) * 200) as usize {
            b.handle(TX_KICK).expect("transmit");
        }
    }
    assert_eq!(b.worker.connection_count(), MAX_CONNECTIONS);
}

#[test]
fn a_ring_that_cannot_be_walked_breaks_the_device() {
    let mut b = Bench::new();
    b.tx.set_avail_idx(QUEUE_SIZE + 5); // further ahead than the ring is long
    assert!(matches!(b.handle(TX_KICK), Err(VsockError::Queue { queue: "transmit", .. })));
}

#[test]
fn a_transport_reset_closes_every_stream_and_tells_the_guest() {
    let mut b = Bench::new();
    let listener = b.host_listener(52);
    let mut seen = 0;
    b.post_rx(4, 4096);
    b.send(&from_guest(Op::Request, 1000, 52, 0), b"");
    let _ = b.received(&mut seen);
    let (mut host, _) = listener.accept().expect("accept");
    assert!(!b.worker.transport_reset().expect("reset"), "no event buffer posted: not told");
    let mut byte = [0u8; 1];
    assert_eq!(host.read(&mut byte).expect("eof"), 0, "the host program sees its socket close");

    let unfit = b.event.buffer(2);
    b.event.post_descriptors(&[(unfit, 2, WRITE, None)]);
    let at = b.event.buffer(4);
    b.mem_poison(at);
    b.event.post_descriptors(&[(at, 4, WRITE, None)]);
    b.handle(EVENT_KICK).expect("event buffers wait");
    assert!(b.event.used().is_empty(), "kept until there is an event");
    assert!(b.worker.transport_reset().expect("reset"));
    assert_eq!(b.event.used(), [(0, 0), (1, 4)], "a buffer too small for the event goes back empty");
    assert_eq!(b.event.read(at, 4), EVENT_TRANSPORT_RESET.to_le_bytes());
    assert_eq!(b.signals.take_queue_interrupts(EVENT), 1);
    assert_eq!(b.worker.connection_count(), 0);
}

#[test]
fn the_device_keeps_its_socket_across_resets_and_serves_on_its_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.sock");
    let mut device = Vsock::new(GUEST, &path).expect("device");
    let mut cid = [0u8; 8];
    device.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST);
    assert_eq!(device.features(), 0, "streams only: no SEQPACKET");

    for _ in 0..2 {
        let mem = memory();
        let (mut rx, rx_queue) = RingDriver::new(&mem, QUEUE_SIZE, 0, 0x10_0000);
        let (_, tx_queue) = RingDriver::new(&mem, QUEUE_SIZE, 0x1_0000, 0x80_0000);
        let (_, event_queue) = RingDriver::new(&mem, QUEUE_SIZE, 0x2_0000, 0xf0_0000);
        let kicks: Vec<EventFd> = (0..3).map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")).collect();
        let queues = [rx_queue, tx_queue, event_queue]
            .into_iter()
            .zip(&kicks)
            .map(|(queue, kick)| Some(ActiveQueue { queue, kick: kick.try_clone().expect("clone") }))
            .collect();
        let signals = Signals::standalone(3);
        let features = feature::VERSION_1;
        device.activate(Activation { mem, queues, features, signals: signals.clone() }).expect("activate");
        rx.post_writable(4096);
        kicks[RX].write(1).expect("kick");
        let mut host = UnixStream::connect(&path).expect("the same socket, every activation");
        host.write_all(b"CONNECT 5\n").expect("connect line");
        wait_until(|| rx.used().len() == 1);
        device.reset();
        let mut byte = [0u8; 1];
        host.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        assert_eq!(host.read(&mut byte).unwrap_or(0), 0, "a reset closes the streams");
        assert_eq!(device.idle_connection_count(), Some(0));
        assert!(!signals.is_broken());
    }
    drop(device);
    assert!(!path.exists(), "the socket goes with the device");
}

#[test]
fn a_refused_activation_keeps_the_muxer_for_the_next() {
    let dir = tempfile::tempdir().expect("tempdir");
    let device = Vsock::new(GUEST, &dir.path().join("v.sock")).expect("device");
    let activation = Activation { mem: memory(), queues: vec![None, None, None], features: feature::VERSION_1, signals: Signals::standalone(3) };
    assert!(matches!(device.handler(activation), Err(ActivateError::QueueNotEnabled(_))));
    assert_eq!(device.idle_connection_count(), Some(0), "still here");
}

#[test]
fn a_restored_device_tells_its_guest_at_activation_that_its_connections_are_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut device = Vsock::new(GUEST, &dir.path().join("v.sock")).expect("device");
    let other = DeviceState::Vsock { cid: GUEST + 1 };
    assert!(Device::restore_state(&mut device, &other).is_err(), "a guest saved with another CID");
    let saved = Device::save_state(&device);
    assert_eq!(saved, DeviceState::Vsock { cid: GUEST });
    Device::restore_state(&mut device, &saved).expect("restored");

    let mem = memory();
    let (rx, rx_queue) = RingDriver::new(&mem, QUEUE_SIZE, 0, 0x10_0000);
    let (_tx, tx_queue) = RingDriver::new(&mem, QUEUE_SIZE, 0x1_0000, 0x80_0000);
    let (mut event, event_queue) = RingDriver::new(&mem, QUEUE_SIZE, 0x2_0000, 0xf0_0000);
    let at = event.buffer(4);
    event.post_descriptors(&[(at, 4, WRITE, None)]); // the event buffer the restored driver had posted
    let active = |queue| Some(ActiveQueue { queue, kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd") });
    let queues = vec![active(rx_queue), active(tx_queue), active(event_queue)];
    let activation = Activation { mem: mem.clone(), queues, features: feature::VERSION_1, signals: Signals::standalone(3) };
    let _worker = device.handler(activation).expect("activated");
    assert_eq!(event.used(), [(0, 4)]);
    assert_eq!(event.read(at, 4), EVENT_TRANSPORT_RESET.to_le_bytes());
    assert!(rx.used().is_empty());
}
