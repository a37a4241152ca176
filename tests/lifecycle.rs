//! How a guest's life ends, and begins again, told with tiny guests on this host's /dev/kvm:
//! `--reboot restart` boots the same guest again after a reset (without leaking threads, file
//! descriptors or memory), SIGTERM reaches the guest as Ctrl-Alt-Del on its keyboard and is
//! enforced by `--shutdown-timeout`, and a pvpanic write ends lguest with status 3.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use iced_x86::code_asm::*;

const LIMIT: Duration = Duration::from_secs(60);

/// lguest running a tiny guest: its stdin is ours to type into, its stdout comes line by line.
struct Running {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    stderr: JoinHandle<Vec<u8>>,
}

fn start(kernel: &Path, args: &[&str]) -> Running {
    let mut child = lguest()
        .args(["run", "--memory", "64M"])
        .args(args)
        .arg("--kernel")
        .arg(kernel)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lguest");
    let (stdin, stdout) = (child.stdin.take().expect("stdin"), child.stdout.take().expect("stdout"));
    let mut stderr = child.stderr.take().expect("stderr");
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = send.send(line);
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    Running { child, stdin, lines, stderr }
}

impl Running {
    /// Waits for the guest's next line, which must be `want`.
    fn expect_line(&mut self, want: &str) {
        match self.lines.recv_timeout(LIMIT) {
            Ok(line) => assert_eq!(line, want),
            Err(e) => {
                let _ = self.child.kill();
                panic!("no '{want}' from the guest ({e}); stderr: {}", self.stderr_so_far());
            }
        }
    }

    fn stderr_so_far(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let handle = std::mem::replace(&mut self.stderr, std::thread::spawn(Vec::new));
        text(&handle.join().unwrap_or_default())
    }

    fn type_key(&mut self, key: u8) {
        self.stdin.write_all(&[key]).expect("type into lguest");
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill only sends a signal to our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, signal) }, 0);
    }

    /// Waits for lguest to exit; returns its status and stderr.
    fn finish(mut self) -> (ExitStatus, String) {
        let status = wait_with_deadline(&mut self.child, LIMIT);
        (status, text(&self.stderr.join().expect("stderr reader")))
    }
}

/// Waits until COM1 has received a byte and leaves it in `al`.
fn read_key(a: &mut CodeAssembler) {
    let mut poll = a.create_label();
    a.set_label(&mut poll).expect("label");
    a.mov(dx, 0x3fdu32).expect("mov");
    a.in_(al, dx).expect("in LSR");
    a.test(al, 1).expect("test data ready");
    a.jz(poll).expect("jz");
    a.mov(dx, 0x3f8u32).expect("mov");
    a.in_(al, dx).expect("in RBR");
}

fn power_off(a: &mut CodeAssembler) {
    a.mov(dx, 0x600u32).expect("mov");
    a.mov(al, (5u32 << 2) | (1 << 5)).expect("mov"); // SLP_TYP=S5 | SLP_EN
    a.out(dx, al).expect("out");
    a.hlt().expect("hlt");
}

/// Says "boot", waits for a key, powers off on 'q' and resets on anything else.
fn boot_counter(dir: &Path) -> std::path::PathBuf {
    tiny_guest(dir, "boot-counter", |a| {
        let mut off = a.create_label();
        print(a, "boot\n");
        read_key(a);
        a.cmp(al, b'q' as i32).expect("cmp");
        a.je(off).expect("je");
        reset(a);
        a.set_label(&mut off).expect("label");
        power_off(a);
    })
}

#[test]
fn reboot_exit_ends_after_one_boot_and_restart_boots_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = boot_counter(dir.path());
    let mut once = start(&kernel, &[]);
    once.expect_line("boot");
    once.type_key(b'r');
    let (status, stderr) = once.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");

    let mut again = start(&kernel, &["--reboot", "restart"]);
    for _ in 0..3 {
        again.expect_line("boot");
        again.type_key(b'r');
    }
    again.expect_line("boot");
    again.type_key(b'q');
    let (status, stderr) = again.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
}

/// What the process holds, from /proc.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    threads: u64,
    fds: usize,
    vm_size_kib: u64,
    rss_kib: u64,
}

fn footprint(pid: u32) -> Footprint {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}"));
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("bad {line}"))
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read fds").count();
    Footprint { threads: field("Threads:"), fds, vm_size_kib: field("VmSize:"), rss_kib: field("VmRSS:") }
}

/// Twenty restarts cost nothing that stays: the same threads and file descriptors, no more
/// address space (each boot maps 64 MiB of guest RAM, so a leak would show at once), and
/// about the same resident memory. A disk, an entropy source and a vsock device come along:
/// their eventfds, interrupt routes, image file and listening socket are made anew each boot,
/// and the image's lock and the socket's path must have been let go by the boot before.
#[test]
fn restarts_leak_no_threads_fds_or_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = boot_counter(dir.path());
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
    let disk = disk.to_string_lossy().into_owned();
    let socket = dir.path().join("v.sock");
    let vsock = format!("cid=3,uds={}", socket.display());
    let mut running = start(&kernel, &["--reboot", "restart", "--rng", "--disk", &disk, "--vsock", &vsock]);
    let (warm_up, last) = (5, 25);
    let mut first = None;
    for boot in 1..=last {
        running.expect_line("boot");
        if boot == warm_up {
            first = Some(footprint(running.child.id()));
        }
        if boot == last {
            let (before, after) = (first.expect("sampled"), footprint(running.child.id()));
            eprintln!("after {warm_up} boots: {before:?}\nafter {last} boots: {after:?}");
            assert_eq!(after.threads, before.threads, "threads");
            assert_eq!(after.fds, before.fds, "file descriptors");
            assert!(after.vm_size_kib <= before.vm_size_kib + 1024, "address space grew: {before:?} → {after:?}");
            assert!(after.rss_kib <= before.rss_kib + 2048, "resident memory grew: {before:?} → {after:?}");
        }
        running.type_key(if boot == last { b'q' } else { b'r' });
    }
    let (status, stderr) = running.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("still in use"), "memory left mapped: {stderr}");
    assert!(!socket.exists(), "the vsock socket outlived lguest");
}

