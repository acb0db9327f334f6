//! Failed-authentication throttling (SPEC §3).
//!
//! Wrong keys are counted per client address in fixed one-minute windows.
//! Past the limit, the address gets 429 with `Retry-After` for the rest of
//! the minute, for every key but those that have authenticated from it
//! since its first wrong key: a legitimate user behind the same address
//! who is at work keeps working, while a guess, even a right one, gets
//! the same 429 as a wrong one (were a right guess let in, the limit would
//! not slow guessing at all). A key first used from a blocked address
//! waits for the end of its minute.
//!
//! An IPv6 client is counted by its /64 network, as one host or site is
//! given a whole /64 and may send from any of its 2^64 addresses; an
//! IPv4-mapped IPv6 address counts as the IPv4 address it maps.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::store::KeyHash;
use std::sync::atomic::{AtomicBool, Ordering};

const WINDOW: Duration = Duration::from_secs(60);
/// Above this many tracked addresses, expired windows are swept.
const SWEEP_AT: usize = 10_000;
/// Keys remembered per address: the 16 used last.
const KNOWN_KEYS: usize = 16;

pub struct AuthFailures {
    limit: u32,
    tracked: Mutex<Tracked>,
    /// Whether any address has been tracked since the last sweep left none:
    /// until an address gives a wrong key, authentication looks no
    /// further than this.
    any: AtomicBool,
}

/// The windows by client, and the count at which expired ones are swept
/// next: twice what a sweep left (at least [`SWEEP_AT`]), so that while
/// many addresses fail within one minute a sweep, which goes through all of
/// them, comes ever more seldom instead of at every failure.
struct Tracked {
    windows: HashMap<IpAddr, Window>,
    sweep_at: usize,
}

struct Window {
    started: Instant,
    failures: u32,
    /// Keys (their hashes) that authenticated from the address since its
    /// first wrong key, the one used last at the end (kept when a new
    /// window starts).
    known: Vec<KeyHash>,
}

impl AuthFailures {
    pub fn new(limit_per_minute: u32) -> Self {
        AuthFailures {
            limit: limit_per_minute,
            tracked: Mutex::new(Tracked {
                windows: HashMap::new(),
                sweep_at: SWEEP_AT,
            }),
            any: AtomicBool::new(false),
        }
    }

    fn tracked(&self) -> std::sync::MutexGuard<'_, Tracked> {
        self.tracked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one wrong key from `ip`. Returns the seconds its window has
    /// left when this one is over the limit: the guesses that were in
    /// flight together (their key lookups under way when the limit was
    /// reached) get 429 too, so no more than the limit of wrong keys get
    /// their answer in a window, however many are sent at once.
    pub fn record(&self, ip: IpAddr) -> Option<u64> {
        let now = Instant::now();
        let mut tracked = self.tracked();
        if tracked.windows.len() >= tracked.sweep_at {
            tracked
                .windows
                .retain(|_, w| now.duration_since(w.started) < WINDOW);
            tracked.sweep_at = SWEEP_AT.max(2 * tracked.windows.len());
            self.any
                .store(!tracked.windows.is_empty(), Ordering::Relaxed);
        }
        let window = tracked.windows.entry(client(ip)).or_insert(Window {
            started: now,
            failures: 0,
            known: Vec::new(),
        });
        if now.duration_since(window.started) >= WINDOW {
            window.started = now;
            window.failures = 0;
        }
        window.failures = window.failures.saturating_add(1);
        self.any.store(true, Ordering::Relaxed);
        (window.failures > self.limit).then(|| window.retry_after(now))
    }

    /// After the key with `hash` was found, for a request from `ip`: lets
    /// it in and notes it as a key at work there (when the address has
    /// given wrong keys), or, when the address went over the limit while
    /// the key was looked up and does not know it, gives the seconds left
    /// (a right guess among many sent at once gets 429 as the wrong ones).
    pub fn admitted(&self, ip: IpAddr, hash: &KeyHash) -> Result<(), u64> {
        if !self.any.load(Ordering::Relaxed) {
            return Ok(());
        }
        let now = Instant::now();
        let mut tracked = self.tracked();
        let Some(window) = tracked.windows.get_mut(&client(ip)) else {
            return Ok(());
        };
        let known = window.known.iter().position(|known| known == hash);
        if known.is_none() && window.is_over(self.limit, now) {
            return Err(window.retry_after(now));
        }
        match known {
            Some(at) => window.used_again(at),
            None => {
                if window.known.len() == KNOWN_KEYS {
                    window.known.remove(0);
                }
                window.known.push(hash.clone());
            }
        }
        Ok(())
    }

