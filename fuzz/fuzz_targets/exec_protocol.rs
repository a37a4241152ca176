//! Fuzzes what `lguest exec`'s two sides read from each other and from the user: the request
//! file the guest's init reads from its initramfs, the control stream's lines (the init's
//! reports, read by lguest; lguest's window sizes and forwarded signals, read by the init),
//! modules.dep, and a bzImage's version string. Each must refuse what is wrong without a panic, and what it
//! accepts must hold what its checks promise: a command, absolute mount points without `..`,
//! module files that stay in their directory, a status a process can have, a signal lguest
//! forwards.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lguest::exec::control::{HostMessage, LineReader, Report, FORWARDED_SIGNALS};
use lguest::exec::kernel::bzimage_version;
use lguest::exec::modules::ModuleIndex;
use lguest::exec::request::{is_plain_name, Request};

#[derive(Arbitrary, Debug)]
enum Input {
    Request(Vec<u8>),
    ControlStream(Vec<Vec<u8>>),
    ModulesDep { dep: String, builtin: String, wanted: Vec<String> },
    KernelHeader(Vec<u8>),
}

fuzz_target!(|input: Input| match input {
    Input::Request(bytes) => {
        if let Ok(request) = Request::decode(&bytes) {
            assert!(!request.argv.is_empty() && !request.argv[0].is_empty());
            assert_eq!(request.mounts.first().map(|m| m.path.as_str()), Some("/"));
            assert!(request.mounts.iter().all(|m| m.path.starts_with('/') && !m.path.split('/').any(|p| p == "..")));
            assert!(request.modules.iter().all(|m| is_plain_name(m)));
            assert_eq!(Request::decode(&request.encode()).as_ref(), Ok(&request), "a checked request survives encoding");
        }
    }
    Input::ControlStream(chunks) => {
        let mut reader = LineReader::default();
        for chunk in chunks {
            for line in reader.feed(&chunk) {
                if let Some(report) = Report::parse(&line) {
                    assert_eq!(Report::parse(report.to_line().trim_end_matches('\n').as_bytes()), Some(report.clone()));
                    if let Report::Signalled(signal) = report {
                        assert!((1..=64).contains(&signal));
                    }
                }
                if let Some(message) = HostMessage::parse(&line) {
                    assert_eq!(HostMessage::parse(message.to_line().trim_end_matches('\n').as_bytes()), Some(message));
                    if let HostMessage::Kill(signal) = message {
                        assert!(FORWARDED_SIGNALS.contains(&signal));
                    }
                }
            }
        }
    }
    Input::ModulesDep { dep, builtin, wanted } => {
        let index = ModuleIndex::parse(std::path::Path::new("/m"), &dep, &builtin);
        let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
        if let Ok(order) = index.resolve(&wanted) {
            assert!(order.iter().all(|p| p.starts_with("/m") && !p.components().any(|c| c == std::path::Component::ParentDir)));
        }
    }
    Input::KernelHeader(bytes) => {
        if let Some(version) = bzimage_version(&bytes[..]) {
            assert!(!version.is_empty() && !version.contains('/') && !version.starts_with('.'));
        }
    }
});
