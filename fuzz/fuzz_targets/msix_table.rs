//! Fuzzes the MSI-X table and pending-bit array: guest reads and writes at any offset and width,
//! function masking, and device interrupts arriving in between. The table is guest-written
//! state that decides where interrupts go; a malicious guest could otherwise crash the VMM with
//! an access past the table or PBA, or make an interrupt vanish by masking and unmasking around
//! it. Accesses outside the table read zero, and no interrupt is ever lost: a triggered vector
//! either fired or is still pending.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lguest::pci::msix::{MsiRoutes, MsixTable, MsixVectors};
use lguest_fuzz::value_bytes;

#[derive(Arbitrary, Debug)]
enum Offset {
    /// Within the first entries, where real accesses land.
    Near(u8),
    Any(u64),
}

impl Offset {
    fn raw(&self) -> u64 {
        match *self {
            Offset::Near(at) => u64::from(at),
            Offset::Any(at) => at,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    ReadTable { offset: Offset, len: u8 },
    WriteTable { offset: Offset, value: u64, len: u8 },
    ReadPba { offset: Offset, len: u8 },
    FunctionMask(bool),
    Trigger(u16),
    Take(u16),
}

fuzz_target!(|input: (u8, Vec<Op>)| {
    let (count, ops) = input;
    let count = usize::from(count % 80) + 1;
    let vectors = Arc::new(MsixVectors::new(count).expect("eventfds"));
    let mut table = MsixTable::new(vectors.clone(), Arc::new(MsiRoutes::detached())).expect("table");
    // Which vectors were triggered and have not been seen to fire since.
    let mut owed = vec![false; count];
    for op in ops.iter().take(512) {
        match op {
            Op::ReadTable { offset, len } => {
                let mut data = vec![0xa5; usize::from(len % 9)];
                table.read_table(offset.raw(), &mut data);
                if offset.raw() >= table.table_len() {
                    assert!(data.iter().all(|&b| b == 0), "read past the table: {data:?}");
                }
            }
            Op::WriteTable { offset, value, len } => table.write_table(offset.raw(), &value_bytes(*value, *len)),
            Op::ReadPba { offset, len } => {
                let mut data = vec![0xa5; usize::from(len % 9)];
                table.read_pba(offset.raw(), &mut data);
                if offset.raw() >= table.pba_len() {
                    assert!(data.iter().all(|&b| b == 0), "read past the PBA: {data:?}");
                }
            }
            Op::FunctionMask(masked) => table.set_function_masked(*masked),
            Op::Trigger(vector) => {
                let vector = vector % (count as u16 + 2);
                vectors.trigger(vector);
                if let Some(slot) = owed.get_mut(usize::from(vector)) {
                    *slot = true;
                }
            }
            Op::Take(vector) => {
                let vector = usize::from(*vector) % count;
                let fired = vectors.take_count(vector as u16);
                let mut pba = vec![0u8; table.pba_len() as usize];
                table.read_pba(0, &mut pba);
                let pending = pba[vector / 8] & (1 << (vector % 8)) != 0;
                assert!(!owed[vector] || fired > 0 || pending, "vector {vector}'s interrupt was lost");
                owed[vector] = pending;
            }
        }
    }
});
