//! The virtio 1.x PCI transport: what a guest's `virtio_pci` driver talks to.
//!
//! Each device is one PCI function with a single 32 KiB memory BAR, laid out as the vendor
//! capabilities in its configuration space announce:
//!
//! | BAR offset | what                                                                  |
//! |------------|-----------------------------------------------------------------------|
//! | `0x0000`   | common config: features, status, queue selection and addresses        |
//! | `0x1000`   | ISR status (read to clear), for drivers without MSI-X                 |
//! | `0x2000`   | the device's own config space ([`VirtioDevice::read_config`])          |
//! | `0x3000`   | notify: queue *n* at `0x3000 + 4n`, caught by KVM as an ioeventfd      |
//! | `0x4000`   | the MSI-X table; its pending bits at `0x6000`                          |
//!
//! The driver's path through it is the spec's (4.1.5.1): reset, ACKNOWLEDGE, DRIVER, read and
//! write features, FEATURES_OK (refused unless the features are ones we offered and include
//! VERSION_1), queue set-up, DRIVER_OK. At DRIVER_OK the queues are checked against guest
//! memory and handed to the device in an [`Activation`]. Every register write comes from the
//! guest and is checked: a queue that doesn't fit in memory, a size that is not a power of two
//! or an MSI-X vector that doesn't exist leaves the device NEEDS_RESET or the register at its
//! "no" value, never the VMM in trouble.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use crate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{device_type, feature, ActiveQueue, Activation, BackendUpdate, Signals, UpdateError, VirtioDevice};
use crate::bus::BusDevice;
use crate::pci::config::{Identity, PciConfig};
use crate::pci::msix::{MsiRoutes, MsixTable, MsixVectors, NO_VECTOR};
use crate::pci::PciDevice;

/// The BAR's regions (see the table above).
pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;

const VIRTIO_VENDOR: u16 = 0x1af4;
const VIRTIO_MODERN_DEVICE_BASE: u16 = 0x1040;

/// Device status bits (virtio spec 2.1).
mod status {
    pub const FEATURES_OK: u8 = 8;
    pub const DRIVER_OK: u8 = 4;
    pub const NEEDS_RESET: u8 = 64;
}

/// The `cfg_type` of each virtio vendor capability (virtio spec 4.1.4).
mod cap {
    pub const VENDOR: u8 = 0x09;
    pub const MSIX: u8 = 0x11;
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
}

/// The driver's settings for one queue, kept as registers until DRIVER_OK turns them into a
/// [`Queue`]. Nothing here is validated until then.
struct QueueRegs {
    max_size: u16,
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
    /// Where the device takes up the queue when it starts: 0, or a restored guest's position.
    resume_at: u16,
    kick: EventFd,
}

impl QueueRegs {
    fn new(max_size: u16) -> std::io::Result<QueueRegs> {
        let kick = EventFd::new(libc::EFD_NONBLOCK)?;
        Ok(QueueRegs { max_size, size: max_size, vector: NO_VECTOR, enabled: false, desc: 0, driver: 0, device: 0, resume_at: 0, kick })
    }

    fn reset(&mut self) {
        // Notifications left over from before the reset mean nothing to the next driver.
        let _ = self.kick.read();
        (self.size, self.vector, self.enabled) = (self.max_size, NO_VECTOR, false);
        (self.desc, self.driver, self.device, self.resume_at) = (0, 0, 0, 0);
    }
}

/// One virtio device on PCI: its configuration space, its BAR, and the driver's state.
pub struct VirtioPci {
    name: Arc<str>,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    config: PciConfig,
    msix_cap: usize,
    msix: MsixTable,
    bar: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_vector: u16,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    isr: Arc<AtomicU8>,
    broken: Arc<AtomicBool>,
}

/// A virtio device of a running VM, shared by its bus slot and the VM's controls.
pub type SharedVirtio = Arc<std::sync::Mutex<VirtioPci>>;

