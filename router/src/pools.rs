//! The pool map: tenant slug → a [`TenantPool`], a [`DbPool`] on that tenant's own database.
//!
//! A moka cache with a capacity, `time_to_idle = router.pool_idle_timeout`, and an eviction
//! listener that closes evicted pools and counts evictions by cause. Concurrent first
//! requests for a tenant share one build (`try_get_with`). Every connection holds a permit
//! of its server's connection budget (`budget`) while it is open. A build first takes one
//! for its first connection (when the budget is spent it closes an idle spare connection of
//! a pool that has two or more, else the least valuable idle pool on that server (see
//! [`crate::usage`]), and waits at most `router.budget_wait`), then takes the tenant's
//! current secret (kept from an earlier read, see [`crate::credentials`]) and connects
//! eagerly, so a database that is down fails the request within `router.connect_timeout`
//! instead of when the app first queries.
//! A pool closed to make room is marked closing only while no request holds it, after which
//! no request can lease it (a request that found it in the map builds a new one).
//! A pool opens further connections (up to `max_connections_per_tenant`) only with permits
//! that are free: it never closes other pools to grow, and a request waiting for one takes the
//! pool's own connection if that comes back first.
//!
//! Credentials: when a served tenant changes (credential rotation event), its open pool
//! switches to the `AWSCURRENT` secret in place; when a request failed because PostgreSQL
//! refused the pool's password (a rotation between `set_secret` and `finish_secret`), the
//! pool switches to the `AWSPENDING` secret if there is one, else re-reads `AWSCURRENT`, and
//! the request is retried. Connections live at most `router.pool_max_lifetime`, so sessions
//! of a retired login role drain. When a tenant stops being served (suspend, delete), its
//! pool is closed.
//!
//! Every new connection checks it is in the tenant's database as one of the tenant's login
//! roles (an isolation self-check); a mismatch is refused and logged as an error.
//!
//! Connections use the TLS settings (`sslmode`, `sslrootcert`) of the tenant's server in the
//! router's `[[servers]]`; a tenant on a server missing from there is not served.
//!
//! Connect options carry the tenant's password: they are built on one line and never logged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::notification::RemovalCause;
use silo_control_plane::catalog::routes::TenantRoute;
use silo_control_plane::config::{Config, ServerTls};
use silo_control_plane::names::TenantNames;
use silo_control_plane::secrets::{SecretStore, SecretStoreError, AWSCURRENT, AWSPENDING};
use silo_tenant_app::{
    AfterConnect, AfterConnectFuture, BudgetPermit, ConnectionBudget, DbPool, DbPoolSettings, TakePermit, TenantContext,
};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection, Row};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::budget::{Budgets, ConnectionPermit};
use crate::credentials::Credentials;
use crate::ops::Metrics;
use crate::usage::{Usage, UsageHistory};

/// At most this many tenant pools are open at once (least valuable evicted first).
const MAX_POOLS: u64 = 10_000;
/// A pool replaced while requests may still be using it stays open this long.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// How often expired pools are swept (and connection gauges sampled) when there is no
/// traffic to do it.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// While waiting for budget, look for a newly idle pool to close this often.
const BUDGET_RETRY: Duration = Duration::from_millis(50);
/// While a pool waits for budget to grow, look for a free permit this often.
const GROWTH_RETRY: Duration = Duration::from_millis(10);
/// `in_flight` of a pool that is being closed: no request can lease it any more.
const CLOSING: usize = usize::MAX / 2;
/// SQLSTATE `invalid_password`.
const INVALID_PASSWORD: &str = "28P01";

