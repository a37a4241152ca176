//! Property tests of the virtio devices' request handling, the ordinary suite's half of
//! `fuzz/fuzz_targets/virtio_{rng,console,block,net,vsock,fs}.rs`: a malicious guest lays out descriptor
//! chains however it likes (loops, next indices past the table, indirect tables, buffers
//! outside memory or of absurd length, head indices past the ring) and the device serves the
//! queue once, synchronously, through the same handler its worker thread runs
//! ([`Device::handler`], driven by [`HandDriven`]). Needs `--features test-utils` (Cargo.toml).
//!
//! The rings sit apart from the buffers here, so the outcome can be checked exactly: every
//! available chain yields a used entry, in order, or (for a head index past the ring, which has
//! no used entry to give) the device reports itself broken, which the transport turns into
//! NEEDS_RESET. Never a panic, never a hang. The tests at the end keep the inputs the fuzzer
//! found: rings laid over each other used to spin a worker forever.

use std::io::{self, Write};
use std::sync::mpsc;
use std::time::Duration;

use lguest::config::{DiskConfig, DiskEngine, ShareConfig};
use lguest::virtio::block::{Block, QUEUE_SIZE, REQUESTS};
use lguest::virtio::console::{Console, RECEIVE_KICK, TRANSMIT_KICK};
use lguest::virtio::fs::{self as virtio_fs, Fs};
use lguest::virtio::net::tap::Tap;
use lguest::virtio::net::{Net, NetWorker, RX_KICK, TAP, TX_KICK};
use lguest::virtio::rng::{self, Rng, MAX_BYTES_PER_REQUEST};
use lguest::virtio::vsock::muxer::MAX_CONNECTIONS;
use lguest::virtio::vsock::packet::{Header as VsockHeader, HEADER_LEN, HOST_CID, TYPE_STREAM};
use lguest::virtio::vsock::{self, Vsock, VsockWorker};
use lguest::virtio::worker::HandDriven;
use lguest::virtio::{feature, ActiveQueue, Activation, Device, Signals};
use proptest::prelude::*;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use lguest::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

const MEM_END: u64 = 0x10_0000;
const DESC: u64 = 0x0000;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Indirect tables, one per 4 KiB page.
const TABLES: u64 = 0x4000;
const TABLE_COUNT: u64 = 4;
const BUFFERS: u64 = 0x1_0000;

#[derive(Debug, Clone)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn desc() -> impl Strategy<Value = Desc> {
    let addr = prop_oneof![
        4 => BUFFERS..MEM_END,
        1 => MEM_END..=u64::MAX,
        1 => (0..TABLE_COUNT).prop_map(|i| TABLES + i * 0x1000),
    ];
    let len = prop_oneof![4 => 0..64u32, 2 => 0..0x4000u32, 1 => any::<u32>()];
    // NEXT, WRITE and INDIRECT in every combination, and now and then bits no spec defines.
    let flags = prop_oneof![8 => 0..8u16, 1 => any::<u16>()];
    let next = prop_oneof![4 => 0..16u16, 1 => any::<u16>()];
    (addr, len, flags, next).prop_map(|(addr, len, flags, next)| Desc { addr, len, flags, next })
}

/// One queue as a hostile driver sets it up, with its rings where a sane driver puts them.
#[derive(Debug, Clone)]
struct GuestQueue {
    size: u16,
    event_idx: bool,
    descs: Vec<Desc>,
    tables: Vec<Vec<Desc>>,
    heads: Vec<u16>,
}

fn guest_queue(max_size: u16) -> impl Strategy<Value = GuestQueue> {
    let sizes: Vec<u16> = (0..9).map(|n| 1 << n).filter(|&s| s <= max_size).collect();
    (prop::sample::select(sizes), any::<bool>()).prop_flat_map(|(size, event_idx)| {
        let descs = prop::collection::vec(desc(), 0..=usize::from(size).min(32));
        let tables = prop::collection::vec(prop::collection::vec(desc(), 1..12), 0..TABLE_COUNT as usize);
        let head = prop_oneof![8 => 0..size.min(32), 1 => any::<u16>()];
        let heads = prop::collection::vec(head, 0..=usize::from(size).min(16));
        (Just(size), Just(event_idx), descs, tables, heads).prop_map(|(size, event_idx, descs, tables, heads)| {
            GuestQueue { size, event_idx, descs, tables, heads }
        })
    })
}

