//! The fs device's tests: FUSE requests laid in guest memory as the Linux driver lays them
//! ([`super::driver`]), served by the real passthrough over a temporary directory.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    AccessIn, Attr, CreateIn, EntryOut, FallocateIn, FlushIn, FsyncIn, InitIn, LinkIn, LseekIn, ReleaseIn, MkdirIn, MknodIn, OpenIn, OpenOut, Opcode, ReadIn, RenameIn, SetattrIn, WriteIn,
};
use fuse_backend_rs::api::filesystem::ROOT_ID;
use vm_memory_fs::ByteValued;

use super::driver::{request, FuseDriver, Reply};
use super::server_for;
use super::share::{ListingBudget, Share, LISTING_BUDGET};

const FATTR_MODE: u32 = 1;
const FATTR_SIZE: u32 = 8;
const FATTR_ATIME: u32 = 0x10;
const FATTR_MTIME: u32 = 0x20;

/// A driver mounted (FUSE_INIT done) on `dir`.
fn mounted(dir: &Path, readonly: bool) -> FuseDriver {
    let mut driver = activated(dir, readonly);
    mount(&mut driver);
    driver
}

/// A driver whose device is activated on `dir`, not yet mounted.
fn activated(dir: &Path, readonly: bool) -> FuseDriver {
    let share = Share::open(dir, readonly).expect("a readable directory");
    FuseDriver::new(server_for(share))
}

fn mount(driver: &mut FuseDriver) {
    let init = InitIn { major: 7, minor: 31, max_readahead: 1 << 17, flags: 0 };
    assert_eq!(driver.call(Opcode::Init as u32, 0, init.as_slice()).errno(), Some(0));
}

fn named(body: &[u8], name: &str) -> Vec<u8> {
    let mut bytes = body.to_vec();
    bytes.extend_from_slice(name.as_bytes());
    bytes.push(0);
    bytes
}

fn lookup(driver: &mut FuseDriver, parent: u64, name: &str) -> Reply {
    driver.call(Opcode::Lookup as u32, parent, &named(&[], name))
}

fn entry(reply: &Reply) -> EntryOut {
    assert_eq!(reply.errno(), Some(0), "{reply:?}");
    reply.body::<EntryOut>().expect("an entry")
}

fn attr_of(reply: &Reply) -> Attr {
    entry(reply).attr
}

fn open(driver: &mut FuseDriver, inode: u64, flags: i32) -> Reply {
    driver.call(Opcode::Open as u32, inode, OpenIn { flags: flags as u32, fuse_flags: 0 }.as_slice())
}

fn read(driver: &mut FuseDriver, inode: u64, fh: u64, size: u32) -> Reply {
    let read = ReadIn { fh, offset: 0, size, ..ReadIn::default() };
    driver.call(Opcode::Read as u32, inode, read.as_slice())
}

fn create(driver: &mut FuseDriver, parent: u64, name: &str, mode: u32) -> Reply {
    let args = CreateIn { flags: (libc::O_CREAT | libc::O_RDWR) as u32, mode, umask: 0, fuse_flags: 0 };
    driver.call(Opcode::Create as u32, parent, &named(args.as_slice(), name))
}

fn reply_body(reply: &Reply) -> &[u8] {
    &reply.bytes[std::mem::size_of::<fuse_backend_rs::abi::fuse_abi::OutHeader>()..]
}

#[test]
fn a_guest_reads_a_host_file_through_lookup_open_and_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("hello"), b"hello from the host").expect("file");
    let mut driver = mounted(dir.path(), false);

    let inode = entry(&lookup(&mut driver, ROOT_ID, "hello")).nodeid;
    let opened = open(&mut driver, inode, libc::O_RDONLY);
    let fh = opened.body::<OpenOut>().expect("a handle").fh;
    let data = read(&mut driver, inode, fh, 4096);

    assert_eq!(data.errno(), Some(0));
    assert_eq!(reply_body(&data), b"hello from the host");
}

/// The FUSE crate writes replies through its own view of guest memory, which has no dirty
/// bitmap: the bridge marks the reply's pages, and the used ring's, for a Diff snapshot.
#[test]
fn a_read_reply_marks_the_pages_it_filled_and_the_used_ring_dirty() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("big"), vec![7u8; 3 * 4096]).expect("file");
    let mut driver = mounted(dir.path(), false);
    let inode = entry(&lookup(&mut driver, ROOT_ID, "big")).nodeid;
    let fh = open(&mut driver, inode, libc::O_RDONLY).body::<OpenOut>().expect("a handle").fh;
    let data = read(&mut driver, inode, fh, 3 * 4096);
    assert_eq!(reply_body(&data).len(), 3 * 4096);
    let first = super::driver::REPLY_AT / 4096;
    // The header and 3 pages of data fill 4 pages of the (1 MiB) reply buffer, the rest not.
    let used_ring = super::driver::USED / 4096;
    assert_eq!(data.dirtied, vec![used_ring, first, first + 1, first + 2, first + 3], "pages marked");
}

