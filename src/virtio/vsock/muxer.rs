//! All the streams of one vsock device, and the host side of Firecracker's hybrid vsock.
//!
//! Host programs reach the guest through one Unix socket, `uds_path`: they connect, write
//! `CONNECT <port>\n`, and once the guest's program listening on vsock port `<port>` has
//! accepted, read `OK <host port>\n` and then have a byte stream to it. A guest program that
//! connects to the host's port P reaches the host program listening on the Unix socket
//! `<uds_path>_P`. Either way, nobody listening means RST for the guest and a closed socket
//! for the host program. This is Firecracker's documented protocol, so the host-side agents
//! of Kata, firecracker-containerd and others work unchanged.
//!
//! The muxer owns an epoll set of its own (the listener, the handshakes in progress, the
//! streams) that the device's worker watches as one fd. The worker hands it the guest's
//! packets ([`Muxer::from_guest`]) and asks it for packets to put in the guest's receive
//! buffers ([`Muxer::next_for_guest`]).
//!
//! Limits, so that neither a guest nor host programs can make us grow without bound: at most
//! [`MAX_CONNECTIONS`] streams (a request beyond gets RST, a host connection beyond is closed),
//! [`MAX_HANDSHAKES`] host connections that haven't finished their CONNECT line, lines of at
//! most [`MAX_LINE`] bytes, and [`MAX_RESETS`] RSTs owed to a guest that isn't reading. Memory
//! is then at most [`MAX_CONNECTIONS`] × [`BUF_ALLOC`](super::connection::BUF_ALLOC) of buffered bytes (64 MiB), reached only
//! when every host program stops reading; fds at most
//! [`MAX_CONNECTIONS`] + [`MAX_HANDSHAKES`] + 2.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::Connection;
use super::packet::{BadPacket, Header, Op};

/// Streams one device may have at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Host connections that may be in their CONNECT line at once.
pub const MAX_HANDSHAKES: usize = 32;
/// The longest CONNECT line: "CONNECT 4294967295\n" is 19 bytes.
pub const MAX_LINE: usize = 32;
/// RSTs we keep for a guest that isn't taking packets; more are dropped (the guest's own
/// timeouts end those connections).
pub const MAX_RESETS: usize = 1024;
/// Host ports we give host-initiated connections start here, far above the ones programs
/// listen on (Firecracker does the same).
const FIRST_HOST_PORT: u32 = 1 << 30;
const LISTENER: u64 = u64::MAX;

/// A stream: the host port, the guest port.
type Key = (u32, u32);

/// Why the muxer can't be set up.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("a program is already listening on '{}'; choose another uds path", .0.display())]
    InUse(PathBuf),
    #[error("'{}' exists and is not a socket; choose another uds path", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot listen on '{}': {source}", path.display())]
    Listen { path: PathBuf, source: io::Error },
    #[error("cannot set up the vsock device's epoll: {0}")]
    Epoll(io::Error),
}

/// A host connection that has not finished its `CONNECT <port>\n` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    connections: HashMap<Key, Connection>,
    /// Which stream an fd in the epoll set is.
    by_fd: HashMap<RawFd, Key>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Streams that may have a packet for the guest, in turn.
    ready: VecDeque<Key>,
    in_ready: HashSet<Key>,
    /// Streams whose host program has closed its socket. epoll reports a hang-up whatever it
    /// is asked to watch, so such a stream leaves the epoll set (or it would wake the worker
    /// for ever while a guest that posts no receive buffers keeps it from being read); what
    /// is left in it is read in turn, through `ready`, while the guest has credit.
    hung_up: HashSet<Key>,
    /// RSTs for packets that named no stream of ours.
    resets: VecDeque<Header>,
    next_host_port: u32,
}

