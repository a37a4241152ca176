//! Fuzzes virtio-vsock's packet path: the fuzzer is a malicious guest that forges transmit
//! chains (headers cut anywhere, lengths that lie, unknown operations and types, forged CIDs,
//! data beyond its credit, floods of connection requests), receive and event buffers of any
//! shape, while host programs connect to the device's Unix socket, write CONNECT lines, send
//! data and hang up in between. A guest could otherwise crash the VMM, hang its worker, grow
//! its memory or leak its fds. Every chain must be used (or the device must report
//! NEEDS_RESET), and the streams must stay within the muxer's limit.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lguest::virtio::vsock::muxer::MAX_CONNECTIONS;
use lguest::virtio::vsock::packet::{Header, HOST_CID, TYPE_STREAM};
use lguest::virtio::vsock::{Vsock, EVENT_KICK, MUXER, RX_KICK, TX_KICK};
use lguest::virtio::{feature, ActiveQueue, Activation, Signals};
use lguest_fuzz::{by_hand, memory, poke, vsock_path, Guest};
use vmm_sys_util::eventfd::EventFd;

const GUEST_CID: u64 = 3;

/// A header with the right CIDs and type, so that the fuzzer reaches the streams; `Raw` pokes
/// and `lie` reach everything else.
#[derive(Arbitrary, Debug)]
struct Forged {
    at: u16,
    op: u8,
    guest_port: u8,
    host_port: u8,
    len: u16,
    flags: u8,
    buf_alloc: u32,
    fwd_cnt: u32,
    /// Breaks one of the header's promises: the source, the destination or the type.
    lie: Option<u8>,
}

impl Forged {
    fn write(&self, mem: &lguest::memory::GuestMemoryMmap) {
        let mut header = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: u32::from(self.guest_port),
            dst_port: u32::from(self.host_port % 4),
            len: u32::from(self.len),
            kind: TYPE_STREAM,
            op: u16::from(self.op % 9),
            flags: u32::from(self.flags % 4),
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        };
        match self.lie.map(|l| l % 3) {
            Some(0) => header.src_cid = 7,
            Some(1) => header.dst_cid = 1,
            Some(_) => header.kind = 2,
            None => {}
        }
        poke(mem, u64::from(self.at), &header.to_bytes());
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    TransmitKick,
    ReceiveKick,
    EventKick,
    MuxerEvent,
    TransportReset,
    /// A host program connects and writes `CONNECT <port>` (or garbage).
    HostConnect { port: u8, garbage: bool },
    /// A host program (one already connected) writes bytes, or hangs up.
    HostWrite { which: u8, len: u16 },
    HostClose { which: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    receive: Guest,
    transmit: Guest,
    event: Guest,
    headers: Vec<Forged>,
    /// Host port 1 has a listener the guest's requests reach.
    listening: bool,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let mem = memory();
    for forged in input.headers.iter().take(32) {
        forged.write(&mem);
    }
    let (Some(rx), Some(tx), Some(event)) =
        (input.receive.install(&mem, 256), input.transmit.install(&mem, 256), input.event.install(&mem, 256))
    else {
        return;
    };
    let path = vsock_path();
    let Ok(device) = Vsock::new(GUEST_CID, &path) else { return };
    // A listener's socket file stays after it is dropped: each input binds afresh.
    let host_path = format!("{}_1", path.display());
    let _ = std::fs::remove_file(&host_path);
    let listener = input.listening.then(|| UnixListener::bind(&host_path).ok()).flatten();
    let active = |queue| ActiveQueue { queue, kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd") };
    let queues = vec![Some(active(rx)), Some(active(tx)), Some(active(event))];
    let activation = Activation { mem, queues, features: feature::VERSION_1, signals: Signals::standalone(3) };
    let mut worker = by_hand(&device, activation);
    let mut hosts: Vec<UnixStream> = Vec::new();
    for op in input.ops.iter().take(64) {
        // Errors are the device declaring itself broken (NEEDS_RESET): allowed, and final.
        let served = match *op {
            Op::TransmitKick => worker.handle(TX_KICK),
            Op::ReceiveKick => worker.handle(RX_KICK),
            Op::EventKick => worker.handle(EVENT_KICK),
            Op::MuxerEvent => worker.handle(MUXER),
            Op::TransportReset => worker.handler.transport_reset().map(drop),
            Op::HostConnect { port, garbage } => {
                if let Ok(mut stream) = UnixStream::connect(&path) {
                    let line = if garbage { format!("CONNECT {port}x\n") } else { format!("CONNECT {}\n", port % 4) };
                    let _ = stream.set_nonblocking(true);
                    let _ = stream.write_all(line.as_bytes());
                    hosts.push(stream);
                }
                worker.handle(MUXER)
            }
            Op::HostWrite { which, len } => {
                if let Some(stream) = hosts.get_mut(usize::from(which)) {
                    let _ = stream.write(&vec![0x5a; usize::from(len)]);
                }
                worker.handle(MUXER)
            }
            Op::HostClose { which } => {
                if usize::from(which) < hosts.len() {
                    hosts.swap_remove(usize::from(which));
                }
                worker.handle(MUXER)
            }
        };
        assert!(worker.handler.connection_count() <= MAX_CONNECTIONS, "streams beyond the limit");
        if served.is_err() {
            break;
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&host_path);
});