/// Why a tenant pool could not be built. Every variant means "tenant unavailable" to the
/// client; the detail is for the log.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    /// The catalog holds a slug that does not validate (never expected).
    #[error("tenant {0:?} in the catalog is not a valid slug")]
    BadSlug(String),
    /// The tenant's server is not among this router's `[[servers]]`, so how to reach it
    /// (its TLS settings) is unknown.
    #[error("server {0:?} is not in the router's config")]
    UnknownServer(String),
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
    /// The server's connection budget stayed spent for `router.budget_wait`.
    #[error("the server's connection budget stayed spent for {0:?}")]
    BudgetExhausted(Duration),
    /// The pool was closed under the request twice in a row (eviction races).
    #[error("the tenant pool was closed while the request took it")]
    Closed,
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
    /// `router.connection_budget_per_server`.
    pub(crate) budget_per_server: u32,
    /// `router.budget_wait`.
    pub(crate) budget_wait: Duration,
    /// `router.pool_idle_timeout`: for the pool map and for each pool's connections.
    pub(crate) idle_timeout: Duration,
    /// `router.pool_max_lifetime`.
    pub(crate) max_lifetime: Duration,
    /// `router.connect_timeout`: secret read + first connection.
    pub(crate) connect_timeout: Duration,
    /// `router.request_timeout`: each session's `statement_timeout` is a second more.
    pub(crate) statement_timeout: Duration,
    /// `secrets.name_prefix`.
    pub(crate) secret_prefix: String,
    /// `[[servers]]` TLS settings by server name.
    pub(crate) server_tls: HashMap<String, ServerTls>,
}

impl PoolSettings {
    /// The settings from a silo config.
    pub(crate) fn from_config(config: &Config) -> Self {
        let router = &config.router;
        Self {
            max_connections: router.max_connections_per_tenant,
            budget_per_server: router.connection_budget_per_server,
            budget_wait: router.budget_wait,
            idle_timeout: router.pool_idle_timeout,
            max_lifetime: router.pool_max_lifetime,
            connect_timeout: router.connect_timeout,
            statement_timeout: router.request_timeout,
            secret_prefix: config.secrets.name_prefix.clone(),
            server_tls: config
                .servers
                .iter()
                .map(|server| (server.name.clone(), server.tls.clone()))
                .collect(),
        }
    }
}

/// One tenant's open pool and what the router knows about it.
pub(crate) struct TenantPool {
    /// The tenant's slug and pool as the app sees them (with its recently verified keys).
    context: TenantContext,
    server: String,
    /// Requests holding a [`PoolLease`]; a pool with none may be closed to make room, and
    /// is then marked [`CLOSING`].
    in_flight: AtomicUsize,
    /// The tenant's recent requests, in milliseconds since the map's epoch: what the pool is
    /// worth keeping when the budget needs room.
    usage: Mutex<Usage>,
    /// Version id of the secret new connections log in with; the lock serialises switches.
    credentials: tokio::sync::Mutex<String>,
    /// When credentials were last verified by logging in (after a refused password).
    verified_at: Mutex<Option<Instant>>,
}

/// A request's hold on its tenant's pool: the pool is not closed to make room while held.
pub(crate) struct PoolLease {
    tenant: Arc<TenantPool>,
}

impl PoolLease {
    /// The tenant context to hand to the app.
    pub(crate) fn context(&self) -> &TenantContext {
        &self.tenant.context
    }

    fn pool(&self) -> &DbPool {
        self.tenant.pool()
    }
}

impl TenantPool {
    fn pool(&self) -> &DbPool {
        &self.context.pool
    }

    fn slug(&self) -> &str {
        &self.context.slug
    }

    /// What keeping the pool is worth at `now` (milliseconds since the map's epoch).
    fn value_at(&self, now: u64) -> f64 {
        lock(&self.usage).value_at(now)
    }

