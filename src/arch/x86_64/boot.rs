//! Loading a kernel, its initrd and its command line, and telling it where they are.
//!
//! Two ways in, both through `linux-loader`:
//! - a **bzImage**, through the Linux x86 boot protocol's 64-bit entry: we fill a `boot_params`
//!   ("zero page") with the header the image carries, the e820 map, the command line and the
//!   initrd, and start the CPU at `code32_start + 0x200` in long mode with `%rsi` pointing at it.
//! - an **ELF vmlinux**: through its PVH entry when it advertises one (a Xen ELF note), in
//!   32-bit protected mode with `%ebx` pointing at an `hvm_start_info`. An ELF without that note
//!   (such as the tiny test guests) starts at its ELF entry point in long mode, like a bzImage.
//!
//! The image is untrusted input: sizes are checked against guest memory before anything is
//! copied, and the loader's own bounds checks catch the rest.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::{Elf, Error as ElfError, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, load_cmdline, Error as LoaderError, KernelLoader};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Address, GuestAddress};
use crate::memory::GuestMemoryMmap;

use crate::config::VmConfig;
use crate::error::{guest_write, Error, Result};
use crate::memory::{e820_map, layout, low_ram_end, E820Entry};

/// How the first vCPU must be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit long mode, identity-mapped, `%rsi` = the zero page.
    Linux64 { rip: u64 },
    /// 32-bit protected mode, paging off, `%ebx` = `hvm_start_info`.
    Pvh { rip: u64 },
}

/// Magic numbers from the boot protocols.
const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const XLF_KERNEL_64: u16 = 1 << 0;
const MIN_PROTOCOL_64BIT_ENTRY: u16 = 0x020c;
const MIN_PROTOCOL_CMDLINE_SIZE: u16 = 0x0206;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const LOADFLAG_CAN_USE_HEAP: u8 = 0x80;
const PVH_MAGIC: u32 = 0x336e_c578;
/// x86's COMMAND_LINE_SIZE: what a kernel without a size in its header accepts.
const DEFAULT_CMDLINE_CAPACITY: usize = 2048;
/// Old protocol's fixed limit.
const LEGACY_CMDLINE_CAPACITY: usize = 256;

/// The kernel as loaded: where to start it and what its header said.
struct LoadedKernel {
    entry: Entry,
    end: u64,
    header: Option<setup_header>,
}

impl LoadedKernel {
    /// How long a command line (with its NUL) this kernel accepts.
    fn cmdline_capacity(&self) -> usize {
        match &self.header {
            Some(hdr) if hdr.version >= MIN_PROTOCOL_CMDLINE_SIZE => hdr.cmdline_size as usize + 1,
            Some(_) => LEGACY_CMDLINE_CAPACITY,
            None => DEFAULT_CMDLINE_CAPACITY,
        }
    }
}

/// Loads kernel, initrd and command line, writes the boot tables, and returns where to start.
/// `rsdp` is the guest address of the ACPI tables' root, already written.
pub fn load_guest(mem: &GuestMemoryMmap, config: &VmConfig, rsdp: u64) -> Result<Entry> {
    let memory_bytes = config.memory_bytes();
    let kernel = load_kernel(mem, &config.kernel, memory_bytes)?;
    let cmdline = build_cmdline(&config.cmdline, kernel.cmdline_capacity())?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE), &cmdline)
        .map_err(guest_write("the command line"))?;
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(mem, path, &kernel, memory_bytes)?),
        None => None,
    };
    write_reset_stub(mem)?;
    let cmdline_len = cmdline.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0);
    match (kernel.entry, kernel.header) {
        (Entry::Pvh { .. }, _) => write_start_info(mem, memory_bytes, initrd, rsdp)?,
        (Entry::Linux64 { .. }, header) => {
            write_zero_page(mem, memory_bytes, header.unwrap_or_default(), cmdline_len, initrd, rsdp)?
        }
    }
    Ok(kernel.entry)
}

/// What sits at the reset vector in place of a BIOS: "pulse the keyboard controller's reset
/// line" (`mov al, 0xfe; out 0x64, al; cli; hlt`). A kernel that reboots "through the BIOS"
/// (Linux's default when nothing else is chosen: it drops to real mode and jumps to F000:FFF0)
/// then resets the machine as it meant to. The bytes decode the same in 16, 32 and 64-bit mode.
pub const RESET_STUB: [u8; 6] = [0xb0, 0xfe, 0xe6, 0x64, 0xfa, 0xf4];

fn write_reset_stub(mem: &GuestMemoryMmap) -> Result<()> {
    use vm_memory::Bytes;
    mem.write_slice(&RESET_STUB, GuestAddress(layout::RESET_VECTOR))
        .map_err(guest_write("the reset vector"))
}

