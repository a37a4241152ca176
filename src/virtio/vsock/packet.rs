//! The header every virtio-vsock packet starts with (virtio spec 1.2, 5.10.6), and what a
//! header from the guest must say before we act on it.
//!
//! The header is 44 little-endian bytes; a packet's payload (for `RW` only) follows it in the
//! same chain. Everything in a header the guest wrote is a claim to check: the source must be
//! the guest's own CID, the destination the host, the type a stream, the length no more than
//! [`MAX_PAYLOAD`] and no more than the chain holds. [`Header::check_from_guest`] says what is
//! wrong; the device answers such a packet with RST (or drops it when even that makes no sense).

/// The host's CID, where the guest's connections to "the host" go.
pub const HOST_CID: u64 = 2;
/// Header length in bytes.
pub const HEADER_LEN: usize = 44;
/// The largest payload one packet may carry: Linux's driver sends at most 64 KiB.
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only type we offer (no SEQPACKET feature).
pub const TYPE_STREAM: u16 = 1;

/// Shutdown flags: the sender will receive no more, or send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// The operations (`VIRTIO_VSOCK_OP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl Op {
    fn from_u16(value: u16) -> Option<Op> {
        Some(match value {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// A packet header, as plain fields. `op` stays a number until checked: the guest may send any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// What is wrong with a header from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadPacket {
    #[error("the packet claims to come from CID {0}, not the guest's")]
    WrongSource(u64),
    #[error("the packet is for CID {0}; only the host (2) is reachable")]
    WrongDestination(u64),
    #[error("socket type {0} is not a stream")]
    NotAStream(u16),
    #[error("unknown operation {0}")]
    UnknownOp(u16),
    #[error("a payload of {0} bytes is larger than 64 KiB")]
    TooLong(u32),
    #[error("a payload of {claimed} bytes in a chain that holds {held}")]
    LengthMismatch { claimed: u32, held: usize },
    #[error("a payload on an operation that has none")]
    UnexpectedPayload,
}

impl BadPacket {
    /// Whether the guest should hear RST for it: only when it names a connection it could
    /// mean (ours to refuse); a packet from a forged source is dropped without a word.
    pub fn deserves_rst(&self) -> bool {
        !matches!(self, BadPacket::WrongSource(_) | BadPacket::WrongDestination(_))
    }
}

impl Header {
    /// Reads a header; any 44 bytes make one (the checks come after).
    pub fn from_bytes(bytes: &[u8; HEADER_LEN]) -> Header {
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
        let u16_at = |at: usize| u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap_or_default());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.len.to_le_bytes());
        bytes[28..30].copy_from_slice(&self.kind.to_le_bytes());
        bytes[30..32].copy_from_slice(&self.op.to_le_bytes());
        bytes[32..36].copy_from_slice(&self.flags.to_le_bytes());
        bytes[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        bytes
    }

    /// Checks a header the guest (CID `guest_cid`) sent in a chain whose readable part after
    /// the header holds `payload_held` bytes; returns its operation.
    pub fn check_from_guest(&self, guest_cid: u64, payload_held: usize) -> Result<Op, BadPacket> {
        if self.src_cid != guest_cid {
            return Err(BadPacket::WrongSource(self.src_cid));
        }
        if self.dst_cid != HOST_CID {
            return Err(BadPacket::WrongDestination(self.dst_cid));
        }
        if self.kind != TYPE_STREAM {
            return Err(BadPacket::NotAStream(self.kind));
        }
        let op = Op::from_u16(self.op).ok_or(BadPacket::UnknownOp(self.op))?;
        if self.len > MAX_PAYLOAD {
            return Err(BadPacket::TooLong(self.len));
        }
        if self.len as usize > payload_held {
            return Err(BadPacket::LengthMismatch { claimed: self.len, held: payload_held });
        }
        if self.len > 0 && op != Op::Rw {
            return Err(BadPacket::UnexpectedPayload);
        }
        Ok(op)
    }

    /// The header of a packet from the host's `host_port` to the guest's `guest_port`.
    pub fn to_guest(guest_cid: u64, host_port: u32, guest_port: u32, op: Op) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: host_port,
            dst_port: guest_port,
            kind: TYPE_STREAM,
            op: op as u16,
            ..Header::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_guest(op: Op) -> Header {
        Header { src_cid: 3, dst_cid: HOST_CID, src_port: 1000, dst_port: 52, kind: TYPE_STREAM, op: op as u16, ..Header::default() }
    }

    #[test]
    fn a_header_survives_the_round_trip_through_bytes() {
        let header = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xdead_beef,
            dst_port: 7,
            len: 65536,
            kind: 1,
            op: 5,
            flags: 3,
            buf_alloc: 262_144,
            fwd_cnt: 99,
        };
        let bytes = header.to_bytes();
        assert_eq!(bytes[0], 0x08, "little-endian");
        assert_eq!(bytes[30..32], [5, 0]);
        assert_eq!(Header::from_bytes(&bytes), header);
    }

    #[test]
    fn good_packets_pass_with_their_operation() {
        assert_eq!(from_guest(Op::Request).check_from_guest(3, 0), Ok(Op::Request));
        let rw = Header { len: 100, ..from_guest(Op::Rw) };
        assert_eq!(rw.check_from_guest(3, 100), Ok(Op::Rw));
        assert_eq!(rw.check_from_guest(3, 4096), Ok(Op::Rw), "a chain may hold more than the packet");
    }

    #[test]
    fn every_lie_in_a_header_is_named() {
        let rw = from_guest(Op::Rw);
        assert_eq!(Header { src_cid: 4, ..rw }.check_from_guest(3, 0), Err(BadPacket::WrongSource(4)));
        assert_eq!(Header { dst_cid: 1, ..rw }.check_from_guest(3, 0), Err(BadPacket::WrongDestination(1)));
        assert_eq!(Header { kind: 2, ..rw }.check_from_guest(3, 0), Err(BadPacket::NotAStream(2)));
        assert_eq!(Header { op: 0, ..rw }.check_from_guest(3, 0), Err(BadPacket::UnknownOp(0)));
        assert_eq!(Header { op: 8, ..rw }.check_from_guest(3, 0), Err(BadPacket::UnknownOp(8)));
        assert_eq!(Header { len: u32::MAX, ..rw }.check_from_guest(3, usize::MAX), Err(BadPacket::TooLong(u32::MAX)));
        assert_eq!(Header { len: 10, ..rw }.check_from_guest(3, 9), Err(BadPacket::LengthMismatch { claimed: 10, held: 9 }));
        let request = Header { len: 1, ..from_guest(Op::Request) };
        assert_eq!(request.check_from_guest(3, 1), Err(BadPacket::UnexpectedPayload));
        assert!(!BadPacket::WrongSource(4).deserves_rst());
        assert!(BadPacket::UnknownOp(9).deserves_rst());
    }
}
