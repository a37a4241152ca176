//! `lguest`: the command line, a VM built from it, and the guest's fate as our exit status.
//!
//! 0: the guest powered off or reset itself (or the user quit); 1: the guest died (a report
//! says how) or the host failed (KVM, memory, threads: a line says what); 2: the request was
//! wrong (a line says what to change); 3: the guest's kernel panicked; 128+N: signal N.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use lguest::config::{Cli, Command, VmConfig};
use lguest::docs::{self, DocsError};
use lguest::{seccomp, session, terminal};
use lguest::stop::StopReason;
use lguest::timeline::{Milestone, Timeline};

fn main() -> ExitCode {
    let timeline = Arc::new(Timeline::new(Instant::now()));
    init_logging();
    let args = match Cli::try_parse() {
        Ok(Cli { command: Command::Run(args) }) => args,
        Ok(Cli { command: Command::Completions { shell } }) => {
            docs::completions(shell, &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Ok(Cli { command: Command::Man { command } }) => return print_man_page(command.as_deref()),
        Err(error) => return command_line_error(error),
    };
    let result = VmConfig::from_args(args).and_then(|config| {
        seccomp::set_mode(config.seccomp);
        Ok((session::run(&config, timeline.clone())?, config.boot_timeline))
    });
    timeline.mark(Milestone::Stopped);
    terminal::restore_terminal();
    match result {
        Ok((reason, show_timeline)) => {
            report(&reason);
            if show_timeline {
                eprintln!("lguest: {timeline}");
            }
            ExitCode::from(reason.exit_code())
        }
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
    eprintln!("lguest: {}; see 'lguest run --help'", message.join(" ").trim_start_matches("error: "));
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

/// Logs go to stderr, filtered by `LGUEST_LOG` (e.g. `LGUEST_LOG=debug`), warnings by default.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LGUEST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(colour).with_writer(std::io::stderr).init();
}
