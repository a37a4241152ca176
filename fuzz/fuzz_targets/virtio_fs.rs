//! Fuzzes virtio-fs's request path: the fuzzer is a malicious guest that sends FUSE requests
//! of its own making (headers cut anywhere, lengths that lie, unknown and retired opcodes,
//! names without their NUL, reads and writes of any size at any offset, handles and inodes
//! it never got) with reply buffers of any size, to the real passthrough file system over a
//! fresh directory. A guest could otherwise crash the VMM, make it allocate without bound, or
//! hang its worker. Every request must come back (with a reply, or with nothing written);
//! the device may declare itself broken, never panic.
//!
//! FALLOCATE (43) is left out: it would really reserve whatever length the fuzzer names on
//! the disk the fuzzer runs on.
#![no_main]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lguest::virtio::fs::driver::{request, FuseDriver};
use lguest::virtio::fs::share::Share;
use lguest::virtio::fs::server_for;

const FALLOCATE: u32 = 43;
const INIT: u32 = 26;

/// One request: `body` after a well-formed header for `opcode` on `nodeid`, or `body` alone
/// when `raw`.
#[derive(Arbitrary, Debug)]
struct Request {
    raw: bool,
    opcode: u8,
    nodeid: u8,
    body: Vec<u8>,
    reply_len: u16,
}

fuzz_target!(|requests: Vec<Request>| {
    let dir = fresh_dir();
    let share = Share::open(&dir, false).expect("the directory opens");
    let mut driver = FuseDriver::new(server_for(share));
    // FUSE_INIT first, as the kernel does, so that the fuzzer starts past it.
    let _ = driver.send(&request(INIT, 0, 0, &[7, 0, 0, 0, 31, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0]), 4096);
    for (unique, r) in requests.iter().take(32).enumerate() {
        let opcode = u32::from(r.opcode);
        if opcode == FALLOCATE {
            continue;
        }
        let bytes = if r.raw { r.body.clone() } else { request(opcode, unique as u64 + 1, u64::from(r.nodeid), &r.body) };
        if driver.send(&bytes, u32::from(r.reply_len)).is_err() {
            break; // the device declared itself broken: allowed
        }
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
