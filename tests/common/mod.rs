//! Shared by the integration tests: tiny guest programs assembled at test time and packed as
//! ELF files that `lguest run --kernel` boots through its 64-bit entry, and a way to run the
//! real `lguest` binary with a deadline, so a hang fails the test instead of stalling it.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub mod api;

use bench_tools::elf64;
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

/// Ends a loop that starts at `top`: waits a few thousand instructions and goes back to `top`,
/// until the keyboard has a byte (Ctrl-Alt-Del, lguest's SIGTERM): then says so and resets.
pub fn delay_until_ctrl_alt_del(asm: &mut CodeAssembler, top: iced_x86::code_asm::CodeLabel) {
    use iced_x86::code_asm::*;
    let (mut delay, mut keyed) = (asm.create_label(), asm.create_label());
    asm.in_(al, 0x64).expect("in");
    asm.test(al, 1).expect("test");
    asm.jnz(keyed).expect("jnz");
    asm.mov(ecx, 20_000u32).expect("mov");
    asm.set_label(&mut delay).expect("label");
    asm.dec(ecx).expect("dec");
    asm.jnz(delay).expect("jnz");
    asm.jmp(top).expect("jmp");
    asm.set_label(&mut keyed).expect("label");
    print(asm, "\nCTRL-ALT-DEL\n");
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
