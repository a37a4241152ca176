//! What a VM is made of, and the command line that describes it.
//!
//! Everything the user typed is checked here, once, so that the rest of lguest can trust its
//! configuration. What can only be checked against the kernel image (the command line's limit,
//! whether the kernel fits) is checked when the image is loaded, in `arch::x86_64::boot`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::error::{Error, Result};
use crate::rate_limiter::{self, RateLimit, RateLimitBuilder};

mod share;
pub(crate) use self::share::parse_shares;
pub use self::share::{parse_share, ShareConfig, MAX_SHARE_TAG};

/// The smallest guest we agree to build: a stock kernel with an initramfs needs more than this
/// anyway, and below it the fixed boot structures would crowd out the kernel.
pub const MIN_MEMORY_MIB: u64 = 32;
/// One TiB: far beyond any guest of this launcher, low enough to catch a typo such as `512G`.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// The guest's 8250 console on the first serial port; `reboot=k` makes `reboot -f` use the
/// keyboard controller's reset line, which we turn into a clean exit.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

const ESCAPE_HELP: &str = "Console: the guest's serial port is this terminal, in raw mode. \
Press Ctrl-A then x to quit; Ctrl-A Ctrl-A sends a Ctrl-A to the guest.

Exit status: 0 the guest powered off or reset, or you quit; 1 the guest died (a report says \
how) or the host failed (no KVM, a refused ioctl); 2 a bad request (a line says what to \
change); 3 the guest kernel panicked (pvpanic); 128+N signal N.";

