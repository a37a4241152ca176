//! exit-cost: nanoseconds per guest exit, lguest's whole path against the bare floor.
//!
//! ```text
//! exit-cost [--exits N] [--runs R] [--lguest PATH] [--row NAME]
//! ```
//!
//! A tiny guest (see [`bench_tools::exit_loop_code`]) writes N times (default 20000) to one
//! I/O port, timing the loop with its own time-stamp counter, and prints the ticks on COM1.
//! Two guests: one writes to a port no device claims (`unhandled-port`), one to COM1's
//! scratch register (`device-port`: through lguest's bus to the UART). Each runs R times
//! (default 3) under
//!
//! - `bare`: this program's own minimal `KVM_RUN` loop (see [`bench_tools::bare`]);
//! - `lguest`: `lguest run --kernel tiny.elf` (with `--lguest PATH`).
//!
//! ns per exit = the guest's ticks / the TSC's ticks per ns (measured here, on the host side
//! of the VM: KVM gives the guest the host's TSC rate) / N. It counts the world switch both
//! ways, the VMM's handling, and the guest's two loop instructions; nothing around the loop
//! (process start, VM set-up, the first entry, tear-down) is in it. Each run also tells the
//! VMM's start-up: from the first instruction of its `main` to its first `KVM_RUN`, with
//! 256 MiB of guest memory (lguest's `--boot-timeline`; the bare loop's own clock). Prints
//! two lines per run:
//!
//! ```text
//! BENCH row=NAME vmm=bare|lguest metric=unhandled-port|device-port value=NS unit=ns
//! BENCH row=NAME vmm=bare|lguest metric=startup value=MS unit=ms
//! ```
//!
//! Every run is a child process with a deadline (the bare loop runs in a second copy of this
//! program, `--bare-child`), so a guest that hangs is killed, not waited for. A run that fails
//! is tried once more; failing again, it becomes a `BENCH-NOTE row=NAME ...` line and the
//! others go on. Exits 1 only when nothing can start (no temporary directory, ...), 2 for a
//! bad command line.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bench_tools::{bare, elf64, exit_loop_code, tsc_report, DEVICE_PORT, LOAD_ADDR, UNHANDLED_PORT};

struct Options {
    exits: u32,
    runs: u32,
    lguest: Option<PathBuf>,
    row: String,
}

const USAGE: &str = "usage: exit-cost [--exits N] [--runs R] [--lguest PATH] [--row NAME]";

/// How long one run of the tiny guest may take, under either VMM, before it counts as hung
/// (the lab's nested virtualization hangs a guest now and then; a run takes seconds).
const RUN_LIMIT: Duration = Duration::from_secs(60);

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut options = Options { exits: 20_000, runs: 3, lguest: None, row: "exits".into() };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value\n{USAGE}"));
        let number = |text: &String| -> Result<u32, String> {
            text.parse().ok().filter(|&n| n > 0).ok_or_else(|| format!("{arg}: '{text}' is not a positive number"))
        };
        match arg.as_str() {
            "--exits" => options.exits = number(value()?)?,
            "--runs" => options.runs = number(value()?)?,
            "--lguest" => options.lguest = Some(PathBuf::from(value()?)),
            "--row" => options.row = value()?.clone(),
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unexpected argument '{arg}'\n{USAGE}")),
        }
    }
    Ok(options)
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter; every x86-64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The TSC's ticks per nanosecond, against the monotonic clock over 200 ms.
fn tsc_ticks_per_ns() -> Result<f64, String> {
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(200));
    let (c1, ns) = (rdtsc(), t0.elapsed().as_nanos() as f64);
    let rate = c1.wrapping_sub(c0) as f64 / ns;
    if rate.is_finite() && rate > 0.01 {
        Ok(rate)
    } else {
        Err(format!("the TSC does not tick usefully here ({rate} per ns)"))
    }
}

/// Runs `command` to its end with no stdin, its output collected; kills it after `limit`.
fn run_child(mut command: Command, what: &str, limit: Duration) -> Result<(ExitStatus, String, String), String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    let (stdout, stderr) = (child.stdout.take().ok_or("no stdout pipe")?, child.stderr.take().ok_or("no stderr pipe")?);
    let out_reader = std::thread::spawn(move || std::io::read_to_string(stdout));
    let err_reader = std::thread::spawn(move || std::io::read_to_string(stderr));
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} did not finish the tiny guest within {limit:?} (killed)"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("waiting for {what}: {e}")),
        }
    };
    let read = |r: std::thread::JoinHandle<std::io::Result<String>>| {
        r.join().map_err(|_| "output reader panicked".to_string())?.map_err(|e| format!("reading {what}'s output: {e}"))
    };
    Ok((status, read(out_reader)?, read(err_reader)?))
}

/// What one run of the tiny guest tells.
struct Sample {
    /// The guest's ticks for its loop.
    ticks: u64,
    /// The VMM's main → first KVM_RUN, in ms.
    start_up_ms: f64,
}

