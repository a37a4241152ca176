//! `lguest rebase-snap`: a Diff snapshot's memory file merged onto the memory file it
//! followed, as Firecracker's tool of that name does.
//!
//! A Diff memory file ([`super::memory::save_diff`]) is as long as guest memory and holds data
//! only where pages changed; the rest is holes. So the merge copies the diff's data extents,
//! found with `lseek(SEEK_DATA)` and `lseek(SEEK_HOLE)`, to the same offsets of the base, and
//! leaves the base's other bytes alone. Afterwards the base restores the guest the Diff saved
//! (with the Diff's snapshot file); merging several Diffs in the order they were taken works
//! the same way. The file system must report holes (ext4, xfs, btrfs and tmpfs do); one that
//! calls the whole file data would copy the diff's holes as zeros.
//!
//! What it trusts: neither file. Two files of different lengths are not a base and its diff
//! (both are as long as the guest's memory), and are refused before anything is written.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// `lguest rebase-snap --base-file BASE --diff-file DIFF`.
#[derive(Debug, clap::Args)]
pub struct RebaseArgs {
    /// The memory file to update in place: a Full snapshot's (or one already rebased).
    #[arg(long, value_name = "PATH")]
    pub base_file: PathBuf,
    /// The Diff snapshot's memory file, taken after the base.
    #[arg(long, value_name = "PATH")]
    pub diff_file: PathBuf,
}

/// Why a merge could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RebaseError {
    #[error("cannot open the {what} '{}': {source}", path.display())]
    Open { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the diff file is {diff} bytes and the base file {base}: a Diff snapshot's memory file is as long as its base; are they of the same guest?")]
    SizeMismatch { base: u64, diff: u64 },
    #[error("cannot copy the diff onto the base: {0}")]
    Copy(std::io::Error),
}

impl RebaseError {
    /// 2 for files the user must change, 1 for the host's failure while copying.
    pub fn exit_code(&self) -> u8 {
        match self {
            RebaseError::Copy(_) => 1,
            _ => 2,
        }
    }
}

impl RebaseArgs {
    /// Copies the diff's data onto the base; returns how many bytes were copied.
    pub fn run(&self) -> Result<u64, RebaseError> {
        rebase(&self.base_file, &self.diff_file)
    }
}

/// Copies every data extent of the file at `diff` to the same offset of the file at `base`.
pub fn rebase(base: &Path, diff: &Path) -> Result<u64, RebaseError> {
    let diff_file = File::open(diff).map_err(|source| open_error("diff file", diff, source))?;
    let base_file = OpenOptions::new().write(true).open(base).map_err(|source| open_error("base file", base, source))?;
    let len = |file: &File, what, path| file.metadata().map(|m| m.len()).map_err(|source| open_error(what, path, source));
    let (base_len, diff_len) = (len(&base_file, "base file", base)?, len(&diff_file, "diff file", diff)?);
    if base_len != diff_len {
        return Err(RebaseError::SizeMismatch { base: base_len, diff: diff_len });
    }
    let mut copied = 0;
    let mut buffer = vec![0u8; CHUNK];
    let mut offset = 0;
    while let Some((start, end)) = next_extent(&diff_file, offset, diff_len).map_err(RebaseError::Copy)? {
        copy_range(&diff_file, &base_file, start, end, &mut buffer).map_err(RebaseError::Copy)?;
        copied += end - start;
        offset = end;
    }
    base_file.sync_all().map_err(RebaseError::Copy)?;
    Ok(copied)
}

fn open_error(what: &'static str, path: &Path, source: std::io::Error) -> RebaseError {
    RebaseError::Open { what, path: path.to_path_buf(), source }
}

/// The merge copies this much at a time.
const CHUNK: usize = 1 << 20;

/// The next run of data at or after `offset`, as `[start, end)`; `None` past the last one.
fn next_extent(file: &File, offset: u64, len: u64) -> std::io::Result<Option<(u64, u64)>> {
    if offset >= len {
        return Ok(None);
    }
    let Some(start) = seek(file, offset, libc::SEEK_DATA)? else { return Ok(None) };
    let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
    Ok(Some((start, end)))
}

