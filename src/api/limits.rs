//! Firecracker's `rate_limiter` bodies (on drives, network interfaces and the entropy device)
//! as lguest's limits ([`crate::rate_limiter`]), both ways.
//!
//! Before the start, a `PUT` gives a whole limiter: each bucket present is checked and becomes
//! a [`BucketConfig`]. After it, a `PATCH` changes a running limiter the way Firecracker does:
//! a bucket left out stays as it is, a bucket given replaces the old one (full, starting
//! afresh), and a bucket of size 0 or refill time 0 removes it. The bodies come from the API
//! client: every number is checked here before it reaches a device.

use super::types::{RateLimiter, TokenBucket};
use super::ApiError;
use crate::control::NetHandle;
use crate::rate_limiter::{BucketConfig, BucketUpdate, RateLimit, SharedLimiter};

/// A `PUT`'s limiter as lguest's limits; `field` names it in errors.
pub fn rate_limit(field: &'static str, limiter: Option<&RateLimiter>) -> Result<RateLimit, ApiError> {
    let bucket = |bucket: Option<&TokenBucket>| bucket.map(|bucket| bucket_config(field, bucket)).transpose();
    let Some(limiter) = limiter else { return Ok(RateLimit::default()) };
    Ok(RateLimit { bandwidth: bucket(limiter.bandwidth.as_ref())?, ops: bucket(limiter.ops.as_ref())? })
}

fn bucket_config(field: &'static str, bucket: &TokenBucket) -> Result<BucketConfig, ApiError> {
    BucketConfig::new(bucket.size, bucket.one_time_burst.unwrap_or(0), bucket.refill_time)
        .map_err(|e| ApiError::BadValue { field, why: e.to_string() })
}

/// A `PATCH`'s limiter, checked: what it does to the bandwidth and the ops bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimiterPatch {
    bandwidth: BucketUpdate,
    ops: BucketUpdate,
}

impl LimiterPatch {
    /// Checks a `PATCH`'s limiter (`None`: the limiter stays as it is).
    pub fn new(field: &'static str, limiter: Option<&RateLimiter>) -> Result<LimiterPatch, ApiError> {
        let update = |bucket: Option<&TokenBucket>| match bucket {
            None => Ok(BucketUpdate::Keep),
            Some(bucket) if bucket.size == 0 || bucket.refill_time == 0 => Ok(BucketUpdate::Remove),
            Some(bucket) => bucket_config(field, bucket).map(BucketUpdate::Set),
        };
        let Some(limiter) = limiter else { return Ok(LimiterPatch { bandwidth: BucketUpdate::Keep, ops: BucketUpdate::Keep }) };
        Ok(LimiterPatch { bandwidth: update(limiter.bandwidth.as_ref())?, ops: update(limiter.ops.as_ref())? })
    }

    /// Changes a running device's limiter, and returns its settings now (for `GET
    /// /vm/config`).
    pub fn apply(self, field: &'static str, limiter: &SharedLimiter) -> Result<Option<RateLimiter>, ApiError> {
        let host = |e: std::io::Error| ApiError::BadValue { field, why: format!("the host could not rearm the limiter's timer: {e}") };
        if !limiter.update(self.bandwidth, self.ops).map_err(host)? {
            return Err(ApiError::BadValue { field, why: "this device was made without a rate limiter".into() });
        }
        Ok(limiter_of(limiter.limit()))
    }
}

/// A `PATCH /network-interfaces`'s two limiters, checked together before either changes.
pub fn patch_net(net: &NetHandle, rx: Option<&RateLimiter>, tx: Option<&RateLimiter>) -> Result<(Option<RateLimiter>, Option<RateLimiter>), ApiError> {
    let (rx_patch, tx_patch) = (LimiterPatch::new("rx_rate_limiter", rx)?, LimiterPatch::new("tx_rate_limiter", tx)?);
    Ok((rx_patch.apply("rx_rate_limiter", &net.rx)?, tx_patch.apply("tx_rate_limiter", &net.tx)?))
}

/// lguest's limits as Firecracker's body (`None` when they limit nothing).
pub fn limiter_of(limit: RateLimit) -> Option<RateLimiter> {
    let bucket = |config: BucketConfig| TokenBucket {
        size: config.size(),
        refill_time: config.refill_time_ms(),
        one_time_burst: Some(config.one_time_burst()).filter(|&burst| burst > 0),
    };
    limit.limits_anything().then(|| RateLimiter { bandwidth: limit.bandwidth.map(bucket), ops: limit.ops.map(bucket) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(json: &str) -> RateLimiter {
        serde_json::from_str(json).expect("a limiter")
    }

    #[test]
    fn a_put_limiter_is_checked_bucket_by_bucket() {
        let limit = rate_limit("rate_limiter", Some(&limiter(r#"{"bandwidth": {"size": 1048576, "refill_time": 100, "one_time_burst": 10}}"#))).expect("valid");
        assert_eq!(limit.bandwidth, BucketConfig::new(1 << 20, 10, 100).ok());
        assert_eq!(limit.ops, None);
        let zero = rate_limit("rx_rate_limiter", Some(&limiter(r#"{"ops": {"size": 0, "refill_time": 100}}"#)));
        assert!(matches!(zero, Err(ApiError::BadValue { field: "rx_rate_limiter", .. })), "{zero:?}");
        assert_eq!(rate_limit("rate_limiter", None).ok(), Some(RateLimit::default()));
    }

    #[test]
    fn a_patch_keeps_what_it_leaves_out_and_removes_what_it_zeroes() {
        let shared = SharedLimiter::new(rate_limit("r", Some(&limiter(r#"{"bandwidth": {"size": 1000, "refill_time": 10}, "ops": {"size": 5, "refill_time": 10}}"#))).expect("valid")).expect("timerfd");
        let patch = LimiterPatch::new("r", Some(&limiter(r#"{"bandwidth": {"size": 2000, "refill_time": 20}}"#))).expect("valid");
        let now = patch.apply("r", &shared).expect("applied").expect("still limits");
        assert_eq!(now.bandwidth.map(|b| (b.size, b.refill_time)), Some((2000, 20)));
        assert_eq!(now.ops.map(|b| b.size), Some(5), "ops left as they were");
        let remove = LimiterPatch::new("r", Some(&limiter(r#"{"bandwidth": {"size": 0, "refill_time": 0}, "ops": {"size": 0, "refill_time": 0}}"#))).expect("valid");
        assert_eq!(remove.apply("r", &shared).expect("applied"), None, "nothing limited any more");
        let bad = LimiterPatch::new("tx_rate_limiter", Some(&limiter(r#"{"ops": {"size": 1, "refill_time": 86400001}}"#)));
        assert!(matches!(bad, Err(ApiError::BadValue { field: "tx_rate_limiter", .. })));
        let none = LimiterPatch::new("r", None).expect("valid").apply("r", &SharedLimiter::default());
        assert!(matches!(none, Err(ApiError::BadValue { .. })), "a device without a limiter says so");
    }

    #[test]
    fn limits_read_back_as_the_body_that_set_them() {
        let body = limiter(r#"{"bandwidth": {"size": 10485760, "refill_time": 1000, "one_time_burst": 1}, "ops": {"size": 10, "refill_time": 5}}"#);
        assert_eq!(limiter_of(rate_limit("r", Some(&body)).expect("valid")), Some(body));
        assert_eq!(limiter_of(RateLimit::default()), None);
    }
}
