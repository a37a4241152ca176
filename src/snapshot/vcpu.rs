//! Saving and restoring what KVM keeps of a vCPU and of the VM.
//!
//! A vCPU is saved on its own thread, parked at the pause gate (see
//! [`crate::control::PauseGate::run_errand`]): KVM_RUN returned there with EINTR, which it only
//! does after finishing any port or MMIO access in flight, so no half-done instruction is lost.
//! It is restored on the main thread before its thread starts, in the order KVM needs: CPUID
//! (set when the vCPU is made), the TSC rate, then the registers, the LAPIC, the MSRs (the TSC
//! before its deadline, so by index) and last the pending events, which refer to the rest.

use kvm_bindings::{kvm_irqchip, kvm_msr_entry, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::state::{VcpuState, VmState};
use super::SnapshotError;

/// The MSRs a snapshot saves: every one KVM lists as worth saving (KVM_GET_MSR_INDEX_LIST).
/// Among them the TSC, the SYSCALL MSRs, kvmclock's and the TSC deadline that Firecracker saves.
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    let list = kvm.get_msr_index_list().map_err(kvm_error("list the MSRs"))?;
    Ok(list.as_slice().to_vec())
}

fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// Everything KVM keeps of one vCPU (called on the vCPU's own thread, parked).
pub fn save_vcpu(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, SnapshotError> {
    Ok(VcpuState {
        regs: fd.get_regs().map_err(kvm_error("read a vCPU's registers"))?,
        sregs: fd.get_sregs().map_err(kvm_error("read a vCPU's special registers"))?,
        xsave: fd.get_xsave().map_err(kvm_error("read a vCPU's XSAVE area"))?,
        xcrs: fd.get_xcrs().map_err(kvm_error("read a vCPU's XCRs"))?,
        msrs: read_msrs(fd, msr_indices)?,
        lapic: fd.get_lapic().map_err(kvm_error("read a vCPU's local APIC"))?,
        mp_state: fd.get_mp_state().map_err(kvm_error("read a vCPU's MP state"))?,
        events: fd.get_vcpu_events().map_err(kvm_error("read a vCPU's pending events"))?,
        debugregs: fd.get_debug_regs().map_err(kvm_error("read a vCPU's debug registers"))?,
        tsc_khz: fd.get_tsc_khz().map_err(kvm_error("read a vCPU's TSC rate"))?,
    })
}

/// Reads every MSR of `indices` that this vCPU has. KVM_GET_MSRS stops at the first one it
/// can't read (an MSR of a feature the guest's CPUID doesn't have): that one is skipped and the
/// rest read on.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, SnapshotError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = msrs_of(&entries)?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm_error("read a vCPU's MSRs"))?;
        saved.extend(msrs.as_slice()[..read].iter().map(|entry| (entry.index, entry.data)));
        rest = rest.get(read + 1..).unwrap_or_default();
    }
    Ok(saved)
}

fn msrs_of(entries: &[kvm_msr_entry]) -> Result<Msrs, SnapshotError> {
    Msrs::from_entries(entries).map_err(|_| SnapshotError::Invalid(format!("{} MSRs are more than KVM takes at once", entries.len())))
}

/// Puts a saved vCPU back (on the main thread, before the vCPU's thread starts).
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), SnapshotError> {
    set_tsc_rate(fd, state.tsc_khz)?;
    fd.set_mp_state(state.mp_state).map_err(kvm_error("restore a vCPU's MP state"))?;
    fd.set_regs(&state.regs).map_err(kvm_error("restore a vCPU's registers"))?;
    fd.set_sregs(&state.sregs).map_err(kvm_error("restore a vCPU's special registers"))?;
    // SAFETY: a `kvm_xsave` is the legacy 4 KiB area, the size KVM_SET_XSAVE reads, and it is
    // wholly ours (its contents are checked by KVM, which refuses bad feature bits).
    unsafe { fd.set_xsave(&state.xsave) }.map_err(kvm_error("restore a vCPU's XSAVE area"))?;
    fd.set_xcrs(&state.xcrs).map_err(kvm_error("restore a vCPU's XCRs"))?;
    fd.set_debug_regs(&state.debugregs).map_err(kvm_error("restore a vCPU's debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(kvm_error("restore a vCPU's local APIC"))?;
    write_msrs(fd, &state.msrs)?;
    fd.set_vcpu_events(&state.events).map_err(kvm_error("restore a vCPU's pending events"))
}

/// A guest saved on a host whose TSC ran at another rate keeps its rate, if KVM can scale it.
fn set_tsc_rate(fd: &VcpuFd, khz: u32) -> Result<(), SnapshotError> {
    let here = fd.get_tsc_khz().map_err(kvm_error("read a vCPU's TSC rate"))?;
    if here.abs_diff(khz) > here / 4000 {
        if let Err(e) = fd.set_tsc_khz(khz) {
            tracing::warn!(saved = khz, here, "the guest's TSC rate can't be kept on this host ({e}): its clock will drift");
        }
    }
    Ok(())
}

/// Writes the saved MSRs back, the TSC first (its deadline is relative to it). All of them
/// must go back: one KVM refuses is named.
fn write_msrs(fd: &VcpuFd, saved: &[(u32, u64)]) -> Result<(), SnapshotError> {
    let mut entries: Vec<kvm_msr_entry> = saved.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    entries.sort_by_key(|entry| entry.index);
    let written = fd.set_msrs(&msrs_of(&entries)?).map_err(kvm_error("restore a vCPU's MSRs"))?;
    match entries.get(written) {
        None => Ok(()),
        Some(refused) => Err(SnapshotError::Invalid(format!("KVM refused the value {:#x} of MSR {:#x}", refused.data, refused.index))),
    }
}

/// The in-kernel irqchip (both PICs and the IOAPIC), the PIT and kvmclock.
pub fn save_vm(vm: &VmFd) -> Result<VmState, SnapshotError> {
    let chip = |id| {
        let mut chip = kvm_irqchip { chip_id: id, ..Default::default() };
        vm.get_irqchip(&mut chip).map(|()| chip).map_err(kvm_error("read the interrupt controllers"))
    };
    Ok(VmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_error("read the PIT"))?,
        clock: vm.get_clock().map_err(kvm_error("read kvmclock"))?,
    })
}

/// Puts the VM-wide state back. The clock goes on from where it stopped: the guest sees no
/// time pass while it was saved.
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), SnapshotError> {
    let chips = [(KVM_IRQCHIP_PIC_MASTER, &state.pic_master), (KVM_IRQCHIP_PIC_SLAVE, &state.pic_slave), (KVM_IRQCHIP_IOAPIC, &state.ioapic)];
    for (id, chip) in chips {
        if chip.chip_id != id {
            return Err(SnapshotError::Invalid(format!("interrupt controller {} is saved as controller {}", id, chip.chip_id)));
        }
        vm.set_irqchip(chip).map_err(kvm_error("restore the interrupt controllers"))?;
    }
    vm.set_pit2(&state.pit).map_err(kvm_error("restore the PIT"))?;
    // Only the clock's value is ours to set; the flags say what KVM measured, not what we ask.
    let clock = kvm_bindings::kvm_clock_data { clock: state.clock.clock, ..Default::default() };
    vm.set_clock(&clock).map_err(kvm_error("restore kvmclock"))
}
