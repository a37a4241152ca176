//! The snapshot file's round trip and refusals, and the checks on what it decodes to.

use super::file::{decode, encode, frame, FileError, MAGIC, VERSION};
use super::state::*;
use super::{validate, SnapshotError};
use crate::config::VmConfig;

fn vcpu() -> VcpuState {
    let regs = kvm_bindings::kvm_regs { rip: 0x10_0000, rbx: 42, ..Default::default() };
    let msrs = vec![(0x10, 123_456)];
    VcpuState {
        regs,
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        msrs,
        lapic: Default::default(),
        mp_state: Default::default(),
        events: Default::default(),
        debugregs: Default::default(),
        tsc_khz: 2_000_000,
    }
}

/// A guest of two vCPUs with a disk and a network card.
fn sample() -> Snapshot {
    let mut config = VmConfig::for_kernel("vmlinux".into());
    config.cpus = 2;
    config.disks.push(crate::config::DiskConfig::new("disk.img"));
    config.nets.push(crate::config::parse_net("tap=tap0").expect("a net"));
    let device = |device_type, device| VirtioState {
        device_type,
        pci_config: vec![0; 256],
        msix: vec![[0, 0, 0, 1]; 2],
        transport: TransportState { status: 15, queues: vec![QueueState { size: 256, enabled: true, next_used: 7, ..Default::default() }], ..Default::default() },
        device,
    };
    Snapshot {
        config,
        net_ids: vec!["eth0".into()],
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: kvm_bindings::kvm_irqchip { chip_id: 1, ..Default::default() },
            ioapic: kvm_bindings::kvm_irqchip { chip_id: 2, ..Default::default() },
            pit: Default::default(),
            clock: kvm_bindings::kvm_clock_data { clock: 99, ..Default::default() },
        },
        vcpus: vec![vcpu(), vcpu()],
        serial: SerialState {
            baud_divisor_low: 12,
            baud_divisor_high: 0,
            interrupt_enable: 1,
            interrupt_identification: 1,
            line_control: 3,
            line_status: 0x60,
            modem_control: 8,
            modem_status: 0xb0,
            scratch: 0,
            in_buffer: b"ls\n".to_vec(),
        },
        keyboard: KeyboardState { ctr: 0x47, scanning: true, replies: vec![0x55], ..Default::default() },
        devices: vec![device(2, DeviceState::Block { sectors: 2048 }), device(1, DeviceState::Net { mac: [6, 0, 0, 0, 0, 1], active_pairs: 1 })],
    }
}

#[test]
fn a_snapshot_round_trips_through_its_file() {
    let saved = sample();
    let back = decode(&encode(&saved).expect("encode")).expect("decode");
    assert_eq!(back.config, saved.config);
    assert_eq!(back.net_ids, saved.net_ids);
    assert_eq!(back.vcpus[1].regs.rbx, 42);
    assert_eq!(back.vcpus[0].msrs.len(), 1);
    assert_eq!(back.vcpus[0].msrs[0], (0x10, 123_456));
    assert_eq!(back.vcpus[1].tsc_khz, 2_000_000);
    assert_eq!(back.vm.clock.clock, 99);
    assert_eq!(back.vm.ioapic.chip_id, 2);
    assert_eq!(back.serial, saved.serial);
    assert_eq!(back.keyboard, saved.keyboard);
    assert_eq!(back.devices, saved.devices);
    validate(&back).expect("a valid snapshot");
}

#[test]
fn wrong_version_truncated_corrupt_and_foreign_files_are_refused() {
    let bytes = encode(&sample()).expect("encode");
    assert_eq!(&bytes[..8], MAGIC);
    let mut newer = bytes.clone();
    newer[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
    assert_eq!(decode(&newer).err(), Some(FileError::WrongVersion { found: VERSION + 1 }));
    // Version 1's disks had no queue count (`DiskConfig::queues`): its state would not decode.
    let mut older = bytes.clone();
    older[8..12].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(decode(&older).err(), Some(FileError::WrongVersion { found: 1 }));
    assert_eq!(decode(&bytes[..bytes.len() - 10]).err(), Some(FileError::Truncated { missing: 10 }));
    assert!(matches!(decode(&bytes[..15]), Err(FileError::Truncated { .. })));
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"junk");
    assert_eq!(decode(&longer).err(), Some(FileError::TrailingBytes { extra: 4 }));
    for at in [24, bytes.len() / 2, bytes.len() - 1] {
        let mut corrupt = bytes.clone();
        corrupt[at] ^= 1;
        assert_eq!(decode(&corrupt).err(), Some(FileError::Corrupt), "a flipped bit at {at}");
    }
    assert_eq!(decode(b"ELF\x7f").err(), Some(FileError::NotASnapshot));
    assert_eq!(decode(b"").err(), Some(FileError::NotASnapshot));
}

