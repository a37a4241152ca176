//! The floor: a VMM with nothing but a `KVM_RUN` loop.
//!
//! One VM, 4 MiB of anonymous memory, one vCPU put straight into 64-bit mode (flat GDT
//! segments, identity page tables for 1 GiB with 2 MiB pages), no irqchip, no PIT, no
//! devices. The loop calls `KVM_RUN`, looks at the exit, and goes back in: every I/O exit
//! costs the world switch, the kernel's return to user space and one `match`, which is as
//! little as any VMM can spend. lguest's number against this one is its own overhead per
//! exit. Bytes written to COM1's data port are kept: the guest's report. It is also the
//! floor of a VMM's start-up: open KVM, one VM, one memory slot, one vCPU, `KVM_RUN`.

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};

use crate::{COM1_DATA, LOAD_ADDR, RESET_COMMAND, RESET_PORT};

/// As much as the benchmarks give lguest: a memory slot costs the same whatever its size on
/// the hosts seen so far, but that is the host's business, not an assumption made here.
const MEM_SIZE: usize = 256 << 20;
const GDT: usize = 0x500;
const PML4: usize = 0x9000;
const PDPT: usize = 0xa000;
const PD: usize = 0xb000;
const STACK: u64 = 0x8ff0;

/// Anonymous memory for the guest, unmapped when dropped.
struct GuestRam {
    ptr: *mut u8,
    len: usize,
}

impl GuestRam {
    fn new(len: usize) -> Result<GuestRam, String> {
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing; the
        // result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap of guest memory: {}", std::io::Error::last_os_error()));
        }
        Ok(GuestRam { ptr: ptr.cast(), len })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live, writable mapping of `len` bytes owned by self; the mutable
        // borrow of self makes this the only slice of it. It is only used before the vCPU
        // first runs, so the guest never writes to it under our feet.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn put(&mut self, addr: usize, bytes: &[u8]) -> Result<(), String> {
        let end = addr.checked_add(bytes.len()).filter(|&end| end <= self.len);
        let end = end.ok_or_else(|| format!("{} bytes at {addr:#x} do not fit in guest memory", bytes.len()))?;
        self.bytes()[addr..end].copy_from_slice(bytes);
        Ok(())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` with this length and is not used after drop
        // (the VM that referenced it was dropped before, see the field order in `run`).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The result of one bare run.
#[derive(Debug, Clone)]
pub struct BareRun {
    /// I/O exits taken, the report and the final reset write included.
    pub io_exits: u64,
    /// What the guest wrote to COM1's data port.
    pub console: Vec<u8>,
    /// From just before the first `KVM_RUN` to the return of the one that saw the reset.
    pub elapsed: Duration,
    /// From `started` (given to [`run`]) to just before the first `KVM_RUN`.
    pub start_up: Duration,
}

/// Runs `code` (64-bit, loaded and entered at [`LOAD_ADDR`]) until it writes the reset
/// command to the keyboard controller's port. Gives up after `max_exits` exits. `started`:
/// when the process started, for [`BareRun::start_up`].
pub fn run(code: &[u8], max_exits: u64, started: Instant) -> Result<BareRun, String> {
    let kvm = Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
    let mut ram = GuestRam::new(MEM_SIZE)?;

    // Flat GDT: null, null, 64-bit code (0x10), data (0x18); page tables mapping 1 GiB.
    let gdt: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, entry) in gdt.iter().enumerate() {
        ram.put(GDT + i * 8, &entry.to_le_bytes())?;
    }
    ram.put(PML4, &(PDPT as u64 | 0x3).to_le_bytes())?;
    ram.put(PDPT, &(PD as u64 | 0x3).to_le_bytes())?;
    for i in 0..512u64 {
        ram.put(PD + i as usize * 8, &((i << 21) | 0x83).to_le_bytes())?;
    }
    ram.put(LOAD_ADDR as usize, code)?;

    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: ram.ptr as u64,
    };
    // SAFETY: the region is a live mapping of MEM_SIZE bytes owned by `ram`. `ram` is declared
    // before `vm` and the vCPU, so it is dropped after them: the mapping outlives the VM.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;

    let mut sregs = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.gdt.base = GDT as u64;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.cs = segment(0x10, 0xb, true);
    let data = segment(0x18, 0x3, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr3 = PML4 as u64;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= (1 << 0) | (1 << 4) | (1 << 31); // PE, ET, PG
    sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
    vcpu.set_sregs(&sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let regs = kvm_regs { rip: LOAD_ADDR, rsp: STACK, rflags: 0x2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;

    let mut io_exits = 0u64;
    let mut console = Vec::new();
    let start = Instant::now();
    let start_up = start.duration_since(started);
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                io_exits += 1;
                if port == RESET_PORT && data.first() == Some(&RESET_COMMAND) {
                    break;
                }
                if port == COM1_DATA {
                    console.extend_from_slice(data);
                }
            }
            Ok(VcpuExit::IoIn(_, data)) => {
                io_exits += 1;
                data.fill(0xff);
            }
            Ok(other) => return Err(format!("unexpected exit from the tiny guest: {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
        if io_exits > max_exits {
            return Err(format!("the tiny guest made more than {max_exits} exits without the reset"));
        }
    }
    Ok(BareRun { io_exits, console, elapsed: start.elapsed(), start_up })
}
