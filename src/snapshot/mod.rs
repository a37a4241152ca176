//! Snapshots: a paused guest saved to two files, and brought back in a new process (or many).
//!
//! Where it sits in a guest's life: `PATCH /vm Paused` parks the vCPUs and stops the device
//! workers ([`crate::control`]); `PUT /snapshot/create` then reaches the main thread (the one
//! thread without a seccomp filter, which may write files and call KVM) as a [`SnapshotJob`].
//! It saves each vCPU on its own parked thread ([`vcpu`]), the irqchip, PIT and kvmclock, the
//! UART, the keyboard controller and every virtio function ([`state`]), and writes them into
//! the snapshot file ([`file`]: versioned, checksummed, postcard) and the guest's RAM into the
//! memory file ([`memory`]): all of it for a Full snapshot, for a Diff only the pages
//! written since the last snapshot ([`dirty`]), which `lguest rebase-snap` ([`rebase`]) merges
//! onto the memory file before it. `lguest restore` or `PUT /snapshot/load` reads them back
//! ([`load`]), builds a VM from the saved configuration (devices opened again from it, with
//! overrides), maps the memory file privately and puts every saved state back before any vCPU
//! runs (see [`crate::vm::Vm::build`]).
//!
//! What it trusts: nothing in the files. A file that is not a snapshot, of another version,
//! truncated or corrupt is refused by [`file`]; what decodes is checked against the limits a
//! command line has ([`validate`]) and again, piece by piece, by the device or ioctl it goes to:
//! queue rings must lie in guest memory, vectors must exist, KVM refuses impossible registers.
//! Each refusal is one line and exit status 2, and no vCPU runs until everything is restored.

pub mod dirty;
pub mod file;
pub mod memory;
pub mod rebase;
pub mod restore;
pub mod save;
pub mod state;
pub mod vcpu;

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use self::file::FileError;
use self::state::Snapshot;
use crate::config::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read the snapshot '{}': {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the snapshot '{}' can't be used: {source}", path.display())]
    File { path: PathBuf, source: FileError },
    #[error("the snapshot can't be restored: {0}")]
    Invalid(String),
    #[error("the snapshot's {what} can't be restored: {why}")]
    Device { what: String, why: String },
    #[error("cannot use the memory file '{}': {why}", path.display())]
    MemoryFile { path: PathBuf, why: String },
    #[error("cannot write {what} '{}': {source}", path.display())]
    Write { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("KVM refused to {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("the microVM must be paused first (PATCH /vm with state Paused)")]
    NotPaused,
    #[error("cannot save the vCPUs: {0}")]
    Vcpus(#[from] crate::control::PauseError),
    #[error("the microVM stopped before the snapshot was taken")]
    Stopping,
    #[error("{what} is not implemented by lguest")]
    NotImplemented { what: &'static str },
    #[error("Diff snapshots are not allowed on uVMs with dirty page tracking disabled; start the VM with track_dirty_pages (PUT /machine-config, PUT /snapshot/load, or --track-dirty-pages)")]
    NotTracking,
}

impl SnapshotError {
    /// 2 for a file or a request the user must change, 1 for the host's failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            SnapshotError::Kvm { .. } | SnapshotError::Vcpus(_) | SnapshotError::Stopping => 1,
            _ => 2,
        }
    }
}

/// `PUT /snapshot/create`: where the two files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRequest {
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
    pub kind: SnapshotKind,
    /// The API's ids of the network cards, in order: what `network_overrides` name them by.
    pub net_ids: Vec<String>,
}

/// What a snapshot's memory file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// All of guest memory.
    Full,
    /// Only the pages written since the last snapshot, at their offsets (a sparse file).
    Diff,
}

/// A snapshot to take, on its way from the API thread to the main thread, and where the
/// answer goes.
#[derive(Debug)]
pub struct SnapshotJob {
    pub request: CreateRequest,
    pub reply: mpsc::Sender<Result<(), SnapshotError>>,
}

/// Reads, checks and decodes the snapshot file at `path`.
pub fn load(path: &Path) -> Result<Snapshot, SnapshotError> {
    let bytes = read_bounded(path)?;
    let snapshot = file::decode(&bytes).map_err(|source| SnapshotError::File { path: path.to_path_buf(), source })?;
    validate(&snapshot)?;
    Ok(snapshot)
}

/// The file's bytes, refused unread if it is larger than any snapshot.
fn read_bounded(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    use std::io::Read;
    let read_error = |source| SnapshotError::Read { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(file::MAX_FILE_LEN + 1).read_to_end(&mut bytes).map_err(read_error)?;
    Ok(bytes)
}

/// The limits a command line would have been held to, and the counts that must agree.
pub fn validate(snapshot: &Snapshot) -> Result<(), SnapshotError> {
    let invalid = |why: String| Err(SnapshotError::Invalid(why));
    let config = &snapshot.config;
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&config.memory_mib) {
        return invalid(format!("its guest has {} MiB of memory, outside {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}", config.memory_mib));
    }
    if config.cpus == 0 || config.cpus == u8::MAX || snapshot.vcpus.len() != usize::from(config.cpus) {
        return invalid(format!("it saves {} vCPUs for a guest of {}", snapshot.vcpus.len(), config.cpus));
    }
    config.check_limits().map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    if snapshot.net_ids.len() != config.nets.len() {
        return invalid(format!("it names {} network cards for a guest of {}", snapshot.net_ids.len(), config.nets.len()));
    }
    if snapshot.devices.len() != config.pci_devices() {
        return invalid(format!("it saves {} devices for a guest of {}", snapshot.devices.len(), config.pci_devices()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
