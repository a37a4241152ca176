//! The microVM as the API sees it: before the start a [`Plan`], after it the running VM's
//! [`VmControls`]. [`Instance::handle`] applies one parsed call and says what to answer.
//!
//! The instance lives in the API thread. The one call it can't carry out there is
//! `InstanceStart`: building a VM opens /dev/kvm, files and taps, which the main thread does
//! (its seccomp-free role, see [`crate::seccomp`]). So the start is a [`StartRequest`] sent to
//! the main thread, which answers with the running VM's controls or the error that stopped it.

use std::path::PathBuf;
use std::sync::mpsc;

use super::limits::{self, LimiterPatch};
use super::metrics::Metrics;
use super::plan::{self, Plan};
use super::request::Request;
use super::types::{ActionType, FirecrackerVersion, InstanceInfo, PartialDrive, PartialNetworkInterface, VmStateRequest};
use super::types::{MemoryBackend, MemoryBackendType, SnapshotCreateParams, SnapshotLoadParams, SnapshotType};
use super::{logger, ApiError, FIRECRACKER_VERSION};
use crate::config::VmConfig;
use crate::control::{LiveDevices, VmControls};
use crate::snapshot::restore::LoadRequest;
use crate::snapshot::{CreateRequest, SnapshotKind};
use crate::virtio::metrics::{self as device_metrics, BlockMetrics, NetMetrics};

/// `InstanceStart`, as the main thread receives it.
pub struct StartRequest {
    pub start: Start,
    /// `PUT /serial`'s file, which takes the guest console's output instead of our stdout.
    pub serial_out: Option<PathBuf>,
    pub reply: mpsc::Sender<StartAnswer>,
}

/// What to start: a VM from a configuration (`InstanceStart`), or a snapshot (`PUT /snapshot/load`).
pub enum Start {
    Boot(Box<VmConfig>),
    Snapshot(LoadRequest),
}

/// The main thread's answer to a start: the running VM, or why it did not start.
pub type StartAnswer = Result<Started, crate::error::Error>;

/// A VM the main thread started: its controls, and for a restored one the configuration and
/// network interface ids it was saved with (the API's plan of it from then on).
pub struct Started {
    pub controls: VmControls,
    pub restored: Option<(VmConfig, Vec<String>)>,
}

/// A successful answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// 204, for every PUT and PATCH.
    NoContent,
    /// 200 with this JSON body, for every GET.
    Json(serde_json::Value),
}

pub struct Instance {
    id: String,
    plan: Plan,
    /// Where `InstanceStart` goes; `None` when the VM was started without the API.
    starter: Option<mpsc::Sender<StartRequest>>,
    controls: Option<VmControls>,
    pub metrics: Metrics,
}

impl Instance {
    /// A process that waits for the API to configure and start its VM (`lguest firecracker`).
    pub fn waiting(id: String, plan: Plan, starter: mpsc::Sender<StartRequest>) -> Instance {
        Instance { id, plan, starter: Some(starter), controls: None, metrics: Metrics::default() }
    }

    /// A VM configured without the API (`lguest run --api-sock`, or a `--config-file`):
    /// [`Instance::attach`] follows once it runs.
    pub fn configured(id: String, plan: Plan) -> Instance {
        Instance { id, plan, starter: None, controls: None, metrics: Metrics::default() }
    }

    /// The plan of a VM `lguest run` built from its flags.
    pub fn for_run(config: &VmConfig) -> Instance {
        Instance::configured("lguest".into(), plan::plan_of(config))
    }

    /// The plan of a VM restored by `lguest restore`: its cards keep the ids they were saved with.
    pub fn for_restore(config: &VmConfig, net_ids: &[String]) -> Instance {
        let mut instance = Instance::for_run(config);
        instance.plan.rename_nets(net_ids);
        instance
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The VM runs (again, after a restart): the API now acts on it.
    pub fn attach(&mut self, controls: VmControls) {
        self.starter = None;
        self.controls = Some(controls);
    }

    /// Firecracker's names for the instance's state.
    pub fn state(&self) -> &'static str {
        match &self.controls {
            None => "Not started",
            Some(controls) if controls.gate.is_paused() => "Paused",
            Some(_) => "Running",
        }
    }

