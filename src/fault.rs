//! The seed's `kill_guest`: when a guest does something we cannot carry on from, it alone
//! dies, and the user is told what happened and where, in words they can act on.
//!
//! A report names the trap (triple fault, failed VM entry, KVM internal error), the vCPU, the
//! instruction pointer, the control registers, and the instruction bytes at RIP when they can
//! be read. On a PVM host (a software hypervisor that cannot run stock kernels) it says so.

use std::fmt;
use std::path::Path;

use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};
use crate::memory::GuestMemoryMmap;

/// What kind of trap ended the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// An exception while delivering a double fault: x86's way of saying "reset".
    TripleFault,
    /// KVM could not enter the guest; the hardware reason code.
    FailedEntry { reason: u64 },
    /// KVM could not handle something, usually an instruction it had to emulate.
    InternalError { suberror: u32 },
    /// An exit we have no handler for.
    UnexpectedExit(String),
}

/// Everything we could learn about the guest at the moment it died.
#[derive(Debug, Clone)]
pub struct GuestFault {
    pub kind: FaultKind,
    pub vcpu: u8,
    pub rip: u64,
    pub cs: u16,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub code: Option<Vec<u8>>,
    pub pvm_host: bool,
}

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

impl GuestFault {
    /// Reads the dying vCPU's state. Never fails: what can't be read is left out.
    pub fn capture(kind: FaultKind, vcpu_id: u8, vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> GuestFault {
        let regs = vcpu.get_regs().unwrap_or_default();
        let sregs = vcpu.get_sregs().unwrap_or_default();
        let linear = sregs.cs.base.wrapping_add(regs.rip);
        let physical = match vcpu.translate_gva(linear) {
            Ok(t) if t.valid != 0 => Some(t.physical_address),
            _ if sregs.cr0 & (1 << 31) == 0 => Some(linear),
            _ => None,
        };
        let code = physical.and_then(|addr| read_code(mem, addr));
        GuestFault {
            kind,
            vcpu: vcpu_id,
            rip: regs.rip,
            cs: sregs.cs.selector,
            cr0: sregs.cr0,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
            code,
            pvm_host: host_kvm_is_pvm(),
        }
    }
}

/// Up to 16 bytes at `addr`, stopping at the end of guest memory.
fn read_code(mem: &GuestMemoryMmap, addr: u64) -> Option<Vec<u8>> {
    (1..=16usize).rev().find_map(|len| {
        let mut bytes = vec![0u8; len];
        mem.read_slice(&mut bytes, GuestAddress(addr)).ok().map(|_| bytes)
    })
}

/// This host's /dev/kvm is PVM (a software hypervisor): stock kernels can't run on it.
/// Looked up once, while the VM is built: a vCPU thread's seccomp filter allows no file access.
pub fn host_kvm_is_pvm() -> bool {
    static PVM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PVM.get_or_init(|| Path::new("/sys/module/kvm_pvm").exists())
}

/// Says at once, on a PVM host, what would otherwise take a stock kernel about two minutes of
/// emulation to show; once per process. The guest runs anyway: a PVM-enabled kernel would.
pub fn warn_if_host_kvm_is_pvm() {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if host_kvm_is_pvm() {
        WARNED.call_once(|| {
            eprintln!(
                "lguest: warning: this host's KVM is PVM (/sys/module/kvm_pvm), which runs only PVM-enabled guest \
                 kernels; a stock kernel fails after about 2 minutes of emulation. Stock kernels run in the nested lab \
                 (lab/README.md, scripts/demo.sh)"
            )
        });
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultKind::TripleFault => write!(f, "triple fault"),
            FaultKind::FailedEntry { reason } => write!(f, "VM entry failed (hardware reason {reason:#x})"),
            FaultKind::InternalError { suberror: KVM_INTERNAL_ERROR_EMULATION } => {
                write!(f, "KVM internal error: instruction emulation failed")
            }
            FaultKind::InternalError { suberror } => write!(f, "KVM internal error (suberror {suberror})"),
            FaultKind::UnexpectedExit(what) => write!(f, "unexpected exit: {what}"),
        }
    }
}

