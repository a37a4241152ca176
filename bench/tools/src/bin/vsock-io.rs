//! vsock-io: moves a known pattern over vsock streams and checks it, from inside a guest
//! (AF_VSOCK) or from the host side of Firecracker's hybrid vsock (a Unix socket), so that
//! both ends of lguest's lab tests are the same program. It also times 1-byte round trips,
//! and speaks TCP too, so the user network's bench row checks every byte it times.
//!
//! ```text
//! vsock-io listen PORT [OPTS]           guest: accept --count connections on vsock PORT
//! vsock-io connect CID PORT [OPTS]      guest: connect to CID:PORT (the host is CID 2)
//! vsock-io uds-connect PATH PORT [OPTS] host: connect to PATH, "CONNECT PORT", expect "OK n"
//! vsock-io uds-listen PATH [OPTS]       host: accept --count connections on the Unix socket
//!                                       PATH (lguest's PATH_PORT for guest port PORT)
//! vsock-io tcp-listen PORT [OPTS]       TCP (the user network's bench row): accept on PORT
//! vsock-io tcp-connect ADDR PORT [OPTS] TCP: connect to ADDR's PORT
//! vsock-io pattern-sum BYTES            the checksum the pattern of BYTES bytes has
//! vsock-io rate LINE                    a receiver's report LINE → its MiB/s, if the bytes
//!                                       were the pattern (else status 3 and why not)
//!
//! OPTS: --send BYTES (0)     the pattern to send on each connection, then shut down writing
//!       --send-secs SECS     instead: send the pattern for SECS seconds (a throughput test)
//!       --recv BYTES         fail unless exactly this many bytes arrive before the end
//!       --echo               send back whatever arrives (the far end of --rr)
//!       --rr SECS            1-byte request/response for SECS seconds: send a byte, wait
//!                            for it to come back, again and again (against an --echo end)
//!       --count N (1)        connections a listener serves (at once) before it exits
//!       --chunk BYTES (64K)  read size
//!       --slow-ms MS (0)     sleep this long after every read: a slow reader
//! BYTES may end in K or M.
//! ```
//!
//! A vsock or TCP listener first prints `VSOCK-IO listening PORT`. Each connection prints one line,
//! `VSOCK-IO TAG sent=N sent_sum=X received=M sum=Y ms=T`, once both directions are done (T
//! from its start, for a rough rate only; sending runs on a thread of its own, so that two
//! ends sending at once never wait on each other). The checksum is FNV-1a over the bytes, and the pattern
//! numbers its bytes (`i % 251`), so data at a wrong offset never passes. An --rr connection
//! prints `VSOCK-IO TAG rr trips=N per_s=R` instead (R round trips a second), an --echo one
//! `VSOCK-IO TAG echoed=N`. The benchmark's vsock row (bench/scenarios/vsock.sh) takes its
//! throughput from the receiving end's `received` and `ms`. A connection that
//! is refused or reset prints `VSOCK-IO TAG failed: why`; the exit status is then 3 (2 for a
//! bad command line). Built static (bench/run.sh), it runs in the lab and in the guest alike.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

const USAGE: &str = "usage: vsock-io listen PORT | connect CID PORT | uds-connect PATH PORT | uds-listen PATH \
| tcp-listen PORT | tcp-connect ADDR PORT [--send BYTES | --send-secs SECS | --echo | --rr SECS] [--recv BYTES] [--count N] [--chunk BYTES] [--slow-ms MS] \
| pattern-sum BYTES | rate LINE";

/// How much of the pattern a connection sends.
#[derive(Clone, Copy)]
enum Amount {
    Bytes(u64),
    For(Duration),
}

/// What one connection does: move the pattern (and check what comes), echo, or time round trips.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Pattern,
    Echo,
    RoundTrips(Duration),
}

/// What one connection does.
#[derive(Clone, Copy)]
struct Plan {
    mode: Mode,
    send: Amount,
    recv: Option<u64>,
    count: usize,
    chunk: usize,
    slow: Duration,
}

/// A failure of one connection, or of the command line.
enum Failure {
    Usage(String),
    Io(String),
}

/// The byte at offset `i` of the pattern.
fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// FNV-1a, 64 bits.
struct Sum(u64);

impl Sum {
    fn new() -> Sum {
        Sum(0xcbf2_9ce4_8422_2325)
    }

    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn pattern_sum(bytes: u64) -> u64 {
    let mut sum = Sum::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut at = 0;
    while at < bytes {
        let n = (bytes - at).min(buf.len() as u64) as usize;
        fill(&mut buf[..n], at);
        sum.add(&buf[..n]);
        at += n as u64;
    }
    sum.0
}

fn fill(buf: &mut [u8], from: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(from + i as u64);
    }
}

