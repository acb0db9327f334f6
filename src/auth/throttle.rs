//! Failed-authentication throttling (SPEC §3).
//!
//! Wrong keys are counted per client address in fixed one-minute windows.
//! Past the limit, the address gets 429 with `Retry-After` for the rest of
//! the minute unless it presents a valid key: brute-forcing a short key
//! becomes impractical while a legitimate user behind the same address
//! keeps working.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Above this many tracked addresses, expired windows are swept.
const SWEEP_AT: usize = 10_000;

pub struct AuthFailures {
    limit: u32,
    windows: Mutex<HashMap<IpAddr, Window>>,
}

#[derive(Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

impl AuthFailures {
    pub fn new(limit_per_minute: u32) -> Self {
        AuthFailures {
            limit: limit_per_minute,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one wrong key from `ip`.
    pub fn record(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if windows.len() >= SWEEP_AT {
            windows.retain(|_, w| now.duration_since(w.started) < WINDOW);
        }
        let window = windows.entry(ip).or_insert(Window {
            started: now,
            failures: 0,
        });
        if now.duration_since(window.started) >= WINDOW {
            *window = Window {
                started: now,
                failures: 0,
            };
        }
        window.failures = window.failures.saturating_add(1);
    }

    /// When `ip` is over the limit: the seconds until its window ends.
    pub fn blocked(&self, ip: IpAddr) -> Option<u64> {
        let windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let window = windows.get(&ip)?;
        let elapsed = window.started.elapsed();
        if elapsed >= WINDOW || window.failures < self.limit {
            return None;
        }
        Some(whole_seconds_up(WINDOW - elapsed))
    }
}

/// `left` in whole seconds, rounded up: a client that waits that long (as
/// `Retry-After` tells it) finds the window over.
fn whole_seconds_up(left: Duration) -> u64 {
    u64::try_from(left.as_millis().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_an_address_after_the_limit_and_only_that_address() {
        let t = AuthFailures::new(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..2 {
            t.record(a);
        }
        assert_eq!(t.blocked(a), None);
        t.record(a);
        let retry = t.blocked(a).expect("blocked after 3 failures");
        assert!((1..=60).contains(&retry));
        assert_eq!(t.blocked(b), None);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(whole_seconds_up(Duration::from_millis(59_500)), 60);
        assert_eq!(whole_seconds_up(Duration::from_millis(59_001)), 60);
        assert_eq!(whole_seconds_up(Duration::from_secs(60)), 60);
        assert_eq!(whole_seconds_up(Duration::from_millis(200)), 1);
        assert_eq!(whole_seconds_up(Duration::ZERO), 1);
    }
}
