//! `lguest exec [OPTIONS] -- CMD [ARGS...]`: one command in a throwaway microVM that sees
//! this host's files.
//!
//! The guest's root is this host's `/`, shared read-only over virtio-fs with a tmpfs overlay
//! on top (writes land in the VM and vanish with it); the working directory is shared
//! read-write at its own path, and `--share` adds more. CMD runs there as the caller (uid,
//! gid, groups, directory, a small environment), its stdio relayed over vsock, and lguest
//! exits with CMD's status.
//!
//! The host side, in the order it happens: find the kernel and its modules ([`kernel`],
//! [`modules`]), write the [`request`], build the initramfs in memory ([`initramfs`]: this
//! very binary is the guest's init, [`guest`]), bind the stream sockets ([`host_io`]), and
//! boot a VM (the same `VmConfig` and session as `lguest run`) whose serial console is kept
//! aside: it is printed only when the guest fails before CMD ends.

pub mod control;
pub mod guest;
mod guest_tty;
pub mod host_io;
pub mod initramfs;
pub mod kernel;
pub mod modules;
pub mod net;
pub mod request;
pub mod signals;

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{parse_memory, parse_net, ShareConfig, VmConfig, VsockConfig};
use crate::error::{Error, Result};
use crate::stop::StopReason;
use crate::timeline::{Milestone, Timeline};
use self::control::Report;
use self::request::{Mount, Request};

/// The share tags lguest exec uses itself.
pub const ROOT_TAG: &str = "lguest-root";
pub const CWD_TAG: &str = "lguest-cwd";
/// The guest's vsock context ID (any will do: the device is ours alone).
const GUEST_CID: u64 = 3;
/// Quiet: the console is only read when something went wrong, and each byte of it is an exit.
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";
/// What CMD gets from our environment, when we have it.
const PASSED_ENV: [&str; 5] = ["PATH", "HOME", "TERM", "LANG", "USER"];
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub const AFTER_HELP: &str = "The guest's root is this host's / (read-only, with a throwaway tmpfs \
overlay: writes vanish with the VM), the current directory is shared read-write at its own path, and \
--share HOSTDIR:TAG[,readonly] shares more, each at its own path. CMD runs as you (uid, gid, groups, \
directory) with PATH, HOME, TERM, LANG, USER and each --env; its stdin, stdout and stderr are lguest's \
(a terminal, with its size, when stdin and stdout are one).

Kernel: --kernel, else the reference kernel lab/fetch.sh downloads \
(${LGUEST_CACHE:-~/.cache/lguest}/kernel/vmlinux, or bzImage there). Modules: --modules DIR (the \
kernel's lib/modules/VERSION tree, with modules.dep), else the `modules` directory beside the kernel, \
else /lib/modules/VERSION for the bzImage's own version; lguest loads virtio_pci, virtiofs, overlay and \
vmw_vsock_virtio_transport (and virtio_net with --net) with their dependencies, skipping what \
modules.builtin lists. A kernel with these built in needs none.

Signals: SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to lguest while CMD runs go to CMD's process group in the guest, which may handle them (the VM ends when CMD does). A second SIGINT or SIGTERM while CMD still runs, or any of them before CMD has started, stops the VM at once (exit 128+N). On a terminal, Ctrl-C and Ctrl-\\ are keys for CMD's own terminal, which signals CMD; window size changes follow.

Exit status: CMD's; 128+N when it died of signal N; 126/127 when it could not be run; 1 when the \
guest failed first (its console is printed); 2 for a bad request.";

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The guest kernel (bzImage or vmlinux); default: the reference kernel (see below).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// The kernel's modules: its lib/modules/VERSION directory, with modules.dep.
    #[arg(long, value_name = "DIR")]
    pub modules: Option<PathBuf>,
    /// Guest memory: `512M`, `2G`, or a plain number of MiB.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,
    /// Share HOSTDIR too, at the same path in the guest (TAG names it); repeatable.
    #[arg(long = "share", value_name = "HOSTDIR:TAG[,readonly]")]
    pub shares: Vec<String>,
    /// Set K=V in CMD's environment; repeatable.
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// A network card, as `lguest run --net` (`user` needs no root: passt).
    #[arg(long = "net", value_name = "user[,hostfwd=...]|tap=NAME")]
    pub nets: Vec<String>,
    /// After the run, print when the initramfs and VM were built, the guest's init connected,
    /// CMD started and exited, and the VM stopped.
    #[arg(long)]
    pub boot_timeline: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// What can stop `lguest exec` before the guest runs.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("no --kernel given and no reference kernel at '{}': run lab/fetch.sh to download it, or give --kernel PATH", .0.display())]
    NoKernel(PathBuf),
    #[error(transparent)]
    Modules(#[from] modules::ModulesError),
    #[error(transparent)]
    Initramfs(#[from] initramfs::InitramfsError),
    #[error("invalid --env '{0}': expected NAME=VALUE with a NAME that is not empty")]
    BadEnv(String),
    #[error("{what} is not UTF-8 ('{value}'): lguest exec passes text only")]
    NotUtf8 { what: &'static str, value: String },
    #[error("the --share tag '{0}' is lguest exec's own: choose another")]
    ReservedTag(String),
    #[error("cannot find the current directory: {0}")]
    Cwd(std::io::Error),
    #[error("cannot set up the guest's streams in '{}': {source}", path.display())]
    Streams { path: PathBuf, source: std::io::Error },
}

impl ExecError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ExecError::NoKernel(_) | ExecError::Modules(_) | ExecError::BadEnv(_) | ExecError::NotUtf8 { .. } | ExecError::ReservedTag(_) => 2,
            ExecError::Initramfs(_) | ExecError::Cwd(_) | ExecError::Streams { .. } => 1,
        }
    }
}

