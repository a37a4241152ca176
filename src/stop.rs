//! How a VM ends. Whoever first learns that the guest is done (a device, a vCPU thread, the
//! console, a signal) records why here; the main thread waits for that and turns it into the
//! process's exit status. The first reason wins: a reset that follows a fault doesn't hide it.
//!
//! Two things are asked of the main thread rather than decided here. A *shutdown request*
//! (SIGTERM) is an [`Event`] of its own: the main thread asks the guest to power off, and if the
//! guest has not stopped by the request's deadline, [`Stopper::next_event`] stops it. And a guest
//! that reset with `--reboot restart` is run again: [`Stopper::rearm`] makes the same stopper
//! serve the next boot, unless the user asked to quit while the old one was going down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::fault::GuestFault;

/// Why the VM stopped.
#[derive(Debug)]
pub enum StopReason {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (keyboard controller or ACPI reset register).
    Reset,
    /// The user pressed the console's quit key.
    UserQuit,
    /// A signal such as SIGTERM or SIGHUP reached us.
    Signal(i32),
    /// We asked the guest to shut down (for `signal`) and it had not within `after`.
    ShutdownTimedOut { signal: i32, after: Duration },
    /// The guest's kernel panicked and said so through the pvpanic device.
    GuestPanic,
    /// The guest did something we cannot carry on from: only the guest dies.
    GuestFault(Box<GuestFault>),
    /// The host side failed underneath a running guest (an ioctl that should not fail).
    HostError(String),
}

/// The exit status of a guest whose kernel panicked: distinct from a fault (1) and from a
/// request we refused (2), so a supervisor can tell a crash from our own trouble.
pub const PANIC_EXIT_CODE: u8 = 3;

impl StopReason {
    /// The process exit status: 0 for a guest that ended itself or was quit on purpose,
    /// 1 for a guest that died, 3 for a guest kernel panic, 128+N for signal N, as shells
    /// report it.
    pub fn exit_code(&self) -> u8 {
        match self {
            StopReason::PowerOff | StopReason::Reset | StopReason::UserQuit => 0,
            StopReason::GuestFault(_) | StopReason::HostError(_) => 1,
            StopReason::GuestPanic => PANIC_EXIT_CODE,
            StopReason::Signal(n) | StopReason::ShutdownTimedOut { signal: n, .. } => {
                128u8.saturating_add(u8::try_from(*n).unwrap_or(127))
            }
        }
    }

    /// The user's own ways to end us: these end the process even while a rebooting guest is
    /// between two boots.
    fn is_the_users(&self) -> bool {
        matches!(self, StopReason::UserQuit | StopReason::Signal(_))
    }
}

/// What the main thread is woken for.
#[derive(Debug)]
pub enum Event {
    /// The VM stopped, for this reason.
    Stopped(StopReason),
    /// Someone asked for a clean shutdown: ask the guest (once); its time is running.
    ShutdownRequested,
    /// The API asks for a snapshot of the (paused) VM, which the main thread takes.
    Snapshot(crate::snapshot::SnapshotJob),
}

/// The one place a stop is recorded and waited for.
#[derive(Debug, Default)]
pub struct Stopper {
    state: Mutex<State>,
    changed: Condvar,
    /// Whether this boot has stopped, readable without a lock: every vCPU exit asks.
    is_stopped: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    /// This boot's stop reason, until the main thread takes it.
    reason: Option<StopReason>,
    /// The user's quit or signal that came after this boot had stopped (see [`Stopper::rearm`]).
    late: Option<StopReason>,
    shutdown: Option<ShutdownRequest>,
    /// Snapshots asked for and not yet taken; dropped (their askers told so) when the VM stops.
    snapshots: std::collections::VecDeque<crate::snapshot::SnapshotJob>,
}

#[derive(Debug)]
struct ShutdownRequest {
    signal: i32,
    timeout: Duration,
    deadline: Instant,
    /// Whether the main thread has been told (and so asked the guest).
    told: bool,
}

