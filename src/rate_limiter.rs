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
//! A device's limiter is shared ([`SharedLimiter`]) by the device, its worker threads and the
//! API, whose `PATCH` replaces buckets while the guest runs ([`RateLimiter::update`]). A
//! multi-queue device's queues share its one limiter, and so one timer: the first queue's
//! worker watches it and kicks the others when it fires ([`TimerDuty`]).
//!
//! The numbers come from the user (or an API client) and are checked once, in
//! [`BucketConfig::new`]; nothing here trusts the guest, which only asks for amounts.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
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

/// A timerfd whose read never blocks: a worker told of an expiry that is gone by the time it
/// reads (the API's `PATCH` re-armed the timer in between, which clears the count) finds
/// nothing to read (EAGAIN) instead of waiting, with the limiter's lock held, for an expiry
/// that only a holder of that lock could arm.
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

    /// Watches the timer under `token` in a worker's epoll set, if that is the worker's `duty`.
    pub fn watch(&self, epoll: &Epoll, token: u64, duty: &TimerDuty) -> io::Result<()> {
        match (&self.0, duty) {
            (Some(limiter), TimerDuty::Watch(_)) => {
                epoll.ctl(ControlOperation::Add, lock(limiter).as_raw_fd(), EpollEvent::new(EventSet::IN, token))
            }
            _ => Ok(()),
        }
    }

    /// Whether the event a worker got under `token` is the timer's (watched as `timer`): the
    /// queue may then be served again, and so may the other queues the `duty` names, which
    /// are kicked.
    pub fn timer_event(&self, token: u64, timer: u64, duty: &TimerDuty) -> bool {
        match &self.0 {
            Some(limiter) if token == timer => {
                lock(limiter).timer_fired();
                duty.wake_others();
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

/// What one worker does about its device's limiter timer. The queues of a multi-queue device
/// share one limiter (the rate is the device's, as in Firecracker), and so one timer: the
/// first queue's worker watches it and, when it fires, kicks the other queues' workers, which
/// the same limit may have held back. Each watching the timer itself would not do: epoll
/// reports a timerfd only while its expiry is unread, so a worker whose epoll looks after
/// another worker has read it hears nothing, and its queue waits for a kick that never comes.
pub enum TimerDuty {
    /// Watch the timer, and kick these (the other queues' kicks) when it fires.
    Watch(Vec<EventFd>),
    /// Another queue's worker watches the timer and kicks this one's queue.
    Kicked,
}

impl TimerDuty {
    /// A single-queue device's: it watches its timer, with nobody else to wake.
    pub fn alone() -> TimerDuty {
        TimerDuty::Watch(Vec::new())
    }

    /// The duties of a device's workers, in queue order, from the kicks of every queue but the
    /// first: the first queue's worker watches and kicks, the others are kicked.
    pub fn of_queues(others: Vec<EventFd>) -> Vec<TimerDuty> {
        let kicked = others.len();
        std::iter::once(TimerDuty::Watch(others)).chain(std::iter::repeat_with(|| TimerDuty::Kicked).take(kicked)).collect()
    }

    fn wake_others(&self) {
        let TimerDuty::Watch(others) = self else { return };
        for kick in others {
            // A kick's eventfd refuses a write only when its count is full: that worker has a
            // wake-up waiting already.
            let _ = kick.write(1);
        }
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
mod tests;
