//! Tiny guest programs, a few dozen instructions each, run by the real `lguest` binary directly
//! on this host's /dev/kvm. They check the vCPU set-up and the exit handlers end to end, in
//! seconds, on any KVM host (PVM included, which interprets them quickly).

mod common;

use common::*;
use iced_x86::code_asm::*;

#[test]
fn serial_output_reaches_stdout_and_reset_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = tiny_guest(dir.path(), "hello", |a| {
        print(a, "hello from a tiny guest\n");
        reset(a);
    });
    let out = boot(&kernel);
    assert_eq!(text(&out.stdout), "hello from a tiny guest\n");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn absent_ports_read_all_ones_at_every_width() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = tiny_guest(dir.path(), "ones", |a| {
        let bad = a.create_label();
        a.mov(dx, 0x1234u32).expect("mov");
        a.mov(eax, 0u32).expect("mov");
        a.in_(al, dx).expect("in");
        a.cmp(al, 0xffu32 as i32).expect("cmp");
        a.jne(bad).expect("jne");
        a.in_(ax, dx).expect("in");
        a.cmp(ax, 0xffffu32 as i32).expect("cmp");
        a.jne(bad).expect("jne");
        a.in_(eax, dx).expect("in");
        a.cmp(eax, -1).expect("cmp");
        a.jne(bad).expect("jne");
        a.out(dx, al).expect("out"); // and a write to the same absent port is dropped
        report_and_reset(a, bad, "ones\n", "not ones\n");
    });
    let out = boot(&kernel);
    assert_eq!(text(&out.stdout), "ones\n");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn absent_mmio_reads_all_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = tiny_guest(dir.path(), "mmio", |a| {
        let bad = a.create_label();
        // 0xd000_0000 is in the hole below 4 GiB, identity-mapped, with no device there.
        a.mov(rbx, 0xd000_0000u64).expect("mov");
        a.mov(dword_ptr(rbx), 0x1234_5678u32).expect("store");
        a.mov(eax, dword_ptr(rbx)).expect("load");
        a.cmp(eax, -1).expect("cmp");
        a.jne(bad).expect("jne");
        report_and_reset(a, bad, "mmio ones\n", "mmio not ones\n");
    });
    let out = boot(&kernel);
    assert_eq!(text(&out.stdout), "mmio ones\n", "stderr: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn a_jump_to_the_reset_vector_resets_the_vm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = tiny_guest(dir.path(), "bios-reboot", |a| {
        print(a, "rebooting through the BIOS\n");
        a.mov(rax, 0xf_fff0u64).expect("mov");
        a.jmp(rax).expect("jmp");
    });
    let out = boot(&kernel);
    assert_eq!(text(&out.stdout), "rebooting through the BIOS\n");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn acpi_power_off_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = tiny_guest(dir.path(), "poweroff", |a| {
        print(a, "bye\n");
        a.mov(dx, 0x600u32).expect("mov");
        a.mov(al, (5u32 << 2) | (1 << 5)).expect("mov"); // SLP_TYP=S5 | SLP_EN
        a.out(dx, al).expect("out");
        a.hlt().expect("hlt");
    });
    let out = boot(&kernel);
    assert_eq!(text(&out.stdout), "bye\n");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn boot_registers_follow_the_64bit_protocol() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = tiny_guest(dir.path(), "regs", |a| {
        let bad = a.create_label();
        // %rsi points at the zero page, whose e820 table names our RAM...
        a.cmp(rsi, 0x7000).expect("cmp");
        a.jne(bad).expect("jne");
        a.cmp(byte_ptr(rsi + 0x1e8), 3).expect("cmp e820_entries");
        a.jne(bad).expect("jne");
        // ...and CS is __BOOT_CS, DS is __BOOT_DS.
        a.mov(ax, cs).expect("mov");
        a.cmp(ax, 0x10).expect("cmp");
        a.jne(bad).expect("jne");
        a.mov(ax, ds).expect("mov");
        a.cmp(ax, 0x18).expect("cmp");
        a.jne(bad).expect("jne");
        report_and_reset(a, bad, "regs ok\n", "regs wrong\n");
    });
    let out = boot(&kernel);
    assert_eq!(text(&out.stdout), "regs ok\n", "stderr: {}", text(&out.stderr));
}