/// Overlayfs opens its lower files with O_NOATIME (`lguest exec`'s root is an overlay on a
/// share), and the host refuses that hint with EPERM to a user who doesn't own the file: lguest
/// drops it, at the open and at each read. The file here is root's and the open is made by a thread whose effective uid is
/// nobody's, as when lguest runs as an ordinary user; run not as root, nobody else's file can
/// be made, so the test says so and checks nothing.
#[test]
fn an_open_and_read_with_noatime_of_a_file_lguests_user_does_not_own_succeed() {
    // SAFETY: geteuid only reads the calling process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: no file owned by another user can be made; nothing checked");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::write(dir.path().join("roots"), b"root's").expect("file");
    let path = dir.path().to_path_buf();
    let errno = std::thread::spawn(move || {
        // SAFETY: the raw system call changes this thread's effective uid only (glibc's
        // setresuid would change every thread's); the thread ends with the test.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, -1i32, 65534i32, -1i32) };
        assert_eq!(rc, 0, "cannot become nobody: {}", std::io::Error::last_os_error());
        let mut driver = mounted(&path, true);
        let inode = entry(&lookup(&mut driver, ROOT_ID, "roots")).nodeid;
        let opened = open(&mut driver, inode, libc::O_RDONLY | libc::O_NOATIME);
        let Some(handle) = opened.body::<OpenOut>().map(|out| out.fh) else { return (opened.errno(), None) };
        // The read carries the file's flags again (the passthrough sets them with fcntl).
        let read = ReadIn { fh: handle, offset: 0, size: 64, flags: (libc::O_RDONLY | libc::O_NOATIME) as u32, ..ReadIn::default() };
        let data = driver.call(Opcode::Read as u32, inode, read.as_slice());
        (opened.errno(), Some(reply_body(&data).to_vec()))
    })
    .join()
    .expect("the nobody thread");
    assert_eq!(errno, (Some(0), Some(b"root's".to_vec())), "an O_NOATIME open and read of root's file, by lguest's user");
}

#[test]
fn files_the_guest_creates_belong_to_the_user_running_lguest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut driver = mounted(dir.path(), false);

    let made = create(&mut driver, ROOT_ID, "new", 0o644);

    assert_eq!(made.errno(), Some(0), "{made:?}");
    let meta = fs::metadata(dir.path().join("new")).expect("created on the host");
    // SAFETY: geteuid and getegid only read the calling process's credentials.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    assert_eq!((meta.uid(), meta.gid()), (uid, gid), "the request said uid 1000, but we own it");
}

#[test]
fn a_readonly_share_refuses_every_change_and_still_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("kept"), b"unchanged").expect("file");
    fs::create_dir(dir.path().join("sub")).expect("dir");
    let mut driver = mounted(dir.path(), true);
    let kept = entry(&lookup(&mut driver, ROOT_ID, "kept")).nodeid;
    let erofs = Some(libc::EROFS);

    assert_eq!(create(&mut driver, ROOT_ID, "new", 0o644).errno(), erofs);
    let mkdir = MkdirIn { mode: 0o755, umask: 0 };
    assert_eq!(driver.call(Opcode::Mkdir as u32, ROOT_ID, &named(mkdir.as_slice(), "d")).errno(), erofs);
    assert_eq!(driver.call(Opcode::Unlink as u32, ROOT_ID, &named(&[], "kept")).errno(), erofs);
    assert_eq!(driver.call(Opcode::Rmdir as u32, ROOT_ID, &named(&[], "sub")).errno(), erofs);
    assert_eq!(open(&mut driver, kept, libc::O_WRONLY).errno(), erofs);
    assert_eq!(open(&mut driver, kept, libc::O_RDONLY | libc::O_TRUNC).errno(), erofs);
    let chmod = SetattrIn { valid: FATTR_MODE, mode: 0o777, ..SetattrIn::default() };
    assert_eq!(driver.call(Opcode::Setattr as u32, kept, chmod.as_slice()).errno(), erofs);
    assert_eq!(driver.call(Opcode::Symlink as u32, ROOT_ID, &named(&named(&[], "l"), "kept")).errno(), erofs);

    assert_eq!(open(&mut driver, kept, libc::O_RDONLY).errno(), Some(0), "reading is fine");
    assert_eq!(fs::read(dir.path().join("kept")).expect("still there"), b"unchanged");
    assert!(!dir.path().join("new").exists() && !dir.path().join("d").exists());
}

