use super::*;

fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("lguest").chain(args.iter().copied()))
}

/// A path that exists, for flags that must name a readable file.
pub(crate) const FILE: &str = "Cargo.toml";

pub(crate) fn run_args(args: &[&str]) -> RunArgs {
    match parse(args).expect("valid command line").command {
        Command::Run(run) => run,
        other => panic!("not a run: {other:?}"),
    }
}

#[test]
fn memory_sizes_in_every_spelling() {
    assert_eq!(parse_memory("512M").ok(), Some(512));
    assert_eq!(parse_memory("512MiB").ok(), Some(512));
    assert_eq!(parse_memory("2G").ok(), Some(2048));
    assert_eq!(parse_memory("2gib").ok(), Some(2048));
    assert_eq!(parse_memory("1024").ok(), Some(1024));
}

#[test]
fn memory_sizes_that_make_no_sense_are_refused() {
    for bad in ["", "M", "12", "0", "512K", "2T", "99999999999999999999", "4096G", "-1"] {
        assert!(parse_memory(bad).is_err(), "{bad} should be refused");
    }
}

#[test]
fn run_defaults() {
    let config = VmConfig::from_args(run_args(&["run", "--kernel", FILE])).expect("valid");
    assert_eq!(config.memory_mib, 512);
    assert_eq!(config.cpus, 1);
    assert_eq!(config.cmdline, DEFAULT_CMDLINE);
    assert_eq!(config.initrd, None);
    assert!(!config.boot_timeline);
    assert!(!config.track_dirty_pages, "tracking costs: off unless asked");
    assert_eq!(config.on_reboot, OnReboot::Exit);
    assert_eq!(config.shutdown_timeout, Duration::from_secs(10));
}

#[test]
fn reboot_and_shutdown_timeout() {
    let args = run_args(&["run", "--kernel", FILE, "--reboot", "restart", "--shutdown-timeout", "0"]);
    let config = VmConfig::from_args(args).expect("valid");
    assert_eq!((config.on_reboot, config.shutdown_timeout), (OnReboot::Restart, Duration::ZERO));
    assert!(parse(&["run", "--kernel", FILE, "--reboot", "halt"]).is_err());
    let long = VmConfig::from_args(run_args(&["run", "--kernel", FILE, "--shutdown-timeout", "99999999"]));
    assert!(matches!(long, Err(Error::BadFlag { flag: "--shutdown-timeout", .. })), "{long:?}");
    assert!(parse(&["run", "--kernel", FILE, "--shutdown-timeout", "-1"]).is_err());
}

#[test]
fn run_with_every_flag() {
    let args = run_args(&[
        "run", "--kernel", FILE, "--initrd", "src/main.rs", "--cmdline", "console=ttyS0 quiet",
        "--memory", "1G", "--cpus", "2", "--boot-timeline", "--track-dirty-pages",
    ]);
    let config = VmConfig::from_args(args).expect("valid");
    assert_eq!(config.kernel, PathBuf::from(FILE));
    assert!(parse(&["run", "--kernel", FILE, "--config-file", FILE]).is_err(), "one or the other");
    assert_eq!(config.initrd, Some(PathBuf::from("src/main.rs")));
    assert_eq!(config.cmdline, "console=ttyS0 quiet");
    assert_eq!(config.memory_bytes(), 1 << 30);
    assert_eq!(config.cpus, 2);
    assert!(config.boot_timeline);
    assert!(config.track_dirty_pages);
    assert_eq!(config.boot_trace, None);
    let traced = run_args(&["run", "--kernel", FILE, "--boot-timeline=boot.json"]);
    let config = VmConfig::from_args(traced).expect("valid");
    assert!(config.boot_timeline);
    assert_eq!(config.boot_trace, Some(PathBuf::from("boot.json")));
}

