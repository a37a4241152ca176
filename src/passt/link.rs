//! A network card's wire when passt is at its other end: what the card's worker reads frames
//! from and writes frames to, in place of a tap.
//!
//! The worker deals in frames that start with the 12-byte virtio-net header, as a tap with
//! `IFF_VNET_HDR` does. passt's frames have no header, so going to the guest we write a zeroed
//! one in front (no offloads: the card offers none with passt, and checksums are complete), and
//! coming from the guest we leave the header out. The bytes go through our buffers
//! ([`frames`](super::frames)), not straight between guest memory and the socket: a stream has
//! no frame boundaries for a readv to stop at.
//!
//! The link is up while passt runs and the stream is in order. When passt dies, closes the
//! stream, or breaks the protocol, the link goes down for good: the worker takes the guest's
//! link down and the VM carries on without a network.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use vm_memory::VolatileSlice;

use super::frames::{Fill, Flush, FrameReader, FrameWriter, StreamError, MAX_FRAME};
use super::{Passt, PasstError};
use crate::config::Forward;
use crate::virtio::iovec::IoVecs;
use crate::virtio::net::tap::VNET_HDR_LEN;

/// A running passt and the stream to it.
pub struct PasstLink {
    passt: Passt,
    /// The socket, as a file: read(2) and write(2), the calls a device worker's seccomp
    /// filter allows (a socket's own `Read` would use recvfrom).
    stream: File,
    /// The same socket again: the worker watches this one for room to write, and the stream's
    /// own fd for frames to read, each on and off as it needs.
    out_fd: OwnedFd,
    reader: Mutex<FrameReader>,
    writer: Mutex<FrameWriter>,
    down: AtomicBool,
}

impl PasstLink {
    /// Starts passt with `forwards` (see [`Passt::start`]).
    pub fn start(forwards: &[Forward]) -> Result<PasstLink, PasstError> {
        PasstLink::start_program(super::PROGRAM, forwards)
    }

    /// [`PasstLink::start`] with another program than the `passt` on PATH (tests' stand-ins).
    pub(crate) fn start_program(program: &str, forwards: &[Forward]) -> Result<PasstLink, PasstError> {
        let (passt, stream) = Passt::start_program(program, forwards)?;
        let out_fd = stream.as_fd().try_clone_to_owned().map_err(PasstError::Socket)?;
        let stream = File::from(OwnedFd::from(stream));
        Ok(PasstLink { passt, stream, out_fd, reader: Mutex::default(), writer: Mutex::default(), down: AtomicBool::new(false) })
    }

    /// What log lines call this link.
    pub fn name(&self) -> String {
        format!("passt (pid {})", self.passt.pid())
    }

    /// Whether the guest's link is up: passt runs and the stream is in order.
    pub fn is_up(&self) -> bool {
        !self.down.load(Ordering::Acquire) && self.passt.is_alive()
    }

    /// Takes the link down for good (`true` the first time only). passt's own death is
    /// reported, with its status, by the thread that waits for it; anything else (a broken
    /// protocol, a failed read or write) is reported here, and passt is stopped.
    pub fn take_down(&self, why: &io::Error) -> bool {
        if self.down.swap(true, Ordering::AcqRel) {
            return false;
        }
        if self.passt.is_alive() && why.kind() != io::ErrorKind::BrokenPipe {
            eprintln!("lguest: {why} ({}); the guest's network link is down, the VM keeps running", self.name());
            self.passt.stop();
        }
        true
    }

    /// The fd to watch for frames from passt.
    pub fn read_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// The fd to watch (edge-triggered) for room to send.
    pub fn write_fd(&self) -> RawFd {
        self.out_fd.as_raw_fd()
    }

    /// Whether a whole frame waits in our buffer: the socket being quiet doesn't mean there is
    /// nothing to deliver.
    pub fn has_frame(&self) -> bool {
        matches!(lock(&self.reader).frame(), Ok(Some(_)))
    }

    /// Reads one frame into `iovecs`, behind a zeroed virtio-net header, and returns its length
    /// with the header; when that exceeds what the iovecs hold, they hold its start only.
    /// `WouldBlock` when no whole frame has arrived; `BrokenPipe` when passt is gone, and
    /// `InvalidData` when it broke the protocol: the link is down then.
    pub fn read_frame(&self, iovecs: &IoVecs<'_>) -> io::Result<usize> {
        let mut reader = lock(&self.reader);
        loop {
            if let Some(frame) = reader.frame().map_err(stream_error)? {
                let len = VNET_HDR_LEN + frame.len();
                copy_into(iovecs, &[[0u8; VNET_HDR_LEN].as_slice(), frame]);
                reader.consume();
                return Ok(len);
            }
            match reader.fill(&mut &self.stream).map_err(stream_error)? {
                Fill::Read(_) => {}
                Fill::WouldBlock | Fill::Full => return Err(io::ErrorKind::WouldBlock.into()),
            }
        }
    }