impl Muxer {
    /// Listens on `uds_path` for host programs. A stale socket file there (nobody listening)
    /// is replaced; a live one, or anything that is not a socket, is an error.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Muxer, MuxerError> {
        let listener = listen(uds_path)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        epoll
            .ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, LISTENER))
            .map_err(MuxerError::Epoll)?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            connections: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            ready: VecDeque::new(),
            in_ready: HashSet::new(),
            hung_up: HashSet::new(),
            resets: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The guest's driver reset the device: every stream ends (host programs see their
    /// sockets close); the listener stays for the next activation.
    pub fn reset_streams(&mut self) {
        for (_, connection) in self.connections.drain() {
            let _ = self.epoll.ctl(ControlOperation::Delete, connection.stream.as_raw_fd(), EpollEvent::default());
        }
        self.by_fd.clear();
        self.ready.clear();
        self.in_ready.clear();
        self.hung_up.clear();
        self.resets.clear();
    }

    /// How many streams are open (for tests and limits).
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Handles what happened on the host side since the last call, without waiting.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let Ok(count) = self.epoll.wait(0, &mut events) else { return };
        for event in &events[..count] {
            let (token, set) = (event.data(), event.event_set());
            if token == LISTENER {
                self.accept_host_programs();
            } else if let Ok(fd) = RawFd::try_from(token) {
                if self.handshakes.contains_key(&fd) {
                    self.continue_handshake(fd);
                } else if let Some(&key) = self.by_fd.get(&fd) {
                    self.stream_event(key, set);
                }
            }
        }
    }

    /// Whether [`Muxer::next_for_guest`] may have something.
    pub fn has_work_for_guest(&self) -> bool {
        !self.resets.is_empty() || !self.ready.is_empty()
    }

    /// A packet the guest sent, with its payload (`payload` may be longer than the header's
    /// `len`: the rest of the chain). An error says what was wrong with it; the guest has
    /// been answered as the spec wants (RST) where that makes sense.
    pub fn from_guest(&mut self, header: &Header, payload: &[u8]) -> Result<(), BadPacket> {
        let op = match header.check_from_guest(self.guest_cid, payload.len()) {
            Ok(op) => op,
            Err(bad) => {
                if bad.deserves_rst() && header.op != Op::Rst as u16 {
                    self.owe_reset((header.dst_port, header.src_port));
                }
                return Err(bad);
            }
        };
        let key = (header.dst_port, header.src_port);
        let Some(connection) = self.connections.get_mut(&key) else {
            match op {
                Op::Request => self.connect_for_guest(key, header),
                Op::Rst => {}
                _ => self.owe_reset(key),
            }
            return Ok(());
        };
        connection.learn_credit(header);
        let outcome = match op {
            Op::Request => Err(()),
            Op::Rst => {
                self.remove(key);
                return Ok(());
            }
            Op::Response => connection.established().map_err(drop),
            Op::Rw => connection.from_guest(&payload[..header.len as usize]).map_err(drop),
            Op::CreditUpdate => Ok(()),
            Op::CreditRequest => {
                connection.owe_credit_update();
                Ok(())
            }
            // Both ways done: the stream ends with RST, but only once the host program has
            // had the guest's last bytes (see `stream_event`).
            Op::Shutdown if connection.guest_shutdown(header.flags) && !connection.wants_to_write() => Err(()),
            Op::Shutdown => Ok(()),
        };
        match outcome {
            Ok(()) => self.refresh(key),
            Err(()) => {
                self.remove(key);
                self.owe_reset(key);
            }
        }
        Ok(())
    }

    /// The next packet for the guest: an owed RST or control packet, or data read from a host
    /// program into `buf` (its length is returned with the header).
    pub fn next_for_guest(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(reset) = self.resets.pop_front() {
            return Some((reset, 0));
        }
        while let Some(&key) = self.ready.front() {
            let Some(connection) = self.connections.get_mut(&key) else {
                self.unready(key);
                continue;
            };
            if let Some(header) = connection.owed_packet(self.guest_cid) {
                return Some((header, 0));
            }
            if connection.wants_to_read() {
                match connection.read_for_guest(self.guest_cid, buf) {
                    Ok(Some(packet)) => {
                        // Its turn is over: the others get theirs before it reads again.
                        self.ready.rotate_left(1);
                        return Some(packet);
                    }
                    Ok(None) => {}
                    Err(_) => {
                        self.remove(key);
                        self.owe_reset(key);
                        continue;
                    }
                }
            }
            self.unready(key);
            self.watch(key);
        }
        None
    }

    fn unready(&mut self, key: Key) {
        if self.ready.front() == Some(&key) {
            self.ready.pop_front();
        } else {
            self.ready.retain(|k| *k != key);
        }
        self.in_ready.remove(&key);
    }

    fn mark_ready(&mut self, key: Key) {
        if self.in_ready.insert(key) {
            self.ready.push_back(key);
        }
    }

    /// After a change to a stream: is there something for the guest, and what should the
    /// epoll set watch for it?
    fn refresh(&mut self, key: Key) {
        let Some(connection) = self.connections.get(&key) else { return };
        if connection.has_owed() {
            self.mark_ready(key);
        }
        self.watch(key);
    }

    /// Watches a stream for what it needs: readable while the guest has credit and the
    /// stream is not already waiting its turn in `ready`, writable while bytes wait for the
    /// host program.
    fn watch(&mut self, key: Key) {
        let Some(connection) = self.connections.get(&key) else { return };
        if self.hung_up.contains(&key) {
            if connection.wants_to_read() {
                self.mark_ready(key);
            }
            return;
        }
        let mut events = EventSet::empty();
        if connection.wants_to_read() && !self.in_ready.contains(&key) {
            events |= EventSet::IN;
        }
        if connection.wants_to_write() {
            events |= EventSet::OUT;
        }
        let fd = connection.stream.as_raw_fd();
        // An fd we added: MOD only fails if the fd was closed, which it can't be while ours.
        let _ = self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token(fd)));
    }

    fn stream_event(&mut self, key: Key, set: EventSet) {
        let Some(connection) = self.connections.get_mut(&key) else { return };
        // A host program that hung up with bytes still owed to it: the write fails, and ends it.
        let flush = set.contains(EventSet::OUT)
            || (set.intersects(EventSet::HANG_UP | EventSet::ERROR) && connection.wants_to_write());
        if (flush && connection.flush_to_host().is_err()) || connection.finished() {
            self.remove(key);
            self.owe_reset(key);
            return;
        }
        let fd = connection.stream.as_raw_fd();
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            // Read (or see the end) when the guest takes its next packet.
            self.mark_ready(key);
        }
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) && self.hung_up.insert(key) {
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.refresh(key);
    }

    fn owe_reset(&mut self, (host_port, guest_port): Key) {
        if self.resets.len() < MAX_RESETS {
            self.resets.push_back(Header::to_guest(self.guest_cid, host_port, guest_port, Op::Rst));
        }
    }

    fn remove(&mut self, key: Key) {
        self.hung_up.remove(&key);
        if let Some(connection) = self.connections.remove(&key) {
            let fd = connection.stream.as_raw_fd();
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.by_fd.remove(&fd);
        }
        self.unready(key);
    }

    fn add(&mut self, connection: Connection) {
        let key = (connection.host_port, connection.guest_port);
        let fd = connection.stream.as_raw_fd();
        if self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::empty(), token(fd))).is_err() {
            // Out of memory for the epoll set: the stream can't be served; refuse it.
            self.owe_reset(key);
            return;
        }
        self.by_fd.insert(fd, key);
        self.connections.insert(key, connection);
        self.refresh(key);
    }

    /// The guest connects to the host's port `key.0`: the host program listening on
    /// `<uds_path>_<port>` gets the stream, or the guest gets RST.
    fn connect_for_guest(&mut self, key: Key, request: &Header) {
        if self.connections.len() >= MAX_CONNECTIONS {
            tracing::debug!("vsock: refused a guest connection: {MAX_CONNECTIONS} streams already");
            return self.owe_reset(key);
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.0));
        match connect_nonblocking(&path) {
            Ok(stream) => self.add(Connection::accepted(stream, key.0, key.1, request)),
            Err(e) => {
                tracing::debug!(path = %path.display(), "vsock: nobody to connect the guest to: {e}");
                self.owe_reset(key);
            }
        }
    }

    fn accept_host_programs(&mut self) {
        loop {
            let stream = match accept_nonblocking(&self.listener) {
                Ok(stream) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // WouldBlock: all taken; anything else (EMFILE, ...): try again on the next event.
                Err(_) => return,
            };
            if self.handshakes.len() >= MAX_HANDSHAKES {
                continue; // dropped: the host program sees its socket close
            }
            let fd = stream.as_raw_fd();
            if self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token(fd))).is_ok() {
                self.handshakes.insert(fd, Handshake { stream, line: Vec::new() });
            }
        }
    }

    /// Reads what has come of a host program's CONNECT line; acts on it once it is whole.
    fn continue_handshake(&mut self, fd: RawFd) {
        let Some(handshake) = self.handshakes.get_mut(&fd) else { return };
        let mut byte = [0u8; 1];
        // One byte at a time: whatever follows the newline is the stream's, not ours.
        let done = loop {
            match handshake.stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) if byte[0] == b'\n' => break Ok(true),
                Ok(_) if handshake.line.len() >= MAX_LINE => break Err(()),
                Ok(_) => handshake.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break Err(()),
            }
        };
        if done == Ok(false) {
            return;
        }
        let Some(handshake) = self.handshakes.remove(&fd) else { return };
        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        if done.is_err() {
            return;
        }
        let Some(guest_port) = parse_connect(&handshake.line) else {
            tracing::debug!("vsock: a host program sent something other than CONNECT <port>");
            return;
        };
        if self.connections.len() >= MAX_CONNECTIONS {
            return;
        }
        let host_port = self.free_host_port(guest_port);
        self.add(Connection::requested(handshake.stream, host_port, guest_port));
    }

    fn free_host_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.connections.contains_key(&(port, guest_port)) {
                return port;
            }
        }
    }
}

