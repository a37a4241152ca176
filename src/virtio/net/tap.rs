//! The host end of a guest's network card: a Linux tap device, opened through /dev/net/tun.
//!
//! A tap is an Ethernet interface whose "wire" is a file descriptor: every frame the host
//! sends out of the interface can be read from the fd, and every frame written to the fd
//! arrives on the interface as if received. We ask for `IFF_VNET_HDR`, so each frame carries
//! the same 12-byte `virtio_net_hdr_v1` in front that the guest's driver reads and writes:
//! checksum and segmentation offloads (a 64 KiB TCP segment travels as one frame) pass between
//! the guest and the host's stack without being touched, which is what makes bulk TCP fast.
//!
//! A multi-queue tap ([`Tap::open_queues`], `IFF_MULTI_QUEUE`) is one interface with one fd per
//! queue: the kernel spreads the flows it sends over the fds that are attached, one per queue
//! pair of the guest's card, each served by its own thread. A queue the guest's driver does not
//! use is detached ([`Tap::set_queue_enabled`]), so that no flow is steered to an fd nobody reads.
//!
//! [`Tap::open`] attaches to an existing tap (the usual case: `ip tuntap add NAME mode tap user
//! $USER` and `ip link set NAME up` once, then lguest runs unprivileged) or creates one when we
//! have CAP_NET_ADMIN; a tap we create lives as long as our fd and we bring it up. Bringing an
//! existing tap up, and its addresses, bridges and routes, are the user's business: frames
//! sent into a tap that is down are dropped (and counted by the device). What arrives on the fd
//! is trusted as far as the host's kernel is; the guest's side never reaches this module
//! except as bytes in [`IoVecs`].

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use crate::error::{Error, Result};
use crate::virtio::iovec::{iovec_count, IoVecs};

/// The virtio-net header the tap puts in front of each frame, as a virtio 1 driver knows it
/// (`virtio_net_hdr_v1`, the same size as `virtio_net_hdr_mrg_rxbuf`). On a little-endian
/// host the tap's native header byte order is virtio 1's, so nothing needs swapping.
pub const VNET_HDR_LEN: usize = 12;

/// A tap device, attached and ready for frames. Reads and writes never block.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// False only for the socket stand-in used by tests, which has no tap ioctls.
    #[cfg(any(test, feature = "test-utils"))]
    is_tap: bool,
}

impl Tap {
    /// Attaches to the tap `name`, creating it (and bringing it up) if it doesn't exist and we
    /// may. Errors say what the user can do about them.
    pub fn open(name: &str) -> Result<Tap> {
        let mut taps = Tap::open_queues(name, 1)?;
        taps.pop().ok_or_else(|| Error::Tap { name: name.to_string(), why: TapError::NoQueues.to_string() })
    }

    /// Attaches `queues` fds to the tap `name`: one plain fd for one queue, else `queues` fds
    /// of a multi-queue tap (created multi-queue when it doesn't exist yet).
    pub fn open_queues(name: &str, queues: u16) -> Result<Vec<Tap>> {
        Tap::try_open_queues(name, queues).map_err(|why| Error::Tap { name: name.to_string(), why: why.to_string() })
    }

    /// [`Tap::open_queues`], with the reason it failed (so that a caller may fall back to one
    /// queue when an existing tap is single-queue: [`TapError::NotMultiQueue`]).
    pub fn try_open_queues(name: &str, queues: u16) -> std::result::Result<Vec<Tap>, TapError> {
        let ifname = interface_name(name).ok_or(TapError::BadName)?;
        if queues == 0 {
            return Err(TapError::NoQueues);
        }
        let existed = interface_exists(name);
        let mut taps = Vec::with_capacity(usize::from(queues));
        for _ in 0..queues {
            let file = open_tun()?;
            attach(&file, ifname, queues > 1).map_err(|e| explain_attach_error(e, name, existed, queues > 1))?;
            set_vnet_header_len(&file).map_err(TapError::VnetHeader)?;
            taps.push(Tap {
                file,
                name: name.to_string(),
                #[cfg(any(test, feature = "test-utils"))]
                is_tap: true,
            });
        }
        if !existed {
            // A tap we created vanishes with our fds; nobody else has had a chance to bring it up.
            if let Err(e) = bring_up(ifname) {
                tracing::warn!("created tap {name} but could not bring it up ({e}); run: ip link set {name} up");
            }
        }
        Ok(taps)
    }