/// Tries the image as an ELF first (its magic is unambiguous), then as a bzImage.
fn load_kernel(mem: &GuestMemoryMmap, path: &Path, memory_bytes: u64) -> Result<LoadedKernel> {
    let mut file = open(path, "kernel")?;
    check_fits(&file, path, "kernel", memory_bytes)?;
    let high_ram = Some(GuestAddress(layout::HIGH_RAM));
    let not_a_kernel = |why: String| Error::NotAKernel { path: path.to_path_buf(), why };
    match Elf::load(mem, None, &mut file, high_ram) {
        Ok(loaded) => {
            let entry = match loaded.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => Entry::Pvh { rip: addr.raw_value() },
                _ => Entry::Linux64 { rip: loaded.kernel_load.raw_value() },
            };
            return Ok(LoadedKernel { entry, end: loaded.kernel_end, header: None });
        }
        Err(LoaderError::Elf(ElfError::InvalidElfMagicNumber)) => {}
        Err(e) => return Err(not_a_kernel(format!("bad ELF: {e}"))),
    }
    let header = read_setup_header(&mut file).ok_or_else(|| not_a_kernel("no ELF or bzImage header".into()))?;
    if header.version < MIN_PROTOCOL_64BIT_ENTRY || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(not_a_kernel(format!("bzImage protocol {:#x} has no 64-bit entry", { header.version })));
    }
    let loaded = BzImage::load(mem, None, &mut file, high_ram).map_err(|e| not_a_kernel(e.to_string()))?;
    let header = loaded.setup_header.unwrap_or(header);
    let rip = loaded.kernel_load.raw_value() + 0x200;
    Ok(LoadedKernel { entry: Entry::Linux64 { rip }, end: loaded.kernel_end, header: Some(header) })
}

/// The bzImage setup header sits at 0x1f1 and starts its magic at 0x202.
fn read_setup_header(file: &mut File) -> Option<setup_header> {
    use std::io::{Read, Seek, SeekFrom};
    use vm_memory::ByteValued;
    let mut header = setup_header::default();
    file.seek(SeekFrom::Start(0x1f1)).ok()?;
    file.read_exact(header.as_mut_slice()).ok()?;
    (header.header == HDR_MAGIC).then_some(header)
}

fn build_cmdline(text: &str, capacity: usize) -> Result<Cmdline> {
    if text.len() >= capacity {
        return Err(Error::CmdlineTooLong { len: text.len(), max: capacity - 1 });
    }
    if let Some(c) = text.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(Error::BadCmdline(format!("{c:?} is not a printable ASCII character")));
    }
    Cmdline::try_from(text, capacity).map_err(|e| Error::BadCmdline(e.to_string()))
}

/// The initrd goes as high as the kernel allows, page-aligned, below the MMIO hole and above
/// the kernel image, where the kernel's early allocator is least likely to trip over it.
fn load_initrd(mem: &GuestMemoryMmap, path: &Path, kernel: &LoadedKernel, memory_bytes: u64) -> Result<(u64, u64)> {
    let mut file = open(path, "initrd")?;
    let size = check_fits(&file, path, "initrd", memory_bytes)?;
    let max_end = match &kernel.header {
        Some(hdr) => low_ram_end(memory_bytes).min(u64::from(hdr.initrd_addr_max) + 1),
        None => low_ram_end(memory_bytes),
    };
    // The kernel's end comes from the image's own headers: an ELF segment may claim to end
    // anywhere up to 2^64.
    let too_big = || Error::TooBig { what: "kernel and initrd together", size_mib: kernel.end.saturating_add(size) >> 20, memory_mib: memory_bytes >> 20 };
    let start = max_end.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if start < kernel.end.max(layout::HIGH_RAM) {
        return Err(too_big());
    }
    let len = usize::try_from(size).map_err(|_| too_big())?;
    use vm_memory::Bytes;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, len)
        .map_err(guest_write("the initrd"))?;
    Ok((start, size))
}

fn open(path: &Path, what: &'static str) -> Result<File> {
    let read_error = |source| Error::ReadFile { what, path: path.to_path_buf(), source };
    let file = File::open(path).map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if meta.is_dir() {
        return Err(read_error(std::io::Error::other("it is a directory")));
    }
    Ok(file)
}

/// Refuses a file larger than the guest's whole memory before reading any of it.
fn check_fits(file: &File, path: &Path, what: &'static str, memory_bytes: u64) -> Result<u64> {
    let size = file
        .metadata()
        .map_err(|source| Error::ReadFile { what, path: path.to_path_buf(), source })?
        .len();
    if size >= memory_bytes {
        return Err(Error::TooBig { what, size_mib: size.div_ceil(1 << 20), memory_mib: memory_bytes >> 20 });
    }
    Ok(size)
}

/// The zero page: the image's own setup header, amended with what we loaded and where.
fn write_zero_page(
    mem: &GuestMemoryMmap,
    memory_bytes: u64,
    header: setup_header,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    let params = zero_page(memory_bytes, header, cmdline_len, initrd, rsdp);
    let boot = BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem)
        .map_err(guest_write("boot_params"))
}

