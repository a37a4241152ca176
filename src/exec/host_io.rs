//! lguest's side of the exec guest's streams: Unix sockets where the vsock device delivers
//! the init's connections (a guest connection to host port P reaches `<uds>_P`, see
//! [`crate::virtio::vsock::muxer`]), and one thread per stream relaying it to or from our own
//! stdin, stdout and stderr.
//!
//! The control stream brings the init's [`Report`]s. Once CMD's ending has come and every
//! output stream has reached its end of file (the init half-closes them after CMD, behind
//! the last bytes CMD wrote), nothing of the guest's is left to wait for: we stop the VM
//! ourselves, with no guest shutdown to sit through.
//!
//! What the guest sends is hostile: reports are parsed by [`Report::parse`] (bounded lines),
//! output bytes are only copied.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::control::{LineReader, Report};
use super::signals::Link;
use super::request::{WinSize, PORT_CONTROL, PORT_STDERR, PORT_STDIN, PORT_STDOUT, PORT_TTY};
use crate::bus::lock;
use crate::stop::{StopReason, Stopper};
use crate::timeline::{Milestone, Timeline};

/// How long we wait, once CMD has ended, for its output to finish arriving.
const OUTPUT_GRACE: Duration = Duration::from_secs(10);

/// The listening sockets, bound before the VM starts.
pub struct Listeners {
    control: UnixListener,
    /// stdin, stdout, stderr; or the one tty stream.
    streams: Vec<(u32, UnixListener)>,
}

/// Which output streams have ended, and how CMD did.
#[derive(Default)]
pub struct Outcome {
    ending: Mutex<Option<Report>>,
}

impl Outcome {
    /// CMD's ending as the init reported it, if it did.
    pub fn ending(&self) -> Option<Report> {
        lock(&self.ending).clone()
    }
}

/// `<uds>_<port>`, as the vsock device names a host port's socket.
fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

impl Listeners {
    pub fn bind(uds: &Path, tty: bool) -> io::Result<Listeners> {
        let ports: &[u32] = if tty { &[PORT_TTY] } else { &[PORT_STDIN, PORT_STDOUT, PORT_STDERR] };
        let streams = ports.iter().map(|&port| Ok((port, UnixListener::bind(port_path(uds, port))?))).collect::<io::Result<_>>()?;
        Ok(Listeners { control: UnixListener::bind(port_path(uds, PORT_CONTROL))?, streams })
    }

    /// Starts the relays; the VM is stopped through `stopper` once CMD has ended and its
    /// output is all out. `link` learns of the control stream and of CMD's start and end.
    pub fn serve(self, stopper: Arc<Stopper>, timeline: Arc<Timeline>, link: Arc<Link>) -> Arc<Outcome> {
        let outcome = Arc::new(Outcome::default());
        let (output_done, outputs_done) = mpsc::channel();
        let mut outputs = 0;
        for (port, listener) in self.streams {
            outputs += usize::from(port != PORT_STDIN);
            let done = output_done.clone();
            std::thread::spawn(move || relay(port, listener, done));
        }
        let control = Control { outcome: outcome.clone(), stopper, timeline, link, outputs, outputs_done };
        std::thread::spawn(move || control.serve(self.control));
        outcome
    }
}

/// Accepts the init's connection on `port` and copies: our stdin to it, or it to our stdout
/// or stderr (the tty stream both ways).
fn relay(port: u32, listener: UnixListener, done: Sender<()>) {
    let Ok((stream, _)) = listener.accept() else { return };
    drop(listener);
    match port {
        PORT_STDIN => return feed_stdin(stream), // an input: its end is no output's
        PORT_TTY => {
            if let Ok(input) = stream.try_clone() {
                std::thread::spawn(move || feed_stdin(input));
            }
            copy(stream, std::io::stdout());
        }
        PORT_STDERR => copy(stream, std::io::stderr()),
        _ => copy(stream, std::io::stdout()),
    }
    let _ = done.send(());
}

