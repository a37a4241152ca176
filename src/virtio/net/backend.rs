//! What is at the other end of a network card: a host tap, or passt (`--net user`).
//!
//! Both speak frames with the 12-byte virtio-net header in front, as the worker does: the
//! tap because we asked it for `IFF_VNET_HDR`, passt's link ([`PasstLink`]) because it adds
//! and strips the header itself. What differs is what the card may offer (offloads only with a
//! tap), and whether the link can go down (only passt's: when passt dies).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use super::tap::Tap;
use crate::passt::link::PasstLink;
use crate::virtio::iovec::IoVecs;

#[derive(Clone)]
pub enum Backend {
    Tap(Arc<Tap>),
    Passt(Arc<PasstLink>),
}

impl Backend {
    /// What log lines call it.
    pub fn name(&self) -> String {
        match self {
            Backend::Tap(tap) => format!("tap {}", tap.name()),
            Backend::Passt(link) => link.name(),
        }
    }

    pub fn read_frame(&self, iovecs: &IoVecs<'_>) -> io::Result<usize> {
        match self {
            Backend::Tap(tap) => tap.read_frame(iovecs),
            Backend::Passt(link) => link.read_frame(iovecs),
        }
    }

    /// The fd that becomes readable with frames for the guest.
    pub fn read_fd(&self) -> RawFd {
        match self {
            Backend::Tap(tap) => tap.as_raw_fd(),
            Backend::Passt(link) => link.read_fd(),
        }
    }

    /// Whether the guest's link is up: a tap's always is (nothing it says could tell us more).
    pub fn is_up(&self) -> bool {
        match self {
            Backend::Tap(_) => true,
            Backend::Passt(link) => link.is_up(),
        }
    }

    /// Whether a frame can be taken from the transmit queue now: not while passt's socket and
    /// our buffer are full. A link that is down takes (and drops) them all, so that the
    /// guest's queue drains.
    pub fn can_send(&self) -> bool {
        match self {
            Backend::Tap(_) => true,
            Backend::Passt(link) if !link.is_up() => true,
            Backend::Passt(link) => link.can_send().unwrap_or_else(|e| {
                link.take_down(&e);
                true
            }),
        }
    }

    /// Whether a whole frame already waits on our side (passt's stream buffer): the fd being
    /// quiet doesn't mean there is nothing to deliver.
    pub fn has_frame(&self) -> bool {
        matches!(self, Backend::Passt(link) if link.has_frame())
    }
}
