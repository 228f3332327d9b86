//! What a tenant's pool is worth keeping when the connection budget needs room.
//!
//! A pool's value is its tenant's recent request count, each request counting half as much
//! every [`HALF_LIFE`] later. Closing the least valuable idle pool keeps the pools of the
//! tenants that come back most often: under skewed traffic (a few busy tenants, a long tail)
//! the least recently used pool is often a busy tenant's between two bursts, while a tenant
//! seen once a minute ago is worth less. Among tenants with as many requests the one seen
//! longest ago is worth least, as with least recently used.
//!
//! A tenant's value outlives its pool: [`UsageHistory`] keeps what closed pools were worth,
//! so a tenant that comes back after its pool was closed to make room does not start again
//! from one request, to be the next one closed.

use std::collections::HashMap;
use std::time::Duration;

/// Time after which a request counts half as much.
pub(crate) const HALF_LIFE: Duration = Duration::from_secs(30);

/// Closed pools' values remembered at most (tenants); beyond it, new ones are not kept.
const HISTORY_LIMIT: usize = 10_000;

/// A remembered value below this (a single request ~3.3 half-lives ago) is forgotten when the
/// history is full.
const FORGET_BELOW: f64 = 0.1;

/// A tenant's decayed request count as of its last request. Times are milliseconds since an
/// epoch the caller chooses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Usage {
    /// When the tenant last made a request.
    last_used: u64,
    /// The decayed request count at `last_used`.
    count: f64,
}

impl Usage {
    /// No requests yet, at `now`.
    pub(crate) fn new(now: u64) -> Usage {
        Usage {
            last_used: now,
            count: 0.0,
        }
    }

    /// Counts a request at `now`.
    pub(crate) fn record(&mut self, now: u64) {
        self.count = self.value_at(now) + 1.0;
        self.last_used = self.last_used.max(now);
    }

    /// The value at `now`: the count decayed since the last request.
    pub(crate) fn value_at(&self, now: u64) -> f64 {
        let elapsed = now.saturating_sub(self.last_used) as f64;
        self.count * (-elapsed / HALF_LIFE.as_millis() as f64).exp2()
    }
}

/// What the pools closed to make room were worth, by tenant slug.
#[derive(Debug, Default)]
pub(crate) struct UsageHistory {
    closed: HashMap<String, Usage>,
}

impl UsageHistory {
    /// Remembers what tenant `slug`'s closed pool was worth.
    pub(crate) fn remember(&mut self, slug: &str, usage: Usage, now: u64) {
        if self.closed.len() >= HISTORY_LIMIT && !self.closed.contains_key(slug) {
            self.closed.retain(|_, usage| usage.value_at(now) >= FORGET_BELOW);
            if self.closed.len() >= HISTORY_LIMIT {
                return;
            }
        }
        self.closed.insert(slug.to_owned(), usage);
    }

    /// The usage a new pool of tenant `slug` starts from: its closed pool's, if remembered.
    pub(crate) fn take(&mut self, slug: &str, now: u64) -> Usage {
        self.closed.remove(slug).unwrap_or_else(|| Usage::new(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = HALF_LIFE.as_millis() as u64;

    #[test]
    fn a_request_counts_half_as_much_one_half_life_later() {
        let mut usage = Usage::new(0);
        assert_eq!(usage.value_at(0), 0.0);
        usage.record(0);
        usage.record(0);
        assert_eq!(usage.value_at(0), 2.0);
        assert!((usage.value_at(H) - 1.0).abs() < 1e-9);
        usage.record(H);
        assert!((usage.value_at(H) - 2.0).abs() < 1e-9);
        assert!((usage.value_at(3 * H) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn frequent_requests_outweigh_a_later_single_one() {
        let mut busy = Usage::new(0);
        for ms in 0..5 {
            busy.record(ms);
        }
        let mut once = Usage::new(1_000);
        once.record(1_000);
        assert!(busy.value_at(2_000) > once.value_at(2_000));
    }

    #[test]
    fn with_as_many_requests_the_later_tenant_is_worth_more() {
        let (mut earlier, mut later) = (Usage::new(0), Usage::new(0));
        earlier.record(0);
        later.record(1);
        assert!(earlier.value_at(10) < later.value_at(10));
    }

    #[test]
    fn a_closed_pools_value_comes_back_with_the_tenant_once() {
        let mut history = UsageHistory::default();
        let mut usage = Usage::new(0);
        usage.record(0);
        usage.record(0);
        history.remember("acme", usage, 0);
        assert_eq!(history.take("acme", H).value_at(H), 1.0);
        assert_eq!(history.take("acme", H), Usage::new(H));
        assert_eq!(history.take("other", H), Usage::new(H));
    }

    #[test]
    fn a_full_history_forgets_what_has_decayed() {
        let mut history = UsageHistory::default();
        let mut old = Usage::new(0);
        old.record(0);
        for n in 0..HISTORY_LIMIT {
            history.remember(&format!("t{n}"), old, 0);
        }
        let now = 10 * H;
        let mut fresh = Usage::new(now);
        fresh.record(now);
        history.remember("fresh", fresh, now);
        assert_eq!(history.closed.len(), 1);
        assert_eq!(history.take("fresh", now), fresh);

        let mut recent = Usage::new(now);
        recent.record(now);
        for n in 0..HISTORY_LIMIT {
            history.remember(&format!("t{n}"), recent, now);
        }
        history.remember("late", recent, now);
        assert_eq!(
            history.closed.len(),
            HISTORY_LIMIT,
            "nothing had decayed: the newcomer is not kept"
        );
        assert_eq!(history.take("late", now), Usage::new(now));
    }
}