#[test]
fn dot_dot_and_dot_are_refused_even_at_the_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut driver = mounted(dir.path(), false);

    assert_eq!(lookup(&mut driver, ROOT_ID, "..").errno(), Some(libc::EPERM));
    assert_eq!(lookup(&mut driver, ROOT_ID, ".").errno(), Some(libc::EPERM));
    assert_eq!(lookup(&mut driver, ROOT_ID, "../etc").errno(), Some(libc::EINVAL), "no slashes in a name");
}

#[test]
fn a_symlink_out_of_the_share_is_never_followed_on_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink("/etc", dir.path().join("out")).expect("symlink");
    let mut driver = mounted(dir.path(), false);

    let link = lookup(&mut driver, ROOT_ID, "out");
    let attr = attr_of(&link);
    let inode = entry(&link).nodeid;

    assert_eq!(attr.mode & libc::S_IFMT, libc::S_IFLNK, "the guest sees the link itself");
    let target = driver.call(Opcode::Readlink as u32, inode, &[]);
    assert_eq!(reply_body(&target), b"/etc", "for the guest to resolve in its own tree");
    assert_ne!(lookup(&mut driver, inode, "passwd").errno(), Some(0), "a link is not a directory to look in");
    assert_ne!(open(&mut driver, inode, libc::O_RDONLY).errno(), Some(0), "nor a file to open");
}

#[test]
fn a_directory_swapped_for_a_symlink_after_lookup_leads_nowhere_outside() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir(dir.path().join("d")).expect("dir");
    let mut driver = mounted(dir.path(), false);
    let before = entry(&lookup(&mut driver, ROOT_ID, "d")).nodeid;

    fs::remove_dir(dir.path().join("d")).expect("rmdir");
    std::os::unix::fs::symlink("/etc", dir.path().join("d")).expect("swap");

    assert_ne!(lookup(&mut driver, before, "passwd").errno(), Some(0), "the old inode is the old, gone directory");
    let after = entry(&lookup(&mut driver, ROOT_ID, "d")).nodeid;
    assert_ne!(lookup(&mut driver, after, "passwd").errno(), Some(0), "the new one is a link, not /etc");
}

#[test]
fn device_nodes_are_refused_and_privilege_bits_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("tool"), b"#!/bin/sh").expect("file");
    let mut driver = mounted(dir.path(), false);
    let tool = entry(&lookup(&mut driver, ROOT_ID, "tool")).nodeid;

    let disk = MknodIn { mode: libc::S_IFBLK | 0o600, rdev: 8 << 8, umask: 0, padding: 0 };
    assert_eq!(driver.call(Opcode::Mknod as u32, ROOT_ID, &named(disk.as_slice(), "sda")).errno(), Some(libc::EPERM));
    let setuid = SetattrIn { valid: FATTR_MODE, mode: libc::S_ISUID | libc::S_ISGID | 0o755, ..SetattrIn::default() };
    assert_eq!(driver.call(Opcode::Setattr as u32, tool, setuid.as_slice()).errno(), Some(0));

    assert!(!dir.path().join("sda").exists());
    assert_eq!(fs::metadata(dir.path().join("tool")).expect("file").permissions().mode() & 0o7777, 0o755);
}

#[test]
fn hostile_requests_fail_alone_and_the_device_carries_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("f"), vec![7u8; 8192]).expect("file");
    let mut driver = mounted(dir.path(), false);
    let f = entry(&lookup(&mut driver, ROOT_ID, "f")).nodeid;
    let fh = open(&mut driver, f, libc::O_RDONLY).body::<OpenOut>().expect("handle").fh;

    let unknown = driver.call(4242, ROOT_ID, &[]);
    assert_eq!(unknown.errno(), Some(libc::ENOSYS));
    let retired = driver.send(&request(7, 99, ROOT_ID, &[]), 4096).expect("carries on");
    assert_eq!(retired.written, 0, "an opcode the crate's enum skips never reaches it");
    let short = driver.send(&[1, 2, 3], 4096).expect("carries on");
    assert_eq!(short.written, 0, "a header cut short gets nothing");
    let mut lying = request(Opcode::Lookup as u32, 100, ROOT_ID, b"f\0");
    lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_ne!(driver.send(&lying, 4096).expect("carries on").errno(), Some(0), "a length beyond any buffer");
    let huge = read(&mut driver, f, fh, u32::MAX);
    assert_ne!(huge.errno(), Some(0), "a 4 GiB read is refused, not allocated");
    let no_room = driver.send(&request(Opcode::Getattr as u32, 101, ROOT_ID, &[0; 16]), 0).expect("carries on");
    assert_eq!(no_room.written, 0, "no reply buffer: nothing written");

    assert_eq!(reply_body(&read(&mut driver, f, fh, 8192)), &vec![7u8; 8192][..], "and it still serves");
}