/// Polls the keyboard controller for the Delete key's make code (set 1, as translation gives
/// it), says so and runs `answer` (power off, or reset as systemd does): a guest that honours
/// Ctrl-Alt-Del.
fn ctrl_alt_del_guest(dir: &Path, answer: fn(&mut CodeAssembler)) -> std::path::PathBuf {
    tiny_guest(dir, "ctrl-alt-del", |a| {
        let mut poll = a.create_label();
        print(a, "ready\n");
        a.set_label(&mut poll).expect("label");
        a.in_(al, 0x64u32).expect("in status");
        a.test(al, 1).expect("test output full");
        a.jz(poll).expect("jz");
        a.in_(al, 0x60u32).expect("in data");
        a.cmp(al, 0x53).expect("cmp Delete");
        a.jne(poll).expect("jne");
        print(a, "ctrl-alt-del\n");
        answer(a);
    })
}

#[test]
fn sigterm_and_a_piped_sigint_press_ctrl_alt_del_and_the_guest_powers_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = ctrl_alt_del_guest(dir.path(), power_off);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut running = start(&kernel, &[]);
        running.expect_line("ready");
        running.signal(signal);
        running.expect_line("ctrl-alt-del");
        let (status, stderr) = running.finish();
        assert_eq!(status.code(), Some(0), "signal {signal}: {stderr}");
    }
}

/// A guest that answers Ctrl-Alt-Del with a reboot has shut down: no restart, status 0.
#[test]
fn a_reboot_in_answer_to_sigterm_is_not_restarted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = ctrl_alt_del_guest(dir.path(), reset);
    let mut running = start(&kernel, &["--reboot", "restart"]);
    running.expect_line("ready");
    running.signal(libc::SIGTERM);
    running.expect_line("ctrl-alt-del");
    let (status, stderr) = running.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
}

/// A guest in HLT with interrupts off never exits by itself: only the kick gets its vCPU out.
fn deaf_guest(dir: &Path) -> std::path::PathBuf {
    tiny_guest(dir, "deaf", |a| {
        let mut halt = a.create_label();
        print(a, "ready\n");
        a.set_label(&mut halt).expect("label");
        a.hlt().expect("hlt");
        a.jmp(halt).expect("jmp");
    })
}

#[test]
fn a_guest_that_ignores_sigterm_is_stopped_after_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = deaf_guest(dir.path());
    let mut running = start(&kernel, &["--shutdown-timeout", "1"]);
    running.expect_line("ready");
    let asked = Instant::now();
    running.signal(libc::SIGTERM);
    let (status, stderr) = running.finish();
    let took = asked.elapsed();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(stderr.contains("did not shut down within 1 s of signal 15"), "{stderr}");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(10), "took {took:?}");

    // With no time to shut down, and for a second signal, we stop at once.
    for (args, signals) in [(&["--shutdown-timeout", "0"][..], 1), (&[][..], 2)] {
        let mut running = start(&kernel, args);
        running.expect_line("ready");
        let asked = Instant::now();
        for _ in 0..signals {
            running.signal(libc::SIGTERM);
            std::thread::sleep(Duration::from_millis(100));
        }
        let (status, stderr) = running.finish();
        assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{args:?}: {stderr}");
        assert!(stderr.contains("stopped by signal 15"), "{stderr}");
        assert!(asked.elapsed() < Duration::from_secs(5), "{args:?} took {:?}", asked.elapsed());
    }
}

#[test]
fn sighup_stops_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut running = start(&deaf_guest(dir.path()), &[]);
    running.expect_line("ready");
    running.signal(libc::SIGHUP);
    let (status, stderr) = running.finish();
    assert_eq!(status.code(), Some(128 + libc::SIGHUP), "{stderr}");
}

/// Checks that pvpanic is there (reading 0x505 gives its events), then panics through it.
#[test]
fn a_pvpanic_write_ends_lguest_with_status_3_even_with_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = tiny_guest(dir.path(), "panic", |a| {
        let mut bad = a.create_label();
        a.mov(dx, 0x505u32).expect("mov");
        a.in_(al, dx).expect("in");
        a.cmp(al, 3).expect("cmp capabilities");
        a.jne(bad).expect("jne");
        print(a, "panicking\n");
        a.mov(dx, 0x505u32).expect("mov");
        a.mov(al, 1u32).expect("mov");
        a.out(dx, al).expect("out");
        a.hlt().expect("hlt");
        a.set_label(&mut bad).expect("label");
        print(a, "no pvpanic\n");
        reset(a);
    });
    let mut command = lguest();
    command.args(["run", "--memory", "64M", "--reboot", "restart", "--kernel"]).arg(&kernel);
    let out = run_with_deadline(command, LIMIT);
    let stderr = text(&out.stderr);
    assert_eq!(text(&out.stdout), "panicking\n", "{stderr}");
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("the guest kernel panicked"), "{stderr}");
}
