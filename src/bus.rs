//! Where a port I/O or MMIO exit lands: an address is looked up among the devices registered
//! on the bus, and the access is handed to the device with the offset into its range.
//!
//! An address no device claims behaves like an empty slot on a real bus, as the seed's
//! `emulate_insn` did for lguest's guests: reads return all ones, writes vanish. Such accesses
//! are counted and logged at debug level, because a guest probing for hardware is normal, and
//! a guest hammering an absent port is a performance bug worth seeing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the range it was registered at.
/// Guests choose the offsets and sizes: a device must cope with any of them.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Range {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each owned by one device.
pub struct Bus {
    name: &'static str,
    ranges: Vec<Range>,
    absent_reads: AtomicU64,
    absent_writes: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
#[error("{bus} range {base:#x}+{len:#x} overlaps another device")]
pub struct Overlap {
    bus: &'static str,
    base: u64,
    len: u64,
}

impl Bus {
    pub fn new(name: &'static str) -> Bus {
        Bus { name, ranges: Vec::new(), absent_reads: AtomicU64::new(0), absent_writes: AtomicU64::new(0) }
    }

    /// Claims `base..base+len` for `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), Overlap> {
        let overlap = Overlap { bus: self.name, base, len };
        let Some(end) = base.checked_add(len).filter(|_| len > 0) else { return Err(overlap) };
        if self.ranges.iter().any(|r| base < r.base + r.len && r.base < end) {
            return Err(overlap);
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        let index = self.ranges.partition_point(|r| r.base <= addr).checked_sub(1)?;
        let range = &self.ranges[index];
        let offset = addr - range.base;
        (offset < range.len).then_some((range, offset))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((range, offset)) => lock(&range.device).read(offset, data),
            None => {
                data.fill(0xff);
                self.absent_reads.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(bus = self.name, addr = format_args!("{addr:#x}"), len = data.len(), "read from absent device");
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr) {
            Some((range, offset)) => lock(&range.device).write(offset, data),
            None => {
                self.absent_writes.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(bus = self.name, addr = format_args!("{addr:#x}"), ?data, "write to absent device dropped");
            }
        }
    }

    /// How many reads and writes found no device.
    pub fn absent_accesses(&self) -> (u64, u64) {
        (self.absent_reads.load(Ordering::Relaxed), self.absent_writes.load(Ordering::Relaxed))
    }
}

/// A device whose lock was poisoned by a panic elsewhere is still the best state we have;
/// the VM keeps running rather than taking the host process down with it.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access so tests can see what the bus handed over.
    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_with_its_offset() {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new("pio");
        bus.insert(0x3f8, 8, device.clone()).expect("insert");
        let mut data = [0u8; 1];
        bus.read(0x3fd, &mut data);
        assert_eq!(data, [5]);
        bus.write(0x3f8, b"A");
        assert_eq!(lock(&device).last_write, Some((0, vec![b'A'])));
        assert_eq!(bus.absent_accesses(), (0, 0));
    }

    #[test]
    fn absent_devices_read_all_ones_and_drop_writes() {
        let mut bus = Bus::new("pio");
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Recorder::default()))).expect("insert");
        let mut data = [0u8; 4];
        bus.read(0x3f7, &mut data);
        assert_eq!(data, [0xff; 4]);
        bus.read(0x400, &mut data[..2]);
        bus.write(0x80, &[1]);
        assert_eq!(bus.absent_accesses(), (2, 1));
    }

    #[test]
    fn overlapping_or_empty_ranges_are_refused() {
        let mut bus = Bus::new("mmio");
        let device = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        bus.insert(0x1000, 0x100, device()).expect("first");
        assert!(bus.insert(0x10ff, 1, device()).is_err());
        assert!(bus.insert(0x0f00, 0x101, device()).is_err());
        assert!(bus.insert(0x2000, 0, device()).is_err());
        assert!(bus.insert(u64::MAX, 2, device()).is_err());
        bus.insert(0x1100, 0x100, device()).expect("adjacent is fine");
    }
}
