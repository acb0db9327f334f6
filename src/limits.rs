//! Per-key rate limits (SPEC §2 `RATE_LIMIT_RPM`, `MAX_CONCURRENT_PER_KEY`).
//!
//! Requests per minute use governor's GCRA limiter (a burst of up to the
//! per-minute quota, refilled evenly); concurrency is a counter per key. A
//! request refused for one limit does not count against the other or
//! against the same limit later. Admin keys are never limited. Both limits
//! live in this process: with several gateways each applies them on its own.

use crate::store::{KeyId, KeyRecord, Role};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Over the requests-per-minute limit; retry after this many seconds.
    Rate { retry_after: u64 },
    /// Over the concurrency limit.
    Concurrency,
}

pub struct Limits {
    default_rpm: Option<u32>,
    default_concurrent: Option<u32>,
    keys: Mutex<HashMap<KeyId, Arc<KeyLimits>>>,
}

struct KeyLimits {
    rpm: Option<(u32, DefaultDirectRateLimiter)>,
    concurrent: Arc<AtomicU32>,
}

/// Holds one of a key's concurrent slots until dropped.
pub struct Permit {
    concurrent: Option<Arc<AtomicU32>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(c) = &self.concurrent {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Limits {
    pub fn new(default_rpm: Option<u32>, default_concurrent: Option<u32>) -> Limits {
        Limits {
            default_rpm,
            default_concurrent,
            keys: Mutex::new(HashMap::new()),
        }
    }

    fn key_limits(&self, key: &KeyRecord, rpm: Option<u32>) -> Arc<KeyLimits> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let current = keys.get(&key.id);
        let same_rpm = current.is_some_and(|l| l.rpm.as_ref().map(|(n, _)| *n) == rpm);
        if let (true, Some(limits)) = (same_rpm, current) {
            return limits.clone();
        }
        // First use, or the key's limit was changed: a fresh limiter, the
        // in-flight counter carried over.
        let concurrent =
            current.map_or_else(|| Arc::new(AtomicU32::new(0)), |l| l.concurrent.clone());
        let limiter = rpm
            .and_then(NonZeroU32::new)
            .map(|n| (n.get(), RateLimiter::direct(Quota::per_minute(n))));
        let limits = Arc::new(KeyLimits {
            rpm: limiter,
            concurrent,
        });
        keys.insert(key.id, limits.clone());
        limits
    }

    /// Takes one of `key`'s concurrent slots, or says why not: the first
    /// step of admitting a request, before its body is read (a key at its
    /// limit has no more bodies read for it). The request per minute is
    /// counted by [`Entered::pace`], once the request is known to be
    /// valid.
    pub fn enter(&self, key: &KeyRecord) -> Result<Entered, Refusal> {
        let unlimited = || Entered {
            permit: Permit { concurrent: None },
            limits: None,
        };
        if key.role == Role::Admin {
            return Ok(unlimited());
        }
        // A key's own 0 (which no write accepts now, but a store may hold
        // from before) is no limit of its own: the default applies.
        let own = |limit: Option<u32>| limit.filter(|n| *n > 0);
        let rpm = own(key.rate_limit_rpm).or(self.default_rpm);
        let max_concurrent = own(key.max_concurrent).or(self.default_concurrent);
        if rpm.is_none() && max_concurrent.is_none() {
            return Ok(unlimited());
        }
        let limits = self.key_limits(key, rpm);
        let permit = match max_concurrent {
            Some(max) => {
                let taken =
                    limits
                        .concurrent
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                            (n < max).then_some(n + 1)
                        });
                if taken.is_err() {
                    return Err(Refusal::Concurrency);
                }
                Permit {
                    concurrent: Some(limits.concurrent.clone()),
                }
            }
            None => Permit { concurrent: None },
        };
        Ok(Entered {
            permit,
            limits: Some(limits),
        })
    }
}

/// A request that holds its concurrent slot, its request per minute not
/// yet counted.
pub struct Entered {
    permit: Permit,
    limits: Option<Arc<KeyLimits>>,
}