/// A drive of a running VM, as the API holds it to put another image in (`PATCH /drives`).
#[derive(Clone)]
pub struct DriveHandle(Arc<std::sync::Mutex<VirtioPci>>);

impl DriveHandle {
    pub fn new(pci: Arc<std::sync::Mutex<VirtioPci>>) -> DriveHandle {
        DriveHandle(pci)
    }

    /// Puts the image at `path` in the drive (opened as the old one was); the guest's driver
    /// then rereads the size.
    pub fn change_medium(&self, path: std::path::PathBuf) -> Result<(), UpdateError> {
        let update = BackendUpdate::Medium(crate::config::DiskConfig::new(path));
        crate::bus::lock(&self.0).update_backend(update)
    }
}

impl VirtioPci {
    /// The VM is paused: the device's worker stops serving its queues (see [`VirtioDevice::pause`]).
    pub fn pause(&mut self) {
        self.device.pause();
    }

    /// The VM resumes: the worker serves the queues again. A worker that can't be restarted
    /// leaves the device NEEDS_RESET, as a failed activation does.
    pub fn resume(&mut self) {
        if let Err(e) = self.device.resume() {
            self.signals().device_broken(&format_args!("cannot resume: {e}"));
        }
    }

    /// Changes the device's backend from outside the guest, and tells a running driver that
    /// the config space changed (a config-change interrupt).
    pub fn update_backend(&mut self, update: BackendUpdate) -> Result<(), UpdateError> {
        self.device.update_backend(update)?;
        if self.status & status::DRIVER_OK != 0 {
            self.signals().config_changed();
        }
        Ok(())
    }