    /// Queues the frame `iovecs` hold (header first) and sends what the socket takes.
    /// `WouldBlock` when our buffer is full ([`PasstLink::can_send`] says so beforehand).
    pub fn write_frame(&self, iovecs: &IoVecs<'_>) -> io::Result<usize> {
        let len = iovecs.bytes().checked_sub(VNET_HDR_LEN).filter(|len| (1..=MAX_FRAME).contains(len));
        let len = len.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a frame of no or too many bytes"))?;
        let mut writer = lock(&self.writer);
        let fill = |out: &mut [u8]| {
            copy_out_of(iovecs, VNET_HDR_LEN, out);
            Ok::<(), ()>(())
        };
        let queued = writer.push(len, fill).map_err(stream_error)?;
        if queued != Ok(true) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        writer.flush(&mut &self.stream).map_err(stream_error)?;
        Ok(len)
    }

    /// Sends what waits, and says whether a largest frame would now fit behind the rest.
    pub fn can_send(&self) -> io::Result<bool> {
        let mut writer = lock(&self.writer);
        if writer.flush(&mut &self.stream).map_err(stream_error)? == Flush::Done {
            return Ok(true);
        }
        Ok(writer.has_room(MAX_FRAME))
    }
}

/// Our buffers hold no invariant a panicking holder could break halfway; a poisoned lock is
/// still a usable one.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn stream_error(e: StreamError) -> io::Error {
    match e {
        StreamError::Closed => io::Error::new(io::ErrorKind::BrokenPipe, e),
        StreamError::Read(e) | StreamError::Write(e) => e,
        StreamError::BadLength(_) | StreamError::FrameTooLong(_) => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

/// The guest memory the iovecs name, as volatile slices (the guest may touch it meanwhile).
fn slices<'a>(iovecs: &'a IoVecs<'_>) -> impl Iterator<Item = VolatileSlice<'a>> + 'a {
    iovecs.as_slice().iter().map(|iov| {
        // SAFETY: IoVecs are only built from VolatileSlices of a mapping they keep borrowed
        // for their life, which outlives `'a`; each iovec is one such slice, base and length.
        unsafe { VolatileSlice::new(iov.iov_base.cast(), iov.iov_len) }
    })
}

/// Copies `parts`, one after the other, to the start of the memory `iovecs` name, as far as
/// it reaches.
fn copy_into(iovecs: &IoVecs<'_>, parts: &[&[u8]]) {
    let mut slices = slices(iovecs);
    let mut current: Option<VolatileSlice<'_>> = None;
    for part in parts {
        let mut part: &[u8] = part;
        while !part.is_empty() {
            let slice = match current.take().filter(|s| !s.is_empty()) {
                Some(slice) => slice,
                None => match slices.next() {
                    Some(slice) => slice,
                    None => return,
                },
            };
            let n = slice.len().min(part.len());
            slice.copy_from(&part[..n]);
            current = slice.offset(n).ok();
            part = &part[n..];
        }
    }
}

/// Fills `out` from the memory `iovecs` name, after its first `skip` bytes.
fn copy_out_of(iovecs: &IoVecs<'_>, mut skip: usize, mut out: &mut [u8]) {
    for slice in slices(iovecs) {
        if skip >= slice.len() {
            skip -= slice.len();
            continue;
        }
        let Ok(slice) = slice.offset(skip) else { return };
        skip = 0;
        let n = slice.copy_to(out);
        out = &mut out[n..];
        if out.is_empty() {
            return;
        }
    }
}

