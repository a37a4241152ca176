//! exit-cost: nanoseconds per guest exit, lguest's whole path against the bare floor.
//!
//! ```text
//! exit-cost [--exits N] [--runs R] [--lguest PATH] [--row NAME]
//! ```
//!
//! A tiny guest signals lguest's boot timer, writes N times (default 20000) to one I/O port,
//! then resets; the clock runs from the signal to the reset. Two guests:
//! one writes to a port no device claims (`unhandled-port`), one to COM1's scratch register
//! (`device-port`: through the bus to the UART). Each runs R times (default 3) under
//!
//! - `bare`: this program's own minimal `KVM_RUN` loop (see [`bench_tools::bare`]), timed
//!   around its `KVM_RUN`s;
//! - `lguest`: `lguest run --kernel tiny.elf --boot-timeline` (with `--lguest PATH`): the
//!   time from its "guest signalled the boot timer" to "VM stopped", over N.
//!
//! Each measurement is two runs, of N exits and of 1, and the answer is their difference over
//! N - 1: what stays the same (the reset, lguest's wake-up of its main thread and tear-down,
//! a few ms on a PVM host) cancels out, and what is left is N - 1 trips through the loop,
//! each one `out` plus the guest's two loop instructions. Prints one line per measurement:
//! ```text
//! BENCH row=NAME vmm=bare|lguest metric=unhandled-port|device-port value=NS unit=ns
//! ```
//!
//! Exits 1 with a message on the first failure (no /dev/kvm, lguest failed, ...).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bench_tools::{bare, elf64, exit_loop_code, Timeline, DEVICE_PORT, LOAD_ADDR, UNHANDLED_PORT};

struct Options {
    exits: u32,
    runs: u32,
    lguest: Option<PathBuf>,
    row: String,
}

const USAGE: &str = "usage: exit-cost [--exits N] [--runs R] [--lguest PATH] [--row NAME]";

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut options = Options { exits: 20_000, runs: 3, lguest: None, row: "exits".into() };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value\n{USAGE}"));
        let number = |text: &String, min: u32| -> Result<u32, String> {
            text.parse().ok().filter(|&n| n >= min).ok_or_else(|| format!("{arg}: '{text}' is not a number of at least {min}"))
        };
        match arg.as_str() {
            "--exits" => options.exits = number(value()?, 2)?,
            "--runs" => options.runs = number(value()?, 1)?,
            "--lguest" => options.lguest = Some(PathBuf::from(value()?)),
            "--row" => options.row = value()?.clone(),
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unexpected argument '{arg}'\n{USAGE}")),
        }
    }
    Ok(options)
}

/// One bare run: the time from the signal to the reset.
fn bare_time(code: &[u8], exits: u32) -> Result<Duration, String> {
    let run = bare::run(code, u64::from(exits) + 10)?;
    if run.io_exits < u64::from(exits) {
        return Err(format!("bare: expected {exits} exits, saw {}", run.io_exits));
    }
    Ok(run.elapsed)
}

/// One lguest run of the tiny guest in `elf`: the time from the signal to "VM stopped",
/// from lguest's own timeline.
fn lguest_time(lguest: &Path, elf: &Path, exits: u32) -> Result<Duration, String> {
    let limit = Duration::from_secs(120);
    let mut child = Command::new(lguest)
        .args(["run", "--memory", "32M", "--boot-timeline", "--kernel"])
        .arg(elf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", lguest.display()))?;
    let stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr));
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("lguest did not finish the tiny guest within {limit:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("waiting for lguest: {e}")),
        }
    };
    let report = reader.join().map_err(|_| "stderr reader panicked")?.map_err(|e| format!("reading lguest's stderr: {e}"))?;
    if !status.success() {
        return Err(format!("lguest exited with {status} on the tiny guest:\n{report}"));
    }
    let timeline = Timeline::parse(&report).map_err(|e| format!("{e}:\n{report}"))?;
    if timeline.port_out_exits < u64::from(exits) {
        return Err(format!("lguest: expected {exits} port writes, saw {}", timeline.port_out_exits));
    }
    let ms = (timeline.stopped_ms - timeline.guest_signal_ms).max(0.0);
    Ok(Duration::from_secs_f64(ms / 1000.0))
}

/// ns per exit from a run of `exits` and a run of one.
fn per_exit(long: Duration, short: Duration, exits: u32) -> f64 {
    (long.as_secs_f64() - short.as_secs_f64()) * 1e9 / f64::from(exits - 1)
}

fn run(options: &Options) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("exit-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let result = (|| {
        let n = options.exits;
        for (metric, port) in [("unhandled-port", UNHANDLED_PORT), ("device-port", DEVICE_PORT)] {
            let (long, short) = (exit_loop_code(port, n)?, exit_loop_code(port, 1)?);
            let elf = |name: &str, code: &[u8]| {
                let path = dir.join(format!("{metric}-{name}.elf"));
                std::fs::write(&path, elf64(code, LOAD_ADDR)).map_err(|e| format!("writing {}: {e}", path.display()))?;
                Ok::<_, String>(path)
            };
            let (long_elf, short_elf) = (elf("long", &long)?, elf("short", &short)?);
            // Alternate the two, so a noisy moment on the host hits both alike.
            for _ in 0..options.runs {
                let ns = per_exit(bare_time(&long, n)?, bare_time(&short, 1)?, n);
                println!("BENCH row={} vmm=bare metric={metric} value={ns:.0} unit=ns", options.row);
                if let Some(lguest) = &options.lguest {
                    let ns = per_exit(lguest_time(lguest, &long_elf, n)?, lguest_time(lguest, &short_elf, 1)?, n);
                    println!("BENCH row={} vmm=lguest metric={metric} value={ns:.0} unit=ns", options.row);
                }
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
