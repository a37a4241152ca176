//! Property tests of the command-line parsers (`--memory`, `--disk`, `--net`), the ordinary
//! suite's half of `fuzz/fuzz_targets/cmdline.rs`. The user types these bytes, not the guest,
//! but a launcher that panics on a typo instead of saying what to change is broken, and each
//! parser must accept exactly what its documentation promises: a size in range in one of the
//! listed spellings, a non-empty path with known options, a tap name that fits IFNAMSIZ and a
//! unicast MAC. Valid values are also generated from their parts and must parse back to them.

use lguest::config::{parse_disk, parse_memory, parse_net, NetBackend, MAX_DISK_ID, MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use proptest::prelude::*;

/// What `--memory` documents: `512M`, `512MiB`, `2G`, `2GiB` or `512` (MiB), any case,
/// surrounding white space allowed, from 32 MiB to 1 TiB.
fn documented_memory(value: &str) -> Option<u64> {
    let trimmed = value.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        _ => return None,
    };
    let mib = digits.parse::<u64>().ok()?.checked_mul(scale)?;
    (MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib).then_some(mib)
}

/// Sizes as people type them, and near misses.
fn memory_spelling() -> impl Strategy<Value = String> {
    let unit = prop::sample::select(vec!["", "M", "m", "MiB", "mb", "G", "g", "GiB", "gB", "K", "T", "MM", "iB", " M"]);
    let number = prop_oneof![0u64..4096, any::<u64>()].prop_map(|n| n.to_string());
    (r"\s{0,2}", number, unit, r"\s{0,2}").prop_map(|(pre, n, unit, post)| format!("{pre}{n}{unit}{post}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parse_memory_never_panics_and_accepts_exactly_what_it_documents(
        value in prop_oneof![memory_spelling(), any::<String>(), "[0-9a-zA-Z ]{0,8}"]
    ) {
        prop_assert_eq!(parse_memory(&value).ok(), documented_memory(&value), "--memory {:?}", value);
    }

    #[test]
    fn parse_disk_accepts_a_path_and_known_options_only(value in prop_oneof![
        any::<String>(),
        r"[a-z./]{0,6}(,(readonly|ro|id=[ -~]{0,22}|id|engine=(io_uring|sync|[a-z_]{0,8})|[a-z]{0,3}=?)){0,3}",
    ]) {
        if let Ok(disk) = parse_disk(&value) {
            let path = disk.path.to_str().expect("a path made from a str").to_string();
            prop_assert!(!path.is_empty() && !path.contains(','));
            let mut options = value.split(',');
            prop_assert_eq!(options.next(), Some(path.as_str()));
            for option in options {
                let engine = option == "engine=io_uring" || option == "engine=sync";
                prop_assert!(option == "readonly" || option.starts_with("id=") || engine, "{:?} accepted", option);
            }
            if let Some(id) = disk.id {
                prop_assert!(!id.is_empty() && id.len() <= MAX_DISK_ID && id.is_ascii());
            }
        }
    }

    #[test]
    fn a_disk_built_from_its_parts_parses_back(
        path in "[a-zA-Z0-9_./-]{1,30}", readonly in any::<bool>(), id in proptest::option::of("[ -+\\--~]{1,20}")
    ) {
        let mut value = path.clone();
        if readonly {
            value.push_str(",readonly");
        }
        if let Some(id) = &id {
            value.push_str(&format!(",id={id}"));
        }
        let disk = parse_disk(&value).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(disk.path.to_str(), Some(path.as_str()));
        prop_assert_eq!(disk.readonly, readonly);
        prop_assert_eq!(disk.id, id);
    }

    #[test]
    fn parse_net_accepts_only_a_short_tap_name_and_a_unicast_mac(value in prop_oneof![
        any::<String>(),
        r"(tap=[a-z0-9]{0,17}|user|hostfwd=(tcp|udp|x):(\[::1\]:|127\.0\.0\.1:|:)?[0-9]{0,6}-:?[0-9]{0,6}|mac=([0-9a-fA-F]{1,3}:){0,6}[0-9a-fA-F]{0,2}|x=|,){0,4}",
    ]) {
        if let Ok(net) = parse_net(&value) {
            match &net.backend {
                NetBackend::Tap { name, .. } => prop_assert!(!name.is_empty() && name.len() < libc::IFNAMSIZ, "tap {:?}", name),
                NetBackend::User { forwards } => {
                    prop_assert!(value.split(',').any(|o| o == "user"), "user without 'user' in {:?}", value);
                    for f in forwards {
                        prop_assert!(f.host_port != 0 && f.guest_port != 0, "port 0 in {:?}", value);
                    }
                }
            }
            if let Some(mac) = net.mac {
                prop_assert_eq!(mac[0] & 1, 0, "a multicast MAC was accepted");
            }
        }
    }

    #[test]
    fn a_net_built_from_its_parts_parses_back(tap in "[a-z0-9]{1,15}", mac in proptest::option::of(any::<[u8; 6]>())) {
        let mut value = format!("tap={tap}");
        if let Some(mac) = mac {
            let text: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
            value.push_str(&format!(",mac={}", text.join(":")));
        }
        match (parse_net(&value), mac) {
            (Ok(net), Some(mac)) if mac[0] & 1 == 0 => prop_assert_eq!((net.backend, net.mac), (NetBackend::Tap { name: tap, vhost: false }, Some(mac))),
            (Ok(net), None) => prop_assert_eq!((net.backend, net.mac), (NetBackend::Tap { name: tap, vhost: false }, None)),
            (Err(_), Some(mac)) => prop_assert_eq!(mac[0] & 1, 1, "a unicast MAC was refused"),
            (result, mac) => prop_assert!(false, "{:?} for {:?} ({:?})", result, value, mac),
        }
    }
}