    fn is_started(&self) -> bool {
        self.controls.is_some() || self.starter.is_none()
    }

    /// Applies one call, counts it, and says what to answer.
    pub fn handle(&mut self, request: Request) -> Result<Reply, ApiError> {
        let names = super::metrics::names(&request);
        let result = self.apply(request);
        self.metrics.count(names, result.is_ok());
        result
    }

    fn apply(&mut self, request: Request) -> Result<Reply, ApiError> {
        match request {
            Request::GetInstanceInfo => json(&self.instance_info()),
            Request::GetVersion => json(&FirecrackerVersion { firecracker_version: FIRECRACKER_VERSION.into() }),
            Request::GetMachineConfig => json(self.plan.machine()),
            Request::GetVmConfig => json(&self.plan.to_full()),
            Request::PutBootSource(boot) => self.before_start("PUT /boot-source", |plan| plan.set_boot_source(boot)),
            Request::PutMachineConfig(machine) => self.before_start("PUT /machine-config", |plan| plan.set_machine(machine)),
            Request::PatchMachineConfig(update) => self.before_start("PATCH /machine-config", |plan| plan.patch_machine(update)),
            Request::PutDrive(id, drive) => self.before_start("PUT /drives", |plan| plan.put_drive(&id, drive)),
            Request::PutNet(id, net) => self.before_start("PUT /network-interfaces", |plan| plan.put_net(&id, net)),
            Request::PutEntropy(entropy) => self.before_start("PUT /entropy", |plan| plan.set_entropy(entropy)),
            Request::PutVsock(vsock) => self.before_start("PUT /vsock", |plan| plan.set_vsock(vsock)),
            Request::PutSerial(serial) => self.before_start("PUT /serial", |plan| {
                plan.serial = Some(serial);
                Ok(())
            }),
            Request::PatchDrive(id, patch) => self.patch_drive(&id, patch),
            Request::PatchNet(id, patch) => self.patch_net(&id, patch),
            Request::PutAction(ActionType::InstanceStart) => self.start(),
            Request::PutAction(ActionType::SendCtrlAltDel) => self.ctrl_alt_del(),
            Request::PutAction(ActionType::FlushMetrics) => {
                self.flush_metrics()?;
                Ok(Reply::NoContent)
            }
            Request::PatchVm(state) => self.pause_or_resume(state),
            Request::PutSnapshotCreate(params) => self.create_snapshot(params),
            Request::PutSnapshotLoad(params) => self.load_snapshot(params),
            Request::PutLogger(config) => {
                logger::configure(&config)?;
                self.plan.logger = Some(config);
                Ok(Reply::NoContent)
            }
            Request::PutMetrics(config) => {
                self.metrics.open(&config.metrics_path)?;
                self.plan.metrics = Some(config);
                Ok(Reply::NoContent)
            }
        }
    }

    fn instance_info(&self) -> InstanceInfo {
        InstanceInfo {
            id: self.id.clone(),
            state: self.state(),
            vmm_version: FIRECRACKER_VERSION.into(),
            app_name: "lguest",
            started: self.controls.is_some(),
        }
    }

    fn before_start(&mut self, what: &'static str, change: impl FnOnce(&mut Plan) -> Result<(), ApiError>) -> Result<Reply, ApiError> {
        if self.is_started() {
            return Err(ApiError::PreBootOnly { what });
        }
        change(&mut self.plan)?;
        Ok(Reply::NoContent)
    }

    fn running(&self, what: &'static str) -> Result<&VmControls, ApiError> {
        self.controls.as_ref().ok_or(ApiError::NotStarted { what })
    }