fn write_desc(mem: &GuestMemoryMmap, at: u64, d: &Desc) {
    let mut raw = d.addr.to_le_bytes().to_vec();
    raw.extend_from_slice(&d.len.to_le_bytes());
    raw.extend_from_slice(&d.flags.to_le_bytes());
    raw.extend_from_slice(&d.next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at)).expect("descriptor");
}

impl GuestQueue {
    /// Writes the rings at `base` (queues of one device sit 0x8000 apart) and returns the queue
    /// as the transport hands it over at DRIVER_OK.
    fn install(&self, mem: &GuestMemoryMmap, base: u64, max_size: u16) -> ActiveQueue {
        for (i, d) in self.descs.iter().enumerate() {
            write_desc(mem, base + DESC + 16 * i as u64, d);
        }
        for (t, table) in self.tables.iter().enumerate() {
            for (i, d) in table.iter().enumerate() {
                write_desc(mem, base + TABLES + 0x1000 * t as u64 + 16 * i as u64, d);
            }
        }
        for (i, head) in self.heads.iter().enumerate() {
            mem.write_obj(*head, GuestAddress(base + AVAIL + 4 + 2 * i as u64)).expect("avail ring");
        }
        mem.write_obj(self.heads.len() as u16, GuestAddress(base + AVAIL + 2)).expect("avail idx");
        let mut queue = Queue::new(max_size).expect("queue");
        queue.try_set_size(self.size).expect("size");
        queue.try_set_desc_table_address(GuestAddress(base + DESC)).expect("desc");
        queue.try_set_avail_ring_address(GuestAddress(base + AVAIL)).expect("avail");
        queue.try_set_used_ring_address(GuestAddress(base + USED)).expect("used");
        queue.set_event_idx(self.event_idx);
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        ActiveQueue { queue, kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd") }
    }

    /// A ring of 16 with nothing posted.
    fn empty() -> GuestQueue {
        GuestQueue { size: 16, event_idx: false, descs: vec![], tables: vec![], heads: vec![] }
    }

    /// Puts `payloads` (one after another, round and round) at the start of every buffer
    /// the chains point at inside memory: plausible requests, so that they get served.
    fn fill_buffers(&self, mem: &GuestMemoryMmap, payloads: &[Vec<u8>]) {
        for (i, d) in self.descs.iter().chain(self.tables.iter().flatten()).enumerate() {
            if (BUFFERS..MEM_END).contains(&d.addr) {
                let _ = mem.write_slice(&payloads[i % payloads.len()], GuestAddress(d.addr));
            }
        }
    }

    fn has_bad_head(&self) -> bool {
        self.heads.iter().any(|&h| h >= self.size)
    }
}

fn memory() -> GuestMemoryMmap {
    lguest::memory::from_ranges(&[(GuestAddress(0), MEM_END as usize)], lguest::memory::Tracking::Off).expect("guest memory")
}

/// The used ring's (id, len) entries at `base`.
fn used(mem: &GuestMemoryMmap, base: u64) -> Vec<(u32, u32)> {
    let idx: u16 = mem.read_obj(GuestAddress(base + USED + 2)).expect("used idx");
    (0..u64::from(idx))
        .map(|i| {
            let at = base + USED + 4 + 8 * i;
            (mem.read_obj(GuestAddress(at)).expect("id"), mem.read_obj(GuestAddress(at + 4)).expect("len"))
        })
        .collect()
}

fn activation(mem: &GuestMemoryMmap, queues: Vec<Option<ActiveQueue>>, event_idx: bool) -> Activation {
    let features = feature::VERSION_1 | if event_idx { feature::RING_EVENT_IDX } else { 0 };
    let signals = Signals::standalone(queues.len());
    Activation { mem: mem.clone(), queues, features, signals }
}

/// `device`'s handler for `activation`, driven by hand as its worker thread would drive it.
fn by_hand<D: Device>(device: &D, activation: Activation) -> HandDriven<D::Handler> {
    HandDriven::activate(device, activation).expect("activation")
}

/// Checks the one outcome a served queue may have: a used entry for each available chain, in
/// order; or, if a head index lies past the ring, the device broken.
fn check_served<E: std::fmt::Display>(served: Result<(), E>, guest: &GuestQueue, used: &[(u32, u32)]) -> Result<(), TestCaseError> {
    match served {
        Ok(()) => {
            prop_assert!(!guest.has_bad_head(), "a head past the ring was served");
            let ids: Vec<u32> = used.iter().map(|&(id, _)| id).collect();
            let heads: Vec<u32> = guest.heads.iter().map(|&h| u32::from(h)).collect();
            prop_assert_eq!(ids, heads, "one used entry per chain, in order");
        }
        Err(why) => prop_assert!(guest.has_bad_head(), "broken without cause: {}", why),
    }
    Ok(())
}

/// A virtio-blk request header for the chain's first buffer: mostly types we serve, sectors
/// near the disk (16 sectors), now and then anything.
fn header() -> impl Strategy<Value = Vec<u8>> {
    let kind = prop_oneof![
        prop::sample::select(vec![
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ]),
        any::<u32>(),
    ];
    let sector = prop_oneof![4 => 0..20u64, 1 => any::<u64>()];
    (kind, sector, 0..24u32, any::<u32>()).prop_map(|(kind, sector, sectors, flags)| {
        let mut raw = kind.to_le_bytes().to_vec();
        raw.extend_from_slice(&[0; 4]);
        raw.extend_from_slice(&sector.to_le_bytes());
        // A discard range right behind it, for chains that put it there.
        raw.extend_from_slice(&sector.to_le_bytes());
        raw.extend_from_slice(&sectors.to_le_bytes());
        raw.extend_from_slice(&(flags & 3).to_le_bytes());
        raw
    })
}

fn disk_image() -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("image");
    file.write_all(&[0x5a; 16 * 512]).expect("fill image");
    file
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn rng_any_descriptor_chain_yields_a_used_entry_or_needs_reset(guest in guest_queue(256)) {
        let mem = memory();
        let queue = guest.install(&mem, 0, 256);
        let mut worker = by_hand(&Rng::new(), activation(&mem, vec![Some(queue)], guest.event_idx));
        let used = { let served = worker.handle(rng::REQUESTS as u64); (served, used(&mem, 0)) };
        check_served(used.0, &guest, &used.1)?;
        for &(_, len) in &used.1 {
            prop_assert!(len as usize <= MAX_BYTES_PER_REQUEST);
        }
    }

