//! The `lguest exec` guest's initramfs, built in memory at each run: lguest's own binary as
//! `/init`, the shared libraries it runs with, the kernel modules the guest needs, and the
//! request ([`super::request`]). Nothing is installed or cached: what runs in the guest is
//! exactly the lguest that started it.
//!
//! The libraries are the ones this process has mapped (`/proc/self/maps` names the libc,
//! libgcc_s, ... the dynamic loader chose) plus the loader itself, at the path the binary
//! asks for (its `PT_INTERP`, read from the loaded program headers, not from a file). They go
//! in at the paths they have here, so the guest's loader finds them where ours did.
//!
//! The archive is a newc cpio (the `cpio` crate), uncompressed: the guest kernel unpacks it
//! faster than it could decompress it.

use std::collections::HashSet;
use std::ffi::CStr;
use std::io::Write;
use std::path::{Path, PathBuf};

use cpio::newc::{Builder, ModeFileType};

use super::request::{Request, MODULES_DIR, REQUEST_PATH};

/// A newc archive being written, with the directories it already holds.
pub struct Initramfs {
    out: Vec<u8>,
    dirs: HashSet<String>,
    next_ino: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot read {what} '{}' for the guest's initramfs: {source}", path.display())]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("'{}' is over 4 GiB: too big for an initramfs", .0.display())]
    TooBig(PathBuf),
    #[error("cannot write the guest's initramfs: {0}")]
    Write(std::io::Error),
}

impl Default for Initramfs {
    fn default() -> Self {
        Initramfs { out: Vec::new(), dirs: HashSet::from([String::new()]), next_ino: 1 }
    }
}

impl Initramfs {
    /// Adds the directory `path` (absolute) and its parents, each once.
    pub fn dir(&mut self, path: &str) -> Result<(), InitramfsError> {
        let path = path.trim_end_matches('/');
        if self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.dirs.insert(path.to_string());
        self.entry(path, ModeFileType::Directory, 0o755, b"")
    }

    /// Adds a regular file at `path` (absolute), with its parent directories.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), InitramfsError> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.entry(path, ModeFileType::Regular, mode, data)
    }

    /// Adds the host file `source` (symlinks followed) at `path`.
    pub fn copy(&mut self, source: &Path, path: &str, mode: u32, what: &'static str) -> Result<(), InitramfsError> {
        let data = std::fs::read(source).map_err(|e| InitramfsError::Read { what, path: source.to_path_buf(), source: e })?;
        self.file(path, mode, &data)
    }

    /// `/dev/console` (character device 5:1).
    fn console(&mut self) -> Result<(), InitramfsError> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let builder = Builder::new("dev/console").ino(ino).mode(0o600).nlink(1).rdev_major(5).rdev_minor(1);
        builder.set_mode_file_type(ModeFileType::Char).write(&mut self.out, 0).finish().map_err(InitramfsError::Write)?;
        Ok(())
    }

    fn entry(&mut self, path: &str, kind: ModeFileType, mode: u32, data: &[u8]) -> Result<(), InitramfsError> {
        let size = u32::try_from(data.len()).map_err(|_| InitramfsError::TooBig(PathBuf::from(path)))?;
        let name = path.trim_start_matches('/');
        let ino = self.next_ino;
        self.next_ino += 1;
        let mut writer = Builder::new(name).ino(ino).mode(mode).nlink(1).set_mode_file_type(kind).write(&mut self.out, size);
        writer.write_all(data).map_err(InitramfsError::Write)?;
        writer.finish().map_err(InitramfsError::Write)?;
        Ok(())
    }

    /// The archive, with its trailer.
    pub fn finish(self) -> Result<Vec<u8>, InitramfsError> {
        cpio::newc::trailer(self.out).map_err(InitramfsError::Write)
    }
}

/// The whole initramfs for `request`: this binary as /init, its libraries and loader, the
/// `modules` (already in load order, named in the request) and the request.
pub fn build(request: &Request, modules: &[PathBuf]) -> Result<Vec<u8>, InitramfsError> {
    let mut archive = Initramfs::default();
    for dir in ["/dev", "/proc", "/sys", "/lower", "/rw", "/newroot"] {
        archive.dir(dir)?;
    }
    // The kernel opens /dev/console for /init's stdio before anything is mounted.
    archive.console()?;
    archive.copy(Path::new("/proc/self/exe"), "/init", 0o755, "lguest's own binary")?;
    for library in runtime_files()? {
        let path = library.to_string_lossy();
        archive.copy(&library, &path, 0o755, "a shared library")?;
    }
    for (module, name) in modules.iter().zip(&request.modules) {
        archive.copy(module, &format!("{MODULES_DIR}/{name}"), 0o644, "a kernel module")?;
    }
    archive.file(REQUEST_PATH, 0o644, &request.encode())?;
    archive.finish()
}