    /// Wraps `device` as a PCI function whose BAR sits at `bar` (aligned to [`BAR_SIZE`], below
    /// 4 GiB). Fails only when the host runs out of eventfds or KVM refuses an irqfd.
    pub fn new(
        name: String,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        bar: u32,
        routes: Arc<MsiRoutes>,
    ) -> std::io::Result<VirtioPci> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max_size| QueueRegs::new(max_size))
            .collect::<std::io::Result<Vec<_>>>()?;
        let vectors = Arc::new(MsixVectors::new(queues.len() + 1)?);
        let msix = MsixTable::new(vectors, routes).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        let mut config = PciConfig::new(&identity(device.device_type()));
        config.add_bar(0, bar, BAR_SIZE as u32);
        let msix_cap = add_capabilities(&mut config, &msix, queues.len());
        Ok(VirtioPci {
            name: name.into(),
            device,
            mem,
            config,
            msix_cap,
            msix,
            bar: u64::from(bar),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            queues,
            isr: Arc::default(),
            broken: Arc::default(),
        })
    }

    /// Each queue's notify address in guest memory and the eventfd KVM should signal when the
    /// guest writes there (register them with `KVM_IOEVENTFD`).
    pub fn notify_eventfds(&self) -> impl Iterator<Item = (u64, &EventFd)> {
        self.queues.iter().enumerate().map(|(i, q)| (self.bar + NOTIFY + i as u64 * NOTIFY_MULTIPLIER, &q.kick))
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | feature::VERSION_1 | feature::RING_INDIRECT_DESC | feature::RING_EVENT_IDX
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        let queue = self.queues.get(usize::from(self.queue_select));
        let feature_word = match self.device_feature_select {
            0 => self.offered_features() as u32,
            1 => (self.offered_features() >> 32) as u32,
            _ => 0,
        };
        let driver_word = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        let status = self.status | if self.broken.load(Ordering::SeqCst) { status::NEEDS_RESET } else { 0 };
        let mut regs = [0u8; COMMON_LEN as usize];
        let mut put = |at: usize, bytes: &[u8]| regs[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x00, &self.device_feature_select.to_le_bytes());
        put(0x04, &feature_word.to_le_bytes());
        put(0x08, &self.driver_feature_select.to_le_bytes());
        put(0x0c, &driver_word.to_le_bytes());
        put(0x10, &self.config_vector.to_le_bytes());
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[status]);
        put(0x15, &[0]); // config generation: our config spaces change atomically
        put(0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = queue {
            put(0x18, &q.size.to_le_bytes());
            put(0x1a, &q.vector.to_le_bytes());
            put(0x1c, &u16::from(q.enabled).to_le_bytes());
            put(0x1e, &self.queue_select.to_le_bytes()); // notify offset: queue n at n × multiplier
            put(0x20, &q.desc.to_le_bytes());
            put(0x28, &q.driver.to_le_bytes());
            put(0x30, &q.device.to_le_bytes());
        }
        copy_window(&regs, offset, data);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let value = le_value(data);
        let vectors = self.msix.vectors().len();
        let valid_vector = |v: u64| if (v as usize) < vectors { v as u16 } else { NO_VECTOR };
        let live = self.status & status::DRIVER_OK != 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) if self.status & status::FEATURES_OK == 0 => self.write_driver_features(value as u32),
            (0x10, 2) => self.config_vector = valid_vector(value),
            (0x14, 1) => self.write_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (_, _) if live => tracing::debug!(device = %self.name, offset, "queue register written after DRIVER_OK; ignored"),
            (0x18, 2) => self.with_idle_queue(|q| q.size = value as u16),
            (0x1a, 2) => self.with_idle_queue(|q| q.vector = valid_vector(value)),
            (0x1c, 2) if value == 1 => self.with_idle_queue(|q| q.enabled = true),
            (0x20..=0x37, 4 | 8) if offset.is_multiple_of(data.len() as u64) => {
                self.with_idle_queue(|q| {
                    let field = match offset {
                        0x20..=0x27 => &mut q.desc,
                        0x28..=0x2f => &mut q.driver,
                        _ => &mut q.device,
                    };
                    *field = merge_u64(*field, offset % 8, data);
                })
            }
            _ => tracing::debug!(device = %self.name, offset, len = data.len(), "ignored write to common config"),
        }
    }

    /// Queue registers can't change once the driver enabled the queue.
    fn with_idle_queue(&mut self, change: impl FnOnce(&mut QueueRegs)) {
        if let Some(q) = self.selected_queue().filter(|q| !q.enabled) {
            change(q);
        }
    }

    fn write_driver_features(&mut self, word: u32) {
        let word = u64::from(word);
        match self.driver_feature_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | word,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (word << 32),
            _ => {}
        }
    }

    fn write_status(&mut self, new: u8) {
        if new == 0 {
            return self.reset();
        }
        let mut new = new & !status::NEEDS_RESET;
        let rising = new & !self.status;
        if rising & status::FEATURES_OK != 0 && !self.features_acceptable() {
            new &= !status::FEATURES_OK;
        }
        if rising & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            new &= !status::DRIVER_OK;
        }
        self.status = new;
        if rising & new & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    /// The driver may only accept what we offered, and must speak virtio 1.
    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.offered_features() == 0 && self.driver_features & feature::VERSION_1 != 0
    }

    fn activate(&mut self) {
        if let Err(why) = self.start_device() {
            self.signals().device_broken(&why);
        }
    }

    /// Hands the device its queues, checked against guest memory; says why it can't start.
    fn start_device(&mut self) -> Result<(), String> {
        let event_idx = self.driver_features & feature::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, regs) in self.queues.iter().enumerate() {
            queues.push(active_queue(regs, &self.mem, event_idx).map_err(|why| format!("queue {index}: {why}"))?);
        }
        let activation =
            Activation { mem: self.mem.clone(), queues, features: self.driver_features, signals: self.signals() };
        self.device.activate(activation).map_err(|e| format!("cannot start: {e}"))
    }

    fn signals(&self) -> Signals {
        let queue_vectors: Arc<[u16]> = self.queues.iter().map(|q| q.vector).collect();
        Signals::new(
            self.name.clone(),
            self.msix.vectors().clone(),
            queue_vectors,
            self.config_vector,
            self.isr.clone(),
            self.broken.clone(),
        )
    }

    /// Back to the state at power-on, as a status write of 0 asks (virtio spec 2.1.2).
    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.config_vector = NO_VECTOR;
        self.queue_select = 0;
        self.isr.store(0, Ordering::SeqCst);
        self.broken.store(false, Ordering::SeqCst);
    }

    /// A write to a notify address that KVM didn't catch (no ioeventfd on this host, or a
    /// write of a width KVM doesn't match) is passed on to the queue's eventfd by hand.
    fn notify(&self, offset: u64) {
        if offset.is_multiple_of(NOTIFY_MULTIPLIER) {
            if let Some(q) = self.queues.get((offset / NOTIFY_MULTIPLIER) as usize) {
                let _ = q.kick.write(1);
            }
        }
    }

    fn update_msix_control(&mut self) {
        let control = self.config.read_u16(self.msix_cap + 2);
        let enabled = control & (1 << 15) != 0;
        let masked = control & (1 << 14) != 0;
        // Without MSI-X enabled we have no other way to interrupt: hold interrupts as pending.
        self.msix.set_function_masked(masked || !enabled);
    }
}

