//! Token-bucket rate limits keyed by client address or account.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use crate::{
    config::RateLimit,
    error::{Error, Result},
};

pub struct RateLimiter {
    limit: RateLimit,
    enabled: bool,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit, enabled: bool) -> Self {
        Self {
            limit,
            enabled,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one token for `key`, or fail with `M_LIMIT_EXCEEDED` and the wait.
    pub fn check(&self, key: &str) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let now = Instant::now();
        let burst = f64::from(self.limit.burst);
        let mut buckets = self.buckets.lock();
        if buckets.len() > 100_000 {
            buckets.retain(|_, (tokens, at)| {
                *tokens + at.elapsed().as_secs_f64() * self.limit.per_second < burst
            });
        }
        let (tokens, at) = buckets.entry(key.to_owned()).or_insert((burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.limit.per_second).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - *tokens) / self.limit.per_second;
            Err(Error::limit_exceeded(Duration::from_secs_f64(
                wait.max(0.001),
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refusal_with_wait() {
        let rl = RateLimiter::new(
            RateLimit {
                per_second: 1.0,
                burst: 3,
            },
            true,
        );
        for _ in 0..3 {
            rl.check("1.2.3.4").unwrap();
        }
        let err = rl.check("1.2.3.4").unwrap_err();
        assert_eq!(err.errcode(), "M_LIMIT_EXCEEDED");
        let (_, body) = err.to_response_parts();
        assert!(body["retry_after_ms"].as_u64().unwrap() > 0, "{body}");
        rl.check("5.6.7.8").unwrap();
    }
}