    #[test]
    fn block_any_request_chain_yields_a_used_entry_or_needs_reset(
        guest in guest_queue(QUEUE_SIZE),
        second in prop::option::of(guest_queue(QUEUE_SIZE)),
        headers in prop::collection::vec(header(), 1..8),
        readonly in any::<bool>(),
        flush in any::<bool>(),
        io_uring in any::<bool>(),
    ) {
        let mem = memory();
        // Plausible headers at the buffers the chains point at, so that requests get served.
        guest.fill_buffers(&mem, &headers);
        let image = disk_image();
        // Either engine: the guest's chains must meet the same checks.
        let engine = if io_uring { DiskEngine::IoUring } else { DiskEngine::Sync };
        // Two request queues; the driver enables the second (at 0x8000) when there is one.
        let block = Block::new(&DiskConfig { readonly, engine, queues: 2, ..DiskConfig::new(image.path().to_path_buf()) }).expect("disk");
        if let Some(second) = &second {
            second.fill_buffers(&mem, &headers);
        }
        let queues = vec![Some(guest.install(&mem, 0, QUEUE_SIZE)), second.as_ref().map(|second| second.install(&mem, 0x8000, QUEUE_SIZE))];
        let mut activation = activation(&mem, queues, guest.event_idx);
        if flush {
            activation.features |= 1 << virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
        }
        // Each queue's handler, as its own worker would serve it (queue i's kick is token i).
        let mut handlers = HandDriven::activate_each(&block, activation).expect("activation").into_iter();
        let served = handlers.next().expect("the first queue's handler").handle(REQUESTS as u64);
        check_served(served, &guest, &used(&mem, 0))?;
        if let (Some(second), Some(mut requests)) = (&second, handlers.next()) {
            check_served(requests.handle(1), second, &used(&mem, 0x8000))?;
        }
        prop_assert_eq!(std::fs::metadata(image.path()).expect("image").len(), 16 * 512, "the image changed size");
    }