impl GuestFault {
    /// Whether the registers read are a freshly reset x86 CPU's (RIP 0xfff0 in CS 0xf000,
    /// paging and protection off), not the state the guest died in.
    fn is_reset_state(&self) -> bool {
        self.rip == 0xfff0 && self.cs == 0xf000 && self.cr0 & 1 == 0 && self.cr3 == 0
    }
}

impl fmt::Display for GuestFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "guest stopped: {} on vCPU {} at RIP {:#x} (CS {:#x})", self.kind, self.vcpu, self.rip, self.cs)?;
        write!(f, "  CR0={:#x} CR3={:#x} CR4={:#x} EFER={:#x}", self.cr0, self.cr3, self.cr4, self.efer)?;
        match &self.code {
            Some(code) => {
                let hex: Vec<String> = code.iter().map(|b| format!("{b:02x}")).collect();
                write!(f, "\n  code at RIP: {}", hex.join(" "))?;
            }
            None => write!(f, "\n  code at RIP: unreadable")?,
        }
        if self.kind == FaultKind::TripleFault && self.is_reset_state() {
            write!(
                f,
                "\n  note: these are x86's reset values: KVM reset the vCPU at the shutdown (AMD's SVM does), so they \
                 don't show where the guest was; the guest console's last lines say why (a kernel that panics with \
                 panic=-1 reboots through a triple fault)"
            )?;
        }
        if self.pvm_host && matches!(self.kind, FaultKind::InternalError { .. }) {
            write!(
                f,
                "\n  note: this host's KVM is PVM (/sys/module/kvm_pvm), which runs only PVM-enabled guest kernels; \
                 boot stock kernels in the nested lab (lab/run.sh, or the README's demo command)"
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(kind: FaultKind, pvm_host: bool) -> GuestFault {
        GuestFault {
            kind, vcpu: 0, rip: 0x100004, cs: 0x10, cr0: 0x80000011, cr3: 0x9000, cr4: 0x20, efer: 0x500,
            code: Some(vec![0x0f, 0x0b]), pvm_host,
        }
    }

    #[test]
    fn report_names_trap_rip_registers_and_code() {
        let text = fault(FaultKind::TripleFault, false).to_string();
        assert!(text.contains("triple fault on vCPU 0 at RIP 0x100004"), "{text}");
        assert!(text.contains("CR0=0x80000011 CR3=0x9000 CR4=0x20 EFER=0x500"), "{text}");
        assert!(text.contains("code at RIP: 0f 0b"), "{text}");
        assert!(!text.contains("PVM"));
    }

    #[test]
    fn a_triple_fault_reported_in_reset_state_says_the_registers_do_not_show_the_crash() {
        let mut reset = fault(FaultKind::TripleFault, false);
        (reset.rip, reset.cs, reset.cr0, reset.cr3, reset.cr4, reset.efer) = (0xfff0, 0xf000, 0x10, 0, 0, 0);
        let text = reset.to_string();
        assert!(text.contains("reset values") && text.contains("console"), "{text}");
        assert!(!fault(FaultKind::TripleFault, false).to_string().contains("reset values"));
    }

    #[test]
    fn emulation_failure_on_pvm_points_to_the_lab() {
        let text = fault(FaultKind::InternalError { suberror: 1 }, true).to_string();
        assert!(text.contains("instruction emulation failed"), "{text}");
        assert!(text.contains("PVM") && text.contains("nested lab"), "{text}");
    }

    #[test]
    fn code_is_read_up_to_the_end_of_memory() {
        let mem = crate::memory::create_guest_memory(32 << 20, crate::memory::Tracking::Off).expect("memory");
        assert_eq!(read_code(&mem, 0x1000).map(|c| c.len()), Some(16));
        assert_eq!(read_code(&mem, (32 << 20) - 3).map(|c| c.len()), Some(3));
        assert_eq!(read_code(&mem, 1 << 40), None);
    }
}
