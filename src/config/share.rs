//! `--share HOSTDIR:TAG[,readonly]`: the shared directories a VM serves over virtio-fs
//! ([`crate::virtio::fs`]), checked once, here: the directory exists and is one (resolved to
//! an absolute path without symlinks, so the device opens what the user meant), each tag fits
//! the device's config space and names one share.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// One `--share`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShareConfig {
    /// The shared directory, absolute and with symlinks resolved.
    pub dir: PathBuf,
    /// What the guest mounts: 1 to [`MAX_SHARE_TAG`] bytes.
    pub tag: String,
    pub readonly: bool,
}

/// The longest tag: virtio-fs's config space holds 36 bytes.
pub const MAX_SHARE_TAG: usize = 36;

/// Every `--share`, with their tags checked against each other.
pub(crate) fn parse_shares(values: &[String]) -> Result<Vec<ShareConfig>> {
    let mut shares: Vec<ShareConfig> = Vec::new();
    for value in values {
        let share = parse_share(value)?;
        if shares.iter().any(|earlier| earlier.tag == share.tag) {
            let why = format!("the tag '{}' is already used by another --share: give each a tag of its own", share.tag);
            return Err(Error::BadFlag { flag: "--share", value: value.clone(), why });
        }
        shares.push(share);
    }
    Ok(shares)
}

/// One `--share HOSTDIR:TAG[,readonly]`. The directory may contain `:` (the tag is after the
/// last one) but not end in `,readonly`.
pub fn parse_share(value: &str) -> Result<ShareConfig> {
    let bad = |why: String| Error::BadFlag { flag: "--share", value: value.to_string(), why };
    let (rest, readonly) = match value.strip_suffix(",readonly") {
        Some(rest) => (rest, true),
        None => (value, false),
    };
    let (dir, tag) = rest.rsplit_once(':').ok_or_else(|| bad("expected HOSTDIR:TAG[,readonly]".into()))?;
    if tag.is_empty() || tag.len() > MAX_SHARE_TAG || tag.contains(['\0', ',']) {
        return Err(bad(format!("the tag must be 1 to {MAX_SHARE_TAG} bytes, without ',' (readonly is the only option)")));
    }
    let dir = std::fs::canonicalize(dir).map_err(|e| bad(format!("cannot use '{dir}': {e}")))?;
    if !dir.is_dir() {
        return Err(bad(format!("'{}' is not a directory", dir.display())));
    }
    Ok(ShareConfig { dir, tag: tag.to_string(), readonly })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{run_args, FILE};
    use crate::config::VmConfig;

    #[test]
    fn shares_take_a_directory_a_tag_and_readonly() {
        let here = std::fs::canonicalize("src").expect("src");
        assert_eq!(parse_share("src:code").ok(), Some(ShareConfig { dir: here.clone(), tag: "code".into(), readonly: false }));
        assert_eq!(parse_share("src:code,readonly").ok(), Some(ShareConfig { dir: here, tag: "code".into(), readonly: true }));
        let long_tag = format!("src:{}", "t".repeat(MAX_SHARE_TAG + 1));
        for bad in ["", "src", "src:", "no/such/dir:t", "Cargo.toml:t", "src:t,ro", long_tag.as_str()] {
            assert!(matches!(parse_share(bad), Err(Error::BadFlag { flag: "--share", .. })), "{bad}");
        }
        let config = VmConfig::from_args(run_args(&["run", "--kernel", FILE, "--share", "src:a", "--share", "docs:b"])).expect("valid");
        assert_eq!(config.pci_devices(), 2, "each share takes a PCI slot");
        let twice = VmConfig::from_args(run_args(&["run", "--kernel", FILE, "--share", "src:a", "--share", "docs:a"]));
        assert!(matches!(twice, Err(Error::BadFlag { flag: "--share", .. })), "one tag per share");
    }
}
