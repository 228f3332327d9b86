//! The tenant directory: [`TenantKey`] → the tenant's [`TenantRoute`] (slug, status, server).
//!
//! A moka cache in front of the catalog's read model, filled ahead of requests: once the
//! router listens for tenant events, it caches the route of every active tenant (by slug and
//! by custom domain), and does so again every half `router.tenant_cache_ttl`, so a tenant's
//! first request does not wait for the catalog and a catalog outage does not stop any tenant
//! that was active before it. Other statuses are cached only by lookups (a `provisioning`
//! read from an event could outlive the creation call that already returned the tenant
//! active). Entries live for the TTL (a safety net should a change ever come without its
//! event); unknown keys for [`NEGATIVE_TTL`] (so a flood of made-up hosts costs one catalog
//! query per host, not one per request); concurrent misses share one query.
//!
//! The catalog pushes changes: an event names one tenant, whose route is read again (and its
//! pool refreshed or let go); only that tenant's entries change, so a fleet-wide rotation does
//! not send every other tenant's requests to the catalog. Whenever the listener had to
//! reconnect, events may have been missed: everything is dropped and loaded again.
//!
//! When the catalog cannot be reached, a key that was found before keeps its last known route
//! (tenants keep being served through a catalog outage); an unknown key is "unavailable".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use moka::future::Cache;
use moka::Expiry;
use silo_control_plane::catalog::routes::{self, TenantRoute};
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
/// Loading every route slower than this counts as a failure (tried again at the next load).
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Routes are not loaded again more often than this, however short the TTL.
const MIN_RELOAD_EVERY: Duration = Duration::from_secs(1);
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
    #[error("the catalog did not answer within {0:?}")]
    Timeout(Duration),
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
            Cached { route: Some(route), .. } if route.is_served() => self.positive,
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
    /// Slug keys: one per tenant.
    slugs: Cache<TenantKey, Cached>,
    /// Custom-domain keys, apart: an event drops the ones that may have moved to or from its
    /// tenant, which means looking at each (there are far fewer than slugs).
    domains: Cache<TenantKey, Cached>,
    positive_ttl: Duration,
    /// The last route the catalog returned for each key that exists: the outage fallback.
    /// Bounded by the number of tenants and their domains (misses are never stored).
    last_known: DashMap<TenantKey, TenantRoute>,
    /// Bumped on every change applied, so a lookup that raced with one does not leave the
    /// route it read (possibly from before the change) in the cache.
    generation: AtomicU64,
    /// Held while an event or a load is applied: a load that read the catalog before a
    /// change cannot write over what that change's event wrote.
    applying: tokio::sync::Mutex<()>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

impl Directory {
    /// A directory over the catalog pool; positive entries live `ttl`.
    pub(crate) fn new(catalog: PgPool, ttl: Duration, health: Arc<Health>, metrics: Arc<Metrics>) -> Self {
        let cache = |name: &str| {
            Cache::builder()
                .name(name)
                .max_capacity(MAX_CACHED_KEYS)
                .expire_after(CachedExpiry { positive: ttl })
                .build()
        };
        Self {
            catalog,
            slugs: cache("silo-router-directory-slugs"),
            domains: cache("silo-router-directory-domains"),
            positive_ttl: ttl,
            last_known: DashMap::new(),
            generation: AtomicU64::new(0),
            applying: tokio::sync::Mutex::new(()),
            health,
            metrics,
        }
    }

    fn cache(&self, key: &TenantKey) -> &Cache<TenantKey, Cached> {
        match key {
            TenantKey::Slug(_) => &self.slugs,
            TenantKey::Domain(_) => &self.domains,
        }
    }

    /// The route of the tenant under `key` (`None`: no such tenant).
    pub(crate) async fn lookup(&self, key: &TenantKey) -> Result<Option<TenantRoute>, CatalogUnavailable> {
        let generation = self.generation.load(Ordering::Acquire);
        let result = self
            .cache(key)
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
            self.cache(key).invalidate(key).await;
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
            .map_err(|_| LookupError::Timeout(LOOKUP_TIMEOUT))??;
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
                self.cache(key)
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

    /// Forgets every cached answer.
    fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.slugs.invalidate_all();
        self.domains.invalidate_all();
    }