#[test]
fn triple_fault_is_reported_and_exits_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = tiny_guest(dir.path(), "triple", |a| {
        print(a, "about to fault\n");
        // With an IDT of limit zero, any exception escalates to a triple fault.
        a.push(0).expect("push");
        a.push(0).expect("push");
        a.lidt(ptr(rsp)).expect("lidt");
        a.ud2().expect("ud2");
    });
    let out = boot(&kernel);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("triple fault on vCPU 0 at RIP 0x"), "{stderr}");
    assert!(stderr.contains("CR0=") && stderr.contains("EFER="), "{stderr}");
    assert!(stderr.contains("code at RIP: 0f 0b"), "the ud2 instruction: {stderr}");
    assert_eq!(text(&out.stdout), "about to fault\n");
}

/// On a PVM host, instructions its emulator lacks end the guest with a report that says why
/// stock kernels can't run here; on hardware KVM the same program simply runs.
#[test]
fn emulation_failure_names_the_pvm_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = tiny_guest(dir.path(), "cmpxchg16b", |a| {
        a.sub(rsp, 64).expect("sub");
        a.and(rsp, -16).expect("align");
        a.cmpxchg16b(xmmword_ptr(rsp)).expect("cmpxchg16b");
        print(a, "ran\n");
        reset(a);
    });
    let out = boot(&kernel);
    let stderr = text(&out.stderr);
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("KVM internal error") && stderr.contains("at RIP 0x"), "{stderr}");
        assert!(stderr.contains("this host's KVM is PVM") && stderr.contains("nested lab"), "{stderr}");
    } else {
        assert_eq!((out.status.code(), text(&out.stdout).as_str()), (Some(0), "ran\n"), "{stderr}");
    }
}

#[test]
fn boot_timeline_shows_milestones_the_guest_signal_and_exit_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = tiny_guest(dir.path(), "timer", |a| {
        print(a, "hi\n");
        a.mov(rbx, 0xfe00_0000u64).expect("mov");
        a.mov(byte_ptr(rbx), 123u32).expect("boot timer");
        reset(a);
    });
    let mut command = lguest();
    command.args(["run", "--memory", "64M", "--boot-timeline", "--kernel"]).arg(&kernel);
    let out = run_with_deadline(command, std::time::Duration::from_secs(60));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let order = ["VM built", "first KVM_RUN", "guest signalled the boot timer", "VM stopped"];
    let positions: Vec<usize> = order.iter().map(|m| stderr.find(m).unwrap_or_else(|| panic!("no {m}: {stderr}"))).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "milestones out of order: {stderr}");
    // "hi\n" and the reset: four port writes; the boot timer: one MMIO write.
    assert!(stderr.contains("port in 0, port out 4, mmio read 0, mmio write 1"), "{stderr}");
    assert!(stderr.contains("port exits, busiest 8: 0x3f8 3, 0x64 1"), "{stderr}");
}

#[test]
fn boot_timeline_writes_a_chrome_trace_and_refuses_a_path_it_cannot_create() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = tiny_guest(dir.path(), "traced", |a| {
        a.mov(rbx, 0xfe00_0000u64).expect("mov");
        a.mov(byte_ptr(rbx), 123u32).expect("boot timer");
        reset(a);
    });
    let trace = dir.path().join("boot.json");
    let mut command = lguest();
    command.args(["run", "--memory", "64M"]).arg(format!("--boot-timeline={}", trace.display()));
    command.arg("--kernel").arg(&kernel);
    let out = run_with_deadline(command, std::time::Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("first KVM_RUN"), "the report is printed too");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&trace).expect("trace written")).expect("trace is JSON");
    let names: Vec<&str> = json["traceEvents"]
        .as_array()
        .expect("traceEvents")
        .iter()
        .filter(|e| e["ph"] == "X")
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["process start → VM built", "VM built → first KVM_RUN", "first KVM_RUN → guest's boot-timer signal",
         "guest's boot-timer signal → VM stopped"]
    );

    let mut command = lguest();
    command.args(["run", "--boot-timeline=/nonexistent-dir/boot.json", "--kernel"]).arg(&kernel);
    let out = run_with_deadline(command, std::time::Duration::from_secs(60));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--boot-timeline") && stderr.contains("cannot create the trace file"), "{stderr}");
}
