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
//!
//! A pool may share a [`ConnectionBudget`] with other pools (the router's budget per
//! PostgreSQL server): then each connection holds a [`BudgetPermit`] from it for as long as
//! it is open, so a pool costs the budget what it has open, not its maximum. A request that
//! needs a new connection while the budget is spent waits for a permit or for one of its own
//! pool's connections to come back, whichever is first.

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use deadpool::managed::{self, Metrics, PoolError, QueueMode, RecycleError, RecycleResult, Timeouts};
use deadpool::Runtime;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::Notify;

use crate::error::DatabaseUnreachable;
use crate::TenantContext;

/// A connection checked out of a [`DbPool`]; back in the pool when dropped.
pub struct DbConnection {
    /// `Some` until dropped.
    object: Option<managed::Object<Connector>>,
}

impl Deref for DbConnection {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self
            .object
            .as_ref()
            .unwrap_or_else(|| unreachable!("taken only on drop"))
            .conn
    }
}

impl DerefMut for DbConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self
            .object
            .as_mut()
            .unwrap_or_else(|| unreachable!("taken only on drop"))
            .conn
    }
}

impl Drop for DbConnection {
    fn drop(&mut self) {
        if let Some(object) = self.object.take() {
            let pool = managed::Object::pool(&object);
            drop(object);
            // A request waiting for budget to open a connection takes this one instead.
            if let Some(pool) = pool {
                pool.manager().returned.notify_one();
            }
        }
    }
}

/// An open connection and the budget permit it holds (released when it closes).
pub struct BudgetedConnection {
    conn: PgConnection,
    _permit: Option<BudgetPermit>,
    /// The pool's count of open connections.
    open: Arc<AtomicUsize>,
}

