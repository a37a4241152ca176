//! The control stream between `lguest exec` and the guest's init: one line per message, in
//! text so a test (or a person with `socat`) can read it.
//!
//! The init tells the host how far it got and how CMD ended ([`Report`]); the host tells the
//! init when its terminal changed size and which signal to hand on to CMD ([`HostMessage`]). Each side parses what the other
//! sends as hostile: a line longer than [`MAX_LINE`] or of unknown shape is refused, never
//! trusted, and a status is turned into ours only if it is one a process can have.

use super::request::WinSize;

/// The longest line either side sends ("failed 127 " and a message the init cuts short).
pub const MAX_LINE: usize = 1024;

/// What the guest's init says, in the order it says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Modules loaded, files mounted, streams connected.
    Init,
    /// CMD is running.
    Started,
    /// CMD exited with this status.
    Exited(u8),
    /// CMD was killed by this signal.
    Signalled(u8),
    /// CMD could not be run (or the init failed before it): our status, and why.
    Failed(u8, String),
}

impl Report {
    pub fn to_line(&self) -> String {
        match self {
            Report::Init => "init\n".into(),
            Report::Started => "started\n".into(),
            Report::Exited(code) => format!("exit {code}\n"),
            Report::Signalled(signal) => format!("signal {signal}\n"),
            Report::Failed(code, why) => format!("failed {code} {}\n", one_line(why)),
        }
    }

    /// One line from the init (without its `\n`), or None when it is not one of ours.
    pub fn parse(line: &[u8]) -> Option<Report> {
        if line.len() > MAX_LINE {
            return None;
        }
        let line = std::str::from_utf8(line).ok()?;
        let (word, rest) = match line.split_once(' ') {
            Some((word, rest)) => (word, Some(rest)),
            None => (line, None),
        };
        match (word, rest) {
            ("init", None) => Some(Report::Init),
            ("started", None) => Some(Report::Started),
            ("exit", Some(code)) => Some(Report::Exited(number(code)?)),
            ("signal", Some(signal)) => number(signal).filter(|s| (1..=64).contains(s)).map(Report::Signalled),
            ("failed", Some(rest)) => {
                let (code, why) = rest.split_once(' ')?;
                Some(Report::Failed(number(code)?, why.to_string()))
            }
            _ => None,
        }
    }

    /// The status `lguest exec` exits with: CMD's own, 128+N for signal N (as a shell says),
    /// or the code the init chose for a command it could not run (126, 127 as shells do).
    pub fn exit_status(&self) -> Option<u8> {
        match self {
            Report::Exited(code) | Report::Failed(code, _) => Some(*code),
            Report::Signalled(signal) => Some(128 + signal),
            Report::Init | Report::Started => None,
        }
    }
}

/// Decimal digits only, as both sides write them (no sign, no space), in `T`'s range.
fn number<T: std::str::FromStr>(text: &str) -> Option<T> {
    text.bytes().all(|b| b.is_ascii_digit()).then(|| text.parse().ok()).flatten()
}

/// The message on one line, cut to fit [`MAX_LINE`].
fn one_line(why: &str) -> String {
    let mut text: String = why.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let mut cut = MAX_LINE - 20;
    while text.len() > cut {
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// The signals lguest hands on to CMD ([`super::signals`]): those a user or a supervisor
/// sends to ask a program to stop, hang up, quit, or do its own thing. The init refuses any
/// other number in a `kill` line.
pub const FORWARDED_SIGNALS: [i32; 6] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2];

/// What lguest tells the init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostMessage {
    /// The terminal is now this size: resize CMD's pty.
    Resize(WinSize),
    /// Send this signal (one of [`FORWARDED_SIGNALS`]) to CMD's process group.
    Kill(i32),
}

impl HostMessage {
    pub fn to_line(self) -> String {
        match self {
            HostMessage::Resize(size) => format!("winsize {} {}\n", size.rows, size.cols),
            HostMessage::Kill(signal) => format!("kill {signal}\n"),
        }
    }

    /// One line from lguest (without its `\n`), or None when it is not one of ours.
    pub fn parse(line: &[u8]) -> Option<HostMessage> {
        let line = std::str::from_utf8(line).ok()?;
        let mut words = line.split(' ');
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("winsize"), Some(rows), Some(cols), None) => Some(HostMessage::Resize(WinSize { rows: number(rows)?, cols: number(cols)? })),
            (Some("kill"), Some(signal), None, None) => number(signal).filter(|s| FORWARDED_SIGNALS.contains(s)).map(HostMessage::Kill),
            _ => None,
        }
    }
}

