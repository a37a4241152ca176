//! The user-mode network behind `--net user`: a passt process, started and watched by us.
//!
//! passt (<https://passt.top>, Debian's `passt`) is a user-mode network stack: it answers the
//! guest's DHCP, NDP and DNS, turns the guest's TCP and UDP flows into ordinary sockets of its
//! own on the host, and forwards host ports to the guest. It needs no privileges and no host
//! set-up, which is the point: a guest gets a network without a tap and without root.
//!
//! When the VM is built, [`Passt::start`] finds `passt` on PATH and starts it with one end of a
//! socketpair as its `--fd`; the other end is the network card's "wire", a stream of frames
//! ([`frames`]). A thread of ours waits for the process: it forwards what passt says on its
//! stderr, and when passt ends on its own it says so on ours and marks the backend dead (the
//! card's worker sees the socket close, too, and takes the guest's link down). Dropping the
//! [`Passt`] kills the process and reaps it; if lguest itself dies, passt sees the socket
//! close and exits on its own.
//!
//! We trust passt as much as any program on the user's PATH, which is to say: its frames are
//! checked like any outside bytes, and its death is a state of the VM, not a failure of it.

pub mod frames;
pub mod link;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::config::{Forward, Protocol};

/// The program we look for on PATH.
pub const PROGRAM: &str = "passt";

/// Why the user network could not start.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("--net user needs passt, the user-mode network stack, and there is no 'passt' on PATH: install it (apt-get install passt)")]
    Missing,
    #[error("cannot start passt for --net user: {0}")]
    Spawn(std::io::Error),
    #[error("cannot make the socket pair for passt: {0}")]
    Socket(std::io::Error),
    #[error("cannot watch passt (pidfd_open): {0}")]
    Watch(std::io::Error),
}

/// A running passt, which stops when this is dropped.
pub struct Passt {
    pid: u32,
    /// Signals reach this process and no other, even after its pid is reused.
    pidfd: OwnedFd,
    state: Arc<State>,
    waiter: Option<JoinHandle<()>>,
}

/// What the waiting thread and the rest of lguest share.
#[derive(Default)]
struct State {
    /// We are stopping passt ourselves: its end is no news.
    stopping: AtomicBool,
    /// passt has exited (and been reaped).
    exited: AtomicBool,
}

impl Passt {
    /// Starts passt with `forwards`, on a socketpair whose other end is returned, non-blocking.
    pub fn start(forwards: &[Forward]) -> Result<(Passt, UnixStream), PasstError> {
        Passt::start_program(PROGRAM, forwards)
    }

    /// [`Passt::start`] with another program than the one on PATH (tests).
    fn start_program(program: &str, forwards: &[Forward]) -> Result<(Passt, UnixStream), PasstError> {
        let (ours, theirs) = UnixStream::pair().map_err(PasstError::Socket)?;
        ours.set_nonblocking(true).map_err(PasstError::Socket)?;
        let mut child = command(program, &theirs, forwards).spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => PasstError::Missing,
            _ => PasstError::Spawn(e),
        })?;
        // Only passt may hold its end: were it left open here, passt's death would not close
        // the stream, and the card would never notice.
        drop(theirs);
        let pidfd = match pidfd_open(child.id()) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(PasstError::Watch(e));
            }
        };
        let state = Arc::new(State::default());
        let (pid, stderr) = (child.id(), child.stderr.take());
        let watched = Arc::clone(&state);
        let waiter = crate::threads::spawn("passt-waiter", move || wait(child, stderr, &watched)).map_err(PasstError::Spawn)?;
        Ok((Passt { pid, pidfd, state, waiter: Some(waiter) }, ours))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether passt still runs (as far as its reaping tells).
    pub fn is_alive(&self) -> bool {
        !self.state.exited.load(Ordering::Acquire)
    }
}

impl Passt {
    /// Kills passt, quietly: its end is our doing, not news. passt keeps no state worth a
    /// graceful end; ESRCH (already reaped) is fine.
    pub fn stop(&self) {
        self.state.stopping.store(true, Ordering::Release);
        let _ = pidfd_send_signal(&self.pidfd, libc::SIGKILL);
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        self.stop();
        if let Some(waiter) = self.waiter.take() {
            let _ = waiter.join();
        }
    }
}

/// `passt -f -q --fd N [-t SPEC]... [-u SPEC]...`, with `theirs` left open across exec.
fn command(program: &str, theirs: &UnixStream, forwards: &[Forward]) -> Command {
    let fd: RawFd = theirs.as_raw_fd();
    let mut command = Command::new(program);
    // Foreground (we supervise it), quiet (its errors still come), our socket, one client.
    command.args(["--foreground", "--quiet", "--fd", &fd.to_string()]);
    // passt refuses to keep root and says so; saying which user up front spares the warning.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        command.args(["--runas", "nobody"]);
    }
    for forward in forwards {
        command.arg(match forward.protocol {
            Protocol::Tcp => "--tcp-ports",
            Protocol::Udp => "--udp-ports",
        });
        command.arg(port_spec(forward));
    }
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: between fork and exec the closure only calls fcntl, which is async-signal-safe,
    // on an fd the child inherited. Clearing close-on-exec here, in the child, rather than on
    // the socket itself, keeps any other child we start at the same time from inheriting it.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// passt's `-t`/`-u` spec: `[ADDR/]HOSTPORT:GUESTPORT`.
fn port_spec(forward: &Forward) -> String {
    match forward.host_addr {
        Some(addr) => format!("{addr}/{}:{}", forward.host_port, forward.guest_port),
        None => format!("{}:{}", forward.host_port, forward.guest_port),
    }
}

/// The waiting thread: passt's stderr, line by line, then its exit.
fn wait(mut child: Child, stderr: Option<ChildStderr>, state: &State) {
    if let Some(stderr) = stderr {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            // Without a system logger (containers, the lab), passt reports each message it
            // could not send there as well: noise, the message itself comes next.
            if !line.is_empty() && !line.starts_with("Failed to send") {
                eprintln!("lguest: passt: {line}");
            }
        }
    }
    let status = child.wait();
    state.exited.store(true, Ordering::Release);
    if !state.stopping.load(Ordering::Acquire) {
        eprintln!("lguest: passt (pid {}) {}; the guest's network link is down, the VM keeps running", child.id(), describe(status));
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            (None, None) => format!("ended ({status})"),
        },
        Err(e) => format!("could not be waited for ({e})"),
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_send_signal(pidfd: &OwnedFd, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a valid pidfd, a signal number, no siginfo (NULL) and no flags: nothing is
    // read from or written to our memory.
    let result = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0) };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