/// Runs CMD in a fresh VM and returns the status lguest exits with.
pub fn run(args: ExecArgs, timeline: Arc<Timeline>) -> Result<u8> {
    signals::block();
    let tty = crate::terminal::stdin_is_terminal() && host_io::terminal_size().is_some();
    let kernel = kernel::find(args.kernel.as_deref())?;
    let module_files = match kernel::modules_dir(args.modules.as_deref(), &kernel) {
        Some(dir) => modules::ModuleIndex::read(&dir).and_then(|index| index.resolve(&wanted_modules(&args))).map_err(ExecError::from)?,
        None => Vec::new(),
    };
    let user_shares = user_shares(&args.shares)?;
    let request = request_for(&args, &user_shares, &module_files, tty)?;
    let initrd = memfd_with(&initramfs::build(&request, &module_files).map_err(ExecError::from)?)?;
    timeline.mark(Milestone::InitramfsBuilt);
    let sockets = tempfile::Builder::new().prefix("lguest-exec.").tempdir().map_err(|e| streams_error(Path::new("$TMPDIR"), e))?;
    let uds = sockets.path().join("v");
    let listeners = host_io::Listeners::bind(&uds, tty).map_err(|e| streams_error(sockets.path(), e))?;
    let config = vm_config(&args, kernel, &initrd, &request, &user_shares, &uds)?;
    let console = crate::devices::serial::keep_console_aside();
    if tty {
        crate::terminal::enter_raw_mode();
    }
    let (mut listeners, mut outcome) = (Some(listeners), None);
    let ran = crate::session::run_with(&config, crate::vm::Origin::Boot, timeline.clone(), crate::session::Frontend::Caller, &mut |vm| {
        if let Some(listeners) = listeners.take() {
            let link = Arc::new(signals::Link::default());
            outcome = Some(listeners.serve(vm.stopper(), timeline.clone(), link.clone()));
            signals::watch(link, vm.stopper(), tty);
        }
    });
    timeline.mark(Milestone::Stopped);
    crate::terminal::restore_terminal();
    drop(initrd);
    let ending = outcome.and_then(|outcome| outcome.ending());
    let status = exit_status(ran?, ending, &console.take());
    if args.boot_timeline {
        eprintln!("lguest: {timeline}");
    }
    Ok(status)
}

/// CMD's status; or, when the guest ended without saying how CMD did, its console and why.
fn exit_status(reason: StopReason, ending: Option<Report>, console: &[u8]) -> u8 {
    match (ending, reason) {
        (Some(Report::Failed(code, why)), _) => {
            if code == 1 {
                print_console(console);
            }
            eprintln!("lguest: {why}");
            code
        }
        (Some(ending), _) => ending.exit_status().unwrap_or(1),
        (None, StopReason::Signal(signal)) => {
            eprintln!("lguest: signal {signal} stopped the VM before CMD ended");
            128u8.saturating_add(u8::try_from(signal).unwrap_or(0))
        }
        (None, reason) => {
            print_console(console);
            let why = match reason {
                StopReason::GuestFault(fault) => fault.to_string(),
                StopReason::HostError(what) => what,
                StopReason::GuestPanic => "the guest kernel panicked".into(),
                _ => "the guest stopped".into(),
            };
            eprintln!("lguest: the guest failed before CMD ended (its console is above): {why}");
            1
        }
    }
}

