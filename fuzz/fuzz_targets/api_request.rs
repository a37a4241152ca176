//! Fuzzes Firecracker's API as lguest parses it: a request's method, path and body through
//! `api::request::parse` and then a real pre-boot `Instance` (no VM: `InstanceStart` finds the
//! main thread gone), and whole `--config-file` documents through `Plan::from_json`. The bytes
//! are an API client's; whatever they are, lguest must answer with an error of one line, never
//! panic, and never accept a value the spec or lguest's limits forbid.
#![no_main]

use std::sync::mpsc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lguest::api::instance::Instance;
use lguest::api::plan::{Plan, MAX_VCPUS};
use lguest::api::request::parse;

#[derive(Arbitrary, Debug)]
enum Input {
    /// A sequence of calls on one instance.
    Calls(Vec<Call>),
    ConfigFile(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Call {
    method: Method,
    path: Path,
    body: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Method {
    Get,
    Put,
    Patch,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Path {
    Known(u8),
    Drive(String),
    Net(String),
    Any(String),
}

const PATHS: [&str; 14] = [
    "/", "/version", "/machine-config", "/vm/config", "/boot-source", "/entropy", "/actions", "/vm",
    "/logger", "/metrics", "/serial", "/balloon", "/snapshot/create", "/vsock",
];

fn method(method: &Method) -> &str {
    match method {
        Method::Get => "GET",
        Method::Put => "PUT",
        Method::Patch => "PATCH",
        Method::Other(other) => other,
    }
}

fn path(path: &Path) -> String {
    match path {
        Path::Known(n) => PATHS[usize::from(*n) % PATHS.len()].to_string(),
        Path::Drive(id) => format!("/drives/{id}"),
        Path::Net(id) => format!("/network-interfaces/{id}"),
        Path::Any(any) => any.clone(),
    }
}

fuzz_target!(|input: Input| match input {
    Input::Calls(calls) => {
        let (starter, main) = mpsc::channel();
        drop(main);
        let mut instance = Instance::waiting("fuzz".into(), Plan::default(), starter);
        for call in calls.iter().take(16) {
            let (method, path) = (method(&call.method), path(&call.path));
            // Files a client names are not the fuzzer's to create or write (or to read: a
            // snapshot path could name a FIFO).
            if path == "/metrics" || path == "/logger" || path == "/snapshot/load" {
                continue;
            }
            if let Err(error) = parse(method, &path, &call.body).and_then(|request| instance.handle(request)) {
                let message = error.to_string();
                assert!(!message.is_empty(), "{method} {path:?}: an empty fault_message");
            }
            let machine = instance.plan().machine();
            assert!((1..=MAX_VCPUS).contains(&machine.vcpu_count), "{machine:?}");
            assert_eq!(instance.state(), "Not started");
        }
    }
    Input::ConfigFile(json) => {
        if let Ok(plan) = Plan::from_json(&json) {
            assert!((1..=MAX_VCPUS).contains(&plan.machine().vcpu_count));
        }
    }
});