fn parse_bytes(text: &str) -> Result<u64, Failure> {
    let (digits, scale) = match text.as_bytes().last() {
        Some(b'K' | b'k') => (&text[..text.len() - 1], 1 << 10),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 1 << 20),
        _ => (text, 1),
    };
    let number: u64 = digits.parse().map_err(|_| Failure::Usage(format!("'{text}' is not a byte count")))?;
    number.checked_mul(scale).ok_or_else(|| Failure::Usage(format!("'{text}' is too large")))
}

fn parse_plan(options: &[String]) -> Result<Plan, Failure> {
    let mut plan = Plan { mode: Mode::Pattern, send: Amount::Bytes(0), recv: None, count: 1, chunk: 64 << 10, slow: Duration::ZERO };
    let mut rest = options.iter();
    while let Some(option) = rest.next() {
        if option == "--echo" {
            plan.mode = Mode::Echo;
            continue;
        }
        let value = rest.next().ok_or_else(|| Failure::Usage(format!("{option} needs a value")))?;
        match option.as_str() {
            "--send" => plan.send = Amount::Bytes(parse_bytes(value)?),
            "--send-secs" => plan.send = Amount::For(parse_secs(value)?),
            "--rr" => plan.mode = Mode::RoundTrips(parse_secs(value)?),
            "--recv" => plan.recv = Some(parse_bytes(value)?),
            "--count" => plan.count = parse_bytes(value)?.clamp(1, 4096) as usize,
            "--chunk" => plan.chunk = parse_bytes(value)?.clamp(1, 16 << 20) as usize,
            "--slow-ms" => plan.slow = Duration::from_millis(parse_bytes(value)?),
            _ => return Err(Failure::Usage(format!("unknown option {option}"))),
        }
    }
    if plan.mode != Mode::Pattern && !matches!(plan.send, Amount::Bytes(0)) {
        return Err(Failure::Usage("--echo and --rr send bytes of their own: no --send or --send-secs with them".into()));
    }
    Ok(plan)
}

/// Seconds, whole or not, more than zero and at most a day.
fn parse_secs(text: &str) -> Result<Duration, Failure> {
    match text.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs <= 86400.0 => Ok(Duration::from_secs_f64(secs)),
        _ => Err(Failure::Usage(format!("'{text}' is not a number of seconds (more than 0, at most 86400)"))),
    }
}

/// Sends the pattern (so many bytes, or for so long), then shuts down writing; the bytes sent.
fn send_all(mut stream: impl Write + Shut, amount: Amount) -> Result<u64, String> {
    let mut buf = vec![0u8; 64 << 10];
    let start = std::time::Instant::now();
    let mut at = 0;
    loop {
        let n = match amount {
            Amount::Bytes(bytes) => (bytes - at).min(buf.len() as u64) as usize,
            Amount::For(length) if start.elapsed() < length => buf.len(),
            Amount::For(_) => 0,
        };
        if n == 0 {
            break;
        }
        fill(&mut buf[..n], at);
        stream.write_all(&buf[..n]).map_err(|e| format!("sending at byte {at}: {e}"))?;
        at += n as u64;
    }
    stream.shut_write().map_err(|e| format!("shutting down writing: {e}"))?;
    Ok(at)
}

/// Half-closing a stream, whatever its kind.
trait Shut {
    fn shut_write(&self) -> std::io::Result<()>;
}