fn print_console(console: &[u8]) {
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(b"lguest: the guest's console:\n");
    let _ = stderr.write_all(console);
    let _ = stderr.write_all(b"\n");
}

fn streams_error(path: &Path, source: std::io::Error) -> Error {
    ExecError::Streams { path: path.to_path_buf(), source }.into()
}

/// The drivers the guest needs for the devices it will have.
fn wanted_modules(args: &ExecArgs) -> Vec<&'static str> {
    let mut wanted = modules::BASE_MODULES.to_vec();
    if !args.nets.is_empty() {
        wanted.extend(modules::NET_MODULES);
    }
    wanted
}

/// `--share`s, each mounted at its own path; lguest exec's own tags are refused.
fn user_shares(values: &[String]) -> Result<Vec<ShareConfig>> {
    let shares = crate::config::parse_shares(values)?;
    match shares.iter().find(|share| share.tag == ROOT_TAG || share.tag == CWD_TAG) {
        Some(share) => Err(ExecError::ReservedTag(share.tag.clone()).into()),
        None => Ok(shares),
    }
}

fn text(value: &std::ffi::OsStr, what: &'static str) -> Result<String> {
    value.to_str().map(str::to_string).ok_or_else(|| ExecError::NotUtf8 { what, value: value.to_string_lossy().into_owned() }.into())
}

/// The request: CMD, who runs it where, with what environment, and what to mount.
fn request_for(args: &ExecArgs, shares: &[ShareConfig], module_files: &[PathBuf], tty: bool) -> Result<Request> {
    let argv = args.command.iter().map(|arg| text(arg, "an argument of CMD")).collect::<Result<Vec<_>>>()?;
    let cwd = std::env::current_dir().map_err(ExecError::Cwd)?;
    let cwd = text(cwd.as_os_str(), "the current directory")?;
    let mut mounts = vec![Mount { tag: ROOT_TAG.into(), path: "/".into(), readonly: true }];
    if cwd != "/" {
        mounts.push(Mount { tag: CWD_TAG.into(), path: cwd.clone(), readonly: false });
    }
    for share in shares {
        mounts.push(Mount { tag: share.tag.clone(), path: text(share.dir.as_os_str(), "a --share directory")?, readonly: share.readonly });
    }
    Ok(Request {
        argv,
        env: environment(&args.env)?,
        cwd,
        uid: current_id(libc::getuid),
        gid: current_id(libc::getgid),
        groups: groups(),
        mounts,
        modules: initramfs::module_file_names(module_files),
        tty: if tty { host_io::terminal_size() } else { None },
        net: if first_card_is_user(&args.nets)? { net::host_offer() } else { None },
    })
}

/// Whether the guest's `eth0` is on the user-mode network (the one card lguest configures).
fn first_card_is_user(nets: &[String]) -> Result<bool> {
    let first = nets.first().map(|n| parse_net(n)).transpose()?;
    Ok(first.is_some_and(|card| matches!(card.backend, crate::config::NetBackend::User { .. })))
}

/// PATH, HOME, TERM, LANG and USER from ours (PATH always), then each `--env`, a later one
/// replacing an earlier one of the same name.
pub fn environment(extra: &[String]) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |name: &str, value: String| match env.iter_mut().find(|(k, _)| k == name) {
        Some(slot) => slot.1 = value,
        None => env.push((name.to_string(), value)),
    };
    set("PATH", DEFAULT_PATH.to_string());
    for name in PASSED_ENV {
        if let Some(value) = std::env::var_os(name) {
            set(name, text(&value, "an environment variable")?);
        }
    }
    for pair in extra {
        match pair.split_once('=') {
            Some((name, value)) if !name.is_empty() && !pair.contains('\0') => set(name, value.to_string()),
            _ => return Err(ExecError::BadEnv(pair.clone()).into()),
        }
    }
    Ok(env)
}

fn current_id(id: unsafe extern "C" fn() -> u32) -> u32 {
    // SAFETY: getuid and getgid take nothing and cannot fail.
    unsafe { id() }
}

