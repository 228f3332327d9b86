//! The pool map: tenant slug → an sqlx pool on that tenant's own database.
//!
//! A moka cache with a capacity, `time_to_idle = router.pool_idle_timeout`, and an eviction
//! listener that closes evicted pools and counts evictions by cause. Concurrent first
//! requests for a tenant share one build (`try_get_with`). A build reads the tenant's
//! current secret from the secret store and connects eagerly, so a database that is down
//! fails the request within `router.connect_timeout` instead of when the app first queries.
//! When a served tenant changes (credential rotation), its open pool switches to the new
//! secret in place; when it stops being served (suspend, delete), its pool is closed.
//!
//! Connect options carry the tenant's password: they are built on one line and never logged.

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use moka::notification::RemovalCause;
use silo_control_plane::config::Config;
use silo_control_plane::names::TenantSlug;
use silo_control_plane::secrets::{tenant_secret_name, DbSecret, SecretStore, SecretStoreError, AWSCURRENT};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::ops::Metrics;
use crate::server::APPLICATION_NAME;

/// At most this many tenant pools are open at once (least valuable evicted first).
const MAX_POOLS: u64 = 10_000;
/// A pool replaced while requests may still be using it stays open this long.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// How often expired pools are swept when there is no traffic to do it.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Why a tenant pool could not be built. Every variant means "tenant unavailable" to the
/// client; the detail is for the log.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    /// The catalog holds a slug that does not validate (never expected).
    #[error("tenant {0:?} in the catalog is not a valid slug")]
    BadSlug(String),
    /// The tenant has no current secret.
    #[error("secret {0:?} has no AWSCURRENT version")]
    SecretMissing(String),
    /// The secret store failed or the secret is malformed.
    #[error("read the tenant secret: {0}")]
    Secret(#[from] SecretStoreError),
    /// The tenant database refused or failed the connection.
    #[error("connect to the tenant database: {0}")]
    Connect(#[source] sqlx::Error),
    /// Reading the secret and connecting took longer than `router.connect_timeout`.
    #[error("connect to the tenant database: no answer within {0:?}")]
    Timeout(Duration),
}

/// How an evicted pool is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drain {
    /// Close now: the tenant must not be served any more.
    Now,
    /// Let requests that already hold the pool finish first.
    Graceful,
}

/// The `[router]` settings a pool is built with.
#[derive(Debug, Clone)]
pub(crate) struct PoolSettings {
    /// `router.max_connections_per_tenant`.
    pub(crate) max_connections: u32,
    /// `router.pool_idle_timeout`: for the pool map and for each pool's connections.
    pub(crate) idle_timeout: Duration,
    /// `router.connect_timeout`: secret read + first connection.
    pub(crate) connect_timeout: Duration,
    /// `secrets.name_prefix`.
    pub(crate) secret_prefix: String,
}

impl PoolSettings {
    /// The settings from a silo config.
    pub(crate) fn from_config(config: &Config) -> Self {
        Self {
            max_connections: config.router.max_connections_per_tenant,
            idle_timeout: config.router.pool_idle_timeout,
            connect_timeout: config.router.connect_timeout,
            secret_prefix: config.secrets.name_prefix.clone(),
        }
    }
}

/// The tenant pool map; clones share it.
#[derive(Clone)]
pub(crate) struct Pools {
    inner: Arc<Inner>,
}

struct Inner {
    cache: Cache<String, PgPool>,
    secrets: Arc<dyn SecretStore>,
    settings: PoolSettings,
    closer: Closer,
    metrics: Arc<Metrics>,
}

/// Closes evicted pools in the background; [`Pools::close_all`] waits for it.
#[derive(Clone)]
struct Closer {
    runtime: Handle,
    tasks: TaskTracker,
    /// Cancelled at shutdown: drains are cut short.
    stopping: CancellationToken,
}

impl Closer {
    fn close(&self, pool: PgPool, drain: Drain) {
        let stopping = self.stopping.clone();
        let task = async move {
            if drain == Drain::Graceful {
                tokio::select! {
                    () = tokio::time::sleep(DRAIN_GRACE) => {}
                    () = stopping.cancelled() => {}
                }
            }
            pool.close().await;
        };
        self.tasks.spawn_on(task, &self.runtime);
    }
}

impl Pools {
    /// An empty pool map. Call inside the tokio runtime that will close the pools.
    pub(crate) fn new(secrets: Arc<dyn SecretStore>, settings: PoolSettings, metrics: Arc<Metrics>) -> Self {
        let closer = Closer {
            runtime: Handle::current(),
            tasks: TaskTracker::new(),
            stopping: CancellationToken::new(),
        };
        let (listener_closer, listener_metrics) = (closer.clone(), metrics.clone());
        let cache = Cache::builder()
            .name("silo-router-pools")
            .max_capacity(MAX_POOLS)
            .time_to_idle(settings.idle_timeout)
            .eviction_listener(move |_slug: Arc<String>, pool: PgPool, cause: RemovalCause| {
                on_evicted(&listener_closer, &listener_metrics, pool, cause);
            })
            .build();
        Self {
            inner: Arc::new(Inner {
                cache,
                secrets,
                settings,
                closer,
                metrics,
            }),
        }
    }

    /// The pool of tenant `slug`, built on first use; concurrent callers share one build.
    pub(crate) async fn get(&self, slug: &str) -> Result<PgPool, Arc<PoolError>> {
        self.inner.cache.try_get_with_by_ref(slug, self.build(slug)).await
    }

