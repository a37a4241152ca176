//! Taking a snapshot of a paused VM, on the main thread. With dirty page tracking on, every
//! snapshot takes (and so clears) the dirty page logs: a Full one so that the next Diff holds
//! what changed after it, a Diff one to save those pages alone.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use crate::memory::GuestMemoryMmap;

use super::state::{Snapshot, VcpuState};
use super::{dirty, file, memory, vcpu, CreateRequest, SnapshotError, SnapshotKind};
use crate::bus::lock;
use crate::config::VmConfig;
use crate::control::PauseGate;
use crate::devices::i8042::I8042;
use crate::devices::serial::SerialPort;
use crate::virtio::transport::SharedVirtio;

/// What of a running VM a snapshot reads.
pub struct VmParts<'a> {
    pub config: &'a VmConfig,
    pub kvm: &'a Kvm,
    pub vm: &'a VmFd,
    pub gate: &'a Arc<PauseGate>,
    pub serial: &'a Mutex<SerialPort>,
    pub keyboard: &'a Mutex<I8042>,
    pub devices: &'a [SharedVirtio],
    pub mem: &'a GuestMemoryMmap,
}

/// Saves the paused VM `parts` describes into the request's two files.
pub fn save(parts: &VmParts<'_>, request: &CreateRequest) -> Result<(), SnapshotError> {
    if !parts.gate.is_paused() {
        return Err(SnapshotError::NotPaused);
    }
    if let Some(what) = unsavable(parts.config) {
        return Err(SnapshotError::NotImplemented { what });
    }
    if request.kind == SnapshotKind::Diff && !parts.config.track_dirty_pages {
        return Err(SnapshotError::NotTracking);
    }
    if request.net_ids.len() != parts.config.nets.len() {
        return Err(SnapshotError::Invalid(format!("{} network interface ids for {} cards", request.net_ids.len(), parts.config.nets.len())));
    }
    let snapshot = Snapshot {
        config: parts.config.clone(),
        net_ids: request.net_ids.clone(),
        vm: vcpu::save_vm(parts.vm)?,
        vcpus: save_vcpus(parts)?,
        serial: lock(parts.serial).save_state(),
        keyboard: lock(parts.keyboard).save_state(),
        devices: parts.devices.iter().map(|device| lock(device).save_state()).collect(),
    };
    let bytes = file::encode(&snapshot).map_err(|source| SnapshotError::File { path: request.snapshot_path.clone(), source })?;
    let write_error = |source| SnapshotError::Write { what: "the snapshot", path: request.snapshot_path.clone(), source };
    std::fs::write(&request.snapshot_path, bytes).map_err(write_error)?;
    let dirty = parts.config.track_dirty_pages.then(|| dirty::take(parts.vm, parts.mem)).transpose()?;
    match (request.kind, dirty) {
        (SnapshotKind::Diff, Some(dirty)) => memory::save_diff(parts.mem, &dirty, &request.mem_file_path),
        (SnapshotKind::Diff, None) => Err(SnapshotError::NotTracking),
        (SnapshotKind::Full, _) => memory::save(parts.mem, &request.mem_file_path),
    }
}

/// What one vCPU thread's errand gives back.
type SavedVcpu = Result<VcpuState, SnapshotError>;

/// Each vCPU's state, read by its own parked thread.
fn save_vcpus(parts: &VmParts<'_>) -> Result<Vec<VcpuState>, SnapshotError> {
    let indices = vcpu::msr_indices(parts.kvm)?;
    let count = usize::from(parts.config.cpus);
    let saved: Arc<Mutex<Vec<Option<SavedVcpu>>>> = Arc::new(Mutex::new((0..count).map(|_| None).collect()));
    let into = saved.clone();
    parts.gate.run_errand(Arc::new(move |id: u8, fd: &VcpuFd| {
        if let Some(slot) = lock(&into).get_mut(usize::from(id)) {
            *slot = Some(vcpu::save_vcpu(fd, &indices));
        }
    }))?;
    let results = std::mem::take(&mut *lock(&saved));
    results
        .into_iter()
        .enumerate()
        .map(|(id, result)| result.unwrap_or_else(|| Err(SnapshotError::Invalid(format!("vCPU {id} was not saved (its thread is gone)")))))
        .collect()
}

/// What in `config` a snapshot could not bring back whole, if anything: a vhost-net card's
/// ring positions live in the host kernel, and a shared directory's open files and inode
/// numbers in lguest's file descriptors.
pub fn unsavable(config: &VmConfig) -> Option<&'static str> {
    if config.nets.iter().any(|net| matches!(net.backend, crate::config::NetBackend::Tap { vhost: true, .. })) {
        return Some("a snapshot of a VM with a vhost=on card");
    }
    if !config.shares.is_empty() {
        return Some("a snapshot of a VM with a --share directory");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_net, ShareConfig};

    #[test]
    fn vhost_cards_and_shared_directories_are_not_saved() {
        let mut config = VmConfig::for_kernel("vmlinux".into());
        assert_eq!(unsavable(&config), None);
        config.nets.push(parse_net("tap=tap0").expect("valid"));
        assert_eq!(unsavable(&config), None, "a card on lguest's own datapath is saved");
        config.nets.push(parse_net("tap=tap1,vhost=on").expect("valid"));
        assert_eq!(unsavable(&config), Some("a snapshot of a VM with a vhost=on card"));
        config.nets.pop();
        config.shares.push(ShareConfig { dir: "/tmp".into(), tag: "t".into(), readonly: false });
        assert_eq!(unsavable(&config), Some("a snapshot of a VM with a --share directory"));
    }
}
