//! Shared by the benchmark programs of `bench/` (see bench/README.md).
//!
//! The exit-cost benchmark asks one question: what does a guest's trip to user space cost,
//! through lguest's whole path, against the floor no VMM can beat on the same KVM? The
//! pieces live here, so the `exit-cost` program stays a story of what it measures:
//!
//! - [`exit_loop_code`]: the tiny guest, 64-bit code that signals lguest's boot timer (the
//!   clock starts), writes N times to one I/O port and pulls the keyboard controller's reset
//!   line (the clock stops);
//! - [`elf64`]: that code as the one-segment ELF file `lguest run --kernel` boots at its entry;
//! - [`bare`]: a VMM cut to the bone (one vCPU in long mode, no irqchip, no devices, a
//!   `KVM_RUN` loop that matches the exit and goes straight back in), which runs the same code;
//! - [`Timeline`]: the numbers `lguest run --boot-timeline` prints, read back.

pub mod bare;

use iced_x86::code_asm::{al, byte_ptr, dx, eax, ecx, rax, CodeAssembler, IcedError};

/// Where the tiny guest is loaded and starts: 1 MiB, where lguest loads kernels.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// The keyboard controller's command port and its "pulse the reset line" command: how the
/// tiny guest ends (lguest turns it into a clean exit; the bare loop stops on it).
pub const RESET_PORT: u16 = 0x64;
pub const RESET_COMMAND: u8 = 0xfe;

/// lguest's boot timer: the byte 123 written here is the "guest signalled the boot timer"
/// milestone of `--boot-timeline`. The tiny guest writes it just before its loop, so the
/// time measured leaves out everything before (process start, VM set-up, first entry).
pub const BOOT_TIMER_ADDR: u32 = 0xfe00_0000;
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// A port no device of lguest claims: the write goes to the bus, finds nothing, is counted
/// and dropped.
pub const UNHANDLED_PORT: u16 = 0x300;
/// COM1's scratch register: the write reaches the 16550A (its lock, vm-superio's register
/// decode) and is stored there, with no output and no interrupt.
pub const DEVICE_PORT: u16 = 0x3ff;

/// The tiny guest: the boot-timer signal, then `out` to `port` `exits` times (each one exit
/// to the VMM), then the reset.
///
/// ```text
///         mov eax, 0xfe000000
///         mov byte [rax], 123 ; the clock starts (an MMIO exit)
///         mov ecx, EXITS
///         mov dx, PORT
///         xor eax, eax
/// again:  out dx, al
///         dec ecx
///         jnz again
///         mov al, 0xfe
///         out 0x64, al        ; reset: the run ends here
/// halt:   hlt
///         jmp halt
/// ```
pub fn exit_loop_code(port: u16, exits: u32) -> Result<Vec<u8>, String> {
    if exits == 0 {
        return Err("the guest needs at least one exit (with 0, `dec ecx` would wrap)".into());
    }
    let assemble = || -> Result<Vec<u8>, IcedError> {
        let mut asm = CodeAssembler::new(64)?;
        let mut again = asm.create_label();
        let mut halt = asm.create_label();
        asm.mov(eax, BOOT_TIMER_ADDR)?;
        asm.mov(byte_ptr(rax), u32::from(BOOT_TIMER_MAGIC))?;
        asm.mov(ecx, exits)?;
        asm.mov(dx, u32::from(port))?;
        asm.xor(eax, eax)?;
        asm.set_label(&mut again)?;
        asm.out(dx, al)?;
        asm.dec(ecx)?;
        asm.jnz(again)?;
        asm.mov(al, u32::from(RESET_COMMAND))?;
        asm.out(u32::from(RESET_PORT), al)?;
        asm.set_label(&mut halt)?;
        asm.hlt()?;
        asm.jmp(halt)?;
        asm.assemble(LOAD_ADDR)
    };
    assemble().map_err(|e| format!("assembling the tiny guest: {e}"))
}

