//! The guest's console: a 16550A UART at COM1 (ports 0x3f8..0x400, IRQ 4), from `vm-superio`.
//!
//! What the guest transmits goes straight to our stdout, unbuffered, so a shell prompt with no
//! newline still shows. What the user types is queued into the receive FIFO by the console
//! thread ([`crate::terminal`]); the UART raises IRQ 4 through an irqfd, so an interrupt never
//! needs the vCPU thread's help.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::snapshot::state::SerialState;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt line by signalling an eventfd that KVM has bound to the GSI.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Guest output, written through to our stdout as it comes (or kept aside, see
/// [`keep_console_aside`]).
pub struct Stdout;

/// The most of a console kept aside: its last 256 KiB (a boot's messages fit many times).
pub const CONSOLE_LOG_LIMIT: usize = 256 * 1024;

/// When set, the console's output goes here instead of our stdout.
static CONSOLE_LOG: std::sync::OnceLock<ConsoleLog> = std::sync::OnceLock::new();

/// A console's output kept in memory: `lguest exec`'s stdout is CMD's, and the guest's boot
/// messages are printed only if the guest fails.
#[derive(Clone, Default)]
pub struct ConsoleLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl ConsoleLog {
    fn append(&self, bytes: &[u8]) {
        let mut log = crate::bus::lock(&self.0);
        log.extend_from_slice(bytes);
        if log.len() > CONSOLE_LOG_LIMIT {
            let excess = log.len() - CONSOLE_LOG_LIMIT;
            log.drain(..excess);
        }
    }

    /// What the guest wrote, up to now.
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut crate::bus::lock(&self.0))
    }
}

/// From now on (for this process), every guest console's output is kept in the returned log
/// instead of going to stdout.
pub fn keep_console_aside() -> ConsoleLog {
    CONSOLE_LOG.get_or_init(ConsoleLog::default).clone()
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(log) = CONSOLE_LOG.get() {
            log.append(buf);
            return Ok(buf.len());
        }
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

pub struct SerialPort {
    uart: Serial<IrqLine, NoEvents, Box<dyn Write + Send>>,
}

impl SerialPort {
    pub fn new(irq: IrqLine, output: Box<dyn Write + Send>) -> SerialPort {
        SerialPort { uart: Serial::new(irq, output) }
    }

    /// A UART as a snapshot saved it; a receive FIFO longer than the chip's is refused.
    pub fn restored(irq: IrqLine, output: Box<dyn Write + Send>, saved: &SerialState) -> Result<SerialPort, String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let uart = Serial::from_state(&state, irq, NoEvents, output).map_err(|e| format!("the serial port: {e:?}"))?;
        Ok(SerialPort { uart })
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn save_state(&self) -> SerialState {
        let state = self.uart.state();
        SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer,
        }
    }

    /// Queues as much of `input` as the receive FIFO has room for; returns how much that was.
    pub fn receive(&mut self, input: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(input.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&input[..room]) {
            Ok(queued) => queued,
            Err(e) => {
                tracing::debug!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let (Ok(offset), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Some(value)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.uart.write(offset, *value) {
                tracing::debug!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects what the guest transmits.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("capture").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn port() -> (SerialPort, Capture, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let capture = Capture::default();
        let port = SerialPort::new(IrqLine(irq.try_clone().expect("clone")), Box::new(capture.clone()));
        (port, capture, irq)
    }

    #[test]
    fn transmitted_bytes_reach_the_output() {
        let (mut port, capture, _) = port();
        for byte in b"hi\n" {
            port.write(0, &[*byte]);
        }
        assert_eq!(capture.0.lock().expect("capture").as_slice(), b"hi\n");
    }

    #[test]
    fn received_bytes_are_read_back_and_raise_the_irq() {
        let (mut port, _, irq) = port();
        port.write(1, &[0x01]); // IER: interrupt on received data
        assert_eq!(port.receive(b"ls"), 2);
        assert_eq!(irq.read().expect("irq raised"), 1);
        let mut data = [0u8; 1];
        port.read(5, &mut data); // LSR: data ready
        assert_eq!(data[0] & 1, 1);
        port.read(0, &mut data);
        assert_eq!(data[0], b'l');
    }

    #[test]
    fn the_fifo_takes_only_what_fits() {
        let (mut port, _, _) = port();
        let flood = vec![b'x'; 1000];
        let taken = port.receive(&flood);
        assert!(taken > 0 && taken < flood.len());
        assert_eq!(port.receive(&flood), 0);
    }

    #[test]
    fn a_saved_port_comes_back_with_its_registers_and_input() {
        let (mut port, _, _) = port();
        port.write(3, &[0x83]); // LCR: 8 bits, divisor latch
        port.write(0, &[0x0c]); // 9600 baud
        port.write(3, &[0x03]);
        port.write(7, &[0x5a]); // scratch
        port.receive(b"ok");
        let saved = port.save_state();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut back = SerialPort::restored(IrqLine(irq), Box::new(io::sink()), &saved).expect("restored");
        assert_eq!(back.save_state(), saved);
        let mut data = [0u8; 1];
        back.read(0, &mut data);
        assert_eq!(data[0], b'o');
        let hostile = SerialState { in_buffer: vec![0; 4096], ..saved };
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        assert!(SerialPort::restored(IrqLine(irq), Box::new(io::sink()), &hostile).is_err(), "a FIFO larger than the chip's");
    }

    #[test]
    fn odd_offsets_and_sizes_are_harmless() {
        let (mut port, _, _) = port();
        let mut wide = [0u8; 4];
        port.read(u64::MAX, &mut wide);
        port.write(1 << 40, &[1, 2, 3]);
        port.read(3, &mut []);
        port.write(3, &[]);
        assert_eq!(&wide[1..], &[0xff; 3]);
    }
}
