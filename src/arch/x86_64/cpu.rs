//! The register state a guest wakes up in: the seed's `lguest_arch_setup_regs`, for KVM.
//!
//! The boot vCPU starts where the boot protocol says: in long mode on identity page tables for
//! a bzImage's 64-bit entry, or in flat 32-bit protected mode for PVH. The other vCPUs are left
//! in KVM's INIT-wait state; the guest wakes them with INIT/SIPI through the in-kernel LAPIC.
//!
//! CPUID is KVM's supported set (which carries the KVM hypervisor leaves, so the guest finds
//! kvm-clock), amended with each vCPU's APIC ID and the hypervisor bit.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use crate::memory::GuestMemoryMmap;

use super::boot::Entry;
use crate::error::{guest_write, kvm, Error, Result};
use crate::memory::layout;

/// GDT selectors the boot protocols name: `__BOOT_CS` and `__BOOT_DS`.
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page-table entry bits: present, writable, and (in a PD) a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PTE_HUGE: u64 = 0x80;

/// Builds a GDT descriptor from its flags (access byte plus the granularity nibble), base
/// and limit, in the scattered layout the hardware wants.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The segment register KVM wants for a GDT descriptor at `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let bits = |shift: u32, width: u32| ((entry >> shift) & ((1 << width) - 1)) as u8;
    let g = bits(55, 1);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector,
        type_: bits(40, 4),
        s: bits(44, 1),
        dpl: bits(45, 2),
        present: bits(47, 1),
        avl: bits(52, 1),
        l: bits(53, 1),
        db: bits(54, 1),
        g,
        unusable: 0,
        padding: 0,
    }
}

/// The boot GDT for an entry style: null, null, code, data, TSS.
pub fn boot_gdt(entry: Entry) -> [u64; 5] {
    let code = match entry {
        Entry::Linux64 { .. } => gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code, L=1
        Entry::Pvh { .. } => gdt_entry(0xc09b, 0, 0xfffff),     // 32-bit flat code, D=1
    };
    [0, 0, code, gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x008b, 0, 0x67)]
}

/// Identity page tables covering the first 4 GiB with 2 MiB pages: what the 64-bit boot
/// protocol asks for (kernel, zero page and command line all identity-mapped).
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(guest_write("page tables"))
    };
    write(layout::PDPT | PTE_PRESENT_RW, layout::PML4)?;
    for gib in 0..4u64 {
        write((layout::PD + gib * 0x1000) | PTE_PRESENT_RW, layout::PDPT + gib * 8)?;
    }
    for page in 0..(4 * 512u64) {
        write((page << 21) | PTE_PRESENT_RW | PTE_HUGE, layout::PD + page * 8)?;
    }
    Ok(())
}

/// Sets up the boot vCPU's segments, control registers and general registers for `entry`.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, mem: &GuestMemoryMmap, entry: Entry) -> Result<()> {
    let gdt = boot_gdt(entry);
    for (index, descriptor) in gdt.iter().enumerate() {
        mem.write_obj(*descriptor, GuestAddress(layout::GDT + index as u64 * 8))
            .map_err(guest_write("the GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT)).map_err(guest_write("the IDT"))?;

    let mut sregs = vcpu.get_sregs().map_err(kvm("reading vCPU special registers"))?;
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = layout::IDT;
    sregs.idt.limit = 7;
    let code = segment_from_gdt(gdt[usize::from(BOOT_CS / 8)], BOOT_CS);
    let data = segment_from_gdt(gdt[usize::from(BOOT_DS / 8)], BOOT_DS);
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment_from_gdt(gdt[usize::from(BOOT_TSS / 8)], BOOT_TSS);

    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match entry {
        Entry::Linux64 { rip } => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = layout::PML4;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = rip;
            regs.rsi = layout::ZERO_PAGE;
            regs.rsp = layout::BOOT_STACK;
            regs.rbp = layout::BOOT_STACK;
        }
        Entry::Pvh { rip } => {
            sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & !CR0_PG;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = rip;
            regs.rbx = layout::PVH_START_INFO;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("setting vCPU special registers"))?;
    vcpu.set_regs(&regs).map_err(kvm("setting vCPU registers"))
}

/// The CPUID every vCPU starts from: what KVM supports, plus the TSC-deadline timer, which
/// KVM's in-kernel LAPIC emulates but leaves out of its list for the VMM to offer. Without it
/// Linux spends 100 ms of every boot calibrating the LAPIC timer against the PIT.
pub fn base_cpuid(kvm_handle: &Kvm) -> Result<CpuId> {
    let mut cpuid = kvm_handle.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm("listing supported CPUID"))?;
    if kvm_handle.check_extension(Cap::TscDeadlineTimer) {
        offer_tsc_deadline_timer(&mut cpuid);
    }
    Ok(cpuid)
}

/// What every vCPU needs, boot vCPU or not: CPUID (from [`base_cpuid`]), MSRs, FPU and the
/// local APIC's LINT pins.
pub fn setup_common(vcpu: &VcpuFd, base_cpuid: &CpuId, id: u8, cpus: u8) -> Result<()> {
    let mut cpuid = base_cpuid.clone();
    patch_cpuid(&mut cpuid, id, cpus);
    vcpu.set_cpuid2(&cpuid).map_err(kvm("setting CPUID"))?;
    setup_msrs(vcpu)?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm("setting the FPU state"))?;
    setup_lapic_lints(vcpu)
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

fn offer_tsc_deadline_timer(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice().iter_mut().filter(|entry| entry.function == LEAF_FEATURES) {
        entry.ecx |= ECX_TSC_DEADLINE;
    }
}

/// Tells each vCPU who it is: its APIC ID, how many logical CPUs share the package, and that
/// it runs under a hypervisor.
pub fn patch_cpuid(cpuid: &mut CpuId, id: u8, cpus: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(cpus) << 16) | (u32::from(id) << 24);
                entry.ecx |= ECX_HYPERVISOR;
                if cpus > 1 {
                    entry.edx |= EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY => entry.edx = u32::from(id),
            _ => {}
        }
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back: without this the guest maps all RAM uncached.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Internal { what: "the boot MSRs", why: "too many for one KVM_SET_MSRS".into() })?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm("setting MSRs"))?;
    if written != entries.len() {
        tracing::debug!(written, wanted = entries.len(), "KVM accepted only some boot MSRs");
    }
    Ok(())
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7 << 8;
const APIC_MODE_NMI: u32 = 0x4 << 8;

