//! Fuzzes the passt frame stream (`lguest::passt::frames`), the one parser of bytes from the
//! user-mode network's process: whatever passt sends, cut into whatever pieces the socket
//! hands out, the reader must give exactly the frames a plain reading of the stream finds, stop
//! at the first bad length (0, or more than MAX_FRAME), never buffer more than its fixed room,
//! and never panic. The other way, frames the writer queues and sends in arbitrary partial
//! writes must come out of a reader unchanged.
#![no_main]

use std::collections::VecDeque;
use std::io::{self, Read, Write};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lguest::passt::frames::{Fill, FrameReader, FrameWriter, StreamError, BUFFER_BYTES, LEN_BYTES, MAX_FRAME};

#[derive(Arbitrary, Debug)]
enum Input {
    /// Bytes from passt, and the sizes of the reads that deliver them.
    FromPasst { stream: Vec<u8>, cuts: Vec<u16> },
    /// Frames to passt (lengths out of range included), and how much each write takes.
    ToPasst { frames: Vec<Vec<u8>>, steps: Vec<u16> },
}

/// A socket handing out `bytes` in reads of the given sizes (0: would block once).
struct Pieces {
    bytes: VecDeque<u8>,
    cuts: VecDeque<u16>,
}

impl Read for Pieces {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.bytes.is_empty() {
            return Ok(0);
        }
        let cut = usize::from(self.cuts.pop_front().unwrap_or(u16::MAX));
        if cut == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = cut.min(out.len()).min(self.bytes.len());
        for (slot, byte) in out.iter_mut().zip(self.bytes.drain(..n)) {
            *slot = byte;
        }
        Ok(n)
    }
}

/// The frames a plain reading of the whole stream finds, and whether it ends in a bad length.
fn reference(stream: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut frames = Vec::new();
    let mut rest = stream;
    while let Some(prefix) = rest.first_chunk::<LEN_BYTES>() {
        let len = u32::from_be_bytes(*prefix) as usize;
        if len == 0 || len > MAX_FRAME {
            return (frames, true);
        }
        match rest.get(LEN_BYTES..LEN_BYTES + len) {
            Some(frame) => frames.push(frame),
            None => break,
        }
        rest = &rest[LEN_BYTES + len..];
    }
    (frames, false)
}

fn read_all(source: &mut impl Read) -> (Vec<Vec<u8>>, Option<StreamError>) {
    let mut reader = FrameReader::default();
    let mut frames = Vec::new();
    loop {
        loop {
            match reader.frame() {
                Ok(Some(frame)) => frames.push(frame.to_vec()),
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
            reader.consume();
        }
        assert!(reader.buffered() <= BUFFER_BYTES);
        match reader.fill(source) {
            Ok(Fill::Read(_) | Fill::WouldBlock) => {}
            Ok(Fill::Full) => panic!("full with no whole frame buffered"),
            Err(e) => return (frames, Some(e)),
        }
    }
}

/// A socket taking writes of the given sizes (0: would block once).
struct Narrow {
    taken: Vec<u8>,
    steps: VecDeque<u16>,
}

impl Write for Narrow {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let step = usize::from(self.steps.pop_front().unwrap_or(u16::MAX));
        if step == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = step.min(bytes.len());
        self.taken.extend_from_slice(&bytes[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|input: Input| match input {
    Input::FromPasst { stream, cuts } => {
        let (expected, bad) = reference(&stream);
        let mut source = Pieces { bytes: stream.iter().copied().collect(), cuts: cuts.into() };
        let (frames, error) = read_all(&mut source);
        assert_eq!(frames, expected);
        match error {
            Some(StreamError::BadLength(_)) => assert!(bad),
            Some(StreamError::Closed) => assert!(!bad),
            other => panic!("{other:?}"),
        }
    }
    Input::ToPasst { frames, steps } => {
        let mut writer = FrameWriter::default();
        let mut sink = Narrow { taken: Vec::new(), steps: steps.into() };
        let mut sent = Vec::new();
        for frame in &frames {
            match writer.push_bytes(frame) {
                Ok(true) => sent.push(frame.clone()),
                Ok(false) => {
                    // Full: drain (the socket keeps taking), then it must fit.
                    while writer.flush(&mut sink).is_ok_and(|f| f != lguest::passt::frames::Flush::Done) {}
                    assert!(writer.push_bytes(frame).expect("valid"), "an empty writer takes any valid frame");
                    sent.push(frame.clone());
                }
                Err(StreamError::FrameTooLong(len)) => assert!(len == 0 || len > MAX_FRAME),
                Err(e) => panic!("{e}"),
            }
        }
        while writer.flush(&mut sink).is_ok_and(|f| f != lguest::passt::frames::Flush::Done) {}
        let (received, end) = read_all(&mut &sink.taken[..]);
        assert_eq!(received, sent);
        assert!(matches!(end, Some(StreamError::Closed)));
    }
});