/// A chain that goes on past its request is cut at the length the request's header gives: the
/// crate sizes some buffers (an IOCTL's input) by what the chain holds, which may be gigabytes.
/// Seen here through a WRITE whose header covers 4 bytes of data while its buffer holds the 12
/// that its `size` names: only what the header covers reaches the file. A header that claims
/// more than its buffers hold is refused.
#[test]
fn a_request_is_only_as_long_as_its_header_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut driver = mounted(dir.path(), false);
    let made = create(&mut driver, ROOT_ID, "file", 0o644);
    let (file, fh) = (entry(&made).nodeid, made.body_at::<OpenOut>(std::mem::size_of::<EntryOut>()).expect("handle").fh);
    let mut write = request(Opcode::Write as u32, 70, file, WriteIn { fh, offset: 0, size: 12, ..WriteIn::default() }.as_slice());
    let header_len = write.len() as u32 + 4;
    write[..4].copy_from_slice(&header_len.to_le_bytes());
    write.extend_from_slice(b"hello, world");

    driver.send(&write, 4096).expect("carries on");

    assert_eq!(fs::read(dir.path().join("file")).expect("file"), b"hell", "the 4 bytes the header covers");
    let mut claims_more = request(Opcode::Getattr as u32, 71, ROOT_ID, &[0; 16]);
    let claimed = claims_more.len() as u32 + 1;
    claims_more[..4].copy_from_slice(&claimed.to_le_bytes());
    assert_eq!(driver.send(&claims_more, 4096).expect("carries on").written, 0, "a byte more than it holds");
}

#[test]
fn a_read_fills_at_most_the_reply_buffer() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("f"), vec![1u8; 1 << 20]).expect("file");
    let mut driver = mounted(dir.path(), false);
    let f = entry(&lookup(&mut driver, ROOT_ID, "f")).nodeid;
    let fh = open(&mut driver, f, libc::O_RDONLY).body::<OpenOut>().expect("handle").fh;

    let request = request(Opcode::Read as u32, 50, f, ReadIn { fh, size: 1 << 20, ..ReadIn::default() }.as_slice());
    let reply = driver.send(&request, 4096).expect("carries on");

    assert!(reply.written <= 4096, "wrote {} into 4096 bytes", reply.written);
}

/// Everything a build in a shared directory does, served under the fs worker's own seccomp
/// filter, which traps any other call as `--seccomp enforce` does: a call it lacks ends this
/// test process with SIGSYS ("Bad system call"), as it would end lguest.
#[test]
fn posix_work_runs_under_the_fs_workers_seccomp_filter() {
    use seccompiler::SeccompAction;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut driver = activated(dir.path(), false);
    let failures = std::thread::spawn(move || {
        crate::seccomp::apply_for_test(crate::seccomp::Role::FsWorker, SeccompAction::Trap);
        posix_work(&mut driver)
    })
    .join()
    .expect("worker thread");
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(fs::read(dir.path().join("renamed")).expect("file"), b"hello, wo");
    assert_eq!(fs::read_link(dir.path().join("sym")).expect("link"), Path::new("renamed"));
    assert!(!dir.path().join("gone").exists() && !dir.path().join("sub").exists());
}

