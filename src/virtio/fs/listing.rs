//! Directory listings that hold while the guest changes the directory it is reading.
//!
//! The guest's kernel reads a directory in pieces: each FUSE_READDIR(PLUS) carries the offset
//! the previous reply ended at, and a reply (a page) holds far fewer entries than one host
//! `getdents64` returns. fuse-backend-rs's passthrough therefore seeks the host directory to
//! each offset the guest hands back. Where a directory's offsets are positions (tmpfs before
//! Linux 6.6, ramfs and other simple file systems today), an `rm -rf` that deletes what it has
//! read moves every later entry forward: the seek lands past entries never listed, and the
//! final rmdir fails with ENOTEMPTY (bench row 11 on the lab's 6.1 tmpfs).
//!
//! So [`Share`](super::share::Share) reads a directory whole into a [`Listing`] when the guest
//! reads it from offset 0, keeps it with the open handle ([`Listings`]), and serves every
//! offset from it: offset N is "after the listing's Nth entry", whatever happened to the host
//! directory since. That is what POSIX asks of readdir: an entry there through the whole
//! listing is listed once; one added or removed meanwhile may or may not be (readdirplus skips
//! one that has gone by the time it is looked up). Offset 0 again (rewinddir) lists afresh.
//!
//! Cost and trust: a listing holds each name once (about 40 bytes an entry) while the guest
//! keeps the directory open; it is dropped at releasedir and at a remount. The guest's offsets
//! are only indexes into it, checked against its length. The entries come from the host
//! kernel (rustix's `Dir` parses its `getdents64` records).

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use fuse_backend_rs::api::filesystem::DirEntry;

type Handle = u64;

/// One entry, as the host listed it.
struct Listed {
    ino: u64,
    /// `d_type` ([`d_type`]).
    type_: u32,
    name: CString,
}

/// A directory's entries in the host's order, without `.` and `..`.
#[derive(Default)]
pub struct Listing {
    entries: Vec<Listed>,
}

impl Listing {
    /// Lists `dir` (a directory opened for reading) whole.
    pub fn read(dir: File) -> io::Result<Listing> {
        let mut stream = rustix::fs::Dir::new(dir)?;
        let mut entries = Vec::new();
        while let Some(entry) = stream.read() {
            let entry = entry?;
            let name = entry.file_name();
            if matches!(name.to_bytes(), b"." | b"..") {
                continue;
            }
            entries.push(Listed { ino: entry.ino(), type_: d_type(entry.file_type()), name: name.to_owned() });
        }
        Ok(Listing { entries })
    }

    /// The entries after the first `offset`, each with its name as a C string and the offset
    /// that resumes after it. Past the end: none.
    pub fn after(&self, offset: u64) -> impl Iterator<Item = (DirEntry<'_>, &CStr)> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.entries.len());
        self.entries[start..].iter().zip(start as u64 + 1..).map(|(listed, offset)| {
            let entry = DirEntry { ino: listed.ino, offset, type_: listed.type_, name: listed.name.to_bytes() };
            (entry, listed.name.as_c_str())
        })
    }
}

/// `DT_*` of a file type: its `S_IF*` bits shifted down by 12; DT_UNKNOWN (0) where the host's
/// file system doesn't say (rustix gives that type all the `S_IFMT` bits).
fn d_type(file_type: rustix::fs::FileType) -> u32 {
    match file_type {
        rustix::fs::FileType::Unknown => libc::DT_UNKNOWN.into(),
        known => known.as_raw_mode() >> 12,
    }
}

/// The directories the guest has open, by handle, each with its listing once it has one.
/// Only handles the passthrough gave out have a place here, so a forged handle can't make the
/// share list (and hold) anything.
#[derive(Default)]
pub struct Listings {
    open: Mutex<HashMap<Handle, Option<Arc<Listing>>>>,
}

impl Listings {
    /// Makes room for `handle`, a directory the guest just opened.
    pub fn open(&self, handle: Handle) {
        self.lock().insert(handle, None);
    }

