//! Which kernel `lguest exec` boots, and where its modules are.
//!
//! The kernel: `--kernel`, else the reference kernel the project's scripts download
//! (`${LGUEST_CACHE:-$HOME/.cache/lguest}/kernel/vmlinux`, booted through PVH, or the
//! bzImage beside it). Its modules: `--modules`, else the `modules` directory beside the
//! kernel (the cache's layout), else `/lib/modules/VERSION` for the version a bzImage names
//! in its header, else none (a kernel with the drivers built in).
//!
//! The version is read from a file the user named: a bounded, checked read of the setup
//! header, nothing more.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::ExecError;
use crate::error::{Error, Result};

/// The kernel to boot, checked to be readable.
pub fn find(explicit: Option<&Path>) -> Result<PathBuf> {
    let kernel = match explicit {
        Some(path) => path.to_path_buf(),
        None => reference_kernel(&cache_dir()).map_err(ExecError::NoKernel)?,
    };
    crate::config::check_readable(&kernel, "kernel")?;
    Ok(kernel)
}

/// `${LGUEST_CACHE:-$HOME/.cache/lguest}`.
fn cache_dir() -> PathBuf {
    match (std::env::var_os("LGUEST_CACHE"), std::env::var_os("HOME")) {
        (Some(cache), _) => PathBuf::from(cache),
        (None, Some(home)) => PathBuf::from(home).join(".cache/lguest"),
        (None, None) => PathBuf::from("/nonexistent/.cache/lguest"),
    }
}

/// The cache's vmlinux, else its bzImage; the error names where we looked.
pub fn reference_kernel(cache: &Path) -> std::result::Result<PathBuf, PathBuf> {
    let dir = cache.join("kernel");
    ["vmlinux", "bzImage"].iter().map(|name| dir.join(name)).find(|path| path.is_file()).ok_or_else(|| dir.join("vmlinux"))
}

/// The modules directory for `kernel` (see the module's story), if there is one.
pub fn modules_dir(explicit: Option<&Path>, kernel: &Path) -> Option<PathBuf> {
    if let Some(dir) = explicit {
        return Some(dir.to_path_buf());
    }
    let beside = kernel.parent().unwrap_or(Path::new(".")).join("modules");
    if beside.join("modules.dep").is_file() {
        return Some(beside);
    }
    let version = std::fs::File::open(kernel).ok().and_then(bzimage_version)?;
    let system = Path::new("/lib/modules").join(version);
    system.join("modules.dep").is_file().then_some(system)
}

/// The setup header's kernel_version string of a bzImage ("6.1.0-28-cloud-amd64 (...)" → its
/// first word), or None for anything else.
pub fn bzimage_version(file: impl Read) -> Option<String> {
    let mut head = Vec::new();
    file.take(64 * 1024).read_to_end(&mut head).ok()?;
    if head.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let pointer = u16::from_le_bytes(head.get(0x20e..0x210)?.try_into().ok()?);
    let start = 0x200 + usize::from(pointer);
    let text = head.get(start..)?.split(|&b| b == 0).next()?;
    let version = std::str::from_utf8(text).ok()?.split_whitespace().next()?;
    let plain = version.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+~".contains(&b));
    (plain && !version.starts_with('.')).then(|| version.to_string())
}

impl From<ExecError> for Error {
    fn from(error: ExecError) -> Error {
        Error::Exec(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bzimage_with(version: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 0x1000];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        image[0x500..0x500 + version.len()].copy_from_slice(version);
        image
    }

    #[test]
    fn the_version_comes_from_the_setup_header() {
        assert_eq!(bzimage_version(&bzimage_with(b"6.1.0-28-cloud-amd64 (debian-kernel@lists.debian.org) #1\0")[..]).as_deref(), Some("6.1.0-28-cloud-amd64"));
    }

    #[test]
    fn hostile_headers_give_no_version() {
        for bad in [&b"6.1/../../../etc\0"[..], b"..\0", b"\xff\xfe\0", b"\0"] {
            assert_eq!(bzimage_version(&bzimage_with(bad)[..]), None, "{bad:?}");
        }
        let mut pointing_past_the_end = bzimage_with(b"x\0");
        pointing_past_the_end[0x20e..0x210].copy_from_slice(&0xffffu16.to_le_bytes());
        pointing_past_the_end.truncate(0x1000);
        assert_eq!(bzimage_version(&pointing_past_the_end[..]), None);
        for short in [&b""[..], b"HdrS", &[0u8; 0x204]] {
            assert_eq!(bzimage_version(short), None);
        }
        assert_eq!(bzimage_version(&vec![0u8; 0x1000][..]), None, "an ELF or anything else: none");
    }

    #[test]
    fn the_reference_kernel_is_the_caches_vmlinux_then_its_bzimage() {
        let cache = tempfile::tempdir().expect("tempdir");
        let dir = cache.path().join("kernel");
        assert_eq!(reference_kernel(cache.path()), Err(dir.join("vmlinux")), "the error names where to put one");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("bzImage"), b"k").expect("write");
        assert_eq!(reference_kernel(cache.path()), Ok(dir.join("bzImage")));
        std::fs::write(dir.join("vmlinux"), b"k").expect("write");
        assert_eq!(reference_kernel(cache.path()), Ok(dir.join("vmlinux")));
    }

    #[test]
    fn modules_beside_the_kernel_are_found() {
        let cache = tempfile::tempdir().expect("tempdir");
        let kernel = cache.path().join("vmlinux");
        assert_eq!(modules_dir(None, &kernel), None);
        std::fs::create_dir(cache.path().join("modules")).expect("mkdir");
        std::fs::write(cache.path().join("modules/modules.dep"), b"").expect("write");
        assert_eq!(modules_dir(None, &kernel), Some(cache.path().join("modules")));
        assert_eq!(modules_dir(Some(Path::new("/m")), &kernel), Some(PathBuf::from("/m")));
    }
}