/// Mounts and does one of each operation; returns the ones that failed, with their errno.
fn posix_work(driver: &mut FuseDriver) -> Vec<(&'static str, Option<i32>)> {
    let mut failures = Vec::new();
    let mut check = |what: &'static str, reply: &Reply| {
        if reply.errno() != Some(0) {
            failures.push((what, reply.errno()));
        }
    };
    mount(driver);
    let made = create(driver, ROOT_ID, "file", 0o644);
    check("create", &made);
    let (file, fh) = (made.body::<EntryOut>().map_or(0, |e| e.nodeid), made.body_at::<OpenOut>(std::mem::size_of::<EntryOut>()).map_or(0, |o| o.fh));
    let mut write = WriteIn { fh, offset: 0, size: 12, ..WriteIn::default() }.as_slice().to_vec();
    write.extend_from_slice(b"hello, world");
    check("write", &driver.call(Opcode::Write as u32, file, &write));
    check("read", &read(driver, file, fh, 64));
    check("fsync", &driver.call(Opcode::Fsync as u32, file, FsyncIn { fh, ..FsyncIn::default() }.as_slice()));
    let allocate = FallocateIn { fh, offset: 0, length: 4096, mode: 0, padding: 0 };
    check("fallocate", &driver.call(Opcode::Fallocate as u32, file, allocate.as_slice()));
    let seek = LseekIn { fh, offset: 0, whence: libc::SEEK_DATA as u32, padding: 0 };
    check("lseek", &driver.call(Opcode::Lseek as u32, file, seek.as_slice()));
    check("access", &driver.call(Opcode::Access as u32, file, AccessIn { mask: libc::R_OK as u32, padding: 0 }.as_slice()));
    check("release", &driver.call(Opcode::Release as u32, file, ReleaseIn { fh, ..ReleaseIn::default() }.as_slice()));
    let truncate = SetattrIn { valid: FATTR_SIZE, size: 9, ..SetattrIn::default() };
    check("truncate", &driver.call(Opcode::Setattr as u32, file, truncate.as_slice()));
    let chmod = SetattrIn { valid: FATTR_MODE, mode: 0o600, ..SetattrIn::default() };
    check("chmod", &driver.call(Opcode::Setattr as u32, file, chmod.as_slice()));
    let utimes = SetattrIn { valid: FATTR_ATIME | FATTR_MTIME, atime: 1, mtime: 2, ..SetattrIn::default() };
    check("utimes", &driver.call(Opcode::Setattr as u32, file, utimes.as_slice()));
    check("getattr", &driver.call(Opcode::Getattr as u32, file, &[0; 16]));
    check("rename", &driver.call(Opcode::Rename as u32, ROOT_ID, &named(&named(RenameIn { newdir: ROOT_ID }.as_slice(), "file"), "renamed")));
    check("link", &driver.call(Opcode::Link as u32, ROOT_ID, &named(LinkIn { oldnodeid: file }.as_slice(), "gone")));
    check("unlink", &driver.call(Opcode::Unlink as u32, ROOT_ID, &named(&[], "gone")));
    check("symlink", &driver.call(Opcode::Symlink as u32, ROOT_ID, &named(&named(&[], "sym"), "renamed")));
    let mkdir = MkdirIn { mode: 0o755, umask: 0 };
    check("mkdir", &driver.call(Opcode::Mkdir as u32, ROOT_ID, &named(mkdir.as_slice(), "sub")));
    check("rmdir", &driver.call(Opcode::Rmdir as u32, ROOT_ID, &named(&[], "sub")));
    let opened = driver.call(Opcode::Opendir as u32, ROOT_ID, OpenIn::default().as_slice());
    check("opendir", &opened);
    let dir_fh = opened.body::<OpenOut>().map_or(0, |o| o.fh);
    let list = ReadIn { fh: dir_fh, size: 4096, ..ReadIn::default() };
    check("readdirplus", &driver.call(Opcode::Readdirplus as u32, ROOT_ID, list.as_slice()));
    check("statfs", &driver.call(Opcode::Statfs as u32, ROOT_ID, &[]));
    // ENOSYS, on purpose: the guest's kernel then sends no more FLUSHes (Share::flush).
    let flushed = driver.call(Opcode::Flush as u32, file, FlushIn { fh, ..FlushIn::default() }.as_slice());
    if flushed.errno() != Some(libc::ENOSYS) {
        failures.push(("flush", flushed.errno()));
    }
    failures
}

/// An lguest that is not root can't use the passthrough's own `linkat(AT_EMPTY_PATH)`; the
/// link is made through /proc/self/fd instead (virtio::fs::beneath). The test thread drops
/// to nobody for itself (a raw setresuid changes only the calling thread).
#[test]
fn hard_links_work_for_a_user_without_capabilities() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
    fs::write(dir.path().join("file"), b"linked").expect("file");
    fs::set_permissions(dir.path().join("file"), fs::Permissions::from_mode(0o666)).expect("chmod");
    let mut driver = activated(dir.path(), false);
    let linked = std::thread::spawn(move || {
        // SAFETY: setresuid and setresgid take integers and change this thread's credentials only.
        unsafe {
            libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534);
            libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534);
        }
        mount(&mut driver);
        let file = entry(&lookup(&mut driver, ROOT_ID, "file")).nodeid;
        driver.call(Opcode::Link as u32, ROOT_ID, &named(LinkIn { oldnodeid: file }.as_slice(), "hard")).errno()
    })
    .join()
    .expect("thread");

    assert_eq!(linked, Some(0));
    assert_eq!(fs::metadata(dir.path().join("hard")).expect("the link").nlink(), 2);
}

