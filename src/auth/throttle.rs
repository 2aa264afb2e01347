//! Login throttling: at most `max_failures` login attempts per (username, client address) within
//! a sliding window (attempts are counted when they start, a success clears the key); then
//! "retry after" until the oldest counted attempt leaves the window.
//!
//! Keyed by user *and* address on purpose: an attacker hammering an account from one address
//! cannot lock its owner out from another. The map is bounded (`max_entries`) so a flood of
//! distinct usernames or addresses cannot grow memory without limit. Time is a parameter
//! (`now: Instant`) so tests need not sleep.
//!
//! Use: `begin` before verifying a password (refuse with 429 + `Retry-After` on `Err`); it
//! counts the attempt, so a wrong password needs nothing more; then `record_success` on success,
//! or `refund` if the password was never checked.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Usernames longer than this are cut before use as a key: valid names have at most 64
/// characters, and the cap keeps an attacker from storing megabytes per entry.
const MAX_KEY_NAME_CHARS: usize = 65;

#[derive(Debug, Clone, Default)]
struct Failures {
    /// When the attempts still inside the window were made (failed ones, and ones still being
    /// checked), oldest first; never more than the limit. A sliding window: an attempt is
    /// allowed when fewer than the limit were made in the `window` before it, so no burst at a
    /// window boundary gets twice the budget. (Few in practice: each one counted costs a
    /// password hash, and those are bounded server-wide.)
    times: VecDeque<Instant>,
    /// The refusal of the current lockout was already reported (`Throttled::first`); cleared
    /// when an attempt is allowed again.
    refusal_reported: bool,
}

impl Failures {
    /// The last attempt, if any.
    fn latest(&self) -> Option<Instant> {
        self.times.back().copied()
    }
}

/// A refused attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// When an attempt is allowed again (the oldest attempt in the window leaves it); never
    /// zero.
    pub retry_after: Duration,
    /// The first refusal of this (user, address) lockout. The security log records that one;
    /// later refusals only count in the metric, so a client hammering a throttled key cannot
    /// make the server append and sync a log entry per request.
    pub first: bool,
}

/// Token refreshes a user may make at once, over HTTP and WebSocket together.
pub const REFRESH_BURST: f64 = 30.0;
/// One more refresh per user becomes available this often. A client refreshes once per token
/// lifetime (15 minutes by default), within the minute after `token_expiring`: one account
/// shared by 50 desk screens that logged in together (and so refresh together) is served in
/// 40 s of that minute (30 at once, 20 more at one per 2 s), while a user refreshing in a loop
/// costs the disk one synced security-log entry per 2 s.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// Audited reads of the audit trail (an alarm's history, an event export, a past state, the
/// security log) a user may make at once, and how often one more becomes available: each
/// appends a synced security-log entry, so a client reading in a loop is bounded like a
/// refreshing one (5 syncs a second), while an auditor gets 100 at once.
pub const AUDIT_READ_BURST: f64 = 100.0;
pub const AUDIT_READ_EVERY: Duration = Duration::from_millis(200);

/// A token bucket: at most `burst` tokens, refilled at `per_sec` a second. The one rate-limit
/// mechanism of the server besides the login throttle: per WebSocket connection (commands,
/// subscribes and refreshes) and per user (`PerUserLimit`).
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn full(per_sec: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            per_sec,
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn refilled(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * self.per_sec).min(self.burst)
    }

    /// Takes one token at `now`, or says how long until one is available.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.tokens = self.refilled(now);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
        }
    }
}

