//! pvpanic: one I/O port a guest kernel writes when it panics, so that a crash ends the VM with
//! a status of its own instead of a reboot that looks like any other, or a hang.
//!
//! The protocol is QEMU's (docs/specs/pvpanic.rst): reading the port gives the events the host
//! understands; the guest writes bit 0 when it has panicked and bit 1 when it is about to boot
//! into a crash kernel (kdump) instead. The ACPI tables describe the port as device `QEMU0001`,
//! which Linux's `pvpanic-mmio` driver binds to (a module in Debian's kernel).

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::stop::{StopReason, Stopper};

pub const PVPANIC_PORT: u64 = 0x505;
pub const PVPANIC_LEN: u64 = 1;
const PANICKED: u8 = 1 << 0;
const CRASH_LOADED: u8 = 1 << 1;

pub struct PvPanic {
    stopper: Arc<Stopper>,
}

impl PvPanic {
    pub fn new(stopper: Arc<Stopper>) -> PvPanic {
        PvPanic { stopper }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PANICKED | CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&events) = data.first() else { return };
        if events & PANICKED != 0 {
            self.stopper.stop(StopReason::GuestPanic);
        } else if events & CRASH_LOADED != 0 {
            // The guest goes on into its crash kernel, which will save the dump: let it run.
            tracing::warn!("the guest kernel crashed and is booting its crash (kdump) kernel");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_stops_the_vm_and_a_kdump_does_not() {
        let stopper = Arc::new(Stopper::default());
        let mut pvpanic = PvPanic::new(stopper.clone());
        let mut capabilities = [0xaa; 2];
        pvpanic.read(0, &mut capabilities);
        assert_eq!(capabilities, [PANICKED | CRASH_LOADED, 0]);
        pvpanic.write(0, &[CRASH_LOADED]);
        pvpanic.write(0, &[]);
        assert!(!stopper.is_stopped());
        pvpanic.write(0, &[PANICKED]);
        assert!(matches!(stopper.wait(), StopReason::GuestPanic));
    }
}