/// A file with a right header and checksum around a body that is not a snapshot: what a
/// hostile file would be, since the checksum only catches accidents.
fn forged(body: &[u8]) -> Vec<u8> {
    frame(body)
}

#[test]
fn a_forged_body_is_refused_not_trusted() {
    for body in [&b""[..], b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", &[0x80; 64], &[0u8; 1000]] {
        assert!(matches!(decode(&forged(body)), Err(FileError::Undecodable(_))), "{body:?}");
    }
    // Lengths that claim more than is there: a huge vector count must not allocate it.
    let mut body = postcard::to_stdvec(&sample()).expect("encode");
    body.truncate(body.len() / 3);
    body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert!(matches!(decode(&forged(&body)), Err(FileError::Undecodable(_))));
    // A register file of the wrong size is not padded into a guest's registers.
    let mut short_regs = sample();
    short_regs.vcpus.truncate(1);
    let mut body = postcard::to_stdvec(&short_regs).expect("encode");
    let regs = std::mem::size_of::<kvm_bindings::kvm_regs>();
    let at = find(&body, &kvm_regs_bytes(&short_regs.vcpus[0].regs)).expect("the registers' bytes");
    assert_eq!(body[at - 2..at], [0x90, 0x01], "postcard's varint for {regs} bytes");
    body[at - 2] = 0x88; // says 136 bytes...
    body.drain(at + regs - 8..at + regs); // ...and has them: a well-formed, short byte string
    assert!(matches!(decode(&forged(&body)), Err(FileError::Undecodable(_))));
}

fn kvm_regs_bytes(regs: &kvm_bindings::kvm_regs) -> Vec<u8> {
    // postcard writes a byte string as its length and the bytes: the bytes are what is left.
    let encoded = postcard::to_stdvec(regs).expect("encode");
    encoded[encoded.len() - std::mem::size_of::<kvm_bindings::kvm_regs>()..].to_vec()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

#[test]
fn impossible_counts_and_sizes_are_refused() {
    let invalid = |change: &dyn Fn(&mut Snapshot)| {
        let mut snapshot = sample();
        change(&mut snapshot);
        matches!(validate(&snapshot), Err(SnapshotError::Invalid(_)))
    };
    assert!(invalid(&|s| s.vcpus.pop().map(drop).unwrap_or_default()), "fewer vCPUs than the guest has");
    assert!(invalid(&|s| s.config.cpus = 0));
    assert!(invalid(&|s| s.config.cpus = 255));
    assert!(invalid(&|s| s.config.memory_mib = 1));
    assert!(invalid(&|s| s.config.memory_mib = u64::MAX >> 20));
    assert!(invalid(&|s| s.devices.truncate(1)), "a device missing");
    assert!(invalid(&|s| s.net_ids.clear()), "a card without an id");
    assert!(invalid(&|s| s.config.disks = vec![crate::config::DiskConfig::new("d"); 40]), "more devices than PCI slots");
}

#[test]
fn network_overrides_put_a_named_card_on_another_tap_and_refuse_the_rest() {
    use super::restore::LoadRequest;
    use crate::config::NetBackend;
    let dir = tempfile::tempdir().expect("tempdir");
    let snapshot_path = dir.path().join("vm.snap");
    std::fs::write(&snapshot_path, encode(&sample()).expect("encode")).expect("write");
    let load = |overrides: &[(&str, &str)]| {
        let net_overrides = overrides.iter().map(|(id, tap)| (id.to_string(), tap.to_string())).collect();
        LoadRequest { snapshot_path: snapshot_path.clone(), memory_file: dir.path().join("vm.mem"), net_overrides, paused: true, track_dirty_pages: false }.load()
    };
    let restore = load(&[("eth0", "tap7")]).expect("an override of a saved card");
    assert_eq!(restore.snapshot.config.nets[0].backend, NetBackend::Tap { name: "tap7".into(), vhost: false });
    assert!(restore.paused);
    for bad in [[("eth1", "tap7")], [("eth0", "")], [("eth0", "a-name-longer-than-ifnamsiz")]] {
        assert!(matches!(load(&bad), Err(SnapshotError::Invalid(_))), "{bad:?}");
    }
}
