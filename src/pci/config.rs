//! One PCI function's configuration space: the 256 bytes a driver reads to learn what the
//! device is, where its registers are (BARs) and what it can do (the capability list).
//!
//! The guest may write anything anywhere. Only the bits a real device would let it change are
//! changed (the command register, BAR sizing, the capabilities' own writable fields); the rest
//! reads back as we built it. BARs are placed by us, once, inside the PCI window of the
//! memory map: a guest that tries to move one is told no (the BAR keeps its address), which
//! lets KVM's ioeventfds and our bus ranges stay where they were registered.

/// Standard header offsets (PCI Local Bus 3.0, 6.1).
pub mod reg {
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const STATUS: usize = 0x06;
    pub const REVISION: usize = 0x08;
    pub const CLASS: usize = 0x09;
    pub const HEADER_TYPE: usize = 0x0e;
    pub const BAR0: usize = 0x10;
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    pub const SUBSYSTEM_ID: usize = 0x2e;
    pub const CAPABILITIES: usize = 0x34;
    pub const INTERRUPT_LINE: usize = 0x3c;
}

pub const CONFIG_SIZE: usize = 256;
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Memory space, bus master and INTx disable: the command bits a driver may set.
const COMMAND_WRITABLE: u16 = (1 << 1) | (1 << 2) | (1 << 10);
const FIRST_CAPABILITY: usize = 0x40;
const BAR_COUNT: usize = 6;

/// What identifies a function to its driver.
pub struct Identity {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Base class, subclass and programming interface, as one 24-bit number.
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// A 32-bit, non-prefetchable memory BAR at a fixed address.
#[derive(Clone, Copy)]
struct Bar {
    addr: u32,
    size: u32,
    sizing: bool,
}

pub struct PciConfig {
    bytes: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
    bars: [Option<Bar>; BAR_COUNT],
    last_capability: Option<usize>,
    next_capability: usize,
}

impl PciConfig {
    pub fn new(id: &Identity) -> PciConfig {
        let mut config = PciConfig {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            bars: [None; BAR_COUNT],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        config.put(reg::VENDOR_ID, &id.vendor.to_le_bytes());
        config.put(reg::DEVICE_ID, &id.device.to_le_bytes());
        config.put(reg::REVISION, &[id.revision]);
        config.put(reg::CLASS, &id.class.to_le_bytes()[..3]);
        config.put(reg::SUBSYSTEM_VENDOR_ID, &id.subsystem_vendor.to_le_bytes());
        config.put(reg::SUBSYSTEM_ID, &id.subsystem.to_le_bytes());
        config.allow_writes(reg::COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        // The interrupt line is a scratch byte firmware and drivers may use as they like.
        config.allow_writes(reg::INTERRUPT_LINE, &[0xff]);
        config
    }

    /// Gives the function a memory BAR of `size` bytes (a power of two, at least 16) at `addr`,
    /// which must be aligned to `size`.
    pub fn add_bar(&mut self, index: usize, addr: u32, size: u32) {
        debug_assert!(size.is_power_of_two() && size >= 16 && addr.is_multiple_of(size) && index < BAR_COUNT);
        self.bars[index] = Some(Bar { addr, size, sizing: false });
    }

    /// Appends a capability (its first byte is the ID; we fill in the "next" pointer) and
    /// returns its offset. `writable` masks which of its bytes the guest may change.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> usize {
        let at = self.next_capability;
        self.put(at, body);
        self.allow_writes(at, writable);
        self.bytes[at + 1] = 0;
        match self.last_capability {
            Some(previous) => self.bytes[previous + 1] = at as u8,
            None => {
                self.bytes[reg::CAPABILITIES] = at as u8;
                let status = u16::from_le_bytes([self.bytes[reg::STATUS], self.bytes[reg::STATUS + 1]]) | STATUS_CAP_LIST;
                self.put(reg::STATUS, &status.to_le_bytes());
            }
        }
        self.last_capability = Some(at);
        self.next_capability = (at + body.len() + 3) & !3;
        at
    }

    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.read_byte(offset + i);
        }
    }

