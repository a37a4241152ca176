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
//! Cost and trust: a listing holds each name once while the guest keeps the directory open,
//! and a guest may open as many directories as lguest may hold file descriptors, each as big as
//! the host lets it be made. So every listing is charged to its share's [`ListingBudget`]
//! ([`LISTING_BUDGET`] bytes, counted as the listing's heap) as it is read; one that would
//! overrun it is dropped half-read, and that handle falls back to the passthrough's seek to each
//! offset ([`Source::Host`]): exact on ext4, xfs and btrfs, whose offsets are hashes or cookies
//! that survive deletions, and on tmpfs since Linux 6.6; on an older tmpfs or a ramfs a guest
//! that deletes entries while it lists them may then miss some (its `rm -rf` may stop at
//! ENOTEMPTY; run again, it goes on from what is left). A handle only changes its way of listing when the
//! guest starts again from offset 0, so the offsets it hands back always mean what they meant.
//! Bytes return to the budget as each listing goes: at a rewind, releasedir, remount (INIT)
//! and DESTROY. The guest's offsets are only indexes into a listing, checked against its
//! length. The entries come from the host kernel (rustix's `Dir` parses its `getdents64`
//! records).

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use fuse_backend_rs::api::filesystem::DirEntry;

type Handle = u64;

/// The bytes of listings one share holds at most, all its open directories together: about
/// 500 000 entries of 20-byte names. Real work holds far less at once: `find` or `rm -rf` one
/// listing per level it is down, a build a few per job. Every directory of the development
/// host's `/usr` held at once would take 8.9 MiB (135 000 entries, counted as [`entry_cost`]
/// does); its biggest, `/usr/share/man/man1` (17 875 entries), 1.6 MiB.
pub const LISTING_BUDGET: usize = 32 << 20;

/// What a listing costs the budget for each entry besides its name's bytes: the entry itself
/// and the allocator's overhead for the name's own allocation.
const ENTRY_OVERHEAD: usize = std::mem::size_of::<Listed>() + 16;

/// The bytes a share's listings may still take. Shared (an `Arc`) by the share and every
/// listing it holds, which gives its bytes back when it is dropped.
#[derive(Debug)]
pub struct ListingBudget {
    limit: usize,
    left: AtomicUsize,
}

impl ListingBudget {
    /// A budget of `limit` bytes, none of them taken.
    pub fn new(limit: usize) -> Arc<ListingBudget> {
        Arc::new(ListingBudget { limit, left: AtomicUsize::new(limit) })
    }

    /// The bytes the share's listings hold now.
    pub fn held(&self) -> usize {
        self.limit - self.left.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if that many are left.
    fn take(&self, bytes: usize) -> bool {
        self.left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(bytes)).is_ok()
    }

