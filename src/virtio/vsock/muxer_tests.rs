//! The muxer against real Unix sockets: host programs on one side, a guest played by the test
//! on the other.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use super::*;
use crate::virtio::vsock::connection::BUF_ALLOC;
use crate::virtio::vsock::packet::{HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

const GUEST: u64 = 3;

struct Setup {
    dir: tempfile::TempDir,
    muxer: Muxer,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let muxer = Muxer::new(GUEST, &dir.path().join("v.sock")).expect("muxer");
    Setup { dir, muxer }
}

/// A host program listening for the guest's connections to host port `port`, beside the
/// muxer's `dir/v.sock` (also used by the device's tests).
pub(in crate::virtio::vsock) fn host_listener(dir: &std::path::Path, port: u32) -> UnixListener {
    UnixListener::bind(dir.join(format!("v.sock_{port}"))).expect("bind")
}

/// A host program connected to the muxer's `dir/v.sock`, reads bounded by 5 s.
pub(in crate::virtio::vsock) fn host_connect(dir: &std::path::Path) -> UnixStream {
    let stream = UnixStream::connect(dir.join("v.sock")).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    stream
}

impl Setup {
    fn host_listener(&self, port: u32) -> UnixListener {
        host_listener(self.dir.path(), port)
    }

    fn host_connect(&self) -> UnixStream {
        host_connect(self.dir.path())
    }

    /// The guest sends a packet on (guest port, host port).
    fn guest_sends(&mut self, op: Op, guest_port: u32, host_port: u32, payload: &[u8]) -> Result<(), BadPacket> {
        let header = Header { len: payload.len() as u32, buf_alloc: 1 << 20, ..packet(op, guest_port, host_port) };
        self.muxer.from_guest(&header, payload)
    }

    /// A guest connection from port 1000 to host port `port`, accepted by a host program:
    /// its listener (kept open) and its end of the stream.
    fn guest_connected_to_host_program(&mut self, port: u32) -> (UnixListener, UnixStream) {
        let listener = self.host_listener(port);
        self.guest_sends(Op::Request, 1000, port, b"").expect("request");
        let _ = self.guest_receives();
        let (host, _) = listener.accept().expect("accept");
        (listener, host)
    }

    /// Every packet the muxer has for the guest now (after looking at the host side).
    fn guest_receives(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut packets = Vec::new();
        for _ in 0..50 {
            self.muxer.process_host_events();
            let mut buf = vec![0u8; 4096];
            while let Some((header, len)) = self.muxer.next_for_guest(&mut buf) {
                packets.push((header, buf[..len].to_vec()));
            }
            if !packets.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        packets
    }
}

/// A header from the guest on (guest port, host port), with no credit and no payload.
fn packet(op: Op, guest_port: u32, host_port: u32) -> Header {
    Header { src_cid: GUEST, dst_cid: HOST_CID, src_port: guest_port, dst_port: host_port, kind: TYPE_STREAM, op: op as u16, ..Header::default() }
}

fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
    packets.iter().map(|(h, _)| h.op).collect()
}

#[test]
fn a_guest_connects_to_a_host_program_and_they_talk() {
    let mut s = setup();
    let listener = s.host_listener(52);
    s.guest_sends(Op::Request, 1000, 52, b"").expect("request");
    let answer = s.guest_receives();
    assert_eq!(ops(&answer), [Op::Response as u16]);
    assert_eq!((answer[0].0.src_port, answer[0].0.dst_port, answer[0].0.dst_cid), (52, 1000, GUEST));
    let (mut host, _) = listener.accept().expect("accept");
    s.guest_sends(Op::Rw, 1000, 52, b"ping").expect("rw");
    let mut got = [0u8; 4];
    host.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"ping");
    host.write_all(b"pong").expect("write");
    let packets = s.guest_receives();
    assert_eq!(ops(&packets), [Op::Rw as u16]);
    assert_eq!(packets[0].1, b"pong");
    assert_eq!(s.muxer.connection_count(), 1);
}

