//! Real passt processes, each in a network namespace made for the test (so that whatever it
//! does stays there), talked to through the frame codec. They need root for the namespace and
//! passt on PATH; without either they say why and pass, as the other host-dependent tests do.

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::frames::{Fill, Flush, FrameReader, FrameWriter, StreamError};
use super::*;

/// Whatever the namespace's one interface is, the guest is offered its address.
const HOST_ADDR: [u8; 4] = [169, 254, 1, 1];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

/// Runs `body` on a thread of its own, in a new network namespace with a link-local address
/// and a default route (passt needs one to know what to offer the guest). Processes started
/// from that thread, passt among them, are born in the namespace. `None` when this host can't
/// make one (not root) or has no passt.
fn in_netns<T: Send>(body: impl FnOnce() -> T + Send) -> Option<T> {
    let passt_present = std::process::Command::new(PROGRAM).arg("--version").output().is_ok();
    if !passt_present {
        eprintln!("skipped: no passt on PATH (apt-get install passt)");
        return None;
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare with a flag only changes this thread's namespaces.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    eprintln!("skipped: cannot make a network namespace ({})", std::io::Error::last_os_error());
                    return None;
                }
                let setup = "ip link set lo up && ip link add v0 type veth peer name v1 && ip addr add 169.254.1.1/16 dev v0 \
                    && ip link set v0 up && ip link set v1 up && ip route add default via 169.254.1.254 dev v0";
                let status = std::process::Command::new("sh").args(["-c", setup]).status().expect("sh runs");
                assert!(status.success(), "setting up the namespace failed: {status}");
                Some(body())
            })
            .join()
            .expect("the namespace's thread")
    })
}

/// Reads frames until `wanted` picks one, or the stream ends (`Err`). Waits in poll(2), not
/// in sleeps; the deadline only keeps a broken passt from hanging the test run.
fn wait_for_frame(stream: &UnixStream, reader: &mut FrameReader, wanted: impl Fn(&[u8]) -> bool) -> Result<Vec<u8>, StreamError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        while let Some(frame) = reader.frame()? {
            let frame = frame.to_vec();
            reader.consume();
            if wanted(&frame) {
                return Ok(frame);
            }
        }
        assert!(Instant::now() < deadline, "no such frame from passt in 60 s");
        if reader.fill(&mut &*stream)? == Fill::WouldBlock {
            let mut pollfd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd, for the length we pass.
            unsafe { libc::poll(&mut pollfd, 1, 1000) };
        }
    }
}

fn send(stream: &UnixStream, frame: &[u8]) {
    let mut writer = FrameWriter::default();
    assert!(writer.push_bytes(frame).expect("a valid frame"));
    assert_eq!(writer.flush(&mut &*stream).expect("passt takes it"), Flush::Done);
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A broadcast DHCPDISCOVER from GUEST_MAC, as udhcpc sends it.
fn dhcp_discover() -> Vec<u8> {
    let mut bootp = vec![0u8; 236];
    bootp[..4].copy_from_slice(&[1, 1, 6, 0]);
    bootp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    bootp[10] = 0x80; // answer by broadcast
    bootp[28..34].copy_from_slice(&GUEST_MAC);
    bootp.extend_from_slice(&[0x63, 0x82, 0x53, 0x63, 53, 1, 1, 255]);
    let mut udp = [68u16.to_be_bytes(), 67u16.to_be_bytes(), (8 + bootp.len() as u16).to_be_bytes(), [0, 0]].concat();
    udp.extend_from_slice(&bootp);
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255];
    ip[2..4].copy_from_slice(&(20 + udp.len() as u16).to_be_bytes());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    [&[0xff; 6][..], &GUEST_MAC, &[0x08, 0x00], &ip, &udp].concat()
}

/// An IPv4 UDP frame from port 67 to 68: a DHCP answer.
fn is_dhcp_answer(frame: &[u8]) -> bool {
    frame.len() > 14 + 20 + 8 + 20 && frame[12..14] == [0x08, 0x00] && frame[23] == 17 && frame[34..38] == [0, 67, 0, 68]
}

