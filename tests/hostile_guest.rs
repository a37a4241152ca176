//! A malicious virtio driver, as a tiny guest run directly on this host's /dev/kvm: "a
//! malicious Guest could..." (the seed), tried for real against the VMM's PCI and virtio code.
//!
//! The guest has a disk (00:01.0) and an entropy device (00:02.0). It attacks the disk: garbage
//! over its PCI config space and its whole common-config region, notifications long before
//! DRIVER_OK, then a queue whose size is not a power of two and whose rings lie outside guest
//! memory, then a storm of notifications. The disk must end up NEEDS_RESET (the guest reads the
//! bit back), the VMM must say which device the guest broke, and the entropy device must still
//! work: the guest then drives it properly, posting a looping chain first and a good buffer
//! after it, and waits for both to come back.
//!
//! A second guest floods the entropy device with maximal requests (a full ring of 48 MiB
//! buffers, forty times over): the VMM's memory must not grow with what the guest asks for.

mod common;

use std::time::Duration;

use common::*;
use iced_x86::code_asm::*;

/// The BARs `lguest` gives slot 1 and slot 2: the PCI window at 3 GiB, 32 KiB each. Devices
/// take slots in the order console, disks, nets, rng.
const DISK_BAR: u64 = 0xc000_8000;
const RNG_BAR: u64 = 0xc001_0000;
const RNG_ALONE_BAR: u64 = 0xc000_8000;
const NOTIFY: u64 = 0x3000;

/// Common-config registers (virtio 1.2, 4.1.4.3).
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

const ACK_DRIVER: u32 = 1 | 2;
const FEATURES_OK: u32 = 8;
const DRIVER_OK: u32 = 4;
const NEEDS_RESET: u32 = 64;

/// The rng's rings and buffers, in guest RAM above the program.
const DESC: u64 = 0x20_0000;
const AVAIL: u64 = 0x20_1000;
const USED: u64 = 0x20_2000;
const BUFFER: u64 = 0x20_3000;

fn store32(a: &mut CodeAssembler, addr: u64, value: u32) {
    a.mov(rdi, addr).expect("mov");
    a.mov(dword_ptr(rdi), value).expect("store");
}

fn store16(a: &mut CodeAssembler, addr: u64, value: u16) {
    a.mov(rdi, addr).expect("mov");
    a.mov(word_ptr(rdi), u32::from(value)).expect("store");
}

fn store8(a: &mut CodeAssembler, addr: u64, value: u8) {
    a.mov(rdi, addr).expect("mov");
    a.mov(byte_ptr(rdi), u32::from(value)).expect("store");
}

fn store64(a: &mut CodeAssembler, addr: u64, value: u64) {
    a.mov(rdi, addr).expect("mov");
    a.mov(rax, value).expect("mov");
    a.mov(qword_ptr(rdi), rax).expect("store");
}

/// Writes a split-ring descriptor: address, length, flags, next.
fn descriptor(a: &mut CodeAssembler, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let at = DESC + index * 16;
    store64(a, at, addr);
    store32(a, at + 8, len);
    store16(a, at + 12, flags);
    store16(a, at + 14, next);
}

/// ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK: what every virtio 1 driver does first.
fn negotiate(a: &mut CodeAssembler, bar: u64) {
    store8(a, bar + STATUS, 0);
    store8(a, bar + STATUS, ACK_DRIVER as u8);
    store32(a, bar + DRIVER_FEATURE_SELECT, 1);
    store32(a, bar + DRIVER_FEATURE, 1); // bit 32: VERSION_1
    store8(a, bar + STATUS, (ACK_DRIVER | FEATURES_OK) as u8);
}

/// Garbage into every dword of the disk's PCI config space, through 0xCF8/0xCFC.
fn scribble_on_config_space(a: &mut CodeAssembler) {
    for register in (0..0x100u32).step_by(4) {
        a.mov(dx, 0xcf8u32).expect("mov");
        a.mov(eax, 0x8000_0000 | 1 << 11 | register).expect("mov");
        a.out(dx, eax).expect("out");
        a.mov(dx, 0xcfcu32).expect("mov");
        a.mov(eax, 0xdead_beefu32).expect("mov");
        a.out(dx, eax).expect("out");
    }
}

