//! `lguest firecracker`: Firecracker's command line, and the process it describes.
//!
//! Programs that drive Firecracker start it as `firecracker --api-sock PATH [--config-file F]`
//! and talk to the socket. This module is that process: it binds the socket first, starts the
//! API thread ([`crate::api::server`]), and then the main thread waits for the API's
//! `InstanceStart` (or, with `--config-file`, starts at once). The VM is then built and run by
//! [`crate::session::run`], exactly as for `lguest run`; a build that fails goes back to the
//! API client as a 400, and the process keeps waiting. A guest reboot ends the process, as in
//! Firecracker, whose clients rely on it.
//!
//! Every Firecracker flag is accepted. Those that mean nothing here say so in `--help`
//! ([`AFTER_HELP`]); those that ask for what lguest does not implement (MMDS,
//! `--describe-snapshot`) are refused with the reason.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::api::instance::{Instance, Start, StartRequest, Started};
use crate::api::plan::Plan;
use crate::api::types::{LogLevel, Logger};
use crate::api::{logger, server, ApiError};
use crate::bus::lock;
use crate::config::{OnReboot, VmConfig};
use crate::error::{Error, Result};
use crate::stop::StopReason;
use crate::timeline::Timeline;

pub const AFTER_HELP: &str = "Accepted with no effect here: --boot-timer (lguest's boot timer device \
is always present), --enable-pci (lguest's devices are always on PCI), --show-level and \
--show-log-origin (the log format is tracing's), --start-time-us, --start-time-cpu-us, \
--parent-cpu-time-us (start-up metrics are not written), --mmds-size-limit (no MMDS). \
--seccomp-filter FILE is not loaded: lguest installs its own per-thread filters (--no-seccomp \
turns them off). In boot_args, pci=off and acpi=off are dropped: lguest's devices are virtio-pci, \
described by ACPI.";

/// Firecracker's command line.
#[derive(Debug, clap::Args)]
pub struct FirecrackerArgs {
    /// The API's Unix socket.
    #[arg(long, value_name = "PATH", default_value = "/run/firecracker.socket")]
    pub api_sock: PathBuf,
    /// The microVM's id, reported by GET /.
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    pub id: String,
    /// Start at once the VM this Firecracker JSON configuration describes.
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// Serve no API (needs --config-file).
    #[arg(long, requires = "config_file")]
    pub no_api: bool,
    /// Log level: Off, Error, Warning, Info, Debug or Trace.
    #[arg(long, value_name = "LEVEL")]
    pub level: Option<String>,
    /// Where logs go (a file or a named pipe) instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<String>,
    /// Accepted; no effect.
    #[arg(long)]
    pub show_level: bool,
    /// Accepted; no effect.
    #[arg(long)]
    pub show_log_origin: bool,
    /// Log only this module's lines.
    #[arg(long, value_name = "MODULE")]
    pub module: Option<String>,
    /// Where metrics go (one JSON object per line).
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<String>,
    /// Accepted; no effect (lguest's boot timer device is always present).
    #[arg(long)]
    pub boot_timer: bool,
    /// Accepted but not loaded: lguest installs its own per-thread filters.
    #[arg(long, value_name = "FILE")]
    pub seccomp_filter: Option<PathBuf>,
    /// Install no seccomp filters.
    #[arg(long)]
    pub no_seccomp: bool,
    /// Accepted; no effect (lguest's devices are always on PCI).
    #[arg(long)]
    pub enable_pci: bool,
    /// The largest request body the API accepts, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = crate::api::DEFAULT_MAX_PAYLOAD)]
    pub http_api_max_payload_size: usize,
    /// Accepted; no effect (no MMDS).
    #[arg(long, value_name = "BYTES")]
    pub mmds_size_limit: Option<usize>,
    /// Refused: lguest has no MMDS yet.
    #[arg(long, value_name = "FILE")]
    pub metadata: Option<PathBuf>,
    /// Refused: lguest does not describe snapshots (yet).
    #[arg(long, value_name = "FILE")]
    pub describe_snapshot: Option<PathBuf>,
    /// Accepted; no effect.
    #[arg(long, value_name = "US")]
    pub start_time_us: Option<u64>,
    /// Accepted; no effect.
    #[arg(long, value_name = "US")]
    pub start_time_cpu_us: Option<u64>,
    /// Accepted; no effect.
    #[arg(long, value_name = "US")]
    pub parent_cpu_time_us: Option<u64>,
    /// Print the Firecracker API version implemented (`Firecracker vX.Y.Z`), then lguest's.
    #[arg(long)]
    pub version: bool,
}

/// `--version`: the line Firecracker's clients parse, then lguest's own.
pub fn version_text() -> String {
    format!("Firecracker v{}\nlguest {}\n", crate::api::FIRECRACKER_VERSION, env!("CARGO_PKG_VERSION"))
}

