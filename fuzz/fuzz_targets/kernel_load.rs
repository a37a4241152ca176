//! Fuzzes kernel loading: the bytes of a kernel image, tried as an ELF vmlinux (program
//! headers, PVH ELF notes) and as a bzImage (the setup header's sizes, versions, flags and
//! command-line limit), then the command line and the initrd placed by what the header said,
//! and the boot tables written. The user names the image, but images come from anywhere: a
//! crafted one could otherwise make the VMM panic, allocate without bound, or write outside
//! guest memory. A bad image must be a one-line error.
//!
//! Input: the first byte picks the command line and whether there is an initrd; the rest is
//! the kernel image (so a seed is `\0` followed by a real image).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lguest::arch::x86_64::boot::load_guest;
use lguest::config::{VmConfig, DEFAULT_CMDLINE};
use lguest::memory::{create_guest_memory, GuestRam};
use lguest_fuzz::MemFile;

const MEMORY_MIB: u64 = 64;

/// Guest memory is mapped once, not per input: mapping and unmapping 64 MiB per run would
/// slow the fuzzer down for nothing.
fn guest_memory() -> &'static GuestRam {
    static MEMORY: OnceLock<GuestRam> = OnceLock::new();
    MEMORY.get_or_init(|| create_guest_memory(MEMORY_MIB << 20, lguest::memory::Tracking::Off).expect("guest memory"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, image)) = data.split_first() else { return };
    let kernel = MemFile::new(image);
    let initrd = (choice & 1 != 0).then(|| MemFile::new(&[0x42; 4096]));
    let cmdline = match (choice >> 1) & 3 {
        0 => DEFAULT_CMDLINE.to_string(),
        1 => "x".repeat(usize::from(choice) * 20), // near and past the old 256-byte limit
        2 => "console=ttyS0 \u{e9}".to_string(),   // not ASCII
        _ => "a ".repeat(1500),                     // past the default 2048
    };
    let config = VmConfig { initrd: initrd.as_ref().map(|f| f.path.clone()), cmdline, memory_mib: MEMORY_MIB, ..VmConfig::for_kernel(kernel.path.clone()) };
    let _ = load_guest(guest_memory(), &config, 0xe_0000);
});
