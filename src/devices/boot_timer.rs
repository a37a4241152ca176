//! The boot timer: a guest that wants its boot timed writes the byte 123 here (as Firecracker's
//! guests do at their own address), and `--boot-timeline` shows when it did. The reference
//! guest does it from its /init with `devmem`. Any other write, and every read, is ignored.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::timeline::{Milestone, Timeline};

/// In the MMIO hole below the IOAPIC, clear of RAM and of where PCI windows will go.
pub const BOOT_TIMER_ADDR: u64 = 0xfe00_0000;
pub const BOOT_TIMER_LEN: u64 = 0x1000;
pub const BOOT_TIMER_MAGIC: u8 = 123;

pub struct BootTimer {
    timeline: Arc<Timeline>,
}

impl BootTimer {
    pub fn new(timeline: Arc<Timeline>) -> BootTimer {
        BootTimer { timeline }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_TIMER_MAGIC) {
            self.timeline.mark(Milestone::GuestSignal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn only_the_magic_value_at_offset_zero_counts() {
        let timeline = Arc::new(Timeline::new(Instant::now()));
        let mut timer = BootTimer::new(timeline.clone());
        timer.write(0, &[1]);
        timer.write(8, &[BOOT_TIMER_MAGIC]);
        assert_eq!(timeline.at(Milestone::GuestSignal), None);
        timer.write(0, &[BOOT_TIMER_MAGIC, 0, 0, 0]);
        assert!(timeline.at(Milestone::GuestSignal).is_some());
    }
}
