//! Fuzzes virtio-blk's request parsing and execution: the fuzzer is a malicious guest that
//! forges the request chains (header, data and status descriptors in any order, lengths and
//! sectors that overflow, discard ranges past the disk, reads into a hole in guest memory) and
//! the device serves the queue once against a real (in-memory) image, as its worker does on a
//! kick. A guest could otherwise make the VMM panic, read or write outside the image, or
//! `preadv` into memory that isn't the guest's. Every request must end in a status byte, a
//! dropped chain or NEEDS_RESET. The fuzzer also picks the engine (sync or io_uring): what the
//! guest forges must meet the same checks whichever engine carries the I/O out. The disks have
//! two request queues (VIRTIO_BLK_F_MQ); the fuzzer may forge the second too, in the same
//! memory as the first (its rings may lie over the first's), and each queue is served by its
//! own handler, as by its own worker.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lguest::config::{DiskConfig, DiskEngine};
use lguest::virtio::block::{Block, QUEUE_SIZE};
use lguest::virtio::{feature, ActiveQueue, Activation, Signals};
use lguest_fuzz::{each_by_hand, memory, Guest, MemFile};
use vmm_sys_util::eventfd::EventFd;

/// Four 64 KiB disks, writable and read-only on each engine, opened once: the image is the
/// host's, not the guest's, so its bytes need no fuzzing; what the guest asks of it does.
/// The sync engine's images are in memory (memfd); io_uring's are files in the temp dir, unlinked
/// once open, since a memfd (like tmpfs) can't try transfers without blocking and the engine
/// would make them with plain system calls, leaving the ring's reads and writes unfuzzed.
fn disks() -> &'static [Block; 4] {
    static DISKS: OnceLock<[Block; 4]> = OnceLock::new();
    DISKS.get_or_init(|| {
        let open = |readonly, engine| {
            let config = |path| DiskConfig { readonly, engine, id: Some("fuzz".into()), queues: 2, ..DiskConfig::new(path) };
            if engine == DiskEngine::Sync {
                // The disk opens the memfd anew: its own open file keeps the memory alive.
                let image = MemFile::new(&[0x5a; 0x1_0000]);
                return Block::new(&config(image.path.clone())).expect("disk");
            }
            let path = std::env::temp_dir().join(format!("lguest-fuzz-{}-{readonly}.img", std::process::id()));
            std::fs::write(&path, [0x5a; 0x1_0000]).expect("image file");
            let block = Block::new(&config(path.clone())).expect("disk");
            let _ = std::fs::remove_file(&path);
            block
        };
        [
            open(false, DiskEngine::Sync),
            open(true, DiskEngine::Sync),
            open(false, DiskEngine::IoUring),
            open(true, DiskEngine::IoUring),
        ]
    })
}

#[derive(Arbitrary, Debug)]
struct Input {
    readonly: bool,
    io_uring: bool,
    flush: bool,
    guest: Guest,
    /// The second request queue, if the driver enabled it.
    second: Option<Guest>,
}

fuzz_target!(|input: Input| {
    let mem = memory();
    let Some(queue) = input.guest.install(&mem, QUEUE_SIZE) else { return };
    let second = input.second.as_ref().and_then(|guest| guest.install(&mem, QUEUE_SIZE));
    let active = |queue| ActiveQueue { queue, kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd") };
    let mut features = feature::VERSION_1;
    if input.guest.event_idx {
        features |= feature::RING_EVENT_IDX;
    }
    if input.flush {
        features |= 1 << virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
    }
    if second.is_some() {
        features |= 1 << virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_F_MQ;
    }
    let queues = vec![Some(active(queue)), second.map(active)];
    let activation = Activation { mem, queues, features, signals: Signals::standalone(2) };
    let block = &disks()[usize::from(input.readonly) + 2 * usize::from(input.io_uring)];
    // Queue i's handler, kicked on its token i. An Err is the device declaring itself broken
    // (NEEDS_RESET): allowed. A panic is not.
    for (index, mut requests) in each_by_hand(block, activation).into_iter().enumerate() {
        let _ = requests.handle(index as u64);
    }
});
