//! Hard links when lguest is not root, and directories reopened for listing.
//!
//! The passthrough links an inode it holds with `linkat(fd, "", ..., AT_EMPTY_PATH)`, which
//! Linux (before 6.10) allows only with CAP_DAC_READ_SEARCH: for an ordinary user every `ln`
//! in a share fails. The way that needs no capability is `linkat` of `/proc/self/fd/N` with
//! `AT_SYMLINK_FOLLOW`, but the passthrough doesn't lend us its fds, only the path its fd
//! points at. A path can be raced (a directory on it swapped for a symlink to `/etc`), so we
//! never walk it as a path: [`Beneath::reopen`] resolves it from the share's root with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, which fails rather
//! than leave the share or follow any link. What it opens is inside the share, whatever the
//! guest renamed in between; at worst it links another file of the share, which the guest
//! could have linked anyway.
//!
//! The same walk opens a directory for reading ([`Beneath::open_dir`]), which the passthrough
//! holds only as an `O_PATH` fd: the share lists directories itself ([`super::listing`]).
//!
//! Runs on the fs worker (`openat2` and `linkat` are in its seccomp role).

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The share's root, to resolve paths beneath.
pub struct Beneath {
    root: File,
    root_path: PathBuf,
}

impl Beneath {
    /// Opens `root_path` (absolute, resolved) as the root paths are resolved beneath.
    pub fn new(root_path: &Path) -> io::Result<Beneath> {
        let path = c_path(root_path.as_os_str().as_bytes())?;
        let root = open_how(libc::AT_FDCWD, &path, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        Ok(Beneath { root, root_path: root_path.to_path_buf() })
    }

    /// Opens `path` (absolute, as /proc/self/fd reports a passthrough fd) as an `O_PATH` fd,
    /// walking from the root without leaving it and without following any symlink.
    pub fn reopen(&self, path: &Path) -> io::Result<File> {
        self.open_beneath(path, libc::O_PATH)
    }

    /// Opens the directory at `path` (absolute, as for [`Beneath::reopen`]) for reading its
    /// entries, by the same walk.
    pub fn open_dir(&self, path: &Path) -> io::Result<File> {
        self.open_beneath(path, libc::O_RDONLY | libc::O_DIRECTORY)
    }

    fn open_beneath(&self, path: &Path, flags: i32) -> io::Result<File> {
        let inside = path.strip_prefix(&self.root_path).map_err(|_| io::Error::from_raw_os_error(libc::EXDEV))?;
        let relative = if inside.as_os_str().is_empty() { Path::new(".") } else { inside };
        let resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        open_how(self.root.as_raw_fd(), &c_path(relative.as_os_str().as_bytes())?, flags, resolve)
    }
}

/// Links the file `source` (an `O_PATH` fd) as `name` in the directory `dir`.
pub fn link_fd(source: &File, dir: &File, name: &CStr) -> io::Result<()> {
    let proc_path = c_path(format!("/proc/self/fd/{}", source.as_raw_fd()).as_bytes())?;
    // SAFETY: both paths are NUL-terminated and live across the call; the fds are ours.
    let done = unsafe { libc::linkat(libc::AT_FDCWD, proc_path.as_ptr(), dir.as_raw_fd(), name.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn c_path(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `openat2(dir, path, O_CLOEXEC | flags, resolve)`.
fn open_how(dir: i32, path: &CStr, flags: i32, resolve: u64) -> io::Result<File> {
    // SAFETY: open_how is plain integers; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_CLOEXEC | flags) as u64;
    how.resolve = resolve;
    // SAFETY: `path` is NUL-terminated, `how` is a valid open_how of the size we pass; the
    // returned fd, if any, is owned by the File we make of it.
    let fd = unsafe { libc::syscall(libc::SYS_openat2, dir, path.as_ptr(), &how as *const libc::open_how, std::mem::size_of::<libc::open_how>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just gave us, owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_stays_beneath_the_root_and_follows_no_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("share");
        std::fs::create_dir_all(root.join("sub")).expect("dirs");
        std::fs::write(root.join("sub/file"), b"x").expect("file");
        std::os::unix::fs::symlink("/etc", root.join("out")).expect("link out");
        std::os::unix::fs::symlink("sub", root.join("in")).expect("link in");
        let beneath = Beneath::new(&root).expect("root");

        assert!(beneath.reopen(&root.join("sub/file")).is_ok());
        assert!(beneath.reopen(&root).is_ok(), "the root itself");
        assert!(beneath.open_dir(&root.join("sub")).is_ok(), "a directory, for reading");
        assert_eq!(beneath.open_dir(&root.join("in")).err().and_then(|e| e.raw_os_error()), Some(libc::ELOOP), "a directory through a symlink");
        let errno = |path: PathBuf| beneath.reopen(&path).err().and_then(|e| e.raw_os_error());
        assert_eq!(errno(root.join("out/passwd")), Some(libc::ELOOP), "a symlink out");
        assert_eq!(errno(root.join("in/file")), Some(libc::ELOOP), "even a symlink that stays inside");
        assert_eq!(errno(root.join("sub/../../share/sub/file")), Some(libc::EXDEV), "a path that climbs out and back");
        assert_eq!(errno(PathBuf::from("/etc/passwd")), Some(libc::EXDEV), "a path elsewhere");
    }

    /// The fallback itself, as an ordinary user: this thread drops to nobody (a raw setresuid
    /// changes only the calling thread, and with it every capability).
    #[test]
    fn a_link_through_proc_needs_no_capability() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        std::fs::write(root.join("file"), b"x").expect("file");
        // Writable by all, so that fs.protected_hardlinks lets nobody link root's file.
        for path in [&root, &root.join("file")] {
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
        }
        let linked = std::thread::spawn(move || {
            // SAFETY: setresgid and setresuid take integers and change this thread's credentials only.
            unsafe {
                libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534);
                libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534);
            }
            let beneath = Beneath::new(&root).expect("root");
            let source = beneath.reopen(&root.join("file")).expect("file");
            link_fd(&source, &beneath.reopen(&root).expect("dir"), c"hard").map(|()| root)
        })
        .join()
        .expect("thread")
        .expect("linked");
        assert_eq!(std::os::unix::fs::MetadataExt::nlink(&std::fs::metadata(linked.join("hard")).expect("link")), 2);
    }
}
