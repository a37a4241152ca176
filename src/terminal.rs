//! The user's side of the guest's console: our terminal, stdin and signals.
//!
//! What the user types goes to whichever console the guest was given (a [`ConsoleSink`]): the
//! 16550A UART, which takes it as fast as the guest drains its FIFO, or the virtio console,
//! which holds it until the guest posts buffers for it.
//!
//! When stdin is a terminal we put it in raw mode, so every key (Ctrl-C included) goes to the
//! guest, and we put it back on every way out: a normal exit, an error, a signal, a panic. The
//! escape sequence Ctrl-A x quits; Ctrl-A Ctrl-A sends a literal Ctrl-A. When stdin is a pipe
//! or a file its bytes go to the guest unchanged, so scripts and tests can drive the console.
//!
//! Signals that would kill us (SIGINT, SIGTERM, SIGHUP, SIGQUIT) are blocked in every thread
//! and collected by one watcher thread. SIGTERM, and SIGINT when stdin is not a terminal, ask
//! the guest to shut down (see [`crate::stop::Stopper::request_shutdown`]); the others stop
//! the VM at once, in an orderly way.
//!
//! The watcher, the stdin pump and raw mode are set up once per process; a guest restarted
//! after a reboot gets new devices, and the pump follows them through a [`ConsoleRoute`].

use std::io::Read;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use libc::c_int;

use crate::bus::lock;
use crate::devices::serial::SerialPort;
use crate::seccomp::{self, Role};
use crate::stop::{StopReason, Stopper};
use crate::threads;
use crate::virtio::console::ConsoleInput;

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

/// Blocks the stop signals in this thread and every thread it starts from now on: they stay
/// pending until [`watch_signals`] waits for them. Call before starting any other thread.
pub fn block_stop_signals() -> std::io::Result<()> {
    block_signals(&STOP_SIGNALS)
}