impl Entered {
    /// Counts the request against its key's requests per minute; refused,
    /// it gives its slot back (dropped here) and counts nothing.
    pub fn pace(self) -> Result<Permit, Refusal> {
        if let Some((_, limiter)) = self.limits.as_ref().and_then(|l| l.rpm.as_ref()) {
            if let Err(not_until) = limiter.check() {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                return Err(Refusal::Rate {
                    retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
                });
            }
        }
        Ok(self.permit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Limits {
        /// Admits a request of `key` at once: [`Limits::enter`], then
        /// [`Entered::pace`].
        fn admit(&self, key: &KeyRecord) -> Result<Permit, Refusal> {
            self.enter(key)?.pace()
        }
    }
    use crate::credits::Credits;

    fn key(id: KeyId, rpm: Option<u32>, max: Option<u32>) -> KeyRecord {
        KeyRecord {
            id,
            name: "k".into(),
            role: Role::User,
            balance: Credits::whole(1),
            models: None,
            rate_limit_rpm: rpm,
            max_concurrent: max,
            created_at: 0,
            revoked_at: None,
            expires_at: None,
            granted: false,
            disabled: false,
        }
    }

    #[test]
    fn requests_per_minute_allow_the_quota_then_refuse_with_a_retry_time() {
        let limits = Limits::new(None, None);
        let k = key(1, Some(3), None);
        for _ in 0..3 {
            assert!(limits.admit(&k).is_ok());
        }
        match limits.admit(&k) {
            Err(Refusal::Rate { retry_after }) => assert!((1..=20).contains(&retry_after)),
            other => panic!("expected a rate refusal, got {:?}", other.err()),
        }
        // Another key has its own budget.
        assert!(limits.admit(&key(2, Some(3), None)).is_ok());
    }

    #[test]
    fn concurrency_is_released_when_a_permit_drops_and_refusals_do_not_count() {
        let limits = Limits::new(None, Some(2));
        let k = key(1, None, None);
        let a = limits.admit(&k).unwrap();
        let _b = limits.admit(&k).unwrap();
        assert_eq!(limits.admit(&k).err(), Some(Refusal::Concurrency));
        drop(a);
        assert!(limits.admit(&k).is_ok());
    }

    #[test]
    fn a_rate_refusal_does_not_hold_a_concurrency_slot() {
        let limits = Limits::new(Some(1), Some(1));
        let k = key(1, None, None);
        drop(limits.admit(&k).unwrap());
        assert!(matches!(limits.admit(&k), Err(Refusal::Rate { .. })));
        // The slot is free: only the rate limit refuses.
        assert!(matches!(limits.admit(&k), Err(Refusal::Rate { .. })));
        let admin = KeyRecord {
            role: Role::Admin,
            ..k
        };
        assert!(limits.admit(&admin).is_ok());
    }

    #[test]
    fn an_entered_request_holds_its_slot_before_it_is_paced() {
        let limits = Limits::new(Some(1), Some(1));
        let k = key(1, None, None);
        let entered = limits.enter(&k).unwrap();
        // Its body being read, the key has no slot for another.
        assert_eq!(limits.enter(&k).err(), Some(Refusal::Concurrency));
        // Entering counted no request per minute: pacing it does.
        let permit = entered.pace().unwrap();
        drop(permit);
        assert!(matches!(limits.admit(&k), Err(Refusal::Rate { .. })));
        // A request that never gets paced (refused as invalid) gives its
        // slot back and counts nothing.
        drop(limits.enter(&k).unwrap());
        assert!(limits.enter(&k).is_ok());
    }

    /// A 0 stored before limits had to be at least 1 is no limit of the
    /// key's own: the defaults apply (it used to block the key for good,
    /// or lift the default rate).
    #[test]
    fn a_stored_zero_limit_falls_back_to_the_default() {
        let limits = Limits::new(Some(2), None);
        let k = key(1, Some(0), Some(0));
        let _held: Vec<Permit> = (0..2).map(|_| limits.admit(&k).unwrap()).collect();
        assert!(matches!(limits.admit(&k), Err(Refusal::Rate { .. })));
    }
}
