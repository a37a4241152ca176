//! One vsock stream between a guest port and a host Unix socket, and its credit accounting.
//!
//! Virtio-vsock flow control is by credit (virtio spec 1.2, 5.10.6.3): each side says how much
//! it can buffer (`buf_alloc`) and how much it has passed on to its reader so far (`fwd_cnt`);
//! a sender may have at most `buf_alloc - (sent - fwd_cnt)` bytes in flight. We apply it both
//! ways. The guest may send us at most [`BUF_ALLOC`] bytes that the host program has not read
//! yet: what the Unix socket doesn't take at once waits in [`Connection::to_host`], which can
//! therefore never outgrow [`BUF_ALLOC`]; a guest that sends beyond its credit is reset. And we
//! read from the Unix socket only as much as the guest's credit allows, so a slow reader in the
//! guest slows the host program down through its socket, and nothing piles up here.
//!
//! The counters are `u32` and wrap, as the spec's do: differences are taken with wrapping
//! arithmetic, so a long-lived connection that moves more than 4 GiB keeps working.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use super::packet::{Header, Op, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// What we let the guest send ahead of the host program's reading, per connection.
pub const BUF_ALLOC: u32 = 256 << 10;
/// Once the host program has read this much since we last told the guest, we tell it (a
/// CREDIT_UPDATE): a guest that ran out of credit would otherwise wait for a packet of ours.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A host program asked for it (CONNECT); the guest has not answered our REQUEST yet.
    Connecting,
    Established,
    /// One side has said it is done; the other may still finish. `guest_done` is the guest's
    /// SHUTDOWN flags so far, `host_eof` is true once the host program closed its end.
    Closing { guest_done: u32, host_eof: bool },
}

/// Why a connection must end now, with an RST to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reset {
    #[error("the guest sent {sent} bytes with {credit} bytes of credit left")]
    OverCredit { sent: u32, credit: u32 },
    #[error("the guest sent {0:?} on a connection in the wrong state")]
    WrongState(Op),
    #[error("the host side of the connection failed")]
    HostFailed,
}

/// One stream.
pub struct Connection {
    pub stream: UnixStream,
    pub host_port: u32,
    pub guest_port: u32,
    pub state: State,
    /// Bytes from the guest that the host socket hasn't taken yet (at most [`BUF_ALLOC`]),
    /// after the rest of our own `OK <port>` line, if any.
    to_host: VecDeque<u8>,
    /// How many bytes at the front of `to_host` are our `OK` line: they use no credit.
    ours_in_front: usize,
    /// Bytes received from the guest, and passed on to the host program (both wrapping).
    rx_cnt: u32,
    fwd_cnt: u32,
    /// `fwd_cnt` as the guest last heard it from us.
    fwd_cnt_told: u32,
    /// The guest's buffer and what its reader has consumed, from its latest header.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest (wrapping).
    tx_cnt: u32,
    /// Control packets owed to the guest, sent before any data.
    owed: VecDeque<Op>,
}

impl Connection {
    /// A connection the guest asked for, whose host side is already connected: it owes the
    /// guest a RESPONSE.
    pub fn accepted(stream: UnixStream, host_port: u32, guest_port: u32, request: &Header) -> Connection {
        let mut connection = Connection::new(stream, host_port, guest_port, State::Established);
        connection.learn_credit(request);
        connection.owed.push_back(Op::Response);
        connection
    }

    /// A connection a host program asked for: it owes the guest a REQUEST.
    pub fn requested(stream: UnixStream, host_port: u32, guest_port: u32) -> Connection {
        let mut connection = Connection::new(stream, host_port, guest_port, State::Connecting);
        connection.owed.push_back(Op::Request);
        connection
    }

    fn new(stream: UnixStream, host_port: u32, guest_port: u32, state: State) -> Connection {
        Connection {
            stream,
            host_port,
            guest_port,
            state,
            to_host: VecDeque::new(),
            ours_in_front: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            owed: VecDeque::new(),
        }
    }