/// The names modules get in the initramfs: their load position, then their file name (whose
/// extension tells the init how they are compressed).
pub fn module_file_names(modules: &[PathBuf]) -> Vec<String> {
    modules
        .iter()
        .enumerate()
        .map(|(i, path)| format!("{i:02}-{}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()))
        .collect()
}

/// The loader (at the path the binary names) and every shared library mapped into this process.
fn runtime_files() -> Result<Vec<PathBuf>, InitramfsError> {
    let maps_path = Path::new("/proc/self/maps");
    let maps = std::fs::read_to_string(maps_path).map_err(|source| InitramfsError::Read { what: "the process's map", path: maps_path.into(), source })?;
    let mut files: Vec<PathBuf> = interpreter().into_iter().collect();
    for library in mapped_libraries(&maps) {
        if !files.contains(&library) {
            files.push(library);
        }
    }
    Ok(files)
}

/// The shared objects in a `/proc/PID/maps` text, each once, in order of first mapping.
pub fn mapped_libraries(maps: &str) -> Vec<PathBuf> {
    let mut seen = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path: the path is what follows the fifth field.
        let Some(path) = line.splitn(6, ' ').nth(5).map(str::trim_start) else { continue };
        let name = path.rsplit('/').next().unwrap_or_default();
        let shared_object = name.ends_with(".so") || name.contains(".so.");
        if path.starts_with('/') && shared_object && !path.ends_with(" (deleted)") && !seen.iter().any(|p: &PathBuf| p == Path::new(path)) {
            seen.push(PathBuf::from(path));
        }
    }
    seen
}

/// This program's `PT_INTERP`: the dynamic loader the kernel starts it with (None if static).
fn interpreter() -> Option<PathBuf> {
    let mut found: Option<PathBuf> = None;
    // SAFETY: dl_iterate_phdr calls `first_object_interp` with valid program headers of each
    // loaded object and our `found` pointer, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(first_object_interp), (&mut found as *mut Option<PathBuf>).cast()) };
    found
}

/// dl_iterate_phdr's callback: reads the first object's (the program's) PT_INTERP, and stops.
unsafe extern "C" fn first_object_interp(info: *mut libc::dl_phdr_info, _size: usize, data: *mut libc::c_void) -> libc::c_int {
    // SAFETY: the loader passes a valid dl_phdr_info, and `data` is `interpreter`'s `found`.
    let (info, found) = unsafe { (&*info, &mut *data.cast::<Option<PathBuf>>()) };
    for index in 0..usize::from(info.dlpi_phnum) {
        // SAFETY: dlpi_phdr points at dlpi_phnum program headers of a loaded object.
        let header = unsafe { &*info.dlpi_phdr.add(index) };
        if header.p_type == libc::PT_INTERP {
            let at = (info.dlpi_addr + header.p_vaddr) as *const libc::c_char;
            // SAFETY: PT_INTERP's segment is mapped and holds a NUL-terminated path.
            let path = unsafe { CStr::from_ptr(at) };
            *found = Some(PathBuf::from(std::ffi::OsStr::from_bytes(path.to_bytes())));
        }
    }
    1
}

use std::os::unix::ffi::OsStrExt;

#[cfg(test)]
mod tests {
    use super::*;

    /// What the `cpio` crate's reader sees in `archive`: (name, mode, contents) per entry.
    fn read_back(archive: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut rest = archive;
        loop {
            let mut reader = cpio::NewcReader::new(rest).expect("a newc header");
            if reader.entry().is_trailer() {
                return entries;
            }
            let (name, mode) = (reader.entry().name().to_string(), reader.entry().mode());
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut reader, &mut data).expect("read");
            entries.push((name, mode, data));
            rest = reader.finish().expect("next");
        }
    }

    #[test]
    fn files_come_after_their_directories_and_read_back_whole() {
        let mut archive = Initramfs::default();
        archive.file("/a/b/c.txt", 0o644, b"hello").expect("file");
        archive.file("/a/b/d", 0o755, b"").expect("file");
        archive.dir("/a").expect("dir again");
        let entries = read_back(&archive.finish().expect("finish"));
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["a", "a/b", "a/b/c.txt", "a/b/d"]);
        assert_eq!(entries[0].1, 0o040755);
        assert_eq!((entries[2].1, entries[2].2.as_slice()), (0o100644, &b"hello"[..]));
    }

    #[test]
    fn the_whole_initramfs_holds_init_its_loader_and_libraries_the_modules_and_the_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let module = dir.path().join("fuse.ko");
        std::fs::write(&module, b"\x7fELF module").expect("module");
        let mut request = crate::exec::request::tests_support::sample();
        request.modules = module_file_names(std::slice::from_ref(&module));
        let entries = read_back(&build(&request, &[module]).expect("build"));
        let find = |name: &str| entries.iter().find(|e| e.0 == name);
        let init = find("init").expect("/init");
        assert_eq!(init.2, std::fs::read("/proc/self/exe").expect("exe"), "/init is this very binary");
        assert_eq!(find("lguest-exec/modules/00-fuse.ko").map(|e| e.2.clone()), Some(b"\x7fELF module".to_vec()));
        let request_back = find("lguest-exec/request.json").expect("request");
        assert_eq!(Request::decode(&request_back.2), Ok(request));
        let interp = interpreter().expect("the test binary is dynamically linked");
        assert!(find(interp.to_string_lossy().trim_start_matches('/')).is_some(), "the loader at {}", interp.display());
        assert!(entries.iter().any(|e| e.0.contains("libc.so")), "libc is in");
    }

    #[test]
    fn maps_lines_give_each_shared_object_once() {
        let maps = "7f00-7f01 r--p 00000000 08:01 12 /usr/lib/x86_64-linux-gnu/libc.so.6
7f01-7f02 r-xp 00001000 08:01 12 /usr/lib/x86_64-linux-gnu/libc.so.6
7f02-7f03 r--p 00000000 08:01 13 /usr/lib/with space/libz.so
7f03-7f04 rw-p 00000000 00:00 0 [heap]
7f04-7f05 r--p 00000000 08:01 14 /usr/bin/lguest
7f05-7f06 r--p 00000000 08:01 15 /tmp/gone.so (deleted)
7f06-7f07 r--p 00000000 00:00 0
garbage
";
        let found = mapped_libraries(maps);
        assert_eq!(found, [PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"), PathBuf::from("/usr/lib/with space/libz.so")]);
    }
}