#[test]
fn kernel_is_required_and_unknown_flags_refused() {
    assert!(parse(&["run"]).is_err());
    assert!(parse(&["run", "--kernel", "k", "--bogus"]).is_err());
    assert!(parse(&["run", "--kernel", "k", "--cpus", "many"]).is_err());
}

#[test]
fn cpu_counts_out_of_range_are_refused() {
    for cpus in ["0", "255", "1000"] {
        let args = run_args(&["run", "--kernel", FILE, "--cpus", cpus]);
        assert!(matches!(VmConfig::from_args(args), Err(Error::BadCpus { .. })), "{cpus}");
    }
}

#[test]
fn missing_or_unreadable_files_are_named() {
    let missing = VmConfig::from_args(run_args(&["run", "--kernel", "no/such/kernel"]));
    assert!(matches!(&missing, Err(Error::ReadFile { what: "kernel", .. })), "{missing:?}");
    let initrd_dir = VmConfig::from_args(run_args(&["run", "--kernel", FILE, "--initrd", "src"]));
    assert!(matches!(&initrd_dir, Err(Error::ReadFile { what: "initrd", .. })), "{initrd_dir:?}");
}

#[test]
fn disks_with_options() {
    assert_eq!(
        parse_disk("a.img,readonly,id=data").ok(),
        Some(DiskConfig { readonly: true, id: Some("data".into()), ..DiskConfig::new("a.img") })
    );
    assert_eq!(parse_disk("b.img").ok(), Some(DiskConfig::new("b.img")));
    assert_eq!(parse_disk("d.img,engine=sync").map(|d| d.engine).ok(), Some(DiskEngine::Sync));
    assert_eq!(parse_disk("d.img,engine=io_uring").map(|d| d.engine).ok(), Some(DiskEngine::IoUring));
    assert_eq!(parse_disk("d.img,queues=2").map(|d| d.queues).ok(), Some(2));
    assert_eq!(parse_disk("d.img,queues=16").map(|d| d.queues).ok(), Some(16));
    let limited = parse_disk("c.img,bw_size=1048576,bw_refill_time=100,ops_size=10,ops_refill_time=1000").expect("valid");
    assert!(limited.rate_limit.bandwidth.is_some() && limited.rate_limit.ops.is_some());
    for bad in ["", ",readonly", "a.img,ro", "a.img,engine=aio", "a.img,engine=", "a.img,queues=0", "a.img,queues=17", "a.img,queues=two", "a.img,id=", "a.img,id=123456789012345678901", "a.img,bw_size=5", "a.img,ops_size=x,ops_refill_time=1"] {
        assert!(matches!(parse_disk(bad), Err(Error::BadFlag { flag: "--disk", .. })), "{bad}");
    }
}

#[test]
fn nets_with_options() {
    let net = parse_net("tap=tap0,mac=52:54:00:12:34:56").expect("valid");
    assert_eq!(net, NetConfig { mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]), ..NetConfig::new(NetBackend::Tap { name: "tap0".into(), vhost: false }) });
    for bad in ["", "tap0", "tap=", "tap=x,mac=52:54:00:12:34", "tap=x,mac=01:00:00:00:00:00", "tap=averyveryverylongname"] {
        assert!(matches!(parse_net(bad), Err(Error::BadFlag { flag: "--net", .. })), "{bad}");
    }
}

#[test]
fn net_vhost_goes_with_a_tap_only() {
    let vhost = |value: &str| parse_net(value).map(|net| net.backend);
    assert_eq!(vhost("tap=tap0,vhost=on").ok(), Some(NetBackend::Tap { name: "tap0".into(), vhost: true }));
    assert_eq!(vhost("vhost=off,tap=tap0").ok(), Some(NetBackend::Tap { name: "tap0".into(), vhost: false }));
    for bad in ["tap=tap0,vhost=yes", "user,vhost=on", "user,vhost=off", "vhost=on"] {
        let error = parse_net(bad).expect_err(bad).to_string();
        assert!(error.contains("vhost") || error.contains("expected tap=NAME"), "{bad}: {error}");
    }
    let limited = parse_net("tap=tap0,vhost=on,rx_bw_size=1000,rx_bw_refill_time=100").expect_err("vhost with a limit");
    assert!(limited.to_string().contains("rate limits need lguest's own datapath"), "{limited}");
}

