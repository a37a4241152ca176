//! One shared host directory as the guest's FUSE requests reach it: fuse-backend-rs's
//! passthrough file system, behind the rules lguest adds.
//!
//! `PassthroughFs` already keeps the guest inside the directory: it walks one name at a time
//! from a directory fd with `O_NOFOLLOW` (so a host symlink, absolute or swapped in during a
//! lookup, is never followed by the host: the guest's kernel reads it and resolves it in the
//! guest), refuses names with a `/`, answers `..` at the root with the root, and, with
//! `inode_file_handles` off (as here), never opens by file handle. [`Share`] wraps it and adds:
//!
//! - `readonly`: every request that would change the host answers EROFS, whatever the guest
//!   mounted with. Opening for writing or truncation counts as changing.
//! - One owner: every request runs as the user who runs lguest (the guest's uid and gid are
//!   dropped before the passthrough sees them), so what the guest creates is that user's.
//! - No names `.` or `..` from the guest (the Linux driver never sends them, export support is
//!   not offered), no device nodes (a root-run lguest would otherwise let the guest make
//!   `/dev/sda` inside the share), and no set-user-ID or set-group-ID bits.
//! - No O_NOATIME or O_DIRECT reaches the host (`host_flags`): hints the host may refuse,
//!   and a refused one would fail the request and, on a read or write, lose the handle's fd.
//! - Directories are read whole into their handle and served from there ([`super::listing`]):
//!   the passthrough's seek to each offset the guest hands back loses entries on a host
//!   directory that shrinks while it is read, if its offsets are positions (tmpfs before 6.6).
//!   The listings of one share hold at most [`LISTING_BUDGET`] bytes together; past that a
//!   handle is listed the passthrough's way, a page (at most [`HOST_PAGE`]) at a time.
//!
//! It runs on the fs device's worker thread; it is built on the main thread, where the
//! directory is opened and checked ([`Share::open`]).

use std::ffi::CStr;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions, SetattrValid,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::{Config, PassthroughFs};

use super::beneath::{link_fd, Beneath};
use super::listing::{Listing, Listings, Source};
pub use super::listing::{ListingBudget, LISTING_BUDGET};

type Inode = u64;
type Handle = u64;

/// A shared directory, as served to the guest.
pub struct Share {
    fs: PassthroughFs,
    readonly: bool,
    /// The root again, for hard links the passthrough can't make and directories it can't
    /// list for us ([`super::beneath`]).
    beneath: Beneath,
    /// What each open directory handle lists ([`super::listing`]).
    listings: Listings,
}

/// Mode bits the guest may not set on host files: privileges for whoever runs them.
const PRIVILEGE_BITS: u32 = libc::S_ISUID | libc::S_ISGID;

impl Share {
    /// Opens `dir` (absolute, already resolved) to serve; fails if it is not a directory we
    /// can open. Its listings share a budget of [`LISTING_BUDGET`] bytes.
    pub fn open(dir: &Path, readonly: bool) -> io::Result<Share> {
        Share::with_listing_budget(dir, readonly, ListingBudget::new(LISTING_BUDGET))
    }

    /// As [`Share::open`], with the listings' budget given (tests and the fuzz target give a
    /// small one, to reach the fallback, and watch it).
    pub fn with_listing_budget(dir: &Path, readonly: bool, budget: Arc<ListingBudget>) -> io::Result<Share> {
        let root_dir = dir
            .to_str()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the directory's path is not UTF-8"))?
            .to_string();
        let config = Config {
            root_dir,
            // Open by path at each FUSE_INIT (the guest's mount), so a remount starts afresh.
            do_import: true,
            inode_file_handles: false,
            xattr: false,
            writeback: false,
            ..Config::default()
        };
        let fs = PassthroughFs::new(config)?;
        // Once now, on the main thread: a missing or unreadable directory is the user's error
        // to hear at start, not the guest's at mount time.
        fs.import()?;
        Ok(Share { fs, readonly, beneath: Beneath::new(dir)?, listings: Listings::new(budget) })
    }