#[test]
fn a_guest_connecting_to_a_closed_port_gets_rst() {
    let mut s = setup();
    s.guest_sends(Op::Request, 1000, 99, b"").expect("request");
    let answer = s.guest_receives();
    assert_eq!(ops(&answer), [Op::Rst as u16]);
    assert_eq!(s.muxer.connection_count(), 0);
}

#[test]
fn a_host_program_connects_with_connect_and_hears_ok() {
    let mut s = setup();
    let mut host = s.host_connect();
    host.write_all(b"CONNECT 52\n").expect("connect line");
    let request = s.guest_receives();
    assert_eq!(ops(&request), [Op::Request as u16]);
    let (header, _) = &request[0];
    assert_eq!(header.dst_port, 52);
    assert!(header.src_port >= 1 << 30, "a host port far from the listening ones");
    let host_port = header.src_port;
    s.guest_sends(Op::Response, 52, host_port, b"").expect("response");
    let mut line = vec![0u8; format!("OK {host_port}\n").len()];
    host.read_exact(&mut line).expect("ok line");
    assert_eq!(line, format!("OK {host_port}\n").as_bytes());
    host.write_all(b"hello guest").expect("write");
    let packets = s.guest_receives();
    assert_eq!(packets.last().map(|p| p.1.clone()), Some(b"hello guest".to_vec()));
    assert_eq!(packets[0].0.fwd_cnt, 0, "the OK line is ours, not the guest's bytes");
    s.guest_sends(Op::Rw, 52, host_port, b"hello host").expect("rw");
    let mut got = [0u8; 10];
    host.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"hello host");
}

#[test]
fn bytes_after_the_connect_line_belong_to_the_stream() {
    let mut s = setup();
    let mut host = s.host_connect();
    host.write_all(b"CONNECT 7\nearly bytes").expect("write");
    let request = s.guest_receives();
    let host_port = request[0].0.src_port;
    s.guest_sends(Op::Response, 7, host_port, b"").expect("response");
    let packets = s.guest_receives();
    let data: Vec<u8> = packets.iter().filter(|(h, _)| h.op == Op::Rw as u16).flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(data, b"early bytes");
}

#[test]
fn a_guest_that_refuses_closes_the_host_programs_socket() {
    let mut s = setup();
    let mut host = s.host_connect();
    host.write_all(b"CONNECT 52\n").expect("connect line");
    let host_port = s.guest_receives()[0].0.src_port;
    s.guest_sends(Op::Rst, 52, host_port, b"").expect("rst");
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).expect("eof"), 0);
    assert_eq!(s.muxer.connection_count(), 0);
}

#[test]
fn bad_connect_lines_are_closed_without_troubling_the_guest() {
    let mut s = setup();
    for line in [&b"HELLO 52\n"[..], b"CONNECT x\n", b"CONNECT 99999999999\n", &[b'C'; 100]] {
        let mut host = s.host_connect();
        host.write_all(line).expect("write");
        assert!(s.guest_receives().is_empty(), "{:?}", String::from_utf8_lossy(line));
        let mut buf = [0u8; 8];
        assert_eq!(host.read(&mut buf).unwrap_or(0), 0, "closed");
    }
    assert_eq!(s.muxer.handshakes.len(), 0);
}

#[test]
fn silent_host_programs_are_bounded() {
    let mut s = setup();
    let silent: Vec<UnixStream> = (0..MAX_HANDSHAKES + 10).map(|_| s.host_connect()).collect();
    s.muxer.process_host_events();
    s.muxer.process_host_events();
    assert_eq!(s.muxer.handshakes.len(), MAX_HANDSHAKES);
    drop(silent);
}

#[test]
fn streams_beyond_the_limit_get_rst() {
    let mut s = setup();
    let listener = s.host_listener(52);
    for port in 0..MAX_CONNECTIONS as u32 {
        s.guest_sends(Op::Request, 2000 + port, 52, b"").expect("request");
    }
    assert_eq!(s.muxer.connection_count(), MAX_CONNECTIONS);
    let _ = s.guest_receives();
    s.guest_sends(Op::Request, 1, 52, b"").expect("request");
    assert_eq!(ops(&s.guest_receives()), [Op::Rst as u16]);
    drop(listener);
}