/// `count` notifications of queue 0 at `bar`.
fn notify_storm(a: &mut CodeAssembler, bar: u64, count: u32) {
    let mut again = a.create_label();
    a.mov(rdi, bar + NOTIFY).expect("mov");
    a.mov(ecx, count).expect("mov");
    a.set_label(&mut again).expect("label");
    a.mov(word_ptr(rdi), 0u32).expect("store");
    a.dec(ecx).expect("dec");
    a.jnz(again).expect("jnz");
}

/// A driver's whole set-up of queue 0 at `bar`, with the rings at DESC/AVAIL/USED, up to DRIVER_OK.
fn start_queue(a: &mut CodeAssembler, bar: u64, size: u16) {
    negotiate(a, bar);
    store16(a, bar + QUEUE_SELECT, 0);
    store16(a, bar + QUEUE_SIZE, size);
    store64(a, bar + QUEUE_DESC, DESC);
    store64(a, bar + QUEUE_DRIVER, AVAIL);
    store64(a, bar + QUEUE_DEVICE, USED);
    store16(a, bar + QUEUE_ENABLE, 1);
    store8(a, bar + STATUS, (ACK_DRIVER | FEATURES_OK | DRIVER_OK) as u8);
}

fn attack_the_disk(a: &mut CodeAssembler, failed: CodeLabel) {
    scribble_on_config_space(a);
    a.mov(rdi, DISK_BAR).expect("mov");
    for offset in (0..0x38u64).step_by(4) {
        a.mov(dword_ptr(rdi + offset as i32), 0xdead_beefu32).expect("store");
    }
    notify_storm(a, DISK_BAR, 1000); // before DRIVER_OK
    negotiate(a, DISK_BAR);
    store16(a, DISK_BAR + QUEUE_SELECT, 0);
    store16(a, DISK_BAR + QUEUE_SIZE, 255); // not a power of two
    store64(a, DISK_BAR + QUEUE_DESC, 0xfff_0000_0000); // far outside guest memory
    store64(a, DISK_BAR + QUEUE_DRIVER, 0xfff_0000_1000);
    store64(a, DISK_BAR + QUEUE_DEVICE, 0xfff_0000_2000);
    store16(a, DISK_BAR + QUEUE_ENABLE, 1);
    store8(a, DISK_BAR + STATUS, (ACK_DRIVER | FEATURES_OK | DRIVER_OK) as u8);
    notify_storm(a, DISK_BAR, 10_000);
    a.mov(rdi, DISK_BAR + STATUS).expect("mov");
    a.movzx(eax, byte_ptr(rdi)).expect("load");
    a.test(eax, NEEDS_RESET).expect("test");
    a.jz(failed).expect("jz");
    print(a, "disk needs reset\n");
}

fn use_the_rng(a: &mut CodeAssembler, failed: CodeLabel) {
    descriptor(a, 0, BUFFER, 16, 2, 0); // write-only, 16 bytes
    descriptor(a, 1, BUFFER + 0x100, 16, 3, 1); // write-only, NEXT pointing at itself
    store16(a, AVAIL + 4, 1); // the looping chain first
    store16(a, AVAIL + 6, 0); // then the good one
    store16(a, AVAIL + 2, 2);
    start_queue(a, RNG_BAR, 16);
    store16(a, RNG_BAR + NOTIFY, 0);
    // Wait (bounded) for both chains to come back: used.idx == 2.
    let (mut poll, mut back) = (a.create_label(), a.create_label());
    a.mov(ecx, 50_000_000u32).expect("mov");
    a.mov(rdi, USED + 2).expect("mov");
    a.set_label(&mut poll).expect("label");
    a.movzx(eax, word_ptr(rdi)).expect("load");
    a.cmp(eax, 2).expect("cmp");
    a.je(back).expect("je");
    a.pause().expect("pause");
    a.dec(ecx).expect("dec");
    a.jnz(poll).expect("jnz");
    a.jmp(failed).expect("jmp");
    a.set_label(&mut back).expect("label");
    // The second used entry is the good buffer: id 0, 16 bytes.
    a.mov(rdi, USED + 4 + 8).expect("mov");
    a.mov(eax, dword_ptr(rdi)).expect("load");
    a.cmp(eax, 0).expect("cmp");
    a.jne(failed).expect("jne");
    a.mov(eax, dword_ptr(rdi + 4)).expect("load");
    a.cmp(eax, 16).expect("cmp");
    a.jne(failed).expect("jne");
}