    /// Where `ip` stands, for the key with `hash` it presents: one look,
    /// before the key is looked up. Whether a blocked address knows the
    /// key is decided without the store, so that a blocked client learns
    /// nothing of a guess (not even from how long the answer took). A
    /// known key is noted as used last, as [`AuthFailures::admitted`] does
    /// when the address is not blocked: the keys at work while it is are
    /// the last to be forgotten.
    pub fn standing(&self, ip: IpAddr, hash: &KeyHash) -> Standing {
        if !self.any.load(Ordering::Relaxed) {
            return Standing::Clear;
        }
        let now = Instant::now();
        let mut tracked = self.tracked();
        let Some(window) = tracked.windows.get_mut(&client(ip)) else {
            return Standing::Clear;
        };
        if !window.is_over(self.limit, now) {
            return Standing::Clear;
        }
        let known = window.known.iter().position(|known| known == hash);
        if let Some(at) = known {
            window.used_again(at);
        }
        Standing::Blocked {
            retry_after: window.retry_after(now),
            known: known.is_some(),
        }
    }
}

impl Window {
    /// Whether the address has reached the limit of wrong keys in its
    /// current window.
    fn is_over(&self, limit: u32, now: Instant) -> bool {
        now.duration_since(self.started) < WINDOW && self.failures >= limit
    }

    /// Notes the known key at position `at` as the one used last.
    fn used_again(&mut self, at: usize) {
        let used = self.known.remove(at);
        self.known.push(used);
    }

    /// Seconds until the window ends, rounded up.
    fn retry_after(&self, now: Instant) -> u64 {
        whole_seconds_up(WINDOW.saturating_sub(now.duration_since(self.started)))
    }
}

/// What an address's wrong keys mean for a key it presents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Under the limit (or no wrong key on record): the key is looked up,
    /// and the address's count decides again after it
    /// ([`AuthFailures::record`], [`AuthFailures::admitted`]).
    Clear,
    /// Over the limit: 429 for `retry_after` seconds more, unless the key
    /// is `known` (it authenticated from here since the first wrong key).
    Blocked { retry_after: u64, known: bool },
}

