//! Building a VM from its configuration, running it, and waiting for it to stop.
//!
//! The order matters and follows a guest's life: open KVM, make the VM, map guest memory, make
//! the in-kernel interrupt controllers and PIT, write the ACPI tables and load the kernel, plug
//! in the devices, set up each vCPU's registers ([`Vm::build`]); then connect the console and
//! start one thread per vCPU ([`Vm::start`]), and wait for the first [`StopReason`]
//! ([`RunningVm::wait`]). Then the VM is taken apart again, completely, so that a rebooted
//! guest can be started afresh in the same process (see [`crate::session`]).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use crate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{acpi, boot, cpu};
use crate::bus::{lock, Bus, SharedDevice};
use crate::config::{NetBackend, VmConfig};
use crate::control::{LiveDevices, PauseGate, VmControls};
use crate::snapshot::{self, state::Snapshot};
use crate::terminal::ConsoleRoute;
use crate::devices::boot_timer::{BootTimer, BOOT_TIMER_ADDR, BOOT_TIMER_LEN};
use crate::devices::i8042::{I8042, I8042_LEN, I8042_PORT, KEYBOARD_IRQ};
use crate::devices::power::{SleepResetRegister, POWER_LEN, POWER_PORT};
use crate::devices::pvpanic::{PvPanic, PVPANIC_LEN, PVPANIC_PORT};
use crate::devices::serial::{IrqLine, SerialPort, Stdout, COM1_IRQ, COM1_LEN, COM1_PORT};
use crate::error::{kvm, Error, Result};
use crate::memory::{self, layout, GuestRam};
use crate::pci::msix::MsiRoutes;
use crate::pci::{PciRoot, CONFIG_PORT, CONFIG_PORT_LEN};
use crate::config::ConsoleKind;
use crate::virtio::block::Block;
use crate::virtio::console::{Console, ConsoleInput};
use crate::virtio::net::vhost::VhostNet;
use crate::virtio::fs::Fs;
use crate::virtio::net::Net;
use crate::virtio::rng::Rng;
use crate::virtio::transport::{DriveHandle, SharedVirtio, VirtioPci, BAR_SIZE};
use crate::virtio::vsock::Vsock;
use crate::virtio::VirtioDevice;
use crate::stop::{Event, StopReason, Stopper};
use crate::threads;
use crate::timeline::{Milestone, Timeline};
use crate::vcpu::{self, Vcpu};

/// Where a VM's guest comes from: a kernel to boot, or a snapshot to take up.
#[derive(Clone, Copy)]
pub enum Origin<'a> {
    Boot,
    /// Everything from `saved`, the RAM from `memory_file`; `paused` keeps the vCPUs and
    /// devices stopped until a resume (`PUT /snapshot/load` without `resume_vm`).
    Snapshot { saved: &'a Snapshot, memory_file: &'a Path, paused: bool },
}

/// A VM ready to run: everything built, no guest instruction executed yet.
pub struct Vm {
    /// What it was built from, for a snapshot.
    config: VmConfig,
    // Kept open for the VM's lifetime: the vCPUs and memory slots belong to it.
    kvm: Kvm,
    vm: Arc<VmFd>,
    vcpus: Vec<Vcpu>,
    pio: Arc<Bus>,
    serial: Arc<Mutex<SerialPort>>,
    /// Where typed keys go with `--console virtio`; the UART gets them otherwise.
    virtio_console: Option<ConsoleInput>,
    /// The keyboard we press Ctrl-Alt-Del on to ask the guest to shut down.
    keyboard: Arc<Mutex<I8042>>,
    /// The disks, in the configuration's order, for a new image while the guest runs.
    drives: Vec<DriveHandle>,
    /// The disks' and network cards' limiters and counters, for the API.
    live: Arc<LiveDevices>,
    /// Every virtio device, in PCI slot order: what a pause stops and a snapshot saves.
    devices: Vec<SharedVirtio>,
    /// Where the vCPUs park while the guest is paused.
    gate: Arc<PauseGate>,
    stopper: Arc<Stopper>,
    /// Unmapped last, once nothing else of the VM is left.
    ram: GuestRam,
}

