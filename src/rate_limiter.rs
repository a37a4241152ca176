//! Rate limiters: how fast a device may move the guest's bytes and requests, as Firecracker's
//! API defines them (`rate_limiter` on drives, network cards and the entropy device).
//!
//! A limiter has up to two token buckets, one counted in bytes (`bandwidth`) and one in
//! operations (`ops`). A bucket holds at most `size` tokens and refills completely in
//! `refill_time`, continuously; a `one_time_burst` is extra credit at the start that never
//! refills. A request a bucket can't pay for waits: the device stops serving that queue and
//! arms the limiter's timer ([`RateLimiter::timer`], a timerfd in the worker's epoll set) for
//! when the tokens will be there. A request larger than the whole bucket is not refused
//! forever: it may go once the bucket is full, and the debt it leaves is paid from the refill
//! before anything else goes (Firecracker does the same), so the average rate still holds.
//! A request whose size is only known once it is done (a received frame) is
//! [`RateLimiter::charge`]d after, into debt if need be, and the queue asks
//! [`RateLimiter::ready`] before the next one.
//!
//! A device's limiter is shared ([`SharedLimiter`]) by the device, its worker thread and the
//! API, whose `PATCH` replaces buckets while the guest runs ([`RateLimiter::update`]).
//!
//! The numbers come from the user (or an API client) and are checked once, in
//! [`BucketConfig::new`]; nothing here trusts the guest, which only asks for amounts.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use crate::bus::lock;

/// The longest refill time we accept: a day, far beyond any useful limit, and small enough
/// that the arithmetic below cannot overflow.
pub const MAX_REFILL_TIME: Duration = Duration::from_secs(24 * 60 * 60);

/// A bucket's settings, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BucketConfig {
    size: u64,
    one_time_burst: u64,
    refill_time: Duration,
}

/// Why a bucket's settings can't be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BucketConfigError {
    #[error("a token bucket's size must be more than 0 (leave the bucket out for no limit)")]
    ZeroSize,
    #[error("a token bucket's refill_time must be 1 ms to 1 day, not {0} ms")]
    RefillTime(u64),
}

impl BucketConfig {
    /// `size` tokens, refilled completely every `refill_time_ms`, plus `one_time_burst` once.
    pub fn new(size: u64, one_time_burst: u64, refill_time_ms: u64) -> Result<BucketConfig, BucketConfigError> {
        if size == 0 {
            return Err(BucketConfigError::ZeroSize);
        }
        let refill_time = Duration::from_millis(refill_time_ms);
        if refill_time.is_zero() || refill_time > MAX_REFILL_TIME {
            return Err(BucketConfigError::RefillTime(refill_time_ms));
        }
        Ok(BucketConfig { size, one_time_burst, refill_time })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    pub fn refill_time_ms(&self) -> u64 {
        // At most a day of milliseconds: fits.
        u64::try_from(self.refill_time.as_millis()).unwrap_or(u64::MAX)
    }
}

/// A device's limits: either bucket may be absent (no limit of that kind).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimit {
    pub bandwidth: Option<BucketConfig>,
    pub ops: Option<BucketConfig>,
}

impl RateLimit {
    pub fn limits_anything(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }
}

/// What a change to a running limiter does to one of its buckets (Firecracker's PATCH: a
/// bucket left out stays as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketUpdate {
    Keep,
    Remove,
    Set(BucketConfig),
}

impl BucketUpdate {
    fn apply(self, bucket: &mut Option<TokenBucket>, now: Instant) {
        match self {
            BucketUpdate::Keep => {}
            BucketUpdate::Remove => *bucket = None,
            BucketUpdate::Set(config) => *bucket = Some(TokenBucket::new(config, now)),
        }
    }
}

