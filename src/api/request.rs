//! From an HTTP request's method, path and body to one typed [`Request`].
//!
//! This is the whole of the API's parsing of client bytes past HTTP itself (which hyper does):
//! the path is matched against Firecracker's endpoints, the body read by serde into the type
//! the spec gives it. Anything else is an [`ApiError`] that says what is wrong; nothing here
//! can panic, whatever the client sends (a fuzz target, `fuzz/fuzz_targets/api_request.rs`,
//! holds it to that).

use serde::de::DeserializeOwned;

use super::types::{ActionType, BootSource, Drive, EntropyDevice, InstanceActionInfo, Logger, MachineConfig, MachineConfigUpdate, Metrics, NetworkInterface, PartialDrive, PartialNetworkInterface, SerialDevice, SnapshotCreateParams, SnapshotLoadParams, VmState, VmStateRequest, VsockDevice};
use super::ApiError;

/// One API call, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    GetInstanceInfo,
    GetVersion,
    GetMachineConfig,
    GetVmConfig,
    PutBootSource(BootSource),
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigUpdate),
    PutDrive(String, Drive),
    PatchDrive(String, PartialDrive),
    PutNet(String, NetworkInterface),
    PatchNet(String, PartialNetworkInterface),
    PutEntropy(EntropyDevice),
    PutVsock(VsockDevice),
    PutAction(ActionType),
    PatchVm(VmStateRequest),
    PutLogger(Logger),
    PutMetrics(Metrics),
    PutSerial(SerialDevice),
    PutSnapshotCreate(SnapshotCreateParams),
    PutSnapshotLoad(SnapshotLoadParams),
}

/// Firecracker's endpoints lguest knows but does not implement, by their path's first segment.
const NOT_IMPLEMENTED: [(&str, &str); 6] = [
    ("balloon", "the balloon device (/balloon)"),
    ("mmds", "the microVM metadata service (/mmds)"),
    ("hotplug", "memory hotplug (/hotplug/memory)"),
    ("pmem", "pmem devices (/pmem)"),
    ("cpu-config", "CPU configuration (/cpu-config)"),
    ("machine-config-templates", "CPU templates"),
];

/// Parses one request. `path` is the URI's path, without its query.
pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<Request, ApiError> {
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let no_such = || ApiError::NoSuchEndpoint { method: shorten(method), path: shorten(path) };
    if let Some((_, what)) = NOT_IMPLEMENTED.iter().find(|(name, _)| segments.first() == Some(name)) {
        return Err(ApiError::NotImplemented { what });
    }
    let request = match (method, segments.as_slice()) {
        ("GET", [""]) => Request::GetInstanceInfo,
        ("GET", ["version"]) => Request::GetVersion,
        ("GET", ["machine-config"]) => Request::GetMachineConfig,
        ("GET", ["vm", "config"]) => Request::GetVmConfig,
        ("PUT", ["boot-source"]) => Request::PutBootSource(body_of(body)?),
        ("PUT", ["machine-config"]) => Request::PutMachineConfig(body_of(body)?),
        ("PATCH", ["machine-config"]) => Request::PatchMachineConfig(body_of(body)?),
        ("PUT", ["drives", id]) => Request::PutDrive(path_id(id)?, body_of(body)?),
        ("PATCH", ["drives", id]) => Request::PatchDrive(path_id(id)?, body_of(body)?),
        ("PUT", ["network-interfaces", id]) => Request::PutNet(path_id(id)?, body_of(body)?),
        ("PATCH", ["network-interfaces", id]) => Request::PatchNet(path_id(id)?, body_of(body)?),
        ("PUT", ["entropy"]) => Request::PutEntropy(body_of(body)?),
        ("PUT", ["vsock"]) => Request::PutVsock(body_of(body)?),
        ("PUT", ["actions"]) => Request::PutAction(body_of::<InstanceActionInfo>(body)?.action_type),
        ("PATCH", ["vm"]) => Request::PatchVm(body_of::<VmState>(body)?.state),
        ("PUT", ["logger"]) => Request::PutLogger(body_of(body)?),
        ("PUT", ["metrics"]) => Request::PutMetrics(body_of(body)?),
        ("PUT", ["serial"]) => Request::PutSerial(body_of(body)?),
        ("PUT", ["snapshot", "create"]) => Request::PutSnapshotCreate(body_of(body)?),
        ("PUT", ["snapshot", "load"]) => Request::PutSnapshotLoad(body_of(body)?),
        _ => return Err(no_such()),
    };
    Ok(request)
}

/// A body the spec requires, read as `T`.
fn body_of<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::EmptyBody);
    }
    Ok(super::types::object(serde_json::from_slice(body)?)?)
}

/// The id in a path; its rules are checked with the body's (see `plan::check_id`).
fn path_id(id: &str) -> Result<String, ApiError> {
    if id.is_empty() {
        return Err(ApiError::BadValue { field: "id", why: "the path has no id".into() });
    }
    Ok(id.to_string())
}

