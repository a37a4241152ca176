//! The pre-boot configuration: what Firecracker's API calls (or a `--config-file`) have said
//! about the machine so far, and how that becomes lguest's one description of a VM,
//! [`VmConfig`].
//!
//! A [`Plan`] lives in the API thread until `InstanceStart`; each `PUT` replaces one part of it,
//! checked as it comes (a kernel that can't be opened is refused at `PUT /boot-source`, as
//! Firecracker does), so that the start itself fails only on what needs KVM. The plan also
//! answers `GET /machine-config` and `GET /vm/config`, before and after the start.
//!
//! What lguest does differently, and says so: `pci=off` and `acpi=off` in `boot_args` are
//! dropped with a warning (Firecracker's clients add them because Firecracker had neither; a
//! kernel booted with them here would find no device and one CPU, since lguest's devices are
//! virtio-pci described by ACPI); a drive's `io_engine` picks its engine (`Async` is io_uring,
//! `Sync` plain system calls, as in Firecracker); fields that change nothing here (`smt`,
//! `cache_type`) are accepted and kept for `GET /vm/config`; what lguest
//! can't do yet (2 MiB huge pages, CPU templates, vhost-user disks) is refused with a 400 that
//! names it. Rate limiters on drives, network interfaces and the entropy device become
//! lguest's own ([`super::limits`]).

use std::path::PathBuf;

use super::limits::{limiter_of, rate_limit};
use super::types::{BootSource, Drive, EntropyDevice, FullVmConfig, HugePages, IoEngine, Logger, MachineConfig, MachineConfigUpdate, Metrics, NetworkInterface, RateLimiter, SerialDevice, VsockDevice};
use super::ApiError;
use crate::config::{self, DiskConfig, DiskEngine, NetBackend, NetConfig, VmConfig, MAX_DISK_ID, MAX_MEMORY_MIB, MIN_MEMORY_MIB};

/// Firecracker's limit on vCPUs per microVM (the spec's `maximum: 32`).
pub const MAX_VCPUS: u8 = 32;
/// Firecracker's limit on the length of a drive or interface id.
pub const MAX_ID_LEN: usize = 64;
/// The guest kernel command line when `boot_args` is absent: lguest's own default (a serial
/// console, the keyboard controller's reset, reboot on panic), not Firecracker's, which turns
/// the serial port off.
pub const DEFAULT_BOOT_ARGS: &str = config::DEFAULT_CMDLINE;
/// Words of Firecracker clients' command lines that would hide lguest's devices and CPUs.
const DROPPED_BOOT_ARGS: [&str; 2] = ["pci=off", "acpi=off"];

/// What the API has configured so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    boot_source: Option<BootSource>,
    machine: MachineConfig,
    /// In the order they were first put; the root device goes first at start.
    drives: Vec<Drive>,
    nets: Vec<NetworkInterface>,
    entropy: Option<EntropyDevice>,
    vsock: Option<VsockDevice>,
    pub logger: Option<Logger>,
    pub metrics: Option<Metrics>,
    pub serial: Option<SerialDevice>,
}

impl Plan {
    /// A plan from a whole configuration (`--config-file`): each section goes through the same
    /// checks as its API call, and an error names the section.
    pub fn from_full(full: FullVmConfig) -> Result<Plan, ApiError> {
        refuse_unimplemented_sections(&full)?;
        let mut plan = Plan::default();
        let in_section = |section: &'static str| move |error: ApiError| ApiError::InSection { section, source: Box::new(error) };
        if let Some(boot) = full.boot_source {
            plan.set_boot_source(boot).map_err(in_section("boot-source"))?;
        }
        if let Some(machine) = full.machine_config {
            plan.set_machine(machine).map_err(in_section("machine-config"))?;
        }
        for drive in full.drives {
            let id = drive.drive_id.clone();
            plan.put_drive(&id, drive).map_err(in_section("drives"))?;
        }
        for net in full.network_interfaces {
            let id = net.iface_id.clone();
            plan.put_net(&id, net).map_err(in_section("network-interfaces"))?;
        }
        if let Some(entropy) = full.entropy {
            plan.set_entropy(entropy).map_err(in_section("entropy"))?;
        }
        if let Some(vsock) = full.vsock {
            plan.set_vsock(vsock).map_err(in_section("vsock"))?;
        }
        plan.logger = full.logger;
        plan.metrics = full.metrics;
        plan.serial = full.serial;
        Ok(plan)
    }

    /// Reads a `--config-file`: Firecracker's JSON format, unknown keys refused.
    pub fn from_json(json: &[u8]) -> Result<Plan, ApiError> {
        Plan::from_full(super::types::object(serde_json::from_slice(json)?)?)
    }

