//! stopwatch: time a command and the moments its output shows given markers.
//!
//! ```text
//! stopwatch [--marker STR]... [--label NAME] -- CMD ARGS...
//! ```
//!
//! Spawns CMD (stdin and stderr inherited), copies its stdout through unchanged, and
//! notes for each marker the milliseconds from just before the spawn to the moment the
//! first line containing it arrived. At exit it prints to stderr
//!
//! ```text
//! STOPWATCH label=NAME marker=STR ms=N        (ms=none if it never showed)
//! STOPWATCH label=NAME exit ms=N status=S maxrss_kib=K
//! ```
//!
//! where `maxrss_kib` is the child's peak RSS (from `wait4`'s rusage) and `status` its
//! exit code (128+N if killed by signal N), which is also stopwatch's own exit status.
//! SIGINT and SIGQUIT (Ctrl-C) are left to the command; SIGTERM and SIGHUP are passed
//! on to it, and then stopwatch exits with 128+N whatever the command's status (which
//! the report still shows): `timeout` works around it, even busybox's, which signals
//! only its own child. It is used in the lab, so it needs nothing but libc.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, PartialEq, Eq)]
struct Options {
    markers: Vec<String>,
    label: String,
    command: Vec<String>,
}

fn usage() -> String {
    "usage: stopwatch [--marker STR]... [--label NAME] -- CMD ARGS...".to_string()
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut markers = Vec::new();
    let mut label = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--marker" => match it.next() {
                Some(m) if !m.is_empty() => markers.push(m.clone()),
                _ => return Err("--marker needs a non-empty STR".into()),
            },
            "--label" => label = Some(it.next().ok_or("--label needs a NAME")?.clone()),
            "--" => break,
            _ => return Err(format!("unexpected argument {arg:?}\n{}", usage())),
        }
    }
    let command: Vec<String> = it.cloned().collect();
    let Some(program) = command.first() else {
        return Err(format!("no command given\n{}", usage()));
    };
    // Default label: the command's file name.
    let label = label.unwrap_or_else(|| program.rsplit('/').next().unwrap_or(program).to_string());
    Ok(Options {
        markers,
        label,
        command,
    })
}

/// Watches a byte stream for markers, line by line. Bytes are fed in arbitrary chunks;
/// a marker counts once the bytes of it have arrived on a line, even before that line's
/// newline, so a prompt without one is seen too.
struct MarkerScanner {
    markers: Vec<Vec<u8>>,
    found: Vec<Option<Duration>>,
    /// The current line's bytes so far (only the tail that can still start a match is kept).
    line: Vec<u8>,
    longest: usize,
}

impl MarkerScanner {
    fn new(markers: &[String]) -> Self {
        MarkerScanner {
            markers: markers.iter().map(|m| m.as_bytes().to_vec()).collect(),
            found: vec![None; markers.len()],
            line: Vec::new(),
            longest: markers.iter().map(|m| m.len()).max().unwrap_or(0),
        }
    }