#[derive(Debug, Parser)]
#[command(name = "lguest", version, about = "Boot an unmodified Linux kernel on KVM", after_help = ESCAPE_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a kernel and connect its serial console to this terminal.
    #[command(after_help = ESCAPE_HELP)]
    Run(RunArgs),
    /// Run a guest saved by `PUT /snapshot/create` from where it was paused, in the foreground
    /// as `run` does.
    #[command(after_help = ESCAPE_HELP)]
    Restore(crate::snapshot::restore::RestoreArgs),
    /// Merge a Diff snapshot's memory file onto the memory file it followed (its base), as
    /// Firecracker's `rebase-snap` does: the base then restores the Diff's guest.
    RebaseSnap(crate::snapshot::rebase::RebaseArgs),
    /// Print the shell completion script for SHELL (scripts/install.sh installs them).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page of lguest, or of one of its commands (`lguest man run`), as roff.
    Man {
        /// The command whose page to print.
        command: Option<String>,
    },
    /// Take Firecracker's command line and serve its API (also what `lguest` does when it is
    /// run under the name `firecracker`).
    #[command(disable_version_flag = true, after_help = crate::firecracker::AFTER_HELP)]
    Firecracker(crate::firecracker::FirecrackerArgs),
    /// Run one command in a throwaway VM that sees this host's files: `lguest exec -- CMD ARGS`.
    #[command(after_help = crate::exec::AFTER_HELP)]
    Exec(crate::exec::ExecArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The kernel: a bzImage, or an ELF vmlinux (booted through its PVH entry when it has one).
    #[arg(long, value_name = "PATH", required_unless_present = "config_file")]
    pub kernel: Option<PathBuf>,
    /// An initramfs (or initrd) for the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// The VM in Firecracker's JSON configuration format (boot-source, machine-config, drives,
    /// network-interfaces, entropy, ...) instead of --kernel, --initrd, --cmdline, --memory and
    /// --cpus; --disk, --net and --rng add to it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "initrd", "cmdline", "memory", "cpus"])]
    pub config_file: Option<PathBuf>,
    /// Serve Firecracker's REST API on this Unix socket while the VM runs (GET /, PATCH /vm to
    /// pause and resume, PUT /actions SendCtrlAltDel, GET /vm/config, ...).
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Note which pages of guest memory change, so that `PUT /snapshot/create` can take Diff
    /// snapshots (machine-config's track_dirty_pages in the API and the config file).
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// The kernel command line.
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest memory: `512M`, `2G`, or a plain number of MiB.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,
    /// After the run, print when the VM was built, first ran, was signalled by the guest's
    /// boot timer, and stopped, with the count of exits of each kind. `=FILE.json` also writes
    /// them as a Chrome trace, which Perfetto (ui.perfetto.dev) and chrome://tracing open.
    #[arg(long, value_name = "FILE.json", num_args = 0..=1, require_equals = true)]
    pub boot_timeline: Option<Option<PathBuf>>,
    /// A raw disk image for the guest, as /dev/vda, /dev/vdb, ... in the order given.
    /// `readonly` refuses the guest's writes; `id=NAME` is the serial the guest sees
    /// (/dev/disk/by-id/virtio-NAME). Rate limits: bw_size=BYTES,bw_refill_time=MS and
    /// ops_size=N,ops_refill_time=MS (each with an optional *_one_time_burst). `queues=N`
    /// request queues (default 1; the guest's vCPUs then share it), each served by its own thread. Repeat
    /// for more disks.
    #[arg(long = "disk", value_name = "PATH[,readonly][,id=NAME][,engine=io_uring|sync][,queues=N][,bw_*=..][,ops_*=..]")]
    pub disks: Vec<String>,
    /// A virtio network card on the host tap device NAME (opened if it exists, created if we
    /// may), or on a user-mode network (`user`: passt, no root needed; DHCP, DNS, outbound TCP
    /// and UDP, and `hostfwd=tcp:[ADDR:]HOSTPORT-:GUESTPORT` (or udp) forwards host ports to
    /// the guest). Rate limits each way, named as --disk's with rx_ or tx_ in front:
    /// rx_bw_size=BYTES,rx_bw_refill_time=MS, tx_ops_size=N,tx_ops_refill_time=MS, ... Repeat
    /// for more cards. A tap card has `queues=N` queue pairs (default: one per vCPU, up to 8),
    /// each served by its own thread on its own fd of a multi-queue tap.
    #[arg(long = "net", value_name = "tap=NAME[,vhost=on][,queues=N]|user[,hostfwd=...][,mac=MAC][,rx_*=..][,tx_*=..]")]
    pub nets: Vec<String>,
    /// Where the guest's console goes.
    #[arg(long, value_name = "KIND", value_enum, default_value_t = ConsoleKind::Serial)]
    pub console: ConsoleKind,
    /// Give the guest a virtio entropy source (/dev/hwrng), fed from the host's getrandom;
    /// `--rng=bw_size=BYTES,bw_refill_time=MS` (or ops_*) limits how fast.
    #[arg(long, value_name = "LIMITS", num_args = 0..=1, require_equals = true, default_missing_value = "")]
    pub rng: Option<String>,
    /// A virtio-vsock device: the guest is CID N (3 or more); host programs reach its vsock
    /// port P by connecting to the Unix socket PATH and writing `CONNECT P\n` (answered with
    /// `OK <port>\n`); the guest reaches host port P at the Unix socket `PATH_P`. Firecracker's
    /// hybrid vsock.
    #[arg(long, value_name = "cid=N,uds=PATH")]
    pub vsock: Option<String>,
    /// Share the host directory HOSTDIR with the guest (virtio-fs), which mounts it with
    /// `mount -t virtiofs TAG /mnt`. Files the guest creates belong to the user running lguest;
    /// `readonly` refuses every change, whatever the guest mounts with. Repeat for more.
    #[arg(long = "share", value_name = "HOSTDIR:TAG[,readonly]")]
    pub shares: Vec<String>,
    /// System-call filters on the threads that handle guest data.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = crate::seccomp::Mode::Enforce)]
    pub seccomp: crate::seccomp::Mode,
    /// What a guest reboot does. A guest that crashes (triple fault, panic) is never restarted.
    #[arg(long, value_name = "ACTION", value_enum, default_value_t = OnReboot::Exit)]
    pub reboot: OnReboot,
    /// On SIGTERM (or SIGINT when stdin is not a terminal) we press Ctrl-Alt-Del on the guest's
    /// keyboard and give it this long to power off before stopping it (0: stop at once).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub shutdown_timeout: u64,
}

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// The serial reported to the guest: at most 20 bytes (the virtio-blk ID's size).
    pub id: Option<String>,
    /// Bandwidth and operations limits (`bw_*`, `ops_*`).
    pub rate_limit: RateLimit,
    /// How requests reach the image (`engine=`).
    pub engine: DiskEngine,
    /// Request queues (`queues=N`; 1 unless asked: in the lab, one per vCPU did not measure
    /// better, see README's row 4).
    pub queues: u16,
}