    /// A lease on the pool, unless it is being closed.
    fn lease(self: Arc<Self>) -> Option<PoolLease> {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= CLOSING {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(PoolLease { tenant: self })
    }

    /// Marks the pool closing if no request holds it, so none can lease it from now on: then
    /// it may be closed at once; otherwise its requests must be let finish.
    fn close_if_unused(&self) -> bool {
        self.in_flight
            .compare_exchange(0, CLOSING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

impl Drop for PoolLease {
    fn drop(&mut self) {
        self.tenant.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The tenant pool map; clones share it.
#[derive(Clone)]
pub(crate) struct Pools {
    inner: Arc<Inner>,
}

struct Inner {
    cache: Cache<String, Arc<TenantPool>>,
    credentials: Credentials,
    settings: PoolSettings,
    budgets: Budgets,
    closer: Closer,
    metrics: Arc<Metrics>,
    /// What the pools closed to make room were worth, for their tenants' next pools.
    history: Mutex<UsageHistory>,
    epoch: Instant,
}

/// Closes evicted pools in the background, then returns their budget; [`Pools::close_all`]
/// waits for it.
#[derive(Clone)]
struct Closer {
    runtime: Handle,
    tasks: TaskTracker,
    /// Cancelled at shutdown: drains are cut short.
    stopping: CancellationToken,
}

impl Closer {
    fn close(&self, tenant: Arc<TenantPool>, drain: Drain) {
        let stopping = self.stopping.clone();
        let task = async move {
            if drain == Drain::Graceful {
                tokio::select! {
                    () = tokio::time::sleep(DRAIN_GRACE) => {}
                    () = stopping.cancelled() => {}
                }
            }
            // Waits for checked-out connections and closes them all (each gives its budget
            // permit back as it closes).
            tenant.pool().close_and_wait().await;
        };
        self.tasks.spawn_on(task, &self.runtime);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
            .eviction_listener(
                move |_slug: Arc<String>, tenant: Arc<TenantPool>, cause: RemovalCause| {
                    on_evicted(&listener_closer, &listener_metrics, tenant, cause);
                },
            )
            .build();
        Self {
            inner: Arc::new(Inner {
                cache,
                credentials: Credentials::new(
                    secrets,
                    settings.secret_prefix.clone(),
                    settings.server_tls.clone(),
                    settings.statement_timeout,
                    metrics.clone(),
                ),
                budgets: Budgets::new(settings.budget_per_server, metrics.clone()),
                settings,
                closer,
                metrics,
                history: Mutex::new(UsageHistory::default()),
                epoch: Instant::now(),
            }),
        }
    }

    /// A lease on the pool of tenant `route`, built on first use; concurrent callers share
    /// one build.
    pub(crate) async fn get(&self, route: &TenantRoute) -> Result<PoolLease, Arc<PoolError>> {
        for _ in 0..2 {
            // A build counts the request that made it (see `build`); a hit is counted here.
            let (tenant, hit) = match self.inner.cache.get(route.slug.as_str()).await {
                Some(tenant) => {
                    self.inner.metrics.pool_lookup("hit");
                    (tenant, true)
                }
                None => {
                    self.inner.metrics.pool_lookup("miss");
                    let built = self
                        .inner
                        .cache
                        .try_get_with_by_ref(route.slug.as_str(), self.build(route))
                        .await?;
                    (built, false)
                }
            };
            // Closed to make room between the lookup and the lease (it has left the map by
            // then): build a new one.
            let Some(lease) = tenant.lease() else {
                continue;
            };
            if hit {
                lock(&lease.tenant.usage).record(self.now_millis());
            }
            if !lease.pool().is_closed() {
                return Ok(lease);
            }
        }
        Err(Arc::new(PoolError::Closed))
    }

    fn now_millis(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A new pool's usage: what the tenant's last pool was worth, if it was closed to make
    /// room, and the request building this one. Counted at once, so that the new pool is
    /// not the least valuable one before its request leases it.
    fn first_usage(&self, slug: &str) -> Usage {
        let now = self.now_millis();
        let mut usage = lock(&self.inner.history).take(slug, now);
        usage.record(now);
        usage
    }

    /// Reserves budget, then reads the tenant's current secret and connects within
    /// `connect_timeout`.
    async fn build(&self, route: &TenantRoute) -> Result<Arc<TenantPool>, PoolError> {
        let span = tracing::info_span!("build_pool", tenant = %route.slug);
        async {
            let started = Instant::now();
            let permit = self.make_room(&route.server).await?;
            self.inner.metrics.pool_build_step("budget", started.elapsed());
            let timeout = self.inner.settings.connect_timeout;
            let (pool, version) = tokio::time::timeout(timeout, self.connect(route, permit))
                .await
                .map_err(|_| PoolError::Timeout(timeout))??;
            self.inner.metrics.pool_opened();
            tracing::debug!("tenant pool opened");
            Ok(Arc::new(TenantPool {
                context: TenantContext::new(route.slug.clone(), pool),
                server: route.server.clone(),
                in_flight: AtomicUsize::new(0),
                usage: Mutex::new(self.first_usage(&route.slug)),
                credentials: tokio::sync::Mutex::new(version),
                verified_at: Mutex::new(None),
            }))
        }
        .instrument(span)
        .await
    }

    /// A permit for the first connection of a pool on `server`. While the budget is spent,
    /// closes an idle spare connection, else the least valuable idle pool, on that server
    /// (one per round) and waits, for `budget_wait` at most.
    async fn make_room(&self, server: &str) -> Result<ConnectionPermit, PoolError> {
        let wait = self.inner.settings.budget_wait;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(permit) = self.inner.budgets.try_take(server) {
                return Ok(permit);
            }
            if !self.close_spare_connection(server) {
                self.evict_least_valuable(server).await;
            }
            let round = (tokio::time::Instant::now() + BUDGET_RETRY).min(deadline);
            if let Ok(permit) = tokio::time::timeout_at(round, self.inner.budgets.take(server)).await {
                return Ok(permit);
            }
            if tokio::time::Instant::now() >= deadline {
                self.inner.metrics.budget_exhausted(server);
                return Err(PoolError::BudgetExhausted(wait));
            }
        }
    }

    /// A permit for a further connection of a pool on `server` once one is free, for
    /// `budget_wait` at most. It looks for one every [`GROWTH_RETRY`] instead of queueing
    /// for the budget: a permit given back goes to the queue first, that is to a tenant
    /// that has no connection at all (whose pool closed a spare connection or a pool to make
    /// that room), not to a pool that has one and will usually get it back first.
    async fn free_permit(&self, server: &str) -> Option<ConnectionPermit> {
        let deadline = tokio::time::Instant::now() + self.inner.settings.budget_wait;
        loop {
            if let Some(permit) = self.inner.budgets.try_take(server) {
                return Some(permit);
            }
            if tokio::time::Instant::now() >= deadline {
                self.inner.metrics.budget_exhausted(server);
                return None;
            }
            tokio::time::sleep(GROWTH_RETRY).await;
        }
    }

    /// Closes an idle connection of a pool on `server` that has another one open, the least
    /// valuable such pool first: the cheapest room there is, since no tenant is left without
    /// a connection (closing a whole pool makes its tenant's next request connect).
    fn close_spare_connection(&self, server: &str) -> bool {
        let now = self.now_millis();
        let mut candidates: Vec<(f64, Arc<TenantPool>)> = self
            .inner
            .cache
            .iter()
            .filter(|(_, tenant)| tenant.server == server && tenant.pool().size() > 1)
            .map(|(_, tenant)| (tenant.value_at(now), tenant))
            .collect();
        candidates.sort_by(|(a, _), (b, _)| a.total_cmp(b));
        let closed = candidates.iter().find(|(_, tenant)| tenant.pool().close_spare());
        if let Some((_, tenant)) = closed {
            tracing::debug!(tenant = %tenant.slug(), server, "closed a spare connection to make room in the connection budget");
            self.inner.metrics.spare_connection_closed();
        }
        closed.is_some()
    }

    /// Closes the least valuable pool on `server` that has connections open and no request
    /// holding it, and remembers what it was worth for the tenant's next pool.
    async fn evict_least_valuable(&self, server: &str) {
        let now = self.now_millis();
        let victim = self
            .inner
            .cache
            .iter()
            .filter(|(_, tenant)| {
                tenant.server == server && tenant.in_flight.load(Ordering::Acquire) == 0 && tenant.pool().size() > 0
            })
            .map(|(slug, tenant)| {
                let usage = *lock(&tenant.usage);
                (slug, usage, usage.value_at(now))
            })
            .min_by(|(_, _, a), (_, _, b)| a.total_cmp(b));
        if let Some((slug, usage, _)) = victim {
            tracing::debug!(tenant = %slug, server, "closing an idle pool to make room in the connection budget");
            lock(&self.inner.history).remember(&slug, usage, now);
            self.remove(&slug, Drain::Now, "budget").await;
        }
    }

    /// The tenant's pool with one connection open, which holds `permit`.
    async fn connect(&self, route: &TenantRoute, permit: ConnectionPermit) -> Result<(DbPool, String), PoolError> {
        let started = Instant::now();
        let credentials = &self.inner.credentials;
        let (options, version) = credentials
            .current(&route.slug, &route.server)
            .await?
            .ok_or_else(|| PoolError::SecretMissing(credentials.secret_name(&route.slug).unwrap_or_default()))?;
        let secret_read = Instant::now();
        self.inner.metrics.pool_build_step("secret", secret_read - started);
        let opened = self.open_pool(route, options, version, permit).await?;
        self.inner.metrics.pool_build_step("connect", secret_read.elapsed());
        Ok(opened)
    }

    /// The tenant's pool with one connection open (holding `permit`), logging in with
    /// `options` (secret `version`), or with another secret version if PostgreSQL refuses
    /// that password.
    async fn open_pool(
        &self,
        route: &TenantRoute,
        options: PgConnectOptions,
        version: String,
        permit: ConnectionPermit,
    ) -> Result<(DbPool, String), PoolError> {
        let settings = &self.inner.settings;
        let credentials = &self.inner.credentials;
        let expected = Arc::new(Expected {
            database: route.database.clone(),
            roles: TenantNames::of_database(&route.database).login_roles(),
        });
        let check: AfterConnect = Arc::new(move |conn| check_isolation(conn, expected.clone()));
        let budget: Arc<dyn ConnectionBudget> = Arc::new(ServerBudget {
            pools: Arc::downgrade(&self.inner),
            server: route.server.clone(),
        });
        let pool_settings = DbPoolSettings {
            max_lifetime: Some(settings.max_lifetime),
            after_connect: Some(check),
            budget: Some(budget),
            ..DbPoolSettings::new(settings.max_connections, settings.connect_timeout)
        };
        let mut refused =
            match DbPool::connect_with_permit(options, pool_settings.clone(), BudgetPermit::new(permit)).await {
                Ok(pool) => return Ok((pool, version)),
                Err(error) if is_auth_failure(&error) => error,
                Err(error) => return Err(PoolError::Connect(error)),
            };
        // Mid-rotation (`single`: the password changed at `set_secret`, AWSCURRENT moves at
        // `finish_secret`): the pending version, or a current one that moved meanwhile.
        let mut tried = vec![version];
        for stage in [AWSPENDING, AWSCURRENT] {
            let Some((options, version)) = credentials.read(&route.slug, &route.server, stage).await? else {
                continue;
            };
            if tried.contains(&version) {
                continue;
            }
            match DbPool::connect(options, pool_settings.clone()).await {
                Ok(pool) => {
                    tracing::info!(stage, "password refused; built the pool with another secret version");
                    return Ok((pool, version));
                }
                Err(error) if is_auth_failure(&error) => {
                    refused = error;
                    tried.push(version);
                }
                Err(error) => return Err(PoolError::Connect(error)),
            }
        }
        Err(PoolError::Connect(refused))
    }

    /// The tenant's secret version at `stage`, read from the store within `connect_timeout`.
    async fn read_options_timed(
        &self,
        slug: &str,
        server: &str,
        stage: &str,
    ) -> Result<Option<(PgConnectOptions, String)>, PoolError> {
        let timeout = self.inner.settings.connect_timeout;
        tokio::time::timeout(timeout, self.inner.credentials.read(slug, server, stage))
            .await
            .unwrap_or(Err(PoolError::Timeout(timeout)))
    }

    /// Tenant `slug` changed but may still be served: point its open pool (if any) at the
    /// current secret. New connections log in with it; open ones stay (PostgreSQL does not
    /// re-authenticate sessions) until `pool_max_lifetime`, so no request fails and the pool
    /// stays warm. A pool whose database moved is drained and rebuilt instead.
    pub(crate) async fn refresh(&self, slug: &str) {
        let Some(tenant) = self.inner.cache.get(slug).await else {
            return;
        };
        let mut in_use = tenant.credentials.lock().await;
        match self.read_options_timed(slug, &tenant.server, AWSCURRENT).await {
            Ok(Some((options, version))) if same_database(&tenant.pool().connect_options(), &options) => {
                switch(&tenant, &mut in_use, options, version);
                // Not verified: by the time this event is handled, the next `single` rotation
                // may already have changed the password, and a request refused with these
                // credentials must get to verify and switch again.
                *lock(&tenant.verified_at) = None;
                tracing::debug!(tenant = %slug, "tenant pool credentials refreshed");
            }
            Ok(Some(_)) => {
                drop(in_use);
                tracing::info!(tenant = %slug, "tenant database moved; rebuilding its pool");
                self.remove(slug, Drain::Graceful, "moved").await;
            }
            // The pool keeps working with what it has (a refused password is recovered from
            // per request): closing a serving pool over a secret-store hiccup would fail
            // requests that need not fail.
            Ok(None) => {
                let error = PoolError::SecretMissing(self.inner.credentials.secret_name(slug).unwrap_or_default());
                tracing::warn!(%error, tenant = %slug, "cannot refresh the tenant's credentials; keeping its pool");
            }
            Err(error) => {
                tracing::warn!(%error, tenant = %slug, "cannot refresh the tenant's credentials; keeping its pool");
            }
        }
    }

    /// PostgreSQL refused the password of `lease`'s pool (SQLSTATE 28P01) to an attempt that
    /// started at `attempted_at`: a rotation changed it before the secret's `AWSCURRENT` moved
    /// (`single`: at `set_secret`), or the event saying so is not here yet. Tries the
    /// `AWSPENDING` version (if any), then `AWSCURRENT`, logging in once with each (a
    /// connection taken from the server's budget) and switches the pool to the first that
    /// works. Failures of attempts that started before a switch was verified are not
    /// re-examined. Without room in the budget to verify, the pool switches to `AWSPENDING`
    /// if there is one, else `AWSCURRENT`.
    pub(crate) async fn recover_from_auth_failure(&self, lease: &PoolLease, attempted_at: Instant) {
        let tenant = &lease.tenant;
        let mut in_use = tenant.credentials.lock().await;
        if lock(&tenant.verified_at).is_some_and(|at| at > attempted_at) {
            return;
        }
        let mut candidates = Vec::with_capacity(2);
        for stage in [AWSPENDING, AWSCURRENT] {
            match self.read_options_timed(tenant.slug(), &tenant.server, stage).await {
                Ok(Some((options, version))) if same_database(&tenant.pool().connect_options(), &options) => {
                    candidates.push((stage, options, version));
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, tenant = %tenant.slug(), stage, "password refused and cannot read the tenant's secret");
                    return;
                }
            }
        }
        let verify = self.inner.budgets.try_take(&tenant.server);
        for (stage, options, version) in candidates {
            if verify.is_some() && !self.logs_in(&options).await {
                continue;
            }
            if version != *in_use {
                switch(tenant, &mut in_use, options, version);
                self.inner.metrics.credential_switch(stage);
                tracing::info!(tenant = %tenant.slug(), stage, "password refused; switched the pool's credentials");
            }
            *lock(&tenant.verified_at) = Some(Instant::now());
            return;
        }
        tracing::warn!(tenant = %tenant.slug(), "password refused and no version of the tenant's secret logs in");
    }

    /// Whether `options` log in within `connect_timeout` (the connection is closed again).
    async fn logs_in(&self, options: &PgConnectOptions) -> bool {
        let timeout = self.inner.settings.connect_timeout;
        match tokio::time::timeout(timeout, options.connect()).await {
            Ok(Ok(conn)) => {
                let _ = sqlx::Connection::close(conn).await;
                true
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "candidate credentials do not log in");
                false
            }
            Err(_) => false,
        }
    }

    /// Tenant `slug` changed: the credentials kept for its next pool may be out of date.
    pub(crate) async fn forget_credentials(&self, slug: &str) {
        self.inner.credentials.forget(slug).await;
    }

    /// Tenant changes may have been missed: forget every tenant's kept credentials.
    pub(crate) fn forget_all_credentials(&self) {
        self.inner.credentials.forget_all();
    }

    /// Removes tenant `slug`'s pool (if open) and closes it as `drain` says.
    pub(crate) async fn evict(&self, slug: &str, drain: Drain) {
        self.remove(slug, drain, "explicit").await;
    }

    async fn remove(&self, slug: &str, drain: Drain, cause: &'static str) {
        if let Some(tenant) = self.inner.cache.remove(slug).await {
            self.inner.metrics.pool_evicted(cause);
            // Leased between the choice and the removal: let that request finish.
            let drain = if tenant.close_if_unused() {
                drain
            } else {
                Drain::Graceful
            };
            self.inner.closer.close(tenant, drain);
        }
    }

    /// Every second until `shutdown`: sweeps expired pools, closes connections idle for
    /// `pool_idle_timeout` or older than `pool_max_lifetime` (a tenant's spare connection
    /// once its traffic drops), and samples connections per server.
    pub(crate) async fn sweep(&self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {
                    self.inner.cache.run_pending_tasks().await;
                    self.close_idle_connections_and_count();
                }
            }
        }
    }

    /// Closes idle connections past their time, then sets the connections-per-server gauge.
    fn close_idle_connections_and_count(&self) {
        let mut per_server: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
        for (_, tenant) in self.inner.cache.iter() {
            tenant.pool().close_idle(self.inner.settings.idle_timeout);
            *per_server.entry(tenant.server.clone()).or_default() += u64::from(tenant.pool().size());
        }
        for (server, connections) in per_server {
            self.inner.metrics.server_connections(&server, connections as f64);
        }
    }

    /// Closes every pool, including those still draining, and waits for them (shutdown).
    pub(crate) async fn close_all(&self) {
        let closer = &self.inner.closer;
        closer.stopping.cancel();
        let open: Vec<Arc<TenantPool>> = self.inner.cache.iter().map(|(_, tenant)| tenant).collect();
        self.inner.cache.invalidate_all();
        self.inner.cache.run_pending_tasks().await;
        for tenant in open {
            closer.close(tenant, Drain::Now);
        }
        closer.tasks.close();
        closer.tasks.wait().await;
    }
}

/// Points `tenant`'s new connections at `options` (secret `version`).
fn switch(tenant: &TenantPool, in_use: &mut String, options: PgConnectOptions, version: String) {
    tenant.pool().set_connect_options(options);
    *in_use = version;
}

/// Whether two connect options reach the same database (credentials aside).
fn same_database(a: &PgConnectOptions, b: &PgConnectOptions) -> bool {
    a.get_host() == b.get_host() && a.get_port() == b.get_port() && a.get_database() == b.get_database()
}

fn is_auth_failure(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some(INVALID_PASSWORD))
}

/// A tenant pool's share of its server's connection budget.
struct ServerBudget {
    pools: std::sync::Weak<Inner>,
    server: String,
}

impl ConnectionBudget for ServerBudget {
    fn take(&self, first: bool) -> TakePermit<'_> {
        Box::pin(async move {
            // The map is gone only once the router has shut down.
            let pools = Pools {
                inner: self.pools.upgrade()?,
            };
            let permit = if first {
                pools.make_room(&self.server).await.ok()
            } else {
                pools.free_permit(&self.server).await
            };
            permit.map(BudgetPermit::new)
        })
    }
}

