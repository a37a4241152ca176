//! `lguest`: the command line, a VM built from it, and the guest's fate as our exit status.
//!
//! 0: the guest powered off or reset itself (or the user quit); 1: the guest died (a report
//! says how); 2: the request was wrong (a line says what to change); 128+N: signal N.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use lguest::config::{Cli, Command, VmConfig};
use lguest::console;
use lguest::stop::StopReason;
use lguest::timeline::{Milestone, Timeline};
use lguest::vm::Vm;

fn main() -> ExitCode {
    let timeline = Arc::new(Timeline::new(Instant::now()));
    init_logging();
    let Cli { command: Command::Run(args) } = Cli::parse();
    let result = VmConfig::from_args(args)
        .and_then(|config| Ok((Vm::build(&config, timeline.clone())?.run()?, config.boot_timeline)));
    timeline.mark(Milestone::Stopped);
    console::restore_terminal();
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
            ExitCode::from(2)
        }
    }
}

fn report(reason: &StopReason) {
    match reason {
        StopReason::GuestFault(fault) => eprintln!("\nlguest: {fault}"),
        StopReason::HostError(what) => eprintln!("\nlguest: {what}"),
        StopReason::Signal(n) => eprintln!("\nlguest: stopped by signal {n}"),
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
