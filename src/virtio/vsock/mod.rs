//! virtio-vsock (device type 19): sockets between the guest and host programs, with
//! Firecracker's "hybrid" host side: the host end is a Unix socket, no kernel module needed.
//!
//! - [`packet`]: the 44-byte header every packet starts with, and its checks.
//! - [`connection`]: one stream and its credit-based flow control.
//! - [`muxer`]: all streams of one device, the Unix listener host programs connect to, and
//!   the `CONNECT <port>` / `OK <port>` handshake.

pub mod connection;
pub mod muxer;
pub mod packet;
