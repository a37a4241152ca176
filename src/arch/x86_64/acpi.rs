//! The ACPI tables a stock kernel reads at boot: which CPUs and interrupt controllers exist,
//! and how to power the machine off.
//!
//! We describe a *hardware-reduced* ACPI machine (no PM timer, no legacy PIC, no SMI): the
//! kernel then skips probing a pile of legacy hardware that we would only have to emulate. Its
//! `poweroff` and `reboot` go through one byte-wide register, served by
//! [`crate::devices::power::SleepResetRegister`]. The few ISA devices we do have (COM1, the
//! keyboard controller, pvpanic) are named in the DSDT with their ports and interrupts: on such
//! a machine that is the only way the kernel finds them, and it finds them without probing. The
//! tables are built with `acpi_tables` and copied into the reserved area Linux scans for the
//! RSDP.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};
use crate::memory::GuestMemoryMmap;

use crate::devices::i8042::{COMMAND_PORT, DATA_PORT, KEYBOARD_IRQ};
use crate::devices::power::{POWER_PORT, RESET_VALUE, SLEEP_TYPE_S5};
use crate::devices::pvpanic::{PVPANIC_LEN, PVPANIC_PORT};
use crate::devices::serial::{COM1_IRQ, COM1_LEN, COM1_PORT};
use crate::error::{guest_write, Error, Result};
use crate::memory::layout;
use crate::pci;

const OEM_ID: [u8; 6] = *b"LGUEST";
const OEM_TABLE_ID: [u8; 8] = *b"LGUESTVM";
const OEM_REVISION: u32 = 1;
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// Each table, with the guest address it goes to. The RSDP comes first, at the area's start.
pub struct AcpiTables {
    pub tables: Vec<(u64, Vec<u8>)>,
    pub rsdp: u64,
}

/// Builds every table for a guest with `cpus` vCPUs, laid out from `base` up.
pub fn build(cpus: u8, base: u64) -> AcpiTables {
    let mut next = base + 64; // room for the 36-byte RSDP
    let mut place = |bytes: Vec<u8>, tables: &mut Vec<(u64, Vec<u8>)>| {
        let addr = next;
        next = (next + bytes.len() as u64 + 15) & !15;
        tables.push((addr, bytes));
        addr
    };
    let mut tables = Vec::new();
    let dsdt = place(dsdt(), &mut tables);
    let fadt = place(fadt(dsdt), &mut tables);
    let madt = place(madt(cpus), &mut tables);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt_addr = place(to_bytes(&xsdt), &mut tables);
    tables.insert(0, (base, to_bytes(&Rsdp::new(OEM_ID, xsdt_addr))));
    AcpiTables { tables, rsdp: base }
}

/// Writes the tables into the reserved ACPI area and returns the RSDP's address.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<u64> {
    let acpi = build(cpus, layout::ACPI);
    for (addr, bytes) in &acpi.tables {
        if addr + bytes.len() as u64 > layout::ACPI_END {
            return Err(Error::Internal { what: "ACPI tables", why: "they outgrew their area".into() });
        }
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(guest_write("ACPI tables"))?;
    }
    Ok(acpi.rsdp)
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT: `\_S5_`, the sleep type the kernel writes to power off, and COM1. A
/// hardware-reduced guest has no legacy PIC and so no ISA IRQs of its own: a device's
/// interrupt exists for it only if ACPI names it, as here in COM1's `_CRS`.
fn dsdt() -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&SLEEP_TYPE_S5]));
    dsdt.append_slice(&to_bytes(&s5));
    dsdt.append_slice(&com1());
    dsdt.append_slice(&keyboard());
    dsdt.append_slice(&pvpanic());
    dsdt.append_slice(&pci_root());
    dsdt.as_slice().to_vec()
}