#[test]
fn activation_needs_a_modern_driver_and_both_queues() {
    use crate::virtio::{ActivateError, Activation, Device, Signals};
    let dir = tempfile::tempdir().expect("tempdir");
    let device = super::Fs::with_server("t", server_for(Share::open(dir.path(), false).expect("share")));
    let mem = crate::memory::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)], crate::memory::Tracking::Off).expect("memory");
    let legacy = Activation { mem: mem.clone(), queues: vec![None, None], features: 0, signals: Signals::standalone(2) };
    assert!(matches!(device.handler(legacy), Err(ActivateError::LegacyDriver)));
    let modern = Activation { mem, queues: vec![None, None], features: crate::virtio::feature::VERSION_1, signals: Signals::standalone(2) };
    assert!(matches!(device.handler(modern), Err(ActivateError::QueueNotEnabled("hiprio"))));
}

/// An `rm -rf` as the guest's kernel does it: a directory read one reply (a page, far fewer
/// entries than one host getdents64 reads) at a time, with what each reply listed unlinked
/// before the next is asked for. Where a directory's offsets are positions (ramfs here; tmpfs
/// before Linux 6.6, as in the lab), the passthrough's seek to each offset the guest handed
/// back skipped entries, and the guest's rmdir failed with ENOTEMPTY. The ramfs is mounted in
/// a mount namespace of the test thread's own (unshare(CLONE_NEWNS) is allowed in a thread),
/// which needs root, as the other credential tests here do.
#[test]
fn a_directory_emptied_while_it_is_listed_is_listed_whole() {
    const ENTRIES: usize = 300;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let (listed, left) = std::thread::spawn(move || {
        mount_private_ramfs(&root);
        for i in 0..ENTRIES {
            fs::write(root.join(format!("entry-{i:03}")), b"").expect("file");
        }
        let mut driver = mounted(&root, false);
        let listed = list_and_unlink(&mut driver, ROOT_ID);
        let left = fs::read_dir(&root).expect("the ramfs").count();
        // SAFETY: a NUL-terminated path that lives across the call.
        unsafe { libc::umount2(std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).expect("path").as_ptr(), libc::MNT_DETACH) };
        (listed, left)
    })
    .join()
    .expect("the namespace's thread");
    assert_eq!((listed, left), (ENTRIES, 0), "entries listed, entries left on the host");
}

/// Makes the calling thread's mounts its own, and mounts a ramfs on `dir` there.
fn mount_private_ramfs(dir: &Path) {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: unshare and mount take flags and NUL-terminated strings that live across the calls.
    unsafe {
        assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare (needs root): {}", std::io::Error::last_os_error());
        assert_eq!(libc::mount(std::ptr::null(), c"/".as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()), 0);
        assert_eq!(libc::mount(c"none".as_ptr(), path.as_ptr(), c"ramfs".as_ptr(), 0, std::ptr::null()), 0, "{}", std::io::Error::last_os_error());
    }
}

/// Lists `dir` with READDIRPLUS a page at a time, unlinking each reply's entries before asking
/// for the next; returns how many entries were listed.
fn list_and_unlink(driver: &mut FuseDriver, dir: u64) -> usize {
    let fh = opendir(driver, dir);
    let (mut offset, mut listed) = (0, 0);
    loop {
        let names;
        (names, offset) = page(driver, dir, fh, offset, Readdir::Plus);
        if names.is_empty() {
            return listed;
        }
        listed += names.len();
        for name in names {
            assert_eq!(driver.call(Opcode::Unlink as u32, dir, &named(&[], &name)).errno(), Some(0), "unlink {name}");
        }
    }
}

/// Opens the directory `dir`; its handle.
fn opendir(driver: &mut FuseDriver, dir: u64) -> u64 {
    let opened = driver.call(Opcode::Opendir as u32, dir, OpenIn::default().as_slice());
    opened.body::<OpenOut>().expect("opendir").fh
}