impl Stopper {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records `reason` unless another stop came first.
    pub fn stop(&self, reason: StopReason) {
        let mut state = self.state();
        if !self.is_stopped.load(Ordering::Acquire) {
            tracing::debug!(?reason, "VM stopping");
            self.record(&mut state, reason);
        } else if reason.is_the_users() && state.late.is_none() {
            state.late = Some(reason);
        }
    }

    fn record(&self, state: &mut State, reason: StopReason) {
        state.reason = Some(reason);
        self.is_stopped.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    pub fn is_stopped(&self) -> bool {
        self.is_stopped.load(Ordering::Acquire)
    }

    /// Asks for a clean shutdown on behalf of `signal`: the main thread asks the guest, and
    /// stops it if it is still running after `timeout`. A second request, or a zero timeout,
    /// stops it at once: whoever asks twice is not willing to wait.
    pub fn request_shutdown(&self, signal: i32, timeout: Duration) {
        let mut state = self.state();
        if timeout.is_zero() || state.shutdown.is_some() {
            drop(state);
            return self.stop(StopReason::Signal(signal));
        }
        tracing::debug!(signal, ?timeout, "shutdown requested");
        // The configuration caps the timeout at a day, so this can't overflow; if it did, the
        // request would simply time out at once.
        let now = Instant::now();
        let deadline = now.checked_add(timeout).unwrap_or(now);
        state.shutdown = Some(ShutdownRequest { signal, timeout, deadline, told: false });
        self.changed.notify_all();
    }

    /// Hands a snapshot job to the main thread. If the VM is stopping, the job is dropped, and
    /// with it its reply channel: the asker learns it that way.
    pub fn request_snapshot(&self, job: crate::snapshot::SnapshotJob) {
        let mut state = self.state();
        if !self.is_stopped() {
            state.snapshots.push_back(job);
            self.changed.notify_all();
        }
    }

    /// Blocks until the VM stops (and takes the reason) or a shutdown request needs acting on.
    /// A request whose deadline passes stops the VM here, with [`StopReason::ShutdownTimedOut`].
    pub fn next_event(&self) -> Event {
        let mut state = self.state();
        loop {
            // Later `stop` calls see the flag and leave the emptied slot alone.
            if let Some(reason) = state.reason.take() {
                state.snapshots.clear();
                return Event::Stopped(reason);
            }
            if let Some(job) = state.snapshots.pop_front() {
                return Event::Snapshot(job);
            }
            let wait = match &mut state.shutdown {
                Some(request) if !request.told && !self.is_stopped() => {
                    request.told = true;
                    return Event::ShutdownRequested;
                }
                Some(request) if !self.is_stopped() => match request.deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => {
                        let reason = StopReason::ShutdownTimedOut { signal: request.signal, after: request.timeout };
                        self.record(&mut state, reason);
                        continue;
                    }
                },
                _ => None,
            };
            state = match wait {
                Some(left) => self.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0,
                None => self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner()),
            };
        }
    }

    /// Blocks until some thread has stopped the VM, and takes the reason. Shutdown requests
    /// are left to run out their time. (The main thread uses [`Stopper::next_event`], which
    /// also hands it the shutdown requests.)
    #[cfg(test)]
    pub fn wait(&self) -> StopReason {
        loop {
            if let Event::Stopped(reason) = self.next_event() {
                return reason;
            }
        }
    }

    /// After a boot that ended in a reset, with every thread of that boot gone: clears the
    /// stop so the next boot can run. `Err` says what ends the process instead: the user's quit
    /// or signal that came while the old boot was going down, or the reset itself when a
    /// shutdown had been asked for (a guest that answers Ctrl-Alt-Del with a reboot, as
    /// systemd's does, has shut down as far as we are concerned).
    pub fn rearm(&self, ended: StopReason) -> Result<(), StopReason> {
        let mut state = self.state();
        if let Some(late) = state.late.take() {
            return Err(late);
        }
        if state.shutdown.is_some() || state.reason.is_some() {
            return Err(ended);
        }
        self.is_stopped.store(false, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_reason_wins() {
        let stopper = Stopper::default();
        stopper.stop(StopReason::Reset);
        stopper.stop(StopReason::UserQuit);
        assert!(matches!(stopper.wait(), StopReason::Reset));
        assert!(stopper.is_stopped());
        stopper.stop(StopReason::PowerOff);
        assert!(stopper.state().reason.is_none(), "a stop after the wait is ignored");
    }

    #[test]
    fn wait_wakes_when_another_thread_stops() {
        let stopper = Arc::new(Stopper::default());
        let other = Arc::clone(&stopper);
        let thread = std::thread::spawn(move || other.stop(StopReason::PowerOff));
        assert!(matches!(stopper.wait(), StopReason::PowerOff));
        thread.join().expect("thread");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(StopReason::PowerOff.exit_code(), 0);
        assert_eq!(StopReason::Reset.exit_code(), 0);
        assert_eq!(StopReason::UserQuit.exit_code(), 0);
        assert_eq!(StopReason::Signal(15).exit_code(), 143);
        assert_eq!(StopReason::HostError("x".into()).exit_code(), 1);
        assert_eq!(StopReason::GuestPanic.exit_code(), 3);
        let timed_out = StopReason::ShutdownTimedOut { signal: 15, after: Duration::from_secs(1) };
        assert_eq!(timed_out.exit_code(), 143);
    }

    #[test]
    fn a_shutdown_request_is_told_once_then_times_out() {
        let stopper = Stopper::default();
        stopper.request_shutdown(15, Duration::from_millis(50));
        assert!(matches!(stopper.next_event(), Event::ShutdownRequested));
        assert!(!stopper.is_stopped(), "asking is not stopping");
        let started = Instant::now();
        let reason = stopper.wait();
        assert!(started.elapsed() >= Duration::from_millis(40), "stopped before the deadline");
        assert!(matches!(reason, StopReason::ShutdownTimedOut { signal: 15, .. }), "{reason:?}");
        assert!(stopper.is_stopped());
    }

    #[test]
    fn a_guest_that_powers_off_in_time_beats_the_deadline() {
        let stopper = Arc::new(Stopper::default());
        stopper.request_shutdown(15, Duration::from_secs(60));
        assert!(matches!(stopper.next_event(), Event::ShutdownRequested));
        let guest = Arc::clone(&stopper);
        let thread = std::thread::spawn(move || guest.stop(StopReason::PowerOff));
        assert!(matches!(stopper.wait(), StopReason::PowerOff));
        thread.join().expect("thread");
    }

    #[test]
    fn a_second_request_or_no_timeout_stops_at_once() {
        let stopper = Stopper::default();
        stopper.request_shutdown(15, Duration::from_secs(60));
        stopper.request_shutdown(2, Duration::from_secs(60));
        assert!(matches!(stopper.wait(), StopReason::Signal(2)));
        let impatient = Stopper::default();
        impatient.request_shutdown(15, Duration::ZERO);
        assert!(matches!(impatient.wait(), StopReason::Signal(15)));
    }

    #[test]
    fn rearm_runs_another_boot_unless_the_user_quit_meanwhile() {
        let stopper = Stopper::default();
        stopper.stop(StopReason::Reset);
        let reset = stopper.wait();
        stopper.stop(StopReason::Reset); // another vCPU, late: not the user's
        assert!(stopper.rearm(reset).is_ok());
        assert!(!stopper.is_stopped());

        stopper.stop(StopReason::Reset);
        let reset = stopper.wait();
        stopper.stop(StopReason::Signal(1));
        assert!(matches!(stopper.rearm(reset), Err(StopReason::Signal(1))));
    }

    #[test]
    fn a_reset_after_a_shutdown_request_ends_the_process() {
        let stopper = Stopper::default();
        stopper.request_shutdown(15, Duration::from_secs(60));
        assert!(matches!(stopper.next_event(), Event::ShutdownRequested));
        stopper.stop(StopReason::Reset);
        let reset = stopper.wait();
        assert!(matches!(stopper.rearm(reset), Err(StopReason::Reset)));
    }
}