/// What a `--disk`/`--net` option such as `bw_size=10485760` sets: the names are Cloud
/// Hypervisor's (`bw_*` in bytes, `ops_*` in operations, `*_refill_time` in ms). Returns
/// `Ok(false)` for a key that is not a rate-limit option.
pub fn set_option(limit: &mut RateLimitBuilder, key: &str, value: &str) -> Result<bool, RateOptionError> {
    let (bucket, field) = match key.split_once('_') {
        Some(("bw", field)) => (&mut limit.bandwidth, field),
        Some(("ops", field)) => (&mut limit.ops, field),
        _ => return Ok(false),
    };
    let number = || value.parse::<u64>().map_err(|_| RateOptionError::NotANumber(key.to_string(), value.to_string()));
    match field {
        "size" => bucket.size = Some(number()?),
        "one_time_burst" => bucket.one_time_burst = Some(number()?),
        "refill_time" => bucket.refill_time_ms = Some(number()?),
        _ => return Ok(false),
    }
    Ok(true)
}

/// The rate-limit options of one flag, gathered before they are checked together.
#[derive(Debug, Default)]
pub struct RateLimitBuilder {
    bandwidth: BucketOptions,
    ops: BucketOptions,
}

#[derive(Debug, Default)]
struct BucketOptions {
    size: Option<u64>,
    one_time_burst: Option<u64>,
    refill_time_ms: Option<u64>,
}

