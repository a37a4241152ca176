//! The PS/2 keyboard controller (an i8042) and a keyboard behind it, for two reasons: its
//! reset line, which Linux's `reboot=k` pulls, and Ctrl-Alt-Del, which we press when asked to
//! shut the guest down (SIGTERM): Linux's keyboard driver turns it into a SIGINT for the
//! guest's init, which shuts down the way it chooses. That is the established way (QEMU's
//! `system_powerdown` on PCs without ACPI buttons, Firecracker's `SendCtrlAltDel`), and it needs
//! nothing in the guest but the drivers every distribution kernel builds in (i8042, atkbd).
//!
//! Two ports: data (0x60) and command/status (0x64). The controller answers its own commands
//! (self-test, read and write its command byte, interface test); data-port writes go to the
//! keyboard, which answers them too (ACK; reset's "self-test passed"; its ID). The guest reads
//! every answer from the data port while the status register says one is waiting. Keyboard
//! bytes raise IRQ 1 (an edge, through an irqfd) when the command byte enables it; the
//! controller's own answers don't, because drivers poll for those. We act on every write at
//! once, so the "input buffer full" bit that guests wait on never sets.
//!
//! There is no mouse: the ACPI tables describe only a keyboard, so Linux doesn't look for one.

use std::collections::VecDeque;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::snapshot::state::KeyboardState;
use crate::stop::{StopReason, Stopper};

/// The controller spans the data port (0x60) to the command/status port (0x64).
pub const I8042_PORT: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
pub const DATA_PORT: u16 = 0x60;
pub const COMMAND_PORT: u16 = 0x64;
/// The keyboard's ISA interrupt.
pub const KEYBOARD_IRQ: u32 = 1;
const DATA: u64 = 0;
const COMMAND: u64 = 4;

/// Status register bits.
mod status {
    pub const OUTPUT_FULL: u8 = 1 << 0;
    pub const SYSTEM: u8 = 1 << 2;
    /// The last write went to the command port.
    pub const COMMAND: u8 = 1 << 3;
    /// Set when the keyboard is *not* inhibited by a key lock.
    pub const UNLOCKED: u8 = 1 << 4;
}

/// Command byte ("CTR") bits.
mod ctr {
    pub const KEYBOARD_INTERRUPT: u8 = 1 << 0;
    pub const SYSTEM: u8 = 1 << 2;
    pub const KEYBOARD_DISABLED: u8 = 1 << 4;
    pub const AUX_DISABLED: u8 = 1 << 5;
    pub const TRANSLATE: u8 = 1 << 6;
    /// What a PC BIOS leaves: keyboard interrupt on, translation to scan code set 1 on, no mouse.
    pub const AT_BOOT: u8 = KEYBOARD_INTERRUPT | SYSTEM | AUX_DISABLED | TRANSLATE;
}

/// Controller commands (written to 0x64).
mod cmd {
    pub const READ_CTR: u8 = 0x20;
    pub const WRITE_CTR: u8 = 0x60;
    pub const DISABLE_AUX: u8 = 0xa7;
    pub const ENABLE_AUX: u8 = 0xa8;
    pub const SELF_TEST: u8 = 0xaa;
    pub const KEYBOARD_TEST: u8 = 0xab;
    pub const DISABLE_KEYBOARD: u8 = 0xad;
    pub const ENABLE_KEYBOARD: u8 = 0xae;
    pub const READ_OUTPUT_PORT: u8 = 0xd0;
    pub const WRITE_OUTPUT_PORT: u8 = 0xd1;
    pub const WRITE_KEYBOARD_OUTPUT: u8 = 0xd2;
    pub const WRITE_AUX: u8 = 0xd4;
    /// 0xf0-0xff pulse output-port lines low for a moment; line 0 is the CPU's reset (Linux's
    /// `reboot=k` writes 0xfe).
    pub const PULSE_FIRST: u8 = 0xf0;
}