impl AsRawFd for Muxer {
    /// The muxer's epoll set: readable when a host program or stream needs us.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl Drop for Muxer {
    /// The socket file is ours: it goes with us, as Firecracker's does.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

fn token(fd: RawFd) -> u64 {
    // fds are never negative once opened.
    u64::try_from(fd).unwrap_or(u64::MAX - 1)
}

/// `CONNECT <port>` (the newline already gone), as Firecracker's clients write it.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = text.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

fn listen(path: &Path) -> Result<UnixListener, MuxerError> {
    let listener = match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            use std::os::unix::fs::FileTypeExt;
            // Only a socket is ours to replace: never a user's file that happens to be there.
            if !std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket()) {
                return Err(MuxerError::NotASocket(path.to_path_buf()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(MuxerError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path)
        }
        other => other,
    };
    let listener = listener.map_err(|source| MuxerError::Listen { path: path.to_path_buf(), source })?;
    listener.set_nonblocking(true).map_err(|source| MuxerError::Listen { path: path.to_path_buf(), source })?;
    Ok(listener)
}

/// Accepts a host program's connection, non-blocking from the start (one `accept4`, where
/// std's `accept` and `set_nonblocking` would add an `ioctl` the worker's filter refuses).
fn accept_nonblocking(listener: &UnixListener) -> io::Result<UnixStream> {
    // SAFETY: accept4 with null address pointers only returns a new fd (or an error).
    let fd = unsafe {
        libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own.
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Connects to a Unix socket without waiting: a host program whose backlog is full refuses
/// (EAGAIN) rather than stalling the device's worker.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid; we fill in the family and a path that fits.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= address.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (slot, &byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = byte as libc::c_char;
    }
    // SAFETY: socket takes plain integers.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let length = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: the address is a valid sockaddr_un of `length` bytes that outlives the call.
    let result = unsafe { libc::connect(fd, (&address as *const libc::sockaddr_un).cast(), length) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
#[path = "muxer_tests.rs"]
pub(super) mod tests;
