//! Errors a user can cause or act on, each rendered as one line that says what went wrong and
//! what to do about it. Guest misbehaviour is not here: that is a [`crate::fault::GuestFault`],
//! which stops only the guest.

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

    #[error("/dev/kvm does not exist: this host has no KVM (load the kvm module, or run the demo, which uses the nested lab)")]
    NoKvm,

    #[error("no permission to open /dev/kvm: add your user to the 'kvm' group (then log in again) or run as root")]
    KvmPermission,

    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(std::io::Error),

    #[error("KVM refused {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },

    #[error("cannot set up guest memory: {0}")]
    Memory(String),

    #[error("cannot write {what} into guest memory: {why}")]
    Boot { what: &'static str, why: String },

    #[error("{what}: {source}")]
    Host { what: &'static str, source: std::io::Error },
}

/// Shorthand for the many KVM ioctls that can only fail on a broken or exotic host.
pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

pub type Result<T> = std::result::Result<T, Error>;
