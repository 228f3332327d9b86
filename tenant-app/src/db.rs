//! A tenant's database pool: [deadpool] over sqlx [`PgConnection`]s.
//!
//! Not sqlx's own pool, because of what it does when a request is done with a connection: it
//! pings the server (one more round trip, and one more wake-up of the PostgreSQL backend, per
//! request) from a spawned task, and only then is the connection idle again — so a request
//! that follows another on the same tenant often finds none idle and opens a second
//! connection. Here a connection is idle again the moment the request drops it, and the most
//! recently used one is handed out first (so a tenant's spare connection idles out instead of
//! being kept warm by round-robin). A connection is pinged before use only when it sat idle
//! for [`DbPoolSettings::ping_if_idle_for`] (the server may have been restarted meanwhile), or
//! when a request found the database unreachable since its last use
//! ([`DbPool::verify_before_reuse`]): once a request has found the database unreachable, no
//! connection is handed out again unverified. A connection a request abandoned mid-query is
//! safe to reuse: sqlx reads what is left of the previous exchange before it sends the next
//! one.
//!
//! The connect options can be swapped while the pool is open (credential rotation): new
//! connections use the new ones, open connections stay.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use deadpool::managed::{self, Metrics, PoolError, QueueMode, RecycleError, RecycleResult};
use deadpool::Runtime;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

use crate::error::DatabaseUnreachable;
use crate::TenantContext;

/// A connection checked out of a [`DbPool`]; back in the pool when dropped.
pub type DbConnection = managed::Object<Connector>;

/// Runs on every new connection before it is used; an error refuses the connection.
pub type AfterConnect = Arc<dyn for<'c> Fn(&'c mut PgConnection) -> AfterConnectFuture<'c> + Send + Sync>;

/// What an [`AfterConnect`] check returns.
pub type AfterConnectFuture<'c> = Pin<Box<dyn Future<Output = Result<(), sqlx::Error>> + Send + 'c>>;

/// A connection idle this long is pinged before use (it may have been terminated, e.g. by a
/// server restart); busier connections are not, since a ping per checkout costs ~20 % of
/// throughput (NOTES.md).
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// How often [`DbPool::close_and_wait`] looks whether checked-out connections came back.
const CLOSE_POLL: Duration = Duration::from_millis(10);

/// How a [`DbPool`] behaves.
#[derive(Clone)]
pub struct DbPoolSettings {
    /// Most connections open at once.
    pub max_connections: u32,
    /// Longest wait for a connection, connecting included; then `PoolTimedOut`.
    pub acquire_timeout: Duration,
    /// A connection idle at least this long is pinged before it is handed out.
    pub ping_if_idle_for: Duration,
    /// A connection this old is closed instead of being handed out again.
    pub max_lifetime: Option<Duration>,
    /// Check on every new connection.
    pub after_connect: Option<AfterConnect>,
}

impl DbPoolSettings {
    /// `max_connections` connections, pinged after 1 s idle, no lifetime limit, no check.
    pub fn new(max_connections: u32, acquire_timeout: Duration) -> Self {
        Self {
            max_connections,
            acquire_timeout,
            ping_if_idle_for: PING_IF_IDLE_FOR,
            max_lifetime: None,
            after_connect: None,
        }
    }
}

/// Opens and vets the connections of one [`DbPool`].
pub struct Connector {
    /// Read for each new connection; the password is in here: never log it.
    options: RwLock<PgConnectOptions>,
    settings: DbPoolSettings,
    /// When the pool was made: the origin of `suspect_until`.
    epoch: Instant,
    /// Connections last handed out before this (nanoseconds after `epoch`) are pinged before
    /// their next use.
    suspect_until: AtomicU64,
}

impl Connector {
    fn nanos_since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a connection last handed out as `metrics` says must be pinged first.
    fn must_ping(&self, metrics: &Metrics) -> bool {
        let handed_out = metrics.recycled.unwrap_or(metrics.created);
        metrics.last_used() >= self.settings.ping_if_idle_for
            || self.nanos_since_epoch(handed_out) < self.suspect_until.load(Ordering::Acquire)
    }
}

impl managed::Manager for Connector {
    type Type = PgConnection;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<PgConnection, sqlx::Error> {
        let options = self.options.read().unwrap_or_else(PoisonError::into_inner).clone();
        let mut conn = PgConnection::connect_with(&options).await?;
        if let Some(check) = &self.settings.after_connect {
            if let Err(error) = check(&mut conn).await {
                let _ = conn.close().await;
                return Err(error);
            }
        }
        Ok(conn)
    }