/// The most request queues `queues=N` may ask for (a thread and an io_uring each).
pub const MAX_DISK_QUEUES: u16 = 16;

impl DiskConfig {
    /// A writable disk at `path` with no serial and no limits, on the host's best engine, with
    /// one request queue.
    pub fn new(path: impl Into<PathBuf>) -> DiskConfig {
        DiskConfig { path: path.into(), readonly: false, id: None, rate_limit: RateLimit::default(), engine: DiskEngine::Auto, queues: 1 }
    }
}

/// A disk's I/O engine: `engine=io_uring|sync`, or the best the host has when not said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DiskEngine {
    /// io_uring if the host has it, else `Sync` (with a note saying so).
    #[default]
    Auto,
    /// io_uring, or a clear error when the host has none.
    IoUring,
    /// One `preadv`/`pwritev`/`fdatasync` at a time on the disk's worker.
    Sync,
}

/// One `--net`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub backend: NetBackend,
    pub mac: Option<[u8; 6]>,
    /// How fast frames may reach the guest (`rx_bw_*`, `rx_ops_*`) and leave it (`tx_*`).
    pub rx_rate_limit: RateLimit,
    pub tx_rate_limit: RateLimit,
    /// Queue pairs (`queues=N`, a tap's only): `None` is one per vCPU, up to
    /// [`DEFAULT_NET_QUEUE_PAIRS`], falling back to one on a tap made single-queue.
    pub queues: Option<u16>,
}

/// The most queue pairs `queues=N` may ask for (a thread, two queues and a tap fd each).
pub const MAX_NET_QUEUE_PAIRS: u16 = 16;
/// The most queue pairs a card gets without `queues=`, however many vCPUs the guest has.
pub const DEFAULT_NET_QUEUE_PAIRS: u16 = 8;

impl NetConfig {
    /// A card on `backend` with a random MAC, no limits and the default queue pairs.
    pub fn new(backend: NetBackend) -> NetConfig {
        NetConfig { backend, mac: None, rx_rate_limit: RateLimit::default(), tx_rate_limit: RateLimit::default(), queues: None }
    }
}

/// What is at the other end of a network card.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NetBackend {
    /// The host tap device of this name; with `vhost`, the kernel's vhost-net moves the frames.
    Tap { name: String, vhost: bool },
    /// A passt process of ours, with these host ports forwarded to the guest.
    User { forwards: Vec<Forward> },
}

/// One `hostfwd=`: connections to the host's `host_port` (on `host_addr`, or every address)
/// go to the guest's `guest_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Forward {
    pub protocol: Protocol,
    pub host_addr: Option<std::net::IpAddr>,
    pub host_port: u16,
    pub guest_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// The `--vsock` device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    /// The guest's context ID: 3 or more (0-2 are reserved), and below `u32::MAX` (reserved
    /// too; Firecracker refuses it as well).
    pub cid: u64,
    /// Where host programs connect; `<uds_path>_<port>` is where guest connections go.
    pub uds_path: PathBuf,
}

/// Which device carries the guest's console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum ConsoleKind {
    /// ttyS0, the 16550A UART.
    Serial,
    /// hvc0, the virtio console (the default command line then says console=hvc0; a --cmdline
    /// of yours must say it too).
    Virtio,
}

/// What a guest's reboot does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum OnReboot {
    /// lguest exits with status 0.
    Exit,
    /// The same configuration boots again in the same process.
    Restart,
}