    /// The listing to serve `offset` of `handle` from: a new one (from `list`) at offset 0 or
    /// when the handle has none yet, else the one it has. EBADF for a handle not open.
    pub fn at(&self, handle: Handle, offset: u64, list: impl FnOnce() -> io::Result<Listing>) -> io::Result<Arc<Listing>> {
        match self.lock().get(&handle) {
            None => return Err(io::Error::from_raw_os_error(libc::EBADF)),
            Some(Some(listing)) if offset != 0 => return Ok(Arc::clone(listing)),
            Some(_) => {}
        }
        let listing = Arc::new(list()?);
        // Only if it is still open: a releasedir may have come in between.
        if let Some(slot) = self.lock().get_mut(&handle) {
            *slot = Some(Arc::clone(&listing));
        }
        Ok(listing)
    }

    /// Drops `handle` and its listing (the guest closed the directory).
    pub fn close(&self, handle: Handle) {
        self.lock().remove(&handle);
    }

    /// Drops every listing (a new mount: the old handles are gone).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The map; a panic elsewhere while it was held leaves it usable (it is only a cache of
    /// host listings, never half-written).
    fn lock(&self) -> MutexGuard<'_, HashMap<Handle, Option<Arc<Listing>>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(listing: &Listing, offset: u64) -> Vec<(String, u64)> {
        listing.after(offset).map(|(entry, _)| (String::from_utf8_lossy(entry.name).into_owned(), entry.offset)).collect()
    }

    #[test]
    fn a_listing_has_every_entry_once_with_offsets_that_resume_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["a", "b", "c"] {
            std::fs::write(dir.path().join(name), b"").expect("file");
        }
        std::fs::create_dir(dir.path().join("sub")).expect("dir");
        let listing = Listing::read(File::open(dir.path()).expect("open")).expect("listing");
        let mut all = names(&listing, 0);
        assert_eq!(all.iter().map(|(_, offset)| *offset).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        let after_two = names(&listing, 2);
        assert_eq!(after_two, all[2..].to_vec(), "offset 2 resumes after the second entry");
        all.sort();
        assert_eq!(all.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(), vec!["a", "b", "c", "sub"]);
        let type_of = |name: &[u8]| listing.after(0).find(|(entry, _)| entry.name == name).expect("listed").0.type_;
        assert_eq!((type_of(b"sub"), type_of(b"a")), (libc::DT_DIR.into(), libc::DT_REG.into()));
        assert_eq!(d_type(rustix::fs::FileType::Unknown), 0, "DT_UNKNOWN, not S_IFMT's bits");
    }

    #[test]
    fn offsets_a_guest_makes_up_find_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("only"), b"").expect("file");
        let listing = Listing::read(File::open(dir.path()).expect("open")).expect("listing");
        for offset in [1, 2, 1 << 40, u64::MAX] {
            assert_eq!(listing.after(offset).count(), 0, "offset {offset}");
        }
    }

    #[test]
    fn offset_zero_lists_afresh_and_a_later_offset_keeps_the_listing() {
        let listings = Listings::default();
        listings.open(7);
        let one = |n: usize| move || Ok(Listing { entries: (0..n).map(|i| Listed { ino: i as u64, type_: 8, name: CString::new(format!("f{i}")).expect("name") }).collect() });
        assert_eq!(listings.at(7, 0, one(3)).expect("first").entries.len(), 3);
        assert_eq!(listings.at(7, 2, one(5)).expect("kept").entries.len(), 3, "the handle's listing, not a new one");
        assert_eq!(listings.at(7, 0, one(5)).expect("rewound").entries.len(), 5, "offset 0 lists again");
        listings.close(7);
        let errno = |result: io::Result<Arc<Listing>>| result.err().and_then(|e| e.raw_os_error());
        assert_eq!(errno(listings.at(7, 2, one(1))), Some(libc::EBADF), "a closed handle lists nothing");
        assert_eq!(errno(listings.at(8, 0, one(1))), Some(libc::EBADF), "nor does a handle never opened");
    }
}
