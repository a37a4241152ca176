//! How a VM ends. Whoever first learns that the guest is done (a device, a vCPU thread, the
//! console, a signal) records why here; the main thread waits for that and turns it into the
//! process's exit status. The first reason wins: a reset that follows a fault doesn't hide it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

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
    /// The guest did something we cannot carry on from: only the guest dies.
    GuestFault(Box<GuestFault>),
    /// The host side failed underneath a running guest (an ioctl that should not fail).
    HostError(String),
}

impl StopReason {
    /// The process exit status: 0 for a guest that ended itself or was quit on purpose,
    /// 1 for a guest that died, 128+N for signal N, as shells report it.
    pub fn exit_code(&self) -> u8 {
        match self {
            StopReason::PowerOff | StopReason::Reset | StopReason::UserQuit => 0,
            StopReason::GuestFault(_) | StopReason::HostError(_) => 1,
            StopReason::Signal(n) => 128u8.saturating_add(u8::try_from(*n).unwrap_or(127)),
        }
    }
}

/// The one place a stop is recorded and waited for.
#[derive(Debug, Default)]
pub struct Stopper {
    reason: Mutex<Option<StopReason>>,
    stopped: Condvar,
    /// The same fact as `reason.is_some()`, readable without a lock: every vCPU exit asks.
    is_stopped: AtomicBool,
}

impl Stopper {
    /// Records `reason` unless another stop came first.
    pub fn stop(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !self.is_stopped.load(Ordering::Acquire) {
            tracing::debug!(?reason, "VM stopping");
            *slot = Some(reason);
            self.is_stopped.store(true, Ordering::Release);
            self.stopped.notify_all();
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.is_stopped.load(Ordering::Acquire)
    }

    /// Blocks until some thread has stopped the VM, and takes the reason.
    pub fn wait(&self) -> StopReason {
        let mut slot = self.reason.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            // Later `stop` calls see the flag and leave the emptied slot alone.
            if let Some(reason) = slot.take() {
                return reason;
            }
            slot = self.stopped.wait(slot).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
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
        assert!(stopper.reason.lock().expect("lock").is_none(), "a stop after the wait is ignored");
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
    }
}