/// READDIR, or READDIRPLUS (each entry with its lookup before it).
#[derive(Clone, Copy, Debug)]
enum Readdir {
    Plain,
    Plus,
}

/// One page (4 KiB) of `dir`'s handle `fh` from `offset`: the names in it and the offset to
/// ask from next (`offset` again after the last page).
fn page(driver: &mut FuseDriver, dir: u64, fh: u64, offset: u64, how: Readdir) -> (Vec<String>, u64) {
    listed_in(driver, dir, ReadIn { fh, offset, size: 4096, ..ReadIn::default() }, how)
}

/// What the directory request `asked` lists, as [`page`] says it.
fn listed_in(driver: &mut FuseDriver, dir: u64, asked: ReadIn, how: Readdir) -> (Vec<String>, u64) {
    use fuse_backend_rs::abi::fuse_abi::Dirent;
    let (opcode, before_dirent) = match how {
        Readdir::Plain => (Opcode::Readdir, 0),
        Readdir::Plus => (Opcode::Readdirplus, std::mem::size_of::<EntryOut>()),
    };
    let mut offset = asked.offset;
    let reply = driver.call_into(opcode as u32, dir, asked.as_slice(), asked.size.saturating_mul(2));
    assert_eq!(reply.errno(), Some(0), "{reply:?}");
    let (body, mut at, mut names) = (reply_body(&reply), 0, Vec::new());
    while let Some(dirent) = reply.body_at::<Dirent>(at + before_dirent) {
        let name_at = at + before_dirent + std::mem::size_of::<Dirent>();
        names.push(String::from_utf8_lossy(&body[name_at..name_at + dirent.namelen as usize]).into_owned());
        offset = dirent.off;
        at = (name_at + dirent.namelen as usize).next_multiple_of(8);
    }
    (names, offset)
}

/// A directory whose host path is longer than PATH_MAX can't be reopened by path for its
/// listing; it is still listed (by the passthrough, through its own handle).
#[test]
fn a_directory_deeper_than_a_path_can_name_is_listed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let level = "d".repeat(250);
    let mut deep = dir.path().to_path_buf();
    for _ in 0..18 {
        deep.push(&level);
    }
    assert!(deep.as_os_str().len() > libc::PATH_MAX as usize);
    // Made one level at a time from the one above: the whole path is too long for a call.
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut at = fs::File::open(dir.path()).expect("root");
    for name in std::iter::repeat_n(level.as_str(), 18).chain(["inside"]) {
        let name = std::ffi::CString::new(name).expect("name");
        // SAFETY: a NUL-terminated name and an fd we hold, for the duration of each call; the
        // fd openat returns is owned by the File made of it.
        at = unsafe {
            assert_eq!(libc::mkdirat(at.as_raw_fd(), name.as_ptr(), 0o755), 0);
            let fd = libc::openat(at.as_raw_fd(), name.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
            assert!(fd >= 0);
            fs::File::from_raw_fd(fd)
        };
    }
    let mut driver = mounted(dir.path(), false);
    let mut inode = ROOT_ID;
    for _ in 0..18 {
        inode = entry(&lookup(&mut driver, inode, &level)).nodeid;
    }
    let opened = driver.call(Opcode::Opendir as u32, inode, OpenIn::default().as_slice());
    let fh = opened.body::<OpenOut>().expect("opendir").fh;
    let listed = driver.call(Opcode::Readdir as u32, inode, ReadIn { fh, size: 4096, ..ReadIn::default() }.as_slice());
    assert_eq!(listed.errno(), Some(0), "{listed:?}");
    assert!(reply_body(&listed).windows(6).any(|w| w == b"inside"), "{listed:?}");
}

