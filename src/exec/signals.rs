//! Signals sent to `lguest exec`, handed on to CMD, as `docker run --init` and podman do.
//!
//! `exec::run` blocks SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGWINCH in every
//! thread before any thread starts ([`block`]); once the VM runs, one thread waits for them
//! ([`watch`]). What becomes of each is [`Policy::decide`]'s call, by how far CMD has got:
//!
//! - before the init has said CMD started, nothing in the guest could take a signal: it stops
//!   the VM at once, and lguest exits 128+N;
//! - while CMD runs, it goes to the init as a `kill N` line on the control stream, and the init
//!   sends it to CMD's process group; CMD's ending comes back as usual (128+N when the signal
//!   killed it, or whatever status CMD chose in a handler);
//! - a second SIGINT or SIGTERM while CMD still runs means the user will not wait for CMD's
//!   clean-up: it stops the VM at once (128+N), as a signal before CMD did;
//! - once CMD has ended (its last output still on its way), a signal stops the VM; CMD's status
//!   stands.
//!
//! SIGWINCH, with a terminal, becomes a `winsize` line. With a terminal, Ctrl-C never comes
//! here at all: our terminal is raw, so it is a byte in the pty stream, and the guest's pty turns
//! it into SIGINT for CMD's foreground group.
//!
//! What this trusts: nothing from the guest; the control stream's reader tells it when CMD
//! started and ended, from reports [`super::control::Report::parse`] already checked.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use libc::c_int;

use super::control::{HostMessage, FORWARDED_SIGNALS};
use super::host_io::terminal_size;
use crate::bus::lock;
use crate::stop::{StopReason, Stopper};

/// How far CMD has got, as far as signals are concerned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Phase {
    /// The guest is booting or setting up: there is no CMD to signal yet.
    #[default]
    Starting,
    /// CMD runs; `interrupted` once a SIGINT or SIGTERM has been handed on to it.
    Running { interrupted: bool },
    /// CMD has ended.
    Ended,
}

/// What to do with a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Hand it on to CMD.
    Forward(c_int),
    /// Stop the VM, for this signal.
    Stop(c_int),
}

/// Where each forwarded signal goes, by [`Phase`] (see the module's story).
#[derive(Debug, Default)]
pub struct Policy {
    phase: Phase,
}

impl Policy {
    pub fn started(&mut self) {
        if self.phase == Phase::Starting {
            self.phase = Phase::Running { interrupted: false };
        }
    }

    pub fn ended(&mut self) {
        self.phase = Phase::Ended;
    }

    pub fn decide(&mut self, signal: c_int) -> Decision {
        let Phase::Running { interrupted } = &mut self.phase else {
            return Decision::Stop(signal);
        };
        let asks_to_stop = signal == libc::SIGINT || signal == libc::SIGTERM;
        if asks_to_stop && *interrupted {
            return Decision::Stop(signal);
        }
        *interrupted |= asks_to_stop;
        Decision::Forward(signal)
    }
}

/// What the signal thread and the control stream's reader share: the policy, and the stream
/// to the init once it has connected.
#[derive(Default)]
pub struct Link {
    policy: Mutex<Policy>,
    control: Mutex<Option<UnixStream>>,
}

impl Link {
    pub fn connected(&self, control: UnixStream) {
        *lock(&self.control) = Some(control);
    }

    pub fn started(&self) {
        lock(&self.policy).started();
    }

    pub fn ended(&self) {
        lock(&self.policy).ended();
    }

    /// Sends `message` to the init; false when there is no stream (yet) or it is broken.
    fn send(&self, message: HostMessage) -> bool {
        // A clone, so that a write the guest is slow to take holds no lock the reader needs.
        let stream = lock(&self.control).as_ref().and_then(|stream| stream.try_clone().ok());
        stream.is_some_and(|mut stream| stream.write_all(message.to_line().as_bytes()).is_ok())
    }

    /// Acts on one signal we received.
    fn handle(&self, signal: c_int, stopper: &Stopper, tty: bool) {
        if signal == libc::SIGWINCH {
            if let Some(size) = terminal_size().filter(|_| tty) {
                self.send(HostMessage::Resize(size));
            }
            return;
        }
        let decision = lock(&self.policy).decide(signal);
        match decision {
            Decision::Forward(signal) if self.send(HostMessage::Kill(signal)) => {}
            Decision::Forward(signal) | Decision::Stop(signal) => stopper.stop(StopReason::Signal(signal)),
        }
    }
}

