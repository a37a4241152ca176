//! When the disk's worker interrupts the guest: one interrupt for a burst of requests instead of
//! one per request.
//!
//! A guest doing I/O with many requests in flight (fio at iodepth 16, a file system's
//! writeback) submits them one after the other, each as soon as an earlier one completes. Served
//! and signalled one by one, every request costs the guest a kick and an interrupt (and its
//! EOI): exits that, on a busy vCPU, cost more than the I/O. So the worker completes requests as
//! soon as it has them (their used entries are published at once) but holds the interrupt while
//! the guest keeps submitting, polling the available ring with the guest's kicks still off. The
//! held interrupt goes out as soon as one of these is true:
//!
//! - as many requests are held as the guest had in flight the last time it went quiet (it has
//!   submitted everything it will before it hears back: waiting longer only idles it);
//! - the guest has submitted nothing for a while ([`Coalescer::quiet`], a few times the gap
//!   between its submissions in a burst): it is waiting for us, and we learn its depth;
//! - the oldest held completion has waited [`MAX_HOLD`].
//!
//! A guest that keeps one request in flight (a lone `dd`, a sync write) is learned to have a
//! depth of one after its first quiet wait, and is then signalled at once. The depth is learned
//! again every [`RELEARN_EVERY`] interrupts, so that a guest that deepens its queue is noticed.
//!
//! It trusts nothing but the clock: times come in as arguments, which is also how the tests
//! drive it.

use std::time::{Duration, Instant};

/// The longest a completion waits for its interrupt.
pub const MAX_HOLD: Duration = Duration::from_millis(4);
/// Bounds of the quiet wait: short enough not to idle a guest for long, long enough to span
/// a guest's gap between two submissions on a slow (nested, emulated) vCPU. (Measured in the
/// lab with these values; 2 ms and 10 ms are the next thing to try there, where a guest's
/// submissions can come ~500 µs apart.)
const MIN_QUIET: Duration = Duration::from_micros(20);
const MAX_QUIET: Duration = Duration::from_micros(500);
/// The quiet wait is this many times the usual gap between two submissions in a burst.
const QUIET_GAPS: u32 = 4;
/// Interrupts after which the guest's depth is learned anew (the relearning burst waits for
/// the guest to go quiet).
const RELEARN_EVERY: u32 = 64;
/// The depth before anything is learned: as deep as the queue, so that the first burst ends
/// only when the guest goes quiet.
const UNKNOWN_DEPTH: usize = usize::MAX;

/// The state of the held interrupt.
pub struct Coalescer {
    /// Requests the guest had in flight when it last went quiet.
    depth: usize,
    /// Requests completed since the last interrupt.
    held: usize,
    /// When the oldest of them was completed.
    first_held: Option<Instant>,
    /// When the guest's last request was completed (it made it available just before).
    last_arrival: Option<Instant>,
    /// The usual gap between two submissions in a burst (a moving average).
    gap: Duration,
    /// Interrupts since the depth was last learned.
    since_learned: u32,
}

impl Default for Coalescer {
    fn default() -> Coalescer {
        Coalescer {
            depth: UNKNOWN_DEPTH,
            held: 0,
            first_held: None,
            last_arrival: None,
            gap: MAX_QUIET / QUIET_GAPS,
            since_learned: 0,
        }
    }
}

impl Coalescer {
    /// `count` requests were completed at `now`, their interrupt not yet sent.
    pub fn completed(&mut self, count: usize, now: Instant) {
        if count == 0 {
            return;
        }
        if let Some(last) = self.last_arrival.filter(|_| self.held > 0) {
            // A moving average over ~8 gaps: one slow submission doesn't stretch the wait.
            self.gap = (self.gap * 7 + now.saturating_duration_since(last)) / 8;
        }
        self.held += count;
        self.first_held.get_or_insert(now);
        self.last_arrival = Some(now);
    }

    /// How long the guest may submit nothing before we decide it is waiting for us.
    pub fn quiet(&self) -> Duration {
        (self.gap * QUIET_GAPS).clamp(MIN_QUIET, MAX_QUIET)
    }

    /// Whether the held interrupt should go out now.
    pub fn due(&self, now: Instant) -> bool {
        let (Some(first), Some(last)) = (self.first_held, self.last_arrival) else { return false };
        self.held >= self.depth
            || now.saturating_duration_since(first) >= MAX_HOLD
            || now.saturating_duration_since(last) >= self.quiet()
    }