#[test]
fn hostile_packets_get_rst_or_nothing() {
    let mut s = setup();
    // Data, credit and shutdowns for streams that don't exist: RST.
    for op in [Op::Rw, Op::Response, Op::CreditUpdate, Op::CreditRequest, Op::Shutdown] {
        s.guest_sends(op, 1000, 52, if op == Op::Rw { b"x" } else { b"" }).expect("well-formed");
        assert_eq!(ops(&s.guest_receives()), [Op::Rst as u16], "{op:?}");
    }
    // An RST for nothing is not answered (or two sides would reset each other forever).
    s.guest_sends(Op::Rst, 1000, 52, b"").expect("rst");
    assert!(s.guest_receives().is_empty());
    // A forged source is dropped silently; an unknown op is reset.
    let forged = Header { src_cid: 9, dst_cid: HOST_CID, kind: TYPE_STREAM, op: Op::Request as u16, ..Header::default() };
    assert_eq!(s.muxer.from_guest(&forged, b""), Err(BadPacket::WrongSource(9)));
    assert!(s.guest_receives().is_empty());
    let unknown = Header { src_cid: GUEST, dst_cid: HOST_CID, kind: TYPE_STREAM, op: 77, ..Header::default() };
    assert_eq!(s.muxer.from_guest(&unknown, b""), Err(BadPacket::UnknownOp(77)));
    assert_eq!(ops(&s.guest_receives()), [Op::Rst as u16]);
}

#[test]
fn resets_owed_to_a_guest_that_never_reads_are_bounded() {
    let mut s = setup();
    for port in 0..(MAX_RESETS as u32 + 500) {
        s.guest_sends(Op::Rw, port, 52, b"x").expect("well-formed");
    }
    assert_eq!(s.muxer.resets.len(), MAX_RESETS);
}

#[test]
fn data_beyond_the_credit_resets_the_stream() {
    let mut s = setup();
    let (_listener, _host) = s.guest_connected_to_host_program(52); // a host program that never reads
    let chunk = vec![1u8; 64 << 10];
    // The host socket's own buffer takes some; then our credit runs out and the guest, which
    // ignores that, is reset. What we hold never outgrows the credit we gave.
    let mut sent = 0;
    while s.muxer.connection_count() == 1 && sent < 64 {
        s.guest_sends(Op::Rw, 1000, 52, &chunk).expect("well-formed");
        let held = s.muxer.connections.values().map(|c| c.rx_cnt_unforwarded()).max().unwrap_or(0);
        assert!(held <= BUF_ALLOC, "{held} bytes held");
        sent += 1;
    }
    assert_eq!(s.muxer.connection_count(), 0, "reset after {sent} chunks");
    assert!(ops(&s.guest_receives()).contains(&(Op::Rst as u16)));
}

#[test]
fn a_full_shutdown_ends_the_stream_with_rst() {
    let mut s = setup();
    let (_listener, mut host) = s.guest_connected_to_host_program(52);
    let header = Header { flags: SHUTDOWN_RCV | SHUTDOWN_SEND, ..packet(Op::Shutdown, 1000, 52) };
    s.muxer.from_guest(&header, b"").expect("shutdown");
    assert_eq!(ops(&s.guest_receives()), [Op::Rst as u16]);
    let mut buf = [0u8; 1];
    assert_eq!(host.read(&mut buf).expect("eof"), 0);
}

#[test]
fn a_guest_that_closes_with_bytes_still_owed_to_the_host_has_them_delivered_first() {
    let mut s = setup();
    let (_listener, mut host) = s.guest_connected_to_host_program(52);
    let chunk = vec![9u8; 64 << 10];
    let mut sent = 0;
    while !s.muxer.connections.values().any(|c| c.wants_to_write()) {
        s.guest_sends(Op::Rw, 1000, 52, &chunk).expect("within credit");
        sent += chunk.len();
    }
    let header = Header { flags: SHUTDOWN_RCV | SHUTDOWN_SEND, ..packet(Op::Shutdown, 1000, 52) };
    s.muxer.from_guest(&header, b"").expect("shutdown");
    assert_eq!(s.muxer.connection_count(), 1, "kept until the host program has every byte");
    host.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut got = 0;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        s.muxer.process_host_events();
        match host.read(&mut buf).expect("read") {
            0 => break,
            n => got += n,
        }
    }
    assert_eq!(got, sent, "nothing lost, then the end");
    assert_eq!(s.muxer.connection_count(), 0);
    assert_eq!(ops(&s.guest_receives()), [Op::Rst as u16]);
}

