//! Property tests of the COM1 UART behind our port I/O adapter, the ordinary suite's half of
//! `fuzz/fuzz_targets/serial.rs`. Every Linux guest drives this port from its first printk; a
//! malicious one may write any register in any order (divisor latch, loopback, FIFO control),
//! at any offset and width, while the user types. The port must never panic, never take more
//! input than the FIFO holds, and what the guest transmits with the divisor latch closed must
//! reach the output byte for byte.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use lguest::bus::BusDevice;
use lguest::devices::serial::{IrqLine, SerialPort};
use proptest::prelude::*;
use vmm_sys_util::eventfd::EventFd;

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

fn port() -> (SerialPort, Capture) {
    let capture = Capture::default();
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    (SerialPort::new(IrqLine(irq), Box::new(capture.clone())), capture)
}

#[derive(Debug, Clone)]
enum Op {
    Read { offset: u64, len: usize },
    Write { offset: u64, value: u64, len: usize },
    Receive(Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    let offset = prop_oneof![8 => 0..8u64, 1 => any::<u64>()];
    prop_oneof![
        (offset.clone(), 0..=8usize).prop_map(|(offset, len)| Op::Read { offset, len }),
        (offset, any::<u64>(), 0..=8usize).prop_map(|(offset, value, len)| Op::Write { offset, value, len }),
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Op::Receive),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_register_sequence_is_survivable_and_input_fits_the_fifo(ops in prop::collection::vec(op(), 0..200)) {
        let (mut port, _) = port();
        for op in &ops {
            match op {
                Op::Read { offset, len } => port.read(*offset, &mut vec![0; *len]),
                Op::Write { offset, value, len } => port.write(*offset, &value.to_le_bytes()[..*len]),
                Op::Receive(bytes) => {
                    let taken = port.receive(bytes);
                    prop_assert!(taken <= bytes.len());
                    prop_assert!(taken <= 64, "the FIFO holds 64 bytes, {} were taken", taken);
                }
            }
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_output_in_order(text in prop::collection::vec(any::<u8>(), 0..300)) {
        let (mut port, capture) = port();
        port.write(3, &[0x03]); // LCR: 8N1, divisor latch closed
        for byte in &text {
            port.write(0, &[*byte]);
        }
        prop_assert_eq!(capture.0.lock().expect("capture").clone(), text);
    }
}