impl Vm {
    /// The disks, in the order of `VmConfig::disks`: what `PATCH /drives` changes.
    pub fn drives(&self) -> Vec<DriveHandle> {
        self.drives.clone()
    }

    /// Builds a VM from `config`. Everything in it that can stop the guest reports to `stopper`,
    /// which outlives the VM when a rebooted guest is restarted.
    pub fn build(config: &VmConfig, timeline: Arc<Timeline>, stopper: Arc<Stopper>) -> Result<Vm> {
        Vm::build_from(config, Origin::Boot, timeline, stopper)
    }

    /// Builds a VM from `config` whose guest comes from `origin`.
    pub fn build_from(config: &VmConfig, origin: Origin<'_>, timeline: Arc<Timeline>, stopper: Arc<Stopper>) -> Result<Vm> {
        let kvm_handle = open_kvm()?;
        let max_cpus = kvm_handle.get_max_vcpus();
        if usize::from(config.cpus) > max_cpus {
            return Err(Error::BadCpus { value: config.cpus.into(), why: format!("this host's KVM allows at most {max_cpus}") });
        }
        let vm = Arc::new(kvm_handle.create_vm().map_err(kvm("creating a VM"))?);
        // Memory first: KVM waits for an SRCU grace period on each change to a VM's memory
        // slots or I/O buses, and the slot goes in far quicker before the irqchip and the PIT
        // (with its worker thread) exist: main → first KVM_RUN 3.6 vs 10.7 ms median over 30
        // interleaved runs each on a loaded PVM host (tiny guest, 256 MiB).
        let mem = match origin {
            Origin::Boot => memory::create_guest_memory(config.memory_bytes(), tracking(config))?,
            Origin::Snapshot { memory_file, .. } => snapshot::memory::restore(memory_file, config.memory_bytes(), tracking(config))?,
        };
        register_memory(&vm, &mem, tracking(config))?;
        let Furnished { vcpus, pio, serial, virtio_console, keyboard, drives, live, devices, gate } =
            furnish(config, origin, &kvm_handle, &vm, &mem, &timeline, &stopper)?;
        // Asked now, not at the first fault: a vCPU thread may not read files.
        crate::fault::warn_if_host_kvm_is_pvm();
        timeline.mark(Milestone::VmBuilt);
        let config = config.clone();
        Ok(Vm { config, kvm: kvm_handle, vm, vcpus, pio, serial, virtio_console, keyboard, drives, live, devices, gate, stopper, ram: mem })
    }

    /// Starts the guest: one thread per vCPU, and what is typed routed to its console.
    pub fn start(self, console: &ConsoleRoute) -> Result<RunningVm> {
        let Vm { config, kvm, vm, vcpus, pio, serial, virtio_console, keyboard, drives, live, devices, gate, stopper, ram } = self;
        vcpu::install_kick_handler().map_err(|source| Error::Host { what: "cannot install the vCPU kick handler", source })?;
        match virtio_console {
            Some(input) => console.connect(Box::new(input)),
            None => console.connect(Box::new(serial.clone())),
        }
        let threads = start_vcpus(vcpus, &stopper);
        let (drives, devices) = (Arc::new(Mutex::new(drives)), Arc::new(Mutex::new(devices)));
        Ok(RunningVm { config, kvm, vm, threads, pio, serial, keyboard, drives, live, devices, gate, stopper, ram })
    }
}

/// A guest that is running: its vCPU threads, and what they need taken apart after them.
pub struct RunningVm {
    config: VmConfig,
    kvm: Kvm,
    vm: Arc<VmFd>,
    threads: Vec<JoinHandle<()>>,
    pio: Arc<Bus>,
    serial: Arc<Mutex<SerialPort>>,
    keyboard: Arc<Mutex<I8042>>,
    /// Shared with the API's [`VmControls`], emptied when the VM is taken apart.
    drives: Arc<Mutex<Vec<DriveHandle>>>,
    /// The disks' and network cards' limiters and counters, for the API.
    live: Arc<LiveDevices>,
    /// Every virtio device, in PCI slot order; emptied with `drives`.
    devices: Arc<Mutex<Vec<SharedVirtio>>>,
    gate: Arc<PauseGate>,
    stopper: Arc<Stopper>,
    /// Unmapped last, once nothing else of the VM is left.
    ram: GuestRam,
}

