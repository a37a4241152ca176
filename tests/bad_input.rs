//! Every mistake a user can make gets one line that says what is wrong and what to do, and a
//! non-zero exit status: before any guest runs, and without a hang.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Runs `lguest` with `args`, expects status 2 (a bad request) and a single stderr line
/// containing `needle`.
fn refused(command: Command, needle: &str) {
    fails_with(command, 2, needle);
}

/// As [`refused`], for what the host lacks: status 1.
fn host_cannot(command: Command, needle: &str) {
    fails_with(command, 1, needle);
}

fn fails_with(command: Command, status: i32, needle: &str) {
    let out = run_with_deadline(command, Duration::from_secs(30));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line, not: {stderr}");
    assert!(stderr.starts_with("lguest: ") && stderr.contains(needle), "{needle:?} not in: {stderr}");
}

fn run_args(args: &[&str]) -> Command {
    let mut command = lguest();
    command.arg("run").args(args);
    command
}

fn hello(dir: &Path) -> String {
    let kernel = tiny_guest(dir, "hello", |a| {
        print(a, "hi\n");
        reset(a);
    });
    kernel.to_string_lossy().into_owned()
}

#[test]
fn missing_kernel() {
    refused(run_args(&["--kernel", "/no/such/vmlinux"]), "cannot read kernel '/no/such/vmlinux': No such file");
}

#[test]
fn missing_initrd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    refused(run_args(&["--kernel", &kernel, "--initrd", "/no/such/initrd"]), "cannot read initrd");
}

#[test]
fn a_file_that_is_not_a_kernel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "just some text, not a kernel\n".repeat(100)).expect("write");
    refused(run_args(&["--kernel", &path.to_string_lossy()]), "is not a kernel lguest can boot");
}

#[test]
fn a_truncated_bzimage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bzImage");
    let mut image = vec![0u8; 0x300];
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    std::fs::write(&path, image).expect("write");
    refused(run_args(&["--kernel", &path.to_string_lossy()]), "is not a kernel lguest can boot");
}

#[test]
fn kernel_larger_than_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("huge");
    std::fs::File::create(&path).and_then(|f| f.set_len(40 << 20)).expect("sparse file");
    refused(run_args(&["--kernel", &path.to_string_lossy(), "--memory", "32M"]), "does not fit in guest memory (32 MiB); raise --memory");
}

#[test]
fn initrd_larger_than_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    let initrd = dir.path().join("initrd");
    std::fs::File::create(&initrd).and_then(|f| f.set_len(40 << 20)).expect("sparse file");
    refused(run_args(&["--kernel", &kernel, "--initrd", &initrd.to_string_lossy(), "--memory", "32M"]), "initrd (40 MiB) does not fit");
}

#[test]
fn memory_too_small_or_absurd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    refused(run_args(&["--kernel", &kernel, "--memory", "8M"]), "at least 32 MiB");
    refused(run_args(&["--kernel", &kernel, "--memory", "4096G"]), "surely a typo");
    refused(run_args(&["--kernel", &kernel, "--memory", "lots"]), "invalid --memory 'lots'");
}

#[test]
fn command_line_longer_than_the_kernel_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    let long = "a".repeat(3000);
    refused(run_args(&["--kernel", &kernel, "--cmdline", &long]), "accepts at most 2047; shorten --cmdline");
}

#[test]
fn bad_flags_are_refused_in_one_line() {
    refused(run_args(&["--kernel", "x", "--no-such-flag"]), "unexpected argument '--no-such-flag' found; see 'lguest run --help'");
    refused(run_args(&["--cpus", "2"]), "--kernel <PATH>");
    refused(run_args(&["--kernel", "x", "--cpus", "many"]), "invalid value 'many' for '--cpus <N>'");
}

#[test]
fn more_devices_than_pci_slots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    let mut args = vec!["--kernel", kernel.as_str(), "--rng"];
    args.extend(std::iter::repeat_n(["--disk", "x.img"], 31).flatten());
    refused(run_args(&args), "32 PCI devices asked for (--disk, --net, --rng, --console virtio, --vsock, --share), but the PCI bus has room for 31");
}

#[test]
fn bad_shares_are_refused_in_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").expect("file");
    refused(run_args(&["--kernel", &kernel, "--share", "/no/such/dir:t"]), "invalid --share '/no/such/dir:t': cannot use '/no/such/dir'");
    refused(run_args(&["--kernel", &kernel, "--share", &format!("{}:t", file.display())]), "is not a directory");
    refused(run_args(&["--kernel", &kernel, "--share", "/tmp"]), "expected HOSTDIR:TAG[,readonly]");
    let (a, b) = (format!("{}:same", dir.path().display()), "/tmp:same".to_string());
    refused(run_args(&["--kernel", &kernel, "--share", &a, "--share", &b]), "the tag 'same' is already used by another --share");
}