#[test]
fn a_host_program_that_closes_tells_the_guest() {
    let mut s = setup();
    let (_listener, host) = s.guest_connected_to_host_program(52);
    drop(host);
    let packets = s.guest_receives();
    assert_eq!(ops(&packets), [Op::Shutdown as u16]);
    assert_eq!(packets[0].0.flags, SHUTDOWN_SEND, "the host sends no more");
}

/// Whether the muxer's epoll set would wake the device's worker now.
fn muxer_wakes(muxer: &Muxer) -> bool {
    let mut poll = libc::pollfd { fd: muxer.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, no waiting.
    unsafe { libc::poll(&mut poll, 1, 0) == 1 }
}

#[test]
fn a_closed_host_socket_does_not_wake_the_worker_while_the_guest_takes_nothing() {
    let mut s = setup();
    let (_listener, mut host) = s.guest_connected_to_host_program(52);
    host.write_all(b"last words").expect("write");
    drop(host);
    s.muxer.process_host_events();
    assert!(s.muxer.has_work_for_guest());
    // The guest posts no buffers: epoll must not keep reporting the hang-up.
    assert!(!muxer_wakes(&s.muxer), "a hung-up stream would spin the worker");
    let packets = s.guest_receives();
    assert_eq!(ops(&packets), [Op::Rw as u16, Op::Shutdown as u16]);
    assert_eq!(packets[0].1, b"last words");
}

#[test]
fn a_hung_up_stream_is_read_to_its_end_as_the_guest_gives_credit() {
    let mut s = setup();
    let listener = s.host_listener(52);
    let request = Header { buf_alloc: 4, ..packet(Op::Request, 1000, 52) };
    s.muxer.from_guest(&request, b"").expect("request");
    let _ = s.guest_receives();
    let (mut host, _) = listener.accept().expect("accept");
    host.write_all(b"12345678").expect("write");
    drop(host);
    let first = s.guest_receives();
    assert_eq!(first.iter().map(|p| p.1.clone()).collect::<Vec<_>>(), [b"1234".to_vec()], "only the credit");
    let update = Header { op: Op::CreditUpdate as u16, fwd_cnt: 4, ..request };
    s.muxer.from_guest(&update, b"").expect("credit");
    let rest = s.guest_receives();
    assert_eq!(ops(&rest)[0], Op::Rw as u16);
    assert_eq!(rest[0].1, b"5678");
}

#[test]
fn a_live_socket_is_not_taken_over_but_a_stale_one_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.sock");
    let live = Muxer::new(GUEST, &path).expect("first");
    assert!(matches!(Muxer::new(GUEST, &path), Err(MuxerError::InUse(_))));
    drop(live);
    assert!(!path.exists(), "ours goes with us");
    drop(UnixListener::bind(&path).expect("a listener that dies"));
    assert!(path.exists(), "a stale socket file");
    Muxer::new(GUEST, &path).expect("replaces a stale socket");
}

#[test]
fn a_file_that_is_not_a_socket_is_never_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, b"keep me").expect("a user's file");
    assert!(matches!(Muxer::new(GUEST, &path), Err(MuxerError::NotASocket(_))));
    assert_eq!(std::fs::read(&path).expect("still there"), b"keep me");
}

#[test]
fn a_driver_reset_ends_every_stream_but_keeps_listening() {
    let mut s = setup();
    let (_listener, mut host) = s.guest_connected_to_host_program(52);
    s.muxer.reset_streams();
    let mut buf = [0u8; 1];
    assert_eq!(host.read(&mut buf).expect("eof"), 0);
    let mut again = s.host_connect();
    again.write_all(b"CONNECT 52\n").expect("write");
    assert_eq!(ops(&s.guest_receives()), [Op::Request as u16]);
}
