//! virtio-fs (device type 26): a host directory the guest mounts with
//! `mount -t virtiofs TAG /mnt` (`--share HOSTDIR:TAG[,readonly]`), served inside lguest with
//! no daemon of its own.
//!
//! The guest's kernel speaks FUSE over two queues: "hiprio" (FORGET and INTERRUPT, which must
//! not wait behind other requests) and one request queue. The protocol and the passthrough
//! file system are fuse-backend-rs's: its `Server` reads each request straight from the
//! guest's buffers and writes the reply into them. We add:
//!
//! - [`share`]: the rules on the host side (confinement, `readonly`, one owner, no devices),
//!   and directory listings that hold while the guest deletes what it lists ([`listing`]).
//! - [`bridge`]: the crate speaks vm-memory and virtio-queue 0.17, lguest 0.18; the bridge
//!   views the same memory and rings in the older versions.
//! - [`FsWorker`]: the worker thread, with a seccomp role of its own
//!   ([`crate::seccomp::Role::FsWorker`]): the one worker that may open files, because the
//!   passthrough opens what the guest looks up, always relative to the shared directory.
//!
//! Life: the shared directory is opened on the main thread when the VM is built ([`Fs::new`]:
//! a missing directory is the user's error at start); the guest's FUSE_INIT (its mount) opens
//! it again by path, so each mount starts with a fresh inode table. The `Server` outlives
//! activations: a reset and a remount keep serving the same directory.
//!
//! Every request is hostile: the crate bounds reads and writes at 1 MiB, checks lengths
//! against the chain, and answers an unknown opcode with ENOSYS; a request it can't decode gets
//! its chain back with nothing written. What a guest can make lguest hold is bounded:
//!
//! - For one request: the crate reads a body of at most 1 MiB and a page, as long as the
//!   header says, into the request's chain cut at that length ([`cut_at_its_length`]); replies
//!   are written straight into the guest's buffers, one request at a time, so none waits in
//!   lguest; a directory page the passthrough reads is at most [`share::HOST_PAGE`].
//! - Across requests: every inode the guest's kernel holds and every file or directory it has
//!   open keeps one host file descriptor in the passthrough (and about 220 and 85 bytes of
//!   lguest's memory, measured over 14 000 lookups and 4 000 opens), so lguest's open-file
//!   limit bounds them (EMFILE past it, which lguest reports once); the directory listings held
//!   for open handles share the share's [`share::LISTING_BUDGET`].

mod beneath;
pub mod bridge;
#[cfg(any(test, feature = "test-utils"))]
pub mod driver;
mod listing;
pub mod share;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::InHeader;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue_fs::Queue as Queue17;
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use self::bridge::{queue_view, serve, BridgeError, Bridged, Chain, Memory};
use self::share::Share;
use super::queue::clear_kick;
use super::worker::{watch, DeviceWorker};
use super::{device_type, feature, ActivateError, Activation, Device, Signals, VirtioCommon};
use crate::config::{ShareConfig, MAX_SHARE_TAG};
use crate::seccomp::Role;

/// Queue sizes: the Linux driver keeps as many requests in flight as the ring holds.
pub const QUEUE_SIZE: u16 = 1024;
/// The high-priority queue (FORGET, INTERRUPT) and the one request queue, and their tokens.
pub const HIPRIO: usize = 0;
pub const REQUESTS: usize = 1;

/// The FUSE server of one shared directory: shared by the device and its worker.
pub type FsServer = Arc<Server<Share>>;

/// The FUSE server of `share`.
pub fn server_for(share: Share) -> FsServer {
    Arc::new(Server::new(share))
}

/// The passthrough keeps an fd open for every inode the guest's kernel holds (a build tree's
/// worth), far past the usual soft limit of 1024: raise it to the hard limit, as virtiofsd does.
/// Past that, the guest's requests fail with EMFILE ([`share`] says so once).
fn raise_open_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write the one rlimit we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// A virtio-fs device serving one shared directory.
pub struct Fs {
    /// `tag[36]` (NUL-padded) and `num_request_queues` (le32): the whole config space.
    config: [u8; MAX_SHARE_TAG + 4],
    server: FsServer,
    common: VirtioCommon<FsWorker>,
}

impl Fs {
    /// Opens the shared directory; fails if it can't be opened.
    pub fn new(share: &ShareConfig) -> io::Result<Fs> {
        raise_open_file_limit();
        Ok(Fs::with_server(&share.tag, server_for(Share::open(&share.dir, share.readonly)?)))
    }

    /// A device around a server that is ready (the tag is cut at 36 bytes).
    pub fn with_server(tag: &str, server: FsServer) -> Fs {
        let mut config = [0; MAX_SHARE_TAG + 4];
        let tag = &tag.as_bytes()[..tag.len().min(MAX_SHARE_TAG)];
        config[..tag.len()].copy_from_slice(tag);
        config[MAX_SHARE_TAG..].copy_from_slice(&1u32.to_le_bytes());
        Fs { config, server, common: VirtioCommon::default() }
    }
}

