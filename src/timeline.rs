//! When things happened: `--boot-timeline` prints, after the run, the milliseconds from
//! process start to each milestone of the guest's life, and how many exits of each kind the
//! vCPUs took. Boot speed is a feature; this is how we see where it goes.
//!
//! "Process start" is the first instruction of `main`: the dynamic loader's work before it is
//! not counted (about a millisecond).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::bus::lock;

/// The milestones, in the order a guest normally reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Milestone {
    /// The VM, its memory, kernel, devices and vCPUs are all set up.
    VmBuilt,
    /// The boot vCPU is about to run its first guest instruction.
    FirstKvmRun,
    /// The guest wrote the boot timer's magic value (see [`crate::devices::boot_timer`]).
    GuestSignal,
    /// The VM stopped.
    Stopped,
}

impl fmt::Display for Milestone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Milestone::VmBuilt => "VM built (KVM ready, kernel loaded)",
            Milestone::FirstKvmRun => "first KVM_RUN",
            Milestone::GuestSignal => "guest signalled the boot timer",
            Milestone::Stopped => "VM stopped",
        })
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

#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    marks: Mutex<Vec<(Milestone, Duration)>>,
    exits: [AtomicU64; 5],
}

impl Timeline {
    pub fn new(start: Instant) -> Timeline {
        Timeline { start, marks: Mutex::new(Vec::new()), exits: Default::default() }
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

    /// When `milestone` was reached, if it was.
    pub fn at(&self, milestone: Milestone) -> Option<Duration> {
        lock(&self.marks).iter().find(|(m, _)| *m == milestone).map(|(_, at)| *at)
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
        write!(f, "  exits to lguest: {}", counts.join(", "))
    }
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
    }
}
