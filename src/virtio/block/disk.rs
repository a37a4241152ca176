//! The host side of a virtio disk: one raw image, opened, checked and locked once when the VM is
//! built, then read and written in place by the disk's worker thread.
//!
//! Data moves straight between the page cache and the guest's own buffers ([`IoVecs`]): no
//! bounce buffer, no copy of ours. The methods here are the plain system calls (one `preadv` or
//! `pwritev` per request) the sync engine makes; the io_uring engine hands the same file to
//! its ring ([`super::uring`]). What reaches this
//! module has been bounds-checked by the request code; the file itself is trusted only to be the
//! size it was at open (another process truncating it under us turns into I/O errors).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, ErrorKind, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

use crate::config::DiskConfig;
use crate::error::Error;
use crate::virtio::iovec::{iovec_count, IoVecs, MAX_IOVECS};

/// Virtio-blk counts in 512-byte sectors, whatever the host's block size.
pub const SECTOR_SIZE: u64 = 512;
pub const SECTOR_SHIFT: u32 = 9;
/// The serial a guest reads with GET_ID.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Where the discard probe punches, past the end of the file and aligned so that the block
/// holding the file's last bytes is never touched, whatever the file system's block size.
const PROBE_ALIGN: u64 = 1 << 16;

/// An open, locked disk image.
pub struct Disk {
    file: File,
    /// For log messages.
    pub name: String,
    pub sectors: u64,
    pub readonly: bool,
    /// Whether the file can punch holes, which DISCARD and WRITE_ZEROES are built on.
    pub can_punch_holes: bool,
    /// The host file system's block size in sectors: discards finer than that free nothing.
    pub discard_alignment: u32,
    /// Which transfers the file can do without blocking when it can (`RWF_NOWAIT`): only those
    /// does io_uring complete inline; the rest it hands to kernel threads, a detour that costs
    /// more than it saves for a file in RAM (tmpfs has neither, ext4 reads only).
    pub nowait: NoWait,
    pub id: [u8; ID_BYTES],
    /// Cleared the first time the file system says it can't zero a range in place, after which
    /// WRITE_ZEROES punches holes instead (tmpfs, for one, only does the latter).
    zero_range_works: AtomicBool,
}

impl Disk {
    /// Opens `config.path` for reading (and writing unless read-only), locks it against other
    /// VMMs, and measures it.
    pub fn open(config: &DiskConfig) -> crate::error::Result<Disk> {
        let path = &config.path;
        let fail = |why: OpenError| Error::Disk { path: path.clone(), why: why.to_string() };
        check_kind(path).map_err(fail)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(!config.readonly)
            .open(path)
            .map_err(|e| fail(explain_open_error(e, config.readonly)))?;
        lock(&file, config.readonly).map_err(fail)?;
        let bytes = file.seek(SeekFrom::End(0)).map_err(|e| fail(OpenError::Size(e)))?;
        let sectors = bytes >> SECTOR_SHIFT;
        if sectors == 0 {
            return Err(fail(OpenError::TooSmall { bytes }));
        }
        if !bytes.is_multiple_of(SECTOR_SIZE) {
            tracing::warn!(
                "disk image '{}' is {bytes} bytes, not a multiple of {SECTOR_SIZE}: the guest sees only the first {} bytes",
                path.display(),
                sectors << SECTOR_SHIFT
            );
        }
        let can_punch_holes = !config.readonly && punch_hole_works(&file, bytes);
        let block_size = file.metadata().map(|m| m.blksize()).unwrap_or(SECTOR_SIZE);
        let nowait = NoWait::probe(&file, config.readonly);
        Ok(Disk {
            name: path.display().to_string(),
            sectors,
            readonly: config.readonly,
            can_punch_holes,
            discard_alignment: u32::try_from(block_size >> SECTOR_SHIFT).unwrap_or(1).max(1),
            id: disk_id(config),
            nowait,
            zero_range_works: AtomicBool::new(true),
            file,
        })
    }