    /// Attaches this queue of a multi-queue tap to the interface, or detaches it: the kernel
    /// steers no flow to a detached queue (and reading or polling it reports an error).
    pub fn set_queue_enabled(&self, enabled: bool) -> io::Result<()> {
        #[cfg(any(test, feature = "test-utils"))]
        if !self.is_tap {
            return Ok(());
        }
        let mut request = ifreq([0; libc::IFNAMSIZ]);
        let flags = if enabled { libc::IFF_ATTACH_QUEUE } else { libc::IFF_DETACH_QUEUE };
        request.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETQUEUE reads one `struct ifreq`, which `request` is.
        let ret = unsafe { ioctl_with_ref(&self.file, libc::TUNSETQUEUE as _, &request) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the tap which offloads (`TUN_F_*`) we can take in frames read from it, which are
    /// the ones the guest's driver accepted. Without them the host's kernel checksums and
    /// segments each frame before handing it over.
    /// The tap's fd, for handing to the kernel's vhost-net.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn set_offloads(&self, offloads: u32) -> io::Result<()> {
        #[cfg(any(test, feature = "test-utils"))]
        if !self.is_tap {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        let ret = unsafe { ioctl_with_val(&self.file, libc::TUNSETOFFLOAD as _, libc::c_ulong::from(offloads)) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (virtio-net header first) into `iovecs`. A frame that doesn't fit is
    /// cut short or refused by the kernel, and lost either way: callers supply room for the
    /// largest frame. Returns the frame's length; `WouldBlock` when there is none.
    pub fn read_frame(&self, iovecs: &IoVecs<'_>) -> io::Result<usize> {
        let iov = iovecs.as_slice();
        // SAFETY: every iovec points into a mapping that `IoVecs` keeps borrowed for its whole
        // life (see `IoVecs::push`), and readv writes only within the iovecs' lengths.
        retry_interrupted(|| unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), iovec_count(iov)) })
    }

    /// Writes one frame (virtio-net header first) gathered from `iovecs`.
    pub fn write_frame(&self, iovecs: &IoVecs<'_>) -> io::Result<usize> {
        let iov = iovecs.as_slice();
        // SAFETY: as in `read_frame`; writev only reads within the iovecs' lengths.
        retry_interrupted(|| unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iovec_count(iov)) })
    }

    /// A stand-in for a tap, for tests on hosts where a real one can't be had: one end of a
    /// non-blocking `SOCK_SEQPACKET` socket pair, which keeps frame boundaries as a tap does.
    /// The other end plays the host's network. (Also what the fuzz targets and property
    /// tests use, so they need neither root nor a network namespace.)
    #[cfg(any(test, feature = "test-utils"))]
    pub fn socket_pair() -> io::Result<(Tap, OwnedFd)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fds into the array we pass, which has room for them.
        let ret = unsafe {
            libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created by socketpair and are owned by nothing else.
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Tap { file: File::from(ours), name: "fake-tap".into(), is_tap: false }, theirs))
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Runs a read or write syscall until a signal doesn't interrupt it; returns its byte count.
fn retry_interrupted(mut syscall: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        match usize::try_from(syscall()) {
            Ok(len) => return Ok(len),
            Err(_) => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::Interrupted => continue,
                e => return Err(e),
            },
        }
    }
}

/// The name as the kernel's `ifr_name` wants it, or `None` if it can't be one.
fn interface_name(name: &str) -> Option<[libc::c_char; libc::IFNAMSIZ]> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    let mut ifname = [0 as libc::c_char; libc::IFNAMSIZ];
    for (to, &from) in ifname.iter_mut().zip(bytes) {
        *to = from as libc::c_char;
    }
    Some(ifname)
}

/// Whether an interface of that name exists in our network namespace: it decides whether a
/// TUNSETIFF creates the tap (and whether EPERM means "can't create" or "not yours").
fn interface_exists(name: &str) -> bool {
    let Ok(cname) = CString::new(name) else { return false };
    // SAFETY: if_nametoindex reads the NUL-terminated string we own and nothing else.
    unsafe { libc::if_nametoindex(cname.as_ptr()) != 0 }
}

fn open_tun() -> std::result::Result<File, TapError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => TapError::NoTun,
            Some(libc::EACCES) | Some(libc::EPERM) => TapError::TunPermission,
            _ => TapError::Tun(e),
        })
}