impl RunningVm {
    /// What the API may do to the running guest: pause it, press its Ctrl-Alt-Del, change a
    /// drive's image or a device's rate limiter, read the devices' counters.
    pub fn controls(&self) -> VmControls {
        VmControls {
            gate: self.gate.clone(),
            keyboard: self.keyboard.clone(),
            drives: self.drives.clone(),
            devices: self.live.clone(),
            virtio: self.devices.clone(),
            stopper: self.stopper.clone(),
        }
    }

    /// Who hears how the guest ends: `lguest exec` stops the VM through it once CMD is done.
    pub fn stopper(&self) -> Arc<Stopper> {
        self.stopper.clone()
    }

    /// Returns when the guest has stopped, for whatever reason, and takes the VM apart: every
    /// vCPU thread kicked out of KVM_RUN and joined, the devices' workers stopped, the VM
    /// closed and its memory unmapped.
    pub fn wait(self, console: &ConsoleRoute) -> StopReason {
        let mut reason = self.wait_for_stop();
        let RunningVm { kvm, vm, threads, pio, keyboard, drives, devices, gate, stopper: _, ram, serial, config: _, live: _ } = self;
        gate.end(); // a paused guest's vCPUs leave the gate, to be stopped
        lock(&drives).clear(); // the API keeps no device of this VM alive
        lock(&devices).clear();
        console.disconnect();
        let (reads, writes) = pio.absent_accesses();
        tracing::debug!(reads, writes, "port I/O to absent devices during the run");
        if let Err(stuck) = stop_vcpus(threads) {
            // The thread still holds the VM's devices and memory: they stay (see GuestRam).
            tracing::warn!("{stuck}; the VM can't be taken apart");
            if matches!(reason, StopReason::Reset) {
                reason = StopReason::HostError(format!("{stuck}, so the guest can't be restarted"));
            }
        }
        // Devices first (their workers hold the memory), then the VM and KVM, the memory last.
        drop((pio, keyboard, serial));
        drop((vm, kvm));
        drop(ram);
        reason
    }
}

impl RunningVm {
    /// Waits for the VM to stop, taking the snapshots asked for meanwhile. A shutdown request
    /// becomes Ctrl-Alt-Del on the guest's keyboard; the stopper's deadline takes care of a
    /// guest that ignores it.
    fn wait_for_stop(&self) -> StopReason {
        loop {
            match self.stopper.next_event() {
                Event::Stopped(reason) => return reason,
                Event::ShutdownRequested => {
                    if !lock(&self.keyboard).press_ctrl_alt_del() {
                        tracing::info!("the guest's keyboard is disabled: it will not see Ctrl-Alt-Del");
                    }
                }
                Event::Snapshot(job) => {
                    let _ = job.reply.send(self.save(&job.request));
                }
            }
        }
    }

    fn save(&self, request: &snapshot::CreateRequest) -> std::result::Result<(), snapshot::SnapshotError> {
        let devices = lock(&self.devices).clone();
        let parts = snapshot::save::VmParts {
            config: &self.config,
            kvm: &self.kvm,
            vm: &self.vm,
            gate: &self.gate,
            serial: &self.serial,
            keyboard: &self.keyboard,
            devices: &devices,
            mem: &self.ram,
        };
        snapshot::save::save(&parts, request)
    }
}

/// What [`furnish`] adds to a bare VM.
struct Furnished {
    vcpus: Vec<Vcpu>,
    drives: Vec<DriveHandle>,
    devices: Vec<SharedVirtio>,
    pio: Arc<Bus>,
    serial: Arc<Mutex<SerialPort>>,
    virtio_console: Option<ConsoleInput>,
    keyboard: Arc<Mutex<I8042>>,
    live: Arc<LiveDevices>,
    gate: Arc<PauseGate>,
}