    /// `PUT /boot-source`: the kernel and initrd must be readable now.
    pub fn set_boot_source(&mut self, boot: BootSource) -> Result<(), ApiError> {
        check_file("kernel_image_path", &boot.kernel_image_path, "kernel")?;
        if let Some(initrd) = &boot.initrd_path {
            check_file("initrd_path", initrd, "initrd")?;
        }
        self.boot_source = Some(boot);
        Ok(())
    }

    /// `PUT /machine-config`: every field at once (the optional ones back to their defaults).
    pub fn set_machine(&mut self, machine: MachineConfig) -> Result<(), ApiError> {
        check_machine(&machine)?;
        self.machine = machine;
        Ok(())
    }

    /// `PATCH /machine-config`: the fields given; all or nothing.
    pub fn patch_machine(&mut self, update: MachineConfigUpdate) -> Result<(), ApiError> {
        let mut machine = self.machine.clone();
        let MachineConfigUpdate { vcpu_count, mem_size_mib, smt, track_dirty_pages, huge_pages, cpu_template } = update;
        machine.vcpu_count = vcpu_count.unwrap_or(machine.vcpu_count);
        machine.mem_size_mib = mem_size_mib.unwrap_or(machine.mem_size_mib);
        machine.smt = smt.unwrap_or(machine.smt);
        machine.track_dirty_pages = track_dirty_pages.unwrap_or(machine.track_dirty_pages);
        machine.huge_pages = huge_pages.unwrap_or(machine.huge_pages);
        machine.cpu_template = cpu_template.or(machine.cpu_template);
        self.set_machine(machine)
    }

    pub fn machine(&self) -> &MachineConfig {
        &self.machine
    }