    /// `PATCH /drives/{id}`: after the start only. A new `path_on_host` puts that image in the
    /// drive (Kata's way of hot-plugging disks): opened as the old one was, and the guest told
    /// by a config-change interrupt. A `rate_limiter` changes the running limiter's buckets
    /// ([`LimiterPatch`]); it is checked before anything changes.
    fn patch_drive(&mut self, id: &str, patch: PartialDrive) -> Result<Reply, ApiError> {
        let controls = self.running("PATCH /drives")?.clone();
        plan::check_id("drive_id", id)?;
        if id != patch.drive_id {
            return Err(ApiError::BadValue { field: "drive_id", why: format!("the path says '{id}' but the body says '{}'", patch.drive_id) });
        }
        let no_such_drive = || ApiError::NoSuchDevice { what: "drive", id: id.into() };
        let index = self.plan.drive_index(id).ok_or_else(no_such_drive)?;
        let limiter = patch.rate_limiter.as_ref().map(|limiter| LimiterPatch::new("rate_limiter", Some(limiter))).transpose()?;
        if let Some(path) = patch.path_on_host {
            match controls.change_medium(index, PathBuf::from(&path)) {
                None => return Err(no_such_drive()),
                Some(Err(error)) => return Err(ApiError::Medium(error)),
                Some(Ok(())) => self.plan.set_drive_path(id, &path),
            }
        }
        if let Some(limiter) = limiter {
            let disk = controls.devices.disks.get(index).ok_or_else(no_such_drive)?;
            let now = limiter.apply("rate_limiter", &disk.limiter)?;
            self.plan.set_drive_limiter(id, now);
        }
        Ok(Reply::NoContent)
    }

    /// `PATCH /network-interfaces/{id}`: the card's receive and transmit limiters change while
    /// the guest runs ([`LimiterPatch`]).
    fn patch_net(&mut self, id: &str, patch: PartialNetworkInterface) -> Result<Reply, ApiError> {
        let controls = self.running("PATCH /network-interfaces")?.clone();
        plan::check_id("iface_id", id)?;
        if id != patch.iface_id {
            return Err(ApiError::BadValue { field: "iface_id", why: format!("the path says '{id}' but the body says '{}'", patch.iface_id) });
        }
        let no_such_net = || ApiError::NoSuchDevice { what: "network interface", id: id.into() };
        let tap = self.plan.net(id).ok_or_else(no_such_net)?.host_dev_name.clone();
        let net = controls.devices.nets.iter().find(|net| net.tap.as_deref() == Some(tap.as_str())).ok_or_else(no_such_net)?;
        let (rx, tx) = limits::patch_net(net, patch.rx_rate_limiter.as_ref(), patch.tx_rate_limiter.as_ref())?;
        self.plan.set_net_limiters(id, rx, tx);
        Ok(Reply::NoContent)
    }

    /// Writes a metrics line: the API's counters and the devices' (`FlushMetrics`, and every
    /// minute).
    pub fn flush_metrics(&mut self) -> Result<(), ApiError> {
        if !self.metrics.is_open() {
            return Err(ApiError::NoMetrics);
        }
        let no_devices = LiveDevices::default();
        let devices = self.controls.as_ref().map_or(&no_devices, |controls| &controls.devices);
        let drive_ids = self.plan.drive_ids();
        let disks: Vec<_> = devices
            .disks
            .iter()
            .enumerate()
            .map(|(n, disk)| (drive_ids.get(n).map_or_else(|| format!("disk{n}"), |id| id.to_string()), disk.metrics.take()))
            .collect();
        let nets: Vec<_> = devices
            .nets
            .iter()
            .enumerate()
            .map(|(n, net)| {
                // A card the API doesn't know (`lguest run --net user`) goes by its place.
                let id = net.tap.as_deref().and_then(|tap| self.plan.net_id_of_tap(tap));
                (id.map_or_else(|| format!("user{n}"), str::to_string), net.metrics.take())
            })
            .collect();
        let mut sections = device_metrics::sections("block", &disks, BlockMetrics::default().take());
        sections.extend(device_metrics::sections("net", &nets, NetMetrics::default().take()));
        self.metrics.flush(sections)
    }