/// A run's [`Sample`], from a VMM's console output (the guest's `TSC <hex>` line) and its
/// stderr (a `<ms> first KVM_RUN` line, as lguest's boot timeline and the bare child print it).
fn sample(what: &str, status: ExitStatus, stdout: &str, stderr: &str) -> Result<Sample, String> {
    if !status.success() {
        return Err(format!("{what} exited with {status}: {}", stderr.trim()));
    }
    let ticks = tsc_report(stdout.as_bytes())
        .ok_or_else(|| format!("no 'TSC <hex>' line from the guest under {what}: '{}'", stdout.trim()))?;
    let start_up_ms = stderr
        .lines()
        .find(|line| line.contains("first KVM_RUN"))
        .and_then(|line| line.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no 'first KVM_RUN' time from {what}: '{}'", stderr.trim()))?;
    Ok(Sample { ticks, start_up_ms })
}

/// One bare run, in a child process (`exit-cost --bare-child`, see [`bare_child`]) so that a
/// guest hung inside KVM_RUN can be killed.
fn bare_run(port: u16, exits: u32) -> Result<Sample, String> {
    let me = std::env::current_exe().map_err(|e| format!("finding exit-cost itself: {e}"))?;
    let mut command = Command::new(me);
    command.args(["--bare-child", &port.to_string(), &exits.to_string()]);
    let (status, stdout, stderr) = run_child(command, "the bare loop", RUN_LIMIT)?;
    sample("the bare loop", status, &stdout, &stderr)
}

/// `exit-cost --bare-child PORT EXITS`: runs the tiny guest once in the bare loop, prints
/// what it wrote to COM1, and its start-up since `started` on stderr.
fn bare_child(port: &str, exits: &str, started: Instant) -> Result<(), String> {
    let port = port.parse().map_err(|_| format!("bad port '{port}'"))?;
    let exits: u32 = exits.parse().map_err(|_| format!("bad count '{exits}'"))?;
    let run = bare::run(&exit_loop_code(port, exits)?, u64::from(exits) + 100, started)?;
    if run.io_exits < u64::from(exits) {
        return Err(format!("expected {exits} exits, saw {}", run.io_exits));
    }
    print!("{}", String::from_utf8_lossy(&run.console));
    eprintln!("{:.3} first KVM_RUN", run.start_up.as_secs_f64() * 1000.0);
    Ok(())
}

/// One lguest run of the tiny guest in `elf`.
fn lguest_run(lguest: &Path, elf: &Path) -> Result<Sample, String> {
    let mut command = Command::new(lguest);
    command.args(["run", "--memory", "256M", "--boot-timeline", "--kernel"]).arg(elf);
    let (status, stdout, stderr) = run_child(command, "lguest", RUN_LIMIT)?;
    sample("lguest", status, &stdout, &stderr)
}

/// Tries `measure` twice and prints the sample's lines; a second failure becomes a BENCH-NOTE
/// line, and the run goes on.
fn measure_or_note(row: &str, vmm: &str, metric: &str, ns: impl Fn(u64) -> f64, measure: impl Fn() -> Result<Sample, String>) {
    let result = measure().or_else(|first| {
        eprintln!("exit-cost: {vmm} {metric}: {first}; once more");
        measure()
    });
    match result {
        Ok(sample) => {
            println!("BENCH row={row} vmm={vmm} metric={metric} value={:.0} unit=ns", ns(sample.ticks));
            println!("BENCH row={row} vmm={vmm} metric=startup value={:.3} unit=ms", sample.start_up_ms);
        }
        Err(e) => println!("BENCH-NOTE row={row} {vmm} {metric}: failed twice, the second time: {}", e.replace('\n', " ")),
    }
}

fn run(options: &Options) -> Result<(), String> {
    let per_ns = tsc_ticks_per_ns()?;
    let dir = std::env::temp_dir().join(format!("exit-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let result = (|| {
        let (n, row) = (options.exits, options.row.as_str());
        let ns = |ticks: u64| ticks as f64 / per_ns / f64::from(n);
        for (metric, port) in [("unhandled-port", UNHANDLED_PORT), ("device-port", DEVICE_PORT)] {
            let elf = dir.join(format!("{metric}.elf"));
            std::fs::write(&elf, elf64(&exit_loop_code(port, n)?, LOAD_ADDR))
                .map_err(|e| format!("writing {}: {e}", elf.display()))?;
            // Alternate the two, so a noisy moment on the host hits both alike.
            for _ in 0..options.runs {
                measure_or_note(row, "bare", metric, ns, || bare_run(port, n));
                if let Some(lguest) = &options.lguest {
                    measure_or_note(row, "lguest", metric, ns, || lguest_run(lguest, &elf));
                }
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn main() {
    let started = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, port, exits] = args.as_slice() {
        if flag == "--bare-child" {
            if let Err(message) = bare_child(port, exits, started) {
                eprintln!("exit-cost: {message}");
                std::process::exit(1);
            }
            return;
        }
    }
    let options = match parse_args(&args) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("exit-cost: {message}");
            std::process::exit(2);
        }
    };
    if let Err(message) = run(&options) {
        eprintln!("exit-cost: {message}");
        std::process::exit(1);
    }
}
