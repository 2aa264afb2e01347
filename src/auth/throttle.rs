//! Login throttling: at most `max_failures` failed logins per (username, client address) within a
//! fixed window that starts at the first failure; then "retry after" until the window ends.
//!
//! Keyed by user *and* address on purpose: an attacker hammering an account from one address
//! cannot lock its owner out from another. The map is bounded (`max_entries`) so a flood of
//! distinct usernames or addresses cannot grow memory without limit. Time is a parameter
//! (`now: Instant`) so tests need not sleep.
//!
//! Use: `check` before verifying a password (refuse with 429 + `Retry-After` on `Err`), then
//! `record_failure` or `record_success` with the outcome.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Usernames longer than this are cut before use as a key: valid names have at most 64
/// characters, and the cap keeps an attacker from storing megabytes per entry.
const MAX_KEY_NAME_CHARS: usize = 65;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    /// The first failure of the current window; the window ends `window` later.
    since: Instant,
}

/// Counts failed logins per (username, address). Shared by all request handlers (`Arc`).
#[derive(Debug)]
pub struct LoginThrottle {
    max_failures: u32,
    window: Duration,
    max_entries: usize,
    /// A std `Mutex`, not tokio's: every critical section is a few map operations with no
    /// `.await` inside, so blocking the thread for microseconds is cheaper than an async lock
    /// (the same reasoning as mini-redis's `Db`).
    entries: Mutex<HashMap<(String, IpAddr), Failures>>,
}

impl LoginThrottle {
    /// `max_failures` failures (at least 1) per key within `window`; at most `max_entries` keys
    /// (at least 1) are remembered, the oldest evicted first.
    pub fn new(max_failures: u32, window: Duration, max_entries: usize) -> Self {
        LoginThrottle {
            max_failures: max_failures.max(1),
            window,
            max_entries: max_entries.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The product defaults: 5 failures per user+address in 15 minutes, 100,000 keys remembered.
    pub fn with_defaults() -> Self {
        Self::new(5, Duration::from_secs(15 * 60), 100_000)
    }

    /// `Ok` if this user may try to log in from `ip` now, else `Err(retry_after)`, never zero.
    pub fn check(&self, user: &str, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = key(user, ip);
        let mut entries = self.lock();
        match entries.get(&key).copied() {
            Some(f) if self.expired(f, now) => {
                entries.remove(&key);
                Ok(())
            }
            Some(f) if f.count >= self.max_failures => {
                // checked_add: a configured window near Duration::MAX must not panic.
                let left = f
                    .since
                    .checked_add(self.window)
                    .map_or(self.window, |ends| ends.saturating_duration_since(now));
                Err(left.max(Duration::from_secs(1)))
            }
            _ => Ok(()),
        }
    }

    /// Counts one failed login of `user` from `ip`.
    pub fn record_failure(&self, user: &str, ip: IpAddr, now: Instant) {
        let key = key(user, ip);
        let mut entries = self.lock();
        if let Some(f) = entries.get_mut(&key) {
            if self.expired(*f, now) {
                *f = Failures {
                    count: 1,
                    since: now,
                };
            } else {
                f.count = f.count.saturating_add(1);
            }
            return;
        }
        if entries.len() >= self.max_entries {
            self.make_room(&mut entries, now);
        }
        entries.insert(
            key,
            Failures {
                count: 1,
                since: now,
            },
        );
    }

    /// A successful login clears the failures of this user from this address.
    pub fn record_success(&self, user: &str, ip: IpAddr) {
        self.lock().remove(&key(user, ip));
    }

    /// How many keys are remembered (for metrics and tests).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no failures are remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn expired(&self, f: Failures, now: Instant) -> bool {
        now.saturating_duration_since(f.since) >= self.window
    }

    /// Drops expired entries; if none expired, evicts the oldest one. A linear scan, run only when
    /// the map is full: with the default 100,000 keys that is about a millisecond, small next to
    /// the ~150 ms password hash every failure costs anyway.
    fn make_room(&self, entries: &mut HashMap<(String, IpAddr), Failures>, now: Instant) {
        entries.retain(|_, f| !self.expired(*f, now));
        if entries.len() >= self.max_entries {
            let oldest = entries
                .iter()
                .min_by_key(|(_, f)| f.since)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                entries.remove(&k);
            }
        }
    }

