//! Fuzzes the command-line parsers: `--memory`, `--disk` and `--net` values, and whole
//! argument lists through clap. These are the user's bytes, not the guest's, but a launcher
//! that panics on a typo instead of saying what to change is a bug, and what each parser
//! accepts must be exactly what its documentation says (a size in range, a non-empty path and
//! a short ASCII serial, a tap name that fits IFNAMSIZ or `user` with forwards of real ports, a
//! unicast MAC, and rate limits only where rx_/tx_ options asked for them).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lguest::config::{parse_disk, parse_memory, parse_net, Cli, NetBackend, MAX_DISK_ID, MAX_MEMORY_MIB, MIN_MEMORY_MIB};

#[derive(Arbitrary, Debug)]
enum Input {
    Memory(String),
    Disk(String),
    Net(String),
    Args(Vec<String>),
}

/// `512M`, `512MiB`, `2G`, `2GiB` or `512`, any case, surrounding white space allowed.
fn memory_spelling(value: &str) -> Option<u64> {
    let trimmed = value.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(scale)
}

fuzz_target!(|input: Input| match input {
    Input::Memory(value) => {
        let parsed = parse_memory(&value).ok();
        let documented = memory_spelling(&value).filter(|mib| (MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(mib));
        assert_eq!(parsed, documented, "--memory {value:?}");
    }
    Input::Disk(value) => {
        if let Ok(disk) = parse_disk(&value) {
            let path = disk.path.to_str().expect("a path from a str");
            assert!(!path.is_empty() && !path.contains(','), "--disk {value:?} gave path {path:?}");
            assert!(value.starts_with(path), "--disk {value:?}: the path is the first field");
            if let Some(id) = disk.id {
                assert!(!id.is_empty() && id.len() <= MAX_DISK_ID && id.is_ascii(), "--disk {value:?} gave id {id:?}");
            }
        }
    }
    Input::Net(value) => {
        if let Ok(net) = parse_net(&value) {
            match &net.backend {
                NetBackend::Tap { name, .. } => assert!(!name.is_empty() && name.len() < libc::IFNAMSIZ, "--net {value:?} gave tap {name:?}"),
                NetBackend::User { forwards } => {
                    assert!(value.split(',').any(|o| o == "user"), "--net {value:?} is user without saying so");
                    assert!(forwards.iter().all(|f| f.host_port != 0 && f.guest_port != 0), "--net {value:?} forwards port 0");
                }
            }
            if let Some(mac) = net.mac {
                assert_eq!(mac[0] & 1, 0, "--net {value:?} gave a multicast MAC");
            }
            for (limit, prefix) in [(net.rx_rate_limit, "rx_"), (net.tx_rate_limit, "tx_")] {
                let buckets = [limit.bandwidth, limit.ops].into_iter().flatten();
                assert!(buckets.clone().all(|b| b.size() > 0 && b.refill_time_ms() > 0), "--net {value:?} gave an empty bucket");
                let said = value.split(',').any(|o| o.starts_with(prefix));
                assert!(said || buckets.count() == 0, "--net {value:?} limits {prefix} without saying so");
            }
        }
    }
    Input::Args(args) => {
        use clap::Parser;
        let _ = Cli::try_parse_from(std::iter::once("lguest".to_string()).chain(args));
    }
});