/// Our supplementary groups.
fn groups() -> Vec<u32> {
    let mut groups = vec![0 as libc::gid_t; 1024];
    // SAFETY: getgroups writes at most `groups.len()` entries to a buffer that long.
    let count = unsafe { libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr()) };
    groups.truncate(usize::try_from(count).unwrap_or(0));
    groups
}

/// The initramfs in a memfd: the kernel loader reads it as a file, and nothing touches the disk.
fn memfd_with(bytes: &[u8]) -> Result<std::fs::File> {
    let host = |source| Error::Host { what: "cannot hold the guest's initramfs in memory", source };
    // SAFETY: memfd_create takes a NUL-terminated name; a non-negative result is a new fd.
    let fd = unsafe { libc::memfd_create(c"lguest-exec-initramfs".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(host(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is new and owned by nobody else.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.write_all(bytes).map_err(host)?;
    Ok(file)
}

/// The VM: the kernel with our initramfs, the shares (root, cwd, --share), our vsock device.
fn vm_config(args: &ExecArgs, kernel: PathBuf, initrd: &std::fs::File, request: &Request, shares: &[ShareConfig], uds: &Path) -> Result<VmConfig> {
    let mut config = VmConfig::for_kernel(kernel);
    config.initrd = Some(PathBuf::from(format!("/proc/self/fd/{}", initrd.as_raw_fd())));
    config.cmdline = CMDLINE.to_string();
    config.memory_mib = parse_memory(&args.memory)?;
    config.cpus = crate::config::validate_cpus(args.cpus)?;
    config.nets = args.nets.iter().map(|n| parse_net(n)).collect::<Result<Vec<_>>>()?;
    let own = request.mounts.iter().take(2).filter(|m| m.tag == ROOT_TAG || m.tag == CWD_TAG);
    config.shares = own.map(|m| ShareConfig { dir: PathBuf::from(&m.path), tag: m.tag.clone(), readonly: m.readonly }).collect();
    config.shares.extend(shares.iter().cloned());
    let uds_text = uds.to_string_lossy();
    let bad = |why: config::BadVsock| ExecError::Streams { path: uds.to_path_buf(), source: std::io::Error::other(why.to_string()) };
    config.vsock = Some(VsockConfig::new(GUEST_CID, &uds_text).map_err(bad)?);
    config.check_limits()?;
    Ok(config)
}

use crate::config;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_is_path_and_friends_then_each_env_flag_last_one_winning() {
        let env = environment(&["EXTRA=1".into(), "PATH=/x".into(), "EXTRA=2".into(), "EMPTY=".into()]).expect("valid");
        let get = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!((get("PATH"), get("EXTRA"), get("EMPTY")), (Some("/x"), Some("2"), Some("")));
        assert_eq!(env.iter().filter(|(k, _)| k == "EXTRA").count(), 1);
        for bad in ["NOEQUALS", "=value", "A=\0"] {
            assert!(matches!(environment(&[bad.into()]), Err(Error::Exec(ExecError::BadEnv(_)))), "{bad:?}");
        }
    }

    #[test]
    fn exec_keeps_its_own_share_tags() {
        for tag in [ROOT_TAG, CWD_TAG] {
            assert!(matches!(user_shares(&[format!("src:{tag}")]), Err(Error::Exec(ExecError::ReservedTag(_)))));
        }
        assert!(matches!(user_shares(&["src:a".into(), "docs:a".into()]), Err(Error::BadFlag { flag: "--share", .. })));
        assert_eq!(user_shares(&["src:a,readonly".into()]).map(|s| s[0].readonly).ok(), Some(true));
    }

    #[test]
    fn the_status_is_cmds_and_a_guest_that_never_said_is_a_failure() {
        assert_eq!(exit_status(StopReason::PowerOff, Some(Report::Exited(42)), b""), 42);
        assert_eq!(exit_status(StopReason::PowerOff, Some(Report::Signalled(9)), b""), 137);
        assert_eq!(exit_status(StopReason::PowerOff, Some(Report::Failed(127, "cannot run 'x'".into())), b""), 127);
        assert_eq!(exit_status(StopReason::Reset, None, b"Kernel panic"), 1);
        assert_eq!(exit_status(StopReason::Signal(libc::SIGHUP), None, b""), 129);
    }
}