    #[test]
    fn console_every_chain_is_returned_and_no_input_is_invented(
        rx in guest_queue(256),
        tx in guest_queue(256),
        typed in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mem = memory();
        let console = Console::new(Box::new(io::sink())).expect("console");
        console.input().send(&typed);
        let queues = vec![Some(rx.install(&mem, 0, 256)), Some(tx.install(&mem, 0x8000, 256))];
        let mut worker = by_hand(&console, activation(&mem, queues, false));
        prop_assert!(worker.handle(TRANSMIT_KICK).is_ok(), "transmit broke on well-placed rings");
        prop_assert!(worker.handle(RECEIVE_KICK).is_ok(), "receive broke on well-placed rings");
        // Transmit: every chain with a head inside the ring comes back, in order, empty.
        let tx_heads: Vec<(u32, u32)> = tx.heads.iter().filter(|&&h| h < tx.size).map(|&h| (u32::from(h), 0)).collect();
        prop_assert_eq!(used(&mem, 0x8000), tx_heads);
        // Receive: buffers are taken in order while input lasts, and never take more than was typed.
        let rx_used = used(&mem, 0);
        let rx_heads: Vec<u32> = rx.heads.iter().filter(|&&h| h < rx.size).map(|&h| u32::from(h)).collect();
        prop_assert!(rx_heads.starts_with(&rx_used.iter().map(|&(id, _)| id).collect::<Vec<_>>()));
        let received: u64 = rx_used.iter().map(|&(_, len)| u64::from(len)).sum();
        prop_assert!(received <= typed.len() as u64);
    }
}

/// A network card on a socket pair standing in for its tap, driven by hand; the host's end is
/// returned to play the network.
fn net_worker(mem: &GuestMemoryMmap, rx: ActiveQueue, tx: ActiveQueue, features: u64) -> (HandDriven<NetWorker>, std::fs::File) {
    let (tap, host) = Tap::socket_pair().expect("socket pair");
    let net = Net::with_tap(tap, Some([0x52, 0x54, 0, 0, 0, 1]));
    let mut activation = activation(mem, vec![Some(rx), Some(tx)], false);
    activation.features |= features;
    (by_hand(&net, activation), std::fs::File::from(host))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn net_any_transmit_chain_yields_a_used_entry_or_needs_reset(tx in guest_queue(256), features in any::<u32>()) {
        let mem = memory();
        let rx = GuestQueue::empty();
        let (mut worker, _host) = net_worker(&mem, rx.install(&mem, 0, 256), tx.install(&mem, 0x8000, 256), u64::from(features));
        let served = worker.handle(TX_KICK);
        check_served(served, &tx, &used(&mem, 0x8000))?;
    }

    #[test]
    fn net_receive_fills_only_posted_buffers(
        rx in guest_queue(256),
        features in any::<u32>(),
        frames in prop::collection::vec(prop_oneof![0..200usize, 0..70_000usize], 0..4),
    ) {
        let mem = memory();
        let tx = GuestQueue::empty();
        let (mut worker, mut host) = net_worker(&mem, rx.install(&mem, 0, 256), tx.install(&mem, 0x8000, 256), u64::from(features));
        let mut served = worker.handle(RX_KICK);
        for len in frames {
            let _ = host.write(&vec![0x5a; len]);
            served = served.and_then(|()| worker.handle(TAP));
        }
        let used = used(&mem, 0);
        let mut posted = rx.heads.clone();
        for &(id, _) in &used {
            let at = posted.iter().position(|&h| u32::from(h) == id);
            prop_assert!(at.is_some(), "used entry {} was never posted (or used twice)", id);
            posted.remove(at.unwrap_or_default());
        }
        if served.is_err() {
            prop_assert!(rx.has_bad_head(), "broken without cause: {:?}", served);
        }
    }
}

