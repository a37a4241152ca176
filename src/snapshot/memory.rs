//! The guest's memory in a snapshot: one file, its RAM ranges one after the other, written
//! when the snapshot is taken, and mapped privately when it is restored (see
//! [`crate::memory::map_guest_memory_file`]): pages load on first touch.
//!
//! The file is sparse: a page of zeros is left a hole, which reads back as zeros. Most of an
//! idle guest's RAM was never touched, so a 2 GiB guest's file takes a few dozen MiB of disk,
//! and taking the snapshot writes only that.
//!
//! A Diff snapshot's file has the same length and layout, but holds only the pages written
//! since the last snapshot ([`save_diff`]); every other page is a hole, zeros included, which
//! is why it is not a memory file of its own: `lguest rebase-snap` copies its data onto the
//! file it followed.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::dirty::DirtyPages;
use super::SnapshotError;
use crate::memory::{GuestMemoryMmap, GuestRam, Tracking, PAGE_SIZE as PAGE};

/// Guest RAM is copied out this much at a time.
const CHUNK: usize = 1 << 20;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// Writes the guest's RAM to `path` (made, or emptied, first), its pages of zeros as holes.
pub fn save(mem: &GuestMemoryMmap, path: &Path) -> Result<(), SnapshotError> {
    let failed = |source| write_failed(path, source);
    let file = File::create(path).map_err(failed)?;
    let mut buffer = vec![0u8; CHUNK];
    let mut file_offset = 0u64;
    for region in mem.iter() {
        let mut done = 0u64;
        while done < region.len() {
            let len = usize::try_from(region.len() - done).map_or(CHUNK, |left| left.min(CHUNK));
            let bytes = &mut buffer[..len];
            let at = GuestAddress(region.start_addr().0 + done);
            mem.read_slice(bytes, at).map_err(|e| failed(std::io::Error::other(e.to_string())))?;
            write_pages_with_data(&file, bytes, file_offset + done).map_err(failed)?;
            done += len as u64;
        }
        file_offset += region.len();
    }
    finish(&file, file_offset, path)
}

/// Writes the pages of `dirty` to `path` (made, or emptied, first) at their offsets in guest
/// memory, zeros too, each run of them with one write; the rest of the file is holes.
pub fn save_diff(mem: &GuestMemoryMmap, dirty: &DirtyPages, path: &Path) -> Result<(), SnapshotError> {
    let failed = |source| write_failed(path, source);
    let file = File::create(path).map_err(failed)?;
    let mut buffer = vec![0u8; CHUNK];
    let mut file_offset = 0u64;
    for (index, region) in mem.iter().enumerate() {
        let pages = usize::try_from(region.len()).map_or(0, |len| len / PAGE);
        let mut page = 0;
        while page < pages {
            let run = (page..pages).take(CHUNK / PAGE).take_while(|&p| dirty.contains(index, p)).count();
            if run == 0 {
                page += 1;
                continue;
            }
            let bytes = &mut buffer[..run * PAGE];
            let offset = (page * PAGE) as u64;
            mem.read_slice(bytes, GuestAddress(region.start_addr().0 + offset)).map_err(|e| failed(std::io::Error::other(e.to_string())))?;
            file.write_all_at(bytes, file_offset + offset).map_err(failed)?;
            page += run;
        }
        file_offset += region.len();
    }
    finish(&file, file_offset, path)
}

fn write_failed(path: &Path, source: std::io::Error) -> SnapshotError {
    SnapshotError::Write { what: "the memory file", path: path.to_path_buf(), source }
}

/// Makes the file as long as the guest's RAM (holes at its end too), and syncs it.
fn finish(file: &File, len: u64, path: &Path) -> Result<(), SnapshotError> {
    file.set_len(len).map_err(|source| write_failed(path, source))?;
    file.sync_all().map_err(|source| write_failed(path, source))
}

