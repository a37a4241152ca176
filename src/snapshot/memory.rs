//! The guest's memory in a snapshot: one file, its RAM ranges one after the other, written
//! whole when the snapshot is taken, and mapped privately when it is restored (see
//! [`crate::memory::map_guest_memory_file`]): pages load on first touch.

use std::fs::File;
use std::path::Path;

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::SnapshotError;
use crate::memory::GuestRam;

/// Writes every byte of the guest's RAM to `path` (made, or emptied, first).
pub fn save(mem: &GuestMemoryMmap, path: &Path) -> Result<(), SnapshotError> {
    let failed = |source| SnapshotError::Write { what: "the memory file", path: path.to_path_buf(), source };
    let mut file = File::create(path).map_err(failed)?;
    for region in mem.iter() {
        let len = usize::try_from(region.len()).map_err(|_| SnapshotError::Invalid("a RAM range larger than this host's address space".into()))?;
        mem.write_all_volatile_to(region.start_addr(), &mut file, len).map_err(|e| failed(std::io::Error::other(e.to_string())))?;
    }
    file.sync_all().map_err(failed)
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
