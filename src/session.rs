//! One lguest process, one guest, possibly over several boots. The parts that belong to the
//! process rather than to a VM are set up here once: the stop signals' watcher, the terminal's
//! raw mode, the stdin pump (these three unless the caller takes them: [`Frontend`]), the
//! spawner of device workers, and the [`Stopper`] they all report to. Then a [`Vm`] is built
//! and run; when the guest reboots and `--reboot restart` was asked for, that VM is taken apart
//! and a fresh one is built from the same configuration, as if the machine had been reset.
//! A guest that crashed (a fault, a panic) is not restarted: that is for a supervisor to decide.

use std::sync::Arc;

use crate::config::{OnReboot, VmConfig};
use crate::terminal::{self, ConsoleRoute};
use crate::error::{Error, Result};
use crate::stop::{StopReason, Stopper};
use crate::threads;
use crate::timeline::Timeline;
use crate::vm::{Origin, RunningVm, Vm};

/// Runs the guest `config` describes until it is done, and says why it ended.
///
/// The first VM is built and started before the process's own threads: the guest's first
/// instruction is what a user waits for, and stop signals or typed keys that come meanwhile
/// only wait (blocked signals stay pending, input stays in stdin). `on_start` is told of each
/// boot's running VM (the API takes its controls from there); an `Err` from the first build is
/// returned before any of the process's threads exist, so the caller may try again.
pub fn run(config: &VmConfig, timeline: Arc<Timeline>, on_start: &mut dyn FnMut(&RunningVm)) -> Result<StopReason> {
    run_from(config, Origin::Boot, timeline, on_start)
}

/// [`run`], with the first boot's guest from `origin` (a snapshot, for `lguest restore` and
/// `PUT /snapshot/load`); a reboot after it boots the configuration's kernel afresh.
pub fn run_from(config: &VmConfig, origin: Origin<'_>, timeline: Arc<Timeline>, on_start: &mut dyn FnMut(&RunningVm)) -> Result<StopReason> {
    run_with(config, origin, timeline, Frontend::Console, on_start)
}

/// Who takes lguest's own stdin and stop signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    /// The session: stdin is typed into the guest's console (raw mode and Ctrl-A x when it is
    /// a terminal), and the stop signals stop the VM or ask the guest to shut down.
    Console,
    /// The caller: `lguest exec` relays stdin over vsock and hands the signals on to CMD
    /// (`exec::signals`).
    Caller,
}

/// [`run_from`], with lguest's stdin and signals taken as `frontend` says.
pub fn run_with(config: &VmConfig, origin: Origin<'_>, timeline: Arc<Timeline>, frontend: Frontend, on_start: &mut dyn FnMut(&RunningVm)) -> Result<StopReason> {
    let host = |what| move |source| Error::Host { what, source };
    terminal::block_stop_signals().map_err(host("cannot block the stop signals"))?;
    let stopper = Arc::new(Stopper::default());
    let route = ConsoleRoute::default();
    // Device workers come from the spawner (started just below, after the vCPUs, which is
    // still long before any guest driver activates a device; an early one waits for it).
    threads::expect_spawner();
    // A restored guest's devices are started while its VM is built: their spawner comes first.
    let restoring = matches!(origin, Origin::Snapshot { .. });
    let start_spawner = || threads::start_spawner().map_err(host("cannot start the device workers' spawner thread"));
    if restoring {
        start_spawner()?;
    }
    let mut running = Vm::build_from(config, origin, timeline.clone(), stopper.clone())?.start(&route)?;
    if !restoring {
        start_spawner()?;
    }
    on_start(&running);
    if frontend == Frontend::Console {
        let interactive = terminal::stdin_is_terminal();
        terminal::watch_signals(stopper.clone(), config.shutdown_timeout, interactive).map_err(host("cannot watch signals"))?;
        if interactive {
            terminal::enter_raw_mode();
        }
        terminal::pump_stdin(route.clone(), stopper.clone(), interactive).map_err(host("cannot start the console thread"))?;
    }
    let mut boots = 1u64;
    loop {
        let reason = running.wait(&route);
        if config.on_reboot != OnReboot::Restart || !matches!(reason, StopReason::Reset) {
            return Ok(reason);
        }
        if let Err(reason) = stopper.rearm(reason) {
            return Ok(reason);
        }
        boots += 1;
        tracing::info!(boots, "the guest rebooted: starting it again");
        running = Vm::build(config, timeline.clone(), stopper.clone())?.start(&route)?;
        on_start(&running);
    }
}
