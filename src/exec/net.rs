//! `lguest exec --net user`: the guest's `eth0` set up as passt's DHCP would set it, without
//! a DHCP client in the guest. passt gives the guest the address (and prefix) of the host's
//! default-route interface and the host's default gateway ([`crate::passt`]), so lguest reads
//! them here, puts them in the request, and the guest's init applies them (and the default
//! route) before CMD runs. DNS is the host's own `/etc/resolv.conf`, seen through the root
//! share: a resolver on a routable address answers through passt as any UDP peer does.
//!
//! `/proc/net/route` is read as untrusted text: a line of another shape is skipped.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

/// What the init gives `eth0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSetup {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

/// The interface and gateway of the IPv4 default route in a `/proc/net/route` text.
pub fn default_route(routes: &str) -> Option<(String, Ipv4Addr)> {
    const RTF_UP_GATEWAY: u32 = 0x1 | 0x2;
    routes.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (iface, destination, gateway, flags) = (fields.first()?, fields.get(1)?, fields.get(2)?, fields.get(3)?);
        let hex = |text: &str| u32::from_str_radix(text, 16).ok();
        let flags = hex(flags)?;
        if hex(destination)? != 0 || flags & RTF_UP_GATEWAY != RTF_UP_GATEWAY {
            return None;
        }
        // The kernel prints the address in memory order, which is network order.
        Some((iface.to_string(), Ipv4Addr::from(hex(gateway)?.to_le_bytes())))
    })
}

/// What passt will offer the guest: this host's default route's interface address and
/// gateway (None when the host has no IPv4 default route: passt then offers nothing either).
pub fn host_offer() -> Option<NetSetup> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    let (iface, gateway) = default_route(&routes)?;
    let (address, prefix) = interface_ipv4(&iface)?;
    Some(NetSetup { address, prefix, gateway })
}

/// The first IPv4 address of the interface `name`, with its prefix length.
fn interface_ipv4(name: &str) -> Option<(Ipv4Addr, u8)> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut entry = list;
    while !entry.is_null() && found.is_none() {
        // SAFETY: `entry` is a node of the list getifaddrs made, alive until freeifaddrs.
        let node = unsafe { &*entry };
        entry = node.ifa_next;
        // SAFETY: ifa_name is a NUL-terminated string of the node.
        let node_name = unsafe { std::ffi::CStr::from_ptr(node.ifa_name) };
        if node_name.to_bytes() != name.as_bytes() || node.ifa_addr.is_null() || node.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr whose family we check before reading it whole.
        if i32::from(unsafe { (*node.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address and its netmask are sockaddr_in.
        let (address, mask) = unsafe { (&*node.ifa_addr.cast::<libc::sockaddr_in>(), &*node.ifa_netmask.cast::<libc::sockaddr_in>()) };
        let prefix = u32::from_be(mask.sin_addr.s_addr).count_ones() as u8;
        found = Some((Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)), prefix));
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// A socket to make interface ioctls on, and an ifreq naming `name`.
fn interface_request(name: &str) -> io::Result<(OwnedFd, libc::ifreq)> {
    // SAFETY: socket() takes no pointers; a non-negative result is a new fd we then own.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is new and owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zero is a valid start.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *slot = byte as libc::c_char;
    }
    Ok((socket, request))
}

/// One interface ioctl that reads `request`.
fn interface_ioctl(socket: &OwnedFd, operation: libc::c_ulong, request: &libc::ifreq) -> io::Result<()> {
    // SAFETY: the SIOCSIF* ioctls read one ifreq from a valid pointer.
    match unsafe { libc::ioctl(socket.as_raw_fd(), operation, request) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// In the guest: sets the interface `name` up.
pub fn bring_up(name: &str) -> io::Result<()> {
    let (socket, mut request) = interface_request(name)?;
    request.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    interface_ioctl(&socket, libc::SIOCSIFFLAGS, &request)
}

/// `address` as the sockaddr an ifreq or a route holds.
fn sockaddr(address: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(address).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; every bit pattern is valid for both.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

/// In the guest: `name` gets `setup`'s address and prefix, comes up, and the default route
/// goes through `setup`'s gateway.
pub fn configure(name: &str, setup: NetSetup) -> io::Result<()> {
    let (socket, mut request) = interface_request(name)?;
    request.ifr_ifru.ifru_addr = sockaddr(setup.address);
    interface_ioctl(&socket, libc::SIOCSIFADDR, &request)?;
    let mask = u32::MAX.checked_shl(32 - u32::from(setup.prefix.min(32))).unwrap_or(0);
    request.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
    interface_ioctl(&socket, libc::SIOCSIFNETMASK, &request)?;
    bring_up(name)?;
    // SAFETY: rtentry is plain data; zero is a valid start (no device, no metric).
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(setup.gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: SIOCADDRT reads one rtentry from a valid pointer.
    match unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCADDRT, &route) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth1\t0001FEA9\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t00000000\t0101FEA9\t0003\t0\t0\t0\t00000000\t0\t0\t0
";

    #[test]
    fn the_default_route_names_its_interface_and_gateway() {
        assert_eq!(default_route(ROUTES), Some(("eth0".into(), Ipv4Addr::new(169, 254, 1, 1))));
    }

    #[test]
    fn odd_route_tables_have_no_default_route() {
        let no_gateway_flag = ROUTES.replace("\t0003\t", "\t0001\t");
        for text in ["", "Iface\n", "Iface\neth0 00000000 zz 0003\n", "Iface\neth0 00000000\n", no_gateway_flag.as_str()] {
            assert_eq!(default_route(text), None, "{text:?}");
        }
    }

    #[test]
    fn loopback_has_an_ipv4_address_with_its_prefix() {
        assert_eq!(interface_ipv4("lo"), Some((Ipv4Addr::LOCALHOST, 8)));
        assert_eq!(interface_ipv4("no-such-interface"), None);
    }
}