/// Keyboard commands (written to 0x60) and its answers.
mod kbd {
    pub const SET_LEDS: u8 = 0xed;
    pub const ECHO: u8 = 0xee;
    pub const SCANCODE_SET: u8 = 0xf0;
    pub const GET_ID: u8 = 0xf2;
    pub const SET_TYPEMATIC: u8 = 0xf3;
    pub const ENABLE: u8 = 0xf4;
    pub const DISABLE: u8 = 0xf5;
    pub const SET_DEFAULTS: u8 = 0xf6;
    pub const RESET: u8 = 0xff;
    pub const ACK: u8 = 0xfa;
    pub const RESEND: u8 = 0xfe;
    pub const SELF_TEST_PASSED: u8 = 0xaa;
    /// An MF2 keyboard's ID; through translation its second byte reads 0x41.
    pub const ID: [u8; 2] = [0xab, 0x83];
    pub const ID_TRANSLATED: [u8; 2] = [0xab, 0x41];
}

/// Ctrl and Alt down, Delete down and up, Alt and Ctrl up: in scan code set 1 (what the guest
/// reads with translation on, as Linux leaves it) and set 2 (what the keyboard itself sends).
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const CTRL_ALT_DEL_SET2: [u8; 11] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];
/// A real keyboard buffers 16 bytes; what a guest doesn't read beyond that is lost.
const KEYBOARD_BUFFER: usize = 16;

pub struct I8042 {
    stopper: Arc<Stopper>,
    irq: EventFd,
    ctr: u8,
    last_write_was_command: bool,
    /// A controller command whose parameter the next data-port write is.
    controller_param: Option<u8>,
    /// A keyboard command whose parameter the next byte for the keyboard is.
    keyboard_param: Option<u8>,
    /// Whether the keyboard sends key strokes (commands F4/F5).
    scanning: bool,
    /// The controller's answers, read before anything from the keyboard.
    replies: VecDeque<u8>,
    /// The keyboard's bytes, held while the controller has its interface disabled.
    keyboard: VecDeque<u8>,
    /// Whether the keyboard byte at the head of the output has had its interrupt.
    head_signalled: bool,
}

impl I8042 {
    /// `irq` is the eventfd KVM turns into [`KEYBOARD_IRQ`].
    pub fn new(stopper: Arc<Stopper>, irq: EventFd) -> I8042 {
        I8042 {
            stopper,
            irq,
            ctr: ctr::AT_BOOT,
            last_write_was_command: false,
            controller_param: None,
            keyboard_param: None,
            scanning: true,
            replies: VecDeque::new(),
            keyboard: VecDeque::new(),
            head_signalled: false,
        }
    }

    /// The controller's registers and buffers, for a snapshot.
    pub fn save_state(&self) -> KeyboardState {
        KeyboardState {
            ctr: self.ctr,
            last_write_was_command: self.last_write_was_command,
            controller_param: self.controller_param,
            keyboard_param: self.keyboard_param,
            scanning: self.scanning,
            replies: self.replies.iter().copied().collect(),
            keyboard: self.keyboard.iter().copied().collect(),
            head_signalled: self.head_signalled,
        }
    }

    /// Takes a snapshot's state back; buffers longer than a real controller's are refused.
    pub fn restore_state(&mut self, saved: &KeyboardState) -> Result<(), String> {
        if saved.replies.len() > KEYBOARD_BUFFER || saved.keyboard.len() > KEYBOARD_BUFFER {
            return Err(format!("the keyboard controller's buffers hold at most {KEYBOARD_BUFFER} bytes"));
        }
        self.ctr = saved.ctr;
        self.last_write_was_command = saved.last_write_was_command;
        self.controller_param = saved.controller_param;
        self.keyboard_param = saved.keyboard_param;
        self.scanning = saved.scanning;
        self.replies = saved.replies.iter().copied().collect();
        self.keyboard = saved.keyboard.iter().copied().collect();
        self.head_signalled = saved.head_signalled;
        Ok(())
    }

