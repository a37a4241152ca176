//! vsock-io's host side against a stand-in for lguest's muxer: the test accepts the
//! `uds-connect` end's connection, checks its `CONNECT` line, answers `OK`, and splices it to
//! a `uds-listen` end, as lguest does between a host program and a guest. Both ends must
//! report the other's pattern, byte for byte; a connection the muxer closes is a refusal.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn vsock_io(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vsock-io")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start vsock-io")
}

fn pattern_sum(bytes: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vsock-io")).args(["pattern-sum", bytes]).output().expect("pattern-sum");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The muxer's side of a host program's connection: its CONNECT line.
fn accept_connect(listener: &UnixListener) -> (UnixStream, String) {
    let (mut stream, _) = listener.accept().expect("accept");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).expect("the CONNECT line") == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    (stream, String::from_utf8_lossy(&line).into_owned())
}

fn connect_when_listening(path: &Path) -> UnixStream {
    for _ in 0..500 {
        if let Ok(stream) = UnixStream::connect(path) {
            return stream;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nobody listens on {}", path.display());
}

/// Copies one way until the end, then passes the end on.
fn splice(mut from: UnixStream, to: UnixStream) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut to_writer = &to;
        let _ = std::io::copy(&mut from, &mut to_writer);
        let _ = to.shutdown(std::net::Shutdown::Write);
    })
}

fn line_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).lines().find(|l| l.starts_with("VSOCK-IO")).unwrap_or_default().to_string()
}

/// Runs a `uds-listen` end (on the guest side of port `port`) and a `uds-connect` end with
/// these options, the test's stand-in muxer between them; their outputs, once both are done.
fn through_the_muxer(port: &str, listen_opts: &[&str], connect_opts: &[&str]) -> (Output, Output) {
    let dir = tempfile::tempdir().expect("tempdir");
    let muxer = UnixListener::bind(dir.path().join("v.sock")).expect("bind");
    let guest_side = dir.path().join(format!("v.sock_{port}"));
    let listen = vsock_io(&[&["uds-listen", guest_side.to_str().expect("path")], listen_opts].concat());
    let connect = vsock_io(&[&["uds-connect", dir.path().join("v.sock").to_str().expect("path"), port], connect_opts].concat());
    let (mut host, line) = accept_connect(&muxer);
    assert_eq!(line, format!("CONNECT {port}"));
    host.write_all(b"OK 1073741824\n").expect("OK");
    let guest = connect_when_listening(&guest_side);
    let one = splice(host.try_clone().expect("clone"), guest.try_clone().expect("clone"));
    let two = splice(guest, host);
    let (listen, connect) = (listen.wait_with_output().expect("listen"), connect.wait_with_output().expect("connect"));
    one.join().expect("splice");
    two.join().expect("splice");
    assert!(listen.status.success() && connect.status.success(), "{listen:?}\n{connect:?}");
    (listen, connect)
}

/// The value of `key=` in a report line.
fn field(line: &str, key: &str) -> String {
    line.split(' ').find_map(|word| word.strip_prefix(key)?.strip_prefix('=')).unwrap_or_default().to_string()
}

#[test]
fn both_host_ends_move_the_pattern_through_a_connect_handshake() {
    let (listen, connect) =
        through_the_muxer("7", &["--send", "1M", "--recv", "300K", "--chunk", "1000"], &["--send", "300K", "--recv", "1M"]);
    let (small, big) = (pattern_sum("300K"), pattern_sum("1M"));
    let without_time = |line: String| line.rsplit_once(" ms=").map(|(rest, _)| rest.to_string()).unwrap_or(line);
    assert_eq!(without_time(line_of(&listen)), format!("VSOCK-IO uds-listen-0 sent=1048576 sent_sum={big} received=307200 sum={small}"));
    assert_eq!(without_time(line_of(&connect)), format!("VSOCK-IO uds-connect-7 sent=307200 sent_sum={small} received=1048576 sum={big}"));
}

#[test]
fn send_secs_sends_the_pattern_until_its_time_is_up_and_the_receiver_gets_all_of_it() {
    let (listen, connect) = through_the_muxer("8", &[], &["--send-secs", "0.3"]);
    let (sent, received) = (field(&line_of(&connect), "sent"), field(&line_of(&listen), "received"));
    let bytes: u64 = sent.parse().expect("a byte count");
    assert!(bytes > 0, "{connect:?}");
    assert_eq!(received, sent, "{listen:?}");
    assert_eq!(field(&line_of(&listen), "sum"), pattern_sum(&sent));
    assert_eq!(field(&line_of(&connect), "sent_sum"), pattern_sum(&sent));
}

#[test]
fn rr_counts_round_trips_against_an_echo_end_that_returns_each_byte() {
    let (listen, connect) = through_the_muxer("9", &["--echo"], &["--rr", "0.3"]);
    let (rr, echoed) = (line_of(&connect), line_of(&listen));
    assert!(rr.starts_with("VSOCK-IO uds-connect-9 rr trips="), "{connect:?}");
    let trips: u64 = field(&rr, "trips").parse().expect("a count");
    assert!(trips > 0 && field(&rr, "per_s").parse::<u64>().is_ok(), "{rr}");
    // Each trip is one byte each way: the echo end sent back exactly as many.
    assert_eq!(echoed, format!("VSOCK-IO uds-listen-0 echoed={trips}"));
}

