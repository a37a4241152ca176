//! The vCPU loop: the seed's `run_guest_once` and `lguest_arch_handle_trap`.
//!
//! `KVM_RUN` does the world switch for us. When it returns, the exit reason says why, and each
//! reason has one handler: port I/O and MMIO go to the [`Bus`]; a triple fault, a failed entry
//! or an internal error kill the guest with a [`GuestFault`] report; an ACPI-style system event
//! ends it cleanly. Anything else we don't expect also ends only the guest, with its name.
//! HLT, interrupts and the timer never come here: the in-kernel irqchip handles them.

use std::sync::Arc;

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use crate::bus::Bus;
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
}

/// What an exit asks of us once KVM's borrow of the run area is over.
enum Next {
    Continue,
    Stop(StopReason),
    Fault(FaultKind),
}

impl Vcpu {
    /// Runs the guest until this vCPU, or anyone else, stops the VM.
    pub fn run(mut self) {
        if let Err(e) = seccomp::confine(Role::Vcpu) {
            return self.stopper.stop(StopReason::HostError(e.to_string()));
        }
        if self.id == 0 {
            self.timeline.mark(Milestone::FirstKvmRun);
        }
        loop {
            let next = self.run_once();
            let reason = match next {
                Next::Continue if self.stopper.is_stopped() => return,
                Next::Continue => continue,
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
                self.pio.read(u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.timeline.count_exit(ExitKind::PortOut);
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
            Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => Next::Continue,
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
