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
use lguest::config::{ConsoleKind, VmConfig, DEFAULT_CMDLINE};
use lguest::memory::create_guest_memory;
use lguest_fuzz::MemFile;
use vm_memory::GuestMemoryMmap;

const MEMORY_MIB: u64 = 64;

/// Guest memory is mapped once: lguest never unmaps guest memory, as a VM lives as long as
/// the process, so a fresh mapping per run would grow without bound.
fn guest_memory() -> &'static GuestMemoryMmap {
    static MEMORY: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEMORY.get_or_init(|| create_guest_memory(MEMORY_MIB << 20).expect("guest memory"))
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
    let config = VmConfig {
        kernel: kernel.path.clone(),
        initrd: initrd.as_ref().map(|f| f.path.clone()),
        cmdline,
        memory_mib: MEMORY_MIB,
        cpus: 1,
        boot_timeline: false,
        disks: Vec::new(),
        nets: Vec::new(),
        console: ConsoleKind::Serial,
        rng: false,
    };
    let _ = load_guest(guest_memory(), &config, 0xe_0000);
});