/// Writes `bytes` at `offset`, each run of pages that are not all zeros with one write.
fn write_pages_with_data(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    let mut run: Option<usize> = None;
    for (index, page) in bytes.chunks(PAGE).enumerate() {
        let start = index * PAGE;
        match (run, page == &ZERO_PAGE[..page.len()]) {
            (None, false) => run = Some(start),
            (Some(from), true) => {
                file.write_all_at(&bytes[from..start], offset + from as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    match run {
        Some(from) => file.write_all_at(&bytes[from..], offset + from as u64),
        None => Ok(()),
    }
}

/// Maps the memory file of a guest of `memory_bytes`. A file of another size belongs to
/// another snapshot, and is refused.
pub fn restore(path: &Path, memory_bytes: u64, tracking: Tracking) -> Result<GuestRam, SnapshotError> {
    let bad = |why: String| SnapshotError::MemoryFile { path: path.to_path_buf(), why };
    let file = File::open(path).map_err(|e| bad(e.to_string()))?;
    let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    if len != memory_bytes {
        return Err(bad(format!("it holds {len} bytes, but the snapshot's guest has {memory_bytes} bytes of memory; is it this snapshot's memory file?")));
    }
    crate::memory::map_guest_memory_file(&file, memory_bytes, tracking).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn pages_of_zeros_are_holes_and_the_rest_reads_back_whole() {
        let mem = crate::memory::from_ranges(&[(GuestAddress(0), 8 << 20)], Tracking::Off).expect("guest memory");
        // Three pages with data: two side by side across a chunk's end, one alone; a byte at
        // the very end of RAM.
        let written = [(CHUNK as u64 - 10, vec![0xa5u8; 20]), (5 << 20, vec![7u8; 100]), ((8 << 20) - 1, vec![1u8])];
        for (at, bytes) in &written {
            mem.write_slice(bytes, GuestAddress(*at)).expect("write");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mem");
        save(&mem, &path).expect("save");

        let metadata = std::fs::metadata(&path).expect("metadata");
        assert_eq!(metadata.len(), 8 << 20);
        // st_blocks counts 512-byte blocks; a file system may add a few of its own.
        let allocated = metadata.blocks() * 512;
        assert!(allocated <= 8 * PAGE as u64, "{allocated} bytes allocated for 4 pages of data");
        let saved = std::fs::read(&path).expect("read");
        let mut want = vec![0u8; 8 << 20];
        mem.read_slice(&mut want, GuestAddress(0)).expect("read guest");
        assert!(saved == want, "the file differs from the guest's memory");
    }

    #[test]
    fn a_diff_holds_the_dirty_pages_at_their_offsets_zeros_included_and_holes_elsewhere() {
        // Two ranges, as a guest above 3 GiB has: the file puts them one after the other.
        let mem = crate::memory::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 30), 1 << 20)], Tracking::Off).expect("memory");
        mem.write_slice(&[9u8; PAGE], GuestAddress(0x3000)).expect("write");
        mem.write_slice(&[8u8; PAGE], GuestAddress((1 << 30) + 0x5000)).expect("write");
        mem.write_slice(&[7u8; PAGE], GuestAddress(0x8000)).expect("write"); // not dirty: left out
        // Page 3 of the first range, pages 5 and 6 of the second (6 is zeros: a change too).
        let dirty = DirtyPages(vec![vec![1 << 3, 0, 0, 0], vec![(1 << 5) | (1 << 6), 0, 0, 0]]);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("diff");
        save_diff(&mem, &dirty, &path).expect("save");

        let saved = std::fs::read(&path).expect("read");
        assert_eq!(saved.len(), 2 << 20);
        let page = |n: usize| &saved[n * PAGE..(n + 1) * PAGE];
        assert_eq!((page(3)[0], page(256 + 5)[0], page(8)[0]), (9, 8, 0));
        let allocated = std::fs::metadata(&path).expect("metadata").blocks() * 512;
        assert!(allocated >= 3 * PAGE as u64, "the zero page was written as data: {allocated} bytes allocated");
        assert!(allocated <= 8 * PAGE as u64, "{allocated} bytes allocated for 3 pages");
    }
}