    /// The held interrupt went out at `now` (or nothing wanted one): start holding anew. A
    /// burst that ended because the guest went quiet tells its depth.
    pub fn signalled(&mut self, now: Instant) {
        let went_quiet = self.last_arrival.is_some_and(|last| now.saturating_duration_since(last) >= self.quiet());
        if self.held > 0 && went_quiet {
            self.depth = self.held;
            self.since_learned = 0;
        } else {
            self.since_learned += 1;
            if self.since_learned >= RELEARN_EVERY {
                self.depth = UNKNOWN_DEPTH;
            }
        }
        self.held = 0;
        self.first_held = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(micros: u64) -> Duration {
        Duration::from_micros(micros)
    }

    /// A guest keeping 4 requests in flight, submitting one every 50 µs: its first burst ends
    /// when it goes quiet, which teaches its depth; from then on each burst is signalled as soon
    /// as its 4th request is done, without waiting.
    #[test]
    fn the_guests_depth_is_learned_from_its_first_quiet_wait() {
        let start = Instant::now();
        let mut coalescer = Coalescer::default();
        for i in 0..4 {
            coalescer.completed(1, start + us(50 * i));
            assert!(!coalescer.due(start + us(50 * i)), "request {i}: the guest is still submitting");
        }
        let quiet_at = start + us(150) + coalescer.quiet();
        assert!(!coalescer.due(quiet_at - us(1)));
        assert!(coalescer.due(quiet_at), "the guest went quiet");
        coalescer.signalled(quiet_at);

        let burst = quiet_at + us(300);
        for i in 0..3 {
            coalescer.completed(1, burst + us(50 * i));
            assert!(!coalescer.due(burst + us(50 * i)));
        }
        coalescer.completed(1, burst + us(150));
        assert!(coalescer.due(burst + us(150)), "the 4th of 4 goes out at once");
    }

    /// One request at a time (a lone synchronous writer) is signalled at once once learned.
    #[test]
    fn a_guest_with_one_request_in_flight_waits_once() {
        let start = Instant::now();
        let mut coalescer = Coalescer::default();
        coalescer.completed(1, start);
        assert!(!coalescer.due(start));
        let quiet = start + coalescer.quiet();
        coalescer.signalled(quiet);
        coalescer.completed(1, quiet + us(10));
        assert!(coalescer.due(quiet + us(10)));
    }

    /// A guest that never stops submitting still gets its interrupt within MAX_HOLD.
    #[test]
    fn a_guest_that_never_goes_quiet_is_interrupted_within_max_hold() {
        let start = Instant::now();
        let mut coalescer = Coalescer::default();
        let mut now = start;
        while now < start + MAX_HOLD {
            coalescer.completed(1, now);
            assert!(!coalescer.due(now), "at {:?}", now - start);
            now += us(10);
        }
        coalescer.completed(1, now);
        assert!(coalescer.due(now));
    }

    /// The quiet wait follows the guest's pace, within its bounds: a gap of 10 µs waits 40 µs,
    /// and one slow submission doesn't stretch it to the maximum.
    #[test]
    fn the_quiet_wait_follows_the_gap_between_submissions() {
        let start = Instant::now();
        let mut coalescer = Coalescer::default();
        for i in 0..64 {
            coalescer.completed(1, start + us(10 * i));
        }
        assert!(coalescer.quiet() < us(50), "{:?}", coalescer.quiet());
        coalescer.completed(1, start + us(640 + 200));
        assert!(coalescer.quiet() < MAX_QUIET, "{:?}", coalescer.quiet());
        assert!(coalescer.quiet() >= MIN_QUIET);
    }

    /// Nothing held, nothing due; and after RELEARN_EVERY interrupts the depth is forgotten, so
    /// a guest that now keeps more in flight is held until it goes quiet again.
    #[test]
    fn nothing_held_is_never_due_and_the_depth_is_relearned() {
        let start = Instant::now();
        let mut coalescer = Coalescer::default();
        assert!(!coalescer.due(start + MAX_HOLD * 10));
        coalescer.completed(1, start);
        let mut now = start + MAX_QUIET;
        coalescer.signalled(now);
        for _ in 0..RELEARN_EVERY {
            now += us(100);
            coalescer.completed(1, now);
            assert!(coalescer.due(now), "depth 1, learned");
            coalescer.signalled(now);
        }
        coalescer.completed(1, now + us(100));
        assert!(!coalescer.due(now + us(100)), "the depth is being learned again");
        assert_eq!(coalescer.held, 1);
    }
}