/// How many PCI devices a guest can have: one per slot of bus 0, but slot 0 (the host bridge).
pub const MAX_PCI_DEVICES: usize = crate::pci::SLOTS - 1;

/// The longest `--shutdown-timeout`: a day is already more than any guest needs.
pub const MAX_SHUTDOWN_TIMEOUT_SECS: u64 = 24 * 60 * 60;

/// A validated description of one VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u64,
    pub cpus: u8,
    pub boot_timeline: bool,
    /// Where `--boot-timeline=FILE.json` writes its Chrome trace.
    pub boot_trace: Option<PathBuf>,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub console: ConsoleKind,
    pub rng: bool,
    /// How fast the entropy source may give (`--rng=bw_*,ops_*`, the API's entropy limiter).
    pub rng_rate_limit: RateLimit,
    pub vsock: Option<VsockConfig>,
    pub shares: Vec<ShareConfig>,
    /// Note the guest pages that change, for Diff snapshots (`track_dirty_pages`).
    pub track_dirty_pages: bool,
    pub seccomp: crate::seccomp::Mode,
    pub on_reboot: OnReboot,
    pub shutdown_timeout: Duration,
}

impl VmConfig {
    /// Checks what can be checked without touching KVM or the files.
    pub fn from_args(args: RunArgs) -> Result<VmConfig> {
        let machine = match &args.config_file {
            Some(file) => machine_from_file(file)?,
            None => machine_from_flags(&args)?,
        };
        let mut disks = args.disks.iter().map(|d| parse_disk(d)).collect::<Result<Vec<_>>>()?;
        let mut nets = args.nets.iter().map(|n| parse_net(n)).collect::<Result<Vec<_>>>()?;
        let vsock = args.vsock.as_deref().map(parse_vsock).transpose()?;
        let shares = parse_shares(&args.shares)?;
        let shutdown_timeout = validate_shutdown_timeout(args.shutdown_timeout)?;
        let rng_rate_limit = args.rng.as_deref().map(parse_rng_limits).transpose()?.unwrap_or_default();
        let RunArgs { boot_timeline, rng, console, seccomp, reboot: on_reboot, track_dirty_pages, .. } = args;
        let VmConfig { kernel, initrd, mut cmdline, memory_mib, cpus, disks: file_disks, nets: file_nets, rng: file_rng, vsock: file_vsock, track_dirty_pages: file_tracking, .. } =
            machine;
        let track_dirty_pages = track_dirty_pages || file_tracking;
        if console == ConsoleKind::Virtio && cmdline == DEFAULT_CMDLINE {
            cmdline = DEFAULT_CMDLINE.replace("console=ttyS0", "console=hvc0");
        }
        disks.splice(0..0, file_disks);
        nets.splice(0..0, file_nets);
        let rng = rng.is_some() || file_rng;
        let vsock = vsock.or(file_vsock);
        let config = VmConfig {
            kernel,
            initrd,
            cmdline,
            memory_mib,
            cpus,
            boot_timeline: boot_timeline.is_some(),
            boot_trace: boot_timeline.flatten(),
            disks,
            nets,
            console,
            rng,
            rng_rate_limit,
            vsock,
            shares,
            track_dirty_pages,
            on_reboot,
            shutdown_timeout,
            seccomp,
        };
        config.check_limits()?;
        Ok(config)
    }

    /// The limits that depend on more than one flag: every virtio device takes a PCI slot.
    pub fn check_limits(&self) -> Result<()> {
        let asked = self.pci_devices();
        if asked > MAX_PCI_DEVICES {
            return Err(Error::TooManyDevices { asked, max: MAX_PCI_DEVICES });
        }
        Ok(())
    }

    /// How many PCI slots the devices take: one per disk, network card, entropy source,
    /// virtio console, vsock device and shared directory.
    pub fn pci_devices(&self) -> usize {
        self.disks.len()
            + self.shares.len()
            + self.nets.len()
            + usize::from(self.rng)
            + usize::from(self.console == ConsoleKind::Virtio)
            + usize::from(self.vsock.is_some())
    }