/// Runs the process the flags describe, until its guest stops.
pub fn run(args: FirecrackerArgs, timeline: Arc<Timeline>) -> Result<StopReason> {
    refuse_unimplemented(&args)?;
    // Before any thread starts, so that all inherit the mask: a stop signal then waits for the
    // main thread (which removes the socket on its way out) instead of killing the process.
    crate::terminal::block_stop_signals().map_err(|source| Error::Host { what: "cannot block the stop signals", source })?;
    configure_logs(&args)?;
    if args.seccomp_filter.is_some() {
        tracing::warn!("--seccomp-filter is not loaded: lguest installs its own per-thread filters");
    }
    crate::seccomp::set_mode(if args.no_seccomp { crate::seccomp::Mode::Off } else { crate::seccomp::Mode::Enforce });
    let plan = match &args.config_file {
        Some(path) => read_config_file(path)?,
        None => Plan::default(),
    };
    let (starter, starts) = mpsc::channel();
    let instance = match args.config_file {
        Some(_) => Instance::configured(args.id.clone(), plan.clone()),
        None => Instance::waiting(args.id.clone(), plan.clone(), starter),
    };
    let instance = Arc::new(Mutex::new(instance));
    open_metrics(&instance, args.metrics_path.as_deref().or(plan.metrics.as_ref().map(|m| m.metrics_path.as_str())))?;
    // Bound before anything else: the socket's existence is what clients wait for.
    let _socket = if args.no_api {
        None
    } else {
        let (listener, file) = server::bind(&args.api_sock)?;
        server::spawn(listener, instance.clone(), args.http_api_max_payload_size)?;
        Some(file)
    };
    let started = |vm: &crate::vm::RunningVm| lock(&instance).attach(vm.controls());
    if args.config_file.is_some() {
        let config = process_config(plan.to_vm_config().map_err(|e| Error::Api(Box::new(e)))?, args.no_seccomp);
        redirect_serial(plan.serial.as_ref().and_then(|s| s.serial_out_path.as_deref()).map(Path::new))?;
        return crate::session::run(&config, timeline, &mut { started });
    }
    serve_starts(&starts, &instance, timeline, args.no_seccomp)
}

/// Waits for `InstanceStart`s until one gives a running guest, then runs it to its end.
fn serve_starts(starts: &mpsc::Receiver<StartRequest>, instance: &Arc<Mutex<Instance>>, timeline: Arc<Timeline>, no_seccomp: bool) -> Result<StopReason> {
    loop {
        let StartRequest { start, serial_out, reply } = match starts.recv_timeout(Duration::from_millis(200)) {
            Ok(request) => request,
            Err(mpsc::RecvTimeoutError::Timeout) => match pending_stop_signal() {
                Some(signal) => return Ok(StopReason::Signal(signal)),
                None => continue,
            },
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(StopReason::HostError("the API thread stopped".into())),
        };
        let (config, restore) = match start {
            Start::Boot(config) => (*config, None),
            Start::Snapshot(load) => match load.load() {
                Ok(restore) => (restore.snapshot.config.clone(), Some(restore)),
                Err(error) => {
                    let _ = reply.send(Err(error.into()));
                    continue;
                }
            },
        };
        let restored = restore.as_ref().map(|r| (r.snapshot.config.clone(), r.snapshot.net_ids.clone()));
        let config = process_config(config, no_seccomp);
        if let Err(error) = redirect_serial(serial_out.as_deref()) {
            let _ = reply.send(Err(error));
            continue;
        }
        let mut reply = Some(reply);
        let mut started = |vm: &crate::vm::RunningVm| match reply.take() {
            Some(reply) => {
                let _ = reply.send(Ok(Started { controls: vm.controls(), restored: restored.clone() }));
            }
            None => lock(instance).attach(vm.controls()),
        };
        let origin = restore.as_ref().map_or(crate::vm::Origin::Boot, |restore| restore.origin());
        match crate::session::run_from(&config, origin, timeline.clone(), &mut started) {
            Err(error) if reply.is_some() => {
                if let Some(reply) = reply.take() {
                    let _ = reply.send(Err(error));
                }
            }
            result => return result,
        }
    }
}

/// The process's own settings on the API's VM: Firecracker's clients expect a reboot to end
/// the process.
fn process_config(mut config: VmConfig, no_seccomp: bool) -> VmConfig {
    config.on_reboot = OnReboot::Exit;
    if no_seccomp {
        config.seccomp = crate::seccomp::Mode::Off;
    }
    config
}

fn refuse_unimplemented(args: &FirecrackerArgs) -> Result<()> {
    let refuse = |what| Err(Error::Api(Box::new(ApiError::NotImplemented { what })));
    if args.metadata.is_some() {
        return refuse("the microVM metadata service (--metadata)");
    }
    if args.describe_snapshot.is_some() {
        return refuse("describing snapshots (--describe-snapshot)");
    }
    Ok(())
}

