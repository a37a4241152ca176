//! The rate limiter's tests: the token bucket's arithmetic on a clock of the test's own, the
//! options of a flag, and the timer as the workers of a device share it.

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

/// An epoll of a worker whose `duty` is `limiter`'s timer, which it watches under token 7 if
/// that duty says so.
fn watching(limiter: &SharedLimiter, duty: &TimerDuty) -> Epoll {
    let epoll = Epoll::new().expect("epoll");
    limiter.watch(&epoll, 7, duty).expect("watch");
    epoll
}

/// A limiter of one operation a millisecond, its timer armed by a refusal, and the epoll of
/// the worker whose `duty` that is.
fn blocked_limiter(duty: &TimerDuty) -> (SharedLimiter, Epoll) {
    let limiter = SharedLimiter::new(RateLimit { bandwidth: None, ops: Some(BucketConfig::new(1, 0, 1).expect("valid")) }).expect("timerfd");
    let epoll = watching(&limiter, duty);
    assert!(limiter.lock().expect("limited").consume(1).expect("consume"));
    assert!(!limiter.lock().expect("limited").consume(1).expect("consume"), "the bucket is empty: the timer is armed");
    (limiter, epoll)
}

#[test]
fn a_timer_event_with_nothing_left_to_read_does_not_wait_and_the_limiter_stays_usable() {
    // As when the API re-arms the timer (clearing its expiry) between epoll's report and
    // the worker's read: the read finds nothing and must not wait, lock held, for more.
    let duty = TimerDuty::alone();
    let (limiter, epoll) = blocked_limiter(&duty);
    let mut events = [EpollEvent::default(); 1];
    assert_eq!(epoll.wait(5000, &mut events).expect("wait"), 1, "the timer fired");
    let (done, finished) = std::sync::mpsc::channel();
    let worker = limiter.clone();
    std::thread::spawn(move || {
        assert!(worker.timer_event(7, 7, &duty));
        assert!(worker.timer_event(7, 7, &duty), "told again of an expiry already read");
        let _ = done.send(());
    });
    assert!(finished.recv_timeout(Duration::from_secs(30)).is_ok(), "the worker blocked reading the timer");
    assert!(!limiter.lock().expect("limited").is_blocked());
}

#[test]
fn only_the_first_queues_worker_hears_the_timer_and_it_kicks_every_other_queue() {
    let kick = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let others = [kick(), kick()];
    let duties = TimerDuty::of_queues(others.iter().map(|k| k.try_clone().expect("dup")).collect());
    assert_eq!(duties.len(), 3, "one duty per queue");
    let (limiter, first) = blocked_limiter(&duties[0]);
    let rest: Vec<Epoll> = duties[1..].iter().map(|duty| watching(&limiter, duty)).collect();
    let mut events = [EpollEvent::default(); 1];
    assert_eq!(first.wait(5000, &mut events).expect("wait"), 1, "the first queue's worker hears the timer");
    for epoll in &rest {
        assert_eq!(epoll.wait(0, &mut events).expect("wait"), 0, "the other queues' workers do not watch it");
    }
    assert!(limiter.timer_event(7, 7, &duties[0]));
    for (queue, kick) in others.iter().enumerate() {
        assert_eq!(kick.read().ok(), Some(1), "queue {} was not woken", queue + 1);
    }
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
