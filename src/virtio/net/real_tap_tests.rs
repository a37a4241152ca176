//! A real tap in a network namespace of this thread's own, so that the host's interfaces are
//! never touched; the host's side of the wire is a packet socket on the tap. Frames cross it
//! both ways, 64 KiB TCP segments unsplit, and a frame too big for the guest's buffers is
//! dropped and counted. (A child of `net::tests`; multi-queue taps use its namespace too.)

use super::*;

const ETHERTYPE: [u8; 2] = [0x88, 0xb5]; // local experimental
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

fn ethernet(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut bytes = [&dst[..], &src, &ETHERTYPE, payload].concat();
    bytes.resize(bytes.len().max(60), 0);
    bytes
}

/// The only reasons a real-tap test may skip.
#[derive(Debug, thiserror::Error)]
enum Unavailable {
    #[error("cannot make a network namespace: {0}")]
    NoNamespace(io::Error),
    #[error("this host has no /dev/net/tun")]
    NoTun,
}

/// Moves this thread into a new network namespace, unless this host gives us none (we may
/// not make one, or the kernel has none) or no /dev/net/tun. Any other failure fails the test.
fn private_network() -> std::result::Result<(), Unavailable> {
    // SAFETY: unshare takes no pointers; CLONE_NEWNET changes only this thread's view.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::ENOSYS) => return Err(Unavailable::NoNamespace(e)),
            _ => panic!("unshare(CLONE_NEWNET) failed unexpectedly: {e}"),
        }
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err(Unavailable::NoTun);
    }
    // Keep IPv6's router solicitations off the wire; harmless if IPv6 is absent.
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
    Ok(())
}

fn packet_socket(ifname: &str) -> OwnedFd {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket takes no pointers; the fd is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, i32::from(protocol)) };
    assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
    // SAFETY: a fresh fd nobody else owns.
    let socket = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).expect("name");
    // SAFETY: sockaddr_ll is plain data; zero is valid.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    // SAFETY: reads the NUL-terminated name we own.
    address.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
    let size = std::mem::size_of::<libc::sockaddr_ll>() as u32;
    // SAFETY: bind reads `size` bytes of the address we pass.
    let ret = unsafe { libc::bind(fd, (&address as *const libc::sockaddr_ll).cast(), size) };
    assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
    socket
}

/// Waits for a frame with our EtherType carrying `payload`, skipping the host's chatter.
fn host_receives(socket: &OwnedFd, payload: &[u8]) -> Vec<u8> {
    let socket = File::from(socket.try_clone().expect("dup"));
    let mut buffer = vec![0u8; 70000];
    loop {
        assert!(wait_readable(&socket), "no frame with our payload reached the host");
        let Ok(len) = io::Read::read(&mut &socket, &mut buffer) else { continue };
        if carries(&buffer[..len], payload) {
            return buffer[..len].to_vec();
        }
    }
}