/// A hostile guest opens a big directory many times and starts reading each handle: the share
/// holds listings only up to its budget, every handle still lists the whole directory, each
/// entry once (from its own listing, or past the budget from the passthrough's seek to each
/// offset, with READDIR and READDIRPLUS alike), and releasedir, a remount and DESTROY give the
/// budget back. Without the budget the share would hold a listing per handle.
#[test]
fn many_handles_on_a_big_directory_hold_no_more_than_the_budget_and_each_lists_it_whole() {
    const ENTRIES: usize = 300;
    const HANDLES: usize = 8;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut all: Vec<String> = (0..ENTRIES).map(|i| format!("a-file-with-a-longish-name-{i:04}")).collect();
    for name in &all {
        fs::write(dir.path().join(name), b"").expect("file");
    }
    all.sort();
    let one = one_listings_cost(dir.path());
    let budget = ListingBudget::new(2 * one + one / 2);
    let mut driver = FuseDriver::new(server_for(Share::with_listing_budget(dir.path(), false, Arc::clone(&budget)).expect("share")));
    mount(&mut driver);

    let handles: Vec<u64> = (0..HANDLES).map(|_| opendir(&mut driver, ROOT_ID)).collect();
    let listed = list_side_by_side(&mut driver, &handles);

    for (handle, mut names) in listed.into_iter().enumerate() {
        names.sort();
        assert_eq!(names, all, "handle {handle}");
    }
    assert_eq!(budget.held(), 2 * one, "two listings held, the other handles listed by the host");
    for fh in handles {
        let release = ReleaseIn { fh, ..ReleaseIn::default() };
        assert_eq!(driver.call(Opcode::Releasedir as u32, ROOT_ID, release.as_slice()).errno(), Some(0));
    }
    assert_eq!(budget.held(), 0, "releasedir gives the listings back");
    let again = opendir(&mut driver, ROOT_ID);
    list_side_by_side(&mut driver, &[again]);
    assert_eq!(budget.held(), one, "and a new handle holds its own again");
    mount(&mut driver);
    assert_eq!(budget.held(), 0, "a remount gives everything back");
    let last = opendir(&mut driver, ROOT_ID);
    list_side_by_side(&mut driver, &[last]);
    driver.call(Opcode::Destroy as u32, ROOT_ID, &[]);
    assert_eq!(budget.held(), 0, "and so does DESTROY (the guest's umount)");
}

/// What a share's budget is charged for listing `dir` once.
fn one_listings_cost(dir: &Path) -> usize {
    let budget = ListingBudget::new(LISTING_BUDGET);
    let mut driver = FuseDriver::new(server_for(Share::with_listing_budget(dir, false, Arc::clone(&budget)).expect("share")));
    mount(&mut driver);
    let fh = opendir(&mut driver, ROOT_ID);
    list_side_by_side(&mut driver, &[fh]);
    assert!(budget.held() > 0, "the listing is charged");
    budget.held()
}

/// Lists the root through each of `handles` a page at a time, taking turns, so that every handle
/// has started before any has finished; the even ones with READDIR, the odd with READDIRPLUS.
/// The names each handle listed.
fn list_side_by_side(driver: &mut FuseDriver, handles: &[u64]) -> Vec<Vec<String>> {
    let how = |i: usize| if i.is_multiple_of(2) { Readdir::Plain } else { Readdir::Plus };
    let mut offsets = vec![Some(0); handles.len()];
    let mut listed = vec![Vec::new(); handles.len()];
    while offsets.iter().any(Option::is_some) {
        for (i, fh) in handles.iter().enumerate() {
            let Some(offset) = offsets[i] else { continue };
            let (names, next) = page(driver, ROOT_ID, *fh, offset, how(i));
            offsets[i] = (!names.is_empty()).then_some(next);
            listed[i].extend(names);
        }
    }
    listed
}

/// A READDIR served by the passthrough (a share that holds no listing) reads the host directory
/// into a buffer as big as the request asks, which only the reply buffer bounds: a chain can
/// name gigabytes. It asks the host for at most `HOST_PAGE` at a time: a request for 2 MiB of a
/// directory of 5000 entries (1.1 MiB as the host lists them, 1.2 MiB in FUSE's records) gets
/// the ones in the first 1 MiB the host lists, and the guest asks again from there.
#[test]
fn a_directory_page_read_from_the_host_is_at_most_host_page() {
    const ENTRIES: usize = 5000;
    let dir = tempfile::tempdir().expect("tempdir");
    let long = "n".repeat(200);
    for i in 0..ENTRIES {
        fs::write(dir.path().join(format!("{long}{i:04}")), b"").expect("file");
    }
    let share = Share::with_listing_budget(dir.path(), false, ListingBudget::new(0)).expect("share");
    let mut driver = FuseDriver::new(server_for(share));
    mount(&mut driver);
    let fh = opendir(&mut driver, ROOT_ID);

    let (names, _) = listed_in(&mut driver, ROOT_ID, ReadIn { fh, size: 2 << 20, ..ReadIn::default() }, Readdir::Plain);

    // A getdents64 record of a long name: 19 bytes, the name and its NUL, padded to 8.
    let most = super::share::HOST_PAGE as usize / 224 + [".", ".."].len();
    assert!(names.len() <= most && names.len() < ENTRIES, "{} entries in one reply", names.len());
}