#[test]
fn passt_answers_dhcp_with_the_hosts_address() {
    in_netns(|| {
        let (passt, stream) = Passt::start(&[]).expect("passt starts");
        assert!(passt.is_alive());
        send(&stream, &dhcp_discover());
        let offer = wait_for_frame(&stream, &mut FrameReader::default(), is_dhcp_answer).expect("an offer");
        // yiaddr, 16 bytes into the BOOTP message.
        assert_eq!(offer[14 + 20 + 8 + 16..][..4], HOST_ADDR);
    });
}

#[test]
fn a_forwarded_host_port_reaches_the_guest() {
    in_netns(|| {
        let forward = Forward { protocol: Protocol::Tcp, host_addr: Some([127, 0, 0, 1].into()), host_port: 8080, guest_port: 80 };
        let (_passt, stream) = Passt::start(&[forward]).expect("passt starts");
        let mut reader = FrameReader::default();
        // passt learns the guest from its first frame.
        send(&stream, &dhcp_discover());
        wait_for_frame(&stream, &mut reader, is_dhcp_answer).expect("an offer");
        // The port is bound before passt serves its socket, and it has served one frame.
        let _client = TcpStream::connect(("127.0.0.1", 8080)).expect("passt listens on the forwarded port");
        let is_syn_to_80 = |f: &[u8]| f.len() >= 54 && f[12..14] == [0x08, 0x00] && f[23] == 6 && f[36..38] == [0, 80] && f[47] & 0x02 != 0;
        let syn = wait_for_frame(&stream, &mut reader, is_syn_to_80).expect("a SYN to the guest's port 80");
        assert_eq!(syn[30..34], HOST_ADDR, "to the guest's address");
    });
}

#[test]
fn a_killed_passt_closes_the_stream_and_is_reaped() {
    in_netns(|| {
        let (passt, stream) = Passt::start(&[]).expect("passt starts");
        // SAFETY: kill on the pid of our own child, which the waiting thread has not reaped
        // (it is alive: it can't have exited on its own while we hold the stream).
        assert_eq!(unsafe { libc::kill(passt.pid() as libc::pid_t, libc::SIGKILL) }, 0);
        let ended = wait_for_frame(&stream, &mut FrameReader::default(), |_| false);
        assert!(matches!(ended, Err(StreamError::Closed)), "{:?}", ended.err());
        let deadline = Instant::now() + Duration::from_secs(60);
        while passt.is_alive() {
            assert!(Instant::now() < deadline, "passt not reaped in 60 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    });
}

#[test]
fn dropping_passt_stops_it() {
    in_netns(|| {
        let (passt, mut stream) = Passt::start(&[]).expect("passt starts");
        drop(passt);
        stream.set_nonblocking(false).expect("blocking");
        // The drop waited for the reaping, so passt's end is closed by now.
        assert_eq!(stream.read(&mut [0u8; 16]).expect("end of stream"), 0);
    });
}

#[test]
fn a_port_passt_cannot_bind_ends_it_and_the_stream() {
    in_netns(|| {
        let _taken = std::net::TcpListener::bind(("0.0.0.0", 8080)).expect("a free port in a new namespace");
        let forward = Forward { protocol: Protocol::Tcp, host_addr: None, host_port: 8080, guest_port: 80 };
        let (_passt, stream) = Passt::start(&[forward]).expect("passt starts, then gives up");
        let ended = wait_for_frame(&stream, &mut FrameReader::default(), |_| false);
        assert!(matches!(ended, Err(StreamError::Closed)), "{:?}", ended.err());
    });
}

#[test]
fn no_passt_on_path_says_how_to_get_it() {
    let missing = Passt::start_program("lguest-no-such-passt", &[]).err().expect("no such program");
    assert!(matches!(missing, PasstError::Missing));
    assert!(missing.to_string().contains("apt-get install passt"), "{missing}");
}

#[test]
fn port_specs_in_passts_syntax() {
    let forward = |host_addr: Option<std::net::IpAddr>| Forward { protocol: Protocol::Udp, host_addr, host_port: 5353, guest_port: 53 };
    assert_eq!(port_spec(&forward(None)), "5353:53");
    assert_eq!(port_spec(&forward(Some([127, 0, 0, 1].into()))), "127.0.0.1/5353:53");
    assert_eq!(port_spec(&forward(Some(std::net::Ipv6Addr::LOCALHOST.into()))), "::1/5353:53");
}