/// TUNSETIFF: a tap (single- or multi-queue), no packet-info prefix, a virtio-net header on
/// every frame.
fn attach(file: &File, ifname: [libc::c_char; libc::IFNAMSIZ], multi_queue: bool) -> io::Result<()> {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    let mut request = ifreq(ifname);
    request.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `request` is.
    let ret = unsafe { ioctl_with_mut_ref(file, libc::TUNSETIFF as _, &mut request) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Why a tap can't be had: the user's to fix, so each says how.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("a tap name has 1 to {} characters, none of them NUL", libc::IFNAMSIZ - 1)]
    BadName,
    #[error("/dev/net/tun does not exist: load the tun module (modprobe tun)")]
    NoTun,
    #[error("no permission to open /dev/net/tun: run as root, or make it readable and writable for your user")]
    TunPermission,
    #[error("cannot open /dev/net/tun: {0}")]
    Tun(#[source] io::Error),
    #[error("no permission to attach to it (it belongs to another user): recreate it with 'ip tuntap add {0} mode tap user $USER', or run as root")]
    NotYours(String),
    #[error("it does not exist and creating it needs CAP_NET_ADMIN: create it first with 'ip tuntap add {0} mode tap user $USER' and 'ip link set {0} up', or run as root")]
    CannotCreate(String),
    #[error("it is already in use by another program (a tap serves one VM at a time)")]
    Busy,
    #[error("an interface of that name exists but is not a single-queue tap (a tun, a multi-queue tap, or another kind of interface): pick another name, or recreate it with 'ip tuntap add {0} mode tap'")]
    NotATap(String),
    #[error("it is a single-queue tap and queues=N asks for several: recreate it with 'ip tuntap add {0} mode tap multi_queue user $USER', or drop queues=")]
    NotMultiQueue(String),
    #[error("a card needs at least one queue pair")]
    NoQueues,
    #[error("TUNSETIFF failed: {0}")]
    Attach(#[source] io::Error),
    #[error("the tap refused a {VNET_HDR_LEN}-byte virtio-net header (TUNSETVNETHDRSZ): {0}")]
    VnetHeader(#[source] io::Error),
}

fn explain_attach_error(e: io::Error, name: &str, existed: bool, multi_queue: bool) -> TapError {
    match e.raw_os_error() {
        Some(libc::EPERM) if existed => TapError::NotYours(name.to_string()),
        Some(libc::EPERM) => TapError::CannotCreate(name.to_string()),
        Some(libc::EBUSY) => TapError::Busy,
        Some(libc::EINVAL) if multi_queue && existed => TapError::NotMultiQueue(name.to_string()),
        Some(libc::EINVAL) => TapError::NotATap(name.to_string()),
        _ => TapError::Attach(e),
    }
}

fn set_vnet_header_len(file: &File) -> io::Result<()> {
    let len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int, which `len` is.
    let ret = unsafe { ioctl_with_ref(file, libc::TUNSETVNETHDRSZ as _, &len) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets IFF_UP on the interface, through an ordinary socket as `ip link set up` does.
fn bring_up(ifname: [libc::c_char; libc::IFNAMSIZ]) -> io::Result<()> {
    // SAFETY: socket takes no pointers; the fd it returns is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created by socket and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut request = ifreq(ifname);
    // SAFETY: SIOCGIFFLAGS fills in one `struct ifreq`, which `request` is.
    if unsafe { ioctl_with_mut_ref(&socket, libc::SIOCGIFFLAGS as _, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: reading the flags member SIOCGIFFLAGS just wrote; every bit pattern is a c_short.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    request.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`, which `request` is.
    if unsafe { ioctl_with_ref(&socket, libc::SIOCSIFFLAGS as _, &request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ifreq(ifname: [libc::c_char; libc::IFNAMSIZ]) -> libc::ifreq {
    // SAFETY: `ifreq` is plain data (a name and a union of integers, addresses and a pointer
    // that stays unused); all zeroes is a valid value of it.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    request.ifr_name = ifname;
    request
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::VolatileSlice;

    #[test]
    fn names_the_kernel_cannot_take_are_refused_before_any_syscall() {
        for bad in ["", "a-name-far-too-long", "nul\0inside"] {
            let err = Tap::open(bad).expect_err("a bad name");
            assert!(err.to_string().contains("a tap name has 1 to 15 characters"), "{err}");
        }
    }

    #[test]
    fn the_name_is_copied_with_its_terminating_nul() {
        let name = interface_name("tap0").expect("a good name");
        assert_eq!(&name[..5], &[b't' as libc::c_char, b'a' as _, b'p' as _, b'0' as _, 0]);
    }

    #[test]
    fn attach_errors_tell_the_user_what_to_do() {
        let eperm = || io::Error::from_raw_os_error(libc::EPERM);
        let explain = |e, existed| explain_attach_error(e, "t0", existed, false).to_string();
        assert!(explain(eperm(), false).contains("ip tuntap add t0 mode tap user $USER"));
        assert!(explain(eperm(), true).contains("belongs to another user"));
        assert!(explain(io::Error::from_raw_os_error(libc::EBUSY), true).contains("already in use"));
        assert!(explain(io::Error::from_raw_os_error(libc::EINVAL), true).contains("not a single-queue tap"));
        let multi = explain_attach_error(io::Error::from_raw_os_error(libc::EINVAL), "t0", true, true).to_string();
        assert!(multi.contains("ip tuntap add t0 mode tap multi_queue"), "{multi}");
    }

    #[test]
    fn the_socket_stand_in_keeps_frame_boundaries() {
        let (tap, host) = Tap::socket_pair().expect("socketpair");
        let host = File::from(host);
        let mut frame = [7u8; 20];
        let mut out = [0u8; 64];
        let mut iovecs = IoVecs::default();
        iovecs.push(VolatileSlice::from(&mut frame[..]));
        assert_eq!(tap.write_frame(&iovecs).expect("write"), 20);
        assert_eq!(io::Read::read(&mut &host, &mut out).expect("read"), 20);
        let mut into = IoVecs::default();
        into.push(VolatileSlice::from(&mut out[..]));
        assert_eq!(tap.read_frame(&into).map_err(|e| e.kind()), Err(io::ErrorKind::WouldBlock));
        assert!(tap.set_offloads(libc::TUN_F_CSUM).is_ok(), "the stand-in has no offloads to set");
    }
}