#[test]
fn echo_or_rr_together_with_send_and_bad_seconds_are_refused_as_usage_errors() {
    for args in [
        &["uds-listen", "/nonexistent/x", "--echo", "--send", "1K"][..],
        &["uds-connect", "/nonexistent/x", "5", "--rr", "1", "--send-secs", "1"],
        &["uds-connect", "/nonexistent/x", "5", "--rr", "0"],
        &["uds-connect", "/nonexistent/x", "5", "--send-secs", "NaN"],
        &["uds-connect", "/nonexistent/x", "5", "--rr"],
    ] {
        let out = vsock_io(args).wait_with_output().expect("vsock-io");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
}

#[test]
fn a_connection_closed_before_ok_is_reported_as_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let muxer = UnixListener::bind(dir.path().join("v.sock")).expect("bind");
    let connect = vsock_io(&["uds-connect", dir.path().join("v.sock").to_str().expect("path"), "9"]);
    let (host, line) = accept_connect(&muxer);
    assert_eq!(line, "CONNECT 9");
    drop(host);
    let out = connect.wait_with_output().expect("connect");
    assert_eq!(out.status.code(), Some(3));
    assert!(line_of(&out).starts_with("VSOCK-IO uds-connect-9 failed: refused"), "{out:?}");
}

/// A `tcp-listen` end on a free port of 127.0.0.1, once it says it is listening; its port.
fn tcp_listener(opts: &[&str]) -> (Child, std::io::BufReader<std::process::ChildStdout>, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("its address").port();
    let mut child = vsock_io(&[&["tcp-listen", &port.to_string()], opts].concat());
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).expect("the listening line");
    assert_eq!(first.trim(), format!("VSOCK-IO listening {port}"));
    (child, stdout, port)
}

/// The rest of a listener's output, once it has exited successfully.
fn rest_of(mut child: Child, mut stdout: std::io::BufReader<std::process::ChildStdout>) -> String {
    let mut text = String::new();
    stdout.read_to_string(&mut text).expect("stdout");
    assert!(child.wait().expect("wait").success(), "{text}");
    text
}

#[test]
fn over_tcp_the_pattern_moves_both_ways_with_its_checksums() {
    let (listener, stdout, port) = tcp_listener(&["--send", "200K", "--recv", "100K"]);
    let connect = vsock_io(&["tcp-connect", "127.0.0.1", &port.to_string(), "--send", "100K", "--recv", "200K"]).wait_with_output().expect("connect");
    assert!(connect.status.success(), "{connect:?}");
    let listen = rest_of(listener, stdout);
    let (small, big) = (pattern_sum("100K"), pattern_sum("200K"));
    let listen_line = listen.lines().next().unwrap_or_default();
    assert!(listen_line.starts_with(&format!("VSOCK-IO tcp-listen-{port}-0 sent=204800 sent_sum={big} received=102400 sum={small} ms=")), "{listen}");
    assert!(line_of(&connect).starts_with(&format!("VSOCK-IO tcp-connect-127.0.0.1-{port} sent=102400 sent_sum={small} received=204800 sum={big} ms=")));
}

#[test]
fn over_tcp_rr_counts_round_trips_against_an_echo_listener() {
    let (listener, stdout, port) = tcp_listener(&["--echo"]);
    let rr = vsock_io(&["tcp-connect", "127.0.0.1", &port.to_string(), "--rr", "0.2"]).wait_with_output().expect("rr");
    assert!(rr.status.success(), "{rr:?}");
    let trips = field(&line_of(&rr), "trips");
    assert!(trips.parse::<u64>().is_ok_and(|n| n > 0), "{rr:?}");
    assert_eq!(rest_of(listener, stdout).trim(), format!("VSOCK-IO tcp-listen-{port}-0 echoed={trips}"));
}

#[test]
fn rate_times_only_intact_transfers_and_says_why_not_for_the_rest() {
    let rate = |line: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_vsock-io")).args(["rate", line]).output().expect("rate");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let sum = pattern_sum("2M");
    // 2 MiB in 500 ms, with the serial console's \r at the end.
    assert_eq!(rate(&format!("VSOCK-IO listen-5000-0 sent=0 sent_sum=cbf29ce484222325 received=2097152 sum={sum} ms=500\r")), (Some(0), "4.0".into()));
    let (status, why) = rate(&format!("VSOCK-IO listen-5000-0 sent=0 sent_sum=0 received=2097151 sum={sum} ms=500"));
    assert_eq!((status, why.contains("corrupted")), (Some(3), true), "{why}");
    let (status, why) = rate("VSOCK-IO listen-5000-0 failed: receiving after 7 bytes: Connection reset by peer");
    assert_eq!((status, why.contains("the transfer failed")), (Some(3), true), "{why}");
    for hostile in ["", "received=", "received=1 sum=zz ms=1", "received=99999999999999999999 sum=0 ms=1", "received=1000000000000000000 sum=0 ms=1", "received=0 sum=cbf29ce484222325 ms=0"] {
        assert_eq!(rate(hostile).0, Some(3), "{hostile:?}");
    }
}