    /// Feeds a chunk that arrived `at` after the start.
    fn feed(&mut self, chunk: &[u8], at: Duration) {
        if self.markers.is_empty() {
            return;
        }
        for piece in chunk.split_inclusive(|&b| b == b'\n') {
            self.line.extend_from_slice(piece);
            for (marker, found) in self.markers.iter().zip(self.found.iter_mut()) {
                if found.is_none() && contains(&self.line, marker) {
                    *found = Some(at);
                }
            }
            if piece.ends_with(b"\n") {
                self.line.clear();
            } else if self.line.len() >= self.longest {
                // Keep only what could be the beginning of a marker split across chunks.
                let keep = self.longest.saturating_sub(1);
                self.line.drain(..self.line.len() - keep);
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Copies `input` to `output` chunk by chunk (as soon as bytes arrive, so a prompt shows),
/// feeding the scanner with the time since `start`. Ends at EOF, or once `exited` is set
/// and nothing more arrives for a moment: a grandchild that kept the pipe open must not
/// keep us waiting after the command itself is gone.
fn pump(
    mut input: impl Read + AsRawFd,
    mut output: impl Write,
    start: Instant,
    scanner: &Mutex<MarkerScanner>,
    exited: &AtomicBool,
) -> io::Result<()> {
    let mut buf = [0u8; 8192];
    let mut output_ok = true;
    loop {
        let mut pfd = libc::pollfd {
            fd: input.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd, and we pass a count of 1.
        let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
        if ready == 0 {
            if exited.load(Ordering::Acquire) {
                return Ok(());
            }
            continue;
        }
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let at = start.elapsed();
        if let Ok(mut s) = scanner.lock() {
            s.feed(&buf[..n], at);
        }
        // If our stdout goes away, keep draining the child so it doesn't block.
        if output_ok {
            output_ok = output
                .write_all(&buf[..n])
                .and_then(|()| output.flush())
                .is_ok();
        }
    }
}

struct Exit {
    elapsed: Duration,
    status: i32,
    maxrss_kib: i64,
}

/// Waits for `pid` with wait4, for its rusage. Returns the shell-style status.
fn wait_child(pid: libc::pid_t, start: Instant) -> io::Result<Exit> {
    let mut status: libc::c_int = 0;
    // SAFETY: all-zero is a valid `rusage` (plain integers and timevals).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `usage` are valid for writes; `pid` is our own child,
        // which nothing else waits for.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    let elapsed = start.elapsed();
    let status = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        255
    };
    Ok(Exit {
        elapsed,
        status,
        maxrss_kib: usage.ru_maxrss,
    })
}

/// The child's pid, for the signal handler (0: none yet).
static CHILD: AtomicI32 = AtomicI32::new(0);
/// The SIGTERM/SIGHUP we were sent, if any (0: none).
static STOPPED_BY: AtomicI32 = AtomicI32::new(0);

/// Passes SIGTERM/SIGHUP on to the child: `timeout` (busybox's kills only its own child)
/// or a test harness stopping stopwatch then stops the command, and we still report.
extern "C" fn forward_signal(sig: libc::c_int) {
    STOPPED_BY.store(sig, Ordering::Relaxed);
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe and takes no pointers.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Runs the command, copying its stdout to `output`; returns the report lines and status.
fn run(opts: &Options, output: impl Write + Send + 'static) -> io::Result<(Vec<String>, i32)> {
    let mut cmd = Command::new(&opts.command[0]);
    cmd.args(&opts.command[1..])
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: the closure only calls signal(2), which is async-signal-safe. It undoes,
    // in the child, the signal set-up below (ignored signals survive exec; handlers
    // are reset by exec, but one could run between fork and exec).
    unsafe {
        cmd.pre_exec(|| {
            for sig in [libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGHUP] {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        });
    }

    let scanner = Arc::new(Mutex::new(MarkerScanner::new(&opts.markers)));
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let pid = libc::pid_t::try_from(child.id()).map_err(io::Error::other)?;
    CHILD.store(pid, Ordering::Relaxed);
    // Like time(1): Ctrl-C is for the child; we stay to report how it ended.
    // SAFETY: SIG_IGN, and a handler that only calls the async-signal-safe kill(2).
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        let handler = forward_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGHUP, handler);
    }
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("no child stdout"))?;
    let pump_scanner = Arc::clone(&scanner);
    let exited = Arc::new(AtomicBool::new(false));
    let pump_exited = Arc::clone(&exited);
    let reader =
        std::thread::spawn(move || pump(stdout, output, start, &pump_scanner, &pump_exited));

    let exit = wait_child(pid, start);
    exited.store(true, Ordering::Release);
    let exit = exit?;
    // The child is gone: the reader drains what it wrote, then stops.
    match reader.join() {
        Ok(r) => r?,
        Err(_) => return Err(io::Error::other("output thread panicked")),
    }

    let scanner = scanner
        .lock()
        .map_err(|_| io::Error::other("scanner lock poisoned"))?;
    let mut report: Vec<String> = opts
        .markers
        .iter()
        .zip(&scanner.found)
        .map(|(m, found)| {
            // Read after the exit, a marker was still written before it.
            let ms = found.map_or("none".to_string(), |d| {
                d.min(exit.elapsed).as_millis().to_string()
            });
            format!("STOPWATCH label={} marker={m} ms={ms}", opts.label)
        })
        .collect();
    report.push(format!(
        "STOPWATCH label={} exit ms={} status={} maxrss_kib={}",
        opts.label,
        exit.elapsed.as_millis(),
        exit.status,
        exit.maxrss_kib
    ));
    Ok((report, exit.status))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("stopwatch: {e}");
            std::process::exit(2);
        }
    };
    match run(&opts, io::stdout()) {
        Ok((report, status)) => {
            let mut err = io::stderr().lock();
            for line in report {
                let _ = writeln!(err, "{line}");
            }
            // Stopped by a signal (a timeout): say so in our status even if the command
            // exited 0 on it (QEMU does), so `timeout N stopwatch ...` fails as expected.
            match STOPPED_BY.load(Ordering::Relaxed) {
                0 => std::process::exit(status),
                sig => std::process::exit(128 + sig),
            }
        }
        Err(e) => {
            eprintln!("stopwatch: {}: {e}", opts.command[0]);
            std::process::exit(127);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn parses_markers_label_and_command() {
        let o = parse_args(&args(&[
            "--marker", "A", "--label", "q", "--marker", "B C", "--", "echo", "--marker",
        ]))
        .expect("valid arguments");
        assert_eq!(o.markers, ["A", "B C"]);
        assert_eq!(o.label, "q");
        assert_eq!(o.command, ["echo", "--marker"]);
        let o = parse_args(&args(&["--", "/usr/bin/true"])).expect("valid arguments");
        assert_eq!(o.label, "true");
        assert!(parse_args(&args(&["--marker", "A"])).is_err());
        assert!(parse_args(&args(&["echo"])).is_err());
    }

    #[test]
    fn finds_markers_split_across_chunks_once() {
        let mut s = MarkerScanner::new(&args(&["GUEST-INIT", "DONE"]));
        let ms = Duration::from_millis;
        s.feed(b"boot\nLGUEST-GU", ms(1));
        assert_eq!(s.found, [None, None]);
        s.feed(b"EST-INIT\nDO", ms(2));
        s.feed(b"NE", ms(3));
        s.feed(b"\nGUEST-INIT DONE\n", ms(4));
        assert_eq!(s.found, [Some(ms(2)), Some(ms(3))]);
        // A marker must be within one line.
        let mut s = MarkerScanner::new(&args(&["AB"]));
        s.feed(b"A\nB\n", ms(1));
        assert_eq!(s.found, [None]);
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn copies_output_and_reports_markers_status_and_rss() {
        let opts = parse_args(&args(&[
            "--label",
            "t",
            "--marker",
            "two",
            "--marker",
            "never",
            "--",
            "sh",
            "-c",
            "echo one; sleep 0.2; printf 'two\\nthree'; exit 3",
        ]))
        .expect("valid arguments");
        let sink = Sink::default();
        let (report, status) = run(&opts, sink.clone()).expect("sh runs");
        assert_eq!(status, 3);
        assert_eq!(
            sink.0.lock().expect("not poisoned").as_slice(),
            b"one\ntwo\nthree"
        );
        let ms: u64 = report[0]
            .strip_prefix("STOPWATCH label=t marker=two ms=")
            .and_then(|m| m.parse().ok())
            .expect("marker two was seen");
        assert!(ms >= 200, "{report:?}");
        assert_eq!(report[1], "STOPWATCH label=t marker=never ms=none");
        let exit = &report[2];
        assert!(exit.starts_with("STOPWATCH label=t exit ms="), "{exit}");
        assert!(exit.contains(" status=3 maxrss_kib="), "{exit}");
        let rss: i64 = exit
            .rsplit('=')
            .next()
            .and_then(|k| k.parse().ok())
            .expect("a number");
        assert!(rss > 0, "{exit}");
    }

    #[test]
    fn reports_death_by_signal_as_128_plus_signal() {
        let opts =
            parse_args(&args(&["--", "sh", "-c", "kill -TERM $$"])).expect("valid arguments");
        let (_, status) = run(&opts, Sink::default()).expect("sh runs");
        assert_eq!(status, 128 + libc::SIGTERM);
    }
}
