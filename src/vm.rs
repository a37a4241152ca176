//! Building a VM from its configuration, running it, and waiting for it to stop.
//!
//! The order matters and follows a guest's life: open KVM, make the VM and its in-kernel
//! interrupt controllers and PIT, map guest memory, write the ACPI tables and load the kernel,
//! plug in the devices, set up each vCPU's registers; then start one thread per vCPU, hand the
//! terminal to the guest, and wait for the first [`StopReason`].

use std::sync::{Arc, Mutex};
use std::thread;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{acpi, boot, cpu};
use crate::bus::{Bus, SharedDevice};
use crate::config::VmConfig;
use crate::console;
use crate::devices::boot_timer::{BootTimer, BOOT_TIMER_ADDR, BOOT_TIMER_LEN};
use crate::devices::i8042::{I8042, I8042_LEN, I8042_PORT};
use crate::devices::power::{PowerButton, POWER_LEN, POWER_PORT};
use crate::devices::serial::{IrqLine, SerialPort, Stdout, COM1_IRQ, COM1_LEN, COM1_PORT};
use crate::error::{kvm, Error, Result};
use crate::memory::{self, layout};
use crate::pci::msix::MsiRoutes;
use crate::pci::{PciRoot, CONFIG_PORT, CONFIG_PORT_LEN};
use crate::config::ConsoleKind;
use crate::virtio::block::Block;
use crate::virtio::console::{Console, ConsoleInput};
use crate::virtio::net::Net;
use crate::virtio::rng::Rng;
use crate::virtio::transport::{VirtioPci, BAR_SIZE};
use crate::virtio::VirtioDevice;
use crate::stop::{StopReason, Stopper};
use crate::timeline::{Milestone, Timeline};
use crate::vcpu::Vcpu;

/// A VM ready to run: everything built, no guest instruction executed yet.
pub struct Vm {
    // Kept open for the VM's lifetime: the vCPUs and memory slots belong to it.
    _kvm: Kvm,
    _vm: Arc<VmFd>,
    vcpus: Vec<Vcpu>,
    pio: Arc<Bus>,
    serial: Arc<Mutex<SerialPort>>,
    /// Where typed keys go with `--console virtio`; the UART gets them otherwise.
    virtio_console: Option<ConsoleInput>,
    stopper: Arc<Stopper>,
}

impl Vm {
    pub fn build(config: &VmConfig, timeline: Arc<Timeline>) -> Result<Vm> {
        let kvm_handle = open_kvm()?;
        let max_cpus = kvm_handle.get_max_vcpus();
        if usize::from(config.cpus) > max_cpus {
            return Err(Error::BadCpus { value: config.cpus.into(), why: format!("this host's KVM allows at most {max_cpus}") });
        }
        let vm = Arc::new(kvm_handle.create_vm().map_err(kvm("creating a VM"))?);
        vm.set_tss_address(layout::KVM_TSS as usize).map_err(kvm("placing the TSS"))?;
        vm.create_irq_chip().map_err(kvm("creating the in-kernel irqchip"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(kvm("creating the in-kernel PIT"))?;

        let mem = memory::create_guest_memory(config.memory_bytes())?;
        register_memory(&vm, &mem)?;
        let rsdp = acpi::write(&mem, config.cpus)?;
        let entry = boot::load_guest(&mem, config, rsdp)?;

        let stopper = Arc::new(Stopper::default());
        let (mut pio, serial) = legacy_devices(&vm, &stopper)?;
        let mut mmio = mmio_devices(&timeline)?;
        let (devices, virtio_console) = virtio_devices(config)?;
        plug_pci_devices(&vm, &mem, devices, &mut pio, &mut mmio)?;
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));

        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for id in 0..config.cpus {
            let fd = vm.create_vcpu(u64::from(id)).map_err(kvm("creating a vCPU"))?;
            cpu::setup_common(&kvm_handle, &fd, id, config.cpus)?;
            if id == 0 {
                cpu::setup_boot_vcpu(&fd, &mem, entry)?;
            }
            let (pio, mmio, mem, stopper, timeline) =
                (pio.clone(), mmio.clone(), mem.clone(), stopper.clone(), timeline.clone());
            vcpus.push(Vcpu { id, fd, pio, mmio, mem, stopper, timeline });
        }
        timeline.mark(Milestone::VmBuilt);
        Ok(Vm { _kvm: kvm_handle, _vm: vm, vcpus, pio, serial, virtio_console, stopper })
    }