    async fn recycle(&self, conn: &mut PgConnection, metrics: &Metrics) -> RecycleResult<sqlx::Error> {
        if self.settings.max_lifetime.is_some_and(|max| metrics.age() >= max) {
            return Err(RecycleError::message("past its max lifetime"));
        }
        if self.must_ping(metrics) {
            conn.ping().await?;
        }
        Ok(())
    }
}

/// A pool of connections to one tenant database; clones share it.
#[derive(Clone)]
pub struct DbPool {
    pool: managed::Pool<Connector>,
}

impl DbPool {
    /// A pool that connects on first use.
    pub fn new(options: PgConnectOptions, settings: DbPoolSettings) -> Self {
        let max_size = usize::try_from(settings.max_connections.max(1)).unwrap_or(usize::MAX);
        let timeout = Some(settings.acquire_timeout);
        let pool = managed::Pool::builder(Connector {
            options: RwLock::new(options),
            settings,
            epoch: Instant::now(),
            suspect_until: AtomicU64::new(0),
        })
        .max_size(max_size)
        .queue_mode(QueueMode::Lifo)
        .runtime(Runtime::Tokio1)
        .wait_timeout(timeout)
        .create_timeout(timeout)
        .recycle_timeout(timeout)
        .build()
        .unwrap_or_else(|_| unreachable!("a tokio runtime is configured"));
        Self { pool }
    }

    /// A pool with one connection open (so that bad options fail here, not on first use).
    pub async fn connect(options: PgConnectOptions, settings: DbPoolSettings) -> Result<Self, sqlx::Error> {
        let pool = Self::new(options, settings);
        drop(pool.acquire().await?);
        Ok(pool)
    }

    /// An idle connection, or a new one while fewer than `max_connections` are open; waits at
    /// most `acquire_timeout`.
    pub async fn acquire(&self) -> Result<DbConnection, sqlx::Error> {
        self.pool.get().await.map_err(|error| match error {
            PoolError::Backend(error) => error,
            PoolError::Timeout(_) => sqlx::Error::PoolTimedOut,
            PoolError::Closed | PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => sqlx::Error::PoolClosed,
        })
    }

    /// A request found the database unreachable: every connection handed out until now is
    /// pinged before its next use (and replaced if the ping fails).
    pub fn verify_before_reuse(&self) {
        let connector = self.pool.manager();
        let now = connector.nanos_since_epoch(Instant::now());
        connector.suspect_until.fetch_max(now, Ordering::AcqRel);
    }

    /// The options new connections are opened with.
    pub fn connect_options(&self) -> PgConnectOptions {
        self.pool
            .manager()
            .options
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Opens new connections with `options` from now on; open connections are kept.
    pub fn set_connect_options(&self, options: PgConnectOptions) {
        *self
            .pool
            .manager()
            .options
            .write()
            .unwrap_or_else(PoisonError::into_inner) = options;
    }

    /// Open connections, idle or checked out.
    pub fn size(&self) -> u32 {
        u32::try_from(self.pool.status().size).unwrap_or(u32::MAX)
    }

    /// Closes idle connections unused for `idle_timeout` or older than the max lifetime.
    pub fn close_idle(&self, idle_timeout: Duration) {
        let max_lifetime = self.pool.manager().settings.max_lifetime;
        self.pool.retain(|_, metrics| {
            metrics.last_used() < idle_timeout && max_lifetime.is_none_or(|max| metrics.age() < max)
        });
    }

    /// Whether [`DbPool::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.pool.is_closed()
    }

    /// Closes the idle connections now and every other one when it comes back; waiting
    /// callers get `PoolClosed`.
    pub fn close(&self) {
        self.pool.close();
    }

    /// [`DbPool::close`], then waits until the checked-out connections came back (and were
    /// closed).
    pub async fn close_and_wait(&self) {
        self.close();
        while self.pool.status().size > 0 {
            tokio::time::sleep(CLOSE_POLL).await;
        }
    }
}

/// Middleware: after a response that says the tenant's database could not be reached, the
/// connections of its pool are verified before their next use.
pub(crate) async fn verify_after_failure(request: Request, next: Next) -> Response {
    let pool = request
        .extensions()
        .get::<TenantContext>()
        .map(|tenant| tenant.pool.clone());
    let response = next.run(request).await;
    if response.extensions().get::<DatabaseUnreachable>().is_some() {
        if let Some(pool) = pool {
            pool.verify_before_reuse();
        }
    }
    response
}