    /// Reads the tenant's current secret and connects, all within `connect_timeout`.
    async fn build(&self, slug: &str) -> Result<PgPool, PoolError> {
        let timeout = self.inner.settings.connect_timeout;
        let span = tracing::info_span!("build_pool", tenant = %slug);
        let pool = tokio::time::timeout(timeout, self.connect(slug))
            .instrument(span)
            .await
            .map_err(|_| PoolError::Timeout(timeout))??;
        self.inner.metrics.pool_opened();
        tracing::debug!(tenant = %slug, "tenant pool opened");
        Ok(pool)
    }

    async fn connect(&self, slug: &str) -> Result<PgPool, PoolError> {
        let settings = &self.inner.settings;
        let options = self.current_options(slug).await?;
        PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .min_connections(0)
            // A ping per checkout costs ~20 % of throughput (NOTES.md); a broken connection
            // surfaces as a query error and is dropped by sqlx anyway.
            .test_before_acquire(false)
            .acquire_timeout(settings.connect_timeout)
            .idle_timeout(settings.idle_timeout)
            .connect_with(options)
            .await
            .map_err(PoolError::Connect)
    }

    /// Connect options from the tenant's `AWSCURRENT` secret. They hold the password: never
    /// log them.
    async fn current_options(&self, slug: &str) -> Result<PgConnectOptions, PoolError> {
        let slug = TenantSlug::parse(slug).map_err(|_| PoolError::BadSlug(slug.to_owned()))?;
        let name = tenant_secret_name(&self.inner.settings.secret_prefix, &slug);
        let version = self
            .inner
            .secrets
            .get_secret_value(&name, AWSCURRENT)
            .await?
            .ok_or_else(|| PoolError::SecretMissing(name.clone()))?;
        let secret = DbSecret::from_secret(&version.value, &name)?;
        Ok(secret.connect_options().application_name(APPLICATION_NAME))
    }

    /// Tenant `slug` changed but may still be served: point its open pool (if any) at the
    /// current secret. New connections log in with it; open ones stay (PostgreSQL does not
    /// re-authenticate sessions), so no request fails and the pool stays warm, which also
    /// means it rarely needs a new login while a rotation is half done. A pool whose
    /// database moved is drained and rebuilt instead.
    pub(crate) async fn refresh(&self, slug: &str) {
        let Some(pool) = self.inner.cache.get(slug).await else {
            return;
        };
        let timeout = self.inner.settings.connect_timeout;
        let current = tokio::time::timeout(timeout, self.current_options(slug))
            .await
            .unwrap_or(Err(PoolError::Timeout(timeout)));
        match current {
            Ok(options) if same_database(&pool.connect_options(), &options) => {
                pool.set_connect_options(options);
                tracing::debug!(tenant = %slug, "tenant pool credentials refreshed");
            }
            Ok(_) => {
                tracing::info!(tenant = %slug, "tenant database moved; rebuilding its pool");
                self.evict(slug, Drain::Graceful).await;
            }
            Err(error) => {
                tracing::warn!(%error, tenant = %slug, "cannot refresh the tenant's credentials; rebuilding its pool");
                self.evict(slug, Drain::Graceful).await;
            }
        }
    }

    /// Removes tenant `slug`'s pool (if open) and closes it as `drain` says.
    pub(crate) async fn evict(&self, slug: &str, drain: Drain) {
        if let Some(pool) = self.inner.cache.remove(slug).await {
            self.inner.closer.close(pool, drain);
        }
    }

    /// Sweeps expired pools every second until `shutdown`, so an idle tenant's connections
    /// are closed even when no request touches the map.
    pub(crate) async fn sweep(&self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => self.inner.cache.run_pending_tasks().await,
            }
        }
    }

    /// Closes every pool, including those still draining, and waits for them (shutdown).
    pub(crate) async fn close_all(&self) {
        let closer = &self.inner.closer;
        closer.stopping.cancel();
        let open: Vec<PgPool> = self.inner.cache.iter().map(|(_, pool)| pool).collect();
        self.inner.cache.invalidate_all();
        self.inner.cache.run_pending_tasks().await;
        for pool in open {
            closer.close(pool, Drain::Now);
        }
        closer.tasks.close();
        closer.tasks.wait().await;
    }
}

/// Whether two connect options reach the same database (credentials aside).
fn same_database(a: &PgConnectOptions, b: &PgConnectOptions) -> bool {
    a.get_host() == b.get_host() && a.get_port() == b.get_port() && a.get_database() == b.get_database()
}

/// The eviction listener: counts, and closes what expired or was pushed out. Explicit
/// removals are closed by whoever removed them ([`Pools::evict`], [`Pools::close_all`]),
/// since only they know whether to drain.
fn on_evicted(closer: &Closer, metrics: &Metrics, pool: PgPool, cause: RemovalCause) {
    let label = match cause {
        RemovalCause::Expired => "idle",
        RemovalCause::Size => "capacity",
        RemovalCause::Explicit => "explicit",
        RemovalCause::Replaced => "replaced",
    };
    metrics.pool_evicted(label);
    match cause {
        // Unused for the idle timeout: nothing to wait for.
        RemovalCause::Expired => closer.close(pool, Drain::Now),
        RemovalCause::Size | RemovalCause::Replaced => closer.close(pool, Drain::Graceful),
        RemovalCause::Explicit => {}
    }
}
