//! CMD on a terminal, in the guest: when lguest's stdin is a terminal, the init opens a pty,
//! makes its other end CMD's controlling terminal and stdio, and relays between the pty and
//! lguest's one tty stream. The pty does the line discipline (echo, Ctrl-C as SIGINT, job
//! control) in the guest, as a terminal does; lguest's own terminal is raw meanwhile.
//! `winsize` lines on the control stream resize the pty (SIGWINCH for CMD); `kill` lines
//! signal CMD's process group, as without a terminal ([`super::guest::follow_host`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::control::Report;
use super::guest::{command_for, follow_host, spawn_and_reap, CmdGroup, InitError};
use super::request::{Request, WinSize};

/// How long CMD's last output may take to reach the stream once CMD has ended (a process it
/// left behind may keep the pty open forever).
const DRAIN: Duration = Duration::from_secs(2);

pub fn run(request: &Request, stream: OwnedFd, control: &mut File, group: Arc<CmdGroup>) -> Result<Report, InitError> {
    let error = |what: &str| {
        let what = what.to_string();
        move |source| InitError::Sys { what, source }
    };
    let (master, slave) = open_pty().map_err(error("cannot open a pty"))?;
    if let Some(size) = request.tty {
        set_size(&master, size);
    }
    let stream = File::from(stream);
    let (to_guest, from_guest) = (stream.try_clone().map_err(error("tty stream"))?, stream);
    let (pty_in, pty_out) = (master.try_clone().map_err(error("pty"))?, master.try_clone().map_err(error("pty"))?);
    std::thread::spawn(move || copy(from_guest, File::from(pty_in)));
    let (drained, wait_drained) = mpsc::channel();
    let out_stream = to_guest.try_clone().map_err(error("tty stream"))?;
    std::thread::spawn(move || {
        copy(File::from(pty_out), out_stream);
        let _ = drained.send(());
    });
    follow_host(control, Some(master), &group)?;
    let mut command = command_for(request, true);
    let stdio = |fd: &OwnedFd| fd.try_clone().map(std::process::Stdio::from);
    command.stdin(stdio(&slave).map_err(error("pty"))?).stdout(stdio(&slave).map_err(error("pty"))?).stderr(stdio(&slave).map_err(error("pty"))?);
    drop(slave);
    let ending = spawn_and_reap(command, control, &group);
    let _ = wait_drained.recv_timeout(DRAIN);
    // SAFETY: shutdown on a socket we own.
    unsafe { libc::shutdown(to_guest.as_raw_fd(), libc::SHUT_WR) };
    ending
}

/// Copies until either end closes (the pty's master reads EIO once every slave is closed).
fn copy(mut from: File, mut to: File) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) if to.write_all(&buffer[..n]).is_ok() => {}
            Ok(_) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

pub(super) fn set_size(master: &OwnedFd, size: WinSize) {
    let winsize = libc::winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is valid for the call.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
}

/// A new pty: its master, and its slave opened without becoming our controlling terminal.
fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt takes flags only; a non-negative result is a new fd we own.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: grantpt and unlockpt take the fd; ptsname_r writes at most `name.len()` bytes.
    let rc = unsafe { libc::grantpt(fd) | libc::unlockpt(fd) | libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ptsname_r wrote a NUL-terminated path into `name`.
    let slave = unsafe { libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `slave` is a new descriptor owned by nobody else.
    Ok((master, unsafe { OwnedFd::from_raw_fd(slave) }))
}