/// The PCI host bridge (PNP0A03) and what it decodes: bus 0, the configuration ports, the
/// rest of port space, and the memory window our BARs sit in. The kernel keeps BARs that lie
/// inside a window its firmware described, so it never tries to move ours.
fn pci_root() -> Vec<u8> {
    let hid_value = aml::EISAName::new("PNP0A03");
    let hid = aml::Name::new("_HID".into(), &hid_value);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let buses = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let config_ports = aml::IO::new(pci::CONFIG_PORT as u16, pci::CONFIG_PORT as u16, 1, pci::CONFIG_PORT_LEN as u8);
    let ports_below = aml::AddressSpace::new_io(0u16, pci::CONFIG_PORT as u16 - 1, None);
    let ports_above = aml::AddressSpace::new_io((pci::CONFIG_PORT + pci::CONFIG_PORT_LEN) as u16, 0xffffu16, None);
    let window = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_WINDOW as u32,
        (layout::PCI_WINDOW + layout::PCI_WINDOW_SIZE - 1) as u32,
        None,
    );
    let resources = aml::ResourceTemplate::new(vec![&buses, &config_ports, &ports_below, &ports_above, &window]);
    let crs = aml::Name::new("_CRS".into(), &resources);
    to_bytes(&aml::Device::new("\\_SB_.PCI0".into(), vec![&hid, &uid, &adr, &seg, &bbn, &crs]))
}

/// COM1 as the PNP0501 device the kernel's 8250 PNP driver binds to, with its I/O range
/// and its edge-triggered IRQ.
fn com1() -> Vec<u8> {
    let port = COM1_PORT as u16;
    let hid_value = aml::EISAName::new("PNP0501");
    let hid = aml::Name::new("_HID".into(), &hid_value);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let io = aml::IO::new(port, port, 1, COM1_LEN as u8);
    let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let resources = aml::ResourceTemplate::new(vec![&io, &irq]);
    let crs = aml::Name::new("_CRS".into(), &resources);
    to_bytes(&aml::Device::new("\\_SB_.COM1".into(), vec![&hid, &uid, &crs]))
}

/// The keyboard controller as a PNP0303 keyboard, for Linux's i8042 PNP probe: its two ports
/// and IRQ 1. Naming no PS/2 mouse (PNP0F13) tells the driver there is none to look for.
fn keyboard() -> Vec<u8> {
    let hid_value = aml::EISAName::new("PNP0303");
    let hid = aml::Name::new("_HID".into(), &hid_value);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let data = aml::IO::new(DATA_PORT, DATA_PORT, 1, 1);
    let command = aml::IO::new(COMMAND_PORT, COMMAND_PORT, 1, 1);
    let irq = aml::Interrupt::new(true, true, false, false, KEYBOARD_IRQ);
    let resources = aml::ResourceTemplate::new(vec![&data, &command, &irq]);
    let crs = aml::Name::new("_CRS".into(), &resources);
    to_bytes(&aml::Device::new("\\_SB_.PS2K".into(), vec![&hid, &uid, &crs]))
}

/// The pvpanic port, as QEMU names it (`QEMU0001`), for the kernel's pvpanic driver.
fn pvpanic() -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &"QEMU0001");
    let port = PVPANIC_PORT as u16;
    let io = aml::IO::new(port, port, 1, PVPANIC_LEN as u8);
    let resources = aml::ResourceTemplate::new(vec![&io]);
    let crs = aml::Name::new("_CRS".into(), &resources);
    to_bytes(&aml::Device::new("\\_SB_.PEVT".into(), vec![&hid, &crs]))
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let power = GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(POWER_PORT));
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt);
    fadt.sleep_control_reg = power;
    fadt.sleep_status_reg = power;
    fadt.reset_reg = power;
    fadt.reset_value = RESET_VALUE;
    // A keyboard controller; no VGA, and no CMOS clock to probe for seconds: kvm-clock tells
    // the time.
    fadt.iapc_boot_arch = (IAPC_8042 | IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    to_bytes(&fadt.finalize())
}

