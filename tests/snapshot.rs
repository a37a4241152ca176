//! Snapshots end to end, with tiny guests on this host's /dev/kvm: a guest paused, saved, its
//! process killed, and the guest taken up again in new processes (`lguest restore`, and
//! `PUT /snapshot/load` on `lguest firecracker`), two clones at once from one snapshot; a Diff
//! snapshot merged onto its base by `lguest rebase-snap`; and the refusals of files that are
//! not a usable snapshot, each one line and exit status 2.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::api::*;
use common::*;
use iced_x86::code_asm::*;

/// Where the alphabet guest also writes each letter it prints: a vCPU's write to memory, for
/// Diff snapshots to catch.
const LETTER_ADDR: u64 = 0x30_0000;

/// Prints the letters A to Z over and over, one every few thousand instructions, its place
/// kept in r12 (so only a restored register can carry it on) and each letter also stored at
/// [`LETTER_ADDR`], until the keyboard has a byte for it (Ctrl-Alt-Del): then it says so and
/// resets.
fn alphabet_guest(dir: &Path) -> PathBuf {
    tiny_guest(dir, "alphabet", |a| {
        let (mut top, mut next) = (a.create_label(), a.create_label());
        a.mov(r12d, u32::from(b'A')).expect("mov");
        a.set_label(&mut top).expect("label");
        a.mov(dx, 0x3f8u32).expect("mov");
        a.mov(eax, r12d).expect("mov");
        a.out(dx, al).expect("out");
        a.mov(dword_ptr(LETTER_ADDR), r12d).expect("mov");
        a.inc(r12d).expect("inc");
        a.cmp(r12d, i32::from(b'Z') + 1).expect("cmp");
        a.jne(next).expect("jne");
        a.mov(r12d, u32::from(b'A')).expect("mov");
        a.set_label(&mut next).expect("label");
        delay_until_ctrl_alt_del(a, top);
    })
}

fn letters(output: &str) -> Vec<u8> {
    output.bytes().filter(u8::is_ascii_uppercase).collect()
}

fn after(letter: u8) -> u8 {
    if letter == b'Z' { b'A' } else { letter + 1 }
}

const LIMIT: Duration = Duration::from_secs(30);

/// Boots the alphabet guest with the API, lets it print a while, pauses it and saves it.
/// Returns the last letter it printed, and the two files.
fn boot_pause_and_save(dir: &Path) -> (u8, PathBuf, PathBuf) {
    let (vm, socket) = boot_alphabet(dir, &[]);
    let (snapshot, memory) = (dir.join("vm.snap"), dir.join("vm.mem"));
    let create = create_body(&snapshot, &memory, "Full");
    let (code, reply) = call(&socket, "PUT", "/snapshot/create", Some(&create));
    assert_eq!(code, 400, "a running guest can't be saved: {reply}");
    assert!(reply.contains("paused first"), "{reply}");
    let paused = pause(&vm, &socket);
    let (code, reply) = call(&socket, "PUT", "/snapshot/create", Some(&create_body(&snapshot, &memory, "Diff")));
    assert_eq!(code, 400, "a Diff snapshot needs dirty page tracking: {reply}");
    assert!(reply.contains("dirty page tracking disabled"), "{reply}");
    save(&vm, &socket, &create);
    assert_eq!(std::fs::metadata(&memory).expect("memory file").len(), 64 << 20);
    drop(vm); // killed: the snapshot is all that is left of it
    (*paused.last().expect("a letter"), snapshot, memory)
}

/// The alphabet guest in 64 MiB with the API on a socket in `dir`, printing; `flags` go to
/// `lguest run`.
fn boot_alphabet(dir: &Path, flags: &[&str]) -> (Running, PathBuf) {
    let (kernel, socket) = (alphabet_guest(dir), dir.join("api.sock"));
    let mut args = vec!["run", "--memory", "64M", "--kernel", path(&kernel), "--api-sock", path(&socket)];
    args.extend_from_slice(flags);
    let vm = Running::start(&args);
    wait_for_socket(&socket, &vm);
    wait_for("letters", LIMIT, || letters(&vm.output()).len() > 30);
    (vm, socket)
}

fn create_body(snapshot: &Path, memory: &Path, kind: &str) -> String {
    format!(r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "snapshot_type": "{kind}"}}"#, path(snapshot), path(memory))
}