/// Who a tenant's connections must be: its database, one of its login roles.
struct Expected {
    database: String,
    roles: [String; 2],
}

/// The isolation self-check on every new connection: `current_catalog` (the current
/// database) is the tenant's database and `session_user` one of its login roles
/// (`current_user` is the owner role the login role acts as). Anything else is refused and
/// logged as an error.
///
/// It is on the path of a tenant's first request, so it costs one round trip and no catalog
/// lookup: a simple-protocol query (no prepared statement) of two SQL keywords, not function
/// calls and casts, which a fresh backend would first look up in `pg_proc` and `pg_cast`
/// (0.4 ms instead of 1.0 ms here).
fn check_isolation(conn: &mut PgConnection, expected: Arc<Expected>) -> AfterConnectFuture<'_> {
    Box::pin(async move {
        let row = sqlx::raw_sql("SELECT current_catalog, session_user")
            .fetch_one(&mut *conn)
            .await?;
        let (database, session_user): (String, String) = (row.try_get(0)?, row.try_get(1)?);
        if database != expected.database || !expected.roles.contains(&session_user) {
            tracing::error!(
                %database,
                %session_user,
                expected_database = %expected.database,
                "isolation check failed: a new connection is not the tenant's; refusing it"
            );
            return Err(sqlx::Error::Protocol(
                "isolation check failed: connection is not in the tenant's database as its login role".into(),
            ));
        }
        Ok(())
    })
}

