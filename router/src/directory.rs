//! The tenant directory: [`TenantKey`] → the tenant's [`TenantRoute`] (slug, status, server).
//!
//! A moka cache in front of the catalog's read model. Known tenants are cached for
//! `router.tenant_cache_ttl`, unknown keys for [`NEGATIVE_TTL`] (so a flood of made-up hosts
//! costs one catalog query per host, not one per request); concurrent misses share one
//! query. The catalog pushes changes: a LISTEN task drops the cache on every tenant event
//! (and lets go of that tenant's pool), and drops it entirely whenever it had to reconnect,
//! since events may have been missed meanwhile.
//!
//! When the catalog cannot be reached, a key that was found before keeps its last known route
//! (tenants keep being served through a catalog outage); an unknown key is "unavailable".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use moka::future::Cache;
use moka::Expiry;
use silo_control_plane::catalog::routes::{self, TenantRoute, TenantStatus};
use silo_control_plane::catalog::TENANT_EVENTS_CHANNEL;
use silo_control_plane::names::TenantSlug;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::ops::{Health, Metrics};
use crate::pools::{Drain, Pools};
use crate::resolve::TenantKey;

/// How long "no such tenant" is believed (tenant creation also invalidates it at once).
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// How long a last known route served during a catalog outage is used before the catalog is
/// tried again for that key.
const STALE_TTL: Duration = Duration::from_secs(5);
/// A catalog lookup slower than this counts as a failure (so requests fall back quickly).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound on cached keys (each negative entry is a host someone sent).
const MAX_CACHED_KEYS: u64 = 100_000;
/// Waits between attempts to re-establish the LISTEN connection.
const LISTEN_BACKOFF_MIN: Duration = Duration::from_millis(250);
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The catalog could not be asked and nothing is known about the key.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the catalog is unreachable and the tenant is not known")]
pub(crate) struct CatalogUnavailable;

/// Why a catalog lookup failed.
#[derive(Debug, thiserror::Error)]
enum LookupError {
    #[error("catalog lookup: {0}")]
    Database(#[from] sqlx::Error),
    #[error("catalog lookup timed out after {LOOKUP_TIMEOUT:?}")]
    Timeout,
}

/// A cached answer: the route (`None`: no such tenant), and whether it is a last known route
/// kept through a catalog failure.
#[derive(Clone)]
struct Cached {
    route: Option<TenantRoute>,
    stale: bool,
}

/// Active tenants' routes live for the configured TTL; everything else briefly.
struct CachedExpiry {
    positive: Duration,
}

impl CachedExpiry {
    fn ttl(&self, value: &Cached) -> Duration {
        match value {
            Cached { stale: true, .. } => STALE_TTL,
            Cached { route: None, .. } => NEGATIVE_TTL,
            Cached { route: Some(route), .. } if route.status == TenantStatus::Active => self.positive,
            // Provisioning, suspended, deleted...: events announce every change, but an
            // answer that is not "serve" is not worth keeping long if one were missed.
            Cached { route: Some(_), .. } => self.positive.min(NEGATIVE_TTL),
        }
    }
}

impl Expiry<TenantKey, Cached> for CachedExpiry {
    fn expire_after_create(&self, _key: &TenantKey, value: &Cached, _created_at: Instant) -> Option<Duration> {
        Some(self.ttl(value))
    }

    fn expire_after_update(
        &self,
        _key: &TenantKey,
        value: &Cached,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.ttl(value))
    }
}

/// Tenant routes by key, cached, with catalog-outage fallback.
pub(crate) struct Directory {
    catalog: PgPool,
    cache: Cache<TenantKey, Cached>,
    /// The last route the catalog returned for each key that exists: the outage fallback.
    /// Bounded by the number of tenants and their domains (misses are never stored).
    last_known: DashMap<TenantKey, TenantRoute>,
    /// Bumped on every invalidation, so a lookup that raced with one does not leave the
    /// route it read (possibly from before the change) in the cache.
    generation: AtomicU64,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

impl Directory {
    /// A directory over the catalog pool; positive entries live `ttl`.
    pub(crate) fn new(catalog: PgPool, ttl: Duration, health: Arc<Health>, metrics: Arc<Metrics>) -> Self {
        let cache = Cache::builder()
            .name("silo-router-directory")
            .max_capacity(MAX_CACHED_KEYS)
            .expire_after(CachedExpiry { positive: ttl })
            .build();
        Self {
            catalog,
            cache,
            last_known: DashMap::new(),
            generation: AtomicU64::new(0),
            health,
            metrics,
        }
    }

    /// The route of the tenant under `key` (`None`: no such tenant).
    pub(crate) async fn lookup(&self, key: &TenantKey) -> Result<Option<TenantRoute>, CatalogUnavailable> {
        let generation = self.generation.load(Ordering::Acquire);
        let result = self
            .cache
            .entry_by_ref(key)
            .or_try_insert_with(async { self.fetch(key).await.map(|route| Cached { route, stale: false }) })
            .await;
        let entry = match result {
            Ok(entry) => entry,
            Err(error) => return self.fall_back(key, &error).await,
        };
        let fresh = entry.is_fresh();
        let Cached { route, stale } = entry.into_value();
        let outcome = match (fresh, stale, &route) {
            (true, _, _) => "miss",
            (false, true, _) => "stale",
            (false, false, Some(_)) => "hit",
            (false, false, None) => "negative",
        };
        self.metrics.directory_lookup(outcome);
        if fresh && self.generation.load(Ordering::Acquire) != generation {
            // Invalidated while we were reading: what we read may predate the change. Serve
            // it this once (it was true a moment ago) but do not keep it.
            self.cache.invalidate(key).await;
        }
        Ok(route)
    }