impl Drop for BudgetedConnection {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Room for connections that several pools share (the router's budget per server).
pub trait ConnectionBudget: Send + Sync {
    /// A permit for one more connection of a pool: at once if one is free; else, for a pool
    /// with no connection open (`first`), once room has been made (by closing other pools),
    /// and for a further connection once a permit is given back. `None` if none came within
    /// the budget's own bounded wait.
    fn take(&self, first: bool) -> TakePermit<'_>;
}

/// What [`ConnectionBudget::take`] returns.
pub type TakePermit<'a> = Pin<Box<dyn Future<Output = Option<BudgetPermit>> + Send + 'a>>;

/// One connection's share of a [`ConnectionBudget`], given back when dropped.
pub struct BudgetPermit {
    _held: Box<dyn Send + Sync>,
}

impl BudgetPermit {
    /// A permit that holds `held` (e.g. a semaphore permit) until it is dropped.
    pub fn new(held: impl Send + Sync + 'static) -> Self {
        Self { _held: Box::new(held) }
    }
}

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
    /// Shared room every connection takes a permit from.
    pub budget: Option<Arc<dyn ConnectionBudget>>,
}

impl DbPoolSettings {
    /// `max_connections` connections, pinged after 1 s idle, no lifetime limit, no check, no
    /// shared budget.
    pub fn new(max_connections: u32, acquire_timeout: Duration) -> Self {
        Self {
            max_connections,
            acquire_timeout,
            ping_if_idle_for: PING_IF_IDLE_FOR,
            max_lifetime: None,
            after_connect: None,
            budget: None,
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
    /// The permit the pool's builder reserved for its first connection.
    first_permit: Mutex<Option<BudgetPermit>>,
    /// Signalled when a connection comes back to the pool.
    returned: Notify,
    /// Connections open (idle or checked out).
    open: Arc<AtomicUsize>,
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// PostgreSQL refused or failed it, or the check after connecting failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The shared budget stayed spent.
    #[error("the connection budget stayed spent")]
    NoBudget,
    /// One of the pool's connections came back while waiting for budget: take it instead.
    #[error("a connection came back")]
    Returned,
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

    /// The budget permit a new connection holds: the one reserved for the first connection,
    /// else one from the shared budget, unless one of the pool's own connections comes back
    /// first.
    async fn budget_permit(&self) -> Result<Option<BudgetPermit>, ConnectError> {
        let Some(budget) = &self.settings.budget else {
            return Ok(None);
        };
        if let Some(permit) = self.first_permit.lock().unwrap_or_else(PoisonError::into_inner).take() {
            return Ok(Some(permit));
        }
        let first = self.open.load(Ordering::Acquire) == 0;
        tokio::select! {
            biased;
            permit = budget.take(first) => permit.map(Some).ok_or(ConnectError::NoBudget),
            () = self.returned.notified() => Err(ConnectError::Returned),
        }
    }
}

impl managed::Manager for Connector {
    type Type = BudgetedConnection;
    type Error = ConnectError;

    async fn create(&self) -> Result<BudgetedConnection, ConnectError> {
        let permit = self.budget_permit().await?;
        let options = self.options.read().unwrap_or_else(PoisonError::into_inner).clone();
        let mut conn = crate::connect::connect(&options, self.settings.acquire_timeout).await?;
        if let Some(check) = &self.settings.after_connect {
            if let Err(error) = check(&mut conn).await {
                let _ = conn.close().await;
                return Err(error.into());
            }
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        Ok(BudgetedConnection {
            conn,
            _permit: permit,
            open: self.open.clone(),
        })
    }

    async fn recycle(&self, conn: &mut BudgetedConnection, metrics: &Metrics) -> RecycleResult<ConnectError> {
        if self.settings.max_lifetime.is_some_and(|max| metrics.age() >= max) {
            return Err(RecycleError::message("past its max lifetime"));
        }
        if self.must_ping(metrics) {
            conn.conn.ping().await.map_err(ConnectError::Database)?;
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
        Self::with_first_permit(options, settings, None)
    }

    /// A pool whose first connection holds `permit` (reserved by the caller from the pool's
    /// budget) instead of taking one.
    fn with_first_permit(options: PgConnectOptions, settings: DbPoolSettings, permit: Option<BudgetPermit>) -> Self {
        let max_size = usize::try_from(settings.max_connections.max(1)).unwrap_or(usize::MAX);
        let timeout = Some(settings.acquire_timeout);
        let pool = managed::Pool::builder(Connector {
            options: RwLock::new(options),
            settings,
            epoch: Instant::now(),
            suspect_until: AtomicU64::new(0),
            first_permit: Mutex::new(permit),
            returned: Notify::new(),
            open: Arc::new(AtomicUsize::new(0)),
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
        Self::with_first_permit(options, settings, None).opened().await
    }

    /// [`DbPool::connect`] for a pool with a budget, whose first connection holds `permit`
    /// (which the caller took from that budget).
    pub async fn connect_with_permit(
        options: PgConnectOptions,
        settings: DbPoolSettings,
        permit: BudgetPermit,
    ) -> Result<Self, sqlx::Error> {
        Self::with_first_permit(options, settings, Some(permit)).opened().await
    }

    async fn opened(self) -> Result<Self, sqlx::Error> {
        drop(self.acquire().await?);
        Ok(self)
    }

    /// An idle connection, or a new one while fewer than `max_connections` are open (and the
    /// budget, if any, has room); waits at most `acquire_timeout`. A spent budget is
    /// `PoolTimedOut`.
    pub async fn acquire(&self) -> Result<DbConnection, sqlx::Error> {
        let deadline = Instant::now() + self.pool.manager().settings.acquire_timeout;
        loop {
            let left = Some(deadline.saturating_duration_since(Instant::now()));
            let timeouts = Timeouts {
                wait: left,
                create: left,
                recycle: left,
            };
            match self.pool.timeout_get(&timeouts).await {
                Ok(object) => return Ok(DbConnection { object: Some(object) }),
                Err(PoolError::Backend(ConnectError::Returned)) if left.is_some_and(|left| !left.is_zero()) => {}
                Err(PoolError::Backend(ConnectError::Database(error))) => return Err(error),
                Err(PoolError::Backend(ConnectError::NoBudget | ConnectError::Returned) | PoolError::Timeout(_)) => {
                    return Err(sqlx::Error::PoolTimedOut)
                }
                Err(PoolError::Closed | PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_)) => {
                    return Err(sqlx::Error::PoolClosed)
                }
            }
        }
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

    /// Closes the idle connection handed out longest ago, if the pool has another connection
    /// open: frees a connection (and its budget permit) without leaving the tenant without
    /// one. False when no connection is idle or the pool has only one.
    pub fn close_spare(&self) -> bool {
        if self.pool.status().size < 2 {
            return false;
        }
        let handed_out = |metrics: &Metrics| metrics.recycled.unwrap_or(metrics.created);
        let mut oldest = None;
        self.pool.retain(|_, metrics| {
            let at = handed_out(&metrics);
            oldest = Some(oldest.map_or(at, |oldest: Instant| oldest.min(at)));
            true
        });
        let Some(oldest) = oldest else {
            return false;
        };
        let mut closed = false;
        self.pool.retain(|_, metrics| {
            if closed || handed_out(&metrics) != oldest {
                return true;
            }
            closed = true;
            false
        });
        closed
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