/// Why a queue the driver enabled can't be served: the driver's settings (all but
/// [`QueueSetupError::Eventfd`], the host's).
#[derive(Debug, thiserror::Error)]
enum QueueSetupError {
    #[error("size {size}: {source}")]
    Size { size: u16, source: virtio_queue::Error },
    #[error(transparent)]
    Ring(#[from] virtio_queue::Error),
    #[error("its rings are not in guest memory")]
    NotInMemory,
    #[error("cannot share its eventfd: {0}")]
    Eventfd(#[source] std::io::Error),
}

/// Turns a queue's registers into a [`Queue`], checked against guest memory, or says why not.
fn active_queue(regs: &QueueRegs, mem: &GuestMemoryMmap, event_idx: bool) -> Result<Option<ActiveQueue>, QueueSetupError> {
    if !regs.enabled {
        return Ok(None);
    }
    let mut queue = Queue::new(regs.max_size)?;
    queue.try_set_size(regs.size).map_err(|source| QueueSetupError::Size { size: regs.size, source })?;
    queue.try_set_desc_table_address(GuestAddress(regs.desc))?;
    queue.try_set_avail_ring_address(GuestAddress(regs.driver))?;
    queue.try_set_used_ring_address(GuestAddress(regs.device))?;
    queue.set_event_idx(event_idx);
    queue.set_next_avail(regs.resume_at);
    queue.set_next_used(regs.resume_at);
    queue.set_ready(true);
    if !queue.is_valid(mem) {
        return Err(QueueSetupError::NotInMemory);
    }
    let kick = regs.kick.try_clone().map_err(QueueSetupError::Eventfd)?;
    Ok(Some(ActiveQueue { queue, kick }))
}

/// A VM going away is a reset for its devices: their worker threads stop (they hold the
/// guest's memory), their backends stay open until the device itself is dropped.
impl Drop for VirtioPci {
    fn drop(&mut self) {
        self.device.reset();
    }
}

impl BusDevice for VirtioPci {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            COMMON..=0x0fff => self.read_common(offset, data),
            // A read of no bytes (BusDevice promises to cope with any width) clears nothing.
            ISR => {
                if let Some(first) = data.first_mut() {
                    *first = self.isr.swap(0, Ordering::SeqCst);
                }
            }
            DEVICE..=0x2fff => self.device.read_config(offset - DEVICE, data),
            MSIX_TABLE..=0x5fff => self.msix.read_table(offset - MSIX_TABLE, data),
            MSIX_PBA..=0x7fff => self.msix.read_pba(offset - MSIX_PBA, data),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            COMMON..=0x0fff => self.write_common(offset, data),
            DEVICE..=0x2fff => self.device.write_config(offset - DEVICE, data),
            NOTIFY..=0x3fff => self.notify(offset - NOTIFY),
            MSIX_TABLE..=0x5fff => self.msix.write_table(offset - MSIX_TABLE, data),
            _ => {}
        }
    }
}