    /// Links `inode` as `newname` in `newparent` through /proc/self/fd, which needs no
    /// capability, with both resolved beneath the share ([`super::beneath`]).
    fn link_without_capability(&self, inode: Inode, newparent: Inode, newname: &CStr) -> io::Result<()> {
        let source = self.beneath.reopen(&self.fs.readlinkat_proc_file(inode)?)?;
        let dir = self.beneath.reopen(&self.fs.readlinkat_proc_file(newparent)?)?;
        link_fd(&source, &dir, newname)
    }

    /// Lists the directory `inode` whole, charged to `budget`: reopened for reading by its
    /// path beneath the share (the passthrough holds it as an `O_PATH` fd), and checked to be
    /// the same directory, in case the guest renamed another into its place meanwhile. A
    /// removed directory lists nothing. `None` when the share can't hold the listing: over
    /// the budget, or a path longer than the host can reopen.
    fn list(&self, ctx: &Context, inode: Inode, budget: &Arc<ListingBudget>) -> io::Result<Option<Listing>> {
        let (held, _) = self.fs.getattr(ctx, inode, None)?;
        if held.st_nlink == 0 {
            return Ok(Some(Listing::empty(budget)));
        }
        let dir = match self.fs.readlinkat_proc_file(inode).and_then(|path| self.beneath.open_dir(&path)) {
            // Longer than PATH_MAX: the passthrough lists it through its own handle.
            Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) => return Ok(None),
            dir => dir?,
        };
        let opened = dir.metadata()?;
        if (opened.dev(), opened.ino()) != (held.st_dev, held.st_ino) {
            return Err(io::Error::from_raw_os_error(libc::ESTALE));
        }
        Listing::read(dir, budget)
    }

    /// Where `handle`'s entries from `offset` on come from ([`super::listing`]).
    fn source(&self, ctx: &Context, inode: Inode, handle: Handle, offset: u64) -> io::Result<Source> {
        self.listings.at(handle, offset, |budget| self.list(ctx, inode, budget))
    }

    fn writable(&self) -> io::Result<()> {
        if self.readonly {
            Err(io::Error::from_raw_os_error(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// Whether opening with `flags` would let the opener change the file.
    fn opens_for_change(flags: u32) -> bool {
        let flags = flags as i32;
        flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
    }
}

/// Says once that the share ran out of file descriptors: the guest only sees EMFILE.
fn warn_if_out_of_fds(error: &io::Error) {
    static SAID: std::sync::Once = std::sync::Once::new();
    if error.raw_os_error() == Some(libc::EMFILE) {
        SAID.call_once(|| {
            tracing::warn!("virtio-fs: out of file descriptors (one per file the guest holds): raise `ulimit -Hn` for lguest")
        });
    }
}

/// The guest's file flags, as the host gets them: without O_NOATIME and O_DIRECT, hints the
/// host may refuse. O_NOATIME is refused (EPERM) to a user who doesn't own the file, and
/// overlayfs adds it to every open of its lower files, so with it a guest whose root is a share
/// (`lguest exec`) could run nothing of root's unless lguest ran as root. O_DIRECT is refused
/// (EINVAL) where the host file system can't do it (tmpfs); the guest's own page cache is what
/// it bypasses anyway (virtiofsd drops it too, unless told otherwise). Reads and writes carry
/// the flags again, and the passthrough then sets them on its fd with fcntl: one it can't set
/// fails that request *and* closes the handle's fd (fuse-backend-rs 0.14 drops a borrowed
/// `File` on that path), so what the host may refuse must never reach it.
fn host_flags(flags: u32) -> u32 {
    flags & !((libc::O_NOATIME | libc::O_DIRECT) as u32)
}

/// The most a listing the passthrough serves reads from the host for one request. It reads
/// into a buffer of the size the request asks for, which only the guest's reply buffer bounds
/// (a chain may name the same memory many times over: gigabytes); the Linux driver asks for a
/// page at a time, and a shorter reply only means the guest asks again from where it ended.
pub const HOST_PAGE: u32 = 1 << 20;

/// Refuses `.` and `..`: the driver resolves them itself, so only a forged request sends them.
fn plain_name(name: &CStr) -> io::Result<()> {
    match name.to_bytes() {
        b"." | b".." => Err(io::Error::from_raw_os_error(libc::EPERM)),
        _ => Ok(()),
    }
}

/// Refuses character and block devices: anything else `mknod` makes (a FIFO, a socket, a
/// regular file) is harmless on the host.
fn harmless_node(mode: u32) -> io::Result<()> {
    match mode & libc::S_IFMT {
        libc::S_IFCHR | libc::S_IFBLK => Err(io::Error::from_raw_os_error(libc::EPERM)),
        _ => Ok(()),
    }
}

impl FileSystem for Share {
    type Inode = Inode;
    type Handle = Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.listings.clear();
        // No DAX window is offered: the page cache is the guest's own.
        self.fs.init(capable).map(|options| options - FsOptions::PERFILE_DAX)
    }

    fn destroy(&self) {
        self.listings.clear();
        self.fs.destroy()
    }

    /// Every request runs as lguest's own user: uid and gid 0 tell the passthrough not to
    /// switch credentials, so the host kernel checks (and owns new files as) who we are.
    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        ctx.uid = 0;
        ctx.gid = 0;
        Ok(())
    }

    fn lookup(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        plain_name(name)?;
        self.fs.lookup(ctx, parent, name).inspect_err(warn_if_out_of_fds)
    }

    fn forget(&self, ctx: &Context, inode: Inode, count: u64) {
        self.fs.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Inode, u64)>) {
        self.fs.batch_forget(ctx, requests)
    }

    fn getattr(&self, ctx: &Context, inode: Inode, handle: Option<Handle>) -> io::Result<(stat64, Duration)> {
        self.fs.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Inode,
        mut attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        attr.st_mode &= !PRIVILEGE_BITS;
        self.fs.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Inode) -> io::Result<Vec<u8>> {
        self.fs.readlink(ctx, inode)
    }

    fn symlink(&self, ctx: &Context, linkname: &CStr, parent: Inode, name: &CStr) -> io::Result<Entry> {
        self.writable()?;
        plain_name(name)?;
        self.fs.symlink(ctx, linkname, parent, name)
    }

    fn mknod(&self, ctx: &Context, parent: Inode, name: &CStr, mode: u32, rdev: u32, umask: u32) -> io::Result<Entry> {
        self.writable()?;
        plain_name(name)?;
        harmless_node(mode)?;
        self.fs.mknod(ctx, parent, name, mode & !PRIVILEGE_BITS, rdev, umask)
    }

    fn mkdir(&self, ctx: &Context, parent: Inode, name: &CStr, mode: u32, umask: u32) -> io::Result<Entry> {
        self.writable()?;
        plain_name(name)?;
        self.fs.mkdir(ctx, parent, name, mode & !PRIVILEGE_BITS, umask)
    }

    fn unlink(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.writable()?;
        plain_name(name)?;
        self.fs.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.writable()?;
        plain_name(name)?;
        self.fs.rmdir(ctx, parent, name)
    }

    fn rename(&self, ctx: &Context, olddir: Inode, oldname: &CStr, newdir: Inode, newname: &CStr, flags: u32) -> io::Result<()> {
        self.writable()?;
        plain_name(oldname)?;
        plain_name(newname)?;
        self.fs.rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: Inode, newparent: Inode, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        plain_name(newname)?;
        match self.fs.link(ctx, inode, newparent, newname) {
            // linkat(AT_EMPTY_PATH) without CAP_DAC_READ_SEARCH: ENOENT.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                self.link_without_capability(inode, newparent, newname)?;
                self.fs.lookup(ctx, newparent, newname)
            }
            linked => linked,
        }
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        if Share::opens_for_change(flags) {
            self.writable()?;
        }
        self.fs.open(ctx, inode, host_flags(flags), fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions, Option<u32>)> {
        self.writable()?;
        plain_name(name)?;
        args.mode &= !PRIVILEGE_BITS;
        args.flags = host_flags(args.flags);
        self.fs.create(ctx, parent, name, args)
    }

    #[allow(clippy::too_many_arguments)] // the trait's signature
    fn read(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.fs.read(ctx, inode, handle, w, size, offset, lock_owner, host_flags(flags))
    }

    #[allow(clippy::too_many_arguments)] // the trait's signature
    fn write(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        self.fs.write(ctx, inode, handle, r, size, offset, lock_owner, delayed_write, host_flags(flags), fuse_flags)
    }

    /// ENOSYS, which the guest's kernel takes as "never send FLUSH again": every close() in the
    /// guest would otherwise wait for a round trip that does nothing here. The passthrough's
    /// flush closes a dup of the handle's fd, which matters only for POSIX locks held on the
    /// host (none: lock requests are not served) and for file systems that report write
    /// errors at close (writes reach the host at once, and their errors with them). With a
    /// writeback cache the guest's kernel still writes the file's dirty pages at each close.
    fn flush(&self, _: &Context, _: Inode, _: Handle, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    fn fsync(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.fs.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(&self, ctx: &Context, inode: Inode, handle: Handle, mode: u32, offset: u64, length: u64) -> io::Result<()> {
        self.writable()?;
        self.fs.fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)] // the trait's signature
    fn release(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.fs.release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Inode) -> io::Result<statvfs64> {
        self.fs.statfs(ctx, inode)
    }

    fn getxattr(&self, ctx: &Context, inode: Inode, name: &CStr, size: u32) -> io::Result<GetxattrReply> {
        self.fs.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: Inode, size: u32) -> io::Result<ListxattrReply> {
        self.fs.listxattr(ctx, inode, size)
    }

    fn opendir(&self, ctx: &Context, inode: Inode, flags: u32) -> io::Result<(Option<Handle>, OpenOptions)> {
        let (handle, options) = self.fs.opendir(ctx, inode, host_flags(flags))?;
        if let Some(handle) = handle {
            self.listings.open(handle);
        }
        Ok((handle, options))
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let listing = match self.source(ctx, inode, handle, offset)? {
            Source::Held(listing) => listing,
            Source::Host => return self.fs.readdir(ctx, inode, handle, size.min(HOST_PAGE), offset, add_entry),
        };
        let mut added = false;
        for (entry, _) in listing.after(offset) {
            match add_entry(entry) {
                Ok(0) => break,
                Ok(_) => added = true,
                Err(e) => return if added { Ok(()) } else { Err(e) },
            }
        }
        Ok(())
    }

    /// As `readdir`, with each entry looked up as it is served (the guest's kernel then holds
    /// it, until it forgets it). An entry gone since the listing is skipped.
    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let listing = match self.source(ctx, inode, handle, offset)? {
            Source::Held(listing) => listing,
            Source::Host => return self.fs.readdirplus(ctx, inode, handle, size.min(HOST_PAGE), offset, add_entry),
        };
        let mut added = false;
        for (mut entry, name) in listing.after(offset) {
            let looked_up = match self.fs.lookup(ctx, inode, name) {
                Ok(looked_up) => looked_up,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return if added { Ok(()) } else { Err(e) },
            };
            let held = looked_up.inode;
            entry.ino = looked_up.attr.st_ino;
            match add_entry(entry, looked_up) {
                Ok(0) => {
                    // It did not fit: the guest's kernel never heard of this lookup.
                    self.fs.forget(ctx, held, 1);
                    break;
                }
                Ok(_) => added = true,
                Err(e) => {
                    self.fs.forget(ctx, held, 1);
                    return if added { Ok(()) } else { Err(e) };
                }
            }
        }
        Ok(())
    }

    fn fsyncdir(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.fs.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: Inode, flags: u32, handle: Handle) -> io::Result<()> {
        self.listings.close(handle);
        self.fs.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: Inode, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            self.writable()?;
        }
        self.fs.access(ctx, inode, mask)
    }

    fn lseek(&self, ctx: &Context, inode: Inode, handle: Handle, offset: u64, whence: u32) -> io::Result<u64> {
        self.fs.lseek(ctx, inode, handle, offset, whence)
    }
}