/// One local APIC per vCPU (APIC ID = vCPU index) and the IOAPIC, whose ID follows theirs.
fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, LocalInterruptController::Address(layout::LAPIC as u32));
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(cpus, layout::IOAPIC as u32, 0));
    to_bytes(&madt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table<'a>(acpi: &'a AcpiTables, signature: &[u8]) -> &'a [u8] {
        acpi.tables.iter().map(|(_, b)| b.as_slice()).find(|b| b.starts_with(signature)).expect("table present")
    }

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    #[test]
    fn every_table_checksums_and_states_its_length() {
        let acpi = build(2, layout::ACPI);
        for (_, bytes) in &acpi.tables {
            assert!(checksum_ok(bytes), "{:?} checksum", &bytes[..4]);
            if !bytes.starts_with(b"RSD PTR ") {
                let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
                assert_eq!(len, bytes.len(), "{:?} length", &bytes[..4]);
            }
        }
        assert!(checksum_ok(&table(&acpi, b"RSD PTR ")[..20]), "RSDP's first checksum");
    }

    #[test]
    fn tables_do_not_overlap_and_fit_the_area() {
        let acpi = build(254, layout::ACPI);
        let mut spans: Vec<(u64, u64)> = acpi.tables.iter().map(|(a, b)| (*a, a + b.len() as u64)).collect();
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[0].1 <= pair[1].0);
        }
        assert!(spans.last().map(|s| s.1).unwrap_or(0) <= layout::ACPI_END);
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        for cpus in [1u8, 2, 4] {
            let acpi = build(cpus, layout::ACPI);
            let madt = table(&acpi, b"APIC");
            let mut entries = Vec::new();
            let mut at = 44;
            while at < madt.len() {
                entries.push((madt[at], madt[at + 2], madt[at + 3]));
                at += usize::from(madt[at + 1]);
            }
            let lapics: Vec<_> = entries.iter().filter(|e| e.0 == 0).collect();
            assert_eq!(lapics.len(), usize::from(cpus));
            for (index, lapic) in lapics.iter().enumerate() {
                assert_eq!((lapic.1, lapic.2), (index as u8, index as u8), "uid and APIC ID");
            }
            assert_eq!(entries.iter().filter(|e| e.0 == 1).count(), 1, "one IOAPIC");
        }
    }

    #[test]
    fn rsdp_points_at_an_xsdt_listing_fadt_and_madt() {
        let acpi = build(1, layout::ACPI);
        let rsdp = table(&acpi, b"RSD PTR ");
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().expect("8 bytes"));
        let (_, xsdt) = acpi.tables.iter().find(|(a, _)| *a == xsdt_addr).expect("xsdt at its address");
        assert!(xsdt.starts_with(b"XSDT"));
        let listed: Vec<&[u8]> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .map(|addr| &acpi.tables.iter().find(|(a, _)| *a == addr).expect("listed table").1[..4])
            .collect();
        assert_eq!(listed, vec![b"FACP".as_slice(), b"APIC".as_slice()]);
    }

    #[test]
    fn dsdt_describes_com1_s5_and_the_pci_root() {
        let acpi = build(1, layout::ACPI);
        let dsdt = table(&acpi, b"DSDT");
        let contains = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"_S5_") && contains(b"COM1") && contains(b"_CRS"));
        // PNP0501 in its compressed EISA form.
        assert!(contains(&[0x41, 0xd0, 0x05, 0x01]));
        // PCI0 as PNP0A03, with a DWordMemory window starting at the PCI window.
        assert!(contains(b"PCI0") && contains(&[0x41, 0xd0, 0x0a, 0x03]));
        assert!(contains(&(layout::PCI_WINDOW as u32).to_le_bytes()));
    }

    #[test]
    fn dsdt_describes_the_keyboard_and_pvpanic() {
        let acpi = build(1, layout::ACPI);
        let dsdt = table(&acpi, b"DSDT");
        let contains = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        // PNP0303 compressed; IO descriptors (0x47, decode16) for 0x60 and 0x64.
        assert!(contains(b"PS2K") && contains(&[0x41, 0xd0, 0x03, 0x03]));
        assert!(contains(&[0x47, 0x01, 0x60, 0x00, 0x60, 0x00]) && contains(&[0x47, 0x01, 0x64, 0x00, 0x64, 0x00]));
        assert!(contains(b"PEVT") && contains(b"QEMU0001\0"));
        assert!(contains(&[0x47, 0x01, 0x05, 0x05, 0x05, 0x05]));
    }

    #[test]
    fn fadt_is_hardware_reduced_with_our_power_register() {
        let acpi = build(1, layout::ACPI);
        let fadt = table(&acpi, b"FACP");
        let flags = u32::from_le_bytes(fadt[112..116].try_into().expect("4 bytes"));
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        // SLEEP_CONTROL_REG is a GAS at offset 244: space, width, offset, access, address.
        assert_eq!(fadt[244], 1, "system I/O");
        assert_eq!(u64::from_le_bytes(fadt[248..256].try_into().expect("8 bytes")), u64::from(POWER_PORT));
        // IAPC_BOOT_ARCH at offset 109: an 8042, no VGA, no CMOS clock.
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), IAPC_8042 | IAPC_NO_VGA | IAPC_NO_CMOS_RTC);
    }
}
