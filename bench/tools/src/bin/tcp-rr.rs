//! tcp-rr: the 1-byte request/response rate of a TCP connection (what netperf's TCP_RR
//! measures, which iperf3 can't).
//!
//! ```text
//! tcp-rr server PORT               echo every byte back, on every connection, until killed
//! tcp-rr client ADDR:PORT SECONDS  send 1 byte, wait for it to come back, again and again
//! ```
//!
//! The client prints one number: round trips per second. Both ends set TCP_NODELAY, so each
//! byte is a packet each way: the rate is the inverse of the round-trip latency through the
//! guest's network stack, the VMM's virtio-net and the host's tap. Reads and writes time out
//! after 5 s, so a dead peer ends the client with an error instead of a hang. Built static
//! (bench/run.sh), it runs in the lab and in the guest alike.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: tcp-rr server PORT | tcp-rr client ADDR:PORT SECONDS";
const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn serve(port: u16) -> Result<(), String> {
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("listening on port {port}: {e}"))?;
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                std::thread::spawn(move || echo(stream));
            }
            Err(e) => eprintln!("tcp-rr: accept: {e}"),
        }
    }
    Ok(())
}

/// Sends back whatever arrives, until the peer closes (or an error: it is the client's job
/// to report those).
fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn client(addr: SocketAddr, seconds: f64) -> Result<f64, String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("connecting to {addr}: {e}"))?;
    let setup = |r: std::io::Result<()>| r.map_err(|e| format!("setting up the socket: {e}"));
    setup(stream.set_nodelay(true))?;
    setup(stream.set_read_timeout(Some(IO_TIMEOUT)))?;
    setup(stream.set_write_timeout(Some(IO_TIMEOUT)))?;
    let length = Duration::from_secs_f64(seconds);
    let mut byte = [b'x'];
    let mut trips = 0u64;
    let start = Instant::now();
    while start.elapsed() < length {
        stream.write_all(&byte).map_err(|e| format!("sending: {e}"))?;
        stream.read_exact(&mut byte).map_err(|e| format!("receiving: {e}"))?;
        trips += 1;
    }
    Ok(trips as f64 / start.elapsed().as_secs_f64())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["server", port] => match port.parse() {
            Ok(port) => serve(port),
            Err(_) => Err(format!("'{port}' is not a port number")),
        },
        ["client", addr, seconds] => match (addr.parse(), seconds.parse::<f64>()) {
            (Ok(addr), Ok(s)) if s > 0.0 && s.is_finite() => client(addr, s).map(|rate| println!("{rate:.0}")),
            _ => Err(format!("want ADDR:PORT (e.g. 169.254.100.1:5202) and SECONDS, got '{addr}' '{seconds}'")),
        },
        _ => Err(USAGE.to_string()),
    };
    if let Err(message) = result {
        eprintln!("tcp-rr: {message}");
        std::process::exit(1);
    }
}