/// A vsock packet header for a transmit chain's first buffer: mostly from the guest's CID to
/// the host, of a stream, with small ports (so that packets meet the streams others made),
/// now and then a lie in any field.
fn vsock_header() -> impl Strategy<Value = Vec<u8>> {
    let cid = prop_oneof![8 => Just(3u64), 1 => any::<u64>()];
    let dst = prop_oneof![8 => Just(HOST_CID), 1 => any::<u64>()];
    let kind = prop_oneof![8 => Just(TYPE_STREAM), 1 => any::<u16>()];
    let len = prop_oneof![4 => 0..64u32, 1 => 0..70_000u32, 1 => any::<u32>()];
    let op = prop_oneof![8 => 0..9u16, 1 => any::<u16>()];
    (cid, dst, (0..4u32, 0..4u32), len, kind, op, any::<u32>(), (any::<u32>(), any::<u32>())).prop_map(
        |(src_cid, dst_cid, (src_port, dst_port), len, kind, op, flags, (buf_alloc, fwd_cnt))| {
            let header = VsockHeader { src_cid, dst_cid, src_port, dst_port, len, kind, op, flags, buf_alloc, fwd_cnt };
            header.to_bytes().to_vec()
        },
    )
}

/// A vsock device listening in `dir`, with a host program listening on host port 1, driven by
/// hand on `rx`, `tx` and an empty event queue.
fn vsock_worker(
    mem: &GuestMemoryMmap,
    dir: &std::path::Path,
    rx: ActiveQueue,
    tx: ActiveQueue,
) -> (HandDriven<VsockWorker>, std::os::unix::net::UnixListener) {
    let device = Vsock::new(3, &dir.join("v.sock")).expect("vsock socket");
    let listener = std::os::unix::net::UnixListener::bind(dir.join("v.sock_1")).expect("host listener");
    let event = GuestQueue::empty();
    // An event queue with nothing posted, at the end of memory: never read without a reset.
    let queues = vec![Some(rx), Some(tx), Some(event.install(mem, MEM_END - 0x8000, 256))];
    (by_hand(&device, activation(mem, queues, false)), listener)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn vsock_any_transmit_chain_yields_a_used_entry_or_needs_reset(
        tx in guest_queue(256),
        headers in prop::collection::vec(vsock_header(), 1..8),
    ) {
        let mem = memory();
        tx.fill_buffers(&mem, &headers);
        let dir = tempfile::tempdir().expect("tempdir");
        let rx = GuestQueue::empty();
        let (mut worker, _listener) = vsock_worker(&mem, dir.path(), rx.install(&mem, 0, 256), tx.install(&mem, 0x8000, 256));
        let served = worker.handle(vsock::TX_KICK);
        check_served(served, &tx, &used(&mem, 0x8000))?;
        prop_assert!(worker.handler.connection_count() <= MAX_CONNECTIONS);
    }

    #[test]
    fn vsock_receive_fills_only_posted_buffers_with_whole_packets(
        rx in guest_queue(256),
        host_programs in 0..6usize,
        requests in prop::collection::vec(vsock_header(), 0..6),
    ) {
        let mem = memory();
        let dir = tempfile::tempdir().expect("tempdir");
        // Requests from the guest, each owed an answer (RESPONSE or RST), from a transmit queue
        // laid out by hand.
        let mut tx = GuestQueue::empty();
        for (i, header) in requests.iter().enumerate() {
            let at = BUFFERS + 0x8_0000 + 64 * i as u64;
            mem.write_slice(header, GuestAddress(at)).expect("header");
            tx.descs.push(Desc { addr: at, len: HEADER_LEN as u32, flags: 0, next: 0 });
            tx.heads.push(i as u16);
        }
        let (mut worker, _listener) = vsock_worker(&mem, dir.path(), rx.install(&mem, 0, 256), tx.install(&mem, 0x8000, 256));
        // Host programs asking for guest ports: each owed a REQUEST to the guest.
        let _hosts: Vec<_> = (0..host_programs)
            .map(|port| {
                let mut host = std::os::unix::net::UnixStream::connect(dir.path().join("v.sock")).expect("connect");
                host.write_all(format!("CONNECT {port}\n").as_bytes()).expect("CONNECT");
                host
            })
            .collect();
        let mut served = worker.handle(vsock::TX_KICK);
        for _ in 0..3 {
            served = served.and_then(|()| worker.handle(vsock::MUXER));
        }
        served = served.and_then(|()| worker.handle(vsock::RX_KICK));
        let used = used(&mem, 0);
        let mut posted = rx.heads.clone();
        for &(id, len) in &used {
            let at = posted.iter().position(|&h| u32::from(h) == id);
            prop_assert!(at.is_some(), "used entry {} was never posted (or used twice)", id);
            posted.remove(at.unwrap_or_default());
            prop_assert!(len == 0 || len as usize >= HEADER_LEN, "a packet cut short: {} bytes", len);
        }
        if served.is_err() {
            prop_assert!(rx.has_bad_head(), "broken without cause: {:?}", served);
        }
    }
}

