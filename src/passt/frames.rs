//! The frame stream between lguest and passt: QEMU's "stream" netdev protocol, where each
//! Ethernet frame travels as a 4-byte big-endian length and then the frame itself, with no
//! virtio-net header.
//!
//! A stream socket knows nothing of frames: a read may end in the middle of a length or of a
//! frame, and a non-blocking write may take only part of what we offer. [`FrameReader`]
//! reassembles frames from whatever pieces arrive; [`FrameWriter`] queues frames and sends
//! them as the socket takes them. Both buffers are fixed in size, so a backend that floods us
//! or stops reading can't make us allocate: a full reader is simply not read from (passt then
//! waits, as a sender on a full socket does), and a full writer takes no more frames until the
//! socket drains.
//!
//! passt is a separate process we started, but its bytes are still outside bytes: a length of
//! 0 or beyond the largest Ethernet frame (64 KiB of payload and a 14-byte header) is a
//! protocol error, never an allocation or a slice out of bounds. After one, the stream is out
//! of step for good, and the caller treats the backend as gone.

use std::io::{self, Read, Write};

/// The length prefix in front of each frame.
pub const LEN_BYTES: usize = 4;
/// The largest frame either way: the largest IP packet behind an Ethernet header.
pub const MAX_FRAME: usize = 65535 + 14;
/// Each direction's buffer: room for a few of the largest frames, so that one read or write
/// moves many small ones.
pub const BUFFER_BYTES: usize = 4 * (LEN_BYTES + MAX_FRAME);

/// What can go wrong on the stream. Each of them ends it.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("passt sent a frame of {0} bytes (the frame protocol allows 1 to {MAX_FRAME})")]
    BadLength(u32),
    #[error("a frame of {0} bytes can't be sent to passt (the frame protocol allows 1 to {MAX_FRAME})")]
    FrameTooLong(usize),
    #[error("passt closed its end of the connection")]
    Closed,
    #[error("reading from passt: {0}")]
    Read(io::Error),
    #[error("writing to passt: {0}")]
    Write(io::Error),
}

/// What one [`FrameReader::fill`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// This many more bytes are buffered.
    Read(usize),
    /// The socket has nothing more for now.
    WouldBlock,
    /// The buffer is full of whole frames: take some before reading again.
    Full,
}

/// Frames arriving from passt, reassembled from the stream.
pub struct FrameReader {
    buf: Box<[u8]>,
    /// Buffered bytes not yet handed out are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader { buf: vec![0; BUFFER_BYTES].into_boxed_slice(), start: 0, end: 0 }
    }
}

impl FrameReader {
    /// Reads what `source` has into the free part of the buffer, once. The end of the stream
    /// is [`StreamError::Closed`], even with a partial frame buffered: passt never comes back.
    pub fn fill(&mut self, source: &mut impl Read) -> Result<Fill, StreamError> {
        self.make_room();
        if self.end == self.buf.len() {
            return Ok(Fill::Full);
        }
        loop {
            return match source.read(&mut self.buf[self.end..]) {
                Ok(0) => Err(StreamError::Closed),
                Ok(n) => {
                    // A reader that claims more than it was given is a bug in it, not ours to
                    // trust with our slice bounds.
                    self.end = (self.end + n).min(self.buf.len());
                    Ok(Fill::Read(n))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Fill::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Err(StreamError::Closed),
                Err(e) => Err(StreamError::Read(e)),
            };
        }
    }

    /// The next whole frame, if one is buffered; it stays until [`FrameReader::consume`], so
    /// a caller without room for it can leave it for later.
    pub fn frame(&self) -> Result<Option<&[u8]>, StreamError> {
        let pending = &self.buf[self.start..self.end];
        let Some(prefix) = pending.first_chunk::<LEN_BYTES>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix);
        let frame_len = usize::try_from(len).map_err(|_| StreamError::BadLength(len))?;
        if frame_len == 0 || frame_len > MAX_FRAME {
            return Err(StreamError::BadLength(len));
        }
        Ok(pending.get(LEN_BYTES..LEN_BYTES + frame_len))
    }

    /// Drops the frame [`FrameReader::frame`] returned.
    pub fn consume(&mut self) {
        if let Ok(Some(frame)) = self.frame() {
            self.start += LEN_BYTES + frame.len();
        }
    }

    /// How many bytes are buffered and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Moves the unconsumed bytes to the front when the free tail could not take a whole
    /// largest frame: one copy of a partial frame now and then, instead of a ring's
    /// wrap-around in every frame.
    fn make_room(&mut self) {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.start > 0 && self.buf.len() - self.end < LEN_BYTES + MAX_FRAME {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
    }
}

/// What one [`FrameWriter::flush`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Everything queued is sent.
    Done,
    /// The socket is full; the rest waits for it to become writable.
    Blocked,
}

