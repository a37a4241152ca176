//! What may be done to a running guest from outside it: pause and resume its vCPUs, press
//! Ctrl-Alt-Del on its keyboard, put a new image in one of its drives, change a disk's or a
//! network card's rate limiter, and read the devices' counters. The API thread (`PATCH /vm`,
//! `PUT /actions`, `PATCH /drives`, ...) holds a [`VmControls`] for as long as the VM runs;
//! the VM itself knows nothing of the API.
//!
//! Pausing follows the vCPU loop's own rule (see [`crate::vcpu`]): a vCPU thread leaves KVM_RUN
//! only when kicked. [`PauseGate::pause`] marks the gate closed and kicks every vCPU thread
//! until each has come to the gate and parked there; [`PauseGate::resume`] opens it. A vCPU
//! that starts while the gate is closed parks before its first KVM_RUN. When the VM is taken
//! apart the gate is ended, which releases every parked thread for good, so a paused guest can
//! still be stopped. [`VmControls::pause`] then stops every device's worker too (between two
//! events; each keeps its handler), so that nothing of the guest moves while it is paused and a
//! snapshot ([`crate::snapshot`]) sees it still; [`VmControls::resume`] restarts them first.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::Killable;

use crate::bus::lock;
use crate::devices::i8042::I8042;
use crate::rate_limiter::SharedLimiter;
use crate::virtio::metrics::{BlockMetrics, NetMetrics};
use crate::virtio::transport::{DriveHandle, SharedVirtio};
use crate::virtio::UpdateError;

/// How long a pause waits for the vCPUs to park. Leaving KVM_RUN takes microseconds; only a
/// vCPU thread blocked outside the guest (its output to a full pipe) takes longer.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PauseError {
    #[error("the guest is stopping")]
    Ended,
    #[error("{running} of the guest's vCPUs did not stop within {} s", PARK_TIMEOUT.as_secs())]
    Stuck { running: usize },
    #[error("the guest is not paused")]
    NotPaused,
}

/// Work a parked vCPU thread does on its own vCPU, given its id.
pub type Errand = Arc<dyn Fn(u8, &VcpuFd) + Send + Sync>;

/// The errand being run, if any (a closure has no `Debug` of its own).
struct ErrandSlot(Option<Errand>);

impl std::fmt::Debug for ErrandSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "an errand" } else { "no errand" })
    }
}

/// A parked vCPU thread's vCPU, on which it runs errands.
pub type ParkedVcpu<'a> = (u8, &'a VcpuFd);

/// The gate every vCPU thread passes between two KVM_RUNs.
#[derive(Debug)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug)]
struct GateState {
    closed: bool,
    ended: bool,
    /// Work for the parked vCPU threads ([`PauseGate::run_errand`]), numbered so that each
    /// thread does each errand once, and how many have done the current one.
    errand: ErrandSlot,
    errand_round: u64,
    errands_done: usize,
    /// How many vCPU threads the VM has, started or not.
    vcpus: usize,
    parked: usize,
    gone: usize,
    /// The threads in `Vcpu::run` now, for kicks. A thread removes itself before it exits,
    /// under the same lock kicks are sent under, so a kick never reaches a dead thread.
    threads: Vec<libc::pthread_t>,
}

/// A vCPU thread's place at the gate, from its start to its end.
pub struct Seat {
    gate: Arc<PauseGate>,
    thread: libc::pthread_t,
}

/// A live vCPU thread, for a kick.
struct LiveThread(libc::pthread_t);

// SAFETY: the handle is a thread in `GateState::threads`, which holds only threads that are
// running `Vcpu::run` (they leave the list, under the lock we kick under, before exiting).
unsafe impl Killable for LiveThread {
    fn pthread_handle(&self) -> libc::pthread_t {
        self.0
    }
}

impl PauseGate {
    pub fn new(vcpus: usize) -> Arc<PauseGate> {
        let state = GateState {
            closed: false,
            ended: false,
            errand: ErrandSlot(None),
            errand_round: 0,
            errands_done: 0,
            vcpus,
            parked: 0,
            gone: 0,
            threads: Vec::new(),
        };
        Arc::new(PauseGate { state: Mutex::new(state), changed: Condvar::new() })
    }