#[test]
fn nets_with_rate_limits_each_way() {
    let net = parse_net("user,rx_bw_size=1048576,rx_bw_refill_time=100,tx_ops_size=1000,tx_ops_refill_time=1000,tx_ops_one_time_burst=50").expect("valid");
    assert_eq!(net.rx_rate_limit.bandwidth.map(|b| (b.size(), b.refill_time_ms())), Some((1 << 20, 100)));
    assert_eq!(net.rx_rate_limit.ops, None);
    assert_eq!(net.tx_rate_limit.ops.map(|b| (b.size(), b.one_time_burst())), Some((1000, 50)));
    for (bad, says) in [
        ("tap=t,rx_bw_size=1", "rx_bw_size and"),
        ("tap=t,tx_ops_size=lots,tx_ops_refill_time=1", "tx_ops_size=lots is not a whole number"),
        ("tap=t,rx_bw_size=0,rx_bw_refill_time=1", "rx_bw: "),
        ("tap=t,bw_size=1,bw_refill_time=1", "unknown option 'bw_size=1'"),
        ("tap=t,rx_bw_colour=1", "unknown option"),
    ] {
        let error = parse_net(bad).expect_err(bad).to_string();
        assert!(error.contains(says), "{bad}: {error}");
    }
}

fn forward(protocol: Protocol, host_addr: Option<&str>, host_port: u16, guest_port: u16) -> Forward {
    Forward { protocol, host_addr: host_addr.map(|a| a.parse().expect("an address")), host_port, guest_port }
}

#[test]
fn user_nets_with_forwards() {
    assert_eq!(parse_net("user").ok(), Some(NetConfig::new(NetBackend::User { forwards: vec![] })));
    let net = parse_net("user,hostfwd=tcp:8080-:80,hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5353-:53,hostfwd=tcp:[::1]:8443-443,mac=52:54:00:00:00:01")
        .expect("valid");
    let forwards = vec![
        forward(Protocol::Tcp, None, 8080, 80),
        forward(Protocol::Tcp, None, 2222, 22),
        forward(Protocol::Udp, Some("127.0.0.1"), 5353, 53),
        forward(Protocol::Tcp, Some("::1"), 8443, 443),
    ];
    assert_eq!(net, NetConfig { mac: Some([0x52, 0x54, 0, 0, 0, 1]), ..NetConfig::new(NetBackend::User { forwards }) });
    // The same port for TCP and for UDP is two forwards, not one twice.
    assert!(parse_net("user,hostfwd=tcp:53-:53,hostfwd=udp:53-:53").is_ok());
}

#[test]
fn user_nets_that_make_no_sense_are_refused() {
    for bad in [
        "user,tap=t0", "tap=t0,hostfwd=tcp:80-:80", "user,hostfwd=", "user,hostfwd=tcp:80", "user,hostfwd=sctp:80-:80",
        "user,hostfwd=tcp:0-:80", "user,hostfwd=tcp:80-:0", "user,hostfwd=tcp:65536-:80", "user,hostfwd=tcp:+80-:80",
        "user,hostfwd=tcp:80-:80,hostfwd=tcp::80-:81", "user,hostfwd=tcp:host:80-:80", "user,hostfwd=tcp:80-169.254.0.1:80",
        "users", "user,mac=ff:ff:ff:ff:ff:ff",
    ] {
        assert!(matches!(parse_net(bad), Err(Error::BadFlag { flag: "--net", .. })), "{bad}");
    }
}

