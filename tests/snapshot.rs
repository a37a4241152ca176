//! Snapshots end to end, with tiny guests on this host's /dev/kvm: a guest paused, saved, its
//! process killed, and the guest taken up again in new processes (`lguest restore`, and
//! `PUT /snapshot/load` on `lguest firecracker`), two clones at once from one snapshot; and
//! the refusals of files that are not a usable snapshot, each one line and exit status 2.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::api::*;
use common::*;
use iced_x86::code_asm::*;

/// Prints the letters A to Z over and over, one every few thousand instructions, its place
/// kept in r12 (so only a restored register can carry it on), until the keyboard has a byte
/// for it (Ctrl-Alt-Del): then it says so and resets.
fn alphabet_guest(dir: &Path) -> PathBuf {
    tiny_guest(dir, "alphabet", |a| {
        let (mut top, mut next) = (a.create_label(), a.create_label());
        a.mov(r12d, u32::from(b'A')).expect("mov");
        a.set_label(&mut top).expect("label");
        a.mov(dx, 0x3f8u32).expect("mov");
        a.mov(eax, r12d).expect("mov");
        a.out(dx, al).expect("out");
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
    let (kernel, socket) = (alphabet_guest(dir), dir.join("api.sock"));
    let vm = Running::start(&["run", "--memory", "64M", "--kernel", path(&kernel), "--api-sock", path(&socket)]);
    wait_for_socket(&socket, &vm);
    wait_for("letters", LIMIT, || letters(&vm.output()).len() > 30);
    let (snapshot, memory) = (dir.join("vm.snap"), dir.join("vm.mem"));
    let create = format!(r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#, path(&snapshot), path(&memory));
    let (code, reply) = call(&socket, "PUT", "/snapshot/create", Some(&create));
    assert_eq!(code, 400, "a running guest can't be saved: {reply}");
    assert!(reply.contains("paused first"), "{reply}");
    assert_eq!(call(&socket, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    let paused = letters(&vm.output());
    let (code, reply) = call(&socket, "PUT", "/snapshot/create", Some(&create));
    assert_eq!(code, 204, "{reply} {}", vm.errors());
    assert_eq!(letters(&vm.output()), paused, "the guest ran while paused and saved");
    assert_eq!(std::fs::metadata(&memory).expect("memory file").len(), 64 << 20);
    drop(vm); // killed: the snapshot is all that is left of it
    (*paused.last().expect("a letter"), snapshot, memory)
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
