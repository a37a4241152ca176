//! The vCPU loop: the seed's `run_guest_once` and `lguest_arch_handle_trap`.
//!
//! `KVM_RUN` does the world switch for us. When it returns, the exit reason says why, and each
//! reason has one handler: port I/O and MMIO go to the [`Bus`]; a triple fault, a failed entry
//! or an internal error kill the guest with a [`GuestFault`] report; an ACPI-style system event
//! ends it cleanly. Anything else we don't expect also ends only the guest, with its name.
//! HLT, interrupts and the timer never come here: the in-kernel irqchip handles them.
//!
//! So a vCPU whose guest sits in HLT never comes back by itself. To stop one (the VM is being
//! torn down) the main thread *kicks* its thread with a signal of our own ([`kick`]): the
//! handler sets the run area's `immediate_exit`, which makes a KVM_RUN in progress, or the
//! next one, return EINTR at once; the loop then sees the stop and returns. The same kick
//! pauses a guest: the loop clears `immediate_exit` and waits at the [`PauseGate`] while it is
//! closed ([`crate::control`]).

use std::cell::Cell;
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{kvm_run, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use crate::memory::GuestMemoryMmap;

use crate::bus::Bus;
use crate::control::PauseGate;
use crate::seccomp::{self, Role};
use crate::fault::{FaultKind, GuestFault};
use crate::stop::{StopReason, Stopper};
use crate::timeline::{ExitKind, Milestone, Timeline};

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryMmap,
    pub stopper: Arc<Stopper>,
    pub timeline: Arc<Timeline>,
    /// Where this vCPU parks while the guest is paused (see [`crate::control`]).
    pub gate: Arc<PauseGate>,
}

/// What an exit asks of us once KVM's borrow of the run area is over.
enum Next {
    Continue,
    /// KVM_RUN was interrupted by a kick: to stop, to pause, or late.
    Kicked,
    Stop(StopReason),
    Fault(FaultKind),
}

thread_local! {
    /// The run area of the vCPU this thread runs, for [`on_kick`]; null while it runs none.
    static RUN_AREA: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread: a real-time one, which nobody else sends us.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick's handler, for the whole process (installing it again changes nothing).
/// It is installed without `SA_RESTART`, so the signal interrupts KVM_RUN instead of resuming it.
pub fn install_kick_handler() -> std::io::Result<()> {
    // `on_kick` may run at any instruction of the thread: it only reads a thread-local (const
    // initialised, no destructor) and writes one byte of the run area, both async-signal-safe.
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = RUN_AREA.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is set by `Vcpu::run` on this very thread while its `VcpuFd`, and
        // so the mapping of the run area, is alive, and cleared before it goes away.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Kicks the vCPU thread out of KVM_RUN (see the module's story). A thread that has already
/// finished, but is not joined yet, is simply not found.
pub fn kick(thread: &JoinHandle<()>) {
    use vmm_sys_util::signal::Killable;
    let _ = thread.kill(kick_signal());
}

/// Publishes a vCPU's run area to the kick handler for as long as it lives.
struct Kickable;

impl Kickable {
    fn arm(run: *mut kvm_run) -> Kickable {
        RUN_AREA.with(|area| area.set(run));
        Kickable
    }
}

impl Drop for Kickable {
    fn drop(&mut self) {
        RUN_AREA.with(|area| area.set(std::ptr::null_mut()));
    }
}

impl Vcpu {
    /// Runs the guest until this vCPU, or anyone else, stops the VM.
    pub fn run(mut self) {
        if let Err(e) = seccomp::confine(Role::Vcpu) {
            return self.stopper.stop(StopReason::HostError(e.to_string()));
        }
        let _seat = self.gate.enter(Some((self.id, &self.fd)));
        // Dropped before `self` (and with it the run area's mapping): locals go before arguments.
        let _kickable = Kickable::arm(self.fd.get_kvm_run());
        if self.id == 0 {
            self.timeline.mark(Milestone::FirstKvmRun);
        }
        loop {
            let next = self.run_once();
            let reason = match next {
                Next::Continue if self.stopper.is_stopped() => return,
                Next::Continue => continue,
                Next::Kicked => {
                    // Cleared before the checks: a kick that comes after them makes the next
                    // KVM_RUN return at once, so none is lost.
                    self.fd.set_kvm_immediate_exit(0);
                    if self.stopper.is_stopped() {
                        return;
                    }
                    self.gate.wait_while_closed(Some((self.id, &self.fd)));
                    continue;
                }
                Next::Stop(reason) => reason,
                Next::Fault(kind) => {
                    StopReason::GuestFault(Box::new(GuestFault::capture(kind, self.id, &self.fd, &self.mem)))
                }
            };
            return self.stopper.stop(reason);
        }
    }

    /// One world switch and the handling of its exit.
    fn run_once(&mut self) -> Next {
        let next = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                self.timeline.count_exit(ExitKind::PortIn);
                self.timeline.count_port(port);
                self.pio.read(u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.timeline.count_exit(ExitKind::PortOut);
                self.timeline.count_port(port);
                self.pio.write(u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.timeline.count_exit(ExitKind::MmioRead);
                self.mmio.read(addr, data);
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.timeline.count_exit(ExitKind::MmioWrite);
                self.mmio.write(addr, data);
                Next::Continue
            }
            Ok(VcpuExit::Intr) => {
                self.timeline.count_exit(ExitKind::Other);
                Next::Continue
            }
            Ok(VcpuExit::Shutdown) => Next::Fault(FaultKind::TripleFault),
            Ok(VcpuExit::FailEntry(reason, _cpu)) => Next::Fault(FaultKind::FailedEntry { reason }),
            Ok(VcpuExit::InternalError) => Next::Fault(FaultKind::InternalError { suberror: 0 }),
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => Next::Stop(StopReason::PowerOff),
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => Next::Stop(StopReason::Reset),
            Ok(other) => Next::Fault(FaultKind::UnexpectedExit(format!("{other:?}"))),
            Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => Next::Kicked,
            Err(e) => Next::Stop(StopReason::HostError(format!("KVM_RUN failed on vCPU {}: {e}", self.id))),
        };
        match next {
            Next::Fault(FaultKind::InternalError { .. }) => Next::Fault(FaultKind::InternalError { suberror: self.internal_suberror() }),
            next => next,
        }
    }

    /// The sub-reason KVM left in the run area with its last internal-error exit.
    fn internal_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, for which the kernel fills the
        // `internal` member of the run area's exit union; it is plain integers.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }
}