#[test]
fn a_malicious_driver_breaks_only_its_own_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("image");
    let kernel = tiny_guest(dir.path(), "hostile", |a| {
        let failed = a.create_label();
        attack_the_disk(a, failed);
        use_the_rng(a, failed);
        report_and_reset(a, failed, "rng still works\n", "FAILED\n");
    });
    let mut command = lguest();
    command.args(["run", "--memory", "64M", "--rng", "--kernel"]).arg(&kernel).arg("--disk").arg(&image);
    let out = run_with_deadline(command, Duration::from_secs(120));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(stdout, "disk needs reset\nrng still works\n", "stderr: {stderr}");
    assert_eq!(out.status.code(), Some(0), "the VMM outlived its guest's attack; stderr: {stderr}");
    assert!(
        stderr.contains("virtio-blk at 00:01.0") && stderr.contains("needs a reset"),
        "the report names the broken device: {stderr}"
    );
    assert_eq!(std::fs::read(&image).expect("image"), vec![0u8; 1 << 20], "the disk was never written");
}

/// Fills a 256-entry ring with the same 48 MiB write-only buffer, forty times over, each time
/// waiting for the device to hand every request back.
fn flood_the_rng(a: &mut CodeAssembler, failed: CodeLabel) {
    const ROUNDS: u32 = 40;
    descriptor(a, 0, 0x30_0000, 48 << 20, 2, 0);
    // Every avail slot names descriptor 0 (the ring starts zeroed).
    start_queue(a, RNG_ALONE_BAR, 256);
    let (mut round, mut poll, mut back) = (a.create_label(), a.create_label(), a.create_label());
    a.mov(r8d, 0u32).expect("mov"); // requests posted so far (the avail index)
    a.mov(r9d, ROUNDS).expect("mov");
    a.set_label(&mut round).expect("label");
    a.add(r8d, 256).expect("add");
    a.mov(rdi, AVAIL + 2).expect("mov");
    a.mov(word_ptr(rdi), r8w).expect("store");
    a.mov(rdi, RNG_ALONE_BAR + NOTIFY).expect("mov");
    a.mov(word_ptr(rdi), 0u32).expect("notify");
    a.mov(ecx, 200_000_000u32).expect("mov");
    a.mov(rdi, USED + 2).expect("mov");
    a.set_label(&mut poll).expect("label");
    a.movzx(eax, word_ptr(rdi)).expect("load");
    a.cmp(ax, r8w).expect("cmp");
    a.je(back).expect("je");
    a.pause().expect("pause");
    a.dec(ecx).expect("dec");
    a.jnz(poll).expect("jnz");
    a.jmp(failed).expect("jmp");
    a.set_label(&mut back).expect("label");
    a.dec(r9d).expect("dec");
    a.jnz(round).expect("jnz");
}

/// The largest resident set any child of this test process reached, in KiB.
fn children_peak_rss_kib() -> i64 {
    // SAFETY: getrusage writes only into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_CHILDREN covers every child we have waited for.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) }, 0);
    usage.ru_maxrss
}

#[test]
fn a_flood_of_maximal_requests_does_not_grow_the_vmm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = tiny_guest(dir.path(), "flood", |a| {
        let failed = a.create_label();
        flood_the_rng(a, failed);
        report_and_reset(a, failed, "flood served\n", "FAILED\n");
    });
    let mut command = lguest();
    command.args(["run", "--memory", "64M", "--rng", "--kernel"]).arg(&kernel);
    let out = run_with_deadline(command, Duration::from_secs(300));
    assert_eq!(text(&out.stdout), "flood served\n", "stderr: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
    // 10 240 requests for 48 MiB each: the device fills at most 64 KiB of each, into the
    // guest's own buffer, and allocates nothing per request. The VMM (a few MiB) plus the
    // guest memory actually touched stays far below what the guest asked for.
    let peak = children_peak_rss_kib();
    assert!(peak < 24 << 10, "peak RSS {peak} KiB");
}