/// Client text echoed in an error, cut short: an error line stays one line.
fn shorten(text: &str) -> String {
    let mut short: String = text.chars().take(80).filter(|c| !c.is_control()).collect();
    if text.chars().count() > 80 {
        short.push_str("...");
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: &str, path: &str, body: &str) -> Request {
        parse(method, path, body.as_bytes()).unwrap_or_else(|e| panic!("{method} {path} {body}: {e}"))
    }

    fn err(method: &str, path: &str, body: &str) -> ApiError {
        match parse(method, path, body.as_bytes()) {
            Ok(request) => panic!("{method} {path} {body} parsed as {request:?}"),
            Err(error) => error,
        }
    }

    #[test]
    fn every_endpoint_parses() {
        assert_eq!(ok("GET", "/", ""), Request::GetInstanceInfo);
        assert_eq!(ok("GET", "/version", ""), Request::GetVersion);
        assert_eq!(ok("GET", "/machine-config", ""), Request::GetMachineConfig);
        assert_eq!(ok("GET", "/vm/config", ""), Request::GetVmConfig);
        assert!(matches!(ok("PUT", "/boot-source", r#"{"kernel_image_path": "k"}"#), Request::PutBootSource(_)));
        assert!(matches!(ok("PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 64}"#), Request::PutMachineConfig(_)));
        assert!(matches!(ok("PATCH", "/machine-config", r#"{"vcpu_count": 2}"#), Request::PatchMachineConfig(_)));
        let drive = ok("PUT", "/drives/rootfs", r#"{"drive_id": "rootfs", "path_on_host": "a", "is_root_device": true}"#);
        assert!(matches!(drive, Request::PutDrive(id, _) if id == "rootfs"));
        assert!(matches!(ok("PATCH", "/drives/d", r#"{"drive_id": "d", "path_on_host": "b"}"#), Request::PatchDrive(..)));
        assert!(matches!(ok("PUT", "/network-interfaces/eth0", r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#), Request::PutNet(..)));
        assert!(matches!(ok("PATCH", "/network-interfaces/eth0", r#"{"iface_id": "eth0"}"#), Request::PatchNet(..)));
        assert_eq!(ok("PUT", "/entropy", "{}"), Request::PutEntropy(EntropyDevice::default()));
        let vsock = VsockDevice { vsock_id: None, guest_cid: 3, uds_path: "/tmp/v.sock".into() };
        assert_eq!(ok("PUT", "/vsock", r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#), Request::PutVsock(vsock));
        assert_eq!(ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#), Request::PutAction(ActionType::SendCtrlAltDel));
        assert_eq!(ok("PATCH", "/vm", r#"{"state": "Resumed"}"#), Request::PatchVm(VmStateRequest::Resumed));
        assert!(matches!(ok("PUT", "/logger", r#"{"level": "Debug", "log_path": "/tmp/l"}"#), Request::PutLogger(_)));
        assert!(matches!(ok("PUT", "/metrics", r#"{"metrics_path": "/tmp/m"}"#), Request::PutMetrics(_)));
        assert!(matches!(ok("PUT", "/serial", r#"{"serial_out_path": "/tmp/s"}"#), Request::PutSerial(_)));
    }

    #[test]
    fn unimplemented_endpoints_are_named() {
        for (method, path) in [("PUT", "/balloon"), ("GET", "/balloon/statistics"), ("PUT", "/mmds"), ("PUT", "/mmds/config"),
            ("PUT", "/hotplug/memory"), ("PUT", "/pmem/p0"), ("PUT", "/cpu-config")]
        {
            let error = err(method, path, "{}");
            assert!(matches!(error, ApiError::NotImplemented { .. }), "{method} {path}: {error}");
            assert!(error.to_string().contains("not implemented"), "{error}");
        }
    }

    #[test]
    fn wrong_paths_and_methods_are_refused_as_firecracker_does() {
        for (method, path) in [("GET", "/nope"), ("POST", "/actions"), ("DELETE", "/drives/a"), ("GET", "/drives/a/b"), ("PUT", "/"), ("GET", "//")] {
            let error = err(method, path, "");
            assert!(matches!(error, ApiError::NoSuchEndpoint { .. }), "{method} {path}: {error}");
        }
        assert!(err("GET", "/nope", "").to_string().starts_with("Invalid request method and/or path: GET /nope"));
        assert!(matches!(err("PUT", "/drives/", "{}"), ApiError::BadValue { field: "id", .. }));
        let long = err("GET", &format!("/{}\n", "x".repeat(500)), "").to_string();
        assert!(long.len() < 200 && !long.contains('\n'), "{long}");
    }

    #[test]
    fn hostile_bodies_are_refused_with_a_reason() {
        assert!(matches!(err("PUT", "/actions", ""), ApiError::EmptyBody));
        assert!(matches!(err("PUT", "/actions", "  \n"), ApiError::EmptyBody));
        for body in ["{", "[]", "[\"InstanceStart\"]", "null", "\"InstanceStart\"", r#"{"action_type": 1}"#, r#"{"action_type": "InstanceStart", "now": true}"#, "\u{0}\u{ff}"] {
            let error = err("PUT", "/actions", body);
            assert!(matches!(error, ApiError::BadBody(_)), "{body}: {error}");
        }
        assert!(matches!(err("PUT", "/entropy", "[]"), ApiError::BadBody(_)), "an all-optional body from an array");
        assert!(matches!(err("PUT", "/machine-config", "[2, 256]"), ApiError::BadBody(_)), "fields by position");
        let unknown = err("PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 64, "gpu": 1}"#).to_string();
        assert!(unknown.contains("gpu"), "{unknown}");
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(err("PUT", "/boot-source", &deep), ApiError::BadBody(_)), "serde_json's recursion limit");
    }
}
