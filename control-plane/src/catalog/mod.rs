//! The catalog: the control plane's own database (tenants, domains, servers, jobs, audit log,
//! admin tokens, the local secret store's ciphertexts).
//!
//! `routes` holds the read model the router uses; the control plane's writes live next to the
//! code that owns them (`tenants`, `jobs`, `audit`).

pub mod routes;
pub mod tenants;

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgPool};

use crate::config::CatalogConfig;

/// NOTIFY channel carrying the slug of every tenant whose routing data changed.
pub const TENANT_EVENTS_CHANNEL: &str = "silo_tenant_events";

/// Errors reaching or using the catalog. Each says all there is to say in one line (their
/// causes are part of the message, not a source chain that would repeat them).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// `catalog_url` could not be parsed.
    #[error("catalog_url is not a valid PostgreSQL URL")]
    BadUrl,
    /// The database failed.
    #[error("catalog database: {0}")]
    Database(sqlx::Error),
    /// Applying the catalog migrations failed.
    #[error("catalog migrations: {0}")]
    Migrate(sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for CatalogError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

impl From<sqlx::migrate::MigrateError> for CatalogError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Migrate(e)
    }
}

/// Connect options of the catalog (URL plus the password from the environment).
pub fn connect_options(cfg: &CatalogConfig) -> Result<PgConnectOptions, CatalogError> {
    let opts: PgConnectOptions = cfg.url.parse().map_err(|_| CatalogError::BadUrl)?;
    Ok(match &cfg.password {
        Some(p) => opts.password(p.expose_secret()),
        None => opts,
    })
}

/// A pool on the catalog. Connects lazily so a router can start (and keep serving known
/// tenants) while the catalog is down.
pub fn pool(cfg: &CatalogConfig, max_connections: u32) -> Result<PgPool, CatalogError> {
    Ok(crate::pooling::options()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(connect_options(cfg)?))
}

/// Applies the catalog migrations (idempotent; safe with several control planes starting).
pub async fn migrate(pool: &PgPool) -> Result<(), CatalogError> {
    // On a connection of its own: when the catalog cannot be reached, the connection's own
    // error says why (refused, no such host, bad password), where a pool only says it timed
    // out.
    let options = pool.connect_options();
    let mut conn = silo_tenant_app::connect(&options, CONNECT_TIMEOUT).await?;
    sqlx::migrate!("../migrations/catalog").run(&mut conn).await?;
    let _ = conn.close().await;
    Ok(())
}

/// Longest the first connection to the catalog may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Announces that `slug`'s routing data changed; call inside the transaction that changed it.
pub async fn notify_tenant_changed<'e, E: sqlx::PgExecutor<'e>>(exec: E, slug: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(TENANT_EVENTS_CHANNEL)
        .bind(slug)
        .execute(exec)
        .await?;
    Ok(())
}
