//! The contract test: schemathesis (PyPI) generates requests for every operation of
//! Firecracker's OpenAPI spec and checks lguest's answers against it: no 5xx, status codes and
//! bodies as the spec documents them, the JSON content type, and invalid requests refused.
//!
//! The spec is `fc-api`'s copy (crates.io), fetched by `scripts/test.sh` with cargo and read
//! from cargo's registry; schemathesis is installed by the same script in a venv under the
//! cache. schemathesis speaks TCP, so socat bridges 127.0.0.1 to lguest's Unix socket.
//!
//! lguest runs with no VM (`lguest firecracker` waiting for the API) as `nobody`, in a mount
//! namespace with fresh /tmp, /var/tmp and /dev/shm: schemathesis puts arbitrary paths in
//! `PUT /metrics` and `PUT /logger`, and lguest opens them as a client asks.
//!
//! One operation is checked without the "invalid data is refused" check: the spec's schema for
//! `PATCH /machine-config` requires both `vcpu_count` and `mem_size_mib`, while its own
//! description (and Firecracker) accept any subset, which lguest does too.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance";

fn cache() -> PathBuf {
    std::env::var_os("LGUEST_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/lguest"))
}

fn schemathesis() -> PathBuf {
    let st = std::env::var_os("LGUEST_SCHEMATHESIS").map(PathBuf::from).unwrap_or_else(|| cache().join("schemathesis/bin/st"));
    assert!(st.exists(), "{} not found: scripts/test.sh installs schemathesis (or set LGUEST_SCHEMATHESIS)", st.display());
    st
}

fn spec() -> PathBuf {
    if let Some(spec) = std::env::var_os("LGUEST_FC_SPEC") {
        return PathBuf::from(spec);
    }
    let home = || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo");
    let registry = std::env::var_os("CARGO_HOME").map(PathBuf::from).unwrap_or_else(home).join("registry/src");
    let found = std::fs::read_dir(&registry).into_iter().flatten().flatten().map(|index| index.path().join("fc-api-0.2.3/spec/firecracker.yaml")).find(|p| p.exists());
    found.unwrap_or_else(|| panic!("Firecracker's spec (fc-api 0.2.3) is not in {}: scripts/test.sh fetches it (or set LGUEST_FC_SPEC)", registry.display()))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `lguest firecracker` as nobody, with private temporary directories, serving `work/api.sock`.
/// The checkout (and so `work` and the binary) may itself live under /tmp, which the fresh
/// tmpfs hides: so the shell first moves into `work`, which it keeps through the mount, and
/// runs a copy of lguest from there with a relative socket path.
fn sandboxed_lguest(work: &Path) -> Killed {
    std::fs::copy(env!("CARGO_BIN_EXE_lguest"), work.join("lguest")).expect("copy lguest");
    let script = format!(
        "cd {work} && mount -t tmpfs none /tmp && mount -t tmpfs none /var/tmp && mount -t tmpfs none /dev/shm && \
         exec setpriv --reuid=65534 --regid=65534 --clear-groups ./lguest firecracker --api-sock ./api.sock",
        work = work.display(),
    );
    let child = Command::new("unshare").args(["--mount", "sh", "-c", &script]).stdin(Stdio::null()).spawn().expect("unshare");
    Killed(child)
}

fn schemathesis_run(work: &Path, spec: &Path, port: u16, extra: &[&str], checks: &str) -> (bool, String) {
    // Run in the test's own directory: schemathesis keeps a cache (.schemathesis/) where it runs.
    let out = Command::new(schemathesis())
        .current_dir(work)
        .arg("run")
        .arg(spec)
        .args(["--url", &format!("http://127.0.0.1:{port}"), "--checks", checks, "--max-examples", "50", "--seed", "1"])
        .args(extra)
        .env("NO_COLOR", "1")
        .output()
        .expect("run schemathesis");
    (out.status.success(), format!("{}{}", text(&out.stdout), text(&out.stderr)))
}

fn summary(output: &str) -> String {
    output.lines().skip_while(|l| !l.contains("SUMMARY")).collect::<Vec<_>>().join("\n")
}

#[test]
fn firecrackers_spec_holds_for_every_operation() {
    assert!(running_as_root(), "this test runs lguest as nobody in a mount namespace, so it must run as root");
    let spec = spec();
    let work = tempfile::Builder::new().prefix("contract").tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    std::fs::set_permissions(work.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    let socket = work.path().join("api.sock");
    let _lguest = sandboxed_lguest(work.path());
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "lguest did not serve {}", socket.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    let port = free_port();
    let bridge = Command::new("socat")
        .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
        .arg(format!("UNIX-CONNECT:{}", socket.display()))
        .spawn()
        .expect("socat (apt install socat)");
    let _bridge = Killed(bridge);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "socat did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }

    let all_checks = format!("{CHECKS},negative_data_rejection");
    let (ok, output) = schemathesis_run(work.path(), &spec, port, &["--exclude-operation-id", "patchMachineConfiguration"], &all_checks);
    println!("schemathesis, every operation but PATCH /machine-config:\n{}", summary(&output));
    assert!(ok, "{output}");
    let (ok, output) = schemathesis_run(work.path(), &spec, port, &["--include-operation-id", "patchMachineConfiguration"], CHECKS);
    println!("schemathesis, PATCH /machine-config:\n{}", summary(&output));
    assert!(ok, "{output}");
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
