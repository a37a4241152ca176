//! The bodies of Firecracker's API, as its OpenAPI spec (`firecracker.yaml`) defines them.
//!
//! These are outside bytes: every request body comes from an API client or a `--config-file`.
//! serde reads them, and refuses what the spec does not allow, the way Firecracker does:
//! unknown fields (`deny_unknown_fields`), wrong types, and `null` where the spec says a string
//! or a number (an optional field is either absent or a real value). What a
//! value *means* (does the kernel exist, is 33 vCPUs too many) is checked later, in
//! [`super::plan`], where it can be said in the words of the field.

use serde::de::{DeserializeOwned, Unexpected};
use serde::{Deserialize, Deserializer, Serialize};

/// An optional field that, when present, must hold a real value: `null` is refused, as the
/// spec's types (`string`, `integer`, ...) have no null.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
}

/// serde would also read a struct from an array of its fields in order (`["rootfs", true]` as
/// a drive); the spec has objects only. [`object`] reads a JSON object or refuses.
pub fn object<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, serde_json::Error> {
    if !value.is_object() {
        return Err(serde::de::Error::invalid_type(unexpected(&value), &"a JSON object"));
    }
    serde_json::from_value(value)
}

fn unexpected(value: &serde_json::Value) -> Unexpected<'_> {
    match value {
        serde_json::Value::Null => Unexpected::Unit,
        serde_json::Value::Bool(b) => Unexpected::Bool(*b),
        serde_json::Value::Number(_) => Unexpected::Other("a number"),
        serde_json::Value::String(s) => Unexpected::Str(s),
        serde_json::Value::Array(_) => Unexpected::Seq,
        serde_json::Value::Object(_) => Unexpected::Map,
    }
}

/// [`present`] for a field whose value is an object.
fn present_object<'de, D: Deserializer<'de>, T: DeserializeOwned>(deserializer: D) -> Result<Option<T>, D::Error> {
    let value = serde_json::Value::deserialize(deserializer)?;
    object(value).map(Some).map_err(serde::de::Error::custom)
}

/// A list of objects.
fn objects<'de, D: Deserializer<'de>, T: DeserializeOwned>(deserializer: D) -> Result<Vec<T>, D::Error> {
    let values = Vec::<serde_json::Value>::deserialize(deserializer)?;
    values.into_iter().map(|value| object(value).map_err(serde::de::Error::custom)).collect()
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `huge_pages` in the machine configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum HugePages {
    #[default]
    None,
    #[serde(rename = "2M")]
    Two,
}

/// `PUT /machine-config` (and its answer to GET). `ht_enabled` is the name older clients
/// (Kata among them) still send for `smt`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default, alias = "ht_enabled")]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Firecracker's deprecated CPU templates: only `"None"` is accepted.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
}

impl Default for MachineConfig {
    /// Firecracker's defaults: one vCPU, 128 MiB.
    fn default() -> MachineConfig {
        MachineConfig { vcpu_count: 1, mem_size_mib: 128, smt: false, track_dirty_pages: false, huge_pages: HugePages::None, cpu_template: None }
    }
}

/// `PATCH /machine-config`: any subset of the fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    #[serde(default, deserialize_with = "present")]
    pub vcpu_count: Option<u8>,
    #[serde(default, deserialize_with = "present")]
    pub mem_size_mib: Option<u64>,
    #[serde(default, deserialize_with = "present", alias = "ht_enabled")]
    pub smt: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    pub huge_pages: Option<HugePages>,
    #[serde(default, deserialize_with = "present")]
    pub cpu_template: Option<String>,
}

/// One token bucket of a rate limiter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    pub size: u64,
    pub refill_time: u64,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
}

/// A rate limiter: a bandwidth bucket and an operations bucket, both optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    #[serde(default, deserialize_with = "present_object", skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, deserialize_with = "present_object", skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// A limiter with no bucket limits nothing (clients send `{}` for "no limit").
    pub fn limits_anything(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum CacheType {
    #[default]
    Unsafe,
    Writeback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum IoEngine {
    #[default]
    Sync,
    Async,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default)]
    pub cache_type: CacheType,
    #[serde(default)]
    pub io_engine: IoEngine,
    #[serde(default, deserialize_with = "present_object", skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// A vhost-user-block backend's socket: not supported by lguest.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    #[serde(default, deserialize_with = "present")]
    pub path_on_host: Option<String>,
    #[serde(default, deserialize_with = "present_object")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, deserialize_with = "present_object", skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, deserialize_with = "present_object", skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    #[serde(default, deserialize_with = "present_object")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, deserialize_with = "present_object")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /vsock`: the guest's CID and the Unix socket of Firecracker's hybrid vsock.
/// `vsock_id`, which older clients send, is kept and means nothing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VsockDevice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    pub guest_cid: u64,
    pub uds_path: String,
}