impl PciDevice for VirtioPci {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let control = self.msix_cap + 2..self.msix_cap + 4;
        if offset < control.end && offset + data.len() > control.start {
            self.update_msix_control();
        }
    }
}

/// PCI IDs for a modern (virtio 1.x only) device of `device_type`, with the class code that
/// type has on real hardware.
fn identity(device_type: u32) -> Identity {
    let class = match device_type {
        device_type::NET => 0x02_00_00,
        device_type::BLOCK => 0x01_00_00,
        // Other communication controllers, as QEMU's vhost-vsock-pci says.
        device_type::CONSOLE | device_type::VSOCK => 0x07_80_00,
        _ => 0xff_00_00,
    };
    Identity {
        vendor: VIRTIO_VENDOR,
        device: VIRTIO_MODERN_DEVICE_BASE + device_type as u16,
        revision: 1,
        class,
        subsystem_vendor: VIRTIO_VENDOR,
        subsystem: 0x40,
    }
}

/// The MSI-X capability and the four virtio capabilities; returns the MSI-X one's offset.
fn add_capabilities(config: &mut PciConfig, msix: &MsixTable, queues: usize) -> usize {
    let vectors = msix.vectors().len() as u16;
    let mut msix_cap = vec![cap::MSIX, 0];
    msix_cap.extend_from_slice(&(vectors - 1).to_le_bytes());
    msix_cap.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes()); // BIR 0
    msix_cap.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
    // Only the enable and function-mask bits of the control word are the guest's.
    let msix_at = config.add_capability(&msix_cap, &[0, 0, 0, 0xc0]);
    config.add_capability(&virtio_cap(cap::COMMON, COMMON, COMMON_LEN, None), &[]);
    config.add_capability(&virtio_cap(cap::ISR, ISR, 1, None), &[]);
    config.add_capability(&virtio_cap(cap::DEVICE, DEVICE, DEVICE_LEN, None), &[]);
    let notify_len = (queues as u64 * NOTIFY_MULTIPLIER).clamp(NOTIFY_MULTIPLIER, NOTIFY_LEN);
    config.add_capability(&virtio_cap(cap::NOTIFY, NOTIFY, notify_len, Some(NOTIFY_MULTIPLIER as u32)), &[]);
    msix_at
}

/// `struct virtio_pci_cap` (and `virtio_pci_notify_cap` when a multiplier is given), BAR 0.
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, notify_multiplier: Option<u32>) -> Vec<u8> {
    let cap_len = if notify_multiplier.is_some() { 20 } else { 16 };
    let mut bytes = vec![cap::VENDOR, 0, cap_len, cfg_type, 0, 0, 0, 0];
    bytes.extend_from_slice(&(offset as u32).to_le_bytes());
    bytes.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(multiplier) = notify_multiplier {
        bytes.extend_from_slice(&multiplier.to_le_bytes());
    }
    bytes
}

/// Copies the bytes of `regs` at `offset` into `data`; bytes past the end read as zero.
fn copy_window(regs: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset).ok().and_then(|o| regs.get(o + i)).copied().unwrap_or(0);
    }
}

fn le_value(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(bytes)
}

/// Writes `data` (4 or 8 bytes) into `field` at byte `at` (0 or 4).
fn merge_u64(field: u64, at: u64, data: &[u8]) -> u64 {
    let mut bytes = field.to_le_bytes();
    let at = at as usize;
    let n = data.len().min(8 - at);
    bytes[at..at + n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(bytes)
}

mod state;
#[cfg(test)]
mod tests;
