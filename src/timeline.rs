//! When things happened: `--boot-timeline` prints, after the run, the milliseconds from
//! process start to each milestone of the guest's life, how many exits of each kind the vCPUs
//! took, and which I/O ports took the most. Boot speed is a feature; this is how we see where
//! it goes: at ~10 µs or more per exit, a port the guest hammers is worth a look.
//!
//! "Process start" is the first instruction of `main`: the dynamic loader's work before it is
//! not counted (about a millisecond).
//!
//! `--boot-timeline=FILE.json` also writes the same as a Chrome trace ([`Timeline::chrome_trace`]):
//! one span per stretch between milestones, the exits as counters, for Perfetto to draw.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::bus::lock;

/// The milestones, in the order a guest normally reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Milestone {
    /// `lguest exec`: the guest's initramfs is built (see [`crate::exec`]).
    InitramfsBuilt,
    /// The VM, its memory, kernel, devices and vCPUs are all set up.
    VmBuilt,
    /// The boot vCPU is about to run its first guest instruction.
    FirstKvmRun,
    /// The guest wrote the boot timer's magic value (see [`crate::devices::boot_timer`]).
    GuestSignal,
    /// `lguest exec`: the guest's init reached us over vsock (modules loaded, files mounted).
    GuestInitConnected,
    /// `lguest exec`: the guest's init started CMD.
    CommandStarted,
    /// `lguest exec`: CMD ended (its status reached us).
    CommandExited,
    /// The VM stopped.
    Stopped,
}

impl fmt::Display for Milestone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Milestone::InitramfsBuilt => "initramfs built (lguest exec)",
            Milestone::VmBuilt => "VM built (KVM ready, kernel loaded)",
            Milestone::FirstKvmRun => "first KVM_RUN",
            Milestone::GuestSignal => "guest signalled the boot timer",
            Milestone::GuestInitConnected => "guest init connected (modules loaded, files mounted)",
            Milestone::CommandStarted => "CMD started",
            Milestone::CommandExited => "CMD exited",
            Milestone::Stopped => "VM stopped",
        })
    }
}

impl Milestone {
    /// The milestone in a few words, for a trace's span names.
    fn short(self) -> &'static str {
        match self {
            Milestone::InitramfsBuilt => "initramfs built",
            Milestone::VmBuilt => "VM built",
            Milestone::FirstKvmRun => "first KVM_RUN",
            Milestone::GuestSignal => "guest's boot-timer signal",
            Milestone::GuestInitConnected => "guest init connected",
            Milestone::CommandStarted => "CMD started",
            Milestone::CommandExited => "CMD exited",
            Milestone::Stopped => "VM stopped",
        }
    }
}

/// Exit kinds we count, in the vCPU loop's hot path: a relaxed atomic add each.
#[derive(Debug, Clone, Copy)]
pub enum ExitKind {
    PortIn,
    PortOut,
    MmioRead,
    MmioWrite,
    Other,
}

const EXIT_KINDS: [(ExitKind, &str); 5] = [
    (ExitKind::PortIn, "port in"),
    (ExitKind::PortOut, "port out"),
    (ExitKind::MmioRead, "mmio read"),
    (ExitKind::MmioWrite, "mmio write"),
    (ExitKind::Other, "other"),
];

/// How many ports the report names, busiest first.
pub const TOP_PORTS: usize = 8;

#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    marks: Mutex<Vec<(Milestone, Duration)>>,
    exits: [AtomicU64; 5],
    /// Port I/O exits by port number, one counter for each of the 65536 ports.
    ports: Box<[AtomicU64]>,
}

impl Timeline {
    pub fn new(start: Instant) -> Timeline {
        Timeline { start, marks: Mutex::new(Vec::new()), exits: Default::default(), ports: zeroed_counters(1 << 16) }
    }

    /// Records `milestone` the first time it is reached; later calls are ignored.
    pub fn mark(&self, milestone: Milestone) {
        let elapsed = self.start.elapsed();
        let mut marks = lock(&self.marks);
        if !marks.iter().any(|(m, _)| *m == milestone) {
            marks.push((milestone, elapsed));
        }
    }

