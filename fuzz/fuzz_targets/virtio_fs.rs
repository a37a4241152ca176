//! Fuzzes virtio-fs's request path: the fuzzer is a malicious guest that sends FUSE requests
//! of its own making (headers cut anywhere, lengths that lie, unknown and retired opcodes,
//! names without their NUL, reads and writes of any size at any offset, handles and inodes
//! it never got) with reply buffers of any size, to the real passthrough file system over a
//! fresh directory. A guest could otherwise crash the VMM, make it allocate without bound, or
//! hang its worker. Every request must come back (with a reply, or with nothing written);
//! the device may declare itself broken, never panic.
//!
//! The share's listing budget is the fuzzer's to choose, up to a few listings of the fuzz
//! directory's root (about 160 bytes each), so that handles past it are listed the
//! passthrough's way (the fallback past the budget); after the requests, a remount must give
//! the whole budget back.
//!
//! FALLOCATE (43) is left out: it would really reserve whatever length the fuzzer names on
//! the disk the fuzzer runs on.
#![no_main]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lguest::virtio::fs::driver::{request, FuseDriver};
use lguest::virtio::fs::share::{ListingBudget, Share};
use lguest::virtio::fs::server_for;

const FALLOCATE: u32 = 43;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const READDIR: u32 = 28;
const RELEASEDIR: u32 = 29;
const READDIRPLUS: u32 = 44;
/// FUSE_INIT's body: protocol 7.31, 128 KiB of readahead, no flags.
const INIT_BODY: [u8; 16] = [7, 0, 0, 0, 31, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0];
/// The listing budget is the fuzzer's byte times this: up to 1 KiB.
const BUDGET_STEP: usize = 4;

/// A share's listing budget, and the requests its guest sends.
#[derive(Arbitrary, Debug)]
struct Input {
    budget: u8,
    requests: Vec<Request>,
}

/// One request: `body` after a well-formed header for `opcode` on `nodeid`, or `body` alone
/// when `raw`; or, so that the fuzzer reaches the listings without guessing a whole body,
/// a well-formed directory request on one of the first inodes and handles (the passthrough
/// numbers both from 1; the root is inode 1).
#[derive(Arbitrary, Debug)]
enum Request {
    Bytes { raw: bool, opcode: u8, nodeid: u8, body: Vec<u8>, reply_len: u16 },
    Opendir { nodeid: u8 },
    Readdir { plus: bool, nodeid: u8, handle: u8, offset: u64, size: u16, reply_len: u16 },
    Releasedir { nodeid: u8, handle: u8 },
}

impl Request {
    /// The request's bytes (its header's `unique` is `unique`) and its reply buffer's length;
    /// `None` for one left out.
    fn bytes(&self, unique: u64) -> Option<(Vec<u8>, u16)> {
        match *self {
            Request::Bytes { opcode, .. } if u32::from(opcode) == FALLOCATE => None,
            Request::Bytes { raw: true, ref body, reply_len, .. } => Some((body.clone(), reply_len)),
            Request::Bytes { opcode, nodeid, ref body, reply_len, .. } => Some((request(opcode.into(), unique, nodeid.into(), body), reply_len)),
            Request::Opendir { nodeid } => Some((request(OPENDIR, unique, first(nodeid), &[0; 8]), 4096)),
            Request::Readdir { plus, nodeid, handle, offset, size, reply_len } => {
                let opcode = if plus { READDIRPLUS } else { READDIR };
                Some((request(opcode, unique, first(nodeid), &read_in(first(handle), offset, size.into())), reply_len))
            }
            Request::Releasedir { nodeid, handle } => Some((request(RELEASEDIR, unique, first(nodeid), &read_in(first(handle), 0, 0)), 4096)),
        }
    }
}

/// One of the first four numbers (an inode or a handle), from 0.
fn first(n: u8) -> u64 {
    u64::from(n % 4)
}

/// A `fuse_read_in` (READ, READDIR), whose first bytes are also a `fuse_release_in`.
fn read_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(40);
    bytes.extend_from_slice(&fh.to_le_bytes());
    bytes.extend_from_slice(&offset.to_le_bytes());
    bytes.extend_from_slice(&size.to_le_bytes());
    bytes.resize(40, 0);
    bytes
}

fuzz_target!(|input: Input| {
    let dir = fresh_dir();
    let budget = ListingBudget::new(usize::from(input.budget) * BUDGET_STEP);
    let share = Share::with_listing_budget(&dir, false, budget.clone()).expect("the directory opens");
    let mut driver = FuseDriver::new(server_for(share));
    // FUSE_INIT first, as the kernel does, so that the fuzzer starts past it.
    let _ = driver.send(&request(INIT, 0, 0, &INIT_BODY), 4096);
    let mut broken = false;
    for (unique, r) in input.requests.iter().take(32).enumerate() {
        let Some((bytes, reply_len)) = r.bytes(unique as u64 + 1) else { continue };
        if driver.send(&bytes, u32::from(reply_len)).is_err() {
            broken = true; // the device declared itself broken: allowed
            break;
        }
    }
    if !broken && driver.send(&request(INIT, 99, 0, &INIT_BODY), 4096).is_ok() {
        assert_eq!(budget.held(), 0, "a remount gives every listing back");
    }
    let _ = std::fs::remove_dir_all(&dir);
});

/// A new directory with a file, a subdirectory and a symlink out, for each input.
fn fresh_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("lguest-fuzz-fs-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(dir.join("sub")).expect("fuzz directory");
    std::fs::write(dir.join("file"), vec![7u8; 8192]).expect("fuzz file");
    let _ = std::os::unix::fs::symlink("/etc", dir.join("out"));
    dir
}