    /// Reads every tenant's route from the catalog: caches the active ones under their slug
    /// and custom domains, and keeps all of them for catalog outages. Returns how many.
    async fn load_all(&self) -> Result<usize, LookupError> {
        let _applying = self.applying.lock().await;
        let routes = tokio::time::timeout(LOAD_TIMEOUT, routes::all(&self.catalog))
            .await
            .map_err(|_| LookupError::Timeout(LOAD_TIMEOUT))??;
        self.health.catalog_answered();
        self.generation.fetch_add(1, Ordering::AcqRel);
        let count = routes.len();
        for (route, domains) in routes {
            let Ok(slug) = TenantSlug::parse(&route.slug) else {
                tracing::warn!(
                    tenant = route.slug,
                    "the catalog has a tenant whose slug is not valid; not loaded"
                );
                continue;
            };
            for domain in domains {
                self.remember(TenantKey::Domain(domain), route.clone()).await;
            }
            self.remember(TenantKey::Slug(slug), route).await;
        }
        Ok(count)
    }

    /// Keeps `route` for catalog outages under `key`, and caches it if it is served. Other
    /// statuses are left to lookups: one may be a passing one (`provisioning`) whose successor
    /// reaches a client before its event reaches this router.
    async fn remember(&self, key: TenantKey, route: TenantRoute) {
        self.last_known.insert(key.clone(), route.clone());
        if !route.is_served() {
            return;
        }
        let cached = Cached {
            route: Some(route),
            stale: false,
        };
        self.cache(&key).insert(key, cached).await;
    }

    /// [`Directory::load_all`], logging the outcome.
    async fn load_all_logged(&self) {
        let started = Instant::now();
        match self.load_all().await {
            Ok(count) => tracing::debug!(tenants = count, elapsed = ?started.elapsed(), "tenant routes loaded"),
            Err(error) => tracing::warn!(%error, "cannot load the tenant routes; tenants are looked up as they come"),
        }
    }

    /// Loads every route again every half TTL until `shutdown`, so entries are renewed before
    /// they expire (no-op with a TTL of zero: nothing is cached then).
    pub(crate) async fn reload_periodically(&self, shutdown: CancellationToken) {
        if self.positive_ttl.is_zero() {
            return;
        }
        let every = (self.positive_ttl / 2).max(MIN_RELOAD_EVERY);
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if self.health.is_listening() {
                self.load_all_logged().await;
            }
        }
    }

    /// Applies one catalog event: the tenant `payload` changed.
    async fn on_tenant_event(&self, payload: &str, pools: &Pools) {
        let Ok(slug) = TenantSlug::parse(payload) else {
            tracing::warn!(
                payload,
                "a tenant event whose payload is not a slug; dropping every cached route"
            );
            self.invalidate_all();
            pools.forget_all_credentials();
            return;
        };
        pools.forget_credentials(slug.as_str()).await;
        let _applying = self.applying.lock().await;
        self.generation.fetch_add(1, Ordering::AcqRel);
        // A custom domain may have moved to or from this tenant (or been unknown until now).
        for (key, cached) in self.domains.iter() {
            if cached.route.as_ref().is_none_or(|route| route.slug == slug.as_str()) {
                self.domains.invalidate(&*key).await;
            }
        }
        let key = TenantKey::Slug(slug.clone());
        match self.fetch(&key).await {
            Ok(Some(route)) if route.is_served() => {
                self.slugs
                    .insert(
                        key,
                        Cached {
                            route: Some(route),
                            stale: false,
                        },
                    )
                    .await;
                // Still served: its credentials may have changed (rotation).
                pools.refresh(slug.as_str()).await;
            }
            Ok(_) => {
                // No longer served (suspended, moving, deleted...): close its pool at once, which
                // also frees the database for DROP. The status is not cached: it may be a
                // passing one (`provisioning`) whose successor reaches a client (the
                // tenant-creation call returning) before its event reaches this router.
                self.slugs.invalidate(&key).await;
                pools.evict(slug.as_str(), Drain::Now).await;
            }
            Err(error) => {
                self.slugs.invalidate(&key).await;
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
            // Events sent while we were not listening are lost: start from a clean slate.
            // Events sent from here on wait in the listener until the load is done.
            self.invalidate_all();
            pools.forget_all_credentials();
            if !self.positive_ttl.is_zero() {
                self.load_all_logged().await;
            }
            self.health.set_listening(true);
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
    use silo_control_plane::catalog::routes::TenantStatus;

    use super::*;

    fn route(status: TenantStatus) -> TenantRoute {
        TenantRoute {
            slug: "acme".into(),
            status,
            server: "pg-1".into(),
            database: "tenant_acme".into(),
            plan: "standard".into(),
            moving: false,
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
        let moving = TenantRoute {
            moving: true,
            ..route(TenantStatus::Active)
        };
        assert_eq!(ttl(Some(moving), false), NEGATIVE_TTL);
        assert_eq!(ttl(None, false), NEGATIVE_TTL);
        assert_eq!(ttl(Some(route(TenantStatus::Active)), true), STALE_TTL);
    }
}