    /// The defaults `lguest run --kernel KERNEL` would get, for code that builds a
    /// configuration without a command line (tests, fuzz targets).
    pub fn for_kernel(kernel: PathBuf) -> VmConfig {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            memory_mib: 512,
            cpus: 1,
            boot_timeline: false,
            boot_trace: None,
            disks: Vec::new(),
            nets: Vec::new(),
            console: ConsoleKind::Serial,
            rng: false,
            rng_rate_limit: RateLimit::default(),
            vsock: None,
            shares: Vec::new(),
            track_dirty_pages: false,
            on_reboot: OnReboot::Exit,
            shutdown_timeout: Duration::from_secs(10),
            seccomp: crate::seccomp::Mode::Enforce,
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

/// The machine `--kernel`, `--initrd`, `--cmdline`, `--memory` and `--cpus` describe.
fn machine_from_flags(args: &RunArgs) -> Result<VmConfig> {
    // clap requires --kernel unless --config-file is given.
    let kernel = args.kernel.clone().ok_or_else(|| Error::BadFlag { flag: "--kernel", value: String::new(), why: "a kernel is needed".into() })?;
    check_readable(&kernel, "kernel")?;
    if let Some(initrd) = &args.initrd {
        check_readable(initrd, "initrd")?;
    }
    let mut machine = VmConfig::for_kernel(kernel);
    machine.initrd = args.initrd.clone();
    machine.cmdline = args.cmdline.clone();
    machine.memory_mib = parse_memory(&args.memory)?;
    machine.cpus = validate_cpus(args.cpus)?;
    Ok(machine)
}

/// The machine a Firecracker configuration file describes.
pub fn machine_from_file(path: &std::path::Path) -> Result<VmConfig> {
    let json = std::fs::read(path).map_err(|source| Error::ReadFile { what: "--config-file", path: path.to_path_buf(), source })?;
    let in_file = |source| Error::ConfigFile { path: path.to_path_buf(), source: Box::new(source) };
    crate::api::plan::Plan::from_json(&json).and_then(|plan| plan.to_vm_config()).map_err(in_file)
}

/// `512M`, `512MiB`, `2G`, `2GiB` or `512` (MiB).
pub fn parse_memory(value: &str) -> Result<u64> {
    let bad = |why: &str| Error::BadMemory { value: value.to_string(), why: why.to_string() };
    let trimmed = value.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    if digits.is_empty() {
        return Err(bad("expected a size such as 512M, 2G or 1024"));
    }
    let number: u64 = digits.parse().map_err(|_| bad("the number is too large"))?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        _ => return Err(bad("the unit must be M or G")),
    };
    let mib = number.checked_mul(scale).ok_or_else(|| bad("the number is too large"))?;
    if mib < MIN_MEMORY_MIB {
        return Err(bad(&format!("a guest needs at least {MIN_MEMORY_MIB} MiB")));
    }
    if mib > MAX_MEMORY_MIB {
        return Err(bad(&format!("more than {} GiB is surely a typo", MAX_MEMORY_MIB >> 10)));
    }
    Ok(mib)
}

/// The longest disk serial: virtio-blk's ID field is 20 bytes.
pub const MAX_DISK_ID: usize = 20;

/// `PATH[,readonly][,id=NAME][,engine=io_uring|sync][,bw_size=BYTES,bw_refill_time=MS[,bw_one_time_burst=BYTES]]
/// [,ops_size=N,ops_refill_time=MS[,ops_one_time_burst=N]]`. The file itself is opened (and
/// checked) when the disk is built.
pub fn parse_disk(value: &str) -> Result<DiskConfig> {
    let bad = |why: String| Error::BadFlag { flag: "--disk", value: value.to_string(), why };
    let mut parts = value.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| bad("expected PATH[,readonly][,id=NAME]".into()))?;
    let mut disk = DiskConfig::new(path);
    let mut limits = RateLimitBuilder::default();
    for option in parts {
        match option.split_once('=') {
            None if option == "readonly" => disk.readonly = true,
            Some(("id", id)) if !id.is_empty() && id.len() <= MAX_DISK_ID && id.is_ascii() => disk.id = Some(id.to_string()),
            Some(("id", _)) => return Err(bad(format!("id must be 1 to {MAX_DISK_ID} ASCII characters"))),
            Some(("engine", "io_uring")) => disk.engine = DiskEngine::IoUring,
            Some(("engine", "sync")) => disk.engine = DiskEngine::Sync,
            Some(("engine", other)) => return Err(bad(format!("unknown engine '{other}' (expected io_uring or sync)"))),
            Some(("queues", text)) => disk.queues = parse_disk_queues(text).ok_or_else(|| bad(format!("queues={text}: expected a number of request queues from 1 to {MAX_DISK_QUEUES}")))?,
            Some((key, number)) if rate_limiter::set_option(&mut limits, key, number).map_err(|e| bad(e.to_string()))? => {}
            _ => return Err(bad(format!("unknown option '{option}' (expected readonly, id=NAME, engine=io_uring|sync, queues=N, bw_* or ops_*)"))),
        }
    }
    disk.rate_limit = limits.build().map_err(|e| bad(e.to_string()))?;
    Ok(disk)
}