/// Everything in a VM but its memory: the in-kernel interrupt controllers and PIT, ACPI
/// tables and the kernel, the devices, the vCPUs with their boot registers.
fn furnish(
    config: &VmConfig,
    origin: Origin<'_>,
    kvm_handle: &Kvm,
    vm: &Arc<VmFd>,
    mem: &GuestRam,
    timeline: &Arc<Timeline>,
    stopper: &Arc<Stopper>,
) -> Result<Furnished> {
    vm.set_tss_address(layout::KVM_TSS as usize).map_err(kvm("placing the TSS"))?;
    vm.create_irq_chip().map_err(kvm("creating the in-kernel irqchip"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm("creating the in-kernel PIT"))?;

    // A snapshot's memory has the kernel, its tables and everything else in it already.
    let entry = match origin {
        Origin::Boot => Some(boot::load_guest(mem, config, acpi::write(mem, config.cpus)?)?),
        Origin::Snapshot { .. } => None,
    };

    let (mut pio, serial, keyboard) = legacy_devices(vm, stopper, origin)?;
    let mut mmio = mmio_devices(timeline)?;
    let (devices, virtio_console, live) = virtio_devices(config, mem)?;
    let (drives, devices) = plug_pci_devices(vm, mem, devices, &mut pio, &mut mmio)?;
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));

    let base_cpuid = cpu::base_cpuid(kvm_handle)?;
    let gate = PauseGate::new(usize::from(config.cpus));
    let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
    for id in 0..config.cpus {
        let fd = vm.create_vcpu(u64::from(id)).map_err(kvm("creating a vCPU"))?;
        cpu::setup_common(&fd, &base_cpuid, id, config.cpus)?;
        match (origin, entry) {
            (Origin::Snapshot { saved, .. }, _) => snapshot::restore::vcpu(&fd, saved, id)?,
            (Origin::Boot, Some(entry)) if id == 0 => cpu::setup_boot_vcpu(&fd, mem, entry)?,
            (Origin::Boot, _) => {}
        }
        let (pio, mmio, mem, stopper, timeline) =
            (pio.clone(), mmio.clone(), GuestMemoryMmap::clone(mem), stopper.clone(), timeline.clone());
        vcpus.push(Vcpu { id, fd, pio, mmio, mem, stopper, timeline, gate: gate.clone() });
    }
    if let Origin::Snapshot { saved, paused, .. } = origin {
        snapshot::restore::machine(vm, &devices, saved)?;
        if paused {
            gate.close();
            devices.iter().for_each(|device| lock(device).pause());
        }
    }
    Ok(Furnished { vcpus, pio, serial, virtio_console, keyboard, drives, live: Arc::new(live), devices, gate })
}

/// One thread per vCPU. A thread that can't be started stops the VM; those already running
/// are stopped with it.
fn start_vcpus(vcpus: Vec<Vcpu>, stopper: &Stopper) -> Vec<JoinHandle<()>> {
    let mut threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let name = format!("vcpu{}", vcpu.id);
        match threads::spawn(name, move || vcpu.run()) {
            Ok(thread) => threads.push(thread),
            Err(e) => {
                stopper.stop(StopReason::HostError(format!("cannot start a vCPU thread: {e}")));
                break;
            }
        }
    }
    threads
}

/// How long vCPU threads get to leave KVM_RUN once kicked. Leaving takes microseconds; only a
/// thread blocked outside the guest (writing guest output to a full pipe) takes longer.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A vCPU thread that did not leave KVM_RUN when kicked, by name.
#[derive(Debug, thiserror::Error)]
#[error("vCPU thread {0} did not stop")]
struct VcpuStuck(String);

/// Kicks every vCPU thread until it has finished, then joins them all. A thread that is still
/// running after [`VCPU_STOP_TIMEOUT`] is named in the `Err`, and left alone.
fn stop_vcpus(threads: Vec<JoinHandle<()>>) -> std::result::Result<(), VcpuStuck> {
    let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
    loop {
        let running: Vec<&JoinHandle<()>> = threads.iter().filter(|t| !t.is_finished()).collect();
        if running.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(VcpuStuck(running[0].thread().name().unwrap_or("?").to_string()));
        }
        // Kicking again is harmless, and covers a thread that was between two KVM_RUNs.
        running.iter().for_each(|thread| vcpu::kick(thread));
        thread::sleep(Duration::from_millis(1));
    }
    for thread in threads {
        // A vCPU thread that panicked has already said so; there is nothing left to undo.
        let _ = thread.join();
    }
    Ok(())
}