    /// Starts the guest and returns when it has stopped, for whatever reason.
    pub fn run(self) -> Result<StopReason> {
        let host = |what| move |source| Error::Host { what, source };
        console::watch_signals(self.stopper.clone()).map_err(host("cannot watch signals"))?;
        let interactive = console::stdin_is_terminal();
        if interactive {
            console::enter_raw_mode();
        }
        let pumped = match &self.virtio_console {
            Some(input) => console::pump_stdin(input.clone(), self.stopper.clone(), interactive),
            None => console::pump_stdin(self.serial.clone(), self.stopper.clone(), interactive),
        };
        pumped.map_err(host("cannot start the console thread"))?;
        for vcpu in self.vcpus {
            let name = format!("vcpu{}", vcpu.id);
            thread::Builder::new().name(name).spawn(move || vcpu.run()).map_err(host("cannot start a vCPU thread"))?;
        }
        let reason = self.stopper.wait();
        let (reads, writes) = self.pio.absent_accesses();
        tracing::debug!(reads, writes, "port I/O to absent devices during the run");
        Ok(reason)
    }
}

/// Opens /dev/kvm, turning the two usual failures into advice.
fn open_kvm() -> Result<Kvm> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => Error::NoKvm,
        libc::EACCES | libc::EPERM => Error::KvmPermission,
        _ => Error::KvmOpen(std::io::Error::from_raw_os_error(e.errno())),
    })
}

/// Tells KVM where each RAM range of the guest lives in our address space.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the range is a live mapping owned by `mem`, which the VM's vCPUs keep alive
        // (each holds a clone) for as long as the guest can run; slots don't overlap.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm("mapping guest memory"))?;
    }
    Ok(())
}

/// The PC devices on the port I/O bus: COM1, the keyboard controller, the ACPI power register.
fn legacy_devices(vm: &VmFd, stopper: &Arc<Stopper>) -> Result<(Bus, Arc<Mutex<SerialPort>>)> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Host { what: "cannot create an eventfd", source })?;
    vm.register_irqfd(&irq, COM1_IRQ).map_err(kvm("wiring the serial port's interrupt"))?;
    let serial = Arc::new(Mutex::new(SerialPort::new(IrqLine(irq), Box::new(Stdout))));
    let mut pio = Bus::new("pio");
    let devices: [(u64, u64, SharedDevice); 3] = [
        (COM1_PORT, COM1_LEN, serial.clone()),
        (I8042_PORT, I8042_LEN, Arc::new(Mutex::new(I8042::new(stopper.clone())))),
        (u64::from(POWER_PORT), POWER_LEN, Arc::new(Mutex::new(PowerButton::new(stopper.clone())))),
    ];
    for (base, len, device) in devices {
        claim(&mut pio, base, len, device)?;
    }
    Ok((pio, serial))
}

/// The devices on the MMIO bus: so far only the boot timer.
fn mmio_devices(timeline: &Arc<Timeline>) -> Result<Bus> {
    let mut mmio = Bus::new("mmio");
    let boot_timer = Arc::new(Mutex::new(BootTimer::new(timeline.clone())));
    claim(&mut mmio, BOOT_TIMER_ADDR, BOOT_TIMER_LEN, boot_timer)?;
    Ok(mmio)
}

type NamedDevice = (&'static str, Box<dyn VirtioDevice>);

/// The virtio devices the configuration asks for, each with the name it is reported by, and
/// the virtio console's input if there is one. The UART stays either way: early boot messages
/// go there.
fn virtio_devices(config: &VmConfig) -> Result<(Vec<NamedDevice>, Option<ConsoleInput>)> {
    let mut devices: Vec<NamedDevice> = Vec::new();
    let mut console_input = None;
    if config.console == ConsoleKind::Virtio {
        let console = Console::new(Box::new(Stdout))
            .map_err(|source| Error::Host { what: "cannot create the virtio console", source })?;
        console_input = Some(console.input());
        devices.push(("virtio-console", Box::new(console)));
    }
    for disk in &config.disks {
        devices.push(("virtio-blk", Box::new(Block::new(disk)?)));
    }
    for net in &config.nets {
        devices.push(("virtio-net", Box::new(Net::new(net)?)));
    }
    if config.rng {
        devices.push(("virtio-rng", Box::new(Rng::new())));
    }
    Ok((devices, console_input))
}

/// The PCI root on the configuration ports, and each virtio device in a slot of its own: its
/// BAR on the MMIO bus, its queues' notify addresses given to KVM as ioeventfds.
fn plug_pci_devices(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    devices: Vec<NamedDevice>,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<()> {
    let routes = Arc::new(MsiRoutes::new(vm.clone()));
    let mut root = PciRoot::new();
    for (kind, device) in devices {
        let slot = root.next_slot().ok_or(Error::Boot { what: "the PCI bus", why: "more devices than PCI slots (31)".into() })?;
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
        root.plug(pci);
    }
    claim(pio, CONFIG_PORT, CONFIG_PORT_LEN, Arc::new(Mutex::new(root)))
}

/// Places a device on a bus; an overlap is our own bug in the device map, reported as such.
fn claim(bus: &mut Bus, base: u64, len: u64, device: SharedDevice) -> Result<()> {
    bus.insert(base, len, device).map_err(|e| Error::Boot { what: "the device map", why: e.to_string() })
}
