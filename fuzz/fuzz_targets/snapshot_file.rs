//! Fuzzes the snapshot file as `lguest restore` and `PUT /snapshot/load` read it:
//! `snapshot::file::decode` (header, version, checksum, postcard body) and then
//! `snapshot::validate`. The bytes are a file anyone could hand lguest: whatever they are, it
//! must answer with an error of one line, never panic or allocate what a length field claims,
//! and never accept a snapshot whose counts disagree with its configuration.
//!
//! A checksum stops a fuzzer's mutations at the first byte; so an input is fuzzed both as
//! a whole file and as a body that gets a right header and checksum put around it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lguest::snapshot::file::{decode, frame};
use lguest::snapshot::validate;

fn check(bytes: &[u8]) {
    match decode(bytes) {
        Ok(snapshot) => {
            if validate(&snapshot).is_ok() {
                assert_eq!(snapshot.vcpus.len(), usize::from(snapshot.config.cpus));
                assert_eq!(snapshot.devices.len(), snapshot.config.pci_devices());
            }
        }
        Err(error) => assert!(!error.to_string().contains('\n'), "{error}"),
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // A whole file's body (past the 24-byte header) is the seeds' useful part.
    check(&frame(data.get(24..).unwrap_or(data)));
});