/// Frames on their way to passt, queued until the socket takes them.
pub struct FrameWriter {
    buf: Vec<u8>,
    /// Bytes already sent are `buf[..sent]`.
    sent: usize,
}

impl Default for FrameWriter {
    fn default() -> Self {
        FrameWriter { buf: Vec::with_capacity(BUFFER_BYTES), sent: 0 }
    }
}

impl FrameWriter {
    /// Whether a frame of `len` bytes fits behind what is queued.
    pub fn has_room(&self, len: usize) -> bool {
        self.buf.len() - self.sent + LEN_BYTES + len <= BUFFER_BYTES
    }

    /// Whether anything waits to be sent.
    pub fn is_empty(&self) -> bool {
        self.sent == self.buf.len()
    }

    /// Queues a frame of `len` bytes, which `fill` writes into the slice it is given. `Ok(false)`
    /// when there is no room for it now ([`FrameWriter::has_room`]); a frame `fill` fails to
    /// write is not queued.
    pub fn push<E>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> Result<(), E>) -> Result<Result<bool, E>, StreamError> {
        let prefix = u32::try_from(len).ok().filter(|_| (1..=MAX_FRAME).contains(&len)).ok_or(StreamError::FrameTooLong(len))?;
        if !self.has_room(len) {
            return Ok(Ok(false));
        }
        if self.is_empty() {
            self.buf.clear();
            self.sent = 0;
        } else if self.buf.len() + LEN_BYTES + len > BUFFER_BYTES {
            self.buf.drain(..self.sent);
            self.sent = 0;
        }
        let at = self.buf.len();
        self.buf.extend_from_slice(&prefix.to_be_bytes());
        self.buf.resize(at + LEN_BYTES + len, 0);
        if let Err(e) = fill(&mut self.buf[at + LEN_BYTES..]) {
            self.buf.truncate(at);
            return Ok(Err(e));
        }
        Ok(Ok(true))
    }

    /// Queues `frame`, which is already in our memory.
    pub fn push_bytes(&mut self, frame: &[u8]) -> Result<bool, StreamError> {
        self.push(frame.len(), |out| {
            out.copy_from_slice(frame);
            Ok::<(), std::convert::Infallible>(())
        })
        .map(|queued| queued.unwrap_or_else(|never| match never {}))
    }

    /// Sends what the socket takes.
    pub fn flush(&mut self, sink: &mut impl Write) -> Result<Flush, StreamError> {
        while !self.is_empty() {
            match sink.write(&self.buf[self.sent..]) {
                Ok(0) => return Err(StreamError::Closed),
                Ok(n) => self.sent = (self.sent + n).min(self.buf.len()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flush::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => {
                    return Err(StreamError::Closed)
                }
                Err(e) => return Err(StreamError::Write(e)),
            }
        }
        Ok(Flush::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that hands out its bytes in the given pieces, then would block (or ends).
    struct Pieces {
        pieces: std::collections::VecDeque<Vec<u8>>,
        then_eof: bool,
    }

    impl Read for Pieces {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let Some(mut piece) = self.pieces.pop_front() else {
                return if self.then_eof { Ok(0) } else { Err(io::ErrorKind::WouldBlock.into()) };
            };
            let n = piece.len().min(out.len());
            out[..n].copy_from_slice(&piece[..n]);
            if n < piece.len() {
                self.pieces.push_front(piece.split_off(n));
            }
            Ok(n)
        }
    }

    fn encoded(frames: &[&[u8]]) -> Vec<u8> {
        frames.iter().flat_map(|f| (f.len() as u32).to_be_bytes().into_iter().chain(f.iter().copied())).collect()
    }

    fn drain(reader: &mut FrameReader) -> Result<Vec<Vec<u8>>, StreamError> {
        let mut frames = Vec::new();
        while let Some(frame) = reader.frame()? {
            frames.push(frame.to_vec());
            reader.consume();
        }
        Ok(frames)
    }

    #[test]
    fn frames_split_anywhere_come_out_whole() {
        let frames: [&[u8]; 3] = [b"a", &[7u8; 1514], b"hello"];
        let bytes = encoded(&frames);
        for cut in [1, 2, 3, 5, 7, 1000] {
            let mut source = Pieces { pieces: bytes.chunks(cut).map(<[u8]>::to_vec).collect(), then_eof: false };
            let mut reader = FrameReader::default();
            let mut got = Vec::new();
            while let Fill::Read(_) = reader.fill(&mut source).expect("no error") {
                got.extend(drain(&mut reader).expect("valid frames"));
            }
            assert_eq!(got, frames.map(<[u8]>::to_vec), "pieces of {cut}");
            assert_eq!(reader.buffered(), 0);
        }
    }

    #[test]
    fn zero_and_oversized_lengths_are_protocol_errors() {
        for len in [0u32, MAX_FRAME as u32 + 1, u32::MAX] {
            let mut reader = FrameReader::default();
            let mut source = Pieces { pieces: [len.to_be_bytes().to_vec()].into(), then_eof: false };
            assert_eq!(reader.fill(&mut source).ok(), Some(Fill::Read(4)));
            assert!(matches!(reader.frame(), Err(StreamError::BadLength(l)) if l == len), "{len}");
        }
    }

    #[test]
    fn the_largest_frame_passes_and_a_full_buffer_stops_reading() {
        let big = vec![0xabu8; MAX_FRAME];
        let bytes = encoded(&[big.as_slice(); 6]);
        let mut source = Pieces { pieces: [bytes].into(), then_eof: false };
        let mut reader = FrameReader::default();
        assert!(matches!(reader.fill(&mut source), Ok(Fill::Read(n)) if n == BUFFER_BYTES));
        assert_eq!(reader.fill(&mut source).ok(), Some(Fill::Full), "nothing consumed: no room");
        assert_eq!(reader.frame().ok().flatten().map(<[u8]>::len), Some(MAX_FRAME));
        reader.consume();
        assert!(matches!(reader.fill(&mut source), Ok(Fill::Read(_))), "one frame's room read again");
        assert_eq!(drain(&mut reader).expect("valid").len(), 4);
    }

    #[test]
    fn the_end_of_the_stream_is_closed_even_mid_frame() {
        let mut source = Pieces { pieces: [vec![0, 0, 0, 9, 1, 2]].into(), then_eof: true };
        let mut reader = FrameReader::default();
        assert_eq!(reader.fill(&mut source).ok(), Some(Fill::Read(6)));
        assert_eq!(reader.frame().ok(), Some(None));
        assert!(matches!(reader.fill(&mut source), Err(StreamError::Closed)));
    }

    /// A socket that takes at most `step` bytes a write and `room` bytes in all before it
    /// would block.
    struct Narrow {
        taken: Vec<u8>,
        step: usize,
        room: usize,
    }

    impl Write for Narrow {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let n = bytes.len().min(self.step).min(self.room);
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.taken.extend_from_slice(&bytes[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn push(writer: &mut FrameWriter, frame: &[u8]) -> bool {
        writer.push_bytes(frame).expect("valid length")
    }

    #[test]
    fn partial_writes_resume_where_they_stopped() {
        let mut writer = FrameWriter::default();
        let frames: [&[u8]; 3] = [b"one", &[9u8; 3000], b"three"];
        for frame in frames {
            assert!(push(&mut writer, frame));
        }
        let mut sink = Narrow { taken: Vec::new(), step: 7, room: 100 };
        assert_eq!(writer.flush(&mut sink).ok(), Some(Flush::Blocked));
        sink.room = usize::MAX;
        assert_eq!(writer.flush(&mut sink).ok(), Some(Flush::Done));
        assert!(writer.is_empty());
        assert_eq!(sink.taken, encoded(&frames));
    }

    #[test]
    fn a_full_writer_refuses_frames_until_it_drains() {
        let mut writer = FrameWriter::default();
        let big = vec![1u8; MAX_FRAME];
        let queued = std::iter::repeat_with(|| push(&mut writer, &big)).take_while(|&queued| queued).count();
        assert_eq!(queued, 4);
        let mut sink = Narrow { taken: Vec::new(), step: usize::MAX, room: LEN_BYTES + MAX_FRAME };
        assert_eq!(writer.flush(&mut sink).ok(), Some(Flush::Blocked));
        assert!(push(&mut writer, &big), "one frame sent, one frame's room");
        assert!(!push(&mut writer, b"x"));
    }

    #[test]
    fn bad_lengths_and_failed_fills_queue_nothing() {
        let mut writer = FrameWriter::default();
        assert!(matches!(writer.push(0, |_| Ok::<(), ()>(())), Err(StreamError::FrameTooLong(0))));
        assert!(matches!(writer.push(MAX_FRAME + 1, |_| Ok::<(), ()>(())), Err(StreamError::FrameTooLong(_))));
        assert!(matches!(writer.push(10, |_| Err("guest memory")), Ok(Err("guest memory"))));
        assert!(writer.is_empty());
    }

    #[test]
    fn a_closed_peer_is_closed_on_write() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        drop(theirs);
        let mut writer = FrameWriter::default();
        assert!(push(&mut writer, b"frame"));
        assert!(matches!(writer.flush(&mut &ours), Err(StreamError::Closed)));
    }
}