/// A FUSE request for a chain's first buffer: a header for an opcode the server knows (now
/// and then any number) on the root or a nearby inode, and whatever body. Never FALLOCATE:
/// it would reserve what it names on the test machine's disk.
fn fuse_request() -> impl Strategy<Value = Vec<u8>> {
    let opcode = prop_oneof![4 => 1..50u32, 1 => any::<u32>()].prop_map(|op| if op == 43 { 44 } else { op });
    let body = prop::collection::vec(any::<u8>(), 0..96);
    (opcode, 1..4u64, body).prop_map(|(opcode, nodeid, body)| virtio_fs::driver::request(opcode, 1, nodeid, &body))
}

/// A virtio-fs device over a fresh directory (with one file), with nothing on its hiprio
/// queue and `requests` at 0x8000.
fn fs_worker(mem: &GuestMemoryMmap, dir: &std::path::Path, requests: ActiveQueue, event_idx: bool) -> HandDriven<virtio_fs::FsWorker> {
    std::fs::write(dir.join("file"), [7u8; 4096]).expect("a file to read");
    let device = Fs::new(&ShareConfig { dir: dir.to_path_buf(), tag: "proptest".into(), readonly: false }).expect("share");
    let hiprio = GuestQueue::empty();
    let queues = vec![Some(hiprio.install(mem, MEM_END - 0x8000, 256)), Some(requests)];
    by_hand(&device, activation(mem, queues, event_idx))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn fs_any_request_chain_yields_a_used_entry_or_needs_reset(
        guest in guest_queue(256),
        requests in prop::collection::vec(fuse_request(), 1..8),
    ) {
        let mem = memory();
        guest.fill_buffers(&mem, &requests);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut worker = fs_worker(&mem, dir.path(), guest.install(&mem, 0x8000, 256), guest.event_idx);
        let served = worker.handle(virtio_fs::REQUESTS as u64);
        check_served(served, &guest, &used(&mem, 0x8000))?;
    }
}

/// Runs `serve` on a thread and fails the test if it has not returned within 20 s: the bugs
/// kept here were endless loops.
fn within_seconds<E: Send + 'static>(serve: impl FnOnce() -> Result<(), E> + Send + 'static) -> Result<(), E> {
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(serve());
    });
    result.recv_timeout(Duration::from_secs(20)).expect("the device kept serving a queue that goes nowhere")
}