impl Shut for UnixStream {
    fn shut_write(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

impl Shut for TcpStream {
    fn shut_write(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

impl Shut for std::fs::File {
    fn shut_write(&self) -> std::io::Result<()> {
        // SAFETY: shutdown takes the fd we own and a constant.
        if unsafe { libc::shutdown(self.as_raw_fd(), libc::SHUT_WR) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Runs one connection as its plan says; prints its report line.
fn serve<S>(tag: &str, stream: S, writer: S, plan: Plan) -> Result<(), Failure>
where
    S: Read + Write + Shut + Send + 'static,
{
    let failed = |e: String| Failure::Io(format!("VSOCK-IO {tag} failed: {e}"));
    match plan.mode {
        Mode::Pattern => exchange(tag, stream, writer, plan),
        Mode::Echo => {
            let echoed = echo(stream, writer).map_err(failed)?;
            println!("VSOCK-IO {tag} echoed={echoed}");
            Ok(())
        }
        Mode::RoundTrips(length) => {
            let (trips, secs) = round_trips(stream, length).map_err(failed)?;
            println!("VSOCK-IO {tag} rr trips={trips} per_s={:.0}", trips as f64 / secs);
            Ok(())
        }
    }
}

/// The pattern out on a thread, everything in here; the report line.
fn exchange<S>(tag: &str, stream: S, writer: S, plan: Plan) -> Result<(), Failure>
where
    S: Read + Write + Shut + Send + 'static,
{
    let amount = plan.send;
    let start = std::time::Instant::now();
    let sender = std::thread::spawn(move || send_all(writer, amount));
    let received = receive(stream, plan);
    let sent = sender.join().unwrap_or_else(|_| Err("the sending thread panicked".into()));
    let (received, sum) = received.map_err(|e| Failure::Io(format!("VSOCK-IO {tag} failed: {e}")))?;
    let send = sent.map_err(|e| Failure::Io(format!("VSOCK-IO {tag} failed: {e}")))?;
    let ms = start.elapsed().as_millis();
    println!("VSOCK-IO {tag} sent={send} sent_sum={:016x} received={received} sum={sum:016x} ms={ms}", pattern_sum(send));
    match plan.recv {
        Some(want) if want != received => Err(Failure::Io(format!("VSOCK-IO {tag} failed: received {received} bytes, not {want}"))),
        _ => Ok(()),
    }
}

/// Sends back everything that arrives, until the far end shuts down writing; the bytes echoed.
fn echo(mut stream: impl Read, mut writer: impl Write + Shut) -> Result<u64, String> {
    let mut buf = [0u8; 4096];
    let mut echoed = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                writer.write_all(&buf[..n]).map_err(|e| format!("echoing after {echoed} bytes: {e}"))?;
                echoed += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("receiving after {echoed} bytes: {e}")),
        }
    }
    writer.shut_write().map_err(|e| format!("shutting down writing: {e}"))?;
    Ok(echoed)
}

/// One byte out, the same byte back, for `length`; the round trips and the seconds they took.
/// A byte that comes back different (or not at all) is a failure, not a trip.
fn round_trips<S: Read + Write + Shut>(mut stream: S, length: Duration) -> Result<(u64, f64), String> {
    let start = std::time::Instant::now();
    let mut trips = 0u64;
    while start.elapsed() < length {
        let out = [pattern_byte(trips)];
        stream.write_all(&out).map_err(|e| format!("sending round trip {trips}: {e}"))?;
        let mut back = [0u8];
        stream.read_exact(&mut back).map_err(|e| format!("waiting for round trip {trips}: {e}"))?;
        if back != out {
            return Err(format!("round trip {trips} came back as {}, not {}", back[0], out[0]));
        }
        trips += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    stream.shut_write().map_err(|e| format!("shutting down writing: {e}"))?;
    Ok((trips, secs))
}

fn receive(mut stream: impl Read, plan: Plan) -> Result<(u64, u64), String> {
    let mut buf = vec![0u8; plan.chunk];
    let (mut received, mut sum) = (0u64, Sum::new());
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok((received, sum.0)),
            Ok(n) => {
                sum.add(&buf[..n]);
                received += n as u64;
                if !plan.slow.is_zero() {
                    std::thread::sleep(plan.slow);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("receiving after {received} bytes: {e}")),
        }
    }
}

fn vsock_socket() -> Result<std::fs::File, String> {
    // SAFETY: socket takes integers; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket(AF_VSOCK): {} (is vmw_vsock_virtio_transport loaded?)", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd of ours.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn vsock_address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: a zeroed sockaddr_vm is valid; the fields are set below.
    let mut address: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    address.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    address.svm_cid = cid;
    address.svm_port = port;
    address
}

const VM_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn vsock_listen(port: u32, plan: Plan) -> Result<(), Failure> {
    let listener = vsock_socket().map_err(Failure::Io)?;
    let address = vsock_address(libc::VMADDR_CID_ANY, port);
    // SAFETY: a valid sockaddr_vm of VM_LEN bytes that outlives the call.
    if unsafe { libc::bind(listener.as_raw_fd(), (&address as *const libc::sockaddr_vm).cast(), VM_LEN) } < 0 {
        return Err(Failure::Io(format!("binding vsock port {port}: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: listen on our own socket.
    if unsafe { libc::listen(listener.as_raw_fd(), 64) } < 0 {
        return Err(Failure::Io(format!("listening on vsock port {port}: {}", std::io::Error::last_os_error())));
    }
    // For a script waiting to connect (a connection to a port nobody listens on is refused).
    println!("VSOCK-IO listening {port}");
    serve_accepted(&format!("listen-{port}"), plan, || {
        // SAFETY: accept on our own socket, no address wanted.
        let fd = unsafe { libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
        if fd < 0 {
            return Err(Failure::Io(format!("accepting on vsock port {port}: {}", std::io::Error::last_os_error())));
        }
        // SAFETY: a fresh fd of ours.
        let stream = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let writer = stream.try_clone().map_err(|e| Failure::Io(e.to_string()))?;
        Ok((stream, writer))
    })
}

fn vsock_connect(cid: u32, port: u32, plan: Plan) -> Result<(), Failure> {
    let stream = vsock_socket().map_err(Failure::Io)?;
    let address = vsock_address(cid, port);
    // SAFETY: a valid sockaddr_vm of VM_LEN bytes that outlives the call.
    if unsafe { libc::connect(stream.as_raw_fd(), (&address as *const libc::sockaddr_vm).cast(), VM_LEN) } < 0 {
        let why = std::io::Error::last_os_error();
        return Err(Failure::Io(format!("VSOCK-IO connect-{cid}-{port} failed: connect: {why}")));
    }
    let writer = stream.try_clone().map_err(|e| Failure::Io(e.to_string()))?;
    serve(&format!("connect-{cid}-{port}"), stream, writer, plan)
}

/// The host side of the hybrid vsock: `CONNECT PORT\n`, then `OK <host port>\n` back.
fn uds_connect(path: &str, port: u32, plan: Plan) -> Result<(), Failure> {
    let tag = format!("uds-connect-{port}");
    let failed = |why: String| Failure::Io(format!("VSOCK-IO {tag} failed: {why}"));
    let mut stream = UnixStream::connect(path).map_err(|e| failed(format!("connecting to {path}: {e}")))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(|e| failed(format!("CONNECT: {e}")))?;
    let line = read_line(&mut stream).map_err(failed)?;
    if !line.starts_with("OK ") {
        return Err(failed(format!("the answer to CONNECT was '{line}', not OK <port>")));
    }
    let writer = stream.try_clone().map_err(|e| failed(e.to_string()))?;
    serve(&tag, stream, writer, plan)
}

/// Reads up to a newline, one byte at a time (what follows is the stream's).
fn read_line(stream: &mut UnixStream) -> Result<String, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(format!("refused: the socket closed after '{}'", String::from_utf8_lossy(&line))),
            Ok(_) if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) if line.len() > 64 => return Err("an answer line longer than 64 bytes".into()),
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("reading the answer to CONNECT: {e}")),
        }
    }
}

fn uds_listen(path: &str, plan: Plan) -> Result<(), Failure> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| Failure::Io(format!("listening on {path}: {e}")))?;
    serve_accepted("uds-listen", plan, || {
        let (stream, _) = listener.accept().map_err(|e| Failure::Io(format!("accepting on {path}: {e}")))?;
        let writer = stream.try_clone().map_err(|e| Failure::Io(e.to_string()))?;
        Ok((stream, writer))
    })
}

/// TCP, for the user network's bench row: the same patterns, round trips and report lines.
fn tcp_listen(port: u16, plan: Plan) -> Result<(), Failure> {
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| Failure::Io(format!("listening on TCP port {port}: {e}")))?;
    println!("VSOCK-IO listening {port}");
    serve_accepted(&format!("tcp-listen-{port}"), plan, || {
        let (stream, _) = listener.accept().map_err(|e| Failure::Io(format!("accepting on TCP port {port}: {e}")))?;
        tcp_pair(stream)
    })
}

fn tcp_connect(host: &str, port: u16, plan: Plan) -> Result<(), Failure> {
    let tag = format!("tcp-connect-{host}-{port}");
    let stream = TcpStream::connect((host, port)).map_err(|e| Failure::Io(format!("VSOCK-IO {tag} failed: connect: {e}")))?;
    let (stream, writer) = tcp_pair(stream)?;
    serve(&tag, stream, writer, plan)
}

/// A TCP stream and its writing handle, with Nagle off: every round trip's byte leaves at once.
fn tcp_pair(stream: TcpStream) -> Result<(TcpStream, TcpStream), Failure> {
    stream.set_nodelay(true).map_err(|e| Failure::Io(format!("TCP_NODELAY: {e}")))?;
    let writer = stream.try_clone().map_err(|e| Failure::Io(e.to_string()))?;
    Ok((stream, writer))
}

/// Serves `plan.count` connections from `accept`, each on a thread of its own (TAG-i).
fn serve_accepted<S>(tag: &str, plan: Plan, mut accept: impl FnMut() -> Result<(S, S), Failure>) -> Result<(), Failure>
where
    S: Read + Write + Shut + Send + 'static,
{
    let mut workers = Vec::new();
    for i in 0..plan.count {
        let (stream, writer) = accept()?;
        let tag = format!("{tag}-{i}");
        // A failure is said at once (a script waits for each connection's line), not at the end.
        workers.push(std::thread::spawn(move || serve(&tag, stream, writer, plan).map_err(said)));
    }
    join_all(workers)
}

/// Prints a connection's failure now; what is left for join_all is only that it failed.
fn said(failure: Failure) -> Failure {
    let (Failure::Io(why) | Failure::Usage(why)) = failure;
    println!("{why}");
    Failure::Io(String::new())
}

/// Waits for every connection; the first failure is the result (all are printed).
fn join_all(workers: Vec<std::thread::JoinHandle<Result<(), Failure>>>) -> Result<(), Failure> {
    let mut result = Ok(());
    for worker in workers {
        let outcome = worker.join().unwrap_or_else(|_| Err(Failure::Io("a connection's thread panicked".into())));
        if let Err(Failure::Io(why) | Failure::Usage(why)) = &outcome {
            if !why.is_empty() {
                println!("{why}");
            }
        }
        if result.is_ok() {
            result = outcome;
        }
    }
    result.map_err(|_| Failure::Io(String::new()))
}

fn number<T: std::str::FromStr>(text: Option<&String>, what: &str) -> Result<T, Failure> {
    text.and_then(|t| t.parse().ok()).ok_or_else(|| Failure::Usage(format!("expected {what}")))
}

fn run(args: &[String]) -> Result<(), Failure> {
    let mode = args.first().map(String::as_str).unwrap_or("");
    match mode {
        "listen" => vsock_listen(number(args.get(1), "a port")?, parse_plan(&args[2..])?),
        "connect" if args.len() >= 3 => {
            vsock_connect(number(args.get(1), "a CID")?, number(args.get(2), "a port")?, parse_plan(&args[3..])?)
        }
        "uds-connect" if args.len() >= 3 => uds_connect(&args[1], number(args.get(2), "a port")?, parse_plan(&args[3..])?),
        "uds-listen" if args.len() >= 2 => uds_listen(&args[1], parse_plan(&args[2..])?),
        "tcp-listen" => tcp_listen(number(args.get(1), "a port")?, parse_plan(args.get(2..).unwrap_or_default())?),
        "tcp-connect" if args.len() >= 3 => tcp_connect(&args[1], number(args.get(2), "a port")?, parse_plan(&args[3..])?),
        "pattern-sum" => {
            let bytes = parse_bytes(args.get(1).map_or("", String::as_str))?;
            println!("{:016x}", pattern_sum(bytes));
            Ok(())
        }
        "rate" if args.len() == 2 => {
            println!("{}", rate(&args[1]).map_err(Failure::Io)?);
            Ok(())
        }
        _ => Err(Failure::Usage(String::new())),
    }
}

/// The MiB/s of a receiver's report line (`... received=N sum=X ms=T`), one decimal, if
/// what it received was the pattern: a corrupted or failed transfer is said, never timed.
fn rate(line: &str) -> Result<String, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    let field = |key: &str| line.split(' ').find_map(|word| word.strip_prefix(key)?.strip_prefix('='));
    let (Some(received), Some(sum), Some(ms)) = (field("received"), field("sum"), field("ms")) else {
        return Err(format!("the transfer failed: {line}"));
    };
    let (Ok(received), Ok(sum), Ok(ms)) = (received.parse::<u64>(), u64::from_str_radix(sum, 16), ms.parse::<u64>()) else {
        return Err(format!("not a report line: {line}"));
    };
    // The checksum is redone over every byte: a report claiming more than a run can move is not.
    if received > 64 << 30 {
        return Err(format!("{received} bytes is more than any run moves: not a report line"));
    }
    if sum != pattern_sum(received) {
        return Err(format!("{received} bytes arrived corrupted (not the pattern that was sent)"));
    }
    if received == 0 || ms == 0 {
        return Err(format!("nothing to time: {received} bytes in {ms} ms"));
    }
    Ok(format!("{:.1}", received as f64 / 1_048_576.0 / (ms as f64 / 1000.0)))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => {}
        Err(Failure::Usage(why)) => {
            if !why.is_empty() {
                eprintln!("vsock-io: {why}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
        Err(Failure::Io(why)) => {
            if !why.is_empty() {
                println!("{why}");
            }
            std::process::exit(3);
        }
    }
}
