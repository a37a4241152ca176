//! Errors a user can cause or act on, each rendered as one line that says what went wrong and
//! what to do about it. Guest misbehaviour is not here: that is a [`crate::fault::GuestFault`],
//! which stops only the guest.
//!
//! Each error is either the request's fault (a flag, a file or a device the user named: exit
//! status 2, "change what you asked for") or the host's (KVM, memory, threads: exit status 1,
//! the same status a host failure gets once the guest runs). [`Error::exit_code`] says which.

use std::path::PathBuf;

/// Everything that can stop us before (or while) building the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} '{}': {source}", path.display())]
    ReadFile { what: &'static str, path: PathBuf, source: std::io::Error },

    #[error("'{}' is not a kernel lguest can boot: expected a bzImage (64-bit boot protocol 2.12+) or an ELF vmlinux ({why})", path.display())]
    NotAKernel { path: PathBuf, why: String },

    #[error("{what} ({size_mib} MiB) does not fit in guest memory ({memory_mib} MiB); raise --memory")]
    TooBig { what: &'static str, size_mib: u64, memory_mib: u64 },

    #[error("kernel command line is {len} bytes but this kernel accepts at most {max}; shorten --cmdline")]
    CmdlineTooLong { len: usize, max: usize },

    #[error("kernel command line is not valid: {0}")]
    BadCmdline(String),

    #[error("invalid --memory '{value}': {why}")]
    BadMemory { value: String, why: String },

    #[error("invalid --cpus {value}: {why}")]
    BadCpus { value: u32, why: String },

    #[error("invalid {flag} '{value}': {why}")]
    BadFlag { flag: &'static str, value: String, why: String },

    #[error("cannot use disk image '{}': {why}", path.display())]
    Disk { path: PathBuf, why: String },

    #[error("cannot use tap device '{name}': {why}")]
    Tap { name: String, why: String },

    #[error(transparent)]
    Passt(#[from] crate::passt::PasstError),
    #[error("--net tap={name},vhost=on: {source}")]
    Vhost { name: String, source: crate::virtio::net::vhost::VhostOpenError },
    #[error("cannot share '{}' (--share): {source}; check that it is a directory you can read", dir.display())]
    Share { dir: PathBuf, source: std::io::Error },
    #[error("cannot set up --vsock: {0}")]
    Vsock(#[from] crate::virtio::vsock::muxer::MuxerError),

    #[error("/dev/kvm does not exist: this host has no KVM (load the kvm module, or run the demo, which uses the nested lab)")]
    NoKvm,

    #[error("no permission to open /dev/kvm: add your user to the 'kvm' group (then log in again) or run as root")]
    KvmPermission,

    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(std::io::Error),

    #[error("KVM refused {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },

    #[error("{asked} PCI devices asked for (--disk, --net, --rng, --console virtio, --vsock, --share), but the PCI bus has room for {max}; ask for fewer")]
    TooManyDevices { asked: usize, max: usize },

    #[error("cannot set up guest memory: {0}")]
    Memory(String),

    #[error("cannot write {what} into guest memory: {source}")]
    GuestWrite { what: &'static str, source: Box<dyn std::error::Error + Send + Sync> },

    #[error("{what}: {why} (a bug in lguest: please report it)")]
    Internal { what: &'static str, why: String },

    #[error("{what}: {source}")]
    Host { what: &'static str, source: std::io::Error },

    #[error("--config-file '{}': {source}", path.display())]
    ConfigFile { path: PathBuf, source: Box<crate::api::ApiError> },

    #[error("{0}")]
    ApiSocket(#[from] crate::api::server::SocketError),

    #[error("{0}")]
    Api(Box<crate::api::ApiError>),

    #[error("{0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),

    #[error("{0}")]
    Exec(crate::exec::ExecError),
}

impl Error {
    /// 2 when the request was wrong (what the user named can't be used as asked), 1 when the
    /// host failed (the same status a host failure gets while the guest runs).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::ReadFile { .. }
            | Error::NotAKernel { .. }
            | Error::TooBig { .. }
            | Error::CmdlineTooLong { .. }
            | Error::BadCmdline(_)
            | Error::BadMemory { .. }
            | Error::BadCpus { .. }
            | Error::BadFlag { .. }
            | Error::TooManyDevices { .. }
            | Error::Disk { .. }
            | Error::Share { .. }
            | Error::Tap { .. }
            | Error::ConfigFile { .. }
            | Error::Api(_) => 2,
            Error::ApiSocket(crate::api::server::SocketError::Thread(_)) => 1,
            Error::Snapshot(e) => e.exit_code(),
            Error::Exec(e) => e.exit_code(),
            Error::ApiSocket(_) => 2,
            // A socket path in use or that can't be bound is the user's to change; an epoll
            // set we can't make is the host's failure.
            Error::Vsock(e) => match e {
                crate::virtio::vsock::muxer::MuxerError::Epoll(_) => 1,
                _ => 2,
            },
            Error::NoKvm
            | Error::KvmPermission
            | Error::KvmOpen(_)
            | Error::Kvm { .. }
            | Error::Memory(_)
            | Error::Passt(_)
            | Error::Vhost { .. }
            | Error::GuestWrite { .. }
            | Error::Internal { .. }
            | Error::Host { .. } => 1,
        }
    }
}

/// Shorthand for writes of boot structures into guest memory, which fail only when our own
/// layout is wrong or the host can't read a file it already opened.
pub fn guest_write<E: std::error::Error + Send + Sync + 'static>(what: &'static str) -> impl FnOnce(E) -> Error {
    move |source| Error::GuestWrite { what, source: Box::new(source) }
}

/// Shorthand for the many KVM ioctls that can only fail on a broken or exotic host.
pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

pub type Result<T> = std::result::Result<T, Error>;