/// Builds the `boot_params` a 64-bit-entry kernel reads.
pub fn zero_page(
    memory_bytes: u64,
    mut header: setup_header,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> boot_params {
    let mut params = boot_params::default();
    header.type_of_loader = LOADER_TYPE_UNDEFINED;
    header.loadflags |= LOADFLAG_CAN_USE_HEAP;
    header.heap_end_ptr = 0xfe00;
    header.cmd_line_ptr = layout::CMDLINE as u32;
    // The kernel writes its limit here; a headerless ELF has none, so we say how long ours is.
    if header.cmdline_size == 0 {
        header.cmdline_size = cmdline_len as u32;
    }
    if let Some((addr, size)) = initrd {
        header.ramdisk_image = addr as u32;
        header.ramdisk_size = size as u32;
    }
    params.hdr = header;
    params.acpi_rsdp_addr = rsdp;
    let map = e820_map(memory_bytes);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        slot.addr = entry.addr;
        slot.size = entry.size;
        slot.r#type = entry.kind as u32;
    }
    params.e820_entries = map.len() as u8;
    params
}

/// PVH's start_info, with the initrd as its one module and the same memory map.
fn write_start_info(mem: &GuestMemoryMmap, memory_bytes: u64, initrd: Option<(u64, u64)>, rsdp: u64) -> Result<()> {
    let (info, memmap, modules) = start_info(memory_bytes, initrd, rsdp);
    let mut boot = BootParams::new::<hvm_start_info>(&info, GuestAddress(layout::PVH_START_INFO));
    boot.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(layout::PVH_MEMMAP));
    if !modules.is_empty() {
        boot.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(layout::PVH_MODLIST));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem)
        .map_err(guest_write("PVH start_info"))
}

/// Builds the `hvm_start_info`, its memory map and its module list.
pub fn start_info(
    memory_bytes: u64,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> (hvm_start_info, Vec<hvm_memmap_table_entry>, Vec<hvm_modlist_entry>) {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(memory_bytes)
        .iter()
        .map(|e: &E820Entry| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind as u32, reserved: 0 })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry { paddr, size, ..Default::default() })
        .into_iter()
        .collect();
    let info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE,
        rsdp_paddr: rsdp,
        memmap_paddr: layout::PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { layout::PVH_MODLIST },
        ..Default::default()
    };
    (info, memmap, modules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_page_carries_the_loader_facts() {
        let header = setup_header { version: 0x020f, cmdline_size: 2047, ..Default::default() };
        let params = zero_page(256 << 20, header, 30, Some((0x0f00_0000, 0x12345)), 0xe0000);
        assert_eq!({ params.hdr.type_of_loader }, 0xff);
        assert_eq!({ params.hdr.cmd_line_ptr }, layout::CMDLINE as u32);
        assert_eq!({ params.hdr.cmdline_size }, 2047);
        assert_eq!({ params.hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 0x12345);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(params.e820_entries, 3);
        let last = params.e820_table[2];
        assert_eq!(({ last.addr }, { last.size }, { last.r#type }), (0x100000, (256 << 20) - 0x100000, 1));
    }

    #[test]
    fn start_info_lists_initrd_and_memory() {
        let (info, memmap, modules) = start_info(1 << 30, Some((0x3000_0000, 4096)), 0xe0000);
        assert_eq!(info.magic, PVH_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries as usize, memmap.len());
        assert_eq!((modules[0].paddr, modules[0].size), (0x3000_0000, 4096));
        assert_eq!(memmap[1].type_, 2);
    }

    #[test]
    fn start_info_without_initrd_has_no_modules() {
        let (info, _, modules) = start_info(1 << 30, None, 0);
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
        assert!(modules.is_empty());
    }

    #[test]
    fn cmdline_limits_follow_the_kernel_header() {
        let kernel = |header| LoadedKernel { entry: Entry::Linux64 { rip: 0 }, end: 0, header };
        let modern = setup_header { version: 0x020f, cmdline_size: 2047, ..Default::default() };
        let old = setup_header { version: 0x0202, ..Default::default() };
        assert_eq!(kernel(Some(modern)).cmdline_capacity(), 2048);
        assert_eq!(kernel(Some(old)).cmdline_capacity(), 256);
        assert_eq!(kernel(None).cmdline_capacity(), 2048);
    }

    #[test]
    fn cmdline_too_long_is_refused_with_the_limit() {
        let long = "x".repeat(300);
        assert!(matches!(build_cmdline(&long, 256), Err(Error::CmdlineTooLong { len: 300, max: 255 })));
        assert!(build_cmdline(&long, 2048).is_ok());
        assert!(matches!(build_cmdline("bad\u{7f}", 2048), Err(Error::BadCmdline(_))));
    }
}