/// A link to a stand-in for passt, for tests: a bash script in `dir` run with passt's arguments
/// (`--foreground --quiet --fd N`), whose `body` uses the socket as `$fd`. `ECHO` sends every
/// frame back. (bash: dash's redirections take one-digit fds only, and a busy test process has
/// more.)
#[cfg(test)]
pub(crate) fn stand_in(dir: &std::path::Path, body: &str) -> PasstLink {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("passt");
    std::fs::write(&path, format!("#!/usr/bin/env bash\nfd=$4\n{body}\n")).expect("write the script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let program = path.to_string_lossy();
    // A thread of another test that forks while we write the script holds it open for writing
    // until its child execs, and exec then fails with ETXTBSY: a moment's wait is the cure.
    for _ in 0..1000 {
        match PasstLink::start_program(&program, &[]) {
            Err(PasstError::Spawn(e)) if e.raw_os_error() == Some(libc::ETXTBSY) => std::thread::sleep(std::time::Duration::from_millis(1)),
            started => return started.expect("the stand-in starts"),
        }
    }
    panic!("the stand-in stayed busy (ETXTBSY)")
}

/// The stand-in's body that sends every frame back as it came.
#[cfg(test)]
pub(crate) const ECHO: &str = r#"eval "exec cat <&$fd >&$fd""#;

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
    use crate::memory::GuestMemoryMmap;

    use super::*;


    fn memory() -> GuestMemoryMmap {
        crate::memory::from_ranges(&[(GuestAddress(0), 1 << 20)], crate::memory::Tracking::Off).expect("guest memory")
    }

    /// Iovecs over guest memory: `pieces` buffers of the given lengths, back to back from `at`
    /// (the copies must still cross from one iovec to the next).
    fn iovecs<'m>(mem: &'m GuestMemoryMmap, at: u64, pieces: &[usize]) -> IoVecs<'m> {
        let mut iovecs = IoVecs::default();
        let mut addr = at;
        for &len in pieces {
            for slice in mem.get_slices(GuestAddress(addr), len) {
                iovecs.push(slice.expect("in memory"));
            }
            addr += len as u64;
        }
        iovecs
    }

    /// Blocks until the link has a frame (or fails), without sleeps: poll(2) on its fd.
    fn read_blocking(link: &PasstLink, iovecs: &IoVecs<'_>) -> io::Result<usize> {
        loop {
            match link.read_frame(iovecs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut pollfd = libc::pollfd { fd: link.read_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd, for the length we pass.
                    unsafe { libc::poll(&mut pollfd, 1, 60_000) };
                }
                other => return other,
            }
        }
    }

    #[test]
    fn the_guests_header_stays_behind_and_a_zeroed_one_comes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        // An echo: every frame we send comes back as it went out.
        let link = stand_in(dir.path(), ECHO);
        let mem = memory();
        let frame: Vec<u8> = (0..1514u32).map(|i| i as u8).collect();
        // The guest's header (flags set, as a driver with offloads would) and the frame, in
        // buffers that split both.
        mem.write_slice(&[0xee; VNET_HDR_LEN], GuestAddress(0)).expect("write");
        mem.write_slice(&frame, GuestAddress(VNET_HDR_LEN as u64)).expect("write");
        let out = iovecs(&mem, 0, &[5, 100, VNET_HDR_LEN + frame.len() - 105]);
        assert_eq!(link.write_frame(&out).expect("sent"), frame.len());
        let into = iovecs(&mem, 0x10000, &[7, 3000]);
        mem.write_slice(&[0xff; 16], GuestAddress(0x10000)).expect("write");
        assert_eq!(read_blocking(&link, &into).expect("a frame"), VNET_HDR_LEN + frame.len());
        let mut got = vec![0u8; VNET_HDR_LEN + frame.len()];
        mem.read_slice(&mut got, GuestAddress(0x10000)).expect("read");
        assert_eq!(got[..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
        assert_eq!(got[VNET_HDR_LEN..], frame[..]);
        assert!(link.is_up());
    }

    #[test]
    fn a_zero_length_from_passt_takes_the_link_down() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hostile = r#"eval "printf '\000\000\000\000' >&$fd"; exec sleep 1000"#;
        let link = stand_in(dir.path(), hostile);
        let mem = memory();
        let into = iovecs(&mem, 0, &[4096]);
        let error = read_blocking(&link, &into).expect_err("a protocol error");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        assert!(link.take_down(&error), "the first take-down counts");
        assert!(!link.is_up());
        assert!(!link.take_down(&error), "and only the first");
        // A passt that broke the protocol is not left running.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while link.passt.is_alive() {
            assert!(std::time::Instant::now() < deadline, "the stand-in still runs after 60 s");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn frames_the_protocol_cant_carry_are_refused_not_sent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = stand_in(dir.path(), "exec sleep 1000");
        let mem = memory();
        for pieces in [&[VNET_HDR_LEN][..], &[VNET_HDR_LEN + MAX_FRAME + 1]] {
            let error = link.write_frame(&iovecs(&mem, 0, pieces)).expect_err("refused");
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        }
        assert!(link.can_send().expect("nothing queued"));
    }

    #[test]
    fn a_dead_backend_is_a_broken_pipe_and_a_link_that_is_down() {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = stand_in(dir.path(), "exit 3");
        let mem = memory();
        let error = read_blocking(&link, &iovecs(&mem, 0, &[4096])).expect_err("gone");
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe, "{error}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while link.is_up() {
            assert!(std::time::Instant::now() < deadline, "not reaped in 60 s");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