/// The eviction listener: counts, and closes what expired or was pushed out. Explicit
/// removals are counted and closed by whoever removed them ([`Pools::remove`],
/// [`Pools::close_all`]), since only they know why and whether to drain.
fn on_evicted(closer: &Closer, metrics: &Metrics, tenant: Arc<TenantPool>, cause: RemovalCause) {
    metrics.pool_closed();
    match cause {
        // Unused for the idle timeout: nothing to wait for, unless leased as it expired.
        RemovalCause::Expired => {
            metrics.pool_evicted("idle");
            let drain = if tenant.close_if_unused() {
                Drain::Now
            } else {
                Drain::Graceful
            };
            closer.close(tenant, drain);
        }
        RemovalCause::Size => {
            metrics.pool_evicted("capacity");
            closer.close(tenant, Drain::Graceful);
        }
        RemovalCause::Replaced => {
            metrics.pool_evicted("replaced");
            closer.close(tenant, Drain::Graceful);
        }
        RemovalCause::Explicit => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant_pool() -> Arc<TenantPool> {
        let pool = DbPool::new(PgConnectOptions::new(), DbPoolSettings::new(2, Duration::from_secs(1)));
        Arc::new(TenantPool {
            context: TenantContext::new("acme", pool),
            server: "main".into(),
            in_flight: AtomicUsize::new(0),
            usage: Mutex::new(Usage::new(0)),
            credentials: tokio::sync::Mutex::new(String::new()),
            verified_at: Mutex::new(None),
        })
    }

    /// The race a full budget had: a request took the pool from the map, the pool was chosen
    /// to make room while unused, the request leased it, and its query found it closed.
    #[tokio::test]
    async fn a_pool_marked_closing_is_never_leased() {
        let tenant = tenant_pool();
        assert!(tenant.close_if_unused());
        assert!(tenant.clone().lease().is_none());
        assert!(
            tenant.clone().lease().is_none(),
            "a refused lease leaves nothing behind"
        );
    }

    #[tokio::test]
    async fn a_leased_pool_is_closed_only_once_its_requests_are_done() {
        let tenant = tenant_pool();
        let (first, second) = (tenant.clone().lease().unwrap(), tenant.clone().lease().unwrap());
        assert!(!tenant.close_if_unused());
        drop(first);
        assert!(!tenant.close_if_unused());
        drop(second);
        assert!(tenant.close_if_unused());
        assert!(tenant.clone().lease().is_none());
    }
}