/// Pauses the guest; the letters it had printed.
fn pause(vm: &Running, socket: &Path) -> Vec<u8> {
    assert_eq!(call(socket, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    letters(&vm.output())
}

/// Takes the snapshot `create` asks for of the paused guest, which must not run meanwhile.
fn save(vm: &Running, socket: &Path, create: &str) {
    let paused = letters(&vm.output());
    let (code, reply) = call(socket, "PUT", "/snapshot/create", Some(create));
    assert_eq!(code, 204, "{reply} {}", vm.errors());
    assert_eq!(letters(&vm.output()), paused, "the guest ran while paused and saved");
}

/// The bytes of the file at `path` the file system has allocated: data, not holes.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("file").blocks() * 512
}

#[test]
fn a_diff_snapshot_holds_the_pages_the_guest_wrote_and_rebased_onto_its_base_restores_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (vm, socket) = boot_alphabet(dir.path(), &["--track-dirty-pages"]);
    let [base_snap, base_mem, diff_snap, diff_mem] = ["base.snap", "base.mem", "diff.snap", "diff.mem"].map(|name| dir.path().join(name));
    let at_base = pause(&vm, &socket).len();
    save(&vm, &socket, &create_body(&base_snap, &base_mem, "Full"));
    assert_eq!(call(&socket, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0, 204);
    wait_for("letters after the Full snapshot", LIMIT, || letters(&vm.output()).len() > at_base + 30);
    let last = *pause(&vm, &socket).last().expect("a letter");
    save(&vm, &socket, &create_body(&diff_snap, &diff_mem, "Diff"));
    drop(vm);

    // The diff is as long as guest memory, holds the page the vCPU wrote the letter to, and
    // little else: far less than the Full snapshot's data.
    let diff = std::fs::read(&diff_mem).expect("diff file");
    assert_eq!(diff.len(), 64 << 20);
    assert_eq!(diff[LETTER_ADDR as usize], last, "the vCPU's last write is in the diff");
    assert!(allocated(&diff_mem) < allocated(&base_mem), "diff {} bytes, Full {} bytes", allocated(&diff_mem), allocated(&base_mem));
    assert!(allocated(&diff_mem) <= 16 * 4096, "the diff allocates {} bytes for one page written", allocated(&diff_mem));

    // Merged onto a copy of the base, it restores the guest as the Diff left it.
    let merged = dir.path().join("merged.mem");
    std::fs::copy(&base_mem, &merged).expect("copy the base");
    let mut rebase = lguest();
    rebase.args(["rebase-snap", "--base-file", path(&merged), "--diff-file", path(&diff_mem)]);
    let out = run_with_deadline(rebase, LIMIT);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let mut restored = Running::start(&["restore", "--snapshot", path(&diff_snap), "--memory-file", path(&merged)]);
    assert_goes_on(&restored, last, "the rebased Diff snapshot");
    assert_eq!(restored.terminate(), 0, "{}", restored.errors());

    // A diff of another guest's size is refused in one line, the base left as it was.
    let mut rebase = lguest();
    rebase.args(["rebase-snap", "--base-file", path(&merged), "--diff-file", path(&diff_snap)]);
    let out = run_with_deadline(rebase, LIMIT);
    let errors = text(&out.stderr);
    assert_eq!((out.status.code(), errors.trim().lines().count()), (Some(2), 1), "{errors}");
    assert!(errors.contains("same guest"), "{errors}");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// Waits for a restored guest's first letters and checks it took up where it was paused.
fn assert_goes_on(vm: &Running, last: u8, who: &str) {
    wait_for(who, LIMIT, || letters(&vm.output()).len() > 3);
    let restored = letters(&vm.output());
    assert_eq!(restored.first(), Some(&after(last)), "{who} did not go on from {}: {} / {}", last as char, vm.output(), vm.errors());
}

#[test]
fn a_saved_guest_goes_on_where_it_was_paused_in_two_new_processes_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (last, snapshot, memory) = boot_pause_and_save(dir.path());

    // A clone on the command line, and one through Firecracker's API, from the same files.
    let socket = dir.path().join("restore.sock");
    let mut by_cli = Running::start(&["restore", "--snapshot", path(&snapshot), "--memory-file", path(&memory), "--api-sock", path(&socket)]);
    let fc_socket = dir.path().join("fc.sock");
    let mut by_api = Running::start(&["firecracker", "--api-sock", path(&fc_socket)]);
    wait_for_socket(&fc_socket, &by_api);
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
        path(&snapshot),
        path(&memory)
    );
    let (code, reply) = call(&fc_socket, "PUT", "/snapshot/load", Some(&load));
    assert_eq!(code, 204, "{reply} {}", by_api.errors());
    assert_goes_on(&by_cli, last, "lguest restore");
    assert_goes_on(&by_api, last, "PUT /snapshot/load");

    // The restored keyboard controller still takes Ctrl-Alt-Del (SIGTERM), and the guest's
    // reset ends the process cleanly.
    assert_eq!(by_cli.terminate(), 0, "{}", by_cli.errors());
    assert!(by_cli.output().contains("CTRL-ALT-DEL"), "{}", by_cli.output());
    assert_eq!(by_api.terminate(), 0, "{}", by_api.errors());
}

/// Runs `lguest restore` on `snapshot` and `memory`, expecting a refusal: status 2 and one
/// line that contains `says`.
fn assert_refused(snapshot: &Path, memory: &Path, says: &str) {
    let mut command = lguest();
    command.args(["restore", "--snapshot", path(snapshot), "--memory-file", path(memory)]);
    let out = run_with_deadline(command, LIMIT);
    let errors = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{says}: {errors}");
    assert_eq!(errors.trim().lines().count(), 1, "{errors}");
    assert!(errors.contains(says), "expected '{says}' in: {errors}");
    assert!(out.stdout.is_empty(), "a guest ran: {}", text(&out.stdout));
}

#[test]
fn files_that_are_not_a_usable_snapshot_are_refused_in_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, snapshot, memory) = boot_pause_and_save(dir.path());
    let good = std::fs::read(&snapshot).expect("snapshot");
    let bad = dir.path().join("bad.snap");
    let with = |bytes: &[u8]| {
        std::fs::write(&bad, bytes).expect("write");
        bad.as_path()
    };
    let mut corrupt = good.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0x40;
    assert_refused(with(&corrupt), &memory, "checksum does not match");
    assert_refused(with(&good[..good.len() - 100]), &memory, "truncated");
    let mut newer = good.clone();
    newer[8] = 99;
    assert_refused(with(&newer), &memory, "version 99");
    assert_refused(with(b"#!/bin/sh\necho not a snapshot\n"), &memory, "not an lguest snapshot");
    assert_refused(&dir.path().join("missing.snap"), &memory, "cannot read the snapshot");
    let short_memory = dir.path().join("short.mem");
    std::fs::write(&short_memory, vec![0u8; 4096]).expect("write");
    assert_refused(&snapshot, &short_memory, "memory file");
}