/// `PUT /entropy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    #[serde(default, deserialize_with = "present_object", skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

/// `PUT /actions`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmStateRequest {
    Paused,
    Resumed,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    pub state: VmStateRequest,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    pub snapshot_path: String,
    pub mem_file_path: String,
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

/// `PUT /snapshot/load`: exactly one of `mem_backend` and the older `mem_file_path`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    pub snapshot_path: String,
    #[serde(default)]
    pub mem_file_path: Option<String>,
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    pub backend_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MemoryBackendType {
    File,
    Uffd,
}

/// A restored card on another tap.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// Firecracker's log levels (`PUT /logger`, `--level`). Its older clients use `Warning`,
/// newer ones `Warn`; both are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum LogLevel {
    Off,
    Error,
    #[serde(alias = "Warn")]
    Warning,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The `tracing` filter directive with the same meaning.
    pub fn directive(self) -> &'static str {
        match self {
            LogLevel::Off => "off",
            LogLevel::Error => "error",
            LogLevel::Warning => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: String,
}

/// `PUT /serial`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SerialDevice {
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
}

/// The answer to `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: &'static str,
    pub vmm_version: String,
    pub app_name: &'static str,
    /// Read by clients of the older API (Kata among them).
    pub started: bool,
}

/// The answer to `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

/// Every error: status 400 (or 500) and this body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fault {
    pub fault_message: String,
}