    fn give(&self, bytes: usize) {
        self.left.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The bytes one listing has taken from its share's budget, given back when it goes.
struct Charge {
    budget: Arc<ListingBudget>,
    bytes: usize,
}

impl Charge {
    fn new(budget: &Arc<ListingBudget>) -> Charge {
        Charge { budget: Arc::clone(budget), bytes: 0 }
    }

    /// Takes `bytes` more; false, taking nothing, if the budget hasn't them.
    fn add(&mut self, bytes: usize) -> bool {
        let taken = self.budget.take(bytes);
        if taken {
            self.bytes += bytes;
        }
        taken
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

/// One entry, as the host listed it.
struct Listed {
    ino: u64,
    /// `d_type` ([`d_type`]).
    type_: u32,
    name: CString,
}

/// A directory's entries in the host's order, without `.` and `..`, and what they cost.
pub struct Listing {
    entries: Vec<Listed>,
    charge: Charge,
}

impl Listing {
    /// A listing of nothing (a directory removed meanwhile).
    pub fn empty(budget: &Arc<ListingBudget>) -> Listing {
        Listing { entries: Vec::new(), charge: Charge::new(budget) }
    }

    /// Lists `dir` (a directory opened for reading) whole, charging `budget` for each entry;
    /// `None` if the listing would overrun it (what was read is dropped and given back).
    pub fn read(dir: File, budget: &Arc<ListingBudget>) -> io::Result<Option<Listing>> {
        let mut stream = rustix::fs::Dir::new(dir)?;
        let mut listing = Listing::empty(budget);
        while let Some(entry) = stream.read() {
            let entry = entry?;
            let name = entry.file_name();
            if matches!(name.to_bytes(), b"." | b"..") {
                continue;
            }
            if !listing.push(entry.ino(), d_type(entry.file_type()), name) {
                return Ok(None);
            }
        }
        // The vector's spare room (up to as much again) is not charged: give it back.
        listing.entries.shrink_to_fit();
        Ok(Some(listing))
    }

    /// Adds an entry, if the budget has room for it.
    fn push(&mut self, ino: u64, type_: u32, name: &CStr) -> bool {
        let fits = self.charge.add(entry_cost(name));
        if fits {
            self.entries.push(Listed { ino, type_, name: name.to_owned() });
        }
        fits
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

/// What an entry named `name` costs the budget: an estimate of the heap it takes.
fn entry_cost(name: &CStr) -> usize {
    ENTRY_OVERHEAD + name.to_bytes_with_nul().len()
}

/// `DT_*` of a file type: its `S_IF*` bits shifted down by 12; DT_UNKNOWN (0) where the host's
/// file system doesn't say (rustix gives that type all the `S_IFMT` bits).
fn d_type(file_type: rustix::fs::FileType) -> u32 {
    match file_type {
        rustix::fs::FileType::Unknown => libc::DT_UNKNOWN.into(),
        known => known.as_raw_mode() >> 12,
    }
}

/// Where a handle's entries come from.
#[derive(Clone)]
pub enum Source {
    /// Its own listing, read whole.
    Held(Arc<Listing>),
    /// The passthrough, which seeks the host directory to each offset: the way for a listing
    /// the budget can't hold, or a directory that can't be reopened to list.
    Host,
}

/// The directories the guest has open, by handle, each with where its entries come from once
/// it has been read. Only handles the passthrough gave out have a place here, so a forged
/// handle can't make the share list (and hold) anything.
pub struct Listings {
    open: Mutex<HashMap<Handle, Option<Source>>>,
    budget: Arc<ListingBudget>,
}

impl Listings {
    /// No directories open yet; their listings share `budget`.
    pub fn new(budget: Arc<ListingBudget>) -> Listings {
        Listings { open: Mutex::default(), budget }
    }

    /// Makes room for `handle`, a directory the guest just opened.
    pub fn open(&self, handle: Handle) {
        self.lock().insert(handle, None);
    }

    /// Where to serve `offset` of `handle` from: at offset 0, or when the handle has no source
    /// yet, a new listing from `list` (given the budget to charge; `None` when it can't be held,
    /// which makes the source [`Source::Host`]); else the source the handle has. EBADF for a
    /// handle not open.
    pub fn at(&self, handle: Handle, offset: u64, list: impl FnOnce(&Arc<ListingBudget>) -> io::Result<Option<Listing>>) -> io::Result<Source> {
        {
            let mut open = self.lock();
            let slot = open.get_mut(&handle).ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
            match slot {
                Some(source) if offset != 0 => return Ok(source.clone()),
                // Dropped before the new one is read, so that a rewind is charged once.
                _ => *slot = None,
            }
        }
        let source = match list(&self.budget)? {
            Some(listing) => Source::Held(Arc::new(listing)),
            None => Source::Host,
        };
        // Only if it is still open: a releasedir may have come in between.
        if let Some(slot) = self.lock().get_mut(&handle) {
            *slot = Some(source.clone());
        }
        Ok(source)
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
    fn lock(&self) -> MutexGuard<'_, HashMap<Handle, Option<Source>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(listing: &Listing, offset: u64) -> Vec<(String, u64)> {
        listing.after(offset).map(|(entry, _)| (String::from_utf8_lossy(entry.name).into_owned(), entry.offset)).collect()
    }

    fn unlimited() -> Arc<ListingBudget> {
        ListingBudget::new(usize::MAX)
    }

    /// A directory of `count` empty files named `f0`, `f1`, ...
    fn dir_of(count: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..count {
            std::fs::write(dir.path().join(format!("f{i}")), b"").expect("file");
        }
        dir
    }

    fn read(dir: &tempfile::TempDir, budget: &Arc<ListingBudget>) -> Option<Listing> {
        Listing::read(File::open(dir.path()).expect("open"), budget).expect("readable")
    }

    #[test]
    fn a_listing_has_every_entry_once_with_offsets_that_resume_after_it() {
        let dir = dir_of(3);
        std::fs::create_dir(dir.path().join("sub")).expect("dir");
        let listing = read(&dir, &unlimited()).expect("held");
        let mut all = names(&listing, 0);
        assert_eq!(all.iter().map(|(_, offset)| *offset).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        let after_two = names(&listing, 2);
        assert_eq!(after_two, all[2..].to_vec(), "offset 2 resumes after the second entry");
        all.sort();
        assert_eq!(all.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(), vec!["f0", "f1", "f2", "sub"]);
        let type_of = |name: &[u8]| listing.after(0).find(|(entry, _)| entry.name == name).expect("listed").0.type_;
        assert_eq!((type_of(b"sub"), type_of(b"f0")), (libc::DT_DIR.into(), libc::DT_REG.into()));
        assert_eq!(d_type(rustix::fs::FileType::Unknown), 0, "DT_UNKNOWN, not S_IFMT's bits");
    }

    #[test]
    fn offsets_a_guest_makes_up_find_nothing() {
        let listing = read(&dir_of(1), &unlimited()).expect("held");
        for offset in [1, 2, 1 << 40, u64::MAX] {
            assert_eq!(listing.after(offset).count(), 0, "offset {offset}");
        }
    }

    #[test]
    fn a_listing_is_charged_its_entries_and_gives_them_back_when_dropped() {
        let dir = dir_of(10);
        let budget = unlimited();
        let listing = read(&dir, &budget).expect("held");
        assert_eq!(budget.held(), 10 * (ENTRY_OVERHEAD + "f0".len() + 1), "ten names of two bytes and their NUL");
        drop(listing);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_directory_bigger_than_the_budget_is_not_held() {
        let dir = dir_of(100);
        let one_entry = ENTRY_OVERHEAD + "f00".len() + 1;
        let budget = ListingBudget::new(50 * one_entry);
        assert!(read(&dir, &budget).is_none(), "half of it fits, not all");
        assert_eq!(budget.held(), 0, "what was read is given back");
        let small = dir_of(3);
        assert!(read(&small, &budget).is_some(), "the budget is whole again for one that fits");
    }

    /// A listing of `n` made-up entries, charged to `budget`.
    fn made_up(n: usize) -> impl FnOnce(&Arc<ListingBudget>) -> io::Result<Option<Listing>> {
        move |budget| {
            let mut listing = Listing::empty(budget);
            for i in 0..n {
                if !listing.push(i as u64, libc::DT_REG.into(), &CString::new(format!("f{i}")).expect("name")) {
                    return Ok(None);
                }
            }
            Ok(Some(listing))
        }
    }

    fn held_len(source: io::Result<Source>) -> Option<usize> {
        match source.expect("open handle") {
            Source::Held(listing) => Some(listing.entries.len()),
            Source::Host => None,
        }
    }

    #[test]
    fn offset_zero_lists_afresh_and_a_later_offset_keeps_the_listing() {
        let listings = Listings::new(unlimited());
        listings.open(7);
        assert_eq!(held_len(listings.at(7, 0, made_up(3))), Some(3));
        assert_eq!(held_len(listings.at(7, 2, made_up(5))), Some(3), "the handle's listing, not a new one");
        assert_eq!(held_len(listings.at(7, 0, made_up(5))), Some(5), "offset 0 lists again");
        listings.close(7);
        let errno = |result: io::Result<Source>| result.err().and_then(|e| e.raw_os_error());
        assert_eq!(errno(listings.at(7, 2, made_up(1))), Some(libc::EBADF), "a closed handle lists nothing");
        assert_eq!(errno(listings.at(8, 0, made_up(1))), Some(libc::EBADF), "nor does a handle never opened");
    }

    /// A guest that opens many handles on a big directory and starts each: without a budget the
    /// share would hold a listing per handle.
    #[test]
    fn many_handles_hold_no_more_than_the_budget_and_the_rest_list_from_the_host() {
        let one_listing = made_up(1000)(&unlimited()).expect("listing").map_or(0, |listing| listing.charge.bytes);
        let budget = ListingBudget::new(3 * one_listing + one_listing / 2);
        let listings = Listings::new(Arc::clone(&budget));
        let sources: Vec<Option<usize>> = (0..20)
            .map(|handle| {
                listings.open(handle);
                held_len(listings.at(handle, 0, made_up(1000)))
            })
            .collect();
        assert_eq!(sources.iter().filter(|source| source.is_some()).count(), 3, "{sources:?}");
        assert_eq!(budget.held(), 3 * one_listing);
        assert_eq!(held_len(listings.at(19, 5, made_up(1000))), None, "a handle listed by the host stays so");

        listings.close(0);
        assert_eq!(held_len(listings.at(19, 0, made_up(1000))), Some(1000), "a closed handle's bytes let a rewound one hold");
        assert_eq!(held_len(listings.at(1, 0, made_up(1000))), Some(1000), "a rewind is charged once");
        listings.clear();
        assert_eq!(budget.held(), 0, "a remount gives everything back");
    }
}