/// Every signal [`watch`] waits for: those handed on to CMD, and SIGWINCH.
fn watched() -> Vec<c_int> {
    FORWARDED_SIGNALS.into_iter().chain([libc::SIGWINCH]).collect()
}

/// Blocks the forwarded signals and SIGWINCH in this thread and the ones it starts: they wait,
/// pending, for [`watch`]. Call before any thread starts.
pub fn block() {
    // Fails only for a bad signal number, and these are constants.
    let _ = crate::terminal::block_signals(&watched());
}

/// Starts the thread that takes the signals [`block`] blocked (those already pending first)
/// and acts on each; `tty`: CMD has a terminal, which follows ours.
pub fn watch(link: Arc<Link>, stopper: Arc<Stopper>, tty: bool) {
    let set = crate::terminal::signal_set(&watched());
    std::thread::spawn(move || loop {
        link.handle(crate::terminal::next_signal(&set), &stopper, tty);
    });
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn a_signal_before_cmd_started_stops_the_vm() {
        let mut policy = Policy::default();
        for signal in FORWARDED_SIGNALS {
            assert_eq!(policy.decide(signal), Decision::Stop(signal));
        }
    }

    #[test]
    fn a_running_cmd_gets_every_signal_until_a_second_interrupt() {
        let mut policy = Policy::default();
        policy.started();
        for signal in [libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2, libc::SIGQUIT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1] {
            assert_eq!(policy.decide(signal), Decision::Forward(signal), "signal {signal}");
        }
        assert_eq!(policy.decide(libc::SIGINT), Decision::Stop(libc::SIGINT), "a SIGINT after the SIGTERM");
        assert_eq!(policy.decide(libc::SIGTERM), Decision::Stop(libc::SIGTERM));
    }

    #[test]
    fn a_second_sigint_stops_the_vm_and_a_late_start_report_changes_nothing() {
        let mut policy = Policy::default();
        policy.started();
        assert_eq!(policy.decide(libc::SIGINT), Decision::Forward(libc::SIGINT));
        policy.started();
        assert_eq!(policy.decide(libc::SIGINT), Decision::Stop(libc::SIGINT));
    }

    #[test]
    fn a_signal_after_cmd_ended_stops_the_vm() {
        let mut policy = Policy::default();
        policy.started();
        policy.ended();
        policy.started();
        assert_eq!(policy.decide(libc::SIGUSR1), Decision::Stop(libc::SIGUSR1));
    }

    #[test]
    fn forwarded_signals_reach_the_init_as_kill_lines_and_the_rest_stop_the_vm() {
        let (ours, mut init) = UnixStream::pair().expect("socket pair");
        let (link, stopper) = (Link::default(), Stopper::default());
        link.handle(libc::SIGHUP, &stopper, false);
        assert!(matches!(stopper.wait(), StopReason::Signal(libc::SIGHUP)), "before CMD started");

        let stopper = Stopper::default();
        link.connected(ours);
        link.started();
        link.handle(libc::SIGTERM, &stopper, false);
        link.handle(libc::SIGWINCH, &stopper, false);
        link.handle(libc::SIGUSR2, &stopper, false);
        assert!(!stopper.is_stopped());
        link.handle(libc::SIGTERM, &stopper, false);
        assert!(matches!(stopper.wait(), StopReason::Signal(libc::SIGTERM)), "the second SIGTERM");
        drop(link);
        let mut sent = String::new();
        init.read_to_string(&mut sent).expect("read");
        assert_eq!(sent, "kill 15\nkill 12\n", "no winsize line without a terminal");
    }

    #[test]
    fn a_signal_with_no_stream_to_carry_it_stops_the_vm() {
        let (link, stopper) = (Link::default(), Stopper::default());
        link.started();
        link.handle(libc::SIGUSR1, &stopper, false);
        assert!(matches!(stopper.wait(), StopReason::Signal(libc::SIGUSR1)));
    }
}
