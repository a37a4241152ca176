//! The virtio block device (virtio spec 1.2, section 5.2): a raw disk image as the guest's
//! /dev/vda, /dev/vdb, ...
//!
//! The image is opened, locked and measured when the VM is built ([`Block::new`], in
//! [`disk`]), so that a wrong path or an image another VMM is using stops us before the guest
//! starts, with one line saying why; its I/O engine is chosen then too ([`engine`]): io_uring
//! ([`uring`]) when the host has it, else plain system calls. The disk has one request queue,
//! or `queues=N` (VIRTIO_BLK_F_MQ when more than one), so that vCPUs submitting at once don't
//! wait on each other: Linux gives each CPU a queue of its own while there are enough. (One per
//! vCPU is not the default: in the nested lab, where two vCPUs and the workers' polling share
//! two CPUs, it did not measure better; README's row 4 has the numbers.) Once
//! the driver is ready, each queue it enabled is served on a worker thread of its own
//! ([`request`]), with an engine of its own, in batches: every
//! request the guest made available is checked and turned into host operations on the guest's
//! own buffers, the engine carries the whole batch out, and the chains go back at once. Their
//! interrupt is held while the guest keeps submitting ([`coalesce`]): one per burst of
//! requests, not one per batch (and none the driver's event index doesn't ask for).
//!
//! We trust the image to be a disk (any bytes will do) and nothing the guest puts in the queue:
//! see [`request`] for what a malformed request gets.

mod coalesce;
mod disk;
mod engine;
mod request;
#[cfg(test)]
mod tests;
mod uring;

use std::mem::offset_of;
use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};

use self::disk::{Disk, SECTOR_SIZE};
use self::engine::SharedEngine;
pub use self::request::{QueueSlot, RequestQueue, RATE_LIMIT_TIMER};
use super::{DeviceState, StateMismatch, device_type, ActivateError, Activation, BackendUpdate, Device, UpdateError, VirtioCommon};
use crate::bus::lock;
use crate::config::DiskConfig;
use crate::control::DiskHandle;
use crate::error::{Error, Result};
use crate::rate_limiter::{SharedLimiter, TimerDuty};

/// The request queue's size: deep enough to keep a fast host disk busy.
pub const QUEUE_SIZE: u16 = 256;
/// The first request queue's index, and its kick's token: the only queue a driver without
/// VIRTIO_BLK_F_MQ uses. Queue *i*'s kick is token *i*.
pub const REQUESTS: usize = 0;
/// Segments per request; the header and status take the other two descriptors of a chain.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Ranges per DISCARD or WRITE_ZEROES request.
const MAX_DISCARD_SEGMENTS: u32 = 16;
/// Sectors per discard range (1 GiB): keeps one request from holding the disk for long.
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// The config space, up to the secure-erase fields we don't offer.
const CONFIG_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// A virtio-blk device backed by a raw image file.
pub struct Block {
    /// The image in the drive, shared with the worker, which takes it anew for every pass
    /// over the queue: [`Device::update_backend`] can put another one in while the guest runs.
    medium: Arc<Mutex<Arc<Disk>>>,
    /// What the drive was opened as: a new medium keeps its read-only flag and serial.
    opened_as: DiskConfig,
    /// The `bw_*`/`ops_*` limiter (which the API may change) and the counters: kept here so
    /// that they outlive a driver reset.
    live: DiskHandle,
    /// How each queue's requests reach the image: chosen once, kept across resets and media.
    engines: Vec<SharedEngine>,
    /// Every queue's largest size; their number is the disk's queue count.
    queue_sizes: Vec<u16>,
    features: u64,
    config: [u8; CONFIG_LEN],
    /// Reset stops serving; the image stays open (and locked) for the next activation.
    common: VirtioCommon<RequestQueue>,
}

impl Block {
    /// Opens and locks the image `config` names, and sets up an engine for each of its
    /// `config.queues` request queues. Errors are one line naming the file.
    pub fn new(config: &DiskConfig) -> Result<Block> {
        let queues = config.queues;
        let disk = Disk::open(config)?;
        let engines = engine::choose(config, usize::from(queues))?;
        let limiter = SharedLimiter::new(config.rate_limit)
            .map_err(|source| Error::Host { what: "cannot create a disk's rate-limit timer", source })?;
        Ok(Block {
            features: features(&disk, queues),
            config: config_space(&disk, queues),
            medium: Arc::new(Mutex::new(Arc::new(disk))),
            opened_as: config.clone(),
            live: DiskHandle { limiter, metrics: Arc::default() },
            engines,
            queue_sizes: vec![QUEUE_SIZE; usize::from(queues)],
            common: VirtioCommon::default(),
        })
    }

    /// What the API reaches of the disk while it runs.
    pub fn handle(&self) -> DiskHandle {
        self.live.clone()
    }

    /// The disk's size in 512-byte sectors.
    #[cfg(test)]
    pub fn sectors(&self) -> u64 {
        lock(&self.medium).sectors
    }
}

impl Device for Block {
    type Handler = RequestQueue;
    const DEVICE_TYPE: u32 = device_type::BLOCK;
    const WORKER_NAME: &'static str = "virtio-blk";

