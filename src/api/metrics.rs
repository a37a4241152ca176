//! Metrics: one JSON object per line, written to `--metrics-path` or `PUT /metrics`'s file on
//! `FlushMetrics` and every minute, as Firecracker writes them.
//!
//! Counters are per interval (reset after each line, like Firecracker's), under Firecracker's
//! names where they mean the same: `get_api_requests.instance_info_count`,
//! `put_api_requests.drive_fails`, ... The devices' counters come in the same line, per device
//! and summed over devices of a kind (`block_rootfs`, `block`, `net_eth0`, `net`), from
//! [`crate::virtio::metrics`].
//!
//! The file is usually a named pipe a client reads. It is opened non-blocking, as Firecracker
//! does, so that a client that stops reading can't stop the API thread: a line that doesn't
//! fit in the pipe is lost and the flush reports it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{SystemTime, UNIX_EPOCH};

use super::request::Request;
use super::ApiError;

/// Which counter a call goes to: its group and the name its `_count` and `_fails` share.
pub type Names = (&'static str, &'static str);

/// Every counter, so that each line has them all (zeros included), as Firecracker's do.
const ALL: [Names; 17] = [
    ("get_api_requests", "instance_info"),
    ("get_api_requests", "machine_cfg"),
    ("get_api_requests", "vmm_version"),
    ("get_api_requests", "vm_config"),
    ("put_api_requests", "actions"),
    ("put_api_requests", "boot_source"),
    ("put_api_requests", "drive"),
    ("put_api_requests", "logger"),
    ("put_api_requests", "machine_cfg"),
    ("put_api_requests", "metrics"),
    ("put_api_requests", "network"),
    ("put_api_requests", "entropy"),
    ("put_api_requests", "serial"),
    ("patch_api_requests", "drive"),
    ("patch_api_requests", "network"),
    ("patch_api_requests", "machine_cfg"),
    ("put_api_requests", "vsock"),
];

/// The counter of `request`.
pub fn names(request: &Request) -> Names {
    match request {
        Request::GetInstanceInfo => ALL[0],
        Request::GetMachineConfig => ALL[1],
        Request::GetVersion => ALL[2],
        Request::GetVmConfig => ALL[3],
        Request::PutAction(_) => ALL[4],
        Request::PutBootSource(_) => ALL[5],
        Request::PutDrive(..) => ALL[6],
        Request::PutLogger(_) => ALL[7],
        Request::PutMachineConfig(_) => ALL[8],
        Request::PutMetrics(_) => ALL[9],
        Request::PutNet(..) => ALL[10],
        Request::PutEntropy(_) => ALL[11],
        Request::PutSerial(_) => ALL[12],
        Request::PatchDrive(..) => ALL[13],
        Request::PatchNet(..) => ALL[14],
        Request::PatchMachineConfig(_) => ALL[15],
        Request::PutVsock(_) => ALL[16],
        Request::PatchVm(_) => ("patch_api_requests", "vm"),
        Request::PutSnapshotCreate(_) => ("put_api_requests", "snapshot_create"),
        Request::PutSnapshotLoad(_) => ("put_api_requests", "snapshot_load"),
    }
}

#[derive(Default)]
pub struct Metrics {
    file: Option<File>,
    counts: BTreeMap<Names, (u64, u64)>,
}

impl Metrics {
    /// Counts one call.
    pub fn count(&mut self, names: Names, ok: bool) {
        let (count, fails) = self.counts.entry(names).or_default();
        *count += 1;
        if !ok {
            *fails += 1;
        }
    }

    /// Opens the metrics file; once per process, as in Firecracker.
    pub fn open(&mut self, path: &str) -> Result<(), ApiError> {
        if self.file.is_some() {
            return Err(ApiError::MetricsAlreadySet);
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| ApiError::Open { what: "the metrics file", path: path.into(), source })?;
        self.file = Some(file);
        Ok(())
    }

    pub fn is_open(&self) -> bool {
        self.file.is_some()
    }

    /// Writes one line with the counts since the last and the `devices`' sections, and
    /// starts a new interval.
    pub fn flush(&mut self, devices: serde_json::Map<String, serde_json::Value>) -> Result<(), ApiError> {
        let file = self.file.as_mut().ok_or(ApiError::NoMetrics)?;
        let mut snapshot = snapshot(&self.counts);
        snapshot.extend(devices);
        let mut line = serde_json::to_vec(&snapshot)?;
        line.push(b'\n');
        self.counts.clear();
        file.write_all(&line).map_err(ApiError::WriteMetrics)
    }
}

fn snapshot(counts: &BTreeMap<Names, (u64, u64)>) -> serde_json::Map<String, serde_json::Value> {
    let millis = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let mut line = serde_json::Map::new();
    line.insert("utc_timestamp_ms".into(), serde_json::Value::from(u64::try_from(millis).unwrap_or(u64::MAX)));
    let all = ALL.iter().copied().chain([("patch_api_requests", "vm")]);
    for names @ (group, name) in all {
        let (count, fails) = counts.get(&names).copied().unwrap_or_default();
        let group = line.entry(group).or_insert_with(|| serde_json::Value::Object(Default::default()));
        if let serde_json::Value::Object(group) = group {
            group.insert(format!("{name}_count"), count.into());
            group.insert(format!("{name}_fails"), fails.into());
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_every_counter_and_the_interval_resets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m");
        let mut metrics = Metrics::default();
        assert!(matches!(metrics.flush(Default::default()), Err(ApiError::NoMetrics)));
        metrics.open(path.to_str().expect("utf-8")).expect("open");
        metrics.count(("put_api_requests", "drive"), false);
        metrics.flush(Default::default()).expect("flush");
        metrics.flush(Default::default()).expect("flush");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["put_api_requests"]["drive_fails"], 1);
        assert_eq!(lines[1]["put_api_requests"]["drive_fails"], 0);
        assert_eq!(lines[1]["patch_api_requests"]["vm_count"], 0);
    }

    #[test]
    fn an_unopenable_path_is_named() {
        let error = Metrics::default().open("/no/such/dir/m").expect_err("refused");
        assert!(error.to_string().contains("/no/such/dir/m"), "{error}");
    }
}