#[test]
fn vsock_takes_a_cid_and_a_socket_path() {
    let vsock = parse_vsock("cid=3,uds=/run/v.sock").expect("valid");
    assert_eq!(vsock, VsockConfig { cid: 3, uds_path: "/run/v.sock".into() });
    assert_eq!(parse_vsock("uds=v,cid=4294967294").expect("valid").cid, u64::from(u32::MAX) - 1);
    let long = format!("cid=3,uds=/{}", "x".repeat(MAX_VSOCK_PATH));
    for bad in ["", "cid=3", "uds=v", "cid=2,uds=v", "cid=4294967295,uds=v", "cid=-1,uds=v", "cid=x,uds=v", "cid=3,uds=", "cid=3,uds=v,port=1", &long] {
        assert!(matches!(parse_vsock(bad), Err(Error::BadFlag { flag: "--vsock", .. })), "{bad}");
    }
    let config = VmConfig::from_args(run_args(&["run", "--kernel", FILE, "--vsock", "cid=3,uds=v"])).expect("valid");
    assert_eq!(config.pci_devices(), 1, "vsock takes a PCI slot");
    assert!(parse(&["run", "--kernel", FILE, "--vsock", "cid=3,uds=a", "--vsock", "cid=4,uds=b"]).is_err(), "at most one");
}

#[test]
fn devices_from_the_command_line() {
    let args = run_args(&["run", "--kernel", FILE, "--disk", "a.img", "--disk", "b.img,readonly", "--net", "tap=t0", "--console", "virtio", "--rng"]);
    let config = VmConfig::from_args(args).expect("valid");
    assert_eq!(config.disks.len(), 2);
    assert!(config.disks[1].readonly);
    assert_eq!(config.nets[0].backend, NetBackend::Tap { name: "t0".into(), vhost: false });
    assert_eq!(config.console, ConsoleKind::Virtio);
    assert!(config.cmdline.contains("console=hvc0"));
    assert!(config.rng);
    assert!(!config.rng_rate_limit.limits_anything());
    let limited = VmConfig::from_args(run_args(&["run", "--kernel", FILE, "--rng=bw_size=1024,bw_refill_time=100"])).expect("valid");
    assert!(limited.rng && limited.rng_rate_limit.bandwidth.is_some());
    let bad = VmConfig::from_args(run_args(&["run", "--kernel", FILE, "--rng=fast"]));
    assert!(matches!(bad, Err(Error::BadFlag { flag: "--rng", .. })), "{bad:?}");
    assert!(parse(&["run", "--kernel", FILE, "--console", "vga"]).is_err());
    assert_eq!(config.seccomp, crate::seccomp::Mode::Enforce);
    let log = VmConfig::from_args(run_args(&["run", "--kernel", FILE, "--seccomp", "log"])).expect("valid");
    assert_eq!(log.seccomp, crate::seccomp::Mode::Log);
    assert!(parse(&["run", "--kernel", FILE, "--seccomp", "strict"]).is_err());
}

#[test]
fn more_devices_than_pci_slots_are_refused_with_the_limit() {
    let mut args = vec!["run", "--kernel", FILE, "--rng"];
    args.extend(std::iter::repeat_n(["--disk", "a.img"], MAX_PCI_DEVICES).flatten());
    let refused = VmConfig::from_args(run_args(&args));
    assert!(matches!(refused, Err(Error::TooManyDevices { asked: 32, max: 31 })), "{refused:?}");
    let fits = VmConfig::from_args(run_args(&args[..args.len() - 2])).expect("31 devices fit");
    assert_eq!(fits.pci_devices(), MAX_PCI_DEVICES);
}

#[test]
fn help_names_the_escape_key_and_the_exit_statuses() {
    let help = parse(&["run", "--help"]).expect_err("help exits").to_string();
    assert!(help.contains("Ctrl-A then x"), "{help}");
    assert!(help.contains("2 a bad request") && help.contains("the host failed"), "{help}");
}