    /// Reads from `offset` into the guest's buffers, all of them or fails.
    pub fn read_into(&self, buffers: &mut IoVecs<'_>, offset: u64) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        transfer_all(buffers.as_mut_slice(), offset, |iovecs, offset| {
            // SAFETY: every iovec points into a mapping of guest memory that `IoVecs` checked
            // and keeps borrowed (`transfer_all` only trims their fronts), so the kernel writes
            // only there. No Rust reference
            // into guest memory exists; the guest racing its own buffer is its own business,
            // as with any DMA.
            unsafe { libc::preadv(fd, iovecs.as_ptr(), iovec_count(iovecs), offset) }
        })
    }

    /// Writes the guest's buffers at `offset`, all of them or fails.
    pub fn write_from(&self, buffers: &mut IoVecs<'_>, offset: u64) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        transfer_all(buffers.as_mut_slice(), offset, |iovecs, offset| {
            // SAFETY: as in `read_into`; here the kernel only reads the guest's buffers.
            unsafe { libc::pwritev(fd, iovecs.as_ptr(), iovec_count(iovecs), offset) }
        })
    }

    /// Makes every completed write durable: the guest's FLUSH.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Gives `len` bytes at `offset` back to the host file system (they then read as zeros).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(&self.file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    /// Whether zeroing a range in place (keeping it allocated) is worth trying: true until the
    /// file system has once said it can't.
    pub fn zeroes_in_place(&self) -> bool {
        self.zero_range_works.load(Ordering::Relaxed)
    }

    /// Makes `len` bytes at `offset` read as zeros, keeping them allocated unless `may_unmap`.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if !may_unmap && self.zeroes_in_place() {
            let zeroed = fallocate(&self.file, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len);
            match zeroed {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.zero_range_works.store(false, Ordering::Relaxed),
                done => return done,
            }
        }
        self.discard(offset, len)
    }
}

/// The image, for an engine that hands it to the kernel (io_uring).
impl AsRawFd for Disk {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Whether reads and writes of a file may be tried without blocking (`RWF_NOWAIT`): a file
/// system that can't answers EOPNOTSUPP at once, whatever the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoWait {
    pub reads: bool,
    pub writes: bool,
}

impl NoWait {
    /// Reads the first sector with `RWF_NOWAIT` and, unless read-only, writes the same bytes
    /// back with it (the file is ours alone: it is locked, and the guest isn't running yet).
    /// EAGAIN ("not now") counts as a yes.
    fn probe(file: &File, readonly: bool) -> NoWait {
        let mut sector = [0u8; SECTOR_SIZE as usize];
        let iovec = libc::iovec { iov_base: sector.as_mut_ptr().cast(), iov_len: sector.len() };
        let fd = file.as_raw_fd();
        // SAFETY: the iovec points at `sector`, alive and ours for the call.
        let read = unsafe { libc::preadv2(fd, &iovec, 1, 0, libc::RWF_NOWAIT) };
        let reads = read >= 0 || last_error_is(libc::EAGAIN);
        // The plain read gives the bytes to write back when the first try said "not now".
        // SAFETY: as above.
        let have_sector = read == SECTOR_SIZE as isize || unsafe { libc::preadv(fd, &iovec, 1, 0) } == SECTOR_SIZE as isize;
        let writes = !readonly && have_sector && {
            // SAFETY: as above; the kernel only reads `sector`, which holds the file's own bytes.
            let written = unsafe { libc::pwritev2(fd, &iovec, 1, 0, libc::RWF_NOWAIT) };
            written >= 0 || last_error_is(libc::EAGAIN)
        };
        NoWait { reads, writes }
    }
}

fn last_error_is(errno: libc::c_int) -> bool {
    io::Error::last_os_error().raw_os_error() == Some(errno)
}