/// A minimal ELF64 executable: header, one PT_LOAD program header, then `code` at file
/// offset 0x1000, loaded at and entered at `addr` (as in tests/common/mod.rs).
pub fn elf64(code: &[u8], addr: u64) -> Vec<u8> {
    const CODE_OFFSET: u64 = 0x1000;
    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]); // 64-bit, little-endian, v1
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&addr.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&7u32.to_le_bytes()); // RWX
    let len = code.len() as u64;
    for word in [CODE_OFFSET, addr, addr, len, len, 0x1000] {
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.resize(CODE_OFFSET as usize, 0);
    elf.extend_from_slice(code);
    elf
}

/// What `lguest run --boot-timeline` reported on stderr: milliseconds since process start.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    pub first_kvm_run_ms: f64,
    pub guest_signal_ms: f64,
    pub stopped_ms: f64,
    pub port_out_exits: u64,
}

impl Timeline {
    /// Reads the report's lines: `   12.345  first KVM_RUN`, `   12.400  guest signalled the
    /// boot timer`, `   99.000  VM stopped` and
    /// `  exits to lguest: port in 0, port out 20001, ...`.
    pub fn parse(stderr: &str) -> Result<Timeline, String> {
        let milestone = |name: &str| {
            stderr
                .lines()
                .find_map(|line| line.trim().strip_suffix(name)?.trim().parse::<f64>().ok())
                .ok_or_else(|| format!("no '{name}' line in lguest's --boot-timeline report"))
        };
        let port_out_exits = stderr
            .lines()
            .find_map(|line| line.trim().strip_prefix("exits to lguest:"))
            .and_then(|counts| {
                counts
                    .split(',')
                    .find_map(|c| c.trim().strip_prefix("port out ")?.trim().parse().ok())
            })
            .ok_or("no 'port out' count in lguest's --boot-timeline report")?;
        Ok(Timeline {
            first_kvm_run_ms: milestone("first KVM_RUN")?,
            guest_signal_ms: milestone("guest signalled the boot timer")?,
            stopped_ms: milestone("VM stopped")?,
            port_out_exits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tiny_guest_ends_with_the_reset() {
        let code = exit_loop_code(DEVICE_PORT, 5).expect("assembles");
        // mov eax, 0xfe000000; mov byte [rax], 123; mov ecx, 5 ... out dx, al ...
        // mov al, 0xfe; out 0x64, al; hlt; jmp halt
        assert_eq!(&code[..5], &[0xb8, 0, 0, 0, 0xfe]);
        assert_eq!(&code[5..8], &[0xc6, 0x00, 123]);
        assert_eq!(&code[8..13], &[0xb9, 5, 0, 0, 0]);
        assert!(code.windows(5).any(|w| w == [0xb0, 0xfe, 0xe6, 0x64, 0xf4]), "{code:02x?}");
        assert!(exit_loop_code(DEVICE_PORT, 0).is_err());
    }

    #[test]
    fn the_elf_has_its_code_at_0x1000_and_the_entry() {
        let elf = elf64(&[0x90, 0xf4], LOAD_ADDR);
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(u64::from_le_bytes(elf[24..32].try_into().expect("8 bytes")), LOAD_ADDR);
        assert_eq!(&elf[0x1000..], &[0x90, 0xf4]);
    }

    #[test]
    fn reads_lguests_timeline_report() {
        let report = "lguest: boot timeline (ms since process start):\n     \
             3.250  VM built (KVM ready, kernel loaded)\n     \
             3.400  first KVM_RUN\n     \
             3.500  guest signalled the boot timer\n   \
             210.500  VM stopped\n  \
             exits to lguest: port in 0, port out 20001, mmio read 0, mmio write 0, other 3\n";
        let t = Timeline::parse(report).expect("parses");
        assert_eq!(
            t,
            Timeline { first_kvm_run_ms: 3.4, guest_signal_ms: 3.5, stopped_ms: 210.5, port_out_exits: 20001 }
        );
        assert!(Timeline::parse("lguest: oops").is_err());
    }
}
