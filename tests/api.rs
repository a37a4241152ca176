//! Firecracker's API, served by the real `lguest` binary and spoken to by a real client
//! (`curl --unix-socket`, as in Firecracker's own getting-started guide). With no VM at all
//! (`lguest firecracker` waits for the API), and with tiny guests on this host's /dev/kvm:
//! a guest configured and started only through the API, paused and resumed, sent Ctrl-Alt-Del;
//! `lguest run --api-sock`; `--config-file` boots; and hostile clients.

mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::api::*;
use common::*;

/// Prints `t` every few thousand instructions until the keyboard has a byte for it
/// (Ctrl-Alt-Del), then says so and resets.
fn ticking_guest(dir: &Path) -> PathBuf {
    tiny_guest(dir, "ticks", |a| {
        let mut top = a.create_label();
        a.set_label(&mut top).expect("label");
        print(a, "t");
        delay_until_ctrl_alt_del(a, top);
    })
}

fn hello_guest(dir: &Path) -> PathBuf {
    tiny_guest(dir, "hello", |a| {
        print(a, "hello from the config file\n");
        reset(a);
    })
}

fn ticks(output: &str) -> usize {
    output.bytes().filter(|&b| b == b't').count()
}

#[test]
fn a_guest_configured_and_started_only_through_the_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = ticking_guest(dir.path());
    let socket = dir.path().join("fc.sock");
    let mut vm = Running::start(&["firecracker", "--api-sock", socket.to_str().expect("utf-8"), "--id", "api-test"]);
    wait_for_socket(&socket, &vm);

    let (code, body) = call(&socket, "GET", "/", None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["state"], "Not started");
    let boot = format!(r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 pci=off acpi=off"}}"#, kernel.display());
    assert_eq!(call(&socket, "PUT", "/boot-source", Some(&boot)).0, 204);
    assert_eq!(call(&socket, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#)).0, 204);
    let entropy = r#"{"rate_limiter": {"bandwidth": {"size": 1024, "refill_time": 100}}}"#;
    assert_eq!(call(&socket, "PUT", "/entropy", Some(entropy)).0, 204);
    let vsock_socket = dir.path().join("v.sock");
    let vsock = |cid: u32| format!(r#"{{"vsock_id": "vsock0", "guest_cid": {cid}, "uds_path": "{}"}}"#, vsock_socket.display());
    let (code, body) = call(&socket, "PUT", "/vsock", Some(&vsock(2)));
    assert!(code == 400 && body.contains("guest_cid"), "{code} {body}");
    assert_eq!(call(&socket, "PUT", "/vsock", Some(&vsock(3))).0, 204);
    let (first, second) = (dir.path().join("first.img"), dir.path().join("second.img"));
    std::fs::write(&first, vec![1u8; 1 << 20]).expect("image");
    std::fs::write(&second, vec![2u8; 2 << 20]).expect("image");
    let drive = format!(
        r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false,
            "rate_limiter": {{"ops": {{"size": 100, "refill_time": 1000, "one_time_burst": 100}}}}}}"#,
        first.display()
    );
    let (code, body) = call(&socket, "PUT", "/drives/data", Some(&drive));
    assert_eq!(code, 204, "{body}");
    let (code, body) = call(&socket, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    assert_eq!(code, 204, "{body}");

    // A new medium in the running drive, as Kata hot-plugs disks.
    let swap = format!(r#"{{"drive_id": "data", "path_on_host": "{}"}}"#, second.display());
    let (code, body) = call(&socket, "PATCH", "/drives/data", Some(&swap));
    assert_eq!(code, 204, "{body}");
    let (_, body) = call(&socket, "GET", "/vm/config", None);
    assert_eq!(json(&body)["drives"][0]["path_on_host"], second.to_str().expect("utf-8"));
    let (code, body) = call(&socket, "PATCH", "/drives/data", Some(r#"{"drive_id": "data", "path_on_host": "/no/such.img"}"#));
    assert_eq!(code, 400);
    assert!(body.contains("/no/such.img"), "{body}");
    assert_eq!(call(&socket, "PATCH", "/drives/other", Some(r#"{"drive_id": "other", "path_on_host": "x"}"#)).0, 400);
    // The running drive's limiter: its bandwidth bucket set, its ops bucket kept.
    let limit = r#"{"drive_id": "data", "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100}}}"#;
    assert_eq!(call(&socket, "PATCH", "/drives/data", Some(limit)).0, 204);
    let (_, body) = call(&socket, "GET", "/vm/config", None);
    let limiter = &json(&body)["drives"][0]["rate_limiter"];
    assert_eq!((limiter["bandwidth"]["size"].as_u64(), limiter["ops"]["size"].as_u64()), (Some(1 << 20), Some(100)), "{body}");
    let (code, body) = call(&socket, "PATCH", "/drives/data", Some(r#"{"drive_id": "data", "rate_limiter": {"ops": {"size": 1, "refill_time": 0.5}}}"#));
    assert_eq!(code, 400, "{body}");
    // The drive's counters in the metrics file: the swap, and the refused one.
    let metrics = dir.path().join("metrics.json");
    assert_eq!(call(&socket, "PUT", "/metrics", Some(&format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()))).0, 204);
    assert_eq!(call(&socket, "PUT", "/actions", Some(r#"{"action_type": "FlushMetrics"}"#)).0, 204);
    let line = json(std::fs::read_to_string(&metrics).expect("metrics").lines().next().expect("a line"));
    assert_eq!((line["block_data"]["update_count"].as_u64(), line["block_data"]["update_fails"].as_u64()), (Some(1), Some(1)), "{line}");
    assert_eq!(line["block"]["update_count"], 1, "and summed over the drives");
    assert_eq!(line["net"]["rx_bytes_count"], 0, "no card: zeros");

    let (_, body) = call(&socket, "GET", "/", None);
    assert_eq!(json(&body)["state"], "Running");
    assert_eq!(json(&body)["started"], true);
    let (code, body) = call(&socket, "PUT", "/machine-config", Some(r#"{"vcpu_count": 2, "mem_size_mib": 64}"#));
    assert_eq!(code, 400);
    assert!(json(&body)["fault_message"].as_str().is_some_and(|m| m.contains("before the microVM starts")), "{body}");
    let (_, body) = call(&socket, "GET", "/vm/config", None);
    assert_eq!(json(&body)["machine-config"]["mem_size_mib"], 64);
    assert_eq!(json(&body)["vsock"]["guest_cid"], 3);
    assert!(std::os::unix::net::UnixStream::connect(&vsock_socket).is_ok(), "the vsock device listens");
    wait_for("the guest's first ticks", Duration::from_secs(20), || ticks(&vm.output()) > 3);

    assert_eq!(call(&socket, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    assert_eq!(json(&call(&socket, "GET", "/", None).1)["state"], "Paused");
    let paused_at = ticks(&vm.output());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ticks(&vm.output()), paused_at, "a paused guest ran");
    assert_eq!(call(&socket, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0, 204);
    wait_for("ticks after the resume", Duration::from_secs(20), || ticks(&vm.output()) > paused_at + 3);
    assert_eq!(json(&call(&socket, "GET", "/", None).1)["state"], "Running");

    assert_eq!(call(&socket, "PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#)).0, 204);
    assert_eq!(vm.wait(Duration::from_secs(30)), 0, "stderr: {}", vm.errors());
    assert!(vm.output().contains("CTRL-ALT-DEL"));
    assert!(!socket.exists(), "the socket is removed on exit");
    assert!(!vsock_socket.exists(), "the vsock socket too");
}

#[test]
fn lguest_run_serves_the_api_beside_its_guest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = ticking_guest(dir.path());
    let socket = dir.path().join("run.sock");
    let socket_arg = socket.to_str().expect("utf-8");
    let kernel_arg = kernel.to_str().expect("utf-8");
    let mut vm = Running::start(&["run", "--memory", "64M", "--kernel", kernel_arg, "--api-sock", socket_arg]);
    wait_for_socket(&socket, &vm);
    assert_eq!(json(&call(&socket, "GET", "/", None).1)["state"], "Running");
    let (_, body) = call(&socket, "GET", "/vm/config", None);
    assert_eq!(json(&body)["boot-source"]["kernel_image_path"], kernel_arg);
    assert_eq!(call(&socket, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)).0, 400);

    let second = run_with_deadline(
        {
            let mut command = lguest();
            command.args(["run", "--memory", "64M", "--kernel", kernel_arg, "--api-sock", socket_arg]);
            command
        },
        Duration::from_secs(30),
    );
    assert_eq!(second.status.code(), Some(2));
    let error = text(&second.stderr);
    assert!(error.contains("another process is serving an API") && error.lines().count() == 1, "{error}");

    assert_eq!(call(&socket, "PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#)).0, 204);
    assert_eq!(vm.wait(Duration::from_secs(30)), 0, "stderr: {}", vm.errors());
    assert!(!socket.exists());
}

#[test]
fn config_file_boots_with_and_without_the_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = hello_guest(dir.path());
    let config = dir.path().join("vm.json");
    let file = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}}, "drives": [], "network-interfaces": []}}"#,
        kernel.display()
    );
    std::fs::write(&config, file).expect("write config");
    for args in [vec!["firecracker", "--no-api", "--config-file"], vec!["run", "--config-file"]] {
        let mut command = lguest();
        command.args(&args).arg(&config);
        let out = run_with_deadline(command, Duration::from_secs(60));
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "hello from the config file\n", "{args:?}");
    }

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "turbo": true}}"#).expect("write");
    for args in [vec!["firecracker", "--no-api", "--config-file"], vec!["run", "--config-file"]] {
        let mut command = lguest();
        command.args(&args).arg(&bad);
        let out = run_with_deadline(command, Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let error = text(&out.stderr);
        assert!(error.contains("turbo") && error.lines().count() == 1, "{args:?}: {error}");
    }
}

#[test]
fn version_in_the_form_clients_parse_also_as_firecracker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("firecracker");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_lguest"), &link).expect("symlink");
    for mut command in [Command::new(&link), { let mut c = lguest(); c.arg("firecracker"); c }] {
        let out = command.arg("--version").output().expect("run");
        assert_eq!(out.status.code(), Some(0));
        let version = text(&out.stdout);
        assert!(version.starts_with("Firecracker v1.") && version.contains("\nlguest "), "{version}");
    }
    let help = Command::new(&link).arg("--help").output().expect("run");
    assert!(text(&help.stdout).contains("--api-sock"), "{}", text(&help.stdout));
}

#[test]
fn hostile_clients_get_400s_and_the_api_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("hostile.sock");
    let mut vm = Running::start(&["firecracker", "--api-sock", socket.to_str().expect("utf-8")]);
    wait_for_socket(&socket, &vm);
    let rss_before = vm.rss_kib();

    // Connects and never sends: the others are served meanwhile.
    let _silent = UnixStream::connect(&socket).expect("connect");
    for (method, path, body) in [
        ("PUT", "/machine-config", "{\"vcpu_count\": 1,"),
        ("PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 64, "gpus": 8}"#),
        ("PUT", "/machine-config", r#"{"vcpu_count": "one", "mem_size_mib": 64}"#),
        ("PUT", "/machine-config", r#"{"vcpu_count": 33, "mem_size_mib": 64}"#),
        ("PUT", "/actions", "[]"),
        ("PUT", "/actions", ""),
        ("PUT", "/drives/a", r#"{"drive_id": "b", "is_root_device": false, "path_on_host": "Cargo.toml"}"#),
        ("GET", "/snapshot/create", ""),
        ("DELETE", "/", ""),
    ] {
        let (code, reply) = call(&socket, method, path, Some(body));
        assert_eq!(code, 400, "{method} {path} {body}: {reply}");
        let message = json(&reply)["fault_message"].as_str().map(str::to_string).unwrap_or_default();
        assert!(!message.is_empty() && !message.contains('\n'), "{method} {path}: {reply}");
    }
    let huge = format!(r#"{{"kernel_image_path": "{}"}}"#, "k".repeat(1 << 20));
    let (code, reply) = call(&socket, "PUT", "/boot-source", Some(&huge));
    assert_eq!(code, 400);
    assert!(reply.contains("larger than the limit"), "{reply}");

    // 10 000 requests in a row on one connection (curl's URL globbing reuses it).
    let out = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&socket)
        .args(["-o", "/dev/null", "-w", "%{http_code}\n", "http://localhost/?[1-10000]"])
        .output()
        .expect("curl");
    let codes = text(&out.stdout);
    assert_eq!(codes.lines().filter(|l| *l == "200").count(), 10_000, "{}", &codes[..codes.len().min(200)]);

    // Several clients at once.
    let clients: Vec<_> = (0..8)
        .map(|n| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let body = format!(r#"{{"vcpu_count": {}, "mem_size_mib": 64}}"#, n % 4 + 1);
                (0..50).all(|_| call(&socket, "PUT", "/machine-config", Some(&body)).0 == 204)
            })
        })
        .collect();
    assert!(clients.into_iter().all(|c| c.join().expect("client")), "a client was refused");

    let rss_after = vm.rss_kib();
    assert!(rss_after < rss_before + 4096, "RSS grew from {rss_before} to {rss_after} KiB");
    assert_eq!(json(&call(&socket, "GET", "/", None).1)["state"], "Not started");
    assert_eq!(vm.terminate(), 143);
    assert!(!socket.exists());
}
