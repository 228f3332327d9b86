//! Per-tenant limits, so one noisy tenant cannot starve the others: a request rate (GCRA,
//! `governor`, keyed by tenant) and a cap on requests in flight, both from the tenant's plan
//! (`[router.plans.NAME]`; a plan the router does not know gets `router.default_plan`).
//! Over either limit the request gets 429 `rate_limited` with `Retry-After`, before its
//! body is read or a connection is taken.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use silo_control_plane::config::{PlanLimits, RouterConfig};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::errors::RouterError;

/// How often rate-limiter state of quiet tenants is dropped.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(60);
/// `Retry-After` for a tenant at its in-flight cap.
const IN_FLIGHT_RETRY_SECS: u64 = 1;

type KeyedLimiter = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

/// One plan's limiters.
struct Plan {
    rate: KeyedLimiter,
    max_in_flight: u32,
}

/// The per-tenant limits of one router.
pub(crate) struct Limits {
    plans: BTreeMap<String, Plan>,
    default_plan: String,
    clock: DefaultClock,
    /// Tenant → its in-flight slots; entries nobody holds are dropped by [`Limits::upkeep`].
    in_flight: DashMap<String, Arc<Semaphore>>,
}

/// A request's slot among its tenant's requests in flight; freed on drop.
pub(crate) struct InFlight {
    _permit: OwnedSemaphorePermit,
}

impl Limits {
    /// Limits from `[router]` (`plans`, `default_plan`; the config guarantees the default
    /// plan exists and every value is at least 1).
    pub(crate) fn from_config(config: &RouterConfig) -> Self {
        let plans = config
            .plans
            .iter()
            .map(|(name, limits)| (name.clone(), Plan::new(limits)))
            .collect();
        Self {
            plans,
            default_plan: config.default_plan.clone(),
            clock: DefaultClock::default(),
            in_flight: DashMap::new(),
        }
    }

    fn plan(&self, name: &str) -> Option<&Plan> {
        self.plans.get(name).or_else(|| self.plans.get(&self.default_plan))
    }

    /// Counts one request of `tenant` (on `plan`) against its rate.
    pub(crate) fn check_rate(&self, tenant: &str, plan: &str) -> Result<(), RouterError> {
        let Some(plan) = self.plan(plan) else {
            return Ok(());
        };
        plan.rate.check_key(&tenant.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            RouterError::RateLimited {
                retry_after_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            }
        })
    }

    /// Takes one of `tenant`'s in-flight slots, or refuses when all are taken.
    pub(crate) fn enter(&self, tenant: &str, plan: &str) -> Result<InFlight, RouterError> {
        let Some(plan) = self.plan(plan) else {
            return Err(RouterError::TenantUnavailable);
        };
        let permits = plan.max_in_flight as usize;
        let slots = match self.in_flight.get(tenant) {
            Some(slots) => slots.clone(),
            None => self
                .in_flight
                .entry(tenant.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(permits)))
                .clone(),
        };
        match slots.try_acquire_owned() {
            Ok(permit) => Ok(InFlight { _permit: permit }),
            Err(_) => Err(RouterError::RateLimited {
                retry_after_secs: IN_FLIGHT_RETRY_SECS,
            }),
        }
    }

    /// Drops the state of quiet tenants every minute until `shutdown`.
    pub(crate) async fn upkeep(&self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {
                    for plan in self.plans.values() {
                        plan.rate.retain_recent();
                        plan.rate.shrink_to_fit();
                    }
                    // Under the shard lock nobody can clone an entry: one held only by the
                    // map has no request in flight.
                    self.in_flight.retain(|_, slots| Arc::strong_count(slots) > 1);
                }
            }
        }
    }
}

impl Plan {
    fn new(limits: &PlanLimits) -> Self {
        let one = NonZeroU32::MIN;
        let rate = NonZeroU32::new(limits.requests_per_second).unwrap_or(one);
        let burst = NonZeroU32::new(limits.burst).unwrap_or(one);
        Self {
            rate: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            max_in_flight: limits.max_in_flight.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rps: u32, burst: u32, max_in_flight: u32) -> Limits {
        let toml = format!(
            "catalog_url = \"postgres://u@h:1/c\"\n[secrets]\nlocal_master_key_file = \"k\"\n\
             [router.plans.tiny]\nrequests_per_second = {rps}\nburst = {burst}\nmax_in_flight = {max_in_flight}\n"
        );
        let config = silo_control_plane::config::Config::parse(&toml, std::path::Path::new(".")).unwrap();
        Limits::from_config(&config.router)
    }

    #[test]
    fn rate_is_per_tenant_with_retry_after() {
        let limits = limits(1, 2, 10);
        assert!(limits.check_rate("a", "tiny").is_ok());
        assert!(limits.check_rate("a", "tiny").is_ok());
        match limits.check_rate("a", "tiny") {
            Err(RouterError::RateLimited { retry_after_secs }) => assert_eq!(retry_after_secs, 1),
            other => panic!("{other:?}"),
        }
        assert!(limits.check_rate("b", "tiny").is_ok(), "another tenant is not affected");
        // Unknown plans get the default plan (standard: 1000 rps, burst 2000).
        assert!((0..1500).all(|_| limits.check_rate("c", "gold").is_ok()));
    }

    #[test]
    fn in_flight_is_capped_per_tenant() {
        let limits = limits(100, 100, 2);
        let one = limits.enter("a", "tiny").unwrap();
        let _two = limits.enter("a", "tiny").unwrap();
        assert!(matches!(
            limits.enter("a", "tiny"),
            Err(RouterError::RateLimited { .. })
        ));
        assert!(limits.enter("b", "tiny").is_ok());
        drop(one);
        assert!(limits.enter("a", "tiny").is_ok());
    }
}