/// A per-user budget: a `TokenBucket` of `burst` refilled one per `every`, for requests that
/// append a synced security-log entry each — token refreshes (`refreshes`, HTTP and WebSocket
/// together) and audited reads of the audit trail (`audit_reads`). The per-connection budgets do not bound a
/// user with many connections or HTTP requests: asking in a loop would put an fsync per request
/// beside the writer's group commits. Keyed by user names that passed the token check
/// (existing accounts), and pruned of full buckets past 10,000 entries.
pub struct PerUserLimit {
    burst: f64,
    every: Duration,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl PerUserLimit {
    pub fn new(burst: f64, every: Duration) -> Self {
        PerUserLimit {
            burst,
            every,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Token refreshes: `REFRESH_BURST`, one per `REFRESH_EVERY`.
    pub fn refreshes() -> Self {
        Self::new(REFRESH_BURST, REFRESH_EVERY)
    }

    /// Audited reads: `AUDIT_READ_BURST`, one per `AUDIT_READ_EVERY`.
    pub fn audit_reads() -> Self {
        Self::new(AUDIT_READ_BURST, AUDIT_READ_EVERY)
    }

    /// Takes one for `user` at `now`, or says how long until one is available (at least a
    /// second: it becomes a `Retry-After`).
    pub fn take(&self, user: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let burst = self.burst;
        if buckets.len() > 10_000 {
            buckets.retain(|_, b| b.refilled(now) < burst);
        }
        let per_sec = 1.0 / self.every.as_secs_f64();
        buckets
            .entry(user.to_string())
            .or_insert_with(|| TokenBucket::full(per_sec, burst, now))
            .take(now)
            .map_err(|wait| wait.max(Duration::from_secs(1)))
    }
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

    /// Starts a login attempt of `user` from `ip`: `Ok` and the attempt is counted, or
    /// `Err` if the budget of this window is spent. Checking and counting are one step under one
    /// lock, so concurrent attempts cannot all pass the check before any failure is counted: of
    /// any number of parallel guesses, at most `max_failures` reach the password check.
    ///
    /// Afterwards: `record_success` clears the key; a wrong password leaves the attempt counted;
    /// an attempt whose password was never checked (hash queue full, storage error) is given
    /// back with `refund`.
    pub fn begin(&self, user: &str, ip: IpAddr, now: Instant) -> Result<(), Throttled> {
        let key = key(user, ip);
        let mut entries = self.lock();
        if !entries.contains_key(&key) && entries.len() >= self.max_entries {
            self.make_room(&mut entries, now);
        }
        let f = entries.entry(key).or_default();
        while f
            .times
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= self.window)
        {
            f.times.pop_front();
        }
        if f.times.len() >= self.max_failures as usize {
            // Allowed again when the oldest attempt of the window leaves it. checked_add: a
            // configured window near Duration::MAX must not panic.
            let oldest = f.times[f.times.len() - self.max_failures as usize];
            let left = oldest
                .checked_add(self.window)
                .map_or(self.window, |ends| ends.saturating_duration_since(now));
            let first = !f.refusal_reported;
            f.refusal_reported = true;
            return Err(Throttled {
                retry_after: left.max(Duration::from_secs(1)),
                first,
            });
        }
        f.times.push_back(now);
        f.refusal_reported = false;
        Ok(())
    }

    /// Gives back an attempt counted by `begin` whose password was never checked.
    pub fn refund(&self, user: &str, ip: IpAddr) {
        let key = key(user, ip);
        let mut entries = self.lock();
        if let Some(f) = entries.get_mut(&key) {
            f.times.pop_back();
            if f.times.is_empty() {
                entries.remove(&key);
            }
        }
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

    /// No attempt of `f` is inside the window any more.
    fn expired(&self, f: &Failures, now: Instant) -> bool {
        f.latest()
            .is_none_or(|t| now.saturating_duration_since(t) >= self.window)
    }

    /// Drops expired entries; if none expired, evicts the oldest one. A linear scan, run only when
    /// the map is full: with the default 100,000 keys that is about a millisecond, small next to
    /// the ~150 ms password hash every failure costs anyway.
    fn make_room(&self, entries: &mut HashMap<(String, IpAddr), Failures>, now: Instant) {
        entries.retain(|_, f| !self.expired(f, now));
        if entries.len() >= self.max_entries {
            let oldest = entries
                .iter()
                .min_by_key(|(_, f)| f.latest())
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
/// address, so one client cannot get two budgets. An IPv6 address counts as its /64: one
/// subscriber usually holds a whole /64 (2^64 addresses), and keying on the full address would
/// give it as many budgets against one account.
fn key(user: &str, ip: IpAddr) -> (String, IpAddr) {
    let ip = match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    };
    (user.chars().take(MAX_KEY_NAME_CHARS).collect(), ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_per_user_are_a_burst_then_one_per_interval() {
        let limit = PerUserLimit::refreshes();
        let t0 = Instant::now();
        for i in 0..REFRESH_BURST as usize {
            assert!(limit.take("ann", t0).is_ok(), "refresh {i} of the burst");
        }
        let wait = limit.take("ann", t0).expect_err("burst spent");
        assert!(
            wait <= REFRESH_EVERY && wait >= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(limit.take("bob", t0).is_ok(), "another user has its own");
        assert!(
            limit.take("ann", t0 + REFRESH_EVERY).is_ok(),
            "one more after the interval"
        );
        assert!(limit.take("ann", t0 + REFRESH_EVERY).is_err());
    }

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
            assert!(
                t.begin("alice", a, t0 + Duration::from_secs(i)).is_ok(),
                "attempt {i}"
            );
        }
        let refused = t
            .begin("alice", a, t0 + Duration::from_secs(60))
            .unwrap_err();
        assert_eq!(refused.retry_after, WINDOW - Duration::from_secs(60));
        assert!(refused.first);
        let again = t
            .begin("alice", a, t0 + WINDOW - Duration::from_millis(1))
            .unwrap_err();
        assert!(
            !again.first,
            "only the first refusal of a window is reported"
        );
        assert!(t.begin("alice", a, t0 + WINDOW).is_ok(), "a new window");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn the_window_slides_so_a_boundary_gives_no_second_budget() {
        // One failure at t0, four just before t0 + WINDOW: right after t0 + WINDOW only the
        // first has left the window, so one more attempt is allowed, not five (a fixed window
        // restarting at t0 + WINDOW allowed nine within seconds).
        let t = LoginThrottle::new(5, WINDOW, 100);
        let (a, t0) = (ip("10.0.0.1"), Instant::now());
        let late = t0 + WINDOW - Duration::from_secs(2);
        t.begin("alice", a, t0).unwrap();
        for _ in 0..4 {
            t.begin("alice", a, late).unwrap();
        }
        let after = t0 + WINDOW + Duration::from_secs(1);
        assert!(
            t.begin("alice", a, after).is_ok(),
            "t0's attempt has left the window"
        );
        let refused = t.begin("alice", a, after).unwrap_err();
        assert_eq!(
            refused.retry_after,
            late + WINDOW - after,
            "allowed again when the oldest attempt in the window leaves it"
        );
        assert!(t.begin("alice", a, late + WINDOW).is_ok());
    }

    #[test]
    fn one_ipv6_slash_64_shares_one_budget() {
        let t = LoginThrottle::new(2, WINDOW, 100);
        let t0 = Instant::now();
        t.begin("alice", ip("2001:db8:1:2::1"), t0).unwrap();
        t.begin("alice", ip("2001:db8:1:2:ffff::9"), t0).unwrap();
        assert!(
            t.begin("alice", ip("2001:db8:1:2:abcd::1"), t0).is_err(),
            "another address of the same /64 has no budget of its own"
        );
        assert!(
            t.begin("alice", ip("2001:db8:1:3::1"), t0).is_ok(),
            "another /64 is another client"
        );
    }

    #[test]
    fn a_new_window_reports_its_first_refusal_again() {
        let t = LoginThrottle::new(1, WINDOW, 100);
        let (a, t0) = (ip("10.0.0.1"), Instant::now());
        t.begin("alice", a, t0).unwrap();
        assert!(t.begin("alice", a, t0).unwrap_err().first);
        assert!(!t.begin("alice", a, t0).unwrap_err().first);
        t.begin("alice", a, t0 + WINDOW).unwrap();
        assert!(t.begin("alice", a, t0 + WINDOW).unwrap_err().first);
    }

    #[test]
    fn parallel_attempts_get_no_more_than_the_budget() {
        let t = std::sync::Arc::new(LoginThrottle::new(5, WINDOW, 100));
        let now = Instant::now();
        let passed: usize = (0..32)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || t.begin("alice", ip("10.0.0.1"), now).is_ok())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| usize::from(h.join().unwrap()))
            .sum();
        assert_eq!(passed, 5);
    }

    #[test]
    fn refund_gives_back_an_unchecked_attempt() {
        let t = LoginThrottle::new(2, WINDOW, 100);
        let (a, now) = (ip("10.0.0.1"), Instant::now());
        t.begin("alice", a, now).unwrap();
        t.refund("alice", a);
        assert!(t.is_empty(), "nothing left to remember");
        t.begin("alice", a, now).unwrap();
        t.begin("alice", a, now).unwrap();
        t.refund("alice", a);
        t.begin("alice", a, now).unwrap();
        assert!(t.begin("alice", a, now).is_err());
        t.refund("nobody", a);
    }

    #[test]
    fn other_address_and_other_user_are_unaffected() {
        let t = LoginThrottle::new(3, WINDOW, 100);
        let now = Instant::now();
        for _ in 0..10 {
            let _ = t.begin("alice", ip("10.0.0.1"), now);
        }
        assert!(t.begin("alice", ip("10.0.0.1"), now).is_err());
        assert!(t.begin("alice", ip("10.0.0.2"), now).is_ok());
        assert!(t.begin("alice", ip("2001:db8::1"), now).is_ok());
        assert!(t.begin("bob", ip("10.0.0.1"), now).is_ok());
    }

    #[test]
    fn mapped_ipv6_counts_as_ipv4() {
        let t = LoginThrottle::new(2, WINDOW, 100);
        let now = Instant::now();
        t.begin("alice", ip("10.0.0.1"), now).unwrap();
        t.begin("alice", ip("::ffff:10.0.0.1"), now).unwrap();
        assert!(t.begin("alice", ip("10.0.0.1"), now).is_err());
    }

    #[test]
    fn success_clears() {
        let t = LoginThrottle::new(2, WINDOW, 100);
        let (a, now) = (ip("10.0.0.1"), Instant::now());
        t.begin("alice", a, now).unwrap();
        t.begin("alice", a, now).unwrap();
        assert!(t.begin("alice", a, now).is_err());
        t.record_success("alice", a);
        assert!(t.begin("alice", a, now).is_ok());
    }

    #[test]
    fn attempts_after_the_window_start_a_new_one() {
        let t = LoginThrottle::new(2, WINDOW, 100);
        let (a, t0) = (ip("10.0.0.1"), Instant::now());
        t.begin("alice", a, t0).unwrap();
        t.begin("alice", a, t0 + WINDOW + Duration::from_secs(1))
            .unwrap();
        assert!(t
            .begin("alice", a, t0 + WINDOW + Duration::from_secs(2))
            .is_ok());
        assert!(t
            .begin("alice", a, t0 + WINDOW + Duration::from_secs(3))
            .is_err());
    }

    #[test]
    fn size_is_bounded_evicting_the_oldest() {
        let t = LoginThrottle::new(1, WINDOW, 10);
        let t0 = Instant::now();
        for i in 0..50u32 {
            let addr = IpAddr::from([10, 0, 0, i as u8]);
            t.begin("alice", addr, t0 + Duration::from_millis(u64::from(i)))
                .unwrap();
            assert!(t.len() <= 10);
        }
        let now = t0 + Duration::from_secs(1);
        assert!(
            t.begin("alice", IpAddr::from([10, 0, 0, 0]), now).is_ok(),
            "evicted"
        );
        assert!(
            t.begin("alice", IpAddr::from([10, 0, 0, 49]), now).is_err(),
            "kept"
        );
    }

    #[test]
    fn expired_entries_are_dropped_before_evicting() {
        let t = LoginThrottle::new(1, WINDOW, 2);
        let t0 = Instant::now();
        t.begin("old", ip("10.0.0.1"), t0).unwrap();
        t.begin("young", ip("10.0.0.1"), t0 + WINDOW).unwrap();
        t.begin("new", ip("10.0.0.1"), t0 + WINDOW + Duration::from_secs(1))
            .unwrap();
        assert_eq!(t.len(), 2);
        assert!(t
            .begin(
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
        t.begin("alice", ip("10.0.0.1"), now).unwrap();
        assert!(t.begin("alice", ip("10.0.0.1"), now).is_err());
    }

    #[test]
    fn long_usernames_are_cut() {
        let t = LoginThrottle::new(1, WINDOW, 10);
        let now = Instant::now();
        t.begin(&"x".repeat(100_000), ip("10.0.0.1"), now).unwrap();
        assert!(t.begin(&"x".repeat(200), ip("10.0.0.1"), now).is_err());
    }
}