    /// A poisoned lock only means another thread panicked mid-update of plain counters: the map
    /// is still usable, and refusing all logins forever would be worse.
    fn lock(&self) -> MutexGuard<'_, HashMap<(String, IpAddr), Failures>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, from dual-stack sockets) count as the IPv4
/// address, so one client cannot get two budgets.
fn key(user: &str, ip: IpAddr) -> (String, IpAddr) {
    (
        user.chars().take(MAX_KEY_NAME_CHARS).collect(),
        ip.to_canonical(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(15 * 60);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_at_the_limit_and_releases_after_the_window() {
        let t = LoginThrottle::new(5, WINDOW, 100);
        let a = ip("10.0.0.1");
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(t.check("alice", a, t0).is_ok(), "attempt {i}");
            t.record_failure("alice", a, t0 + Duration::from_secs(i));
        }
        let retry = t
            .check("alice", a, t0 + Duration::from_secs(60))
            .unwrap_err();
        assert_eq!(retry, WINDOW - Duration::from_secs(60));
        assert!(t
            .check("alice", a, t0 + WINDOW - Duration::from_millis(1))
            .is_err());
        assert!(t.check("alice", a, t0 + WINDOW).is_ok());
        assert!(t.is_empty(), "the expired entry is dropped");
    }

    #[test]
    fn other_address_and_other_user_are_unaffected() {
        let t = LoginThrottle::new(3, WINDOW, 100);
        let now = Instant::now();
        for _ in 0..10 {
            t.record_failure("alice", ip("10.0.0.1"), now);
        }
        assert!(t.check("alice", ip("10.0.0.1"), now).is_err());
        assert!(t.check("alice", ip("10.0.0.2"), now).is_ok());
        assert!(t.check("alice", ip("2001:db8::1"), now).is_ok());
        assert!(t.check("bob", ip("10.0.0.1"), now).is_ok());
    }

    #[test]
    fn mapped_ipv6_counts_as_ipv4() {
        let t = LoginThrottle::new(2, WINDOW, 100);
        let now = Instant::now();
        t.record_failure("alice", ip("10.0.0.1"), now);
        t.record_failure("alice", ip("::ffff:10.0.0.1"), now);
        assert!(t.check("alice", ip("10.0.0.1"), now).is_err());
    }

    #[test]
    fn success_clears() {
        let t = LoginThrottle::new(2, WINDOW, 100);
        let (a, now) = (ip("10.0.0.1"), Instant::now());
        t.record_failure("alice", a, now);
        t.record_failure("alice", a, now);
        assert!(t.check("alice", a, now).is_err());
        t.record_success("alice", a);
        assert!(t.check("alice", a, now).is_ok());
    }

    #[test]
    fn failures_after_the_window_start_a_new_one() {
        let t = LoginThrottle::new(2, WINDOW, 100);
        let (a, t0) = (ip("10.0.0.1"), Instant::now());
        t.record_failure("alice", a, t0);
        t.record_failure("alice", a, t0 + WINDOW + Duration::from_secs(1));
        assert!(t
            .check("alice", a, t0 + WINDOW + Duration::from_secs(2))
            .is_ok());
    }

    #[test]
    fn size_is_bounded_evicting_the_oldest() {
        let t = LoginThrottle::new(1, WINDOW, 10);
        let t0 = Instant::now();
        for i in 0..50u32 {
            let addr = IpAddr::from([10, 0, 0, i as u8]);
            t.record_failure("alice", addr, t0 + Duration::from_millis(u64::from(i)));
            assert!(t.len() <= 10);
        }
        let now = t0 + Duration::from_secs(1);
        assert!(
            t.check("alice", IpAddr::from([10, 0, 0, 0]), now).is_ok(),
            "evicted"
        );
        assert!(
            t.check("alice", IpAddr::from([10, 0, 0, 49]), now).is_err(),
            "kept"
        );
    }

    #[test]
    fn expired_entries_are_dropped_before_evicting() {
        let t = LoginThrottle::new(1, WINDOW, 2);
        let t0 = Instant::now();
        t.record_failure("old", ip("10.0.0.1"), t0);
        t.record_failure("young", ip("10.0.0.1"), t0 + WINDOW);
        t.record_failure("new", ip("10.0.0.1"), t0 + WINDOW + Duration::from_secs(1));
        assert_eq!(t.len(), 2);
        assert!(t
            .check(
                "young",
                ip("10.0.0.1"),
                t0 + WINDOW + Duration::from_secs(2)
            )
            .is_err());
    }

    #[test]
    fn huge_window_does_not_overflow() {
        let t = LoginThrottle::new(1, Duration::MAX, 10);
        let now = Instant::now();
        t.record_failure("alice", ip("10.0.0.1"), now);
        assert!(t.check("alice", ip("10.0.0.1"), now).is_err());
    }

    #[test]
    fn long_usernames_are_cut() {
        let t = LoginThrottle::new(1, WINDOW, 10);
        let now = Instant::now();
        t.record_failure(&"x".repeat(100_000), ip("10.0.0.1"), now);
        assert!(t.check(&"x".repeat(200), ip("10.0.0.1"), now).is_err());
    }
}