    /// Presses and releases Ctrl-Alt-Del. Returns false if the keyboard is not scanning (no
    /// driver has enabled it, or one disabled it), in which case nothing is sent.
    pub fn press_ctrl_alt_del(&mut self) -> bool {
        if !self.scanning {
            return false;
        }
        let keys: &[u8] = if self.ctr & ctr::TRANSLATE != 0 { &CTRL_ALT_DEL_SET1 } else { &CTRL_ALT_DEL_SET2 };
        for &byte in keys {
            self.keyboard_sends(byte);
        }
        self.update_irq();
        true
    }

    fn status(&self) -> u8 {
        let mut status = status::UNLOCKED;
        if self.head().is_some() {
            status |= status::OUTPUT_FULL;
        }
        if self.ctr & ctr::SYSTEM != 0 {
            status |= status::SYSTEM;
        }
        if self.last_write_was_command {
            status |= status::COMMAND;
        }
        status
    }

    fn keyboard_enabled(&self) -> bool {
        self.ctr & ctr::KEYBOARD_DISABLED == 0
    }

    /// The byte the guest would read now, and whether it is the keyboard's.
    fn head(&self) -> Option<(u8, bool)> {
        match self.replies.front() {
            Some(&reply) => Some((reply, false)),
            None if self.keyboard_enabled() => self.keyboard.front().map(|&byte| (byte, true)),
            None => None,
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = match self.head() {
            Some((byte, false)) => self.replies.pop_front().unwrap_or(byte),
            Some((byte, true)) => self.keyboard.pop_front().unwrap_or(byte),
            // An empty output buffer reads as whatever was last there; zero will do.
            None => 0,
        };
        self.head_signalled = false;
        self.update_irq();
        byte
    }

    /// Pulses IRQ 1 for a keyboard byte newly at the head of the output, if interrupts are on.
    fn update_irq(&mut self) {
        let keyboard_byte_waiting = matches!(self.head(), Some((_, true)));
        if keyboard_byte_waiting && !self.head_signalled && self.ctr & ctr::KEYBOARD_INTERRUPT != 0 {
            self.head_signalled = true;
            // A full eventfd counter (2^64 - 1 pending interrupts) is the only failure.
            let _ = self.irq.write(1);
        }
    }

    fn reply(&mut self, byte: u8) {
        self.replies.push_back(byte);
    }

    fn keyboard_sends(&mut self, byte: u8) {
        if self.keyboard.len() < KEYBOARD_BUFFER {
            self.keyboard.push_back(byte);
        }
    }

    fn write_command(&mut self, command: u8) {
        self.controller_param = None;
        match command {
            cmd::READ_CTR => self.reply(self.ctr),
            // The rest of the controller's little RAM: nothing we keep.
            0x21..=0x3f => self.reply(0),
            cmd::WRITE_CTR..=0x7f | cmd::WRITE_OUTPUT_PORT..=cmd::WRITE_AUX => self.controller_param = Some(command),
            cmd::DISABLE_AUX => self.ctr |= ctr::AUX_DISABLED,
            cmd::ENABLE_AUX => self.ctr &= !ctr::AUX_DISABLED,
            cmd::SELF_TEST => {
                self.ctr |= ctr::SYSTEM;
                self.reply(0x55);
            }
            cmd::KEYBOARD_TEST => self.reply(0x00),
            cmd::DISABLE_KEYBOARD => self.ctr |= ctr::KEYBOARD_DISABLED,
            cmd::ENABLE_KEYBOARD => self.ctr &= !ctr::KEYBOARD_DISABLED,
            // Reset line high (not resetting), A20 on, and the output buffer's state.
            cmd::READ_OUTPUT_PORT => self.reply(0x03 | if self.head().is_some() { 0x10 } else { 0 }),
            cmd::PULSE_FIRST..=0xff if command & 1 == 0 => self.stopper.stop(StopReason::Reset),
            _ => tracing::debug!(command = format_args!("{command:#x}"), "i8042 command ignored"),
        }
        self.update_irq();
    }

    fn write_data(&mut self, byte: u8) {
        match self.controller_param.take() {
            Some(cmd::WRITE_CTR) => self.ctr = byte,
            Some(0x61..=0x7f) => {}
            Some(cmd::WRITE_OUTPUT_PORT) if byte & 1 == 0 => self.stopper.stop(StopReason::Reset),
            Some(cmd::WRITE_KEYBOARD_OUTPUT) => self.keyboard_sends(byte),
            // No mouse: what is sent its way goes nowhere.
            Some(_) => {}
            None => {
                // Talking to the keyboard re-enables its interface, as on real controllers.
                self.ctr &= !ctr::KEYBOARD_DISABLED;
                self.send_to_keyboard(byte);
            }
        }
        self.update_irq();
    }

    /// A byte for the keyboard: a command, or the parameter of the last one.
    fn send_to_keyboard(&mut self, byte: u8) {
        if self.keyboard_param.take().is_some() {
            // LEDs, typematic rate, scan code set: acknowledged; only set 2 exists here.
            return self.keyboard_sends(kbd::ACK);
        }
        // A keyboard drops what it had not sent yet when a command comes in.
        self.keyboard.clear();
        self.head_signalled = false;
        match byte {
            kbd::RESET => {
                self.scanning = true;
                self.keyboard.extend([kbd::ACK, kbd::SELF_TEST_PASSED]);
            }
            kbd::GET_ID => {
                let id = if self.ctr & ctr::TRANSLATE != 0 { kbd::ID_TRANSLATED } else { kbd::ID };
                self.keyboard.extend([kbd::ACK, id[0], id[1]]);
            }
            kbd::ENABLE | kbd::SET_DEFAULTS => {
                self.scanning = true;
                self.keyboard_sends(kbd::ACK);
            }
            kbd::DISABLE => {
                self.scanning = false;
                self.keyboard_sends(kbd::ACK);
            }
            kbd::SET_LEDS | kbd::SET_TYPEMATIC | kbd::SCANCODE_SET => {
                self.keyboard_param = Some(byte);
                self.keyboard_sends(kbd::ACK);
            }
            kbd::ECHO => self.keyboard_sends(kbd::ECHO),
            _ => self.keyboard_sends(kbd::RESEND),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((first, rest)) = data.split_first_mut() else { return };
        rest.fill(0xff);
        *first = match offset {
            DATA => self.read_data(),
            COMMAND => self.status(),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            DATA => {
                self.last_write_was_command = false;
                self.write_data(byte);
            }
            COMMAND => {
                self.last_write_was_command = true;
                self.write_command(byte);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's `reboot=k`: pulse the reset line.
    const RESET_CPU: u8 = 0xfe;

    fn controller() -> (I8042, Arc<Stopper>, EventFd) {
        let stopper = Arc::new(Stopper::default());
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let i8042 = I8042::new(stopper.clone(), irq.try_clone().expect("clone"));
        (i8042, stopper, irq)
    }

    fn status(i8042: &mut I8042) -> u8 {
        let mut byte = [0];
        i8042.read(COMMAND, &mut byte);
        byte[0]
    }

    /// Reads the output buffer until it is empty, as a polling driver would.
    fn drain(i8042: &mut I8042) -> Vec<u8> {
        let mut out = Vec::new();
        while status(i8042) & status::OUTPUT_FULL != 0 {
            let mut byte = [0];
            i8042.read(DATA, &mut byte);
            out.push(byte[0]);
        }
        out
    }

    fn interrupts(irq: &EventFd) -> u64 {
        irq.read().unwrap_or(0)
    }

    #[test]
    fn a_saved_controller_comes_back_with_its_registers_and_buffers() {
        let (mut i8042, _, _) = controller();
        i8042.write(COMMAND, &[cmd::SELF_TEST]); // leaves a reply waiting
        i8042.press_ctrl_alt_del();
        let saved = i8042.save_state();
        let (mut back, _, _) = controller();
        back.restore_state(&saved).expect("restored");
        assert_eq!(back.save_state(), saved);
        assert_eq!(drain(&mut back), drain(&mut i8042));
        let hostile = KeyboardState { keyboard: vec![0; 1000], ..saved };
        assert!(back.restore_state(&hostile).is_err(), "a buffer larger than the controller's");
    }

    #[test]
    fn reset_command_stops_the_vm() {
        let (mut i8042, stopper, _) = controller();
        i8042.write(COMMAND, &[cmd::SELF_TEST]);
        i8042.write(COMMAND, &[0xff]);
        assert!(!stopper.is_stopped(), "pulsing no line, or a self-test, does not reset");
        i8042.write(COMMAND, &[RESET_CPU]);
        assert!(matches!(stopper.wait(), StopReason::Reset));
    }

    #[test]
    fn writing_the_output_port_with_the_reset_line_low_resets() {
        let (mut i8042, stopper, _) = controller();
        i8042.write(COMMAND, &[cmd::WRITE_OUTPUT_PORT]);
        i8042.write(DATA, &[0x03]);
        assert!(!stopper.is_stopped());
        i8042.write(COMMAND, &[cmd::WRITE_OUTPUT_PORT]);
        i8042.write(DATA, &[0x02]);
        assert!(matches!(stopper.wait(), StopReason::Reset));
    }

    #[test]
    fn status_at_boot_is_empty_ready_and_unlocked() {
        let (mut i8042, _, _) = controller();
        assert_eq!(status(&mut i8042), status::UNLOCKED | status::SYSTEM);
    }

    /// What Linux's i8042 driver does at boot: flush, self-test, read and write the command
    /// byte (twice: with the keyboard off, then on with its interrupt).
    #[test]
    fn linux_i8042_probe_sequence() {
        let (mut i8042, _, irq) = controller();
        assert!(drain(&mut i8042).is_empty());
        i8042.write(COMMAND, &[cmd::SELF_TEST]);
        assert_eq!(drain(&mut i8042), [0x55]);
        i8042.write(COMMAND, &[cmd::READ_CTR]);
        let at_boot = drain(&mut i8042);
        assert_eq!(at_boot, [ctr::AT_BOOT]);
        i8042.write(COMMAND, &[cmd::WRITE_CTR]);
        i8042.write(DATA, &[(ctr::AT_BOOT | ctr::KEYBOARD_DISABLED) & !ctr::KEYBOARD_INTERRUPT]);
        assert_eq!(status(&mut i8042) & status::COMMAND, 0, "the last write went to the data port");
        i8042.write(COMMAND, &[cmd::READ_CTR]);
        assert_eq!(drain(&mut i8042), [(ctr::AT_BOOT | ctr::KEYBOARD_DISABLED) & !ctr::KEYBOARD_INTERRUPT]);
        i8042.write(COMMAND, &[cmd::KEYBOARD_TEST]);
        assert_eq!(drain(&mut i8042), [0x00]);
        assert_eq!(interrupts(&irq), 0, "the controller's answers are polled, not interrupts");
    }

    /// What atkbd does: ask the ID, set the LEDs and repeat rate, enable scanning; each answer
    /// arrives with an interrupt.
    #[test]
    fn atkbd_probe_sequence_with_interrupts() {
        let (mut i8042, _, irq) = controller();
        i8042.write(DATA, &[kbd::GET_ID]);
        assert_eq!(interrupts(&irq), 1);
        let mut first = [0];
        i8042.read(DATA, &mut first);
        assert_eq!(first, [kbd::ACK]);
        assert_eq!(interrupts(&irq), 1, "the next byte interrupts again");
        assert_eq!(drain(&mut i8042), kbd::ID_TRANSLATED);
        for (command, param) in [(kbd::SET_LEDS, 0), (kbd::SET_TYPEMATIC, 0)] {
            i8042.write(DATA, &[command]);
            assert_eq!(drain(&mut i8042), [kbd::ACK]);
            i8042.write(DATA, &[param]);
            assert_eq!(drain(&mut i8042), [kbd::ACK]);
        }
        i8042.write(DATA, &[kbd::RESET]);
        assert_eq!(drain(&mut i8042), [kbd::ACK, kbd::SELF_TEST_PASSED]);
        i8042.write(DATA, &[kbd::ECHO]);
        assert_eq!(drain(&mut i8042), [kbd::ECHO]);
        i8042.write(DATA, &[0x42]);
        assert_eq!(drain(&mut i8042), [kbd::RESEND], "unknown commands ask for a resend");
    }

    #[test]
    fn ctrl_alt_del_in_set_1_with_translation_and_set_2_without() {
        let (mut i8042, _, irq) = controller();
        assert!(i8042.press_ctrl_alt_del());
        assert_eq!(interrupts(&irq), 1);
        assert_eq!(drain(&mut i8042), CTRL_ALT_DEL_SET1);
        i8042.write(COMMAND, &[cmd::WRITE_CTR]);
        i8042.write(DATA, &[ctr::AT_BOOT & !ctr::TRANSLATE]);
        assert!(i8042.press_ctrl_alt_del());
        assert_eq!(drain(&mut i8042), CTRL_ALT_DEL_SET2);
    }

    #[test]
    fn a_disabled_keyboard_sends_no_keys_and_a_disabled_interface_holds_them() {
        let (mut i8042, _, irq) = controller();
        i8042.write(DATA, &[kbd::DISABLE]);
        assert_eq!(drain(&mut i8042), [kbd::ACK]);
        assert!(!i8042.press_ctrl_alt_del());
        i8042.write(DATA, &[kbd::ENABLE]);
        assert_eq!(drain(&mut i8042), [kbd::ACK]);
        interrupts(&irq);

        i8042.write(COMMAND, &[cmd::DISABLE_KEYBOARD]);
        assert!(i8042.press_ctrl_alt_del());
        assert_eq!(status(&mut i8042) & status::OUTPUT_FULL, 0, "held while the interface is off");
        assert_eq!(interrupts(&irq), 0);
        i8042.write(COMMAND, &[cmd::ENABLE_KEYBOARD]);
        assert_eq!(interrupts(&irq), 1, "delivered when it is back on");
        assert_eq!(drain(&mut i8042), CTRL_ALT_DEL_SET1);
    }

    #[test]
    fn no_interrupt_while_the_command_byte_disables_it() {
        let (mut i8042, _, irq) = controller();
        i8042.write(COMMAND, &[cmd::WRITE_CTR]);
        i8042.write(DATA, &[ctr::AT_BOOT & !ctr::KEYBOARD_INTERRUPT]);
        i8042.press_ctrl_alt_del();
        assert_eq!(interrupts(&irq), 0);
        i8042.write(COMMAND, &[cmd::WRITE_CTR]);
        i8042.write(DATA, &[ctr::AT_BOOT]);
        assert_eq!(interrupts(&irq), 1, "enabling the interrupt with a byte waiting raises it");
    }

    #[test]
    fn the_keyboard_buffer_is_bounded() {
        let (mut i8042, _, _) = controller();
        for _ in 0..10 {
            i8042.press_ctrl_alt_del();
        }
        assert_eq!(drain(&mut i8042).len(), KEYBOARD_BUFFER);
    }

    #[test]
    fn every_offset_width_and_value_is_survivable() {
        let (mut i8042, stopper, _) = controller();
        for offset in 0..I8042_LEN + 1 {
            for value in 0..=255u8 {
                if offset == COMMAND && value >= cmd::PULSE_FIRST {
                    continue;
                }
                i8042.write(offset, &[value, value]);
                i8042.write(offset, &[]);
                let mut wide = [0u8; 4];
                i8042.read(offset, &mut wide);
                i8042.read(offset, &mut []);
            }
        }
        assert!(!stopper.is_stopped());
    }
}
