//! Fuzzes PCI configuration mechanism #1: the guest's port I/O to 0xCF8 (address) and 0xCFC
//! (data), the first thing a kernel does on PCI, reaching the host bridge's and a virtio
//! device's 256-byte configuration spaces (BAR sizing, the command register, the capability
//! list and the MSI-X control word). A malicious guest could otherwise crash the VMM with an
//! odd width, an unaligned data port access, a register past the end of the space, or a BAR
//! write meant to move the device; BARs must never move, and the identity must read back.
#![no_main]

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lguest::bus::BusDevice;
use lguest::pci::msix::MsiRoutes;
use lguest::pci::{PciRoot, SharedPciDevice};
use lguest::virtio::transport::VirtioPci;
use lguest_fuzz::{memory, value_bytes, Probe};

const BAR: u32 = 0xc000_0000;

#[derive(Arbitrary, Debug)]
enum Op {
    /// Selects bus/slot/function/register the way a kernel does (enable bit set).
    Select { slot: u8, function: u8, register: u8 },
    Read { port: u8, len: u8 },
    Write { port: u8, value: u64, len: u8 },
}

fn select(root: &mut PciRoot, slot: u32, register: u32) {
    root.write(0, &(1u32 << 31 | slot << 11 | register).to_le_bytes());
}

fn read32(root: &mut PciRoot) -> u32 {
    let mut data = [0u8; 4];
    root.read(4, &mut data);
    u32::from_le_bytes(data)
}

fuzz_target!(|ops: Vec<Op>| {
    let mut root = PciRoot::new();
    let probe = Probe { sizes: vec![16, 16], features: 0, config: vec![], refuse: false, activations: Arc::new(AtomicUsize::new(0)) };
    let virtio = VirtioPci::new("fuzz".into(), Box::new(probe), memory(), BAR, Arc::new(MsiRoutes::detached())).expect("transport");
    let slot = root.plug(Arc::new(Mutex::new(virtio)) as SharedPciDevice).expect("a free slot");
    for op in ops.iter().take(512) {
        match *op {
            Op::Select { slot, function, register } => {
                let address = 1u32 << 31 | u32::from(slot % 32) << 11 | u32::from(function % 8) << 8 | u32::from(register);
                root.write(0, &address.to_le_bytes());
            }
            Op::Read { port, len } => root.read(u64::from(port % 8), &mut vec![0; usize::from(len % 9)]),
            Op::Write { port, value, len } => root.write(u64::from(port % 8), &value_bytes(value, len)),
        }
    }
    // Whatever the guest did, the devices are still who they were and the BAR has not moved.
    select(&mut root, 0, 0);
    assert_eq!(read32(&mut root), 0x0008_1b36, "the host bridge's identity");
    select(&mut root, slot as u32, 0);
    assert_eq!(read32(&mut root), 0x1044_1af4, "the virtio device's identity");
    select(&mut root, slot as u32, 0x10);
    root.write(4, &BAR.to_le_bytes()); // ends any sizing in progress
    assert_eq!(read32(&mut root), BAR, "the BAR moved");
});
