//! lguest's logs (`tracing`), reconfigurable while it runs: Firecracker's `--level`,
//! `--log-path` and `PUT /logger` change the level and where the lines go.
//!
//! [`init`] installs the subscriber once, for the whole process, with a reloadable filter and a
//! writer that goes to stderr until a log file is given. The file is opened non-blocking
//! (Firecracker's clients give a named pipe they read), so a reader that stops can't stall a
//! thread that logs: a line that doesn't fit is lost.
//!
//! The filter is a [`Targets`] (`LEVEL` and `module=LEVEL` directives, comma-separated), not
//! an `EnvFilter`: lguest's levels and modules need nothing more, and `EnvFilter`'s regex
//! engine was ~230 KiB of code in the binary, part of which every run pages in (the VMM's
//! resident overhead; bench row 3).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::{reload, Registry};

use super::types::{LogLevel, Logger};
use super::ApiError;

static FILTER: OnceLock<reload::Handle<Targets, Registry>> = OnceLock::new();
static LOG_FILE: Mutex<Option<File>> = Mutex::new(None);

/// Installs the process's logger: `LGUEST_LOG` (e.g. `LGUEST_LOG=debug`) if set, `default`
/// otherwise (also when `LGUEST_LOG` is not a list of directives). A second call does nothing.
pub fn init(default: &str) {
    let from_env = std::env::var("LGUEST_LOG").ok().and_then(|directives| directives.parse().ok());
    let filter = from_env.unwrap_or_else(|| default.parse().unwrap_or_default());
    let (filter, handle) = reload::Layer::new(filter);
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let format = tracing_subscriber::fmt::layer().with_ansi(colour).with_writer(Sink);
    if tracing_subscriber::registry().with(filter).with(format).try_init().is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// Applies `PUT /logger` (or `--level`/`--log-path`).
pub fn configure(logger: &Logger) -> Result<(), ApiError> {
    if let Some(path) = &logger.log_path {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| ApiError::Open { what: "the log file", path: path.clone(), source })?;
        *LOG_FILE.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
    }
    if logger.level.is_some() || logger.module.is_some() {
        let level = logger.level.unwrap_or_default();
        set_filter(&directive(level, logger.module.as_deref()))?;
    }
    Ok(())
}

/// The filter for `level`, limited to `module` when given (Firecracker's `module` field).
fn directive(level: LogLevel, module: Option<&str>) -> String {
    match module {
        Some(module) => format!("off,{}={}", module.replace(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'), ""), level.directive()),
        None => level.directive().to_string(),
    }
}

fn set_filter(directive: &str) -> Result<(), ApiError> {
    let filter = directive
        .parse::<Targets>()
        .map_err(|e| ApiError::BadValue { field: "module", why: e.to_string() })?;
    if let Some(handle) = FILTER.get() {
        // Fails only if the subscriber is gone, i.e. the process is ending.
        let _ = handle.reload(filter);
    }
    Ok(())
}

/// Where log lines go: the log file once there is one, stderr until then.
struct Sink;

struct SinkWriter;

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut file = LOG_FILE.lock().unwrap_or_else(|p| p.into_inner());
        match file.as_mut() {
            // A full pipe drops the line rather than blocking the thread that logs.
            Some(file) => Ok(file.write(buf).unwrap_or(buf.len())),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = SinkWriter;

    fn make_writer(&'a self) -> SinkWriter {
        SinkWriter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_modules_become_filters() {
        assert_eq!(directive(LogLevel::Warning, None), "warn");
        assert_eq!(directive(LogLevel::Debug, Some("lguest::api")), "off,lguest::api=debug");
        assert_eq!(directive(LogLevel::Info, Some("a=b,c")), "off,abc=info");
        assert!(set_filter(&directive(LogLevel::Info, Some("lguest"))).is_ok());
    }

    #[test]
    fn a_directive_that_is_not_one_is_refused() {
        assert!(set_filter("lguest=loud").is_err());
    }

    #[test]
    fn a_module_filter_lets_through_only_its_module() {
        use tracing::Level;
        let filter: Targets = directive(LogLevel::Debug, Some("lguest::api")).parse().expect("parses");
        assert!(filter.would_enable("lguest::api::logger", &Level::DEBUG));
        assert!(!filter.would_enable("lguest::vm", &Level::ERROR));
        let everything: Targets = directive(LogLevel::Warning, None).parse().expect("parses");
        assert!(everything.would_enable("lguest::vm", &Level::WARN));
        assert!(!everything.would_enable("lguest::vm", &Level::INFO));
    }

    #[test]
    fn an_unopenable_log_file_is_named() {
        let logger = Logger { log_path: Some("/no/such/dir/log".into()), ..Logger::default() };
        let error = configure(&logger).expect_err("refused");
        assert!(error.to_string().contains("/no/such/dir/log"), "{error}");
    }
}