    fn queue_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn offered_features(&self) -> u64 {
        self.features
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    /// The first queue's handler: the whole disk for a driver that uses one queue.
    fn handler(&self, activation: Activation) -> std::result::Result<RequestQueue, ActivateError> {
        let mut handlers = self.handlers(activation)?;
        Ok(handlers.swap_remove(0))
    }

    /// One handler per queue the driver enabled (the first it must), each on its own worker.
    fn handlers(&self, mut activation: Activation) -> std::result::Result<Vec<RequestQueue>, ActivateError> {
        let first = activation.take_queue(REQUESTS, "request")?;
        let flush = activation.features & bit(VIRTIO_BLK_F_FLUSH) != 0;
        let more = (REQUESTS + 1..self.engines.len()).filter_map(|index| Some((index, activation.take_optional_queue(index)?)));
        let queues: Vec<_> = std::iter::once((REQUESTS, first)).chain(more).collect();
        // The rate limiter's timer wakes the first queue's worker, which kicks the others.
        let others = queues[1..].iter().map(|(_, active)| active.kick.try_clone()).collect::<std::io::Result<Vec<_>>>();
        let others = others.map_err(|source| ActivateError::Backend { what: "cannot share a disk queue's kick", source })?;
        let handlers = queues.into_iter().zip(TimerDuty::of_queues(others)).map(|((index, active), timer)| {
            let slot = QueueSlot { index, active, engine: Arc::clone(&self.engines[index]), timer };
            RequestQueue::new(Arc::clone(&self.medium), slot, activation.mem.clone(), activation.signals.clone(), flush, self.live.clone())
        });
        Ok(handlers.collect())
    }

    /// A new image in the drive: opened (and locked) as the old one was, its size in the config
    /// space. Requests already taken finish on the old image; the next pass uses the new one.
    /// The offered features stay (the driver has accepted them): a new image that can't punch
    /// holes answers discards with UNSUPP.
    fn save_state(&self) -> DeviceState {
        DeviceState::Block { sectors: lock(&self.medium).sectors }
    }

    /// The image is opened again from the configuration; the guest's file system on it only
    /// makes sense if it is the same size (a different image of the same size is the user's
    /// business, as with any disk swapped under a sleeping machine).
    fn restore_state(&mut self, saved: &DeviceState) -> std::result::Result<(), StateMismatch> {
        let DeviceState::Block { sectors } = saved else { return Err(StateMismatch::Kind { saved: saved.clone() }) };
        let here = lock(&self.medium).sectors;
        if *sectors != here {
            let path = self.opened_as.path.display();
            return Err(StateMismatch::Changed(format!("disk image '{path}' has {here} sectors, but {sectors} when the snapshot was taken")));
        }
        Ok(())
    }

    fn change_backend(&mut self, update: BackendUpdate) -> std::result::Result<(), UpdateError> {
        let BackendUpdate::Medium(config) = update;
        let config = DiskConfig { path: config.path, ..self.opened_as.clone() };
        let disk = Disk::open(&config)?;
        let capacity = offset_of!(virtio_blk_config, capacity);
        self.config[capacity..capacity + 8].copy_from_slice(&disk.sectors.to_le_bytes());
        *lock(&self.medium) = Arc::new(disk);
        self.opened_as = config;
        Ok(())
    }

    fn common(&mut self) -> &mut VirtioCommon<RequestQueue> {
        &mut self.common
    }
}

fn bit(feature: u32) -> u64 {
    1 << feature
}

fn features(disk: &Disk, queues: u16) -> u64 {
    let mut features = bit(VIRTIO_BLK_F_FLUSH) | bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE);
    if queues > 1 {
        features |= bit(VIRTIO_BLK_F_MQ);
    }
    if disk.readonly {
        features |= bit(VIRTIO_BLK_F_RO);
    }
    if disk.can_punch_holes {
        features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    features
}

/// `struct virtio_blk_config`, little-endian, as far as the features we offer use it.
fn config_space(disk: &Disk, queues: u16) -> [u8; CONFIG_LEN] {
    let mut config = [0; CONFIG_LEN];
    let mut put = |offset: usize, bytes: &[u8]| config[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(offset_of!(virtio_blk_config, capacity), &disk.sectors.to_le_bytes());
    put(offset_of!(virtio_blk_config, seg_max), &SEG_MAX.to_le_bytes());
    put(offset_of!(virtio_blk_config, blk_size), &(SECTOR_SIZE as u32).to_le_bytes());
    put(offset_of!(virtio_blk_config, num_queues), &queues.to_le_bytes());
    if disk.can_punch_holes {
        put(offset_of!(virtio_blk_config, max_discard_sectors), &MAX_DISCARD_SECTORS.to_le_bytes());
        put(offset_of!(virtio_blk_config, max_discard_seg), &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(offset_of!(virtio_blk_config, discard_sector_alignment), &disk.discard_alignment.to_le_bytes());
        put(offset_of!(virtio_blk_config, max_write_zeroes_sectors), &MAX_DISCARD_SECTORS.to_le_bytes());
        put(offset_of!(virtio_blk_config, max_write_zeroes_seg), &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    }
    config
}
