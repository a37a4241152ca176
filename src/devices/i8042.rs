//! The PS/2 keyboard controller, reduced to the one thing a guest needs from it here: the
//! reset line. Linux's `reboot=k` writes 0xFE to the command port; we stop the VM with
//! [`StopReason::Reset`]. Status reads say "nothing to read, ready for input" so any polling
//! loop in the guest ends at once; every other command is ignored.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::stop::{StopReason, Stopper};

/// The controller spans the data port (0x60) to the command/status port (0x64).
pub const I8042_PORT: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
const DATA: u64 = 0;
const COMMAND: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    stopper: Arc<Stopper>,
}

impl I8042 {
    pub fn new(stopper: Arc<Stopper>) -> I8042 {
        I8042 { stopper }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status and data read as zero: output buffer empty, input buffer empty.
        let value = if matches!(offset, DATA | COMMAND) { 0 } else { 0xff };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND && data.first() == Some(&CMD_RESET_CPU) {
            self.stopper.stop(StopReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_the_vm() {
        let stopper = Arc::new(Stopper::default());
        let mut i8042 = I8042::new(stopper.clone());
        i8042.write(DATA, &[CMD_RESET_CPU]);
        i8042.write(COMMAND, &[0xaa]);
        assert!(!stopper.is_stopped(), "only 0xfe on the command port resets");
        i8042.write(COMMAND, &[CMD_RESET_CPU]);
        assert!(matches!(stopper.wait(), StopReason::Reset));
    }

    #[test]
    fn status_reads_ready_and_empty() {
        let mut i8042 = I8042::new(Arc::new(Stopper::default()));
        let mut status = [0xaa];
        i8042.read(COMMAND, &mut status);
        assert_eq!(status, [0]);
    }
}
