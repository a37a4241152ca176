//! The request: what the guest's init is to run, written by `lguest exec` into the initramfs
//! as `/lguest-exec/request.json` and read back by the init ([`super::guest`]) inside the VM.
//!
//! The init trusts nothing it reads: the file is outside bytes to it (a guest kernel could
//! have been handed any initramfs), so [`Request::decode`] bounds the size, parses with serde
//! and checks every field before anything is mounted or run.

use serde::{Deserialize, Serialize};

/// Where the request is in the initramfs.
pub const REQUEST_PATH: &str = "/lguest-exec/request.json";
/// Where the kernel modules are in the initramfs, one file per module.
pub const MODULES_DIR: &str = "/lguest-exec/modules";
/// The largest request we read: arguments and environment of a real command line fit in far
/// less (the host's own `ARG_MAX` is 2 MiB, for both).
pub const MAX_REQUEST: usize = 4 << 20;
/// The vsock ports on the host (CID 2) the init connects to.
pub const PORT_CONTROL: u32 = 5200;
pub const PORT_STDIN: u32 = 5201;
pub const PORT_STDOUT: u32 = 5202;
pub const PORT_STDERR: u32 = 5203;
/// With a terminal: one stream carries the pty both ways.
pub const PORT_TTY: u32 = 5204;

/// What the guest's init runs, and in what surroundings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// CMD and its arguments.
    pub argv: Vec<String>,
    /// CMD's whole environment, in order.
    pub env: Vec<(String, String)>,
    /// CMD's working directory (absolute).
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    /// The supplementary groups.
    pub groups: Vec<u32>,
    /// The virtio-fs shares to mount: the first is the root (read-only, under an overlay),
    /// the others at their paths, in order.
    pub mounts: Vec<Mount>,
    /// The module files in [`MODULES_DIR`], in load order.
    pub modules: Vec<String>,
    /// A terminal of this size, or plain pipes.
    pub tty: Option<WinSize>,
    /// `--net user`: what `eth0` gets (passt's offer).
    #[serde(default)]
    pub net: Option<super::net::NetSetup>,
}

/// One virtio-fs share and where the guest mounts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub tag: String,
    pub path: String,
    pub readonly: bool,
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// Why the init refuses a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadRequest {
    #[error("the request is {0} bytes, more than {MAX_REQUEST}")]
    TooBig(usize),
    #[error("the request is not valid JSON of the expected shape: {0}")]
    Shape(String),
    #[error("the request names no command")]
    NoCommand,
    #[error("the request has a NUL byte in {0}")]
    Nul(&'static str),
    #[error("the request's {what} '{path}' is not an absolute path without '..'")]
    Path { what: &'static str, path: String },
    #[error("the request's environment has a name '{0}' that is empty or holds '='")]
    EnvName(String),
    #[error("the request's module file name '{0}' is not a plain file name")]
    ModuleName(String),
    #[error("the request has no root mount")]
    NoRoot,
    #[error("the request's network prefix /{0} is longer than 32")]
    Prefix(u8),
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks a request read from the initramfs.
    pub fn decode(bytes: &[u8]) -> Result<Request, BadRequest> {
        if bytes.len() > MAX_REQUEST {
            return Err(BadRequest::TooBig(bytes.len()));
        }
        let request: Request = serde_json::from_slice(bytes).map_err(|e| BadRequest::Shape(e.to_string()))?;
        request.check()?;
        Ok(request)
    }

    fn check(&self) -> Result<(), BadRequest> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(BadRequest::NoCommand);
        }
        no_nul(self.argv.iter().map(String::as_str), "the command")?;
        no_nul(self.env.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()]), "the environment")?;
        if let Some((name, _)) = self.env.iter().find(|(k, _)| k.is_empty() || k.contains('=')) {
            return Err(BadRequest::EnvName(name.clone()));
        }
        check_path(&self.cwd, "working directory")?;
        let root = self.mounts.first().ok_or(BadRequest::NoRoot)?;
        if root.path != "/" {
            return Err(BadRequest::NoRoot);
        }
        for mount in &self.mounts {
            check_path(&mount.path, "mount point")?;
            no_nul(std::iter::once(mount.tag.as_str()), "a share's tag")?;
        }
        if let Some(net) = self.net.filter(|net| net.prefix > 32) {
            return Err(BadRequest::Prefix(net.prefix));
        }
        match self.modules.iter().find(|m| !is_plain_name(m)) {
            Some(bad) => Err(BadRequest::ModuleName(bad.clone())),
            None => Ok(()),
        }
    }
}