fn wait_until(what: impl Fn() -> bool) -> bool {
    (0..2000).any(|_| {
        let done = what();
        if !done {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        done
    })
}

/// Whether an Ethernet frame is ours and carries `payload`.
fn carries(frame: &[u8], payload: &[u8]) -> bool {
    frame.len() >= 14 + payload.len() && frame[12..14] == ETHERTYPE && &frame[14..14 + payload.len()] == payload
}

/// The frame (header first) in a used receive buffer that carries `payload`, if any.
fn guest_received(rx: &RingDriver, buffers: &[(u16, u64)], payload: &[u8]) -> Option<Vec<u8>> {
    rx.used().iter().find_map(|&(head, len)| {
        let &(_, at) = buffers.iter().find(|&&(h, _)| u32::from(h) == head)?;
        let got = rx.read(at, len as usize);
        carries(got.get(VNET_HDR_LEN..)?, payload).then_some(got)
    })
}

/// A card on a new tap `name`, activated with `features` once `post` has posted the
/// receive buffers (whose heads and addresses it returns), and the host's end of the wire.
struct Wired {
    net: Net,
    wire: OwnedFd,
    rx: RingDriver,
    tx: RingDriver,
    tx_kick: EventFd,
    buffers: Vec<(u16, u64)>,
}

fn wired(name: &str, features: u64, post: impl FnOnce(&mut RingDriver) -> Vec<(u16, u64)>) -> Wired {
    let tap = Tap::open(name).expect("a tap in our own namespace");
    let wire = packet_socket(name);
    let mut net = Net::with_tap(tap, Some(GUEST_MAC));
    let (activation, mut rx, tx, tx_kick) = activation(&memory(), features);
    let buffers = post(&mut rx);
    net.activate(activation).expect("activation");
    Wired { net, wire, rx, tx, tx_kick, buffers }
}

fn carry_frames_both_ways() {
    let Wired { mut net, wire, rx, mut tx, tx_kick, buffers } = wired("lgtest0", LINUX, |rx| post_linux_rx_buffers(rx, 60));
    let busy = Tap::open("lgtest0").expect_err("a tap serves one VM");
    assert!(busy.to_string().contains("already in use"), "{busy}");
    let not_a_tap = Tap::open("lo").expect_err("lo is no tap");
    assert!(not_a_tap.to_string().contains("not a single-queue tap"), "{not_a_tap}");

    // Guest to host.
    let out = ethernet([0xff; 6], GUEST_MAC, b"lguest says hello");
    tx.post_readable(&[&[0u8; VNET_HDR_LEN], &out]);
    tx_kick.write(1).expect("kick");
    assert_eq!(host_receives(&wire, b"lguest says hello"), out);

    // Host to guest.
    let back = ethernet(GUEST_MAC, HOST_MAC, b"the host answers");
    // SAFETY: send reads `back.len()` bytes of the buffer we own.
    let sent = unsafe { libc::send(wire.as_raw_fd(), back.as_ptr().cast(), back.len(), 0) };
    assert_eq!(usize::try_from(sent).ok(), Some(back.len()), "send: {}", io::Error::last_os_error());
    assert!(wait_until(|| guest_received(&rx, &buffers, b"the host answers").is_some()), "the frame reached the guest");
    let got = guest_received(&rx, &buffers, b"the host answers").expect("received");
    assert_eq!(got[HDR_NUM_BUFFERS..VNET_HDR_LEN], [1, 0], "num_buffers");
    assert_eq!(got[VNET_HDR_LEN..], back[..]);
    assert_eq!(net.stats().rx_dropped, 0);
    net.reset();
}

fn drop_a_frame_too_big_for_the_buffers() {
    // No mergeable buffers and no offloads: each frame must fit one small chain.
    let post = |rx: &mut RingDriver| (0..8).map(|_| rx.post_writable(300)).collect();
    let Wired { mut net, wire, rx, buffers, .. } = wired("lgtest1", feature::VERSION_1, post);
    for frame in [ethernet(GUEST_MAC, HOST_MAC, &[b'x'; 1000]), ethernet(GUEST_MAC, HOST_MAC, b"small enough")] {
        // SAFETY: send reads `frame.len()` bytes of the buffer we own.
        let sent = unsafe { libc::send(wire.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(usize::try_from(sent).ok(), Some(frame.len()), "send: {}", io::Error::last_os_error());
    }
    assert!(wait_until(|| guest_received(&rx, &buffers, b"small enough").is_some()), "the small frame got through");
    assert_eq!(net.stats().rx_dropped, 1, "the big one was dropped and counted");
    assert!(guest_received(&rx, &buffers, &[b'x'; 20]).is_none());
    net.reset();
}

/// An Ethernet frame with one TCP segment of `payload` bytes between link-local
/// addresses, and the virtio-net header that offloads its checksum and segmentation.
fn tcp_segment(dst: [u8; 6], src: [u8; 6], payload: usize) -> ([u8; VNET_HDR_LEN], Vec<u8>) {
    let ip_len = u16::try_from(40 + payload).expect("fits an IP packet");
    let mut ip = [0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 169, 254, 1, 1, 169, 254, 1, 2];
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    let sum = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
    let sum = !((sum & 0xffff) + (sum >> 16)) as u16;
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    // Ports, sequence, acknowledgement, data offset 5, ACK|PSH, window; the checksum
    // is left to the offload.
    let tcp = [0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0];
    let body: Vec<u8> = (0..payload).map(|i| (i % 251) as u8).collect();
    let frame = [&dst[..], &src, &[0x08, 0x00], &ip, &tcp, &body].concat();
    let mut header = [0u8; VNET_HDR_LEN];
    header[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    header[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    header[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
    header[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
    header[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    header[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    (header, frame)
}

fn carry_64k_segments_unsplit() {
    let Wired { mut net, wire, rx, mut tx, tx_kick, buffers } = wired("lgtest2", LINUX, |rx| post_linux_rx_buffers(rx, 100));

    // Guest to host: the host's stack takes the 60 KB segment whole.
    let (header, out) = tcp_segment([0xff; 6], GUEST_MAC, 60000);
    tx.post_readable(&[&header, &out[..100], &out[100..]]);
    tx_kick.write(1).expect("kick");
    let socket = File::from(wire.try_clone().expect("dup"));
    let mut got = vec![0u8; 70000];
    let len = loop {
        assert!(wait_readable(&socket), "the segment never reached the host");
        let Ok(len) = io::Read::read(&mut &socket, &mut got) else { continue };
        if len > 14 && got[12..14] == [0x08, 0x00] {
            break len;
        }
    };
    assert_eq!(got[..len].len(), out.len(), "one frame, not segmented on the way");
    assert_eq!(got[54..len], out[54..]);

    // Host to guest: a packet socket with a virtio-net header of its own sends a 60 KB
    // segment out of the tap, which hands it to us unsplit as the guest accepted TSO4.
    const PACKET_VNET_HDR: libc::c_int = 15;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads one int, which `on` is.
    let ret = unsafe {
        libc::setsockopt(wire.as_raw_fd(), libc::SOL_PACKET, PACKET_VNET_HDR, (&on as *const libc::c_int).cast(), 4)
    };
    assert_eq!(ret, 0, "PACKET_VNET_HDR: {}", io::Error::last_os_error());
    let (header, back) = tcp_segment(GUEST_MAC, HOST_MAC, 60000);
    let packet = [&header[..10], &back].concat();
    // SAFETY: send reads `packet.len()` bytes of the buffer we own.
    let sent = unsafe { libc::send(wire.as_raw_fd(), packet.as_ptr().cast(), packet.len(), 0) };
    assert_eq!(usize::try_from(sent).ok(), Some(packet.len()), "send: {}", io::Error::last_os_error());
    let first_used = |rx: &RingDriver| {
        rx.used().into_iter().position(|(head, _)| {
            let at = buffers.iter().find(|&&(h, _)| u32::from(h) == head).map_or(0, |b| b.1);
            rx.read(at + VNET_HDR_LEN as u64 + 12, 2) == [0x08, 0x00]
        })
    };
    assert!(wait_until(|| first_used(&rx).is_some()), "the segment reached the guest");
    let used = rx.used();
    let start = first_used(&rx).expect("found");
    let header_at = buffers.iter().find(|&&(h, _)| u32::from(h) == used[start].0).map_or(0, |b| b.1);
    let header = rx.read(header_at, VNET_HDR_LEN);
    let num_buffers = usize::from(u16::from_le_bytes([header[10], header[11]]));
    assert_eq!(num_buffers, (VNET_HDR_LEN + back.len()).div_ceil(2048), "spread over mergeable buffers");
    assert_eq!(header[1], VIRTIO_NET_HDR_GSO_TCPV4 as u8, "still one TCP segment");
    assert_eq!(u16::from_le_bytes([header[4], header[5]]), 1448, "gso_size");
    let mut landed = Vec::new();
    for &(head, len) in &used[start..start + num_buffers] {
        let at = buffers.iter().find(|&&(h, _)| u32::from(h) == head).map_or(0, |b| b.1);
        landed.extend(rx.read(at, len as usize));
    }
    assert_eq!(landed[VNET_HDR_LEN..], back[..]);
    net.reset();
}

/// Runs `test` on a thread of its own (the namespace is per thread), skipping it with a
/// printed reason only when this host gives us no namespace or no /dev/net/tun.
pub(super) fn in_private_network(name: &str, test: fn()) {
    let ran = std::thread::spawn(move || private_network().map(|()| test()));
    match ran.join() {
        Ok(Ok(())) => {}
        Ok(Err(why)) => eprintln!("SKIPPED {name}: {why} (needs root or CAP_NET_ADMIN, and /dev/net/tun)"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[test]
fn a_real_tap_carries_frames_both_ways() {
    in_private_network("a_real_tap_carries_frames_both_ways", carry_frames_both_ways);
}

#[test]
fn a_real_tap_carries_64k_tcp_segments_unsplit_both_ways() {
    in_private_network("a_real_tap_carries_64k_tcp_segments_unsplit_both_ways", carry_64k_segments_unsplit);
}

#[test]
fn a_real_tap_frame_too_big_for_the_buffers_is_dropped_and_counted() {
    in_private_network("a_real_tap_frame_too_big_for_the_buffers_is_dropped_and_counted", drop_a_frame_too_big_for_the_buffers);
}
