//! stopwatch as a process: a SIGTERM sent to it (as `timeout` does) stops the command,
//! stopwatch still reports, and exits 143 even if the command exited 0 on SIGTERM.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

/// Starts `stopwatch --label sig --marker started -- sh -c SCRIPT`, sends it SIGTERM once
/// the script printed its first line, returns (exit code, stdout, stderr).
fn terminate(script: &str) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stopwatch"))
        .args([
            "--label", "sig", "--marker", "started", "--", "sh", "-c", script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stopwatch starts");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut first = String::new();
    stdout
        .read_line(&mut first)
        .expect("the script's first line");
    let pid = i32::try_from(child.id()).expect("a pid");
    // SAFETY: kill(2) on our own child's pid; no pointers.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("stdout");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    let status = child.wait().expect("stopwatch ends");
    (status.code(), first + &rest, stderr)
}

#[test]
fn sigterm_is_passed_to_the_command_and_reported() {
    let (code, stdout, stderr) = terminate("echo started; exec sleep 30");
    assert_eq!(code, Some(128 + libc::SIGTERM), "{stderr}");
    assert_eq!(stdout, "started\n");
    assert!(
        stderr.contains("STOPWATCH label=sig marker=started ms="),
        "{stderr}"
    );
    assert!(stderr.contains("STOPWATCH label=sig exit ms="), "{stderr}");
    assert!(stderr.contains(" status=143 maxrss_kib="), "{stderr}");
}

#[test]
fn sigterm_fails_stopwatch_even_when_the_command_exits_0() {
    // Like QEMU: exits 0 on SIGTERM. The orphaned sleep keeps the command's stdout open
    // (not our stderr, which the test reads to EOF): stopwatch must not wait for it.
    let (code, _, stderr) =
        terminate("trap 'exit 0' TERM; echo started; sleep 5 2>/dev/null & wait");
    assert_eq!(code, Some(128 + libc::SIGTERM), "{stderr}");
    assert!(stderr.contains(" status=0 maxrss_kib="), "{stderr}");
}
