//! Fuzzes the COM1 UART (a 16550A from vm-superio behind our port I/O adapter): guest reads
//! and writes of any register, at any offset and width, with the user's keystrokes arriving in
//! between. Every Linux guest drives this port from its first printk; a malicious guest could
//! otherwise crash the VMM through a divisor latch access, a loopback mode, a FIFO overrun or
//! an offset outside the eight ports, and a flood of input must never be taken beyond what the
//! FIFO holds.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lguest::bus::BusDevice;
use lguest::devices::serial::{IrqLine, SerialPort};
use lguest_fuzz::value_bytes;
use vmm_sys_util::eventfd::EventFd;

#[derive(Arbitrary, Debug)]
enum Op {
    Read { offset: u8, len: u8 },
    Write { offset: u8, value: u64, len: u8 },
    ReadFar { offset: u64, len: u8 },
    WriteFar { offset: u64, value: u64, len: u8 },
    Receive(Vec<u8>),
}

fuzz_target!(|ops: Vec<Op>| {
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let mut port = SerialPort::new(IrqLine(irq), Box::new(std::io::sink()));
    for op in ops.iter().take(1024) {
        match op {
            Op::Read { offset, len } => port.read(u64::from(offset % 8), &mut vec![0; usize::from(len % 9)]),
            Op::Write { offset, value, len } => port.write(u64::from(offset % 8), &value_bytes(*value, *len)),
            Op::ReadFar { offset, len } => port.read(*offset, &mut vec![0; usize::from(len % 9)]),
            Op::WriteFar { offset, value, len } => port.write(*offset, &value_bytes(*value, *len)),
            Op::Receive(bytes) => {
                let taken = port.receive(bytes);
                assert!(taken <= bytes.len(), "took {taken} of {} bytes", bytes.len());
            }
        }
    }
});