    pub fn count_exit(&self, kind: ExitKind) {
        self.exits[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a port I/O exit, in or out, at `port`.
    pub fn count_port(&self, port: u16) {
        self.ports[usize::from(port)].fetch_add(1, Ordering::Relaxed);
    }

    /// The ports with the most exits, busiest first (the lower port first among equals).
    pub fn busiest_ports(&self, count: usize) -> Vec<(u16, u64)> {
        let mut used: Vec<(u16, u64)> = (0..=u16::MAX)
            .map(|port| (port, self.ports[usize::from(port)].load(Ordering::Relaxed)))
            .filter(|&(_, exits)| exits > 0)
            .collect();
        used.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        used.truncate(count);
        used
    }

    /// When `milestone` was reached, if it was.
    pub fn at(&self, milestone: Milestone) -> Option<Duration> {
        lock(&self.marks).iter().find(|(m, _)| *m == milestone).map(|(_, at)| *at)
    }
}

impl Timeline {
    /// The timeline in the Chrome trace event format (a JSON object with `traceEvents`): a span
    /// from process start to the first milestone and from each milestone to the next, an instant
    /// event at each, and the exit counts (by kind, and the busiest ports) as counters at the
    /// last one. Times are in microseconds, as the format wants.
    pub fn chrome_trace(&self) -> serde_json::Value {
        use serde_json::json;
        let micros = |at: Duration| at.as_secs_f64() * 1e6;
        let marks = lock(&self.marks).clone();
        let mut events = vec![json!({"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "lguest"}})];
        let mut since = ("process start", Duration::ZERO);
        for (milestone, at) in &marks {
            events.push(json!({"name": format!("{} → {}", since.0, milestone.short()), "cat": "boot", "ph": "X",
                               "ts": micros(since.1), "dur": micros(at.saturating_sub(since.1)), "pid": 1, "tid": 1}));
            events.push(json!({"name": milestone.to_string(), "cat": "milestone", "ph": "i", "s": "p",
                               "ts": micros(*at), "pid": 1, "tid": 1}));
            since = (milestone.short(), *at);
        }
        let kinds: serde_json::Map<String, serde_json::Value> = EXIT_KINDS
            .iter()
            .map(|(kind, name)| (name.to_string(), self.exits[*kind as usize].load(Ordering::Relaxed).into()))
            .collect();
        let ports: serde_json::Map<String, serde_json::Value> =
            self.busiest_ports(TOP_PORTS).iter().map(|(port, exits)| (format!("{port:#x}"), (*exits).into())).collect();
        for (name, counts) in [("exits to lguest", kinds), ("port exits, busiest", ports)] {
            events.push(json!({"name": name, "ph": "C", "ts": micros(since.1), "pid": 1, "args": counts}));
        }
        json!({"traceEvents": events, "displayTimeUnit": "ms"})
    }

    /// Writes [`Timeline::chrome_trace`] to `file`.
    pub fn write_chrome_trace(&self, mut file: impl Write) -> std::io::Result<()> {
        serde_json::to_writer_pretty(&mut file, &self.chrome_trace())?;
        file.write_all(b"\n")?;
        file.flush()
    }
}

impl fmt::Display for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "boot timeline (ms since process start):")?;
        for (milestone, at) in lock(&self.marks).iter() {
            writeln!(f, "  {:>10.3}  {milestone}", at.as_secs_f64() * 1000.0)?;
        }
        let counts: Vec<String> = EXIT_KINDS
            .iter()
            .map(|(kind, name)| format!("{name} {}", self.exits[*kind as usize].load(Ordering::Relaxed)))
            .collect();
        write!(f, "  exits to lguest: {}", counts.join(", "))?;
        let ports: Vec<String> =
            self.busiest_ports(TOP_PORTS).iter().map(|(port, exits)| format!("{port:#x} {exits}")).collect();
        if !ports.is_empty() {
            write!(f, "\n  port exits, busiest {TOP_PORTS}: {}", ports.join(", "))?;
        }
        Ok(())
    }
}

/// `len` counters at zero, without touching their memory: a zeroed allocation this large comes
/// from a fresh anonymous mapping, so the 512 KiB for all ports cost only the pages that the
/// ports a guest uses fall in.
fn zeroed_counters(len: usize) -> Box<[AtomicU64]> {
    let zeros: Box<[u64]> = vec![0u64; len].into_boxed_slice();
    // SAFETY: AtomicU64 has the same size, alignment and bit validity as u64, so a slice of
    // zero u64s is a slice of AtomicU64s at zero; the pointer keeps its length and allocation.
    unsafe { Box::from_raw(Box::into_raw(zeros) as *mut [AtomicU64]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milestones_are_kept_once_in_order() {
        let timeline = Timeline::new(Instant::now());
        timeline.mark(Milestone::VmBuilt);
        timeline.mark(Milestone::FirstKvmRun);
        let first = timeline.at(Milestone::FirstKvmRun);
        timeline.mark(Milestone::FirstKvmRun);
        assert_eq!(timeline.at(Milestone::FirstKvmRun), first);
        assert!(timeline.at(Milestone::VmBuilt) <= first);
        assert_eq!(timeline.at(Milestone::GuestSignal), None);
    }

    #[test]
    fn report_lists_milestones_and_exit_counts() {
        let timeline = Timeline::new(Instant::now());
        timeline.mark(Milestone::GuestSignal);
        timeline.count_exit(ExitKind::PortOut);
        timeline.count_exit(ExitKind::PortOut);
        let report = timeline.to_string();
        assert!(report.contains("guest signalled the boot timer"), "{report}");
        assert!(report.contains("port out 2, mmio read 0"), "{report}");
        assert!(!report.contains("port exits"), "no port taken, no list: {report}");
    }

    #[test]
    fn chrome_trace_has_a_span_per_stretch_between_milestones_and_the_exit_counters() {
        let timeline = Timeline::new(Instant::now());
        timeline.mark(Milestone::VmBuilt);
        timeline.mark(Milestone::FirstKvmRun);
        timeline.mark(Milestone::Stopped);
        timeline.count_exit(ExitKind::PortIn);
        timeline.count_port(0x3f8);
        let mut written = Vec::new();
        timeline.write_chrome_trace(&mut written).expect("write to a Vec");
        let trace: serde_json::Value = serde_json::from_slice(&written).expect("valid JSON");
        let events = trace["traceEvents"].as_array().expect("traceEvents");
        let spans: Vec<&str> = events.iter().filter(|e| e["ph"] == "X").filter_map(|e| e["name"].as_str()).collect();
        assert_eq!(spans, ["process start → VM built", "VM built → first KVM_RUN", "first KVM_RUN → VM stopped"]);
        let ends: Vec<f64> = events
            .iter()
            .filter(|e| e["ph"] == "X")
            .map(|e| e["ts"].as_f64().unwrap_or(-1.0) + e["dur"].as_f64().unwrap_or(-1.0))
            .collect();
        assert!(ends.windows(2).all(|pair| pair[0] <= pair[1]), "spans follow each other: {ends:?}");
        let counter = |name: &str| events.iter().find(|e| e["ph"] == "C" && e["name"] == name).map(|e| e["args"].clone());
        assert_eq!(counter("exits to lguest").map(|a| a["port in"].clone()), Some(1.into()));
        assert_eq!(counter("port exits, busiest").map(|a| a["0x3f8"].clone()), Some(1.into()));
    }

    #[test]
    fn ports_are_listed_busiest_first() {
        let timeline = Timeline::new(Instant::now());
        for (port, times) in [(0x3f8u16, 5), (0x64, 2), (0x60, 2), (0xffff, 1)] {
            (0..times).for_each(|_| timeline.count_port(port));
        }
        assert_eq!(timeline.busiest_ports(3), vec![(0x3f8, 5), (0x60, 2), (0x64, 2)]);
        let report = timeline.to_string();
        assert!(report.contains("port exits, busiest 8: 0x3f8 5, 0x60 2, 0x64 2, 0xffff 1"), "{report}");
    }
}
