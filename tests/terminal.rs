//! The user's terminal: raw mode while the guest runs, the escape key to quit, and the
//! terminal put back as it was on every way out. Run on a pseudo-terminal with a tiny guest
//! that prints a line and then sleeps with interrupts off (it would never exit by itself).

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Pty {
    master: File,
    slave: OwnedFd,
}

fn open_pty() -> Pty {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the two ints; the other arguments may be null.
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: openpty succeeded, so both are fresh descriptors that we now own.
    unsafe { Pty { master: File::from_raw_fd(master), slave: OwnedFd::from_raw_fd(slave) } }
}

fn local_flags(fd: &OwnedFd) -> libc::tcflag_t {
    // SAFETY: termios is plain data, filled by tcgetattr on a valid terminal descriptor.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open pty slave and termios a valid place to write.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut termios) }, 0);
    termios.c_lflag
}

/// Starts lguest on the pty with a guest that says "sleeping" and sleeps forever. It ignores
/// SIGTERM's Ctrl-Alt-Del, so it gets a second to shut down instead of the default ten.
fn start_sleeper(pty: &Pty, dir: &std::path::Path) -> Child {
    let kernel = tiny_guest(dir, "sleeper", |a| {
        let mut again = a.create_label();
        print(a, "sleeping\n");
        a.cli().expect("cli");
        a.set_label(&mut again).expect("label");
        a.hlt().expect("hlt");
        a.jmp(again).expect("jmp");
    });
    let stdio = || Stdio::from(pty.slave.try_clone().expect("dup pty"));
    lguest()
        .args(["run", "--memory", "64M", "--shutdown-timeout", "1", "--kernel"])
        .arg(kernel)
        .stdin(stdio())
        .stdout(stdio())
        .stderr(stdio())
        .spawn()
        .expect("spawn lguest")
}

/// Reads the pty until `needle` shows up (a deadline turns a hang into a failure).
fn wait_for_output(master: &mut File, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    // SAFETY: fcntl on our own descriptor, setting a flag.
    unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    while !String::from_utf8_lossy(&seen).contains(needle) {
        assert!(Instant::now() < deadline, "no {needle:?} in {:?}", String::from_utf8_lossy(&seen));
        let mut buffer = [0u8; 256];
        match master.read(&mut buffer) {
            Ok(n) => seen.extend_from_slice(&buffer[..n]),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[test]
fn ctrl_a_x_quits_and_restores_the_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pty = open_pty();
    let cooked = local_flags(&pty.slave);
    assert_ne!(cooked & libc::ICANON, 0, "a new pty starts cooked");
    let mut child = start_sleeper(&pty, dir.path());
    wait_for_output(&mut pty.master, "sleeping");
    // The guest starts before the terminal goes raw (its first instruction comes first), so
    // "sleeping" can be out a moment before: wait for raw mode, with a deadline.
    let deadline = Instant::now() + Duration::from_secs(30);
    while local_flags(&pty.slave) & (libc::ICANON | libc::ECHO | libc::ISIG) != 0 {
        assert!(Instant::now() < deadline, "the terminal never went raw while the guest ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    pty.master.write_all(b"\x01x").expect("type the escape");
    assert_eq!(wait_with_deadline(&mut child, Duration::from_secs(30)).code(), Some(0));
    assert_eq!(local_flags(&pty.slave), cooked, "terminal restored");
}

#[test]
fn sigterm_stops_the_vm_and_restores_the_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pty = open_pty();
    let cooked = local_flags(&pty.slave);
    let mut child = start_sleeper(&pty, dir.path());
    wait_for_output(&mut pty.master, "sleeping");
    // SAFETY: kill with a valid pid of our own child and a valid signal number.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(wait_with_deadline(&mut child, Duration::from_secs(30)).code(), Some(128 + libc::SIGTERM));
    assert_eq!(local_flags(&pty.slave), cooked, "terminal restored");
}
