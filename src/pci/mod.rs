//! The PCI bus: how a stock kernel finds our virtio devices.
//!
//! Distro kernels look for virtio devices on PCI (late lguest put its devices there too). We
//! give them the smallest PCI a kernel accepts: one bus, a host bridge at 00:00.0, and one
//! function per device at 00:01.0, 00:02.0 and so on. The kernel reaches configuration space
//! through the classic port pair 0xCF8 (address) / 0xCFC (data), which [`PciRoot`] serves on
//! the port I/O bus. Each device's registers live in a memory BAR the VMM places in the PCI
//! window below 4 GiB ([`crate::memory::layout::PCI_WINDOW`]), described to the kernel in the
//! ACPI DSDT so it keeps our placement.
//!
//! Configuration accesses come from the guest: any address, any width. Functions other than 0,
//! buses other than 0 and empty slots read as all ones, like an empty slot on real hardware.

pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex};

use crate::bus::{lock, BusDevice};
use config::{Identity, PciConfig};

/// The configuration address and data ports.
pub const CONFIG_PORT: u64 = 0xcf8;
pub const CONFIG_PORT_LEN: u64 = 8;
/// One bus of 32 slots; slot 0 is the host bridge.
pub const SLOTS: usize = 32;

/// A PCI function's view of its configuration space, at byte `offset` (0..256).
pub trait PciDevice: Send {
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    fn config_write(&mut self, offset: usize, data: &[u8]);
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Bus 0: the host bridge and the devices plugged into it.
pub struct PciRoot {
    slots: Vec<Option<SharedPciDevice>>,
    /// The last value written to 0xCF8.
    address: u32,
}

const ENABLE: u32 = 1 << 31;

impl Default for PciRoot {
    fn default() -> Self {
        PciRoot::new()
    }
}

impl PciRoot {
    pub fn new() -> PciRoot {
        let mut slots = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())) as SharedPciDevice);
        PciRoot { slots, address: 0 }
    }

    /// Plugs `device` into the next free slot and returns the slot number, or `None` when the
    /// bus is full.
    pub fn plug(&mut self, device: SharedPciDevice) -> Option<usize> {
        let slot = self.slots.iter().position(Option::is_none)?;
        self.slots[slot] = Some(device);
        Some(slot)
    }

    /// The free slot [`PciRoot::plug`] will use next.
    pub fn next_slot(&self) -> Option<usize> {
        self.slots.iter().position(Option::is_none)
    }

    /// Which device and register the current address selects, if any.
    fn selected(&self) -> Option<(&SharedPciDevice, usize)> {
        let (enabled, bus, slot, function) =
            (self.address & ENABLE != 0, (self.address >> 16) & 0xff, (self.address >> 11) & 0x1f, (self.address >> 8) & 7);
        if !enabled || bus != 0 || function != 0 {
            return None;
        }
        let device = self.slots.get(slot as usize)?.as_ref()?;
        Some((device, (self.address & 0xfc) as usize))
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => {
                if let Some((device, register)) = self.selected() {
                    lock(device).config_read(register + (offset as usize - 4), data);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
            4..=7 => {
                if let Some((device, register)) = self.selected() {
                    lock(device).config_write(register + (offset as usize - 4), data);
                }
            }
            _ => {}
        }
    }
}

/// The host bridge at 00:00.0: nothing but an identity, which is what kernels check for
/// before trusting configuration mechanism #1.
struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    fn new() -> HostBridge {
        // Red Hat's "QEMU PCIe host bridge" IDs: known to every kernel, no quirks attached.
        let id = Identity { vendor: 0x1b36, device: 0x0008, revision: 0, class: 0x06_00_00, subsystem_vendor: 0x1b36, subsystem: 0x0008 };
        HostBridge { config: PciConfig::new(&id) }
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(root: &mut PciRoot, slot: u32, function: u32, register: u32) {
        root.write(0, &(ENABLE | slot << 11 | function << 8 | register).to_le_bytes());
    }

    fn read32(root: &mut PciRoot) -> u32 {
        let mut data = [0u8; 4];
        root.read(4, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn the_address_register_reads_back_for_the_type1_probe() {
        let mut root = PciRoot::new();
        root.write(0, &0x8000_0000u32.to_le_bytes());
        let mut data = [0u8; 4];
        root.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x8000_0000);
        root.write(3, &[1]); // byte writes to 0xCFB are ignored
        root.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x8000_0000);
    }

    #[test]
    fn the_host_bridge_is_at_slot_zero_and_empty_slots_read_ones() {
        let mut root = PciRoot::new();
        select(&mut root, 0, 0, 0);
        assert_eq!(read32(&mut root), 0x0008_1b36);
        select(&mut root, 0, 0, 8);
        assert_eq!(read32(&mut root) >> 8, 0x06_00_00);
        select(&mut root, 5, 0, 0);
        assert_eq!(read32(&mut root), u32::MAX);
        select(&mut root, 0, 1, 0);
        assert_eq!(read32(&mut root), u32::MAX, "function 1 is absent");
        root.write(0, &(5u32 << 16).to_le_bytes()); // bus 5, and not enabled
        assert_eq!(read32(&mut root), u32::MAX);
    }

    #[test]
    fn narrow_accesses_reach_the_right_bytes() {
        let mut root = PciRoot::new();
        select(&mut root, 0, 0, 0);
        let mut word = [0u8; 2];
        root.read(6, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x0008);
        let mut byte = [0u8; 1];
        root.read(5, &mut byte);
        assert_eq!(byte, [0x1b]);
    }

    #[test]
    fn devices_fill_the_free_slots_until_the_bus_is_full() {
        let mut root = PciRoot::new();
        for expected in 1..SLOTS {
            let device: SharedPciDevice = Arc::new(Mutex::new(HostBridge::new()));
            assert_eq!(root.plug(device), Some(expected));
        }
        assert_eq!(root.plug(Arc::new(Mutex::new(HostBridge::new()))), None);
    }
}
