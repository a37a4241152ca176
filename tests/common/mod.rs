//! Shared by the integration tests: tiny guest programs assembled at test time and packed as
//! ELF files that `lguest run --kernel` boots through its 64-bit entry, and a way to run the
//! real `lguest` binary with a deadline, so a hang fails the test instead of stalling it.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use iced_x86::code_asm::CodeAssembler;

/// Where tiny guests are loaded and start: 1 MiB, where kernels go.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Assembles 64-bit code with `program` and writes it as a one-segment ELF in `dir`.
pub fn tiny_guest(dir: &Path, name: &str, program: impl FnOnce(&mut CodeAssembler)) -> PathBuf {
    let mut asm = CodeAssembler::new(64).expect("64-bit assembler");
    program(&mut asm);
    let code = asm.assemble(LOAD_ADDR).expect("assemble");
    let path = dir.join(name);
    std::fs::write(&path, elf64(&code, LOAD_ADDR)).expect("write tiny guest");
    path
}

/// A minimal ELF64 executable: header, one PT_LOAD program header, then the code at 0x1000.
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
    for word in [CODE_OFFSET, addr, addr, code.len() as u64, code.len() as u64, 0x1000] {
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.resize(CODE_OFFSET as usize, 0);
    elf.extend_from_slice(code);
    elf
}

/// Writes `text` to COM1, byte by byte.
pub fn print(asm: &mut CodeAssembler, text: &str) {
    use iced_x86::code_asm::*;
    asm.mov(dx, 0x3f8u32).expect("mov");
    for byte in text.bytes() {
        asm.mov(al, u32::from(byte)).expect("mov");
        asm.out(dx, al).expect("out");
    }
}

/// Pulls the keyboard controller's reset line: the VM should end with status 0.
pub fn reset(asm: &mut CodeAssembler) {
    use iced_x86::code_asm::*;
    asm.mov(al, 0xfeu32).expect("mov");
    asm.out(0x64u32, al).expect("out");
    asm.hlt().expect("hlt");
}

/// Ends a self-checking program: prints `pass` and resets; at the `failed` label (where its
/// checks jump), prints `fail` and resets. The test then compares the output with `pass`.
pub fn report_and_reset(asm: &mut CodeAssembler, mut failed: iced_x86::code_asm::CodeLabel, pass: &str, fail: &str) {
    print(asm, pass);
    reset(asm);
    asm.set_label(&mut failed).expect("label");
    print(asm, fail);
    reset(asm);
}

pub fn lguest() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lguest"))
}

/// Runs `command` with no stdin, fails the test if it has not finished within `limit`.
/// Its output is drained as it comes, so a chatty guest can't block on a full pipe.
pub fn run_with_deadline(mut command: Command, limit: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lguest");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            pipe.read_to_end(&mut bytes).expect("read output");
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let status = wait_with_deadline(&mut child, limit);
    let (stdout, stderr) = (stdout.join().expect("stdout reader"), stderr.join().expect("stderr reader"));
    Output { status, stdout, stderr }
}

/// Waits for `child`; kills it and fails the test if it runs past `limit` (a hang).
pub fn wait_with_deadline(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("lguest did not finish within {limit:?}: a hang");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Boots `kernel` with 64 MiB and returns what happened.
pub fn boot(kernel: &Path) -> Output {
    let mut command = lguest();
    command.args(["run", "--memory", "64M", "--kernel"]).arg(kernel);
    run_with_deadline(command, Duration::from_secs(60))
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