fn configure_logs(args: &FirecrackerArgs) -> Result<()> {
    let level = match &args.level {
        None => None,
        Some(text) => Some(parse_level(text).ok_or_else(|| Error::BadFlag {
            flag: "--level",
            value: text.clone(),
            why: "expected Off, Error, Warning, Info, Debug or Trace".into(),
        })?),
    };
    let config = Logger { log_path: args.log_path.clone(), level, module: args.module.clone(), ..Logger::default() };
    logger::configure(&config).map_err(|e| Error::Api(Box::new(e)))
}

fn parse_level(text: &str) -> Option<LogLevel> {
    let capitalised: String = text.chars().enumerate().map(|(i, c)| if i == 0 { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() }).collect();
    serde_json::from_value(serde_json::Value::String(capitalised)).ok()
}

fn read_config_file(path: &Path) -> Result<Plan> {
    let json = std::fs::read(path).map_err(|source| Error::ReadFile { what: "--config-file", path: path.into(), source })?;
    let plan = Plan::from_json(&json).map_err(|source| Error::ConfigFile { path: path.into(), source: Box::new(source) })?;
    if let Some(logger) = &plan.logger {
        logger::configure(logger).map_err(|source| Error::ConfigFile { path: path.into(), source: Box::new(source) })?;
    }
    Ok(plan)
}

fn open_metrics(instance: &Mutex<Instance>, path: Option<&str>) -> Result<()> {
    match path {
        Some(path) => lock(instance).metrics.open(path).map_err(|e| Error::Api(Box::new(e))),
        None => Ok(()),
    }
}

/// `PUT /serial`'s `serial_out_path`: the guest console's output goes to that file. lguest's
/// console devices write to our stdout, so the file simply becomes our stdout.
fn redirect_serial(path: Option<&Path>) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|source| Error::ReadFile { what: "serial_out_path", path: path.into(), source })?;
    // SAFETY: dup2 onto fd 1 replaces our stdout with a file we own; Rust's stdout handle
    // keeps using fd 1, and nothing holds the old description.
    if unsafe { libc::dup2(file.as_raw_fd(), libc::STDOUT_FILENO) } < 0 {
        return Err(Error::Host { what: "cannot redirect the serial output", source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// A stop signal that came while no VM runs (they are blocked, so they wait to be asked).
fn pending_stop_signal() -> Option<i32> {
    // SAFETY: sigpending fills the set we own; sigismember only reads it.
    unsafe {
        let mut pending: libc::sigset_t = std::mem::zeroed();
        if libc::sigpending(&mut pending) != 0 {
            return None;
        }
        [libc::SIGTERM, libc::SIGINT, libc::SIGHUP].into_iter().find(|&signal| libc::sigismember(&pending, signal) == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> std::result::Result<FirecrackerArgs, clap::Error> {
        let cli = crate::config::Cli::try_parse_from(["lguest", "firecracker"].iter().chain(args))?;
        match cli.command {
            crate::config::Command::Firecracker(args) => Ok(args),
            other => panic!("not firecracker: {other:?}"),
        }
    }

    #[test]
    fn firecrackers_flags_are_accepted() {
        let args = parse(&[
            "--api-sock", "/tmp/fc.sock", "--id", "vm1", "--level", "Debug", "--log-path", "/tmp/l", "--metrics-path", "/tmp/m",
            "--boot-timer", "--no-seccomp", "--enable-pci", "--http-api-max-payload-size", "1000", "--show-level",
            "--show-log-origin", "--start-time-us", "1", "--start-time-cpu-us", "2", "--parent-cpu-time-us", "3",
            "--mmds-size-limit", "10", "--seccomp-filter", "/tmp/f.bpf",
        ])
        .expect("valid");
        assert_eq!(args.api_sock, PathBuf::from("/tmp/fc.sock"));
        assert_eq!(args.id, "vm1");
        assert_eq!(args.http_api_max_payload_size, 1000);
        let defaults = parse(&[]).expect("valid");
        assert_eq!(defaults.api_sock, PathBuf::from("/run/firecracker.socket"));
        assert_eq!(defaults.http_api_max_payload_size, 51_200);
        assert!(parse(&["--no-api"]).is_err(), "--no-api needs --config-file");
        assert!(parse(&["--no-api", "--config-file", "f.json"]).is_ok());
        assert!(parse(&["--bogus"]).is_err());
    }

    #[test]
    fn version_text_is_what_clients_parse() {
        let text = version_text();
        let first = text.lines().next().unwrap_or_default();
        assert!(first.starts_with("Firecracker v1."), "{first}");
        assert!(text.contains("lguest "));
    }

    #[test]
    fn log_levels_in_any_case() {
        assert_eq!(parse_level("debug"), Some(LogLevel::Debug));
        assert_eq!(parse_level("Warning"), Some(LogLevel::Warning));
        assert_eq!(parse_level("WARN"), Some(LogLevel::Warning));
        assert_eq!(parse_level("loud"), None);
    }
}