/// Our stdin into `stream`; our end of file becomes the stream's (a half-close).
fn feed_stdin(mut stream: UnixStream) {
    // SAFETY: fd 0 stays open for the whole process; ManuallyDrop keeps this File from closing it.
    let stdin = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(0) });
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match (&*stdin).read(&mut buffer) {
            Ok(0) => break,
            Ok(n) if stream.write_all(&buffer[..n]).is_ok() => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// `stream` to `out`, flushed as it comes, until the stream ends.
fn copy(mut stream: UnixStream, mut out: impl Write) {
    let mut buffer = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => {
                if out.write_all(&buffer[..n]).and_then(|()| out.flush()).is_err() {
                    return; // our reader is gone (a closed pipe): the rest is dropped
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The control stream's reader: the init's reports. (What we send the init on it, sizes and
/// signals, [`super::signals`] writes.)
struct Control {
    outcome: Arc<Outcome>,
    stopper: Arc<Stopper>,
    timeline: Arc<Timeline>,
    link: Arc<Link>,
    outputs: usize,
    outputs_done: Receiver<()>,
}

impl Control {
    fn serve(self, listener: UnixListener) {
        let Ok((mut stream, _)) = listener.accept() else { return };
        drop(listener);
        if let Ok(writer) = stream.try_clone() {
            self.link.connected(writer);
        }
        let (mut lines, mut buffer) = (LineReader::default(), [0u8; 1024]);
        while let Ok(n @ 1..) = stream.read(&mut buffer) {
            for report in lines.feed(&buffer[..n]).iter().filter_map(|line| Report::parse(line)) {
                if self.take(report) {
                    return self.finish();
                }
            }
        }
    }

    /// Notes a report; true once it is CMD's ending.
    fn take(&self, report: Report) -> bool {
        match report {
            Report::Init => self.timeline.mark(Milestone::GuestInitConnected),
            Report::Started => {
                self.timeline.mark(Milestone::CommandStarted);
                self.link.started();
            }
            ending => {
                self.timeline.mark(Milestone::CommandExited);
                self.link.ended();
                *lock(&self.outcome.ending) = Some(ending);
                return true;
            }
        }
        false
    }

    /// Waits for the output streams' ends (boundedly), then stops the VM.
    fn finish(self) {
        let deadline = std::time::Instant::now() + OUTPUT_GRACE;
        for _ in 0..self.outputs {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if self.outputs_done.recv_timeout(left).is_err() {
                tracing::warn!("the guest's output did not end within {} s of CMD", OUTPUT_GRACE.as_secs());
                break;
            }
        }
        self.stopper.stop(StopReason::PowerOff);
    }
}

/// Our terminal's size (stdout's), if stdout is one.
pub fn terminal_size() -> Option<WinSize> {
    // SAFETY: winsize is plain data that TIOCGWINSZ fills.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize to a valid pointer.
    let rc = unsafe { libc::ioctl(std::io::stdout().as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (rc == 0).then_some(WinSize { rows: size.ws_row, cols: size.ws_col })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(dir: &Path, port: u32) -> UnixStream {
        UnixStream::connect(port_path(&dir.join("v"), port)).expect("connect")
    }

    #[test]
    fn the_vm_is_stopped_once_cmd_ended_and_its_outputs_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listeners = Listeners::bind(&dir.path().join("v"), false).expect("bind");
        let (stopper, timeline) = (Arc::new(Stopper::default()), Arc::new(Timeline::new(std::time::Instant::now())));
        let outcome = listeners.serve(stopper.clone(), timeline.clone(), Arc::new(Link::default()));
        let mut control = connect(dir.path(), PORT_CONTROL);
        let outputs = [connect(dir.path(), PORT_STDOUT), connect(dir.path(), PORT_STDERR)];
        control.write_all(b"init\nstarted\njunk\nexit 999\nexit 42\n").expect("reports");
        drop(outputs);
        assert!(matches!(stopper.wait(), StopReason::PowerOff));
        assert_eq!(outcome.ending(), Some(Report::Exited(42)));
        assert!(timeline.at(Milestone::CommandStarted).is_some() && timeline.at(Milestone::CommandExited).is_some());
    }
}