#[test]
fn a_bad_vsock_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    refused(run_args(&["--kernel", &kernel, "--vsock", "cid=2,uds=v.sock"]), "invalid --vsock 'cid=2,uds=v.sock': cid must be a number from 3");
}

#[test]
fn a_vsock_socket_another_program_listens_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    let path = dir.path().join("v.sock");
    let _other = std::os::unix::net::UnixListener::bind(&path).expect("another program's socket");
    let vsock = format!("cid=3,uds={}", path.display());
    refused(run_args(&["--kernel", &kernel, "--vsock", &vsock]), "cannot set up --vsock: a program is already listening on");
    assert!(path.exists(), "the other program's socket is left alone");
}

#[test]
fn a_vsock_path_that_is_a_file_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, b"keep me").expect("a user's file");
    let vsock = format!("cid=3,uds={}", path.display());
    refused(run_args(&["--kernel", &kernel, "--vsock", &vsock]), "exists and is not a socket; choose another uds path");
    assert_eq!(std::fs::read(&path).expect("still there"), b"keep me");
}

#[test]
fn a_vsock_socket_that_cannot_be_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    refused(run_args(&["--kernel", &kernel, "--vsock", "cid=3,uds=/no/such/dir/v.sock"]), "cannot set up --vsock: cannot listen on '/no/such/dir/v.sock'");
}

#[test]
fn net_user_mistakes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    let net = |value: &str| run_args(&["--kernel", &kernel, "--net", value]);
    refused(net("user,hostfwd=tcp:0-:80"), "invalid --net 'user,hostfwd=tcp:0-:80': 'tcp:0-:80' is not a forward such as tcp:8080-:80");
    refused(net("user,hostfwd=tcp:80-:80,hostfwd=tcp::80-:22"), "host port 80 is forwarded twice");
    refused(net("tap=t0,hostfwd=tcp:80-:80"), "hostfwd= goes with user, not with a tap");
}

#[test]
fn net_user_without_passt_says_how_to_get_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    let mut command = run_args(&["--kernel", &kernel, "--net", "user"]);
    command.env("PATH", dir.path());
    host_cannot(command, "there is no 'passt' on PATH: install it (apt-get install passt)");
}

#[test]
fn help_is_not_an_error() {
    let out = run_with_deadline(run_args(&["--help"]), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("Ctrl-A then x"));
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn no_permission_on_dev_kvm() {
    assert!(running_as_root(), "this test drops privileges, so it must start as root (as CI does)");
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let mut command = Command::new("setpriv");
    command.args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_lguest"), "run", "--kernel", &kernel]);
    host_cannot(command, "no permission to open /dev/kvm: add your user to the 'kvm' group");
}

#[test]
fn no_dev_kvm_at_all() {
    assert!(running_as_root(), "this test hides /dev/kvm in a mount namespace, so it must run as root");
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    let script = format!("mount -t tmpfs none /dev && exec {} run --kernel {kernel}", env!("CARGO_BIN_EXE_lguest"));
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    host_cannot(command, "/dev/kvm does not exist");
}

#[test]
fn vhost_without_dev_vhost_net_says_how_to_load_it() {
    assert!(running_as_root(), "this test makes a /dev and a network of its own in namespaces, so it must run as root");
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    // A /dev with only KVM and the tun device in it (their numbers copied from the host's),
    // and a network namespace for the tap lguest creates.
    let node = |path: &str| {
        let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(path).expect(path));
        format!("mknod {path} c {} {}", libc::major(rdev), libc::minor(rdev))
    };
    let script = format!(
        "mount -t tmpfs none /dev && mkdir /dev/net && {} && {} && exec {} run --kernel {kernel} --net tap=lgvhost0,vhost=on",
        node("/dev/kvm"),
        node("/dev/net/tun"),
        env!("CARGO_BIN_EXE_lguest"),
    );
    let mut command = Command::new("unshare");
    command.args(["--mount", "--net", "--propagation", "private", "sh", "-c", &script]);
    host_cannot(command, "--net tap=lgvhost0,vhost=on: /dev/vhost-net does not exist: load the kernel's vhost_net module");
}

#[test]
fn reboot_and_shutdown_timeout_mistakes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello(dir.path());
    refused(run_args(&["--kernel", &kernel, "--reboot", "halt"]), "invalid value 'halt' for '--reboot <ACTION>' [possible values: exit, restart]; see");
    refused(run_args(&["--kernel", &kernel, "--shutdown-timeout", "100000"]), "invalid --shutdown-timeout '100000'");
    refused(run_args(&["--kernel", &kernel, "--shutdown-timeout", "soon"]), "invalid value 'soon' for '--shutdown-timeout <SECS>'");
}
