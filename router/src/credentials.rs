//! Tenants' database credentials, read from the secret store.
//!
//! A pool is built with the tenant's `AWSCURRENT` secret. The version read last is kept for
//! [`KEEP_CURRENT`], so a pool rebuilt soon after it closed (idle, or evicted to make room in
//! the connection budget) does not ask the secret store again: with AWS Secrets Manager that
//! is a network round trip and a billed API call on the request's path. Nothing else is
//! served from what is kept: refreshing an open pool and recovering from a refused password
//! read the store. A tenant event (a rotation moved `AWSCURRENT`, the tenant moved or
//! stopped being served) drops what was kept for that tenant, and a reconnect of the events
//! listener drops everything kept, since events may have been missed; a build that still
//! logs in with a version a rotation has just retired is refused by PostgreSQL and retries
//! with what the store says.
//!
//! Connect options carry the tenant's password: they are built on one line and never logged.
//! They also set the session's `statement_timeout` in the startup packet (no round trip) to
//! `router.request_timeout` and a second: a request the router gave up on does not leave its
//! query running on the tenant's server, taking CPU and locks from the other tenants there.
//! The second's margin lets the router answer `request_timeout` itself rather than relay the
//! error of a query cancelled just before its own deadline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use silo_control_plane::config::ServerTls;
use silo_control_plane::names::TenantSlug;
use silo_control_plane::secrets::{tenant_secret_name, DbSecret, SecretStore, AWSCURRENT};
use sqlx::postgres::PgConnectOptions;

use crate::ops::Metrics;
use crate::pools::PoolError;
use crate::server::APPLICATION_NAME;

/// How long a tenant's current secret is kept after it was read from the store.
pub(crate) const KEEP_CURRENT: Duration = Duration::from_secs(15 * 60);
/// How much longer than `router.request_timeout` a statement may run.
const STATEMENT_TIMEOUT_MARGIN: Duration = Duration::from_secs(1);
/// At most this many tenants' secrets are kept.
const MAX_KEPT: u64 = 10_000;

/// A secret version as read: the credentials and the version id.
struct Version {
    secret: DbSecret,
    id: String,
}

/// Reads tenants' credentials from the secret store and keeps their current versions.
pub(crate) struct Credentials {
    store: Arc<dyn SecretStore>,
    /// `secrets.name_prefix`.
    prefix: String,
    /// `[[servers]]` TLS settings by server name.
    server_tls: HashMap<String, ServerTls>,
    /// Slug → the `AWSCURRENT` version read last.
    kept: Cache<String, Arc<Version>>,
    /// `statement_timeout` of every session, as PostgreSQL reads it (`31000ms`).
    statement_timeout: String,
    metrics: Arc<Metrics>,
}

impl Credentials {
    pub(crate) fn new(
        store: Arc<dyn SecretStore>,
        prefix: String,
        server_tls: HashMap<String, ServerTls>,
        statement_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let kept = Cache::builder()
            .name("silo-router-credentials")
            .max_capacity(MAX_KEPT)
            .time_to_live(KEEP_CURRENT)
            .build();
        Self {
            store,
            prefix,
            server_tls,
            kept,
            statement_timeout: format!("{}ms", (statement_timeout + STATEMENT_TIMEOUT_MARGIN).as_millis()),
            metrics,
        }
    }

    /// The name of tenant `slug`'s secret.
    pub(crate) fn secret_name(&self, slug: &str) -> Result<String, PoolError> {
        let slug = TenantSlug::parse(slug).map_err(|_| PoolError::BadSlug(slug.to_owned()))?;
        Ok(tenant_secret_name(&self.prefix, &slug))
    }

    /// Connect options for a new pool of tenant `slug` on `server`, and their version id:
    /// the current version kept from an earlier read, else read now.
    pub(crate) async fn current(
        &self,
        slug: &str,
        server: &str,
    ) -> Result<Option<(PgConnectOptions, String)>, PoolError> {
        let tls = self.tls(server)?;
        if let Some(version) = self.kept.get(slug).await {
            self.metrics.secret_read("kept");
            return Ok(Some(options(&version, tls, &self.statement_timeout)));
        }
        self.read(slug, server, AWSCURRENT).await
    }

    /// Connect options (with `server`'s TLS settings) and version id from tenant `slug`'s
    /// secret version at `stage`, read from the store, if there is one. A current version is
    /// kept for the next [`Credentials::current`].
    pub(crate) async fn read(
        &self,
        slug: &str,
        server: &str,
        stage: &str,
    ) -> Result<Option<(PgConnectOptions, String)>, PoolError> {
        let tls = self.tls(server)?;
        let name = self.secret_name(slug)?;
        self.metrics.secret_read("store");
        let Some(stored) = self.store.get_secret_value(&name, stage).await? else {
            if stage == AWSCURRENT {
                self.kept.invalidate(slug).await;
            }
            return Ok(None);
        };
        let version = Arc::new(Version {
            secret: DbSecret::from_secret(&stored.value, &name)?,
            id: stored.version_id,
        });
        if stage == AWSCURRENT {
            self.kept.insert(slug.to_owned(), version.clone()).await;
        }
        Ok(Some(options(&version, tls, &self.statement_timeout)))
    }

    /// Tenant `slug` changed: its kept version may be out of date.
    pub(crate) async fn forget(&self, slug: &str) {
        self.kept.invalidate(slug).await;
    }

    /// Changes may have been missed: nothing kept is trusted any more.
    pub(crate) fn forget_all(&self) {
        self.kept.invalidate_all();
    }

    fn tls(&self, server: &str) -> Result<&ServerTls, PoolError> {
        self.server_tls
            .get(server)
            .ok_or_else(|| PoolError::UnknownServer(server.to_owned()))
    }
}

fn options(version: &Version, tls: &ServerTls, statement_timeout: &str) -> (PgConnectOptions, String) {
    let options = version
        .secret
        .connect_options(tls)
        .application_name(APPLICATION_NAME)
        .options([("statement_timeout", statement_timeout)]);
    (options, version.id.clone())
}