/// Why a flag's rate-limit options can't be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateOptionError {
    #[error("{0}={1} is not a whole number")]
    NotANumber(String, String),
    #[error("{0}_size and {0}_refill_time go together")]
    Incomplete(&'static str),
    #[error("{0}: {1}")]
    Bucket(&'static str, BucketConfigError),
}

impl RateLimitBuilder {
    pub fn build(self) -> Result<RateLimit, RateOptionError> {
        Ok(RateLimit { bandwidth: self.bandwidth.build("bw")?, ops: self.ops.build("ops")? })
    }
}

impl BucketOptions {
    fn build(self, prefix: &'static str) -> Result<Option<BucketConfig>, RateOptionError> {
        match (self.size, self.refill_time_ms) {
            (None, None) if self.one_time_burst.is_none() => Ok(None),
            (Some(size), Some(refill)) => BucketConfig::new(size, self.one_time_burst.unwrap_or(0), refill)
                .map(Some)
                .map_err(|e| RateOptionError::Bucket(prefix, e)),
            _ => Err(RateOptionError::Incomplete(prefix)),
        }
    }
}

/// One token bucket at work.
#[derive(Debug)]
struct TokenBucket {
    config: BucketConfig,
    /// Tokens in the bucket now (at most `config.size`).
    budget: u64,
    /// What is left of the one-time burst.
    burst: u64,
    /// Tokens owed by a request larger than the bucket: paid from the refill before the
    /// budget grows again.
    debt: u64,
    /// The refill is counted from here (the last time the bucket was full): the tokens due
    /// are those the whole time since has earned, so no fraction of a token is lost or gained
    /// however often the bucket is refilled.
    refilled_at: Instant,
    /// Tokens already credited for the time since `refilled_at`.
    credited: u128,
}

impl TokenBucket {
    fn new(config: BucketConfig, now: Instant) -> TokenBucket {
        TokenBucket { config, budget: config.size, burst: config.one_time_burst, debt: 0, refilled_at: now, credited: 0 }
    }

    fn nanos_per_size(&self) -> u128 {
        self.config.refill_time.as_nanos()
    }

    /// Adds the tokens the time since the last refill has earned.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled_at).as_nanos();
        // elapsed < 2^64 ns in practice and size < 2^64: the product fits in u128.
        let due = elapsed * u128::from(self.config.size) / self.nanos_per_size();
        let earned = due.saturating_sub(self.credited);
        if earned == 0 {
            return;
        }
        self.credited = due;
        let mut earned = u64::try_from(earned).unwrap_or(u64::MAX);
        let paid = earned.min(self.debt);
        self.debt -= paid;
        earned -= paid;
        self.budget = self.budget.saturating_add(earned).min(self.config.size);
        if self.budget == self.config.size {
            // A full bucket earns nothing more: count from now, not from when it filled.
            (self.refilled_at, self.credited) = (now, 0);
        }
    }

    /// Takes `tokens` if the bucket can pay now; a request larger than the bucket goes when
    /// the bucket is full, leaving the rest as debt.
    fn take(&mut self, tokens: u64, now: Instant) -> bool {
        self.refill(now);
        let from_burst = tokens.min(self.burst);
        let rest = tokens - from_burst;
        if self.debt > 0 {
            return false;
        }
        if rest <= self.budget {
            self.burst -= from_burst;
            self.budget -= rest;
            return true;
        }
        if rest > self.config.size && self.budget == self.config.size {
            self.burst -= from_burst;
            self.debt = rest - self.budget;
            self.budget = 0;
            return true;
        }
        false
    }

    /// Takes `tokens` for something already done (a received frame, whose size was unknown
    /// before it was read): what the bucket can't pay becomes debt.
    fn charge(&mut self, tokens: u64, now: Instant) {
        self.refill(now);
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        let rest = tokens - from_burst;
        let paid = rest.min(self.budget);
        self.budget -= paid;
        self.debt = self.debt.saturating_add(rest - paid);
    }

    /// Gives back tokens a request took but could not use (the other bucket refused it).
    fn give_back(&mut self, tokens: u64) {
        let repaid = tokens.min(self.debt);
        self.debt -= repaid;
        self.budget = self.budget.saturating_add(tokens - repaid).min(self.config.size);
    }

    /// How long until `tokens` could be taken (zero if now).
    fn wait_for(&self, tokens: u64) -> Duration {
        let usable = tokens.saturating_sub(self.burst).min(self.config.size);
        let missing = u128::from(self.debt) + u128::from(usable.saturating_sub(self.budget));
        if missing == 0 {
            return Duration::ZERO;
        }
        let nanos = missing * self.nanos_per_size() / u128::from(self.config.size) + 1;
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// Both buckets of a device queue and the timer that wakes its worker when they refill.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    /// The timer is armed: the queue waits for it.
    blocked: bool,
}

/// A timerfd whose read never blocks. Every worker of a multi-queue device may watch the one
/// timer of the device's shared limiter: when it fires, each is woken, the first reads the
/// expiry, and the others find nothing to read (EAGAIN) instead of waiting, with the limiter's
/// lock held, for an expiry that may never come.
fn nonblocking_timer() -> io::Result<TimerFd> {
    let timer = TimerFd::new()?;
    let fd = timer.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, changing only its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(timer)
}

impl RateLimiter {
    /// A limiter with `limit`'s buckets, full. Fails only if the host gives us no timerfd.
    pub fn new(limit: RateLimit) -> io::Result<RateLimiter> {
        let now = Instant::now();
        Ok(RateLimiter {
            bandwidth: limit.bandwidth.map(|config| TokenBucket::new(config, now)),
            ops: limit.ops.map(|config| TokenBucket::new(config, now)),
            timer: nonblocking_timer()?,
            blocked: false,
        })
    }

    /// Takes one operation of `bytes` bytes if both buckets can pay for it. If not, nothing
    /// is taken and the timer is armed for when they could: the caller stops serving the
    /// queue until [`RateLimiter::timer_fired`].
    pub fn consume(&mut self, bytes: u64) -> io::Result<bool> {
        if self.blocked {
            return Ok(false);
        }
        if self.take(bytes, Instant::now()) {
            return Ok(true);
        }
        self.block_for(self.wait_for(bytes))?;
        Ok(false)
    }

    fn take(&mut self, bytes: u64, now: Instant) -> bool {
        if let Some(ops) = &mut self.ops {
            if !ops.take(1, now) {
                return false;
            }
        }
        if let Some(bandwidth) = &mut self.bandwidth {
            if !bandwidth.take(bytes, now) {
                if let Some(ops) = &mut self.ops {
                    ops.give_back(1);
                }
                return false;
            }
        }
        true
    }

    fn wait_for(&self, bytes: u64) -> Duration {
        let ops = self.ops.as_ref().map_or(Duration::ZERO, |bucket| bucket.wait_for(1));
        let bandwidth = self.bandwidth.as_ref().map_or(Duration::ZERO, |bucket| bucket.wait_for(bytes));
        ops.max(bandwidth)
    }

    /// Charges one operation of `bytes` already done: what the buckets can't pay is owed, and
    /// [`RateLimiter::ready`] says no until it is paid.
    pub fn charge(&mut self, bytes: u64) {
        let now = Instant::now();
        if let Some(ops) = &mut self.ops {
            ops.charge(1, now);
        }
        if let Some(bandwidth) = &mut self.bandwidth {
            bandwidth.charge(bytes, now);
        }
    }

    /// Whether the queue may go on (nothing owed). If not, the timer is armed for when the
    /// debt is paid, and the caller stops until [`RateLimiter::timer_fired`].
    pub fn ready(&mut self) -> io::Result<bool> {
        if self.blocked {
            return Ok(false);
        }
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        for bucket in [&mut self.bandwidth, &mut self.ops].into_iter().flatten() {
            bucket.refill(now);
            wait = wait.max(bucket.wait_for(0));
        }
        if wait.is_zero() {
            return Ok(true);
        }
        self.block_for(wait)?;
        Ok(false)
    }

    fn block_for(&mut self, wait: Duration) -> io::Result<()> {
        self.timer.reset(wait.max(Duration::from_micros(100)), None)?;
        self.blocked = true;
        Ok(())
    }

    /// Changes the buckets of a limiter at work (the API's PATCH): a bucket that is set starts
    /// afresh, full, as Firecracker's do. A queue waiting for the old buckets is woken at once
    /// to ask the new ones.
    pub fn update(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) -> io::Result<()> {
        let now = Instant::now();
        bandwidth.apply(&mut self.bandwidth, now);
        ops.apply(&mut self.ops, now);
        if self.blocked {
            self.timer.reset(Duration::from_micros(1), None)?;
        }
        Ok(())
    }

    /// The buckets' settings now.
    pub fn limit(&self) -> RateLimit {
        RateLimit { bandwidth: self.bandwidth.as_ref().map(|b| b.config), ops: self.ops.as_ref().map(|b| b.config) }
    }

    /// The worker saw the timer fire: the queue may be served again.
    pub fn timer_fired(&mut self) {
        // Reading clears the expiry count so the level-triggered epoll stops reporting it
        // (nothing to read: another worker of the device read it first).
        let _ = self.timer.wait();
        self.blocked = false;
    }

    /// The queue waits for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }
}

/// A device's limiter as the device, its worker and the API share it: the budget outlives a
/// driver reset, the timer sits in the worker's epoll set, and the API can change the buckets
/// while the guest runs. The default is no limiter at all, which nothing can change.
#[derive(Clone, Default)]
pub struct SharedLimiter(Option<Arc<Mutex<RateLimiter>>>);

impl SharedLimiter {
    /// A limiter with `limit`'s buckets (perhaps none yet: the API may add them later). Fails
    /// only when the host gives us no timerfd.
    pub fn new(limit: RateLimit) -> io::Result<SharedLimiter> {
        Ok(SharedLimiter(Some(Arc::new(Mutex::new(RateLimiter::new(limit)?)))))
    }

    /// Watches the timer under `token` in a worker's epoll set.
    pub fn watch(&self, epoll: &Epoll, token: u64) -> io::Result<()> {
        match &self.0 {
            Some(limiter) => epoll.ctl(ControlOperation::Add, lock(limiter).as_raw_fd(), EpollEvent::new(EventSet::IN, token)),
            None => Ok(()),
        }
    }

    /// Whether the event a worker got under `token` is the timer's (watched as `timer`): the
    /// queue may then be served again.
    pub fn timer_event(&self, token: u64, timer: u64) -> bool {
        match &self.0 {
            Some(limiter) if token == timer => {
                lock(limiter).timer_fired();
                true
            }
            _ => false,
        }
    }

    /// The limiter for one pass over the queue (`None`: no limit).
    pub fn lock(&self) -> Option<MutexGuard<'_, RateLimiter>> {
        self.0.as_deref().map(lock)
    }

    /// Changes the buckets while the device runs; false for a device made without a limiter.
    pub fn update(&self, bandwidth: BucketUpdate, ops: BucketUpdate) -> io::Result<bool> {
        match self.lock() {
            Some(mut limiter) => limiter.update(bandwidth, ops).map(|()| true),
            None => Ok(false),
        }
    }

    /// The buckets' settings now.
    pub fn limit(&self) -> RateLimit {
        self.lock().map(|limiter| limiter.limit()).unwrap_or_default()
    }
}