    /// `PUT /drives/{id}`: a new drive, or a new description of one already put.
    pub fn put_drive(&mut self, path_id: &str, drive: Drive) -> Result<(), ApiError> {
        check_id("drive_id", path_id)?;
        same_id("drive_id", path_id, &drive.drive_id)?;
        if drive.socket.is_some() {
            return Err(ApiError::NotImplemented { what: "vhost-user-block drives (socket)" });
        }
        let path = drive.path_on_host.as_deref().ok_or(ApiError::BadValue { field: "path_on_host", why: "a drive needs its image's path".into() })?;
        check_image(path)?;
        rate_limit("rate_limiter", drive.rate_limiter.as_ref())?;
        if drive.is_root_device {
            if let Some(other) = self.drives.iter().find(|d| d.is_root_device && d.drive_id != drive.drive_id) {
                let why = format!("drive '{}' is the root device already; a VM has one", other.drive_id);
                return Err(ApiError::BadValue { field: "is_root_device", why });
            }
        }
        match self.drives.iter_mut().find(|d| d.drive_id == drive.drive_id) {
            Some(existing) => *existing = drive,
            None => self.drives.push(drive),
        }
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`.
    pub fn put_net(&mut self, path_id: &str, net: NetworkInterface) -> Result<(), ApiError> {
        check_id("iface_id", path_id)?;
        same_id("iface_id", path_id, &net.iface_id)?;
        net_config(&net)?;
        if let Some(other) = self.nets.iter().find(|n| n.host_dev_name == net.host_dev_name && n.iface_id != net.iface_id) {
            let why = format!("tap '{}' is used by interface '{}' already", net.host_dev_name, other.iface_id);
            return Err(ApiError::BadValue { field: "host_dev_name", why });
        }
        match self.nets.iter_mut().find(|n| n.iface_id == net.iface_id) {
            Some(existing) => *existing = net,
            None => self.nets.push(net),
        }
        Ok(())
    }

    /// `PUT /entropy`.
    pub fn set_entropy(&mut self, entropy: EntropyDevice) -> Result<(), ApiError> {
        rate_limit("rate_limiter", entropy.rate_limiter.as_ref())?;
        self.entropy = Some(entropy);
        Ok(())
    }

    /// `PUT /vsock`: checked now; its socket is bound when the VM is built.
    pub fn set_vsock(&mut self, vsock: VsockDevice) -> Result<(), ApiError> {
        vsock_config(&vsock)?;
        self.vsock = Some(vsock);
        Ok(())
    }

    /// Whether a drive with this id was put (for `PATCH /drives/{id}`'s answer).
    pub fn has_drive(&self, id: &str) -> bool {
        self.drives.iter().any(|d| d.drive_id == id)
    }

    /// Where the drive `id` is among the VM's disks (the root device first, as
    /// [`Plan::to_vm_config`] orders them).
    pub fn drive_index(&self, id: &str) -> Option<usize> {
        self.drive_ids().iter().position(|&drive| drive == id)
    }

    /// After `PATCH /drives/{id}` swapped the medium: `GET /vm/config` shows the new image.
    pub fn set_drive_path(&mut self, id: &str, path: &str) {
        if let Some(drive) = self.drives.iter_mut().find(|d| d.drive_id == id) {
            drive.path_on_host = Some(path.to_string());
        }
    }

    /// After `PATCH /drives/{id}` changed the limiter: `GET /vm/config` shows it.
    pub fn set_drive_limiter(&mut self, id: &str, limiter: Option<RateLimiter>) {
        if let Some(drive) = self.drives.iter_mut().find(|d| d.drive_id == id) {
            drive.rate_limiter = limiter;
        }
    }

    /// The interface `id`, if it was put.
    pub fn net(&self, id: &str) -> Option<&NetworkInterface> {
        self.nets.iter().find(|n| n.iface_id == id)
    }

    /// The id under which the card on tap `tap` was put (`None`: a card the API doesn't know,
    /// such as `lguest run`'s `--net user`).
    pub fn net_id_of_tap(&self, tap: &str) -> Option<&str> {
        self.nets.iter().find(|n| n.host_dev_name == tap).map(|n| n.iface_id.as_str())
    }

    /// The drive ids in the VM's order of disks.
    pub fn drive_ids(&self) -> Vec<&str> {
        let (roots, others): (Vec<&Drive>, Vec<&Drive>) = self.drives.iter().partition(|d| d.is_root_device);
        roots.into_iter().chain(others).map(|d| d.drive_id.as_str()).collect()
    }

    /// After `PATCH /network-interfaces/{id}` changed the limiters: `GET /vm/config` shows them.
    pub fn set_net_limiters(&mut self, id: &str, rx: Option<RateLimiter>, tx: Option<RateLimiter>) {
        if let Some(net) = self.nets.iter_mut().find(|n| n.iface_id == id) {
            (net.rx_rate_limiter, net.tx_rate_limiter) = (rx, tx);
        }
    }

    /// The network interfaces' ids, in the order the VM's cards are made in.
    pub fn net_ids(&self) -> Vec<String> {
        self.nets.iter().map(|n| n.iface_id.clone()).collect()
    }

    /// Gives the network interfaces these ids, in order (a restored VM keeps its cards' ids).
    pub fn rename_nets(&mut self, ids: &[String]) {
        for (net, id) in self.nets.iter_mut().zip(ids) {
            net.iface_id = id.clone();
        }
    }

    pub fn has_net(&self, id: &str) -> bool {
        self.nets.iter().any(|n| n.iface_id == id)
    }

    /// The plan as `GET /vm/config` shows it.
    pub fn to_full(&self) -> FullVmConfig {
        FullVmConfig {
            boot_source: self.boot_source.clone(),
            machine_config: Some(self.machine.clone()),
            drives: self.drives.clone(),
            network_interfaces: self.nets.clone(),
            entropy: self.entropy.clone(),
            vsock: self.vsock.clone(),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
            serial: self.serial.clone(),
            ..FullVmConfig::default()
        }
    }

    /// The VM to build: `InstanceStart`, or a `--config-file` boot. Settings that belong to
    /// the process (seccomp, what a reboot does) keep [`VmConfig::for_kernel`]'s defaults for
    /// the caller to change.
    pub fn to_vm_config(&self) -> Result<VmConfig, ApiError> {
        let boot = self.boot_source.as_ref().ok_or(ApiError::NoBootSource)?;
        let mut vm = VmConfig::for_kernel(PathBuf::from(&boot.kernel_image_path));
        vm.initrd = boot.initrd_path.as_ref().map(PathBuf::from);
        vm.memory_mib = self.machine.mem_size_mib;
        vm.cpus = self.machine.vcpu_count;
        vm.track_dirty_pages = self.machine.track_dirty_pages;
        let root = self.drives.iter().find(|d| d.is_root_device);
        vm.cmdline = guest_cmdline(boot.boot_args.as_deref(), root);
        let (roots, others): (Vec<&Drive>, Vec<&Drive>) = self.drives.iter().partition(|d| d.is_root_device);
        vm.disks = roots.into_iter().chain(others).map(disk_config).collect::<Result<_, _>>()?;
        vm.nets = self.nets.iter().map(net_config).collect::<Result<_, _>>()?;
        vm.rng = self.entropy.is_some();
        vm.rng_rate_limit = rate_limit("rate_limiter", self.entropy.as_ref().and_then(|e| e.rate_limiter.as_ref()))?;
        vm.vsock = self.vsock.as_ref().map(vsock_config).transpose()?;
        vm.check_limits()?;
        Ok(vm)
    }
}

/// The plan of a VM that `lguest run` built from its own flags, for `GET /vm/config` and
/// `GET /machine-config` when the API serves a VM it did not configure.
pub fn plan_of(vm: &VmConfig) -> Plan {
    let boot_source = BootSource {
        kernel_image_path: vm.kernel.display().to_string(),
        initrd_path: vm.initrd.as_ref().map(|p| p.display().to_string()),
        boot_args: Some(vm.cmdline.clone()),
    };
    let drives = vm
        .disks
        .iter()
        .enumerate()
        .map(|(n, disk)| Drive {
            drive_id: disk.id.clone().unwrap_or_else(|| format!("disk{n}")),
            is_root_device: false,
            path_on_host: Some(disk.path.display().to_string()),
            is_read_only: Some(disk.readonly),
            partuuid: None,
            cache_type: Default::default(),
            io_engine: match disk.engine {
                DiskEngine::Sync => IoEngine::Sync,
                DiskEngine::IoUring | DiskEngine::Auto => IoEngine::Async,
            },
            rate_limiter: limiter_of(disk.rate_limit),
            socket: None,
        })
        .collect();
    // Firecracker's API knows taps only: a `--net user` card has no entry there.
    let nets = vm
        .nets
        .iter()
        .filter_map(|net| match &net.backend {
            NetBackend::Tap { name, .. } => Some((name, net)),
            NetBackend::User { .. } => None,
        })
        .enumerate()
        .map(|(n, (name, net))| NetworkInterface {
            iface_id: format!("net{n}"),
            host_dev_name: name.clone(),
            guest_mac: net.mac.map(format_mac),
            rx_rate_limiter: limiter_of(net.rx_rate_limit),
            tx_rate_limiter: limiter_of(net.tx_rate_limit),
        })
        .collect();
    Plan {
        boot_source: Some(boot_source),
        machine: MachineConfig {
            vcpu_count: vm.cpus,
            mem_size_mib: vm.memory_mib,
            track_dirty_pages: vm.track_dirty_pages,
            ..MachineConfig::default()
        },
        drives,
        nets,
        entropy: vm.rng.then(EntropyDevice::default),
        vsock: vm.vsock.as_ref().map(|v| VsockDevice {
            vsock_id: None,
            guest_cid: v.cid,
            uds_path: v.uds_path.to_string_lossy().into_owned(),
        }),
        ..Plan::default()
    }
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn refuse_unimplemented_sections(full: &FullVmConfig) -> Result<(), ApiError> {
    let sections: [(&Option<serde_json::Value>, &'static str); 5] = [
        (&full.balloon, "the balloon device (balloon)"),
        (&full.cpu_config, "CPU configuration (cpu-config)"),
        (&full.mmds_config, "the microVM metadata service (mmds-config)"),
        (&full.memory_hotplug, "memory hotplug (memory-hotplug)"),
        (&full.pmem, "pmem devices (pmem)"),
    ];
    match sections.iter().find(|(value, _)| value.as_ref().is_some_and(|v| !v.is_null())) {
        Some((_, what)) => Err(ApiError::NotImplemented { what }),
        None => Ok(()),
    }
}

/// `PUT /vsock`'s body as the device's settings, checked as `--vsock` is.
fn vsock_config(vsock: &VsockDevice) -> Result<crate::config::VsockConfig, ApiError> {
    crate::config::VsockConfig::new(vsock.guest_cid, &vsock.uds_path).map_err(|e| {
        let field = match e {
            crate::config::BadVsock::Cid => "guest_cid",
            crate::config::BadVsock::Path => "uds_path",
        };
        ApiError::BadValue { field, why: e.to_string() }
    })
}

fn check_machine(machine: &MachineConfig) -> Result<(), ApiError> {
    if machine.vcpu_count == 0 || machine.vcpu_count > MAX_VCPUS {
        return Err(ApiError::BadValue { field: "vcpu_count", why: format!("{} is not in 1..={MAX_VCPUS}", machine.vcpu_count) });
    }
    if machine.smt && machine.vcpu_count > 1 && machine.vcpu_count % 2 == 1 {
        let why = format!("with smt, the vCPU count must be 1 or even, not {}", machine.vcpu_count);
        return Err(ApiError::BadValue { field: "vcpu_count", why });
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&machine.mem_size_mib) {
        let why = format!("{} MiB is not in {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}", machine.mem_size_mib);
        return Err(ApiError::BadValue { field: "mem_size_mib", why });
    }
    if machine.huge_pages == HugePages::Two {
        return Err(ApiError::NotImplemented { what: "2 MiB huge pages (huge_pages: 2M)" });
    }
    match machine.cpu_template.as_deref() {
        None | Some("None") => Ok(()),
        Some(_) => Err(ApiError::NotImplemented { what: "CPU templates (cpu_template)" }),
    }
}

/// Firecracker's rule for resource ids: 1 to 64 ASCII letters, digits and underscores.
pub fn check_id(field: &'static str, id: &str) -> Result<(), ApiError> {
    let valid = !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if valid {
        return Ok(());
    }
    let shown: String = id.chars().take(MAX_ID_LEN + 1).collect();
    Err(ApiError::BadValue { field, why: format!("'{shown}' is not 1 to {MAX_ID_LEN} letters, digits or underscores") })
}

fn same_id(field: &'static str, path: &str, body: &str) -> Result<(), ApiError> {
    if path == body {
        return Ok(());
    }
    let why = format!("the path says '{path}' but the body says '{body}'");
    Err(ApiError::BadValue { field, why })
}

/// A disk image must be a readable file; whether it may be written is found out at start.
fn check_image(path: &str) -> Result<(), ApiError> {
    check_file("path_on_host", path, "disk image")
}

/// A file the client names must be readable, and not a named pipe or a socket: opening a pipe
/// would wait for a writer, and a client must not be able to stall the API thread.
fn check_file(field: &'static str, path: &str, what: &'static str) -> Result<(), ApiError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let kind = meta.file_type();
        if kind.is_fifo() || kind.is_socket() {
            return Err(ApiError::BadValue { field, why: format!("'{path}' is a named pipe or a socket, not a file") });
        }
    }
    config::check_readable(&PathBuf::from(path), what)?;
    Ok(())
}

fn disk_config(drive: &Drive) -> Result<DiskConfig, ApiError> {
    let path = drive.path_on_host.as_ref().ok_or(ApiError::BadValue { field: "path_on_host", why: "a drive needs its image's path".into() })?;
    // The guest sees the drive's id as the disk's serial (/dev/disk/by-id/virtio-ID), cut to
    // the 20 bytes virtio-blk has for it, as Firecracker does.
    let serial: String = drive.drive_id.chars().take(MAX_DISK_ID).collect();
    let rate_limit = rate_limit("rate_limiter", drive.rate_limiter.as_ref())?;
    // Firecracker's `Async` is its io_uring engine, and a host without one fails the drive.
    let engine = match drive.io_engine {
        IoEngine::Async => DiskEngine::IoUring,
        IoEngine::Sync => DiskEngine::Sync,
    };
    Ok(DiskConfig { readonly: drive.is_read_only.unwrap_or(false), id: Some(serial), rate_limit, engine, ..DiskConfig::new(path) })
}

fn net_config(net: &NetworkInterface) -> Result<NetConfig, ApiError> {
    if net.host_dev_name.is_empty() || net.host_dev_name.len() >= libc::IFNAMSIZ {
        let why = format!("a tap name has 1 to {} characters", libc::IFNAMSIZ - 1);
        return Err(ApiError::BadValue { field: "host_dev_name", why });
    }
    let mac = match &net.guest_mac {
        None => None,
        Some(text) => Some(config::parse_mac(text).ok_or_else(|| ApiError::BadValue {
            field: "guest_mac",
            why: format!("'{text}' is not a unicast MAC such as 06:00:ac:10:00:02"),
        })?),
    };
    Ok(NetConfig {
        mac,
        rx_rate_limit: rate_limit("rx_rate_limiter", net.rx_rate_limiter.as_ref())?,
        tx_rate_limit: rate_limit("tx_rate_limiter", net.tx_rate_limiter.as_ref())?,
        ..NetConfig::new(NetBackend::Tap { name: net.host_dev_name.clone(), vhost: false })
    })
}

/// The guest's command line: the client's `boot_args` (or lguest's default) without the words
/// that would hide lguest's devices, and the root device as Firecracker names it.
pub fn guest_cmdline(boot_args: Option<&str>, root: Option<&Drive>) -> String {
    let args = boot_args.unwrap_or(DEFAULT_BOOT_ARGS);
    let mut words: Vec<&str> = Vec::new();
    for word in args.split_ascii_whitespace() {
        if DROPPED_BOOT_ARGS.contains(&word) {
            tracing::warn!("dropped '{word}' from boot_args: lguest's devices are virtio-pci, described by ACPI");
        } else {
            words.push(word);
        }
    }
    let mut cmdline = words.join(" ");
    if let Some(root) = root {
        let device = match &root.partuuid {
            Some(uuid) => format!("PARTUUID={uuid}"),
            None => "/dev/vda".to_string(),
        };
        let mode = if root.is_read_only.unwrap_or(false) { "ro" } else { "rw" };
        cmdline = format!("{cmdline} root={device} {mode}").trim_start().to_string();
    }
    cmdline
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{IoEngine, TokenBucket};

    /// Files that exist, for fields that must name a readable file.
    const KERNEL: &str = "Cargo.toml";
    const IMAGE: &str = "src/main.rs";

    fn boot(args: Option<&str>) -> BootSource {
        BootSource { kernel_image_path: KERNEL.into(), initrd_path: None, boot_args: args.map(str::to_string) }
    }

    fn drive(id: &str, root: bool) -> Drive {
        Drive {
            drive_id: id.into(),
            is_root_device: root,
            path_on_host: Some(IMAGE.into()),
            is_read_only: Some(root),
            partuuid: None,
            cache_type: Default::default(),
            io_engine: IoEngine::Async,
            rate_limiter: None,
            socket: None,
        }
    }

    fn net(id: &str, tap: &str) -> NetworkInterface {
        NetworkInterface { iface_id: id.into(), host_dev_name: tap.into(), guest_mac: None, rx_rate_limiter: None, tx_rate_limiter: None }
    }

    #[test]
    fn a_plan_becomes_a_vm_config() {
        let mut plan = Plan::default();
        plan.set_boot_source(boot(Some("console=ttyS0 reboot=k panic=1 pci=off"))).expect("boot source");
        plan.set_machine(MachineConfig { vcpu_count: 2, mem_size_mib: 256, ..Default::default() }).expect("machine");
        plan.put_drive("data", drive("data", false)).expect("drive");
        plan.put_drive("rootfs", drive("rootfs", true)).expect("root drive");
        plan.put_net("eth0", net("eth0", "tap0")).expect("net");
        plan.set_entropy(EntropyDevice::default()).expect("entropy");
        let vm = plan.to_vm_config().expect("config");
        assert_eq!((vm.cpus, vm.memory_mib), (2, 256));
        assert_eq!(vm.cmdline, "console=ttyS0 reboot=k panic=1 root=/dev/vda ro");
        assert_eq!(vm.disks.iter().map(|d| d.id.clone().unwrap_or_default()).collect::<Vec<_>>(), ["rootfs", "data"]);
        assert!(vm.disks[0].readonly);
        assert_eq!(vm.disks[0].engine, DiskEngine::IoUring, "io_engine Async is io_uring");
        assert_eq!(vm.nets[0].backend, NetBackend::Tap { name: "tap0".into(), vhost: false });
        assert!(vm.rng);
    }

    #[test]
    fn katas_boot_args_keep_the_devices() {
        // Kata's fcKernelParams (src/runtime/virtcontainers/fc.go) with its virtio-blk root.
        let kata = "root=/dev/vda1 rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4 pci=off reboot=k panic=1 iommu=off net.ifnames=0 random.trust_cpu=on acpi=off";
        let cmdline = guest_cmdline(Some(kata), None);
        assert!(!cmdline.contains("pci=off") && !cmdline.contains("acpi=off"), "{cmdline}");
        assert!(cmdline.contains("root=/dev/vda1") && cmdline.contains("iommu=off"), "{cmdline}");
        assert_eq!(guest_cmdline(None, None), DEFAULT_BOOT_ARGS);
    }

    #[test]
    fn a_root_partuuid_names_the_root() {
        let mut root = drive("root", true);
        root.partuuid = Some("0eaa91a0-01".into());
        root.is_read_only = Some(false);
        assert_eq!(guest_cmdline(Some("quiet"), Some(&root)), "quiet root=PARTUUID=0eaa91a0-01 rw");
    }

    #[test]
    fn a_named_pipe_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        let path = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("no NUL");
        // SAFETY: a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let kernel = BootSource { kernel_image_path: fifo.display().to_string(), initrd_path: None, boot_args: None };
        let error = Plan::default().set_boot_source(kernel);
        assert!(matches!(error, Err(ApiError::BadValue { field: "kernel_image_path", .. })), "{error:?}");
        let mut pipe = drive("p", false);
        pipe.path_on_host = Some(fifo.display().to_string());
        assert!(matches!(Plan::default().put_drive("p", pipe), Err(ApiError::BadValue { field: "path_on_host", .. })));
    }

    #[test]
    fn start_without_a_kernel_is_refused() {
        assert!(matches!(Plan::default().to_vm_config(), Err(ApiError::NoBootSource)));
    }

    #[test]
    fn bad_values_are_named() {
        let mut plan = Plan::default();
        let missing = plan.set_boot_source(BootSource { kernel_image_path: "no/such/kernel".into(), initrd_path: None, boot_args: None });
        assert!(matches!(missing, Err(ApiError::Config(_))), "{missing:?}");
        for (vcpus, mib, field) in [(0, 128, "vcpu_count"), (33, 128, "vcpu_count"), (1, 1, "mem_size_mib"), (1, u64::MAX, "mem_size_mib")] {
            let error = plan.set_machine(MachineConfig { vcpu_count: vcpus, mem_size_mib: mib, ..Default::default() });
            assert!(matches!(error, Err(ApiError::BadValue { field: f, .. }) if f == field), "{vcpus} {mib}: {error:?}");
        }
        let smt = plan.set_machine(MachineConfig { vcpu_count: 3, mem_size_mib: 128, smt: true, ..Default::default() });
        assert!(matches!(smt, Err(ApiError::BadValue { field: "vcpu_count", .. })));
        let huge = plan.set_machine(MachineConfig { huge_pages: HugePages::Two, ..Default::default() });
        assert!(matches!(huge, Err(ApiError::NotImplemented { .. })));
        let template = plan.set_machine(MachineConfig { cpu_template: Some("T2".into()), ..Default::default() });
        assert!(matches!(template, Err(ApiError::NotImplemented { .. })));
        assert_eq!(plan.machine(), &MachineConfig::default(), "a refused update changes nothing");
    }

    #[test]
    fn patching_the_machine_is_all_or_nothing() {
        let mut plan = Plan::default();
        plan.patch_machine(MachineConfigUpdate { mem_size_mib: Some(512), ..Default::default() }).expect("patch");
        assert_eq!(plan.machine().mem_size_mib, 512);
        assert_eq!(plan.machine().vcpu_count, 1);
        let bad = plan.patch_machine(MachineConfigUpdate { mem_size_mib: Some(64), vcpu_count: Some(99), ..Default::default() });
        assert!(bad.is_err());
        assert_eq!(plan.machine().mem_size_mib, 512);
    }

    #[test]
    fn drive_errors() {
        let mut plan = Plan::default();
        assert!(matches!(plan.put_drive("a", drive("b", false)), Err(ApiError::BadValue { field: "drive_id", .. })));
        assert!(matches!(plan.put_drive("a/b", drive("a/b", false)), Err(ApiError::BadValue { field: "drive_id", .. })));
        assert!(plan.put_drive(&"x".repeat(65), drive(&"x".repeat(65), false)).is_err());
        let mut missing = drive("m", false);
        missing.path_on_host = Some("no/such.img".into());
        assert!(matches!(plan.put_drive("m", missing), Err(ApiError::Config(_))));
        let mut vhost = drive("v", false);
        vhost.socket = Some("/run/vhost.sock".into());
        assert!(matches!(plan.put_drive("v", vhost), Err(ApiError::NotImplemented { .. })));
        let mut limited = drive("l", false);
        limited.rate_limiter = Some(RateLimiter { ops: Some(TokenBucket { size: 0, refill_time: 1, one_time_burst: None }), bandwidth: None });
        assert!(matches!(plan.put_drive("l", limited.clone()), Err(ApiError::BadValue { field: "rate_limiter", .. })));
        limited.rate_limiter = Some(RateLimiter { bandwidth: Some(TokenBucket { size: 10 << 20, refill_time: 1000, one_time_burst: Some(1 << 20) }), ops: None });
        plan.put_drive("l", limited).expect("a limited drive");
        plan.put_drive("r1", drive("r1", true)).expect("first root");
        assert!(matches!(plan.put_drive("r2", drive("r2", true)), Err(ApiError::BadValue { field: "is_root_device", .. })));
        plan.put_drive("r1", drive("r1", true)).expect("the same root again replaces it");
        assert!(plan.has_drive("r1") && !plan.has_drive("r2"));
        assert_eq!((plan.drive_index("r1"), plan.drive_index("l"), plan.drive_index("x")), (Some(0), Some(1), None));
        let vm = plan.to_vm_config().err();
        assert!(matches!(vm, Some(ApiError::NoBootSource)));
        plan.set_boot_source(boot(None)).expect("boot");
        let vm = plan.to_vm_config().expect("config");
        assert_eq!(vm.disks[1].rate_limit.bandwidth.map(|b| (b.size(), b.one_time_burst(), b.refill_time_ms())), Some((10 << 20, 1 << 20, 1000)));
    }

    #[test]
    fn net_errors() {
        let mut plan = Plan::default();
        let mut bad_mac = net("eth0", "tap0");
        bad_mac.guest_mac = Some("01:00:5e:00:00:01".into());
        assert!(matches!(plan.put_net("eth0", bad_mac), Err(ApiError::BadValue { field: "guest_mac", .. })));
        assert!(matches!(plan.put_net("eth0", net("eth0", "")), Err(ApiError::BadValue { field: "host_dev_name", .. })));
        plan.put_net("eth0", net("eth0", "tap0")).expect("net");
        assert!(matches!(plan.put_net("eth1", net("eth1", "tap0")), Err(ApiError::BadValue { field: "host_dev_name", .. })));
        assert!(plan.net("eth0").is_some());
    }

    #[test]
    fn a_net_with_rate_limiters_each_way() {
        let mut plan = Plan::default();
        let mut limited = net("eth0", "tap0");
        limited.tx_rate_limiter = Some(RateLimiter { bandwidth: None, ops: Some(TokenBucket { size: 0, refill_time: 1, one_time_burst: None }) });
        assert!(matches!(plan.put_net("eth0", limited.clone()), Err(ApiError::BadValue { field: "tx_rate_limiter", .. })));
        limited.tx_rate_limiter = Some(RateLimiter { bandwidth: None, ops: Some(TokenBucket { size: 100, refill_time: 1000, one_time_burst: None }) });
        limited.rx_rate_limiter = Some(RateLimiter { bandwidth: Some(TokenBucket { size: 1 << 20, refill_time: 100, one_time_burst: None }), ops: None });
        plan.put_net("eth0", limited).expect("limited both ways");
        plan.set_boot_source(boot(None)).expect("boot");
        let vm = plan.to_vm_config().expect("config");
        assert_eq!(vm.nets[0].rx_rate_limit.bandwidth.map(|b| (b.size(), b.refill_time_ms())), Some((1 << 20, 100)));
        assert_eq!(vm.nets[0].tx_rate_limit.ops.map(|b| b.size()), Some(100));
        let back = plan_of(&vm);
        assert_eq!(back.nets[0].rx_rate_limiter, plan.nets[0].rx_rate_limiter, "GET /vm/config shows them");
        assert_eq!(plan.net_id_of_tap("tap0"), Some("eth0"));
    }

    #[test]
    fn a_config_file_is_read_section_by_section() {
        let json = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{KERNEL}", "boot_args": "console=ttyS0 acpi=off"}},
                "machine-config": {{"vcpu_count": 2, "mem_size_mib": 64, "ht_enabled": false, "track_dirty_pages": true}},
                "drives": [{{"drive_id": "rootfs", "path_on_host": "{IMAGE}", "is_root_device": true, "is_read_only": true}}],
                "network-interfaces": [], "entropy": {{}}, "logger": {{"level": "Info"}}}}"#
        );
        let vm = Plan::from_json(json.as_bytes()).expect("valid").to_vm_config().expect("config");
        assert_eq!(vm.cmdline, "console=ttyS0 root=/dev/vda ro");
        assert_eq!(vm.memory_mib, 64);
        assert!(vm.rng);
        assert!(vm.track_dirty_pages, "Diff snapshots can be taken of it");
        assert!(plan_of(&vm).machine().track_dirty_pages, "GET /machine-config says so");
        let unknown = Plan::from_json(br#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "turbo": true}}"#).expect_err("unknown");
        assert!(unknown.to_string().contains("turbo"), "{unknown}");
        let bad = Plan::from_json(br#"{"machine-config": {"vcpu_count": 64, "mem_size_mib": 64}}"#).expect_err("bad");
        assert!(bad.to_string().contains("machine-config") && bad.to_string().contains("vcpu_count"), "{bad}");
        assert!(Plan::from_json(b"[]").is_err(), "a configuration is an object");
        let boot = format!(r#""boot-source": {{"kernel_image_path": "{KERNEL}"}}"#);
        let with_vsock = format!(r#"{{{boot}, "vsock": {{"vsock_id": "v", "guest_cid": 3, "uds_path": "/tmp/v"}}}}"#);
        let vm = Plan::from_json(with_vsock.as_bytes()).and_then(|p| p.to_vm_config()).expect("vsock");
        assert_eq!(vm.vsock, Some(crate::config::VsockConfig { cid: 3, uds_path: "/tmp/v".into() }));
        let bad = Plan::from_json(br#"{"vsock": {"guest_cid": 2, "uds_path": "/tmp/v"}}"#).expect_err("cid 2");
        assert!(bad.to_string().contains("vsock") && bad.to_string().contains("guest_cid"), "{bad}");
    }

    #[test]
    fn a_run_configuration_round_trips_through_the_plan() {
        let mut vm = VmConfig::for_kernel(KERNEL.into());
        vm.cmdline = "console=ttyS0".into();
        vm.rng = true;
        let plan = plan_of(&vm);
        let back = plan.to_vm_config().expect("config");
        assert_eq!((back.kernel, back.cmdline, back.memory_mib, back.rng), (vm.kernel, vm.cmdline, vm.memory_mib, true));
        let full = serde_json::to_value(plan.to_full()).expect("json");
        assert_eq!(full["machine-config"]["mem_size_mib"], 512);
        assert!(full.get("balloon").is_none());
    }
}