/// LINT0 receives the 8259's interrupts (ExtINT) and LINT1 NMIs, as on a PC, so a guest that
/// runs on the legacy PIC before it finds the IOAPIC still gets its timer.
fn setup_lapic_lints(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("reading the local APIC"))?;
    for (offset, mode) in [(APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let old = u32::from_le_bytes([reg[0] as u8, reg[1] as u8, reg[2] as u8, reg[3] as u8]);
        let new = (old & !0x700) | mode;
        for (dst, src) in reg.iter_mut().zip(new.to_le_bytes()) {
            *dst = src as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("setting the local APIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_known_encodings() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0x1234_5678, 0x67), 0x1280_8b34_5678_0067);
    }

    #[test]
    fn segments_decode_what_the_gdt_says() {
        let code64 = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), BOOT_CS);
        assert_eq!((code64.l, code64.db, code64.g, code64.present, code64.s, code64.type_), (1, 0, 1, 1, 1, 0xb));
        assert_eq!((code64.base, code64.limit, code64.selector), (0, 0xffff_ffff, 0x10));
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), BOOT_DS);
        assert_eq!((data.l, data.db, data.type_, data.limit), (0, 1, 0x3, 0xffff_ffff));
        let tss = segment_from_gdt(gdt_entry(0x008b, 0x1234_5678, 0x67), BOOT_TSS);
        assert_eq!((tss.base, tss.limit, tss.s, tss.type_, tss.g), (0x1234_5678, 0x67, 0, 0xb, 0));
    }

    #[test]
    fn boot_gdt_code_segment_follows_the_entry_style() {
        let long = segment_from_gdt(boot_gdt(Entry::Linux64 { rip: 0 })[2], BOOT_CS);
        let pvh = segment_from_gdt(boot_gdt(Entry::Pvh { rip: 0 })[2], BOOT_CS);
        assert_eq!((long.l, long.db), (1, 0));
        assert_eq!((pvh.l, pvh.db), (0, 1));
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = crate::memory::create_guest_memory(64 << 20, crate::memory::Tracking::Off).expect("memory");
        write_identity_page_tables(&mem).expect("tables");
        let read = |addr| mem.read_obj::<u64>(GuestAddress(addr)).expect("read");
        assert_eq!(read(layout::PML4), layout::PDPT | 3);
        assert_eq!(read(layout::PDPT + 3 * 8), (layout::PD + 0x3000) | 3);
        assert_eq!(read(layout::PD), 0x83);
        // The last 2 MiB page below 4 GiB maps itself.
        assert_eq!(read(layout::PD + 2047 * 8), (2047 << 21) | 0x83);
    }

    #[test]
    fn cpuid_names_each_vcpu() {
        let mut cpuid = CpuId::new(2).expect("cpuid");
        cpuid.as_mut_slice()[0].function = LEAF_FEATURES;
        cpuid.as_mut_slice()[0].ebx = 0x0000_0800;
        cpuid.as_mut_slice()[1].function = LEAF_EXT_TOPOLOGY;
        patch_cpuid(&mut cpuid, 3, 4);
        let leaf1 = cpuid.as_slice()[0];
        assert_eq!(leaf1.ebx, 0x0304_0800);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
        assert_eq!(cpuid.as_slice()[1].edx, 3);
    }

    #[test]
    fn the_tsc_deadline_timer_is_offered_in_leaf_1_only() {
        let mut cpuid = CpuId::new(2).expect("cpuid");
        cpuid.as_mut_slice()[0].function = LEAF_FEATURES;
        cpuid.as_mut_slice()[1].function = LEAF_EXT_TOPOLOGY;
        offer_tsc_deadline_timer(&mut cpuid);
        assert_eq!(cpuid.as_slice()[0].ecx, ECX_TSC_DEADLINE);
        assert_eq!(cpuid.as_slice()[1].ecx, 0);
    }
}