/// A device queue's question before serving one request of `bytes`: may it go now? Always
/// yes without a limiter; no when the limiter is over its budget (its timer then brings the
/// worker back).
pub fn admit(limiter: Option<&mut RateLimiter>, bytes: u64, device: &str) -> bool {
    let Some(limiter) = limiter else { return true };
    unlimited_if_broken(limiter.consume(bytes), device)
}

/// A receive queue's question before reading the next frame, whose size it can't know: is
/// nothing owed for the frames already read ([`RateLimiter::charge`])? No limiter: yes.
pub fn paid_up(limiter: Option<&mut RateLimiter>, device: &str) -> bool {
    let Some(limiter) = limiter else { return true };
    unlimited_if_broken(limiter.ready(), device)
}

/// A timer that can't be armed lets everything through: better unlimited than a queue stuck
/// forever.
fn unlimited_if_broken(answer: io::Result<bool>, device: &str) -> bool {
    answer.unwrap_or_else(|e| {
        tracing::warn!(device, "the rate limiter's timer failed ({e}); not limiting");
        true
    })
}

impl AsRawFd for RateLimiter {
    /// The timerfd to watch: readable when a blocked queue may be served again.
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, refill_ms: u64) -> TokenBucket {
        TokenBucket::new(BucketConfig::new(size, burst, refill_ms).expect("valid"), Instant::now())
    }

    #[test]
    fn settings_that_mean_nothing_are_refused() {
        assert_eq!(BucketConfig::new(0, 0, 100), Err(BucketConfigError::ZeroSize));
        assert_eq!(BucketConfig::new(1, 0, 0), Err(BucketConfigError::RefillTime(0)));
        assert!(BucketConfig::new(1, 0, 86_400_001).is_err());
        assert!(BucketConfig::new(u64::MAX, u64::MAX, 86_400_000).is_ok());
    }

    #[test]
    fn a_full_bucket_pays_up_to_its_size_then_refuses() {
        let mut b = bucket(1000, 0, 1000);
        let now = b.refilled_at;
        assert!(b.take(600, now));
        assert!(b.take(400, now));
        assert!(!b.take(1, now));
        assert_eq!(b.budget, 0);
    }

    #[test]
    fn the_bucket_refills_in_proportion_to_time_and_no_further() {
        let mut b = bucket(1000, 0, 1000);
        let start = b.refilled_at;
        assert!(b.take(1000, start));
        assert!(!b.take(101, start + Duration::from_millis(100)));
        assert!(b.take(100, start + Duration::from_millis(100)));
        assert!(b.take(1000, start + Duration::from_secs(10)), "full again after long enough");
        assert!(!b.take(1, start + Duration::from_secs(10)), "but never more than its size");
    }

    #[test]
    fn no_fraction_of_a_token_is_lost_to_rounding() {
        // 3 tokens a second: a third of a second each; asking every 0.1 s must still add up.
        let mut b = bucket(3, 0, 1000);
        let start = b.refilled_at;
        assert!(b.take(3, start));
        let mut taken = 0;
        for tenth in 1..=100u64 {
            if b.take(1, start + Duration::from_millis(100 * tenth)) {
                taken += 1;
            }
        }
        assert_eq!(taken, 30, "10 s at 3 per second");
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_never_refills() {
        let mut b = bucket(100, 500, 1000);
        let start = b.refilled_at;
        assert!(b.take(550, start), "burst 500 + 50 of the budget");
        assert_eq!((b.burst, b.budget), (0, 50));
        assert!(b.take(100, start + Duration::from_secs(5)));
        assert!(!b.take(1, start + Duration::from_secs(5)));
        assert_eq!(b.burst, 0);
    }

    #[test]
    fn a_request_larger_than_the_bucket_goes_once_full_and_its_debt_is_paid_first() {
        let mut b = bucket(100, 0, 1000);
        let start = b.refilled_at;
        assert!(b.take(250, start), "larger than the bucket, but the bucket is full");
        assert_eq!(b.debt, 150);
        assert!(!b.take(1, start + Duration::from_millis(1000)), "1 s pays only 100 of the debt");
        assert!(!b.take(1, start + Duration::from_millis(1500)), "debt paid, budget empty");
        assert!(b.take(1, start + Duration::from_millis(1520)));
        let mut empty = bucket(100, 0, 1000);
        assert!(empty.take(1, start));
        assert!(!empty.take(250, start), "a large request waits for a full bucket");
    }

    #[test]
    fn the_wait_is_the_time_the_missing_tokens_take() {
        let mut b = bucket(1000, 0, 1000);
        let start = b.refilled_at;
        assert!(b.take(1000, start));
        let wait = b.wait_for(250);
        assert!(wait >= Duration::from_millis(250) && wait < Duration::from_millis(251), "{wait:?}");
        assert!(b.take(250, start + wait));
        assert_eq!(b.wait_for(0), Duration::ZERO);
    }

    #[test]
    fn both_buckets_must_pay_and_a_refusal_takes_nothing() {
        let limit = RateLimit {
            bandwidth: Some(BucketConfig::new(1000, 0, 1000).expect("valid")),
            ops: Some(BucketConfig::new(10, 0, 1000).expect("valid")),
        };
        let mut limiter = RateLimiter::new(limit).expect("timerfd");
        let now = Instant::now();
        assert!(limiter.take(900, now));
        assert!(!limiter.take(200, now), "bandwidth refuses");
        assert_eq!(limiter.ops.as_ref().map(|b| b.budget), Some(9), "the op was given back");
        for _ in 0..9 {
            assert!(limiter.take(0, now));
        }
        assert!(!limiter.take(0, now), "ops refuse the eleventh");
    }

    #[test]
    fn a_refused_consume_arms_the_timer_which_unblocks_the_queue() {
        let limit = RateLimit { bandwidth: Some(BucketConfig::new(1000, 0, 10).expect("valid")), ops: None };
        let mut limiter = RateLimiter::new(limit).expect("timerfd");
        assert!(limiter.consume(1000).expect("consume"));
        assert!(!limiter.consume(500).expect("consume"));
        assert!(limiter.is_blocked());
        assert!(!limiter.consume(1).expect("consume"), "nothing goes while blocked");
        wait_for_the_timer(&limiter); // about 5 ms
        limiter.timer_fired();
        assert!(!limiter.is_blocked());
        assert!(limiter.consume(500).expect("consume"));
    }

    fn options(pairs: &[(&str, &str)]) -> Result<RateLimit, RateOptionError> {
        let mut builder = RateLimitBuilder::default();
        for (key, value) in pairs {
            assert!(set_option(&mut builder, key, value)?, "{key} is a rate option");
        }
        builder.build()
    }

    #[test]
    fn options_on_the_command_line() {
        let limit = options(&[("bw_size", "10485760"), ("bw_refill_time", "1000"), ("ops_size", "100"), ("ops_refill_time", "1000"), ("ops_one_time_burst", "50")]).expect("valid");
        assert_eq!(limit.bandwidth, BucketConfig::new(10 << 20, 0, 1000).ok());
        assert_eq!(limit.ops, BucketConfig::new(100, 50, 1000).ok());
        assert_eq!(options(&[]), Ok(RateLimit::default()));
        assert_eq!(options(&[("bw_size", "1")]), Err(RateOptionError::Incomplete("bw")));
        assert_eq!(options(&[("ops_one_time_burst", "1")]), Err(RateOptionError::Incomplete("ops")));
        assert!(matches!(options(&[("bw_size", "lots")]), Err(RateOptionError::NotANumber(..))));
        assert!(matches!(options(&[("bw_size", "0"), ("bw_refill_time", "5")]), Err(RateOptionError::Bucket("bw", _))));
        let mut builder = RateLimitBuilder::default();
        assert_eq!(set_option(&mut builder, "readonly", ""), Ok(false));
        assert_eq!(set_option(&mut builder, "bw_colour", "1"), Ok(false));
    }

    #[test]
    fn no_limit_is_no_limit() {
        let mut limiter = RateLimiter::new(RateLimit::default()).expect("timerfd");
        assert!(!RateLimit::default().limits_anything());
        for _ in 0..1000 {
            assert!(limiter.consume(u64::MAX).expect("consume"));
        }
    }

    #[test]
    fn a_charge_beyond_the_budget_is_owed_and_the_queue_waits_until_it_is_paid() {
        let limit = RateLimit { bandwidth: Some(BucketConfig::new(1000, 0, 20).expect("valid")), ops: None };
        let mut limiter = RateLimiter::new(limit).expect("timerfd");
        assert!(limiter.ready().expect("ready"), "nothing owed yet");
        limiter.charge(1500);
        assert_eq!(limiter.bandwidth.as_ref().map(|b| (b.budget, b.debt)), Some((0, 500)));
        assert!(!limiter.ready().expect("ready"), "500 bytes owed");
        assert!(limiter.is_blocked());
        wait_for_the_timer(&limiter); // until the debt is paid (about 10 ms)
        limiter.timer_fired();
        assert!(limiter.ready().expect("ready"));
    }

    /// Bytes a receive queue takes in `periods` refill periods of `b` with frames of
    /// `frame_len` always waiting, on a clock of its own: it reads while nothing is owed,
    /// charges each frame after reading it, and sleeps exactly until the debt is paid (its timer).
    fn received_in(mut b: TokenBucket, periods: u32, frame_len: u64) -> u64 {
        let start = b.refilled_at;
        let (end, mut now, mut received) = (start + b.config.refill_time * periods, start, 0);
        while now < end {
            b.refill(now);
            match b.wait_for(0) {
                Duration::ZERO => {
                    b.charge(frame_len, now);
                    received += frame_len;
                }
                wait => now += wait,
            }
        }
        received
    }

    #[test]
    fn received_frames_come_at_the_rate_no_more_and_not_much_less() {
        // api-drive's card: 2 MiB/s as 209,715 bytes a 100 ms, over 10 s of frames of every size.
        for frame_len in [60, 1514, 9000, 65_550, 300_000] {
            let received = received_in(bucket(209_715, 0, 100), 100, frame_len);
            let refilled = 100 * 209_715;
            // The bucket starts full: one bucket more, and the last frame's overshoot.
            let most = refilled + 209_715 + frame_len;
            assert!((refilled..=most).contains(&received), "{frame_len}-byte frames: {received} bytes, not {refilled} to {most}");
        }
    }

    #[test]
    fn a_charge_spends_the_burst_first() {
        let mut b = bucket(100, 300, 1000);
        let now = b.refilled_at;
        b.charge(350, now);
        assert_eq!((b.burst, b.budget, b.debt), (0, 50, 0));
        b.charge(80, now);
        assert_eq!((b.budget, b.debt), (0, 30));
    }

    #[test]
    fn an_update_replaces_the_buckets_it_names_and_wakes_a_waiting_queue() {
        let ops = BucketConfig::new(1, 0, 86_400_000).expect("valid");
        let bandwidth = BucketConfig::new(1000, 0, 1000).expect("valid");
        let mut limiter = RateLimiter::new(RateLimit { bandwidth: Some(bandwidth), ops: Some(ops) }).expect("timerfd");
        assert!(limiter.consume(1).expect("consume"));
        assert!(!limiter.consume(1).expect("consume"), "one op a day");
        let faster = BucketConfig::new(1000, 0, 1000).expect("valid");
        limiter.update(BucketUpdate::Keep, BucketUpdate::Set(faster)).expect("update");
        assert_eq!(limiter.limit(), RateLimit { bandwidth: Some(bandwidth), ops: Some(faster) });
        limiter.timer_fired(); // re-armed to fire at once, not in a day
        assert!(limiter.consume(1).expect("consume"));
        limiter.update(BucketUpdate::Remove, BucketUpdate::Remove).expect("update");
        assert!(!limiter.limit().limits_anything());
        assert!(limiter.consume(u64::MAX).expect("consume"));
    }

    /// Waits, as a worker's epoll would, until the limiter's timer has fired.
    fn wait_for_the_timer(limiter: &RateLimiter) {
        let epoll = Epoll::new().expect("epoll");
        epoll.ctl(ControlOperation::Add, limiter.as_raw_fd(), EpollEvent::new(EventSet::IN, 0)).expect("watch");
        let mut events = [EpollEvent::default(); 1];
        assert_eq!(epoll.wait(5000, &mut events).expect("wait"), 1, "the timer never fired");
    }

    #[test]
    fn every_worker_woken_by_one_expiry_goes_on_and_the_limiter_stays_usable() {
        // Two workers of a multi-queue disk watch the same timer: both are woken by its one
        // expiry, the first reads it, and the second must not wait (lock held) for another.
        let limiter = SharedLimiter::new(RateLimit { bandwidth: None, ops: Some(BucketConfig::new(1, 0, 1).expect("valid")) }).expect("timerfd");
        let epoll = Epoll::new().expect("epoll");
        limiter.watch(&epoll, 7).expect("watch");
        assert!(limiter.lock().expect("limited").consume(1).expect("consume"));
        assert!(!limiter.lock().expect("limited").consume(1).expect("consume"), "the bucket is empty: the timer is armed");
        let mut events = [EpollEvent::default(); 1];
        assert_eq!(epoll.wait(5000, &mut events).expect("wait"), 1, "the timer fired");
        let (done, finished) = std::sync::mpsc::channel();
        let second = limiter.clone();
        std::thread::spawn(move || {
            assert!(second.timer_event(7, 7));
            assert!(second.timer_event(7, 7), "a second worker woken by the same expiry");
            let _ = done.send(());
        });
        assert!(finished.recv_timeout(Duration::from_secs(30)).is_ok(), "the second worker blocked reading the timer");
        assert!(!limiter.lock().expect("limited").is_blocked());
    }

    #[test]
    fn a_device_without_a_limiter_can_not_be_given_one() {
        let none = SharedLimiter::default();
        let set = BucketUpdate::Set(BucketConfig::new(1, 0, 1).expect("valid"));
        assert!(!none.update(set, BucketUpdate::Keep).expect("update"));
        let some = SharedLimiter::new(RateLimit::default()).expect("timerfd");
        assert!(some.update(set, BucketUpdate::Keep).expect("update"));
        assert!(some.limit().bandwidth.is_some());
    }
}