/// The rng fuzzer's find: a ring of 2 whose available index lies on the used ring's flags.
fn avail_index_on_used_flags(mem: &GuestMemoryMmap) -> ActiveQueue {
    let mut queue = Queue::new(256).expect("queue");
    queue.try_set_size(2).expect("size");
    queue.try_set_desc_table_address(GuestAddress(0xffe0)).expect("desc");
    queue.try_set_avail_ring_address(GuestAddress(0xfe)).expect("avail");
    queue.try_set_used_ring_address(GuestAddress(0x100)).expect("used");
    queue.set_ready(true);
    assert!(queue.is_valid(mem), "the transport accepts these rings");
    ActiveQueue { queue, kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd") }
}

/// Found by `cargo fuzz` (virtio_rng): the available ring's index lies on the used ring's
/// flags, so every notification change we write moves the index back and forth, and the
/// "anything new since I re-enabled notifications?" loop never ended.
#[test]
fn rng_rings_laid_over_each_other_break_the_device_instead_of_spinning() {
    let mem = memory();
    let active = avail_index_on_used_flags(&mem);
    let mut worker = by_hand(&Rng::new(), activation(&mem, vec![Some(active)], false));
    assert!(within_seconds(move || worker.handle(rng::REQUESTS as u64)).is_err(), "the device says it is broken");
}

/// Found by `cargo fuzz` (virtio_block): the same overlap, on a one-entry disk queue.
#[test]
fn block_rings_laid_over_each_other_break_the_device_instead_of_spinning() {
    let mem = memory();
    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue.try_set_size(1).expect("size");
    queue.try_set_desc_table_address(GuestAddress(0xf300)).expect("desc");
    queue.try_set_avail_ring_address(GuestAddress(0xee)).expect("avail");
    queue.try_set_used_ring_address(GuestAddress(0xf0)).expect("used");
    queue.set_ready(true);
    assert!(queue.is_valid(&mem), "the transport accepts these rings");
    let active = ActiveQueue { queue, kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd") };
    let image = disk_image();
    let block = Block::new(&DiskConfig { readonly: true, ..DiskConfig::new(image.path().to_path_buf()) }).expect("disk");
    let mut requests = by_hand(&block, activation(&mem, vec![Some(active)], false));
    assert!(within_seconds(move || requests.handle(REQUESTS as u64)).is_err(), "the device says it is broken");
}

/// The same overlap on virtio-net's transmit queue, which had the same loop.
#[test]
fn net_rings_laid_over_each_other_break_the_device_instead_of_spinning() {
    let mem = memory();
    let overlapping = {
        let mut queue = Queue::new(256).expect("queue");
        queue.try_set_size(2).expect("size");
        queue.try_set_desc_table_address(GuestAddress(0xffe0)).expect("desc");
        queue.try_set_avail_ring_address(GuestAddress(0xfe)).expect("avail");
        queue.try_set_used_ring_address(GuestAddress(0x100)).expect("used");
        queue.set_ready(true);
        assert!(queue.is_valid(&mem), "the transport accepts these rings");
        ActiveQueue { queue, kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd") }
    };
    let rx = GuestQueue::empty();
    let (mut worker, host) = net_worker(&mem, rx.install(&mem, 0x8000, 256), overlapping, 0);
    let served = within_seconds(move || {
        let _host = host;
        // The first look finds the frame the overlap forges, so the worker looks again (its
        // own kick): that look must find the index moved backwards.
        worker.handle(TX_KICK).and_then(|()| worker.handle(TX_KICK))
    });
    assert!(served.is_err(), "the device says it is broken");
}

/// The same overlap on virtio-fs's request queue, whose loop over its queue (in the FUSE
/// crate's queue version, virtio::fs::bridge) has the same guard.
#[test]
fn fs_rings_laid_over_each_other_break_the_device_instead_of_spinning() {
    let mem = memory();
    let active = avail_index_on_used_flags(&mem);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut worker = fs_worker(&mem, dir.path(), active, false);
    assert!(within_seconds(move || worker.handle(virtio_fs::REQUESTS as u64)).is_err(), "the device says it is broken");
}
