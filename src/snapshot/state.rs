//! What a snapshot holds, as serde types: the configuration the VM was built from, then
//! everything of it the guest can observe that is not in its memory. Each part is saved by the
//! code that owns it (a vCPU by [`super::vcpu`], a device by its own `save_state`) and checked
//! again when it is restored: these values come from a file, and a file can say anything.
//!
//! The KVM structures are kvm-bindings' own, serialised as their bytes (its `serde` feature),
//! through [`exact`], which refuses a byte string of another length (kvm-bindings would pad a
//! short one with zeros). The FPU is in the XSAVE area (its legacy region is the FXSAVE
//! image), as Firecracker saves it.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// A whole saved VM: what `PUT /snapshot/create` writes beside the memory file.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// What the VM was built from: its devices are opened again from here (a disk's path and
    /// flags, a card's tap, the vsock's socket), possibly with overrides.
    pub config: VmConfig,
    /// The network cards' ids (the API's `iface_id`s), in `config.nets`' order: what a
    /// restore's network overrides name them by.
    pub net_ids: Vec<String>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialState,
    pub keyboard: KeyboardState,
    /// The virtio devices, in PCI slot order (the order the configuration makes them in).
    pub devices: Vec<VirtioState>,
}

/// The VM-wide state in KVM: the interrupt controllers, the PIT and kvmclock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    #[serde(with = "exact")]
    pub pic_master: kvm_irqchip,
    #[serde(with = "exact")]
    pub pic_slave: kvm_irqchip,
    #[serde(with = "exact")]
    pub ioapic: kvm_irqchip,
    #[serde(with = "exact")]
    pub pit: kvm_pit_state2,
    #[serde(with = "exact")]
    pub clock: kvm_clock_data,
}

/// One vCPU, as KVM keeps it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    #[serde(with = "exact")]
    pub regs: kvm_regs,
    #[serde(with = "exact")]
    pub sregs: kvm_sregs,
    #[serde(with = "exact")]
    pub xsave: kvm_xsave,
    #[serde(with = "exact")]
    pub xcrs: kvm_xcrs,
    /// Every MSR of KVM's index list that could be read (the TSC and kvmclock's among them),
    /// as (index, value).
    pub msrs: Vec<(u32, u64)>,
    #[serde(with = "exact")]
    pub lapic: kvm_lapic_state,
    #[serde(with = "exact")]
    pub mp_state: kvm_mp_state,
    #[serde(with = "exact")]
    pub events: kvm_vcpu_events,
    #[serde(with = "exact")]
    pub debugregs: kvm_debugregs,
    /// The guest's TSC frequency: a restore on a host whose TSC runs at another rate asks KVM to
    /// scale it.
    pub tsc_khz: u32,
}

/// The 16550A's registers and receive FIFO (vm-superio's `SerialState`, field for field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The i8042 keyboard controller's registers and buffers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyboardState {
    pub ctr: u8,
    pub last_write_was_command: bool,
    pub controller_param: Option<u8>,
    pub keyboard_param: Option<u8>,
    pub scanning: bool,
    pub replies: Vec<u8>,
    pub keyboard: Vec<u8>,
    pub head_signalled: bool,
}

/// One virtio device on PCI: the function's configuration space, its MSI-X table, the
/// transport's registers, and what the device itself keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    pub device_type: u32,
    /// The 256 bytes of configuration space, as the guest reads them.
    pub pci_config: Vec<u8>,
    /// Each MSI-X table entry: address low, address high, data, vector control.
    pub msix: Vec<[u32; 4]>,
    pub transport: TransportState,
    pub device: DeviceState,
}

/// The virtio-pci common configuration the driver wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub config_vector: u16,
    pub queue_select: u16,
    pub isr: u8,
    pub broken: bool,
    pub queues: Vec<QueueState>,
}

/// One queue's registers, and where the device had got to in it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub vector: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    /// The used ring's index when the device stopped: both where it goes on adding used
    /// buffers and where it goes on taking available ones (a buffer taken but not used, as a
    /// network card holds receive buffers, is simply taken again).
    pub next_used: u16,
}

/// What a device keeps beyond its configuration and its transport: one enum for every device,
/// so that a snapshot's device can be checked against the device made for it now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// Nothing (the entropy source, the console).
    #[default]
    None,
    /// A disk's size in sectors when it was saved: the image must still have it.
    Block { sectors: u64 },
    /// A card's MAC, which may have been made up at random, and how many of its queue pairs
    /// the driver had in use (VIRTIO_NET_CTRL_MQ; 1 for a single-pair card).
    Net { mac: [u8; 6], active_pairs: u16 },
    /// The guest's CID; its connections are not saved (they are reset on restore).
    Vsock { cid: u64 },
}

/// A KVM structure as exactly its own bytes: serialised by kvm-bindings, deserialised only
/// from a byte string of its very size.
mod exact {
    use serde::de::{DeserializeOwned, Error};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
        value.serialize(serializer)
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(deserializer: D) -> Result<T, D::Error> {
        let bytes = serde_bytes_of(deserializer)?;
        let size = std::mem::size_of::<T>();
        if bytes.len() != size {
            return Err(D::Error::invalid_length(bytes.len(), &format!("{size} bytes").as_str()));
        }
        T::deserialize(serde::de::value::BytesDeserializer::<D::Error>::new(&bytes))
    }

    /// A byte string (postcard writes one as its length, then the bytes: as a `Vec<u8>`).
    fn serde_bytes_of<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        Vec::<u8>::deserialize(deserializer)
    }
}