impl Device for Fs {
    type Handler = FsWorker;
    const DEVICE_TYPE: u32 = device_type::FS;
    const WORKER_NAME: &'static str = "virtio-fs";

    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn handler(&self, mut activation: Activation) -> Result<FsWorker, ActivateError> {
        // virtio-fs came after virtio 1.0: there is no legacy driver to serve.
        if activation.features & feature::VERSION_1 == 0 {
            return Err(ActivateError::LegacyDriver);
        }
        let hiprio = activation.take_queue(HIPRIO, "hiprio")?;
        let requests = activation.take_queue(REQUESTS, "request")?;
        let backend = |e: BridgeError| ActivateError::Backend { what: "cannot view the guest's memory", source: io::Error::other(e) };
        let queues = [queue_view(&hiprio.queue).map_err(backend)?, queue_view(&requests.queue).map_err(backend)?];
        Ok(FsWorker {
            mem: Bridged::new(activation.mem).map_err(backend)?,
            queues,
            kicks: [hiprio.kick, requests.kick],
            signals: activation.signals,
            server: self.server.clone(),
        })
    }

    fn common(&mut self) -> &mut VirtioCommon<FsWorker> {
        &mut self.common
    }
}

/// The device's side of its worker thread: both queues, one FUSE server.
pub struct FsWorker {
    mem: Bridged,
    queues: [Queue17; 2],
    kicks: [EventFd; 2],
    signals: Signals,
    server: FsServer,
}

impl DeviceWorker for FsWorker {
    type Error = BridgeError;

    fn role(&self) -> Role {
        Role::FsWorker
    }

    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        watch(epoll, &self.kicks[HIPRIO], HIPRIO as u64)?;
        watch(epoll, &self.kicks[REQUESTS], REQUESTS as u64)
    }

    fn handle(&mut self, _: &Epoll, token: u64, _: EventSet) -> Result<(), BridgeError> {
        let index = if token == HIPRIO as u64 { HIPRIO } else { REQUESTS };
        clear_kick(&self.kicks[index]);
        let (mem, server) = (self.mem.view(), &self.server);
        serve(&mut self.queues[index], &self.mem, &self.signals, index, |chain| answer(server, mem, chain))?;
        Ok(())
    }
}

/// Serves one FUSE request; returns how many bytes of reply went into the chain. A chain the
/// crate can't read or write (a buffer outside memory) or a request it can't decode fails
/// alone: it goes back with nothing written.
fn answer(server: &Server<Share>, mem: &Memory, chain: Chain<'_>) -> u32 {
    let mut reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(reader) => reader,
        Err(e) => return refused(&e),
    };
    if let Err(e) = known_opcode(&reader).and_then(|()| cut_at_its_length(&mut reader)) {
        return refused(&e);
    }
    let writer = match VirtioFsWriter::new(mem, chain) {
        Ok(writer) => Writer::from(writer),
        Err(e) => return refused(&e),
    };
    match server.handle_message(reader, writer, None, None) {
        Ok(written) => u32::try_from(written).unwrap_or(u32::MAX),
        Err(e) => refused(&e),
    }
}

/// The crate turns an opcode into its `Opcode` enum (for a trace line) by transmuting it,
/// which is undefined for the numbers its enum skips: FUSE's retired 7 (GETDIR) and 19. Such
/// a request never reaches it. (Unknown numbers past the enum are safe: it answers ENOSYS.)
fn known_opcode<S: vm_memory_fs::bitmap::BitmapSlice>(reader: &Reader<'_, S>) -> io::Result<()> {
    let header: InHeader = reader.clone().read_obj()?;
    match header.opcode {
        7 | 19 => Err(io::Error::other(format!("opcode {} is not FUSE's", header.opcode))),
        _ => Ok(()),
    }
}

/// Cuts `reader` at the length the request's header gives: the crate then sees no more of the
/// chain than the request is. Its handlers bound what they read by that length (at most 1 MiB
/// and a page), but IOCTL sizes a buffer by its own `in_size`, checked only against what the
/// chain holds, and a chain may name the same guest memory a thousand times over: gigabytes
/// allocated and filled for one request. The Linux driver's header gives exactly what its
/// readable buffers hold; a header that claims more than they hold is refused here.
fn cut_at_its_length<S: vm_memory_fs::bitmap::BitmapSlice>(reader: &mut Reader<'_, S>) -> io::Result<()> {
    let header: InHeader = reader.clone().read_obj()?;
    let held = reader.available_bytes();
    reader
        .split_at(header.len as usize)
        .map(drop)
        .map_err(|_| io::Error::other(format!("its header says {} bytes, its buffers hold {held}", header.len)))
}

fn refused(why: &dyn std::fmt::Display) -> u32 {
    tracing::debug!("virtio-fs: request refused: {why}");
    0
}