/// Whom failures from `ip` are counted against: an IPv4 address, or an
/// IPv6 /64 network.
fn client(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
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

    impl AuthFailures {
        /// When `ip` is over the limit: the seconds until its window ends.
        fn blocked(&self, ip: IpAddr) -> Option<u64> {
            match self.standing(ip, &KeyHash(String::new())) {
                Standing::Blocked { retry_after, .. } => Some(retry_after),
                _ => None,
            }
        }

        /// Whether a blocked `ip` lets the key with `hash` in.
        fn knows(&self, ip: IpAddr, hash: &KeyHash) -> bool {
            matches!(
                self.standing(ip, hash),
                Standing::Blocked { known: true, .. }
            )
        }
    }

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
    fn the_addresses_of_one_ipv6_64_share_a_window() {
        let t = AuthFailures::new(3);
        for ip in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:abcd::9"] {
            t.record(ip.parse().unwrap());
        }
        assert!(t
            .blocked("2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap())
            .is_some());
        assert_eq!(t.blocked("2001:db8:1:3::1".parse().unwrap()), None);
    }

    #[test]
    fn an_ipv4_mapped_address_counts_as_its_ipv4_address() {
        let t = AuthFailures::new(2);
        t.record("::ffff:10.0.0.7".parse().unwrap());
        t.record("10.0.0.7".parse().unwrap());
        assert!(t.blocked("10.0.0.7".parse().unwrap()).is_some());
        assert!(t.blocked("::ffff:10.0.0.7".parse().unwrap()).is_some());
        assert_eq!(t.blocked("10.0.0.8".parse().unwrap()), None);
    }

    #[test]
    fn sweeps_drop_expired_windows_and_come_less_often_while_many_fail() {
        let t = AuthFailures::new(3);
        let long_ago = Instant::now() - WINDOW - Duration::from_secs(1);
        {
            let mut tracked = t.tracked();
            for i in 0..SWEEP_AT as u32 / 2 {
                let ip = IpAddr::V4(i.into());
                tracked.windows.insert(
                    ip,
                    Window {
                        started: long_ago,
                        failures: 9,
                        known: Vec::new(),
                    },
                );
            }
        }
        // Failures from as many addresses again fill the map up to the
        // sweep: it drops the expired half.
        for i in 0..SWEEP_AT as u32 / 2 {
            t.record(IpAddr::V4((u32::MAX - i).into()));
        }
        t.record("192.0.2.1".parse().unwrap());
        assert_eq!(t.tracked().windows.len(), SWEEP_AT / 2 + 1);
        assert!(!t.tracked().windows.contains_key(&IpAddr::V4(0.into())));
        // All of these are live: a sweep that found nothing to drop puts
        // the next one at twice as many addresses.
        for i in 0..SWEEP_AT as u32 {
            t.record(IpAddr::V4(((1 << 24) + i).into()));
        }
        assert_eq!(t.tracked().sweep_at, 2 * SWEEP_AT);
        assert_eq!(t.tracked().windows.len(), SWEEP_AT * 3 / 2 + 1);
    }

    fn h(n: usize) -> KeyHash {
        KeyHash(format!("{n:064}"))
    }

    #[test]
    fn a_blocked_address_lets_in_only_keys_used_since_its_first_wrong_one() {
        let t = AuthFailures::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        // Before any wrong key, nothing is noted (nothing to guard).
        assert_eq!(t.admitted(ip, &h(1)), Ok(()));
        assert_eq!(t.record(ip), None);
        assert_eq!(t.admitted(ip, &h(2)), Ok(()));
        assert_eq!(t.record(ip), None);
        assert!(t.blocked(ip).is_some());
        assert!(t.knows(ip, &h(2)), "used since the first wrong key");
        assert!(!t.knows(ip, &h(1)), "used only before it");
        assert!(!t.knows(ip, &h(3)), "never used from here: a guess");
        assert!(!t.knows("10.0.0.2".parse().unwrap(), &h(2)));
    }

    #[test]
    fn known_keys_outlive_a_window_and_the_ones_in_use_stay() {
        let t = AuthFailures::new(1);
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        t.record(ip);
        // Key 0 is used all along; 40 others come and go (while the
        // address is under the limit, or they would not get in).
        t.tracked().windows.get_mut(&client(ip)).unwrap().failures = 0;
        for key in 1..=40 {
            assert_eq!(t.admitted(ip, &h(0)), Ok(()));
            assert_eq!(t.admitted(ip, &h(key)), Ok(()));
        }
        t.tracked().windows.get_mut(&client(ip)).unwrap().failures = 1;
        assert!(t.knows(ip, &h(0)), "the key in use stays");
        assert!(t.knows(ip, &h(40)));
        assert!(!t.knows(ip, &h(3)), "the least recently used make room");
        assert_eq!(t.tracked().windows[&client(ip)].known.len(), KNOWN_KEYS);
        // The window ends; the next wrong key starts another.
        t.tracked().windows.get_mut(&client(ip)).unwrap().started -= WINDOW;
        assert_eq!(t.blocked(ip), None);
        t.record(ip);
        assert!(t.blocked(ip).is_some());
        assert!(t.knows(ip, &h(0)));
    }

    #[test]
    fn a_key_at_work_while_the_address_is_blocked_is_the_last_forgotten() {
        let t = AuthFailures::new(1);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        t.record(ip);
        t.tracked().windows.get_mut(&client(ip)).unwrap().failures = 0;
        for key in 0..KNOWN_KEYS {
            assert_eq!(t.admitted(ip, &h(key)), Ok(()));
        }
        // Blocked: key 0, the oldest known, is the one at work.
        t.tracked().windows.get_mut(&client(ip)).unwrap().failures = 1;
        for _ in 0..3 {
            assert!(t.knows(ip, &h(0)));
        }
        // The next minute, unblocked, a new key comes: the least recently
        // used makes room for it, which is key 1, not key 0.
        t.tracked().windows.get_mut(&client(ip)).unwrap().started -= WINDOW;
        assert_eq!(t.admitted(ip, &h(KNOWN_KEYS)), Ok(()));
        t.record(ip);
        assert!(t.blocked(ip).is_some());
        assert!(t.knows(ip, &h(0)), "the key at work was forgotten");
        assert!(!t.knows(ip, &h(1)));
    }

    #[test]
    fn guesses_sent_at_once_get_their_answer_only_up_to_the_limit() {
        let t = AuthFailures::new(3);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        // Ten guesses all found the address clear before their lookups.
        let clear: Vec<Standing> = (0..10).map(|n| t.standing(ip, &h(n))).collect();
        assert!(clear.iter().all(|s| *s == Standing::Clear));
        // Their lookups end: nine are wrong, one is right.
        let answers: Vec<Option<u64>> = (0..9).map(|_| t.record(ip)).collect();
        assert_eq!(answers[..3], [None, None, None], "the limit's 401s");
        assert!(answers[3..]
            .iter()
            .all(|a| a.is_some_and(|s| (1..=60).contains(&s))));
        let right_guess = t.admitted(ip, &h(9));
        assert!(right_guess.is_err(), "a right guess past the limit: 429");
        assert!(!t.knows(ip, &h(9)), "and not noted as a key at work");
    }

    #[test]
    fn a_key_at_work_is_admitted_past_the_limit() {
        let t = AuthFailures::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        t.record(ip);
        assert_eq!(t.admitted(ip, &h(1)), Ok(()));
        t.record(ip);
        t.record(ip);
        assert_eq!(t.admitted(ip, &h(1)), Ok(()));
        assert!(t.admitted(ip, &h(2)).is_err());
        // Another address is not affected.
        assert_eq!(t.admitted("10.0.0.2".parse().unwrap(), &h(2)), Ok(()));
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