fn no_nul<'a>(mut texts: impl Iterator<Item = &'a str>, what: &'static str) -> Result<(), BadRequest> {
    match texts.any(|t| t.contains('\0')) {
        true => Err(BadRequest::Nul(what)),
        false => Ok(()),
    }
}

/// Absolute, without `..` (a mount point is made with its parents: `..` could leave the root).
fn check_path(path: &str, what: &'static str) -> Result<(), BadRequest> {
    let fine = path.starts_with('/') && !path.contains('\0') && !path.split('/').any(|part| part == "..");
    match fine {
        true => Ok(()),
        false => Err(BadRequest::Path { what, path: path.to_string() }),
    }
}

/// A name that stays in its directory: no `/`, not `.` or `..`, not empty, no NUL.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// A request as `lguest exec` writes one, for the tests here and elsewhere.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub(crate) fn sample() -> Request {
        Request {
            argv: vec!["make".into(), "-j2".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into()), ("HOME".into(), "/home/u".into())],
            cwd: "/home/u/src".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000, 27],
            mounts: vec![
                Mount { tag: "lguest-root".into(), path: "/".into(), readonly: true },
                Mount { tag: "lguest-cwd".into(), path: "/home/u/src".into(), readonly: false },
            ],
            modules: vec!["00-virtio_ring.ko".into(), "01-fuse.ko.xz".into()],
            tty: Some(WinSize { rows: 24, cols: 80 }),
            net: Some(crate::exec::net::NetSetup {
                address: std::net::Ipv4Addr::new(169, 254, 2, 5),
                prefix: 16,
                gateway: std::net::Ipv4Addr::new(169, 254, 2, 1),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::sample;
    use super::*;

    #[test]
    fn a_request_survives_encoding() {
        assert_eq!(Request::decode(&sample().encode()), Ok(sample()));
    }

    #[test]
    fn hostile_requests_are_refused_with_a_reason() {
        let refused = |change: fn(&mut Request)| {
            let mut request = sample();
            change(&mut request);
            Request::decode(&request.encode()).expect_err("must be refused")
        };
        assert_eq!(refused(|r| r.argv.clear()), BadRequest::NoCommand);
        assert_eq!(refused(|r| r.argv[0].clear()), BadRequest::NoCommand);
        assert_eq!(refused(|r| r.argv[1] = "a\0b".into()), BadRequest::Nul("the command"));
        assert_eq!(refused(|r| r.env[0].1 = "\0".into()), BadRequest::Nul("the environment"));
        assert_eq!(refused(|r| r.env[0].0 = "A=B".into()), BadRequest::EnvName("A=B".into()));
        assert!(matches!(refused(|r| r.cwd = "relative".into()), BadRequest::Path { .. }));
        assert!(matches!(refused(|r| r.mounts[1].path = "/a/../../etc".into()), BadRequest::Path { .. }));
        assert_eq!(refused(|r| r.mounts[0].path = "/home".into()), BadRequest::NoRoot);
        assert_eq!(refused(|r| r.mounts.clear()), BadRequest::NoRoot);
        assert_eq!(refused(|r| r.modules[0] = "../../init".into()), BadRequest::ModuleName("../../init".into()));
        assert_eq!(refused(|r| r.modules[0] = "..".into()), BadRequest::ModuleName("..".into()));
        assert_eq!(refused(|r| r.net = r.net.map(|net| crate::exec::net::NetSetup { prefix: 33, ..net })), BadRequest::Prefix(33));
    }

    #[test]
    fn bytes_that_are_not_a_request_are_refused() {
        for junk in [&b""[..], b"{", b"[]", b"null", b"{\"argv\":1}", &[0xff, 0xfe, 0x00]] {
            assert!(matches!(Request::decode(junk), Err(BadRequest::Shape(_))), "{junk:?}");
        }
        assert_eq!(Request::decode(&vec![b' '; MAX_REQUEST + 1]), Err(BadRequest::TooBig(MAX_REQUEST + 1)));
        let deep = "[".repeat(100_000);
        assert!(Request::decode(deep.as_bytes()).is_err(), "deep nesting is an error, not a stack overflow");
    }
}