fn parse_disk_queues(text: &str) -> Option<u16> {
    text.parse().ok().filter(|queues| (1..=MAX_DISK_QUEUES).contains(queues))
}

/// `--rng`'s optional limits: `bw_size=BYTES,bw_refill_time=MS,...` (empty: none).
fn parse_rng_limits(value: &str) -> Result<RateLimit> {
    let bad = |why: String| Error::BadFlag { flag: "--rng", value: value.to_string(), why };
    let mut limits = RateLimitBuilder::default();
    for option in value.split(',').filter(|option| !option.is_empty()) {
        let known = match option.split_once('=') {
            Some((key, number)) => rate_limiter::set_option(&mut limits, key, number).map_err(|e| bad(e.to_string()))?,
            None => false,
        };
        if !known {
            return Err(bad(format!("unknown option '{option}' (expected bw_* or ops_*)")));
        }
    }
    limits.build().map_err(|e| bad(e.to_string()))
}

/// `tap=NAME[,vhost=on|off][,queues=N][,mac=MAC]` or `user[,hostfwd=FORWARD]...[,mac=MAC]`.
pub fn parse_net(value: &str) -> Result<NetConfig> {
    let bad = |why: String| Error::BadFlag { flag: "--net", value: value.to_string(), why };
    let (mut tap, mut user, mut forwards, mut mac, mut vhost, mut queues) = (None, false, Vec::new(), None, None, None);
    let (mut rx, mut tx) = (RateLimitBuilder::default(), RateLimitBuilder::default());
    let mut rate_option = |key: &str, number: &str| -> std::result::Result<bool, rate_limiter::RateOptionError> {
        match (key.strip_prefix("rx_"), key.strip_prefix("tx_")) {
            (Some(key), _) => rate_limiter::set_option(&mut rx, key, number),
            (_, Some(key)) => rate_limiter::set_option(&mut tx, key, number),
            _ => Ok(false),
        }
    };
    for option in value.split(',') {
        match option.split_once('=') {
            None if option == "user" => user = true,
            Some(("vhost", "on")) => vhost = Some(true),
            Some(("vhost", "off")) => vhost = Some(false),
            Some(("vhost", other)) => return Err(bad(format!("vhost={other}: expected vhost=on or vhost=off"))),
            Some(("tap", name)) if !name.is_empty() && name.len() < libc::IFNAMSIZ => tap = Some(name.to_string()),
            Some(("tap", _)) => return Err(bad(format!("a tap name has 1 to {} characters", libc::IFNAMSIZ - 1))),
            Some(("queues", text)) => queues = Some(parse_queue_pairs(text).ok_or_else(|| bad(format!("queues={text}: expected a number of queue pairs from 1 to {MAX_NET_QUEUE_PAIRS}")))?),
            Some(("mac", text)) => mac = Some(parse_mac(text).ok_or_else(|| bad(format!("'{text}' is not a MAC such as 52:54:00:12:34:56")))?),
            Some(("hostfwd", text)) => forwards.push(parse_forward(text).ok_or_else(|| bad(format!("'{text}' is not a forward such as tcp:8080-:80 or udp:127.0.0.1:5353-:53")))?),
            Some((key, number)) if rate_option(key, number).map_err(|e| bad(format!("{}{e}", &key[..3])))? => {}
            _ => return Err(bad(format!("unknown option '{option}' (expected tap=NAME, vhost=on, queues=N, user, hostfwd=FORWARD, mac=MAC, rx_bw_*, rx_ops_*, tx_bw_* or tx_ops_*)"))),
        }
    }
    if user && vhost.is_some() {
        return Err(bad("vhost= goes with a tap: passt's frames don't go through the kernel".into()));
    }
    if user && queues.is_some() {
        return Err(bad("queues= goes with a tap: passt has one link, so a user network card has one queue pair".into()));
    }
    let backend = match (tap, user) {
        (Some(name), false) if forwards.is_empty() => NetBackend::Tap { name, vhost: vhost.unwrap_or(false) },
        (Some(_), false) => return Err(bad("hostfwd= goes with user, not with a tap".into())),
        (None, true) => NetBackend::User { forwards: check_forwards(forwards).map_err(bad)? },
        (Some(_), true) => return Err(bad("a card is on a tap or on user, not both".into())),
        (None, false) => return Err(bad("expected tap=NAME or user".into())),
    };
    let limit = |builder: RateLimitBuilder, prefix: &str| builder.build().map_err(|e| bad(format!("{prefix}{e}")));
    let (rx_rate_limit, tx_rate_limit) = (limit(rx, "rx_")?, limit(tx, "tx_")?);
    if vhost == Some(true) && (rx_rate_limit != RateLimit::default() || tx_rate_limit != RateLimit::default()) {
        return Err(bad("rate limits need lguest's own datapath: vhost-net's frames never pass through lguest; drop vhost=on or the limits".into()));
    }
    Ok(NetConfig { mac, rx_rate_limit, tx_rate_limit, queues, ..NetConfig::new(backend) })
}

