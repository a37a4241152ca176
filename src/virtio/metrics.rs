//! What the disks and network cards count while they work, for the metrics file (`PUT
//! /metrics`, `--metrics-path`), under the names Firecracker's metrics use for the same things.
//!
//! The counters sit on the hot paths of the devices' worker threads, so each is one relaxed
//! atomic add; the API thread takes them (reading and zeroing) once per metrics line, which
//! makes every line count the interval since the one before, as Firecracker's lines do. The
//! device and the API share them through the device's handle ([`crate::control::LiveDevices`]);
//! nothing here comes from outside lguest.

use std::sync::atomic::{AtomicU64, Ordering};

/// One counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    /// The count now, without resetting it (for tests).
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// The count since the last take.
    fn take(&self) -> u64 {
        self.0.swap(0, Ordering::Relaxed)
    }
}

/// A device's counters, each named once: the field's name is its name in the metrics file.
macro_rules! device_metrics {
    ($(#[$doc:meta])* $name:ident { $($(#[$field_doc:meta])* $field:ident,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$field_doc])* pub $field: Counter,)*
        }

        impl $name {
            /// Every counter's name and its count since the last take, zeroing it.
            pub fn take(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.take()),)*]
            }
        }
    };
}

device_metrics! {
    /// A disk's counters (Firecracker's `BlockDeviceMetrics`).
    BlockMetrics {
        /// Kicks of the request queue.
        queue_event_count,
        /// Bytes read from the image into the guest, and the reads that did it.
        read_bytes,
        read_count,
        /// Bytes written from the guest to the image, and the writes that did it.
        write_bytes,
        write_count,
        flush_count,
        /// Requests the guest got wrong (IOERR or UNSUPP, or dropped unanswered).
        invalid_reqs_count,
        /// Requests the host's file failed.
        execute_fails,
        /// Times the rate limiter held the queue back, and its timer woke it.
        rate_limiter_throttled_events,
        rate_limiter_event_count,
        /// New images put in the drive (`PATCH /drives`), and those refused.
        update_count,
        update_fails,
    }
}

device_metrics! {
    /// A network card's counters (Firecracker's `NetDeviceMetrics`). Bytes are the frames'
    /// own, without the virtio-net header.
    NetMetrics {
        rx_queue_event_count,
        /// The backend had frames for the guest.
        rx_tap_event_count,
        rx_bytes_count,
        rx_packets_count,
        /// Frames larger than the buffers the guest posted, dropped.
        rx_fails,
        /// Receive chains the guest posted that could not take a frame, returned unused.
        rx_bad_buffers,
        rx_rate_limiter_throttled,
        rx_event_rate_limiter_count,
        tx_queue_event_count,
        tx_bytes_count,
        tx_packets_count,
        /// Transmit chains that were not a frame, dropped.
        tx_malformed_frames,
        /// Frames the backend refused (a tap that is down, passt gone), dropped.
        tx_fails,
        tx_rate_limiter_throttled,
        tx_rate_limiter_event_count,
    }
}

/// The metrics file's section for devices of one kind: each device's counters under
/// `KIND_ID` (`block_rootfs`), and their sums under `KIND` (`block`), as Firecracker writes
/// them. The counters are taken (zeroed) as they are read.
pub fn sections(kind: &str, devices: &[(String, Vec<(&'static str, u64)>)], empty: Vec<(&'static str, u64)>) -> serde_json::Map<String, serde_json::Value> {
    let mut sums = empty;
    let mut out = serde_json::Map::new();
    for (id, counts) in devices {
        for ((_, sum), (_, count)) in sums.iter_mut().zip(counts) {
            *sum += count;
        }
        out.insert(format!("{kind}_{id}"), object(counts));
    }
    out.insert(kind.to_string(), object(&sums));
    out
}

fn object(counts: &[(&'static str, u64)]) -> serde_json::Value {
    counts.iter().map(|&(name, count)| (name.to_string(), serde_json::Value::from(count))).collect::<serde_json::Map<_, _>>().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_take_reads_and_zeroes_every_counter_by_its_name() {
        let block = BlockMetrics::default();
        block.read_bytes.add(4096);
        block.read_count.inc();
        let taken = block.take();
        assert!(taken.contains(&("read_bytes", 4096)) && taken.contains(&("read_count", 1)), "{taken:?}");
        assert!(block.take().iter().all(|&(_, count)| count == 0), "zeroed");
    }

    #[test]
    fn each_device_has_its_section_and_the_kind_their_sums() {
        let (a, b) = (NetMetrics::default(), NetMetrics::default());
        a.rx_bytes_count.add(100);
        b.rx_bytes_count.add(20);
        b.tx_packets_count.inc();
        let devices = vec![("eth0".to_string(), a.take()), ("eth1".to_string(), b.take())];
        let out = sections("net", &devices, NetMetrics::default().take());
        assert_eq!(out["net_eth0"]["rx_bytes_count"], 100);
        assert_eq!(out["net_eth1"]["tx_packets_count"], 1);
        assert_eq!(out["net"]["rx_bytes_count"], 120);
        assert_eq!(out["net"]["tx_packets_count"], 1);
        let none = sections("block", &[], BlockMetrics::default().take());
        assert_eq!(none["block"]["read_bytes"], 0, "no disk: the sums are there, zero");
    }
}