    fn state(&self) -> MutexGuard<'_, GateState> {
        lock(&self.state)
    }

    /// Called by a vCPU thread as it starts: it becomes kickable, and waits here if the guest
    /// was paused before it ever ran.
    pub fn enter(self: &Arc<PauseGate>, vcpu: Option<ParkedVcpu<'_>>) -> Seat {
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        self.state().threads.push(thread);
        self.wait_while_closed(vcpu);
        Seat { gate: self.clone(), thread }
    }

    /// Called by a vCPU thread out of KVM_RUN after a kick: parks while the gate is closed,
    /// doing each errand it is given on `vcpu` meanwhile.
    pub fn wait_while_closed(&self, vcpu: Option<ParkedVcpu<'_>>) {
        let mut state = self.state();
        if !state.closed || state.ended {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        let mut round = state.errand_round;
        while state.closed && !state.ended {
            if state.errand_round != round {
                round = state.errand_round;
                if let (Some(errand), Some((id, fd))) = (state.errand.0.clone(), vcpu) {
                    drop(state);
                    errand(id, fd);
                    state = self.state();
                }
                state.errands_done += 1;
                self.changed.notify_all();
                continue;
            }
            state = self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.parked -= 1;
    }

    /// Has every parked vCPU thread run `errand` on its own vCPU (KVM reads a vCPU's state
    /// best on the thread that runs it), and returns once all have. The guest must be paused.
    pub fn run_errand(&self, errand: Errand) -> Result<(), PauseError> {
        let deadline = Instant::now() + PARK_TIMEOUT;
        let mut state = self.state();
        if !state.closed {
            return Err(PauseError::NotPaused);
        }
        (state.errand, state.errands_done) = (ErrandSlot(Some(errand)), 0);
        state.errand_round += 1;
        self.changed.notify_all();
        let result = loop {
            if state.ended {
                break Err(PauseError::Ended);
            }
            if state.errands_done >= state.parked {
                break Ok(());
            }
            if Instant::now() > deadline {
                break Err(PauseError::Stuck { running: state.parked - state.errands_done });
            }
            state = self.changed.wait_timeout(state, Duration::from_millis(1)).unwrap_or_else(|p| p.into_inner()).0;
        };
        state.errand = ErrandSlot(None);
        result
    }

    /// Stops every vCPU: returns once each is parked (or has finished).
    pub fn pause(&self) -> Result<(), PauseError> {
        let deadline = Instant::now() + PARK_TIMEOUT;
        let mut state = self.state();
        state.closed = true;
        loop {
            if state.ended {
                return Err(PauseError::Ended);
            }
            let settled = state.parked + state.gone;
            if settled >= state.vcpus {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(PauseError::Stuck { running: state.vcpus - settled });
            }
            // A parked thread ignores the kick; a running one leaves KVM_RUN and comes here.
            for thread in &state.threads {
                let _ = LiveThread(*thread).kill(crate::vcpu::kick_signal());
            }
            state = self.changed.wait_timeout(state, Duration::from_millis(1)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Closes the gate before any vCPU thread has started (a restored guest kept paused): each
    /// parks as it enters.
    pub fn close(&self) {
        self.state().closed = true;
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.state().closed = false;
        self.changed.notify_all();
    }

    /// The VM is being taken apart: every parked thread goes, and none parks again.
    pub fn end(&self) {
        self.state().ended = true;
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        let state = self.state();
        state.closed && !state.ended
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut state = self.gate.state();
        state.threads.retain(|thread| *thread != self.thread);
        state.gone += 1;
        self.gate.changed.notify_all();
    }
}

/// A disk's rate limiter and counters, shared by the device, its worker and the API.
#[derive(Clone, Default)]
pub struct DiskHandle {
    pub limiter: SharedLimiter,
    pub metrics: Arc<BlockMetrics>,
}

/// A network card's rate limiters and counters, shared by the device, its worker and the API.
#[derive(Clone)]
pub struct NetHandle {
    /// The host tap the card is on (`None`: passt), which tells the API's cards apart.
    pub tap: Option<String>,
    pub rx: SharedLimiter,
    pub tx: SharedLimiter,
    pub metrics: Arc<NetMetrics>,
}

/// The handles of a VM's disks and network cards, in the order of `VmConfig::disks` and
/// `VmConfig::nets`. They hold no guest memory: the API may keep them after the VM is gone.
#[derive(Clone, Default)]
pub struct LiveDevices {
    pub disks: Vec<DiskHandle>,
    pub nets: Vec<NetHandle>,
}

/// A running VM's handles for the API.
#[derive(Clone)]
pub struct VmControls {
    pub gate: Arc<PauseGate>,
    pub keyboard: Arc<Mutex<I8042>>,
    /// The disks, in the order of `VmConfig::disks`: what `PATCH /drives` changes. Emptied
    /// when the VM is taken apart, so that the API holds no device of a VM that is gone.
    pub drives: Arc<Mutex<Vec<DriveHandle>>>,
    /// The disks' and cards' limiters and counters.
    pub devices: Arc<LiveDevices>,
    /// Every virtio device, emptied with `drives`: what a pause stops.
    pub virtio: Arc<Mutex<Vec<SharedVirtio>>>,
    /// Where a snapshot request goes: the main thread takes it (see [`crate::snapshot`]).
    pub stopper: Arc<crate::stop::Stopper>,
}

impl VmControls {
    /// Parks every vCPU, then stops every device's worker.
    pub fn pause(&self) -> Result<(), PauseError> {
        self.gate.pause()?;
        lock(&self.virtio).iter().for_each(|device| lock(device).pause());
        Ok(())
    }

    /// Has the main thread save the paused VM into the request's files, and waits for it.
    pub fn snapshot(&self, request: crate::snapshot::CreateRequest) -> Result<(), crate::snapshot::SnapshotError> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.stopper.request_snapshot(crate::snapshot::SnapshotJob { request, reply });
        answer.recv().unwrap_or(Err(crate::snapshot::SnapshotError::Stopping))
    }

    /// Restarts the devices' workers, then lets the vCPUs run.
    pub fn resume(&self) {
        lock(&self.virtio).iter().for_each(|device| lock(device).resume());
        self.gate.resume();
    }

    /// Presses Ctrl-Alt-Del; false when the guest has its keyboard disabled.
    pub fn press_ctrl_alt_del(&self) -> bool {
        lock(&self.keyboard).press_ctrl_alt_del()
    }

    /// Puts the image at `path` in the `index`th disk; the guest gets a config-change
    /// interrupt and rereads its size. `None` when the VM has no such disk (any more).
    pub fn change_medium(&self, index: usize, path: PathBuf) -> Option<Result<(), UpdateError>> {
        let drives = lock(&self.drives);
        let changed = drives.get(index).map(|drive| drive.change_medium(path))?;
        if let Some(disk) = self.devices.disks.get(index) {
            let counter = if changed.is_ok() { &disk.metrics.update_count } else { &disk.metrics.update_fails };
            counter.inc();
        }
        Some(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A stand-in vCPU loop: counts while the gate is open, parks when it is closed. (The real
    /// vCPU loop is exercised by the API's tests on a tiny guest.)
    fn spin(gate: Arc<PauseGate>, count: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
        crate::vcpu::install_kick_handler().expect("kick handler");
        std::thread::spawn(move || {
            let _seat = gate.enter(None);
            while !gate.state().ended {
                count.fetch_add(1, Ordering::Relaxed);
                gate.wait_while_closed(None);
                std::thread::yield_now();
            }
        })
    }

    #[test]
    fn pause_parks_every_thread_and_resume_releases_them() {
        let gate = PauseGate::new(2);
        let count = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..2).map(|_| spin(gate.clone(), count.clone())).collect();
        gate.pause().expect("pause");
        assert!(gate.is_paused());
        let frozen = count.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(count.load(Ordering::Relaxed), frozen, "a parked thread ran");
        gate.resume();
        while count.load(Ordering::Relaxed) == frozen {
            std::thread::yield_now();
        }
        gate.end();
        threads.into_iter().for_each(|t| t.join().expect("thread"));
        assert_eq!(gate.pause(), Err(PauseError::Ended));
    }

    #[test]
    fn a_thread_that_starts_paused_waits_before_running() {
        let gate = PauseGate::new(1);
        let count = Arc::new(AtomicU64::new(0));
        gate.state().closed = true;
        let thread = spin(gate.clone(), count.clone());
        gate.pause().expect("the new thread parks at its seat");
        assert_eq!(count.load(Ordering::Relaxed), 0);
        gate.end();
        thread.join().expect("thread");
    }
}