fn parse_queue_pairs(text: &str) -> Option<u16> {
    text.parse().ok().filter(|pairs| (1..=MAX_NET_QUEUE_PAIRS).contains(pairs))
}

/// `tcp:HOSTPORT-:GUESTPORT`, as QEMU spells it: `tcp::HOSTPORT-:GUESTPORT`, or with the host
/// address to listen on, `tcp:127.0.0.1:HOSTPORT-:GUESTPORT` (`[::1]` for IPv6); `udp:` alike.
/// Ports are 1 to 65535; the guest side names no address (the guest has one).
fn parse_forward(text: &str) -> Option<Forward> {
    let (protocol, rest) = match text.split_once(':')? {
        ("tcp", rest) => (Protocol::Tcp, rest),
        ("udp", rest) => (Protocol::Udp, rest),
        _ => return None,
    };
    let (host, guest) = rest.rsplit_once('-')?;
    let guest_port = parse_port(guest.strip_prefix(':').unwrap_or(guest))?;
    let (host_addr, host_port) = match host.rsplit_once(':') {
        None => (None, parse_port(host)?),
        Some(("", port)) => (None, parse_port(port)?),
        Some((addr, port)) => {
            let addr = addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or(addr);
            (Some(addr.parse().ok()?), parse_port(port)?)
        }
    };
    Some(Forward { protocol, host_addr, host_port, guest_port })
}

fn parse_port(text: &str) -> Option<u16> {
    text.bytes().all(|b| b.is_ascii_digit()).then(|| text.parse().ok()).flatten().filter(|&port| port != 0)
}

