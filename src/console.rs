//! The user's side of the guest's console: our terminal, stdin and signals.
//!
//! When stdin is a terminal we put it in raw mode, so every key (Ctrl-C included) goes to the
//! guest, and we put it back on every way out: a normal exit, an error, a signal, a panic. The
//! escape sequence Ctrl-A x quits; Ctrl-A Ctrl-A sends a literal Ctrl-A. When stdin is a pipe
//! or a file its bytes go to the guest unchanged, so scripts and tests can drive the console.
//!
//! Signals that would kill us (SIGINT, SIGTERM, SIGHUP, SIGQUIT) are blocked in every thread
//! and collected by one watcher thread, which stops the VM in an orderly way.

use std::io::Read;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use crate::bus::lock;
use crate::devices::serial::SerialPort;
use crate::stop::{StopReason, Stopper};

const CTRL_A: u8 = 0x01;
const QUIT_KEY: u8 = b'x';
const STOP_SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// The terminal settings to put back, if we changed them.
static SAVED_TERMIOS: OnceLock<Mutex<Option<libc::termios>>> = OnceLock::new();

fn saved() -> &'static Mutex<Option<libc::termios>> {
    SAVED_TERMIOS.get_or_init(|| Mutex::new(None))
}

pub fn stdin_is_terminal() -> bool {
    // SAFETY: isatty only inspects the descriptor number.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

/// Puts the terminal on stdin into raw mode, remembering how it was. Restored by [`restore_terminal`],
/// which also runs from the panic hook installed here.
pub fn enter_raw_mode() {
    // SAFETY: termios is plain data; tcgetattr fills it or fails, and we check which.
    let mut original: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: stdin is a valid descriptor and `original` a valid termios to write to.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut original) } != 0 {
        return;
    }
    let mut raw = original;
    // SAFETY: cfmakeraw only rewrites the flags of the termios it is given.
    unsafe { libc::cfmakeraw(&mut raw) };
    // Keep output post-processing so our own messages still start at the left margin.
    raw.c_oflag |= libc::OPOST;
    *lock(saved()) = Some(original);
    // SAFETY: stdin is valid and `raw` a fully initialised termios.
    unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) };
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_terminal();
        previous_hook(info);
    }));
}

/// Puts the terminal back as we found it. Safe to call any number of times, from anywhere.
pub fn restore_terminal() {
    if let Some(original) = lock(saved()).take() {
        // SAFETY: stdin is valid and `original` is what tcgetattr gave us.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &original) };
    }
}

/// Blocks the stop signals in this thread and every thread it starts from now on, and starts
/// the thread that waits for them. Call before starting any other thread.
pub fn watch_signals(stopper: Arc<Stopper>) -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid constants.
    unsafe {
        libc::sigemptyset(&mut set);
        for signal in STOP_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    thread::Builder::new().name("signals".into()).spawn(move || loop {
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` and `signal` outlive the call; sigwait writes only `signal`.
        if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
            stopper.stop(StopReason::Signal(signal));
        }
    })?;
    Ok(())
}

/// Turns keystrokes into guest input, watching for the escape sequence.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    after_ctrl_a: bool,
}

impl EscapeFilter {
    /// Appends to `out` what the guest should receive; returns true when the user quit.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &byte in input {
            if self.after_ctrl_a {
                self.after_ctrl_a = false;
                match byte {
                    QUIT_KEY => return true,
                    CTRL_A => out.push(CTRL_A),
                    other => out.extend_from_slice(&[CTRL_A, other]),
                }
            } else if byte == CTRL_A {
                self.after_ctrl_a = true;
            } else {
                out.push(byte);
            }
        }
        false
    }
}

/// Starts the thread that copies stdin into the guest's UART. `escape` enables Ctrl-A x.
pub fn pump_stdin(serial: Arc<Mutex<SerialPort>>, stopper: Arc<Stopper>, escape: bool) -> std::io::Result<()> {
    thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buffer = [0u8; 256];
        let mut filter = EscapeFilter::default();
        let mut input = Vec::with_capacity(buffer.len() * 2);
        loop {
            let count = match stdin.read(&mut buffer) {
                Ok(0) => return, // end of input: the guest runs on without us
                Ok(count) => count,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return tracing::debug!("stdin closed: {e}"),
            };
            input.clear();
            if escape {
                if filter.feed(&buffer[..count], &mut input) {
                    return stopper.stop(StopReason::UserQuit);
                }
            } else {
                input.extend_from_slice(&buffer[..count]);
            }
            if !deliver(&serial, &stopper, &input) {
                return;
            }
        }
    })?;
    Ok(())
}

/// Feeds `input` into the UART as its FIFO drains. Returns false once the VM has stopped.
fn deliver(serial: &Mutex<SerialPort>, stopper: &Stopper, mut input: &[u8]) -> bool {
    while !input.is_empty() {
        let taken = lock(serial).receive(input);
        input = &input[taken..];
        if taken == 0 {
            if stopper.is_stopped() {
                return false;
            }
            // The guest has not read its FIFO yet; it drains at the guest's pace.
            thread::sleep(Duration::from_millis(1));
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let quit = EscapeFilter::default().feed(input, &mut out);
        (out, quit)
    }

    #[test]
    fn ordinary_keys_pass_through() {
        assert_eq!(filter(b"ls -l\r\x03"), (b"ls -l\r\x03".to_vec(), false));
    }

    #[test]
    fn ctrl_a_x_quits() {
        assert_eq!(filter(b"ab\x01x"), (b"ab".to_vec(), true));
    }

    #[test]
    fn ctrl_a_twice_sends_one_and_other_keys_keep_theirs() {
        assert_eq!(filter(b"\x01\x01"), (vec![CTRL_A], false));
        assert_eq!(filter(b"\x01c"), (vec![CTRL_A, b'c'], false));
    }

    #[test]
    fn the_escape_can_span_two_reads() {
        let mut filter = EscapeFilter::default();
        let mut out = Vec::new();
        assert!(!filter.feed(b"a\x01", &mut out));
        assert!(filter.feed(b"x", &mut out));
        assert_eq!(out, b"a");
    }
}
