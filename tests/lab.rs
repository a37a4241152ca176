//! Stock Linux in the nested lab (see lab/README.md): Debian's cloud kernel, unmodified, booted
//! by the `lguest` built for this test, inside a QEMU machine whose emulated AMD CPU gives it
//! a real /dev/kvm. Each test runs one scenario script from tests/lab/ and reads its output.
//! A lab machine that dies is reported with its whole console, so it is told apart from a
//! VMM bug.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A stripped copy of the lguest under test: debug info would only slow the lab's boot.
fn lguest_for_the_lab(dir: &Path) -> PathBuf {
    let copy = dir.join("lguest");
    std::fs::copy(env!("CARGO_BIN_EXE_lguest"), &copy).expect("copy lguest");
    let status = Command::new("strip").arg(&copy).status().expect("run strip (binutils)");
    assert!(status.success(), "strip failed");
    copy
}

/// Runs `tests/lab/NAME.sh` in the lab; returns its output after checking the lab finished.
fn run_scenario(name: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let lguest = lguest_for_the_lab(dir.path());
    let scenario = repo().join("tests/lab").join(format!("{name}.sh"));
    let out = Command::new(repo().join("lab/run.sh"))
        .env("LAB_OUT", dir.path().join("lab"))
        .arg("--bin")
        .arg(&lguest)
        .args(["--timeout", "900"])
        .arg(&scenario)
        .output()
        .expect("run lab/run.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "lab scenario {name} failed ({}):\n{text}", out.status);
    text
}

fn assert_case(output: &str, case: &str, status: i32) {
    let line = format!("CASE {case} status={status}");
    assert!(output.lines().any(|l| l.trim_end() == line), "expected '{line}' in:\n{output}");
}

/// The guest's own words, in order: it reached /init and ran its scenario.
fn assert_reached_init(output: &str) {
    let init = output.find("LGUEST-GUEST-INIT").unwrap_or_else(|| panic!("guest never reached /init:\n{output}"));
    assert!(output[init..].contains("LGUEST-SCENARIO-DONE"), "scenario did not finish:\n{output}");
}

#[test]
fn stock_bzimage_boots_to_init_and_powers_off_or_reboots_with_status_zero() {
    let output = run_scenario("boot-bzimage");
    assert_reached_init(&output);
    assert!(output.contains("ACPI: PM: Preparing to enter system sleep state S5"), "ACPI poweroff:\n{output}");
    assert_case(&output, "poweroff", 0);
    assert_case(&output, "reboot", 0);
}

#[test]
fn stock_vmlinux_boots_through_pvh_and_powers_off() {
    let output = run_scenario("boot-pvh");
    assert_reached_init(&output);
    assert_case(&output, "pvh", 0);
}

#[test]
fn a_command_typed_on_stdin_runs_in_the_guest() {
    let output = run_scenario("console");
    assert!(output.contains("LGUEST-SHELL-READY"), "{output}");
    assert!(output.lines().any(|l| l.trim_end() == "hello-42"), "command output missing:\n{output}");
    assert_case(&output, "console", 0);
}