    /// Reads `key` from the catalog, remembering what exists for outages.
    async fn fetch(&self, key: &TenantKey) -> Result<Option<TenantRoute>, LookupError> {
        let query = async {
            match key {
                TenantKey::Slug(slug) => routes::by_slug(&self.catalog, slug.as_str()).await,
                TenantKey::Domain(domain) => routes::by_domain(&self.catalog, domain).await,
            }
        };
        let route = tokio::time::timeout(LOOKUP_TIMEOUT, query)
            .await
            .map_err(|_| LookupError::Timeout)??;
        self.health.catalog_answered();
        match &route {
            Some(route) => {
                self.last_known.insert(key.clone(), route.clone());
            }
            None => {
                self.last_known.remove(key);
            }
        }
        Ok(route)
    }

    /// The catalog failed: serve the last known route (and keep it briefly, so each request
    /// does not wait for the catalog again), or report the tenant unavailable.
    async fn fall_back(&self, key: &TenantKey, error: &LookupError) -> Result<Option<TenantRoute>, CatalogUnavailable> {
        let last = self.last_known.get(key).map(|route| route.value().clone());
        match last {
            Some(route) => {
                self.metrics.directory_lookup("stale");
                tracing::warn!(%error, tenant = %route.slug, "catalog lookup failed; serving the last known route");
                self.cache
                    .insert(
                        key.clone(),
                        Cached {
                            route: Some(route.clone()),
                            stale: true,
                        },
                    )
                    .await;
                Ok(Some(route))
            }
            None => {
                self.metrics.directory_lookup("error");
                tracing::warn!(%error, "catalog lookup failed for a key never seen before");
                Err(CatalogUnavailable)
            }
        }
    }

    /// Forgets every cached answer (tenant changes are rare; one dropped cache is cheap).
    pub(crate) fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
    }

    /// Applies one catalog event: the tenant `payload` changed.
    async fn on_tenant_event(&self, payload: &str, pools: &Pools) {
        self.invalidate_all();
        let Ok(slug) = TenantSlug::parse(payload) else {
            tracing::warn!(payload, "ignoring a tenant event whose payload is not a slug");
            return;
        };
        // The status is read past the cache: caching it here could pin a transitional status
        // (say `provisioning`) that the next event, already on its way, will change.
        match self.fetch(&TenantKey::Slug(slug.clone())).await {
            // Still served: its credentials may have changed (rotation).
            Ok(Some(route)) if route.status == TenantStatus::Active => pools.refresh(slug.as_str()).await,
            // No longer served (suspended, deleted...): close its pool at once, which also
            // frees the database for DROP.
            Ok(_) => pools.evict(slug.as_str(), Drain::Now).await,
            Err(error) => {
                tracing::warn!(%error, tenant = %slug, "cannot read the changed tenant; refreshing its pool");
                pools.refresh(slug.as_str()).await;
            }
        }
        tracing::debug!(tenant = %slug, "tenant changed");
    }

    /// Listens for tenant events on the catalog until `shutdown`, reconnecting with backoff.
    /// `listen_pool` is a pool of its own (the listener holds its connection for good).
    pub(crate) async fn watch_tenant_events(&self, listen_pool: PgPool, pools: Pools, shutdown: CancellationToken) {
        let mut backoff = LISTEN_BACKOFF_MIN;
        while !shutdown.is_cancelled() {
            let connected = tokio::select! {
                () = shutdown.cancelled() => break,
                connected = listen(&listen_pool) => connected,
            };
            let mut listener = match connected {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "cannot listen for tenant events on the catalog");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
                    continue;
                }
            };
            backoff = LISTEN_BACKOFF_MIN;
            self.health.catalog_answered();
            self.health.set_listening(true);
            // Events sent while we were not listening are lost: start from a clean slate.
            self.invalidate_all();
            tracing::info!(channel = TENANT_EVENTS_CHANNEL, "listening for tenant events");
            loop {
                let received = tokio::select! {
                    () = shutdown.cancelled() => break,
                    received = listener.try_recv() => received,
                };
                match received {
                    Ok(Some(notification)) => self.on_tenant_event(notification.payload(), &pools).await,
                    Ok(None) => {
                        tracing::warn!("lost the tenant-events connection to the catalog; reconnecting");
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "tenant-events listener failed; reconnecting");
                        break;
                    }
                }
            }
            self.health.set_listening(false);
        }
        self.health.set_listening(false);
    }
}

/// A listener on [`TENANT_EVENTS_CHANNEL`]; a lost connection is reported (`Ok(None)`), not
/// silently re-established, so the caller knows to drop its cache.
async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.eager_reconnect(false);
    listener.listen(TENANT_EVENTS_CHANNEL).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(status: TenantStatus) -> TenantRoute {
        TenantRoute {
            slug: "acme".into(),
            status,
            server: "pg-1".into(),
            database: "tenant_acme".into(),
            plan: "standard".into(),
        }
    }

    #[test]
    fn expiry_depends_on_what_is_cached() {
        let expiry = CachedExpiry {
            positive: Duration::from_secs(60),
        };
        let ttl = |route, stale| expiry.ttl(&Cached { route, stale });
        assert_eq!(ttl(Some(route(TenantStatus::Active)), false), Duration::from_secs(60));
        assert_eq!(ttl(Some(route(TenantStatus::Deleted)), false), NEGATIVE_TTL);
        assert_eq!(ttl(Some(route(TenantStatus::Provisioning)), false), NEGATIVE_TTL);
        assert_eq!(ttl(None, false), NEGATIVE_TTL);
        assert_eq!(ttl(Some(route(TenantStatus::Active)), true), STALE_TTL);
    }
}
