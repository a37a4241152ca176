//! Shared by the benchmark programs of `bench/` (see bench/README.md).
//!
//! The exit-cost benchmark asks one question: what does a guest's trip to user space cost,
//! through lguest's whole path, against the floor no VMM can beat on the same KVM? The
//! pieces live here, so the `exit-cost` program stays a story of what it measures:
//!
//! - [`exit_loop_code`]: the tiny guest, 64-bit code that reads its time-stamp counter,
//!   writes N times to one I/O port, reads the counter again and prints the difference on
//!   COM1 (`TSC <hex>`), then pulls the keyboard controller's reset line. The guest times
//!   itself, so the number is the same kind under any VMM and leaves out everything around
//!   the loop (process start, VM set-up, first entry, tear-down);
//! - [`elf64`]: that code as the one-segment ELF file `lguest run --kernel` boots at its entry;
//! - [`bare`]: a VMM cut to the bone (one vCPU in long mode, no irqchip, no devices, a
//!   `KVM_RUN` loop that matches the exit and goes straight back in), which runs the same code;
//! - [`tsc_report`]: the guest's `TSC <hex>` line, read back from its console output.

pub mod bare;

use iced_x86::code_asm::{al, bl, cl, dx, ecx, rax, rbx, rdx, rsi, CodeAssembler, IcedError};

/// Where the tiny guest is loaded and starts: 1 MiB, where lguest loads kernels.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// The keyboard controller's command port and its "pulse the reset line" command: how the
/// tiny guest ends (lguest turns it into a clean exit; the bare loop stops on it).
pub const RESET_PORT: u16 = 0x64;
pub const RESET_COMMAND: u8 = 0xfe;

/// COM1's data register, where the guest prints its report.
pub const COM1_DATA: u16 = 0x3f8;

/// A port no device of lguest claims: the write goes to the bus, finds nothing, is counted
/// and dropped.
pub const UNHANDLED_PORT: u16 = 0x300;
/// COM1's scratch register: the write reaches the 16550A (its lock, vm-superio's register
/// decode) and is stored there, with no output and no interrupt.
pub const DEVICE_PORT: u16 = 0x3ff;

/// The tiny guest: time `exits` writes to `port` with the TSC, print it, reset.
///
/// ```text
///         rdtsc                   ; edx:eax = start
///         shl rdx, 32
///         or rax, rdx
///         mov rsi, rax
///         mov ecx, EXITS
///         mov dx, PORT
/// again:  out dx, al              ; one exit each
///         dec ecx
///         jnz again
///         rdtsc                   ; rax = end - start
///         shl rdx, 32
///         or rax, rdx
///         sub rax, rsi
///         mov rbx, rax
///         mov dx, 0x3f8           ; "TSC " and 16 hex digits, "\n", on COM1
///         (print "TSC ")
///         mov cl, 16
/// digit:  rol rbx, 4
///         mov al, bl
///         and al, 0xf
///         add al, '0'
///         cmp al, '9'
///         jbe put
///         add al, 'a' - '0' - 10
/// put:    out dx, al
///         dec cl
///         jnz digit
///         mov al, '\n'
///         out dx, al
///         mov al, 0xfe
///         out 0x64, al            ; reset: the run ends here
/// halt:   hlt
///         jmp halt
/// ```
pub fn exit_loop_code(port: u16, exits: u32) -> Result<Vec<u8>, String> {
    if exits == 0 {
        return Err("the guest needs at least one exit (with 0, `dec ecx` would wrap)".into());
    }
    let assemble = || -> Result<Vec<u8>, IcedError> {
        let mut asm = CodeAssembler::new(64)?;
        let (mut again, mut digit, mut put, mut halt) =
            (asm.create_label(), asm.create_label(), asm.create_label(), asm.create_label());
        asm.rdtsc()?;
        asm.shl(rdx, 32u32)?;
        asm.or(rax, rdx)?;
        asm.mov(rsi, rax)?;
        asm.mov(ecx, exits)?;
        asm.mov(dx, u32::from(port))?;
        asm.set_label(&mut again)?;
        asm.out(dx, al)?;
        asm.dec(ecx)?;
        asm.jnz(again)?;
        asm.rdtsc()?;
        asm.shl(rdx, 32u32)?;
        asm.or(rax, rdx)?;
        asm.sub(rax, rsi)?;
        asm.mov(rbx, rax)?;
        asm.mov(dx, u32::from(COM1_DATA))?;
        for byte in *b"TSC " {
            asm.mov(al, u32::from(byte))?;
            asm.out(dx, al)?;
        }
        asm.mov(cl, 16u32)?;
        asm.set_label(&mut digit)?;
        asm.rol(rbx, 4u32)?;
        asm.mov(al, bl)?;
        asm.and(al, 0xfu32)?;
        asm.add(al, u32::from(b'0'))?;
        asm.cmp(al, u32::from(b'9'))?;
        asm.jbe(put)?;
        asm.add(al, u32::from(b'a' - b'0' - 10))?;
        asm.set_label(&mut put)?;
        asm.out(dx, al)?;
        asm.dec(cl)?;
        asm.jnz(digit)?;
        asm.mov(al, u32::from(b'\n'))?;
        asm.out(dx, al)?;
        asm.mov(al, u32::from(RESET_COMMAND))?;
        asm.out(u32::from(RESET_PORT), al)?;
        asm.set_label(&mut halt)?;
        asm.hlt()?;
        asm.jmp(halt)?;
        asm.assemble(LOAD_ADDR)
    };
    assemble().map_err(|e| format!("assembling the tiny guest: {e}"))
}

/// The TSC ticks the guest reported (`TSC <16 hex digits>` on a line of its console output).
pub fn tsc_report(console: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(console);
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("TSC "))
        .find_map(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// A minimal ELF64 executable: header, one PT_LOAD program header, then `code` at file
/// offset 0x1000, loaded at and entered at `addr`. lguest's own tests build their tiny guests
/// with it too.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tiny_guest_times_its_loop_prints_and_resets() {
        let code = exit_loop_code(DEVICE_PORT, 5).expect("assembles");
        // rdtsc first; mov ecx, 5 and mov dx, 0x3ff before the loop; the reset at the end.
        assert_eq!(&code[..2], &[0x0f, 0x31]);
        assert!(code.windows(5).any(|w| w == [0xb9, 5, 0, 0, 0]), "{code:02x?}");
        assert!(code.windows(4).any(|w| w == [0x66, 0xba, 0xff, 0x03]), "{code:02x?}");
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
    fn reads_the_guests_report() {
        assert_eq!(tsc_report(b"noise\nTSC 00000000000fa0c8\n"), Some(0xfa0c8));
        assert_eq!(tsc_report(b"TSC 0000000000000010\r\n"), Some(16));
        assert_eq!(tsc_report(b"TSC zz\n"), None);
        assert_eq!(tsc_report(b""), None);
    }
}
