//! Fuzzes the virtio PCI transport: a sequence of guest accesses to the device's BAR (common
//! config, ISR, device config, notify, MSI-X table and PBA) and PCI configuration space, in any
//! order, at any offset and width, with guest memory changing in between. This is the register
//! file every guest driver pokes before a single request is served: a malicious guest could
//! otherwise crash the VMM with a queue select past the end, a size that isn't a power of two,
//! rings outside memory at DRIVER_OK, or a vector that doesn't exist. After every access the
//! transport must still be consistent: DRIVER_OK only with FEATURES_OK, vectors that exist or
//! NO_VECTOR, the queue count as built, and a reset that restores the power-on registers.
#![no_main]

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lguest::bus::BusDevice;
use lguest::pci::msix::{MsiRoutes, NO_VECTOR};
use lguest::pci::PciDevice;
use lguest::virtio::console::Console;
use lguest::virtio::fs::Fs;
use lguest::virtio::net::Net;
use lguest::virtio::net::tap::Tap;
use lguest::virtio::rng::Rng;
use lguest::virtio::transport::{VirtioPci, BAR_SIZE};
use lguest::virtio::vsock::Vsock;
use lguest::virtio::VirtioDevice;
use lguest_fuzz::{memory, poke, value_bytes, Probe};

const STATUS: u64 = 0x14;
const FEATURES_OK: u8 = 8;
const DRIVER_OK: u8 = 4;

#[derive(Arbitrary, Debug)]
enum Device {
    Probe { sizes: Vec<u8>, features: u64, config: Vec<u8>, refuse: bool },
    Rng,
    Console,
    Net,
    Vsock,
    Fs,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A common-config register (offset below 0x40), where the driver spends its time.
    Common { offset: u8, value: u64, len: u8, write: bool },
    Read { offset: u16, len: u8 },
    Write { offset: u16, value: u64, len: u8 },
    ConfigRead { offset: u8, len: u8 },
    ConfigWrite { offset: u8, value: u64, len: u8 },
    /// Points the selected queue at rings, the way a driver does, to reach DRIVER_OK often.
    SetUpQueue { size: u16, desc: u16, avail: u16, used: u16 },
    Poke { at: u16, bytes: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
struct Input {
    device: Device,
    ops: Vec<Op>,
}

fn read(dev: &mut VirtioPci, offset: u64, len: usize) -> u64 {
    let mut bytes = [0u8; 8];
    dev.read(offset, &mut bytes[..len]);
    u64::from_le_bytes(bytes)
}

fn write(dev: &mut VirtioPci, offset: u64, value: u64, len: usize) {
    dev.write(offset, &value.to_le_bytes()[..len]);
}

/// The common config of every queue, as a driver would read it after a reset.
fn snapshot(dev: &mut VirtioPci, queues: usize) -> Vec<u8> {
    let mut all = Vec::new();
    for q in 0..queues {
        write(dev, 0x16, q as u64, 2);
        for offset in 0..0x38 {
            all.push(read(dev, offset, 1) as u8);
        }
    }
    write(dev, 0x16, 0, 2);
    all
}

fuzz_target!(|input: Input| {
    let mem = memory();
    let activations = Arc::new(AtomicUsize::new(0));
    let device: Box<dyn VirtioDevice> = match input.device {
        Device::Probe { sizes, features, config, refuse } => {
            let mut sizes: Vec<u16> = sizes.iter().take(8).map(|s| 1 << (s % 9)).collect();
            if sizes.is_empty() {
                sizes.push(16);
            }
            Box::new(Probe { sizes, features, config, refuse, activations: activations.clone() })
        }
        Device::Rng => Box::new(Rng::new()),
        Device::Console => Box::new(Console::new(Box::new(std::io::sink())).expect("console")),
        Device::Net => Box::new(Net::with_tap(Tap::socket_pair().expect("socket pair").0, None)),
        Device::Vsock => Box::new(Vsock::new(3, &lguest_fuzz::vsock_path()).expect("vsock socket")),
        Device::Fs => Box::new(Fs::new(&lguest_fuzz::fs_share()).expect("shared directory")),
    };
    let queues = device.queue_max_sizes().len();
    let vectors = queues as u64 + 1;
    let routes = Arc::new(MsiRoutes::detached());
    let mut dev = VirtioPci::new("fuzz".into(), device, mem.clone(), 0xc000_0000, routes).expect("transport");
    let power_on = snapshot(&mut dev, queues);
    for op in input.ops.iter().take(256) {
        let mut reset = false;
        match *op {
            Op::Common { offset, value, len, write } => {
                let offset = u64::from(offset % 0x40);
                let data = value_bytes(value, len);
                if write {
                    dev.write(offset, &data);
                    reset = offset == STATUS && data == [0];
                } else {
                    dev.read(offset, &mut vec![0; data.len()]);
                }
            }
            Op::Read { offset, len } => dev.read(u64::from(offset) % BAR_SIZE, &mut vec![0; usize::from(len % 9)]),
            Op::Write { offset, value, len } => {
                let data = value_bytes(value, len);
                let offset = u64::from(offset) % BAR_SIZE;
                dev.write(offset, &data);
                reset = offset == STATUS && data == [0];
            }
            Op::ConfigRead { offset, len } => dev.config_read(usize::from(offset), &mut vec![0; usize::from(len % 5)]),
            Op::ConfigWrite { offset, value, len } => {
                dev.config_write(usize::from(offset), &value_bytes(value, len % 5));
            }
            Op::SetUpQueue { size, desc, avail, used } => {
                write(&mut dev, 0x18, u64::from(size), 2);
                write(&mut dev, 0x20, u64::from(desc), 8);
                write(&mut dev, 0x28, u64::from(avail), 8);
                write(&mut dev, 0x30, u64::from(used), 8);
                write(&mut dev, 0x1c, 1, 2);
            }
            Op::Poke { at, ref bytes } => poke(&mem, u64::from(at), bytes),
        }
        let status = read(&mut dev, STATUS, 1) as u8;
        assert!(status & DRIVER_OK == 0 || status & FEATURES_OK != 0, "DRIVER_OK without FEATURES_OK: {status:#x}");
        assert_eq!(read(&mut dev, 0x12, 2), queues as u64, "the queue count changed");
        let config_vector = read(&mut dev, 0x10, 2);
        assert!(config_vector == u64::from(NO_VECTOR) || config_vector < vectors, "config vector {config_vector}");
        let queue_vector = read(&mut dev, 0x1a, 2);
        assert!(queue_vector == u64::from(NO_VECTOR) || queue_vector < vectors, "queue vector {queue_vector}");
        if reset {
            assert_eq!(status, 0, "a reset leaves status 0");
            assert_eq!(snapshot(&mut dev, queues), power_on, "a reset restores the power-on registers");
        }
    }
});
