//! The snapshot file: a header that says what it is, then the [`Snapshot`] in postcard.
//!
//! | bytes | what                                                        |
//! |-------|-------------------------------------------------------------|
//! | 8     | magic, `LGSNAPSH`                                           |
//! | 4     | format version, little-endian ([`VERSION`])                 |
//! | 8     | body length, little-endian                                  |
//! | 4     | CRC-32 (IEEE) of the body, little-endian                    |
//! | ...   | body: the [`Snapshot`], postcard-encoded                    |
//!
//! postcard because its wire format is specified and stable (1.0), compact (variable-length
//! integers; a vCPU's state is mostly the KVM structures' own bytes), and it is serde, so the
//! state types are all there is to the format. The version is bumped whenever a state type
//! changes shape: postcard is not self-describing, so an old file is refused by its version
//! rather than misread. Nothing in a file is trusted: every refusal is a [`FileError`], and
//! what decodes is checked again as it is restored.

use super::state::Snapshot;

pub const MAGIC: &[u8; 8] = b"LGSNAPSH";
/// The format this lguest writes and reads.
pub const VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// Far more than any snapshot's state (254 vCPUs of about 8 KiB each, 31 devices): a larger
/// file is not one of ours, and is refused before it is read into memory.
pub const MAX_FILE_LEN: u64 = 64 << 20;

/// Why a snapshot file can't be used. Each says what the file is, so the user can find the
/// right one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FileError {
    #[error("it is not an lguest snapshot (no LGSNAPSH header)")]
    NotASnapshot,
    #[error("it is a version {found} snapshot and this lguest reads version {VERSION}; take the snapshot again with this lguest")]
    WrongVersion { found: u32 },
    #[error("it is truncated: {missing} bytes of its body are missing")]
    Truncated { missing: u64 },
    #[error("it has {extra} bytes after its body")]
    TrailingBytes { extra: u64 },
    #[error("it is corrupt: its checksum does not match")]
    Corrupt,
    #[error("it is larger than any snapshot ({MAX_FILE_LEN} bytes)")]
    TooLarge,
    #[error("its body does not decode: {0}")]
    Undecodable(String),
}

/// The file's bytes for `snapshot`.
pub fn encode(snapshot: &Snapshot) -> Result<Vec<u8>, FileError> {
    let body = postcard::to_stdvec(snapshot).map_err(|e| FileError::Undecodable(e.to_string()))?;
    Ok(frame(&body))
}

/// `body` with this version's header in front: what [`encode`] writes, and how tests and the
/// fuzz target make files whose checksum is right around a body of their own.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    bytes.extend_from_slice(body);
    bytes
}

/// The snapshot in `bytes`, if they are a whole, intact snapshot of this version.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, FileError> {
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(FileError::TooLarge);
    }
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(FileError::NotASnapshot);
    }
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Err(FileError::Truncated { missing: (HEADER_LEN - bytes.len()) as u64 });
    };
    let version = u32::from_le_bytes(field(header, 8));
    if version != VERSION {
        return Err(FileError::WrongVersion { found: version });
    }
    let body_len = u64::from_le_bytes(field(header, 12));
    let crc = u32::from_le_bytes(field(header, 20));
    let body = &bytes[HEADER_LEN..];
    let have = body.len() as u64;
    if have < body_len {
        return Err(FileError::Truncated { missing: body_len - have });
    }
    if have > body_len {
        return Err(FileError::TrailingBytes { extra: have - body_len });
    }
    if crc32fast::hash(body) != crc {
        return Err(FileError::Corrupt);
    }
    match postcard::take_from_bytes(body) {
        Ok((snapshot, [])) => Ok(snapshot),
        Ok((_, rest)) => Err(FileError::Undecodable(format!("{} bytes are left over", rest.len()))),
        Err(e) => Err(FileError::Undecodable(e.to_string())),
    }
}

/// The `N` bytes of `header` at `at` (the header's length is checked by the caller).
fn field<const N: usize>(header: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&header[at..at + N]);
    out
}
