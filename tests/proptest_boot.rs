//! Property tests of kernel loading, the ordinary suite's half of
//! `fuzz/fuzz_targets/kernel_load.rs`: an ELF vmlinux (program headers, the PVH note) or a
//! bzImage (the setup header's sizes, versions, flags and command-line limit), then the
//! command line, the initrd and the boot tables. The user names the image, but images come
//! from anywhere: a crafted one must be a one-line error, never a panic, an unbounded
//! allocation or a write outside guest memory. The fuzzer's seed images must load, so the
//! fuzzer starts from images that get past the first checks.

use std::io::Write;
use std::path::{Path, PathBuf};

use lguest::arch::x86_64::boot::{load_guest, Entry};
use lguest::config::{VmConfig, DEFAULT_CMDLINE};
use proptest::prelude::*;
use vm_memory::GuestAddress;

const MEMORY_MIB: u64 = 64;

fn seed(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/kernel_load").join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // The first byte is the fuzz target's choice of command line and initrd.
    bytes[1..].to_vec()
}

fn file(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(bytes).expect("write");
    file
}

fn config(kernel: PathBuf, initrd: Option<PathBuf>, cmdline: String) -> VmConfig {
    VmConfig { initrd, cmdline, memory_mib: MEMORY_MIB, ..VmConfig::for_kernel(kernel) }
}

fn load(image: &[u8], initrd: bool, cmdline: &str) -> lguest::error::Result<Entry> {
    let mem = lguest::memory::from_ranges(&[(GuestAddress(0), (MEMORY_MIB << 20) as usize)], lguest::memory::Tracking::Off).expect("guest memory");
    let kernel = file(image);
    let initrd = initrd.then(|| file(&[0x42; 4096]));
    let config = config(kernel.path().to_path_buf(), initrd.as_ref().map(|f| f.path().to_path_buf()), cmdline.to_string());
    load_guest(&mem, &config, 0xe_0000)
}

#[test]
fn the_fuzzers_seed_images_load() {
    assert_eq!(load(&seed("elf-pvh"), true, DEFAULT_CMDLINE).ok(), Some(Entry::Pvh { rip: 0x10_0000 }));
    assert_eq!(load(&seed("elf-plain"), false, DEFAULT_CMDLINE).ok(), Some(Entry::Linux64 { rip: 0x10_0000 }));
    assert_eq!(load(&seed("bzimage"), true, DEFAULT_CMDLINE).ok(), Some(Entry::Linux64 { rip: 0x10_0200 }));
}

/// Found by `cargo fuzz` (kernel_load): an ELF whose segment claims to end near 2^64, with an
/// initrd. Working out where the initrd could go overflowed (a panic in debug builds, a wrong
/// size in the message in release builds). It is a kernel that doesn't fit, and says so.
#[test]
fn an_elf_ending_near_the_top_of_the_address_space_does_not_fit() {
    let result = load(&seed("elf-ends-at-top-of-memory"), true, DEFAULT_CMDLINE);
    assert!(matches!(result, Err(lguest::error::Error::TooBig { .. })), "{result:?}");
}

/// A seed with some bytes overwritten: mostly in the headers, where the parsing happens.
fn mutated_seed() -> impl Strategy<Value = Vec<u8>> {
    let seeds = vec![seed("elf-pvh"), seed("elf-plain"), seed("bzimage")];
    let edit = (prop_oneof![4 => 0..0x280usize, 1 => 0..0x700usize], any::<u8>(), 1..9usize);
    (prop::sample::select(seeds), prop::collection::vec(edit, 1..12)).prop_map(|(mut image, edits)| {
        for (at, value, width) in edits {
            // Header fields are 1 to 8 bytes: spread the value over a whole field now and then.
            for i in at..(at + width).min(image.len()) {
                image[i] = value.rotate_left(i as u32);
            }
        }
        image
    })
}

fn cmdline() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(DEFAULT_CMDLINE.to_string()),
        (0..3000usize).prop_map(|n| "x".repeat(n)),
        Just("console=ttyS0 \u{e9}".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_damaged_kernel_image_is_an_error_not_a_panic(image in mutated_seed(), initrd in any::<bool>(), cmdline in cmdline()) {
        let _ = load(&image, initrd, &cmdline);
    }

    #[test]
    fn arbitrary_bytes_are_not_a_kernel(image in prop::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(load(&image, false, DEFAULT_CMDLINE).is_err());
    }
}