/// Opens /dev/kvm, turning the two usual failures into advice.
fn open_kvm() -> Result<Kvm> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => Error::NoKvm,
        libc::EACCES | libc::EPERM => Error::KvmPermission,
        _ => Error::KvmOpen(std::io::Error::from_raw_os_error(e.errno())),
    })
}

fn tracking(config: &VmConfig) -> memory::Tracking {
    match config.track_dirty_pages {
        true => memory::Tracking::DirtyPages,
        false => memory::Tracking::Off,
    }
}

/// Tells KVM where each RAM range of the guest lives in our address space (slot `n` for range
/// `n`), and, with tracking on, to log which pages the vCPUs write.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap, tracking: memory::Tracking) -> Result<()> {
    let flags = match tracking {
        memory::Tracking::DirtyPages => kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
        memory::Tracking::Off => 0,
    };
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags,
        };
        // SAFETY: the range is a live mapping owned by `mem`, which the VM's vCPUs keep alive
        // (each holds a clone) for as long as the guest can run; slots don't overlap.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm("mapping guest memory"))?;
    }
    Ok(())
}

type LegacyDevices = (Bus, Arc<Mutex<SerialPort>>, Arc<Mutex<I8042>>);

/// The PC devices on the port I/O bus: COM1, the keyboard controller, the ACPI power register,
/// pvpanic.
/// A snapshot's UART and keyboard controller come back as they were saved.
fn legacy_devices(vm: &VmFd, stopper: &Arc<Stopper>, origin: Origin<'_>) -> Result<LegacyDevices> {
    let serial_irq = IrqLine(irq_line(vm, COM1_IRQ, "wiring the serial port's interrupt")?);
    let keyboard_irq = irq_line(vm, KEYBOARD_IRQ, "wiring the keyboard's interrupt")?;
    let mut keyboard = I8042::new(stopper.clone(), keyboard_irq);
    let serial = match origin {
        Origin::Boot => SerialPort::new(serial_irq, Box::new(Stdout)),
        Origin::Snapshot { saved, .. } => {
            keyboard.restore_state(&saved.keyboard).map_err(snapshot::SnapshotError::Invalid)?;
            SerialPort::restored(serial_irq, Box::new(Stdout), &saved.serial).map_err(snapshot::SnapshotError::Invalid)?
        }
    };
    let (serial, keyboard) = (Arc::new(Mutex::new(serial)), Arc::new(Mutex::new(keyboard)));
    let mut pio = Bus::new("pio");
    let devices: [(u64, u64, SharedDevice); 4] = [
        (COM1_PORT, COM1_LEN, serial.clone()),
        (I8042_PORT, I8042_LEN, keyboard.clone()),
        (u64::from(POWER_PORT), POWER_LEN, Arc::new(Mutex::new(SleepResetRegister::new(stopper.clone())))),
        (PVPANIC_PORT, PVPANIC_LEN, Arc::new(Mutex::new(PvPanic::new(stopper.clone())))),
    ];
    for (base, len, device) in devices {
        claim(&mut pio, base, len, device)?;
    }
    Ok((pio, serial, keyboard))
}

/// An eventfd that raises the guest's interrupt `gsi` when written.
fn irq_line(vm: &VmFd, gsi: u32, what: &'static str) -> Result<EventFd> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Host { what: "cannot create an eventfd", source })?;
    vm.register_irqfd(&irq, gsi).map_err(kvm(what))?;
    Ok(irq)
}

/// The devices on the MMIO bus: so far only the boot timer.
fn mmio_devices(timeline: &Arc<Timeline>) -> Result<Bus> {
    let mut mmio = Bus::new("mmio");
    let boot_timer = Arc::new(Mutex::new(BootTimer::new(timeline.clone())));
    claim(&mut mmio, BOOT_TIMER_ADDR, BOOT_TIMER_LEN, boot_timer)?;
    Ok(mmio)
}