/// Runs `op` (a `preadv` or `pwritev`) until every byte of `iovecs` has moved, at most
/// [`MAX_IOVECS`] iovecs a call, resuming after short transfers.
fn transfer_all(
    iovecs: &mut [libc::iovec],
    offset: u64,
    mut op: impl FnMut(&[libc::iovec], libc::off_t) -> isize,
) -> io::Result<()> {
    let mut offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    let mut first = 0;
    while first < iovecs.len() {
        let end = iovecs.len().min(first + MAX_IOVECS);
        let moved = op(&iovecs[first..end], offset);
        let moved = match usize::try_from(moved) {
            Ok(0) => return Err(io::Error::new(ErrorKind::UnexpectedEof, "the image ended early (was it truncated?)")),
            Ok(moved) => moved,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
        };
        offset = offset.saturating_add(libc::off_t::try_from(moved).unwrap_or(libc::off_t::MAX));
        first = skip_transferred(iovecs, first, moved);
    }
    Ok(())
}

/// Consumes `moved` bytes from `iovecs[first..]`; returns the index of the first iovec with
/// bytes left, having trimmed its front.
fn skip_transferred(iovecs: &mut [libc::iovec], mut first: usize, mut moved: usize) -> usize {
    while let Some(iovec) = iovecs.get_mut(first) {
        if moved < iovec.iov_len {
            iovec.iov_base = iovec.iov_base.cast::<u8>().wrapping_add(moved).cast();
            iovec.iov_len -= moved;
            break;
        }
        moved -= iovec.iov_len;
        first += 1;
    }
    first
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let invalid = |_| io::Error::from(ErrorKind::InvalidInput);
    let (offset, len) = (libc::off_t::try_from(offset).map_err(invalid)?, libc::off_t::try_from(len).map_err(invalid)?);
    loop {
        // SAFETY: fallocate reads only its integer arguments, and `file` is open.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Punches a hole past the end of the file, where there is nothing to lose, to learn whether
/// the file system can. A zero-length probe would tell nothing: fallocate refuses it outright.
fn punch_hole_works(file: &File, size: u64) -> bool {
    let Some(offset) = size.checked_next_multiple_of(PROBE_ALIGN) else { return false };
    fallocate(file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, PROBE_ALIGN).is_ok()
}

/// Why an image can't be a disk for the guest: the user's to fix, so each says how.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error("no such file (create one with: truncate -s 1G FILE)")]
    NotFound,
    #[error("permission denied; make it writable, or add ,readonly to give it to the guest read-only")]
    NotWritable,
    #[error("permission denied; make it readable by this user")]
    NotReadable,
    #[error("it is on a read-only file system; add ,readonly")]
    ReadOnlyFileSystem,
    #[error("it is a directory; give the path of an image file")]
    Directory,
    #[error("it is neither a regular file nor a block device")]
    NotAFile,
    #[error("it is in use by another VMM that may write to it")]
    InUseByWriter,
    #[error("it is in use by another VMM (it is locked); stop that VMM first")]
    InUse,
    #[error("cannot lock it: {0}")]
    Lock(#[source] io::Error),
    #[error("cannot find its size: {0}")]
    Size(#[source] io::Error),
    #[error("it is {bytes} bytes long; a disk needs at least one {SECTOR_SIZE}-byte sector")]
    TooSmall { bytes: u64 },
    #[error("{0}")]
    Io(#[source] io::Error),
}

/// Refuses what can't be a disk before opening it: opening a FIFO for reading would block.
fn check_kind(path: &Path) -> Result<(), OpenError> {
    let meta = std::fs::metadata(path).map_err(|e| explain_open_error(e, true))?;
    let kind = meta.file_type();
    if kind.is_dir() {
        return Err(OpenError::Directory);
    }
    if !kind.is_file() && !kind.is_block_device() {
        return Err(OpenError::NotAFile);
    }
    Ok(())
}

fn explain_open_error(e: io::Error, readonly: bool) -> OpenError {
    match e.kind() {
        ErrorKind::NotFound => OpenError::NotFound,
        ErrorKind::PermissionDenied if !readonly => OpenError::NotWritable,
        ErrorKind::PermissionDenied => OpenError::NotReadable,
        ErrorKind::ReadOnlyFilesystem => OpenError::ReadOnlyFileSystem,
        _ => OpenError::Io(e),
    }
}

/// Takes an exclusive lock on an image we write and a shared one on an image we only read, so
/// that a second VMM can neither write an image in use nor read one that may change under it.
/// (`flock` locks belong to the open file, so they also hold between two disks in one VMM.)
fn lock(file: &File, readonly: bool) -> Result<(), OpenError> {
    let locked = if readonly { file.try_lock_shared() } else { file.try_lock() };
    match locked {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) if readonly => Err(OpenError::InUseByWriter),
        Err(TryLockError::WouldBlock) => Err(OpenError::InUse),
        Err(TryLockError::Error(e)) => Err(OpenError::Lock(e)),
    }
}

/// The configured serial, or else the file's name (printable ASCII only), zero padded.
fn disk_id(config: &DiskConfig) -> [u8; ID_BYTES] {
    let printable = |b: &u8| if b.is_ascii_graphic() { *b } else { b'_' };
    let name: Vec<u8> = match (&config.id, config.path.file_name()) {
        (Some(id), _) => id.bytes().collect(),
        (None, Some(name)) => name.as_encoded_bytes().iter().map(printable).collect(),
        (None, None) => Vec::new(),
    };
    let mut id = [0; ID_BYTES];
    for (slot, byte) in id.iter_mut().zip(name) {
        *slot = byte;
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_transfers_resume_where_they_stopped() {
        let mut target = [[0u8; 5]; 3];
        let mut iovecs: Vec<libc::iovec> =
            target.iter_mut().map(|buf| libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }).collect();
        let source: Vec<u8> = (0..15).collect();
        let mut calls = 0;
        transfer_all(&mut iovecs, 0, |iovecs, offset| {
            calls += 1;
            // Moves at most 4 bytes a call, like a pipe that is slow to fill.
            let mut moved = 0;
            for iovec in iovecs {
                let n = iovec.iov_len.min(4 - moved);
                let from = usize::try_from(offset).expect("offset") + moved;
                // SAFETY: the iovecs point into `target`, alive for the whole call.
                let dest = unsafe { std::slice::from_raw_parts_mut(iovec.iov_base.cast::<u8>(), n) };
                dest.copy_from_slice(&source[from..from + n]);
                moved += n;
                if moved == 4 {
                    break;
                }
            }
            moved as isize
        })
        .expect("transfer");
        assert_eq!(target.concat(), source);
        assert_eq!(calls, 4);
    }

    #[test]
    fn a_transfer_that_hits_the_end_of_the_file_fails() {
        let mut buf = [0u8; 8];
        let mut iovecs = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
        let result = transfer_all(&mut iovecs, 0, |_, _| 0);
        assert_eq!(result.map_err(|e| e.kind()), Err(ErrorKind::UnexpectedEof));
    }

    /// The probe for io_uring's inline transfers writes the first sector's own bytes back: the
    /// image is as it was. A file in RAM (tmpfs) can try neither reads nor writes without blocking.
    #[test]
    fn probing_for_nowait_transfers_leaves_the_image_as_it_was() {
        let image: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), &image).expect("write");
        let open = |readonly| Disk::open(&DiskConfig { readonly, ..DiskConfig::new(file.path()) }).expect("disk");
        drop(open(false));
        assert_eq!(std::fs::read(file.path()).expect("read"), image);
        assert!(!open(true).nowait.writes, "a read-only disk is never written, not even by the probe");
        if let Ok(in_ram) = tempfile::NamedTempFile::new_in("/dev/shm") {
            std::fs::write(in_ram.path(), [0u8; 512]).expect("write");
            let nowait = Disk::open(&DiskConfig::new(in_ram.path())).expect("disk").nowait;
            assert_eq!((nowait.reads, nowait.writes), (false, false), "tmpfs");
        }
    }
}