/// Blocks `signals` in this thread and every thread it starts from now on, for a thread that
/// waits for them ([`next_signal`]). Call before starting any other thread.
pub(crate) fn block_signals(signals: &[c_int]) -> std::io::Result<()> {
    let set = signal_set(signals);
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// The set of `signals`, for [`block_signals`] and [`next_signal`].
pub(crate) fn signal_set(signals: &[c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid constants.
    unsafe {
        libc::sigemptyset(&mut set);
        for &signal in signals {
            libc::sigaddset(&mut set, signal);
        }
    }
    set
}

/// Waits for the next of the (blocked) signals in `set`, pending ones first.
pub(crate) fn next_signal(set: &libc::sigset_t) -> c_int {
    loop {
        let mut signal: c_int = 0;
        // SAFETY: `set` and `signal` outlive the call; sigwait writes only `signal`.
        if unsafe { libc::sigwait(set, &mut signal) } == 0 {
            return signal;
        }
    }
}

/// Starts the thread that waits for the stop signals [`block_stop_signals`] blocked, pending
/// ones included. `interactive`: stdin is our terminal (whose Ctrl-C goes to the guest as a
/// key, so a SIGINT came from `kill`).
pub fn watch_signals(stopper: Arc<Stopper>, shutdown_timeout: Duration, interactive: bool) -> std::io::Result<()> {
    let set = signal_set(&STOP_SIGNALS);
    threads::spawn("signals", move || {
        if let Err(e) = seccomp::confine(Role::SignalWatcher) {
            return stopper.stop(StopReason::HostError(e.to_string()));
        }
        loop {
            let signal = next_signal(&set);
            if asks_for_shutdown(signal, interactive) {
                stopper.request_shutdown(signal, shutdown_timeout);
            } else {
                stopper.stop(StopReason::Signal(signal));
            }
        }
    })?;
    Ok(())
}

/// SIGTERM is how service managers and `docker stop` ask a machine to shut down, and SIGINT is
/// Ctrl-C in a script; we pass the request on to the guest. SIGHUP (our terminal is gone) and
/// SIGQUIT stop the VM at once.
fn asks_for_shutdown(signal: c_int, interactive: bool) -> bool {
    signal == libc::SIGTERM || (signal == libc::SIGINT && !interactive)
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

/// Where the stdin pump delivers what the user typed: the UART or the virtio console.
pub trait ConsoleSink: Send + 'static {
    /// Hands `input` to the guest's console. Returns false when (some of) it was dropped
    /// because the VM stopped while it waited for room.
    fn deliver(&mut self, input: &[u8], stopper: &Stopper) -> bool;
}

/// The console the stdin pump types into: the running VM's, or none between two boots of a
/// restarted guest (what is typed then is dropped). The pump is started once per process; each
/// new VM [`ConsoleRoute::connect`]s its console here.
#[derive(Clone, Default)]
pub struct ConsoleRoute(Arc<Mutex<Option<Box<dyn ConsoleSink>>>>);

impl ConsoleRoute {
    pub fn connect(&self, sink: Box<dyn ConsoleSink>) {
        *lock(&self.0) = Some(sink);
    }

    /// Call once the VM has stopped: a delivery still waiting for room sees the stop and lets go.
    pub fn disconnect(&self) {
        lock(&self.0).take();
    }
}

impl ConsoleSink for ConsoleRoute {
    fn deliver(&mut self, input: &[u8], stopper: &Stopper) -> bool {
        match lock(&self.0).as_mut() {
            Some(sink) => sink.deliver(input, stopper),
            None => false,
        }
    }
}

/// The UART's FIFO holds 64 bytes: the input drains into it at the guest's pace.
impl ConsoleSink for Arc<Mutex<SerialPort>> {
    fn deliver(&mut self, mut input: &[u8], stopper: &Stopper) -> bool {
        while !input.is_empty() {
            let taken = lock(self).receive(input);
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
}

/// The virtio console buffers input itself (boundedly) until the guest posts receive buffers,
/// so the pump never waits on it and Ctrl-A x works even when the guest reads nothing.
impl ConsoleSink for ConsoleInput {
    fn deliver(&mut self, input: &[u8], _: &Stopper) -> bool {
        self.send(input);
        true
    }
}

/// Starts the thread that copies stdin into the guest's console. `escape` enables Ctrl-A x.
pub fn pump_stdin(sink: impl ConsoleSink, stopper: Arc<Stopper>, escape: bool) -> std::io::Result<()> {
    threads::spawn("stdin", move || match seccomp::confine(Role::StdinPump) {
            Ok(()) => pump(std::io::stdin().lock(), sink, &stopper, escape),
            Err(e) => stopper.stop(StopReason::HostError(e.to_string())),
        })?;
    Ok(())
}

/// Copies `source` into `sink` until the input ends or the user quits. Input the VM stopped
/// before taking is dropped: a restarted guest starts with an empty console.
fn pump(mut source: impl Read, mut sink: impl ConsoleSink, stopper: &Stopper, escape: bool) {
    let mut buffer = [0u8; 256];
    let mut filter = EscapeFilter::default();
    let mut input = Vec::with_capacity(buffer.len() * 2);
    loop {
        let count = match source.read(&mut buffer) {
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
        if !sink.deliver(&input, stopper) {
            tracing::debug!("console input dropped: the VM stopped");
        }
    }
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

    fn uart() -> Arc<Mutex<SerialPort>> {
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        Arc::new(Mutex::new(SerialPort::new(crate::devices::serial::IrqLine(irq), Box::new(std::io::sink()))))
    }

    /// What the guest would read from the UART's receive FIFO.
    fn uart_fifo(serial: &Mutex<SerialPort>) -> Vec<u8> {
        use crate::bus::BusDevice;
        let mut received = Vec::new();
        let mut byte = [0u8];
        loop {
            lock(serial).read(5, &mut byte); // LSR: bit 0 is "data ready"
            if byte[0] & 1 == 0 {
                return received;
            }
            lock(serial).read(0, &mut byte);
            received.push(byte[0]);
        }
    }

    fn virtio_input() -> ConsoleInput {
        crate::virtio::console::Console::new(Box::new(std::io::sink())).expect("console").input()
    }

    #[test]
    fn the_pump_feeds_the_uart_through_the_escape_filter() {
        let (serial, stopper) = (uart(), Stopper::default());
        pump(&b"ls\r\x01\x01"[..], serial.clone(), &stopper, true);
        assert_eq!(uart_fifo(&serial), b"ls\r\x01");
        assert!(!stopper.is_stopped(), "the end of input leaves the guest running");
    }

    #[test]
    fn the_pump_stops_waiting_on_a_full_uart_once_the_vm_stopped() {
        let (serial, stopper) = (uart(), Stopper::default());
        stopper.stop(StopReason::PowerOff);
        pump(&[b'y'; 1000][..], serial.clone(), &stopper, false);
        assert!(!uart_fifo(&serial).is_empty());
    }

    #[test]
    fn the_pump_feeds_the_virtio_console_through_the_escape_filter() {
        let (input, stopper) = (virtio_input(), Stopper::default());
        // Two reads, as two keystroke bursts from a terminal would be.
        let typed = (&b"echo \x01chi\r"[..]).chain(&b"\x01xnever"[..]);
        pump(typed, input.clone(), &stopper, true);
        assert_eq!(input.pending(), b"echo \x01chi\r");
        assert!(matches!(stopper.wait(), StopReason::UserQuit));
    }

    #[test]
    fn a_piped_stdin_reaches_the_virtio_console_unchanged() {
        let (input, stopper) = (virtio_input(), Stopper::default());
        pump(&b"a\x01xb"[..], input.clone(), &stopper, false);
        assert_eq!(input.pending(), b"a\x01xb");
        assert!(!stopper.is_stopped());
    }

    #[test]
    fn the_pump_never_blocks_on_a_virtio_console_the_guest_does_not_read() {
        let (input, stopper) = (virtio_input(), Stopper::default());
        let mut flood = vec![b'z'; 200 * 1024];
        flood.extend_from_slice(b"\x01x");
        pump(&flood[..], input.clone(), &stopper, true);
        assert_eq!(input.pending().len(), crate::virtio::console::INPUT_LIMIT);
        assert!(matches!(stopper.wait(), StopReason::UserQuit), "Ctrl-A x still quits");
    }

    #[test]
    fn the_route_follows_the_connected_console_and_drops_input_between_boots() {
        let (first, second, stopper) = (uart(), uart(), Stopper::default());
        let mut route = ConsoleRoute::default();
        assert!(!route.deliver(b"lost", &stopper), "nothing connected");
        route.connect(Box::new(first.clone()));
        assert!(route.deliver(b"one", &stopper));
        route.disconnect();
        route.connect(Box::new(second.clone()));
        pump(&b"two"[..], route.clone(), &stopper, true);
        assert_eq!((uart_fifo(&first), uart_fifo(&second)), (b"one".to_vec(), b"two".to_vec()));
    }

    #[test]
    fn sigterm_asks_and_sigint_asks_only_without_a_terminal() {
        assert!(asks_for_shutdown(libc::SIGTERM, true) && asks_for_shutdown(libc::SIGTERM, false));
        assert!(asks_for_shutdown(libc::SIGINT, false) && !asks_for_shutdown(libc::SIGINT, true));
        assert!(!asks_for_shutdown(libc::SIGHUP, false) && !asks_for_shutdown(libc::SIGQUIT, false));
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