type NamedDevice = (&'static str, Box<dyn VirtioDevice>);

/// The name a disk is reported by (and recognised by, for its [`DriveHandle`]).
const BLOCK: &str = "virtio-blk";

/// Every virtio device the configuration asks for, each with the name it is reported by, the
/// virtio console's input if there is one, and the disks' and cards' handles for the API (a
/// vhost-net card has none: its frames never pass through us to be limited or counted). The
/// UART stays either way: early boot messages go there. `mem` is for vhost-net, which is told
/// where guest memory lies when its card is made (the open happens here, on the main thread).
fn virtio_devices(config: &VmConfig, mem: &GuestMemoryMmap) -> Result<(Vec<NamedDevice>, Option<ConsoleInput>, LiveDevices)> {
    let mut devices: Vec<NamedDevice> = Vec::new();
    let mut console_input = None;
    let mut live = LiveDevices::default();
    if config.console == ConsoleKind::Virtio {
        let console = Console::new(Box::new(Stdout))
            .map_err(|source| Error::Host { what: "cannot create the virtio console", source })?;
        console_input = Some(console.input());
        devices.push(("virtio-console", Box::new(console)));
    }
    for disk in &config.disks {
        let block = Block::new(disk)?;
        live.disks.push(block.handle());
        devices.push((BLOCK, Box::new(block)));
    }
    for net in &config.nets {
        if let NetBackend::Tap { name, vhost: true } = &net.backend {
            devices.push(("vhost-net", Box::new(VhostNet::new(net, name, mem, config.cpus)?)));
            continue;
        }
        let net = Net::new(net, config.cpus)?;
        live.nets.push(net.handle());
        devices.push(("virtio-net", Box::new(net)));
    }
    if config.rng {
        let rng = Rng::limited(config.rng_rate_limit)
            .map_err(|source| Error::Host { what: "cannot create the entropy source's rate-limit timer", source })?;
        devices.push(("virtio-rng", Box::new(rng)));
    }
    if let Some(vsock) = &config.vsock {
        // Bound here, on the main thread: the device's worker may not touch the file system.
        devices.push(("virtio-vsock", Box::new(Vsock::new(vsock.cid, &vsock.uds_path)?)));
    }
    for share in &config.shares {
        // Opened here, on the main thread: a directory that can't be served fails the start.
        let fs = Fs::new(share).map_err(|source| Error::Share { dir: share.dir.clone(), source })?;
        devices.push(("virtio-fs", Box::new(fs)));
    }
    Ok((devices, console_input, live))
}

/// The PCI root on the configuration ports, and each virtio device in a slot of its own: its
/// BAR on the MMIO bus, its queues' notify addresses given to KVM as ioeventfds. Returns the
/// disks, and every device.
fn plug_pci_devices(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    devices: Vec<NamedDevice>,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<(Vec<DriveHandle>, Vec<SharedVirtio>)> {
    let routes = Arc::new(MsiRoutes::new(vm.clone()));
    let mut root = PciRoot::new();
    let mut drives = Vec::new();
    let mut plugged = Vec::new();
    for (kind, device) in devices {
        // VmConfig has checked the count against MAX_PCI_DEVICES already.
        let slot = root.next_slot().ok_or(Error::Internal { what: "the PCI bus", why: "more devices than slots".into() })?;
        let bar = layout::PCI_WINDOW + slot as u64 * BAR_SIZE;
        let name = format!("{kind} at 00:{slot:02x}.0");
        let pci = VirtioPci::new(name, device, mem.clone(), bar as u32, routes.clone())
            .map_err(|source| Error::Host { what: "cannot set up a virtio device's interrupts", source })?;
        for (addr, eventfd) in pci.notify_eventfds() {
            vm.register_ioevent(eventfd, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(kvm("registering a queue's notify address"))?;
        }
        let pci = Arc::new(Mutex::new(pci));
        claim(mmio, bar, BAR_SIZE, pci.clone())?;
        if kind == BLOCK {
            drives.push(DriveHandle::new(pci.clone()));
        }
        plugged.push(pci.clone());
        root.plug(pci);
    }
    claim(pio, CONFIG_PORT, CONFIG_PORT_LEN, Arc::new(Mutex::new(root)))?;
    Ok((drives, plugged))
}

/// Places a device on a bus; an overlap is our own bug in the device map, reported as such.
fn claim(bus: &mut Bus, base: u64, len: u64, device: SharedDevice) -> Result<()> {
    bus.insert(base, len, device).map_err(|e| Error::Internal { what: "the device map", why: e.to_string() })
}
