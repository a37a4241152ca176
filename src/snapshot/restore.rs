//! Putting a snapshot back into a freshly built VM, before any of its vCPUs runs
//! ([`crate::vm::Vm::build_from`] calls these), and the overrides a restore may make to the
//! saved configuration.

use std::path::PathBuf;

use kvm_ioctls::{VcpuFd, VmFd};

use super::state::Snapshot;
use super::{vcpu as kvm_state, SnapshotError};
use crate::bus::lock;
use crate::config::NetBackend;
use crate::vm::Origin;
use crate::virtio::transport::SharedVirtio;

/// Restores vCPU `id` from the snapshot.
pub fn vcpu(fd: &VcpuFd, saved: &Snapshot, id: u8) -> Result<(), SnapshotError> {
    let state = saved.vcpus.get(usize::from(id)).ok_or_else(|| SnapshotError::Invalid(format!("vCPU {id} is not in it")))?;
    kvm_state::restore_vcpu(fd, state)
}

/// Restores the interrupt controllers, the PIT, kvmclock and every virtio function. The
/// devices the configuration made must be the ones saved, in the same order.
pub fn machine(vm: &VmFd, devices: &[SharedVirtio], saved: &Snapshot) -> Result<(), SnapshotError> {
    if devices.len() != saved.devices.len() {
        return Err(SnapshotError::Invalid(format!("it has {} devices, the configuration {}", saved.devices.len(), devices.len())));
    }
    for (slot, (device, state)) in devices.iter().zip(&saved.devices).enumerate() {
        let mut device = lock(device);
        device.restore_state(state).map_err(|why| SnapshotError::Device { what: format!("device in PCI slot {}", slot + 1), why })?;
    }
    kvm_state::restore_vm(vm, &saved.vm)
}

/// `lguest restore`: a saved guest, run in the foreground as `lguest run` runs one.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The snapshot file (`PUT /snapshot/create`'s snapshot_path).
    #[arg(long, value_name = "PATH")]
    pub snapshot: PathBuf,
    /// The memory file saved with it (its mem_file_path).
    #[arg(long, value_name = "PATH")]
    pub memory_file: PathBuf,
    /// Put the network card IFACE (`net0`, `net1`, ... for cards of `lguest run`; the API's
    /// iface_id otherwise) on the host tap TAP instead of the saved one. Repeat for more cards.
    #[arg(long = "net", value_name = "IFACE=TAP")]
    pub nets: Vec<String>,
    /// Serve Firecracker's REST API on this Unix socket while the guest runs.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Note which pages the guest changes from now on, for Diff snapshots (`PUT
    /// /snapshot/create` on --api-sock).
    #[arg(long)]
    pub track_dirty_pages: bool,
}

impl RestoreArgs {
    /// The snapshot and its overrides, read and checked.
    pub fn load(&self) -> Result<Restore, SnapshotError> {
        let net_overrides = self.nets.iter().map(|text| parse_override(text)).collect::<Result<Vec<_>, _>>()?;
        let request = LoadRequest {
            snapshot_path: self.snapshot.clone(),
            memory_file: self.memory_file.clone(),
            net_overrides,
            paused: false,
            track_dirty_pages: self.track_dirty_pages,
        };
        request.load()
    }
}

/// What `lguest restore` and `PUT /snapshot/load` ask for: read by the main thread, whose
/// stack (unlike the API thread's small one) has room for decoding a snapshot.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    pub snapshot_path: PathBuf,
    pub memory_file: PathBuf,
    /// (`iface_id`, tap) pairs: the cards put on other taps.
    pub net_overrides: Vec<(String, String)>,
    /// Keep the guest paused until a `PATCH /vm Resumed`.
    pub paused: bool,
    /// Track dirty pages in the restored VM (whatever the saved one did), as Firecracker does.
    pub track_dirty_pages: bool,
}

impl LoadRequest {
    /// Reads and checks the snapshot, and makes its configuration, with each network card
    /// named in the overrides put on its tap.
    pub fn load(&self) -> Result<Restore, SnapshotError> {
        let mut snapshot = super::load(&self.snapshot_path)?;
        snapshot.config.track_dirty_pages = self.track_dirty_pages;
        for (iface_id, tap) in &self.net_overrides {
            let index = snapshot.net_ids.iter().position(|id| id == iface_id).ok_or_else(|| {
                SnapshotError::Invalid(format!("it has no network interface '{iface_id}' (it has: {})", snapshot.net_ids.join(", ")))
            })?;
            if tap.is_empty() || tap.len() >= libc::IFNAMSIZ {
                return Err(SnapshotError::Invalid(format!("'{tap}' is not a tap name (1 to {} characters)", libc::IFNAMSIZ - 1)));
            }
            snapshot.config.nets[index].backend = NetBackend::Tap { name: tap.clone(), vhost: false };
        }
        Ok(Restore { snapshot, memory_file: self.memory_file.clone(), paused: self.paused })
    }
}

/// `IFACE=TAP`.
fn parse_override(text: &str) -> Result<(String, String), SnapshotError> {
    match text.split_once('=') {
        Some((iface, tap)) if !iface.is_empty() => Ok((iface.to_string(), tap.to_string())),
        _ => Err(SnapshotError::Invalid(format!("--net '{text}': expected IFACE=TAP, such as net0=tap1"))),
    }
}

/// A snapshot to restore, as `lguest restore` and `PUT /snapshot/load` ask for it.
pub struct Restore {
    pub snapshot: Snapshot,
    pub memory_file: PathBuf,
    /// Keep the guest paused until a `PATCH /vm Resumed`.
    pub paused: bool,
}

impl Restore {
    pub fn origin(&self) -> Origin<'_> {
        Origin::Snapshot { saved: &self.snapshot, memory_file: &self.memory_file, paused: self.paused }
    }
}