    /// Every header from the guest carries its current credit.
    pub fn learn_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
    }

    /// How many bytes the guest can take from us now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// How many bytes the guest may still send us.
    fn our_credit(&self) -> u32 {
        BUF_ALLOC.saturating_sub(self.rx_cnt_unforwarded())
    }

    /// The guest answered our REQUEST: the host program hears `OK <port>`.
    pub fn established(&mut self) -> Result<(), Reset> {
        if self.state != State::Connecting {
            return Err(Reset::WrongState(Op::Response));
        }
        self.state = State::Established;
        let line = format!("OK {}\n", self.host_port);
        self.to_host.extend(line.as_bytes());
        self.ours_in_front = line.len();
        self.flush_to_host()
    }

    /// Payload from the guest for the host program: written now, or kept while the socket is
    /// full, within the guest's credit.
    pub fn from_guest(&mut self, payload: &[u8]) -> Result<(), Reset> {
        let open = match self.state {
            State::Established => true,
            State::Closing { guest_done, .. } => guest_done & SHUTDOWN_SEND == 0,
            State::Connecting => false,
        };
        if !open {
            return Err(Reset::WrongState(Op::Rw));
        }
        let sent = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let credit = self.our_credit();
        if sent > credit {
            return Err(Reset::OverCredit { sent, credit });
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(sent);
        if self.to_host.is_empty() {
            let written = write_some(&mut self.stream, payload).map_err(|_| Reset::HostFailed)?;
            self.forwarded(written);
            self.to_host.extend(&payload[written..]);
        } else {
            self.to_host.extend(payload);
        }
        Ok(())
    }

    /// Writes what is waiting for the host program, as far as its socket takes it.
    pub fn flush_to_host(&mut self) -> Result<(), Reset> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            let written = write_some(&mut self.stream, front).map_err(|_| Reset::HostFailed)?;
            if written == 0 {
                break;
            }
            self.to_host.drain(..written);
            let ours = written.min(self.ours_in_front);
            self.ours_in_front -= ours;
            self.forwarded(written - ours);
        }
        if self.to_host.is_empty() && self.guest_done_sending() {
            // The guest's SHUTDOWN came while its last bytes waited here: now the host
            // program can see the end of them.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    fn guest_done_sending(&self) -> bool {
        matches!(self.state, State::Closing { guest_done, .. } if guest_done & SHUTDOWN_SEND != 0)
    }

    fn forwarded(&mut self, bytes: usize) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(u32::try_from(bytes).unwrap_or(u32::MAX));
        if self.fwd_cnt.wrapping_sub(self.fwd_cnt_told) >= CREDIT_UPDATE_THRESHOLD && !self.owed.contains(&Op::CreditUpdate) {
            self.owed.push_back(Op::CreditUpdate);
        }
    }

    /// Bytes from the guest not yet taken by the host socket.
    pub fn rx_cnt_unforwarded(&self) -> u32 {
        self.rx_cnt.wrapping_sub(self.fwd_cnt)
    }

    /// Bytes are waiting for the host socket to take them.
    pub fn wants_to_write(&self) -> bool {
        !self.to_host.is_empty()
    }

    /// The guest asked how much it may send.
    pub fn owe_credit_update(&mut self) {
        if !self.owed.contains(&Op::CreditUpdate) {
            self.owed.push_back(Op::CreditUpdate);
        }
    }

    /// The guest's SHUTDOWN. Returns true when both directions are done and the connection
    /// can go (the guest then hears RST, which is how a stream ends).
    pub fn guest_shutdown(&mut self, flags: u32) -> bool {
        let (mut guest_done, host_eof) = match self.state {
            State::Closing { guest_done, host_eof } => (guest_done, host_eof),
            _ => (0, false),
        };
        guest_done |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        if guest_done & SHUTDOWN_SEND != 0 && self.to_host.is_empty() {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        self.state = State::Closing { guest_done, host_eof };
        guest_done == SHUTDOWN_RCV | SHUTDOWN_SEND
    }

    /// The guest is done both ways and the host program has all it sent: time for the RST.
    pub fn finished(&self) -> bool {
        let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
        matches!(self.state, State::Closing { guest_done, .. } if guest_done & both == both) && self.to_host.is_empty()
    }

    /// The next control packet owed to the guest, if any.
    pub fn owed_packet(&mut self, guest_cid: u64) -> Option<Header> {
        let op = self.owed.pop_front()?;
        Some(self.header(guest_cid, op))
    }

    /// Whether a packet for the guest could be made now: owed control, or data with credit.
    pub fn has_owed(&self) -> bool {
        !self.owed.is_empty()
    }

    /// Whether we should read the host socket: the stream is open our way and the guest has
    /// room.
    pub fn wants_to_read(&self) -> bool {
        let open = match self.state {
            State::Established => true,
            State::Closing { guest_done, host_eof } => !host_eof && guest_done & SHUTDOWN_RCV == 0,
            State::Connecting => false,
        };
        open && self.peer_credit() > 0
    }

    /// Reads from the host program into `buf` (at most the guest's credit). `Ok(None)` when
    /// nothing is there; a SHUTDOWN header when the host program has stopped writing.
    ///
    /// That SHUTDOWN says only "the host sends no more": an end of file is all a half-close
    /// (`shutdown(SHUT_WR)`) and a close look alike from here, and a host program that only
    /// half-closed still reads what the guest sends. (Saying "nor receives" too made the guest
    /// fail its own sending with EPIPE the moment the host program finished first.) After a
    /// close, the guest's next bytes fail our write and the stream is reset.
    pub fn read_for_guest(&mut self, guest_cid: u64, buf: &mut [u8]) -> io::Result<Option<(Header, usize)>> {
        let room = buf.len().min(self.peer_credit() as usize);
        if room == 0 {
            return Ok(None);
        }
        match self.stream.read(&mut buf[..room]) {
            Ok(0) => {
                let guest_done = match self.state {
                    State::Closing { guest_done, .. } => guest_done,
                    _ => 0,
                };
                self.state = State::Closing { guest_done, host_eof: true };
                let mut header = self.header(guest_cid, Op::Shutdown);
                header.flags = SHUTDOWN_SEND;
                Ok(Some((header, 0)))
            }
            Ok(n) => {
                let mut header = self.header(guest_cid, Op::Rw);
                header.len = u32::try_from(n).unwrap_or(u32::MAX);
                self.tx_cnt = self.tx_cnt.wrapping_add(header.len);
                Ok(Some((header, n)))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A header from us on this connection, with our current credit.
    fn header(&mut self, guest_cid: u64, op: Op) -> Header {
        let mut header = Header::to_guest(guest_cid, self.host_port, self.guest_port, op);
        header.buf_alloc = BUF_ALLOC;
        header.fwd_cnt = self.fwd_cnt;
        self.fwd_cnt_told = self.fwd_cnt;
        header
    }
}

/// Writes what the socket takes without blocking; 0 when it is full.
fn write_some(stream: &mut UnixStream, bytes: &[u8]) -> io::Result<usize> {
    loop {
        match stream.write(bytes) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::packet::{HOST_CID, TYPE_STREAM};

    const GUEST: u64 = 3;

    fn pair() -> (UnixStream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("nonblocking");
        (ours, theirs)
    }

    fn request(buf_alloc: u32) -> Header {
        Header { src_cid: GUEST, dst_cid: HOST_CID, src_port: 1000, dst_port: 52, kind: TYPE_STREAM, op: Op::Request as u16, buf_alloc, ..Header::default() }
    }

    #[test]
    fn a_guest_request_owes_a_response_with_our_credit() {
        let (ours, _theirs) = pair();
        let mut c = Connection::accepted(ours, 52, 1000, &request(4096));
        let response = c.owed_packet(GUEST).expect("a response");
        assert_eq!((response.op, response.src_port, response.dst_port), (Op::Response as u16, 52, 1000));
        assert_eq!((response.buf_alloc, response.dst_cid, response.src_cid), (BUF_ALLOC, GUEST, HOST_CID));
        assert_eq!(c.peer_credit(), 4096);
        assert!(c.owed_packet(GUEST).is_none());
    }

    #[test]
    fn data_from_the_guest_reaches_the_host_program() {
        let (ours, mut theirs) = pair();
        let mut c = Connection::accepted(ours, 52, 1000, &request(4096));
        c.from_guest(b"hello").expect("within credit");
        let mut got = [0u8; 5];
        theirs.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hello");
        assert!(!c.wants_to_write());
    }

    #[test]
    fn a_full_host_socket_keeps_the_bytes_within_the_credit_and_beyond_it_resets() {
        let (ours, mut theirs) = pair();
        let mut c = Connection::accepted(ours, 52, 1000, &request(4096));
        let chunk = vec![7u8; 64 << 10];
        for _ in 0..4 {
            c.from_guest(&chunk).expect("256 KiB of credit");
        }
        // The socket's own buffer took some: fill our credit to the last byte, then one more.
        while c.our_credit() > 0 {
            let n = (c.our_credit() as usize).min(chunk.len());
            c.from_guest(&chunk[..n]).expect("within credit");
        }
        assert!(c.wants_to_write(), "the socketpair can't hold it all");
        assert_eq!(c.from_guest(b"x"), Err(Reset::OverCredit { sent: 1, credit: 0 }));
        assert!(c.to_host.len() <= BUF_ALLOC as usize);
        // The host program reads; the rest flows, and the guest is told of the room.
        let total = c.rx_cnt as usize;
        let mut sink = vec![0u8; total];
        let mut read = 0;
        while read < total {
            c.flush_to_host().expect("flush");
            read += theirs.read(&mut sink[read..]).expect("read");
        }
        c.flush_to_host().expect("flush");
        assert!(!c.wants_to_write());
        let mut updates = 0;
        while let Some(h) = c.owed_packet(GUEST) {
            if h.op == Op::CreditUpdate as u16 {
                updates += 1;
                assert_eq!(h.fwd_cnt as usize, total);
            }
        }
        assert!(updates >= 1, "the guest hears about the room");
        c.from_guest(&chunk).expect("credit again");
    }

    #[test]
    fn reads_for_the_guest_stop_at_its_credit() {
        let (ours, mut theirs) = pair();
        let mut c = Connection::accepted(ours, 52, 1000, &request(10));
        theirs.write_all(b"0123456789abcdef").expect("write");
        let mut buf = [0u8; 64];
        let (h, n) = c.read_for_guest(GUEST, &mut buf).expect("read").expect("data");
        assert_eq!((h.op, h.len, n), (Op::Rw as u16, 10, 10));
        assert_eq!(c.peer_credit(), 0);
        assert!(!c.wants_to_read());
        assert!(c.read_for_guest(GUEST, &mut buf).expect("read").is_none(), "no credit, no read");
        c.learn_credit(&Header { buf_alloc: 10, fwd_cnt: 10, ..request(10) });
        let (h, _) = c.read_for_guest(GUEST, &mut buf).expect("read").expect("data");
        assert_eq!(h.len, 6);
    }

    #[test]
    fn credit_arithmetic_survives_wrapping() {
        let (ours, _theirs) = pair();
        let mut c = Connection::accepted(ours, 52, 1000, &request(100));
        c.tx_cnt = u32::MAX - 10;
        c.peer_fwd_cnt = u32::MAX - 30;
        assert_eq!(c.peer_credit(), 80);
        c.tx_cnt = 5; // wrapped past zero
        assert_eq!(c.peer_credit(), 100 - 36);
        c.peer_buf_alloc = 10; // a guest that shrank its buffer below what is in flight
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn the_host_program_closing_becomes_a_shutdown_and_the_guests_answer_ends_it() {
        let (ours, theirs) = pair();
        let mut c = Connection::accepted(ours, 52, 1000, &request(4096));
        drop(theirs);
        let mut buf = [0u8; 16];
        let (h, n) = c.read_for_guest(GUEST, &mut buf).expect("read").expect("a shutdown");
        assert_eq!((h.op, h.flags, n), (Op::Shutdown as u16, SHUTDOWN_SEND, 0), "the host sends no more");
        assert!(!c.wants_to_read());
        assert_eq!(c.from_guest(b"late"), Err(Reset::HostFailed), "a closed host program can't take more");
        assert!(c.guest_shutdown(SHUTDOWN_RCV | SHUTDOWN_SEND));
    }

    #[test]
    fn a_host_program_that_only_stops_writing_still_receives() {
        let (ours, mut theirs) = pair();
        let mut c = Connection::accepted(ours, 52, 1000, &request(4096));
        theirs.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut buf = [0u8; 16];
        let (h, _) = c.read_for_guest(GUEST, &mut buf).expect("read").expect("a shutdown");
        assert_eq!((h.op, h.flags), (Op::Shutdown as u16, SHUTDOWN_SEND));
        c.from_guest(b"still heard").expect("the host program still reads");
        let mut got = [0u8; 11];
        theirs.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"still heard");
        assert!(!c.guest_shutdown(SHUTDOWN_SEND), "the guest's end of sending");
        assert!(c.guest_shutdown(SHUTDOWN_RCV), "and of receiving: the stream is done");
    }

    #[test]
    fn a_half_shutdown_from_the_guest_keeps_the_other_direction() {
        let (ours, mut theirs) = pair();
        let mut c = Connection::accepted(ours, 52, 1000, &request(4096));
        assert!(!c.guest_shutdown(SHUTDOWN_SEND));
        assert_eq!(c.from_guest(b"late"), Err(Reset::WrongState(Op::Rw)));
        let mut buf = [0u8; 1];
        assert_eq!(theirs.read(&mut buf).expect("eof"), 0, "the host program sees the guest's end");
        theirs.write_all(b"z").expect("write");
        assert!(c.wants_to_read(), "the guest still receives");
        assert!(c.guest_shutdown(SHUTDOWN_RCV));
    }

    #[test]
    fn a_shutdown_behind_bytes_the_host_has_not_taken_reaches_it_after_them() {
        let (ours, mut theirs) = pair();
        let mut c = Connection::accepted(ours, 52, 1000, &request(4096));
        let chunk = vec![3u8; 64 << 10];
        while !c.wants_to_write() {
            c.from_guest(&chunk).expect("within credit");
        }
        assert!(!c.guest_shutdown(SHUTDOWN_SEND));
        // Without the end, the read below would wait: make that a failure, not a hang.
        theirs.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
        let mut sink = vec![0u8; 64 << 10];
        let mut total = 0;
        loop {
            c.flush_to_host().expect("flush");
            match theirs.read(&mut sink).expect("read") {
                0 => break,
                n => total += n,
            }
        }
        assert_eq!(total as u32, c.rx_cnt, "every byte, then the end");
    }

    #[test]
    fn a_host_request_is_answered_with_ok_and_the_port() {
        let (ours, mut theirs) = pair();
        let mut c = Connection::requested(ours, 1 << 30, 52);
        let h = c.owed_packet(GUEST).expect("a request");
        assert_eq!((h.op, h.src_port, h.dst_port), (Op::Request as u16, 1 << 30, 52));
        assert_eq!(c.from_guest(b"early"), Err(Reset::WrongState(Op::Rw)));
        c.established().expect("response");
        let mut line = [0u8; 14];
        theirs.read_exact(&mut line).expect("read");
        assert_eq!(&line, b"OK 1073741824\n");
        assert_eq!(c.established(), Err(Reset::WrongState(Op::Response)), "only once");
    }
}