/// One host port can be forwarded once per protocol (and address).
fn check_forwards(forwards: Vec<Forward>) -> std::result::Result<Vec<Forward>, String> {
    for (i, forward) in forwards.iter().enumerate() {
        let twice = forwards[..i].iter().any(|f| (f.protocol, f.host_addr, f.host_port) == (forward.protocol, forward.host_addr, forward.host_port));
        if twice {
            return Err(format!("host port {} is forwarded twice", forward.host_port));
        }
    }
    Ok(forwards)
}

/// The longest `uds` path: a Unix socket address holds 107 bytes, and guest connections to
/// host port P go to `<uds>_P`, up to 11 bytes longer.
pub const MAX_VSOCK_PATH: usize = 107 - 11;

/// What is wrong with a vsock device's settings (`--vsock`, `PUT /vsock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadVsock {
    #[error("cid must be a number from 3 to 4294967294")]
    Cid,
    #[error("uds must be a path of 1 to {MAX_VSOCK_PATH} bytes")]
    Path,
}

impl VsockConfig {
    /// Checks a CID and a socket path as Firecracker does (and that `<path>_<port>` fits).
    pub fn new(cid: u64, uds_path: &str) -> std::result::Result<VsockConfig, BadVsock> {
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(BadVsock::Cid);
        }
        if uds_path.is_empty() || uds_path.len() > MAX_VSOCK_PATH {
            return Err(BadVsock::Path);
        }
        Ok(VsockConfig { cid, uds_path: PathBuf::from(uds_path) })
    }
}

/// `cid=N,uds=PATH`. The socket itself is bound when the device is built.
pub fn parse_vsock(value: &str) -> Result<VsockConfig> {
    let bad = |why: String| Error::BadFlag { flag: "--vsock", value: value.to_string(), why };
    let (mut cid, mut uds_path) = (None, None);
    for option in value.split(',') {
        match option.split_once('=') {
            Some(("cid", text)) => cid = Some(text.parse::<u64>().map_err(|_| bad(BadVsock::Cid.to_string()))?),
            Some(("uds", path)) => uds_path = Some(path),
            _ => return Err(bad(format!("unknown option '{option}' (expected cid=N or uds=PATH)"))),
        }
    }
    match (cid, uds_path) {
        (Some(cid), Some(uds_path)) => VsockConfig::new(cid, uds_path).map_err(|e| bad(e.to_string())),
        _ => Err(bad("expected cid=N,uds=PATH".into())),
    }
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2)?;
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    // A multicast address can't name one card.
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

fn validate_shutdown_timeout(secs: u64) -> Result<Duration> {
    if secs > MAX_SHUTDOWN_TIMEOUT_SECS {
        let why = format!("at most {MAX_SHUTDOWN_TIMEOUT_SECS} seconds (a day)");
        return Err(Error::BadFlag { flag: "--shutdown-timeout", value: secs.to_string(), why });
    }
    Ok(Duration::from_secs(secs))
}

/// Opens the file once, so a typo in a path is reported before anything else happens.
pub fn check_readable(path: &std::path::Path, what: &'static str) -> Result<()> {
    let error = |source| Error::ReadFile { what, path: path.to_path_buf(), source };
    let meta = std::fs::File::open(path).and_then(|f| f.metadata()).map_err(error)?;
    if meta.is_dir() {
        return Err(error(std::io::Error::other("it is a directory")));
    }
    Ok(())
}

/// One vCPU at least; at most 255, the most xAPIC IDs can name. KVM's own limit is checked
/// when the VM is built.
pub fn validate_cpus(cpus: u32) -> Result<u8> {
    match u8::try_from(cpus) {
        Ok(0) => Err(Error::BadCpus { value: cpus, why: "a guest needs at least one vCPU".into() }),
        Ok(n) if n < u8::MAX => Ok(n),
        _ => Err(Error::BadCpus { value: cpus, why: "at most 254 vCPUs are supported".into() }),
    }
}

#[cfg(test)]
pub(crate) mod tests;
