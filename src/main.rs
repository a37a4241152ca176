//! `lguest`: the command line, a VM built from it, and the guest's fate as our exit status.
//!
//! 0: the guest powered off or reset itself (or the user quit); 1: the guest died (a report
//! says how) or the host failed (KVM, memory, threads: a line says what); 2: the request was
//! wrong (a line says what to change); 3: the guest's kernel panicked; 128+N: signal N.
//!
//! Run under the name `firecracker` (a symlink), it takes Firecracker's command line, as
//! `lguest firecracker` does (see [`lguest::firecracker`]).

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use lguest::api::{self, instance::Instance, server};
use lguest::bus::lock;
use lguest::config::{Cli, Command, RunArgs, VmConfig};
use lguest::snapshot::restore::RestoreArgs;
use lguest::vm::Origin;
use lguest::docs::{self, DocsError};
use lguest::error::{Error, Result};
use lguest::{firecracker, seccomp, session, terminal};
use lguest::stop::StopReason;
use lguest::timeline::{Milestone, Timeline};

fn main() -> ExitCode {
    if lguest::exec::guest::is_guest_init() {
        lguest::exec::guest::main(); // we are the init of an `lguest exec` guest
    }
    let timeline = Arc::new(Timeline::new(Instant::now()));
    api::logger::init("warn");
    let command = match parse_command_line() {
        Ok(Cli { command: Command::Completions { shell } }) => {
            docs::completions(shell, &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Ok(Cli { command: Command::Man { command } }) => return print_man_page(command.as_deref()),
        Ok(Cli { command }) => command,
        Err(error) => return command_line_error(error),
    };
    let result = match command {
        Command::Run(args) => run(args, timeline.clone()),
        Command::Restore(args) => restore(&args, timeline.clone()),
        Command::Firecracker(args) if args.version => {
            print!("{}", firecracker::version_text());
            return ExitCode::SUCCESS;
        }
        Command::Firecracker(args) => {
            firecracker::run(args, timeline.clone()).map(|reason| (reason, TimelineReport::default()))
        }
        Command::Exec(args) => {
            let status = lguest::exec::run(args, timeline.clone());
            terminal::restore_terminal();
            return match status {
                Ok(status) => ExitCode::from(status),
                Err(error) => {
                    eprintln!("lguest: {error}");
                    ExitCode::from(error.exit_code())
                }
            };
        }
        Command::RebaseSnap(args) => return rebase_snap(&args),
        Command::Completions { .. } | Command::Man { .. } => return ExitCode::SUCCESS, // answered above
    };
    timeline.mark(Milestone::Stopped);
    terminal::restore_terminal();
    match result {
        Ok((reason, timeline_report)) => {
            report(&reason);
            timeline_report.give(&timeline);
            ExitCode::from(reason.exit_code())
        }
        Err(error) => {
            eprintln!("lguest: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// `lguest rebase-snap`: the diff merged onto the base, or one line saying why not.
fn rebase_snap(args: &lguest::snapshot::rebase::RebaseArgs) -> ExitCode {
    match args.run() {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lguest: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

fn print_man_page(command: Option<&str>) -> ExitCode {
    match docs::man_page(command, &mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error @ DocsError::NoSuchCommand(_)) => {
            eprintln!("lguest: {error}");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("lguest: {error}");
            ExitCode::from(1)
        }
    }
}

/// `lguest ...`, or Firecracker's flags alone when we were started as `firecracker`.
fn parse_command_line() -> std::result::Result<Cli, clap::Error> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invoked_as = args.first().map(std::path::Path::new).and_then(|p| p.file_name()).map(|n| n.to_os_string());
    if invoked_as.as_deref() == Some(std::ffi::OsStr::new("firecracker")) {
        args.insert(1, "firecracker".into());
    }
    Cli::try_parse_from(args)
}

/// What `--boot-timeline` asked for once the VM has stopped: the report on stderr, and the
/// Chrome trace written to a file that was created before the boot (so a path that can't be
/// written is a bad request, found before the guest runs, not after).
#[derive(Default)]
struct TimelineReport {
    print: bool,
    trace: Option<(PathBuf, File)>,
}

impl TimelineReport {
    fn for_config(config: &VmConfig) -> Result<TimelineReport> {
        let trace = match &config.boot_trace {
            Some(path) => Some((path.clone(), File::create(path).map_err(|e| Error::BadFlag {
                flag: "--boot-timeline",
                value: path.display().to_string(),
                why: format!("cannot create the trace file: {e}"),
            })?)),
            None => None,
        };
        Ok(TimelineReport { print: config.boot_timeline, trace })
    }

    fn give(self, timeline: &Timeline) {
        if self.print {
            eprintln!("lguest: {timeline}");
        }
        if let Some((path, file)) = self.trace {
            if let Err(e) = timeline.write_chrome_trace(std::io::BufWriter::new(file)) {
                eprintln!("lguest: cannot write the boot trace '{}': {e}", path.display());
            }
        }
    }
}

/// `lguest run`: the VM from the flags (or `--config-file`), and the API beside it when
/// `--api-sock` is given. The API starts after the guest, so it costs the boot nothing.
fn run(args: RunArgs, timeline: Arc<Timeline>) -> Result<(StopReason, TimelineReport)> {
    let api_sock = args.api_sock.clone();
    let config = VmConfig::from_args(args)?;
    serve(&config, Origin::Boot, api_sock, timeline)
}

/// `lguest restore`: the saved guest, run as `lguest run` runs one.
fn restore(args: &RestoreArgs, timeline: Arc<Timeline>) -> Result<(StopReason, TimelineReport)> {
    let restore = args.load()?;
    serve(&restore.snapshot.config, restore.origin(), args.api_sock.clone(), timeline)
}

/// Runs the guest `origin` gives, with the API on `api_sock` if there is one.
fn serve(config: &VmConfig, origin: Origin<'_>, api_sock: Option<PathBuf>, timeline: Arc<Timeline>) -> Result<(StopReason, TimelineReport)> {
    let timeline_report = TimelineReport::for_config(config)?;
    seccomp::set_mode(config.seccomp);
    let Some(path) = api_sock else {
        return Ok((session::run_from(config, origin, timeline, &mut |_| {})?, timeline_report));
    };
    let (listener, _socket) = server::bind(&path)?;
    let instance = match origin {
        Origin::Boot => Instance::for_run(config),
        Origin::Snapshot { saved, .. } => Instance::for_restore(config, &saved.net_ids),
    };
    let instance = Arc::new(std::sync::Mutex::new(instance));
    let mut listener = Some(listener);
    let mut serve_error = None;
    let reason = session::run_from(config, origin, timeline, &mut |vm| {
        lock(&instance).attach(vm.controls());
        if let Some(listener) = listener.take() {
            if let Err(e) = server::spawn(listener, instance.clone(), api::DEFAULT_MAX_PAYLOAD) {
                serve_error = Some(e);
            }
        }
    })?;
    if let Some(e) = serve_error {
        tracing::error!("{e}");
    }
    Ok((reason, timeline_report))
}

/// Help and version go to stdout as clap writes them; a mistake becomes one line on stderr
/// (clap's message without its usage block and tips).
fn command_line_error(error: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = error.print();
            return ExitCode::from(2);
        }
        _ => {}
    }
    let text = error.to_string();
    let message: Vec<&str> = text
        .lines()
        .take_while(|line| !line.starts_with("Usage:"))
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("tip:") && !line.starts_with("For more information"))
        .collect();
    let command = ["firecracker", "restore", "exec"].into_iter().find(|name| text.contains(&format!("Usage: lguest {name}"))).unwrap_or("run");
    eprintln!("lguest: {}; see 'lguest {command} --help'", message.join(" ").trim_start_matches("error: "));
    ExitCode::from(2)
}

fn report(reason: &StopReason) {
    match reason {
        StopReason::GuestFault(fault) => eprintln!("\nlguest: {fault}"),
        StopReason::HostError(what) => eprintln!("\nlguest: {what}"),
        StopReason::Signal(n) => eprintln!("\nlguest: stopped by signal {n}"),
        StopReason::ShutdownTimedOut { signal, after } => eprintln!(
            "\nlguest: the guest did not shut down within {} s of signal {signal} (Ctrl-Alt-Del); stopped it",
            after.as_secs()
        ),
        StopReason::GuestPanic => eprintln!("\nlguest: the guest kernel panicked (it said so through pvpanic)"),
        StopReason::PowerOff | StopReason::Reset | StopReason::UserQuit => {}
    }
}