/// `lseek` to the next data or hole at or after `offset`; `None` when there is none (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
    // SAFETY: lseek on a file descriptor we own; it moves only the file's offset, which
    // nothing else uses (every read and write here is positioned).
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if found < 0 {
        let error = std::io::Error::last_os_error();
        return if error.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(error) };
    }
    Ok(Some(found as u64))
}

fn copy_range(from: &File, to: &File, start: u64, end: u64, buffer: &mut [u8]) -> std::io::Result<()> {
    let mut at = start;
    while at < end {
        let len = usize::try_from(end - at).map_or(buffer.len(), |left| left.min(buffer.len()));
        let bytes = &mut buffer[..len];
        from.read_exact_at(bytes, at)?;
        to.write_all_at(bytes, at)?;
        at += len as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A sparse file of `len` bytes with `data` written at each offset.
    fn sparse(path: &Path, len: u64, data: &[(u64, &[u8])]) {
        let file = File::create(path).expect("create");
        file.set_len(len).expect("length");
        for (at, bytes) in data {
            file.write_all_at(bytes, *at).expect("write");
        }
    }

    #[test]
    fn the_diffs_data_lands_on_the_base_and_its_holes_leave_the_base_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, diff) = (dir.path().join("base"), dir.path().join("diff"));
        std::fs::write(&base, vec![0xbb; 4 * MIB as usize]).expect("base");
        // Zeros written as data must be copied too: a page the guest zeroed is a change.
        sparse(&diff, 4 * MIB, &[(4096, &[1u8; 4096]), (3 * MIB, &[0u8; 8192]), (4 * MIB - 4096, &[2u8; 4096])]);
        let copied = rebase(&base, &diff).expect("rebase");

        let merged = std::fs::read(&base).expect("read");
        let mut want = vec![0xbb; 4 * MIB as usize];
        want[4096..8192].fill(1);
        want[3 * MIB as usize..3 * MIB as usize + 8192].fill(0);
        want[4 * MIB as usize - 4096..].fill(2);
        assert!(merged == want, "the merged file differs from the base with the diff's pages");
        // A file system may allocate (and so report as data) more than was written, never less.
        assert!((4 * 4096..4 * MIB).contains(&copied), "{copied} bytes copied");
    }

    #[test]
    fn a_diff_of_another_size_is_refused_and_the_base_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, diff) = (dir.path().join("base"), dir.path().join("diff"));
        std::fs::write(&base, vec![0xbb; 8192]).expect("base");
        sparse(&diff, 4096, &[(0, &[1u8; 4096])]);
        let error = rebase(&base, &diff).expect_err("refused");
        assert!(matches!(error, RebaseError::SizeMismatch { base: 8192, diff: 4096 }), "{error}");
        assert_eq!(error.exit_code(), 2);
        assert_eq!(std::fs::read(&base).expect("read"), vec![0xbb; 8192]);
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, diff) = (dir.path().join("base"), dir.path().join("diff"));
        sparse(&diff, 4096, &[]);
        let error = rebase(&base, &diff).expect_err("no base");
        assert!(error.to_string().contains("cannot open the base file") && error.to_string().contains("base"), "{error}");
        let error = rebase(&diff, &dir.path().join("nothing")).expect_err("no diff");
        assert!(error.to_string().contains("cannot open the diff file"), "{error}");
        assert_eq!(error.exit_code(), 2);
    }

    #[test]
    fn an_empty_diff_copies_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, diff) = (dir.path().join("base"), dir.path().join("diff"));
        std::fs::write(&base, vec![7u8; 8192]).expect("base");
        sparse(&diff, 8192, &[]);
        assert_eq!(rebase(&base, &diff).expect("rebase"), 0);
        assert_eq!(std::fs::read(&base).expect("read"), vec![7u8; 8192]);
    }
}
