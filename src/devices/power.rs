//! The ACPI sleep control and reset register of a hardware-reduced ACPI guest: one byte-wide
//! I/O register that the FADT names as both (the guest's `poweroff` and `reboot` end here).
//!
//! To power off, ACPI writes `SLP_TYP << 2 | SLP_EN` with the S5 sleep type from the DSDT's
//! `\_S5_` package; to reset, it writes the FADT's reset value. Anything else (such as the
//! wake-status clear ACPI writes before sleeping) is ignored. Reads say "not waking".

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::stop::{StopReason, Stopper};

pub const POWER_PORT: u16 = 0x600;
pub const POWER_LEN: u64 = 1;
/// The sleep type we publish for S5 in the DSDT.
pub const SLEEP_TYPE_S5: u8 = 5;
/// What the guest writes to the reset register to reset.
pub const RESET_VALUE: u8 = 1;
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

pub struct SleepResetRegister {
    stopper: Arc<Stopper>,
}

impl SleepResetRegister {
    pub fn new(stopper: Arc<Stopper>) -> SleepResetRegister {
        SleepResetRegister { stopper }
    }
}

impl BusDevice for SleepResetRegister {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if value == RESET_VALUE {
            self.stopper.stop(StopReason::Reset);
        } else if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == SLEEP_TYPE_S5 {
            self.stopper.stop(StopReason::PowerOff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn press(value: u8) -> Arc<Stopper> {
        let stopper = Arc::new(Stopper::default());
        SleepResetRegister::new(stopper.clone()).write(0, &[value]);
        stopper
    }

    #[test]
    fn s5_powers_off() {
        assert!(matches!(press((5 << 2) | SLP_EN).wait(), StopReason::PowerOff));
    }

    #[test]
    fn reset_value_resets() {
        assert!(matches!(press(RESET_VALUE).wait(), StopReason::Reset));
    }

    #[test]
    fn wake_status_clears_and_other_sleep_states_are_ignored() {
        assert!(!press(0x80).is_stopped());
        assert!(!press((3 << 2) | SLP_EN).is_stopped());
        assert!(!press(5 << 2).is_stopped(), "no SLP_EN, no sleep");
    }
}