    /// Applies a guest write; bytes it may not change are left alone.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        if let Some(index) = bar_index(offset) {
            return self.write_bar(index, offset, data);
        }
        for (i, &value) in data.iter().enumerate() {
            let Some(mask) = self.writable.get(offset + i).copied() else { return };
            let byte = &mut self.bytes[offset + i];
            *byte = (*byte & !mask) | (value & mask);
        }
    }

    /// Reads a little-endian u16 the guest may have written (a capability's control word).
    pub fn read_u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.read_byte(offset), self.read_byte(offset + 1)])
    }

    fn read_byte(&self, offset: usize) -> u8 {
        match bar_index(offset) {
            Some(index) => self.bar_value(index).to_le_bytes()[offset % 4],
            None => self.bytes.get(offset).copied().unwrap_or(0),
        }
    }

    fn bar_value(&self, index: usize) -> u32 {
        match self.bars[index] {
            Some(Bar { sizing: true, size, .. }) => !(size - 1),
            Some(Bar { addr, .. }) => addr,
            None => 0,
        }
    }

    /// Drivers size a BAR by writing all ones and reading back the mask, then restore the
    /// address; anything else is a move we don't allow.
    fn write_bar(&mut self, index: usize, offset: usize, data: &[u8]) {
        let Some(bar) = self.bars[index].as_mut() else { return };
        let start = offset % 4;
        if start != 0 || data.len() != 4 {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let mask = !(bar.size - 1);
        bar.sizing = value & mask == mask;
        if !bar.sizing && value & mask != bar.addr {
            tracing::debug!(bar = index, value = format_args!("{value:#x}"), "guest tried to move a BAR; it stays put");
        }
    }

    fn put(&mut self, offset: usize, bytes: &[u8]) {
        self.bytes[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    fn allow_writes(&mut self, offset: usize, mask: &[u8]) {
        self.writable[offset..offset + mask.len()].copy_from_slice(mask);
    }
}

fn bar_index(offset: usize) -> Option<usize> {
    (reg::BAR0..reg::BAR0 + 4 * BAR_COUNT).contains(&offset).then(|| (offset - reg::BAR0) / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PciConfig {
        let id = Identity { vendor: 0x1af4, device: 0x1044, revision: 1, class: 0xff_0000, subsystem_vendor: 0x1af4, subsystem: 0x40 };
        let mut config = PciConfig::new(&id);
        config.add_bar(0, 0xc000_8000, 0x8000);
        config
    }

    fn read32(config: &PciConfig, offset: usize) -> u32 {
        let mut data = [0u8; 4];
        config.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn identity_reads_back() {
        let c = config();
        assert_eq!(read32(&c, 0), 0x1044_1af4);
        assert_eq!(read32(&c, 8), 0xff00_0001);
        assert_eq!(read32(&c, 0x2c), 0x0040_1af4);
    }

    #[test]
    fn bars_size_and_restore_but_never_move() {
        let mut c = config();
        assert_eq!(read32(&c, 0x10), 0xc000_8000);
        c.write(0x10, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&c, 0x10), 0xffff_8000);
        c.write(0x10, &0xc000_8000u32.to_le_bytes());
        assert_eq!(read32(&c, 0x10), 0xc000_8000);
        c.write(0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(read32(&c, 0x10), 0xc000_8000);
        c.write(0x14, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&c, 0x14), 0, "an absent BAR reads zero even after sizing");
    }

    #[test]
    fn only_writable_bits_change() {
        let mut c = config();
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(read32(&c, 0), 0x1044_1af4);
        c.write(reg::COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(reg::COMMAND), COMMAND_WRITABLE);
        c.write(250, &[1, 2, 3, 4, 5, 6, 7, 8]); // runs off the end
        let mut far = [9u8; 4];
        c.read(254, &mut far);
        assert_eq!(far, [0, 0, 0, 0]);
    }

    #[test]
    fn capabilities_form_a_chain() {
        let mut c = config();
        let first = c.add_capability(&[0x11, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[0, 0, 0, 0xc0]);
        let second = c.add_capability(&[0x09, 0, 16], &[]);
        assert_eq!(c.read_u16(reg::STATUS) & STATUS_CAP_LIST, STATUS_CAP_LIST);
        assert_eq!(usize::from(c.read_byte(reg::CAPABILITIES)), first);
        assert_eq!(usize::from(c.read_byte(first + 1)), second);
        assert_eq!(c.read_byte(second + 1), 0);
        c.write(first + 3, &[0xff]);
        assert_eq!(c.read_byte(first + 3), 0xc0 | 2);
        c.write(second + 2, &[0xff]);
        assert_eq!(c.read_byte(second + 2), 16);
    }
}