/// A whole configuration: Firecracker's `--config-file` and the answer to `GET /vm/config`.
/// The sections lguest does not implement are named, so that a file using one is refused with
/// the section's name rather than as an unknown field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfig {
    #[serde(rename = "boot-source", default, deserialize_with = "present_object", skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSource>,
    #[serde(rename = "machine-config", default, deserialize_with = "present_object", skip_serializing_if = "Option::is_none")]
    pub machine_config: Option<MachineConfig>,
    #[serde(default, deserialize_with = "objects")]
    pub drives: Vec<Drive>,
    #[serde(rename = "network-interfaces", default, deserialize_with = "objects")]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default, deserialize_with = "present_object", skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyDevice>,
    #[serde(default, deserialize_with = "present_object", skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    #[serde(default, deserialize_with = "present_object", skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    #[serde(default, deserialize_with = "present_object", skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialDevice>,
    // Sections lguest knows by name but does not implement; refused in `plan`.
    #[serde(default, skip_serializing)]
    pub balloon: Option<serde_json::Value>,
    #[serde(rename = "cpu-config", default, skip_serializing)]
    pub cpu_config: Option<serde_json::Value>,
    #[serde(rename = "mmds-config", default, skip_serializing)]
    pub mmds_config: Option<serde_json::Value>,
    #[serde(rename = "memory-hotplug", default, skip_serializing)]
    pub memory_hotplug: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    pub pmem: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present_object", skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockDevice>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: for<'de> Deserialize<'de>>(json: &str) -> Result<T, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn boot_source_fields() {
        let boot: BootSource = parse(r#"{"kernel_image_path": "vmlinux", "boot_args": "console=ttyS0"}"#).expect("valid");
        assert_eq!(boot.kernel_image_path, "vmlinux");
        assert_eq!(boot.boot_args.as_deref(), Some("console=ttyS0"));
        assert!(parse::<BootSource>(r#"{"boot_args": "x"}"#).is_err(), "the kernel is required");
        assert!(parse::<BootSource>(r#"{"kernel_image_path": "k", "initrd_path": null}"#).is_err(), "null is not a string");
        assert!(parse::<BootSource>(r#"{"kernel_image_path": "k", "bogus": 1}"#).is_err(), "unknown field");
        assert!(parse::<BootSource>(r#"{"kernel_image_path": 7}"#).is_err(), "wrong type");
    }

    #[test]
    fn machine_config_accepts_the_old_smt_name() {
        let old: MachineConfig = parse(r#"{"vcpu_count": 2, "mem_size_mib": 256, "ht_enabled": true}"#).expect("valid");
        assert!(old.smt);
        let new: MachineConfig = parse(r#"{"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2M"}"#).expect("valid");
        assert_eq!(new.huge_pages, HugePages::Two);
        assert!(parse::<MachineConfig>(r#"{"vcpu_count": 2}"#).is_err(), "memory is required");
        assert!(parse::<MachineConfig>(r#"{"vcpu_count": 1.5, "mem_size_mib": 256}"#).is_err());
        assert!(parse::<MachineConfig>(r#"{"vcpu_count": 300, "mem_size_mib": 256}"#).is_err());
        assert!(parse::<MachineConfig>(r#"{"vcpu_count": -1, "mem_size_mib": 256}"#).is_err());
        let patch: MachineConfigUpdate = parse(r#"{"mem_size_mib": 64}"#).expect("valid");
        assert_eq!(patch.mem_size_mib, Some(64));
        assert!(parse::<MachineConfigUpdate>(r#"{"mem_size_mib": null}"#).is_err());
    }

    #[test]
    fn drives_and_rate_limiters() {
        let drive: Drive = parse(
            r#"{"drive_id": "rootfs", "path_on_host": "a.img", "is_root_device": true, "is_read_only": false,
                "cache_type": "Writeback", "io_engine": "Async",
                "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100, "one_time_burst": 5}}}"#,
        )
        .expect("valid");
        assert_eq!(drive.cache_type, CacheType::Writeback);
        assert!(drive.rate_limiter.as_ref().is_some_and(RateLimiter::limits_anything));
        assert!(parse::<Drive>(r#"{"drive_id": "d", "is_root_device": false, "cache_type": "Fast"}"#).is_err());
        assert!(parse::<Drive>(r#"{"drive_id": "d"}"#).is_err(), "is_root_device is required");
        assert!(parse::<TokenBucket>(r#"{"size": -1, "refill_time": 1}"#).is_err());
        assert!(!parse::<RateLimiter>("{}").expect("valid").limits_anything());
    }

    #[test]
    fn actions_and_vm_states() {
        let action: InstanceActionInfo = parse(r#"{"action_type": "InstanceStart"}"#).expect("valid");
        assert_eq!(action.action_type, ActionType::InstanceStart);
        assert!(parse::<InstanceActionInfo>(r#"{"action_type": "Explode"}"#).is_err());
        let vm: VmState = parse(r#"{"state": "Paused"}"#).expect("valid");
        assert_eq!(vm.state, VmStateRequest::Paused);
        assert!(parse::<VmState>(r#"{"state": "Running"}"#).is_err());
    }

    #[test]
    fn logger_levels_in_both_spellings() {
        let old: Logger = parse(r#"{"level": "Warning"}"#).expect("valid");
        let new: Logger = parse(r#"{"level": "Warn"}"#).expect("valid");
        assert_eq!(old.level, new.level);
        assert_eq!(new.level.map(LogLevel::directive), Some("warn"));
    }

    #[test]
    fn a_full_configuration_refuses_unknown_sections() {
        let full: FullVmConfig = parse(
            r#"{"boot-source": {"kernel_image_path": "k"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
                "drives": [], "network-interfaces": []}"#,
        )
        .expect("valid");
        assert_eq!(full.machine_config.map(|m| m.mem_size_mib), Some(64));
        let error = parse::<FullVmConfig>(r#"{"boot-sauce": {}}"#).expect_err("unknown");
        assert!(error.to_string().contains("boot-sauce"), "{error}");
    }

    #[test]
    fn structs_come_from_objects_only() {
        assert!(parse::<FullVmConfig>(r#"{"drives": [["rootfs", true]]}"#).is_err());
        assert!(parse::<FullVmConfig>(r#"{"entropy": []}"#).is_err());
        assert!(parse::<EntropyDevice>(r#"{"rate_limiter": []}"#).is_err());
        assert!(parse::<RateLimiter>(r#"{"ops": [1, 2]}"#).is_err());
        assert!(object::<EntropyDevice>(serde_json::json!([])).is_err());
        assert!(object::<EntropyDevice>(serde_json::json!({})).is_ok());
    }
}
