//! The guest's memory in a snapshot: one file, its RAM ranges one after the other, written
//! when the snapshot is taken, and mapped privately when it is restored (see
//! [`crate::memory::map_guest_memory_file`]): pages load on first touch.
//!
//! The file is sparse: a page of zeros is left a hole, which reads back as zeros. Most of an
//! idle guest's RAM was never touched, so a 2 GiB guest's file takes a few dozen MiB of disk,
//! and taking the snapshot writes only that.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::SnapshotError;
use crate::memory::GuestRam;

/// The unit of a hole: the host's (and the guest's) page.
const PAGE: usize = 4096;
/// Guest RAM is copied out this much at a time.
const CHUNK: usize = 1 << 20;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// Writes the guest's RAM to `path` (made, or emptied, first), its pages of zeros as holes.
pub fn save(mem: &GuestMemoryMmap, path: &Path) -> Result<(), SnapshotError> {
    let failed = |source| SnapshotError::Write { what: "the memory file", path: path.to_path_buf(), source };
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
    // The holes at the end too: the file is as long as the guest's RAM.
    file.set_len(file_offset).map_err(failed)?;
    file.sync_all().map_err(failed)
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
pub fn restore(path: &Path, memory_bytes: u64) -> Result<GuestRam, SnapshotError> {
    let bad = |why: String| SnapshotError::MemoryFile { path: path.to_path_buf(), why };
    let file = File::open(path).map_err(|e| bad(e.to_string()))?;
    let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    if len != memory_bytes {
        return Err(bad(format!("it holds {len} bytes, but the snapshot's guest has {memory_bytes} bytes of memory; is it this snapshot's memory file?")));
    }
    crate::memory::map_guest_memory_file(&file, memory_bytes).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn pages_of_zeros_are_holes_and_the_rest_reads_back_whole() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("guest memory");
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
}