    /// The channel to the main thread, while the VM has not started.
    fn starter(&self, what: &'static str) -> Result<mpsc::Sender<StartRequest>, ApiError> {
        match (&self.starter, &self.controls) {
            (Some(starter), None) => Ok(starter.clone()),
            _ => Err(ApiError::PreBootOnly { what }),
        }
    }

    /// `InstanceStart`: the main thread builds and starts the VM; we wait for its answer.
    fn start(&mut self) -> Result<Reply, ApiError> {
        let starter = self.starter("InstanceStart")?;
        let config = self.plan.to_vm_config()?;
        let serial_out = self.plan.serial.as_ref().and_then(|s| s.serial_out_path.as_ref()).map(PathBuf::from);
        let (reply, answer) = mpsc::channel();
        self.send_start(starter, StartRequest { start: Start::Boot(Box::new(config)), serial_out, reply }, answer)
    }

    /// Hands a start to the main thread and attaches to the VM it answers with.
    fn send_start(&mut self, starter: mpsc::Sender<StartRequest>, request: StartRequest, answer: mpsc::Receiver<StartAnswer>) -> Result<Reply, ApiError> {
        starter.send(request).map_err(|_| ApiError::Stopping)?;
        match answer.recv() {
            Ok(Ok(Started { controls, restored })) => {
                if let Some((config, net_ids)) = restored {
                    self.plan = plan::plan_of(&config);
                    self.plan.rename_nets(&net_ids);
                }
                self.attach(controls);
                Ok(Reply::NoContent)
            }
            Ok(Err(error)) => Err(ApiError::StartFailed(error)),
            Err(_) => Err(ApiError::Stopping),
        }
    }

    /// `PUT /snapshot/create`: the main thread saves the paused VM.
    fn create_snapshot(&self, params: SnapshotCreateParams) -> Result<Reply, ApiError> {
        let controls = self.running("PUT /snapshot/create")?;
        let kind = match params.snapshot_type {
            SnapshotType::Full => SnapshotKind::Full,
            SnapshotType::Diff => SnapshotKind::Diff,
        };
        let request = CreateRequest {
            snapshot_path: PathBuf::from(params.snapshot_path),
            mem_file_path: PathBuf::from(params.mem_file_path),
            kind,
            net_ids: self.plan.net_ids(),
        };
        controls.snapshot(request)?;
        Ok(Reply::NoContent)
    }

    /// `PUT /snapshot/load`, on a process whose VM has not started: the main thread reads and
    /// checks the snapshot and starts it, as it starts a VM for `InstanceStart`.
    fn load_snapshot(&mut self, params: SnapshotLoadParams) -> Result<Reply, ApiError> {
        let starter = self.starter("PUT /snapshot/load")?;
        let memory_file = match (params.mem_backend, params.mem_file_path) {
            (Some(MemoryBackend { backend_type: MemoryBackendType::File, backend_path }), None) | (None, Some(backend_path)) => backend_path,
            (Some(MemoryBackend { backend_type: MemoryBackendType::Uffd, .. }), None) => {
                return Err(ApiError::NotImplemented { what: "memory from a userfaultfd handler (backend_type Uffd)" })
            }
            _ => return Err(ApiError::BadValue { field: "mem_backend", why: "give exactly one of mem_backend and mem_file_path".into() }),
        };
        let load = LoadRequest {
            snapshot_path: PathBuf::from(params.snapshot_path),
            memory_file: PathBuf::from(memory_file),
            net_overrides: params.network_overrides.into_iter().map(|o| (o.iface_id, o.host_dev_name)).collect(),
            paused: !params.resume_vm,
            // Firecracker's older name for the same switch.
            track_dirty_pages: params.track_dirty_pages || params.enable_diff_snapshots,
        };
        let (reply, answer) = mpsc::channel();
        self.send_start(starter, StartRequest { start: Start::Snapshot(load), serial_out: None, reply }, answer)
    }