/// Splits a stream into lines of at most [`MAX_LINE`] bytes; a longer one is dropped whole.
#[derive(Default)]
pub struct LineReader {
    pending: Vec<u8>,
    overlong: bool,
}

impl LineReader {
    /// Adds `bytes` and returns the lines they complete, without their `\n`.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                if !std::mem::take(&mut self.overlong) {
                    lines.push(std::mem::take(&mut self.pending));
                }
                self.pending.clear();
            } else if self.pending.len() < MAX_LINE {
                self.pending.push(byte);
            } else {
                self.overlong = true;
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_survive_their_line() {
        for report in [Report::Init, Report::Started, Report::Exited(42), Report::Signalled(9), Report::Failed(127, "no such file".into())] {
            let line = report.to_line();
            assert_eq!(Report::parse(line.trim_end_matches('\n').as_bytes()), Some(report));
        }
    }

    #[test]
    fn statuses_map_as_a_shell_maps_them() {
        assert_eq!(Report::Exited(0).exit_status(), Some(0));
        assert_eq!(Report::Exited(1).exit_status(), Some(1));
        assert_eq!(Report::Exited(42).exit_status(), Some(42));
        assert_eq!(Report::Signalled(9).exit_status(), Some(137));
        assert_eq!(Report::Signalled(15).exit_status(), Some(143));
        assert_eq!(Report::Failed(127, String::new()).exit_status(), Some(127));
        assert_eq!(Report::Started.exit_status(), None);
    }

    #[test]
    fn hostile_lines_are_refused() {
        for bad in [&b""[..], b"exit", b"exit 256", b"exit -1", b"exit +1", b"exit 1 2", b"signal 0", b"signal 65", b"signal 200",
            b"failed 127", b"failed x y", b"started ", b"INIT", &[0xff, 0xfe], b"exit \xff"] {
            assert_eq!(Report::parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(Report::parse(format!("failed 1 {}", "x".repeat(MAX_LINE)).as_bytes()), None);
    }

    #[test]
    fn a_long_or_multiline_message_stays_one_line() {
        let line = Report::Failed(1, format!("a\nb{}", "é".repeat(MAX_LINE))).to_line();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(matches!(Report::parse(line.trim_end().as_bytes()), Some(Report::Failed(1, why)) if why.starts_with("a b")));
    }

    #[test]
    fn host_messages_survive_their_line() {
        let messages = [HostMessage::Resize(WinSize { rows: 50, cols: 132 })].into_iter().chain(FORWARDED_SIGNALS.map(HostMessage::Kill));
        for message in messages {
            assert_eq!(HostMessage::parse(message.to_line().trim_end().as_bytes()), Some(message));
        }
        assert_eq!(HostMessage::parse(b"kill 15"), Some(HostMessage::Kill(libc::SIGTERM)));
    }

    #[test]
    fn hostile_host_lines_are_refused() {
        let bad: [&[u8]; 20] = [b"winsize 1", b"winsize 1 2 3", b"winsize 70000 1", b"winsize a b", b"size 1 2", b"winsize -1 2",
            b"kill", b"kill 9", b"kill 0", b"kill 19", b"kill 64", b"kill 300", b"kill -15", b"kill +15", b"kill 15 15", b"kill  15",
            b"KILL 15", b"kill 1\xff", &[0xff; 8], b""];
        for line in bad {
            assert_eq!(HostMessage::parse(line), None, "{:?}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn the_line_reader_splits_across_reads_and_drops_overlong_lines() {
        let mut reader = LineReader::default();
        assert!(reader.feed(b"exi").is_empty());
        assert_eq!(reader.feed(b"t 0\nstar"), vec![b"exit 0".to_vec()]);
        assert_eq!(reader.feed(b"ted\n"), vec![b"started".to_vec()]);
        let mut flood = vec![b'x'; MAX_LINE * 3];
        flood.extend_from_slice(b"\ninit\n");
        assert_eq!(reader.feed(&flood), vec![b"init".to_vec()], "the overlong line is dropped, the next kept");
    }
}