    fn ctrl_alt_del(&self) -> Result<Reply, ApiError> {
        if !self.running("SendCtrlAltDel")?.press_ctrl_alt_del() {
            tracing::info!("SendCtrlAltDel: the guest's keyboard is disabled, it will not see the keys");
        }
        Ok(Reply::NoContent)
    }

    fn pause_or_resume(&self, state: VmStateRequest) -> Result<Reply, ApiError> {
        let controls = self.running("PATCH /vm")?;
        match state {
            VmStateRequest::Paused => controls.pause()?,
            VmStateRequest::Resumed => controls.resume(),
        }
        Ok(Reply::NoContent)
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<Reply, ApiError> {
    Ok(Reply::Json(serde_json::to_value(value)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::request::parse;

    fn call(instance: &mut Instance, method: &str, path: &str, body: &str) -> Result<Reply, ApiError> {
        instance.handle(parse(method, path, body.as_bytes())?)
    }

    fn waiting() -> (Instance, mpsc::Receiver<StartRequest>) {
        let (starter, requests) = mpsc::channel();
        (Instance::waiting("vm0".into(), Plan::default(), starter), requests)
    }

    #[test]
    fn before_the_start() {
        let (mut vm, _requests) = waiting();
        let Ok(Reply::Json(info)) = call(&mut vm, "GET", "/", "") else { panic!("GET /") };
        assert_eq!(info["state"], "Not started");
        assert_eq!(info["started"], false);
        assert_eq!(info["id"], "vm0");
        let Ok(Reply::Json(version)) = call(&mut vm, "GET", "/version", "") else { panic!("GET /version") };
        assert_eq!(version["firecracker_version"], FIRECRACKER_VERSION);
        let Ok(Reply::Json(machine)) = call(&mut vm, "GET", "/machine-config", "") else { panic!("GET /machine-config") };
        assert_eq!((machine["vcpu_count"].as_u64(), machine["mem_size_mib"].as_u64()), (Some(1), Some(128)));
        assert_eq!(call(&mut vm, "PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 256}"#).ok(), Some(Reply::NoContent));
        assert_eq!(call(&mut vm, "PUT", "/boot-source", r#"{"kernel_image_path": "Cargo.toml"}"#).ok(), Some(Reply::NoContent));
        assert_eq!(call(&mut vm, "PUT", "/entropy", "{}").ok(), Some(Reply::NoContent));
        assert_eq!(call(&mut vm, "PUT", "/serial", "{}").ok(), Some(Reply::NoContent));
        let Ok(Reply::Json(full)) = call(&mut vm, "GET", "/vm/config", "") else { panic!("GET /vm/config") };
        assert_eq!(full["machine-config"]["vcpu_count"], 2);
        assert_eq!(full["boot-source"]["kernel_image_path"], "Cargo.toml");
        assert!(full["entropy"].is_object());
    }

    #[test]
    fn runtime_calls_before_the_start_are_refused() {
        let (mut vm, _requests) = waiting();
        for (method, path, body) in [
            ("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#),
            ("PATCH", "/vm", r#"{"state": "Paused"}"#),
            ("PATCH", "/drives/d", r#"{"drive_id": "d"}"#),
            ("PATCH", "/network-interfaces/n", r#"{"iface_id": "n"}"#),
        ] {
            let error = call(&mut vm, method, path, body);
            assert!(matches!(error, Err(ApiError::NotStarted { .. })), "{method} {path}: {error:?}");
        }
        assert!(matches!(call(&mut vm, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#), Err(ApiError::NoBootSource)));
        assert!(matches!(call(&mut vm, "PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#), Err(ApiError::NoMetrics)));
    }

    #[test]
    fn a_failed_start_is_reported_and_the_plan_kept() {
        let (mut vm, requests) = waiting();
        call(&mut vm, "PUT", "/boot-source", r#"{"kernel_image_path": "Cargo.toml"}"#).expect("boot source");
        let main = std::thread::spawn(move || {
            let request = requests.recv().expect("a start request");
            assert!(matches!(&request.start, Start::Boot(config) if config.kernel == std::path::Path::new("Cargo.toml")));
            let _ = request.reply.send(Err(crate::error::Error::NoKvm));
        });
        let error = call(&mut vm, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#).expect_err("refused");
        assert!(error.to_string().contains("/dev/kvm"), "{error}");
        main.join().expect("main");
        assert_eq!(vm.state(), "Not started");
        assert!(matches!(call(&mut vm, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#), Err(ApiError::Stopping)));
    }

    /// `track_dirty_pages` (and Firecracker's older `enable_diff_snapshots`) reaches the VM to
    /// build, from PUT /machine-config for a boot and from PUT /snapshot/load for a restore.
    #[test]
    fn dirty_page_tracking_reaches_the_vm_from_machine_config_and_snapshot_load() {
        let tracking_of = |calls: &[(&str, &str, &str)]| {
            let (mut vm, requests) = waiting();
            let main = std::thread::spawn(move || {
                let request = requests.recv().expect("a start request");
                let _ = request.reply.send(Err(crate::error::Error::NoKvm));
                match request.start {
                    Start::Boot(config) => config.track_dirty_pages,
                    Start::Snapshot(load) => load.track_dirty_pages,
                }
            });
            for (method, path, body) in calls {
                let _ = call(&mut vm, method, path, body);
            }
            main.join().expect("main")
        };
        let boot = |machine: &'static str| {
            [("PUT", "/boot-source", r#"{"kernel_image_path": "Cargo.toml"}"#), ("PUT", "/machine-config", machine), ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#)]
        };
        assert!(tracking_of(&boot(r#"{"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true}"#)));
        assert!(!tracking_of(&boot(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#)));
        let load = |extra: &str| format!(r#"{{"snapshot_path": "s", "mem_file_path": "m"{extra}}}"#);
        for (extra, tracking) in [("", false), (r#", "track_dirty_pages": true"#, true), (r#", "enable_diff_snapshots": true"#, true)] {
            let body = load(extra);
            assert_eq!(tracking_of(&[("PUT", "/snapshot/load", &body)]), tracking, "{body}");
        }
    }

    #[test]
    fn a_vm_started_without_the_api_refuses_pre_boot_calls() {
        let mut vm = Instance::for_run(&VmConfig::for_kernel("Cargo.toml".into()));
        let error = call(&mut vm, "PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 64}"#).expect_err("refused");
        assert!(error.to_string().contains("only possible before"), "{error}");
        assert!(matches!(call(&mut vm, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#), Err(ApiError::PreBootOnly { .. })));
        let Ok(Reply::Json(machine)) = call(&mut vm, "GET", "/machine-config", "") else { panic!("GET") };
        assert_eq!(machine["mem_size_mib"], 512);
    }

    #[test]
    fn metrics_count_calls_and_failures() {
        let (mut vm, _requests) = waiting();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("metrics.json");
        let body = format!(r#"{{"metrics_path": "{}"}}"#, path.display());
        call(&mut vm, "PUT", "/metrics", &body).expect("metrics");
        assert!(matches!(call(&mut vm, "PUT", "/metrics", &body), Err(ApiError::MetricsAlreadySet)));
        let _ = call(&mut vm, "PUT", "/machine-config", r#"{"vcpu_count": 99, "mem_size_mib": 64}"#);
        call(&mut vm, "GET", "/", "").expect("GET /");
        call(&mut vm, "PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#).expect("flush");
        let text = std::fs::read_to_string(&path).expect("metrics file");
        let line: serde_json::Value = serde_json::from_str(text.lines().next().expect("a line")).expect("JSON");
        assert_eq!(line["put_api_requests"]["machine_cfg_fails"], 1);
        assert_eq!(line["put_api_requests"]["metrics_count"], 2, "calls, failed ones included");
        assert_eq!(line["put_api_requests"]["metrics_fails"], 1);
        assert_eq!(line["get_api_requests"]["instance_info_count"], 1);
        assert!(line["utc_timestamp_ms"].as_u64().is_some());
    }
}
