//! The PostgreSQL servers that hold tenant databases, with the admin credentials the control
//! plane uses on them.
//!
//! An admin password kept in the secret store (`admin_password_secret`) may be rotated there:
//! by Secrets Manager's rotation, or by RDS when it manages the master password. The control
//! plane reads it again every [`ADMIN_PASSWORD_RELOAD`], and at once when a job's login is
//! refused; open connections stay as they are (PostgreSQL keeps sessions across a password
//! change), new ones use the new password. One from the environment is read at start only.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{AdminPassword, Config, ServerConfig};
use crate::secrets::{SecretStore, SecretStoreError, AWSCURRENT};

/// Longest a control-plane connection to a PostgreSQL server may take to open (a server that
/// is down fails the step instead of holding it).
pub const ADMIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often admin passwords kept in the secret store are read again.
pub const ADMIN_PASSWORD_RELOAD: Duration = Duration::from_secs(30);

/// One server and an admin pool on its `postgres` database.
pub struct Server {
    /// Its configuration.
    pub config: ServerConfig,
    password: RwLock<SecretString>,
    /// Admin connections to the `postgres` database (roles, databases).
    pub admin: PgPool,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Admin connect options to `database` on this server.
    pub fn admin_options(&self, database: &str) -> PgConnectOptions {
        let password = self.password.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        admin_options(&self.config, &password, database)
    }

    /// Reads the admin password again when the secret store keeps it: true when it changed
    /// (the admin pool's new connections then use the new one).
    async fn reload_admin_password(&self, store: &dyn SecretStore) -> Result<bool, SecretStoreError> {
        let AdminPassword::Secret(name) = &self.config.admin_password else {
            return Ok(false);
        };
        let fresh = admin_password_from_store(store, name).await?;
        {
            let mut password = self.password.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            if password.expose_secret() == fresh.expose_secret() {
                return Ok(false);
            }
            *password = fresh;
        }
        self.admin.set_connect_options(self.admin_options("postgres"));
        Ok(true)
    }

    /// A one-off admin connection to `database` (never kept in a pool: a pooled session on a
    /// template or a tenant database would block CREATE/DROP DATABASE).
    pub async fn connect(&self, database: &str) -> Result<PgConnection, sqlx::Error> {
        silo_tenant_app::connect(&self.admin_options(database), ADMIN_CONNECT_TIMEOUT).await
    }
}

/// Errors opening the servers.
#[derive(Debug, thiserror::Error)]
pub enum ServersError {
    /// An admin password secret could not be read.
    #[error("server {server}: admin password secret: {source}")]
    Secret {
        /// The server.
        server: String,
        /// The store error.
        source: SecretStoreError,
    },
    /// The admin password is not available.
    #[error("server {server}: {problem}")]
    Password {
        /// The server.
        server: String,
        /// What is missing.
        problem: String,
    },
    /// Writing the server list into the catalog failed.
    #[error("record servers in the catalog: {0}")]
    Catalog(#[from] sqlx::Error),
}

/// Every configured server, by name.
#[derive(Debug)]
pub struct Servers {
    by_name: BTreeMap<String, Server>,
}

impl Servers {
    /// Resolves admin passwords (from the environment or the secret store) and builds lazy
    /// admin pools.
    pub async fn open(cfg: &Config, store: &dyn SecretStore) -> Result<Self, ServersError> {
        let mut by_name = BTreeMap::new();
        for s in &cfg.servers {
            if let Some(warning) = s.unverified_tls_warning() {
                tracing::warn!("{warning}");
            }
            let password = match &s.admin_password {
                AdminPassword::Env(var) => match std::env::var(var) {
                    Ok(p) if !p.is_empty() => SecretString::from(p),
                    _ => {
                        return Err(ServersError::Password {
                            server: s.name.clone(),
                            problem: format!("environment variable {var} (admin_password_env) is not set"),
                        })
                    }
                },
                AdminPassword::Secret(name) => {
                    admin_password_from_store(store, name)
                        .await
                        .map_err(|source| ServersError::Secret {
                            server: s.name.clone(),
                            source,
                        })?
                }
            };
            let admin = crate::pooling::options()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(10))
                .connect_lazy_with(admin_options(s, &password, "postgres"));
            by_name.insert(
                s.name.clone(),
                Server {
                    config: s.clone(),
                    password: RwLock::new(password),
                    admin,
                },
            );
        }
        Ok(Self { by_name })
    }

    /// The server `name`.
    pub fn get(&self, name: &str) -> Option<&Server> {
        self.by_name.get(name)
    }

    /// All servers.
    pub fn iter(&self) -> impl Iterator<Item = &Server> {
        self.by_name.values()
    }

    /// Reads again every admin password the secret store keeps, logging those that changed;
    /// a server whose secret cannot be read keeps the password it had.
    pub async fn reload_admin_passwords(&self, store: &dyn SecretStore) {
        for server in self.iter() {
            match server.reload_admin_password(store).await {
                Ok(true) => info!(
                    server = %server.config.name,
                    "admin password changed in the secret store; new connections use it"
                ),
                Ok(false) => {}
                Err(error) => warn!(
                    server = %server.config.name,
                    %error,
                    "admin password not read again from the secret store; the one in use stays"
                ),
            }
        }
    }

    /// Records the configured servers in the catalog (placement reads them there).
    pub async fn sync_catalog(&self, catalog: &PgPool) -> Result<(), ServersError> {
        for s in self.by_name.values() {
            sqlx::query(
                "INSERT INTO servers (name, host, port, max_tenants, region) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (name) DO UPDATE SET host = EXCLUDED.host, port = EXCLUDED.port, \
                 max_tenants = EXCLUDED.max_tenants, region = EXCLUDED.region, updated_at = now()",
            )
            .bind(&s.config.name)
            .bind(&s.config.host)
            .bind(i32::from(s.config.port))
            .bind(i64::from(s.config.max_tenants).min(i64::from(i32::MAX)) as i32)
            .bind(&s.config.region)
            .execute(catalog)
            .await?;
        }
        Ok(())
    }
}

fn admin_options(config: &ServerConfig, password: &SecretString, database: &str) -> PgConnectOptions {
    let options = PgConnectOptions::new_without_pgpass()
        .host(&config.host)
        .port(config.port)
        .username(&config.admin_user)
        .password(password.expose_secret())
        .database(database);
    config.tls.apply(options)
}

/// Reads an admin password stored as a database secret (`{"password": ...}`) or as plain text.
async fn admin_password_from_store(store: &dyn SecretStore, name: &str) -> Result<SecretString, SecretStoreError> {
    let version = store
        .get_secret_value(name, AWSCURRENT)
        .await?
        .ok_or_else(|| SecretStoreError::NotFound(name.to_owned()))?;
    #[derive(serde::Deserialize)]
    struct WithPassword {
        password: String,
    }
    Ok(
        match serde_json::from_str::<WithPassword>(version.value.expose_secret()) {
            Ok(p) => SecretString::from(p.password),
            Err(_) => version.value,
        },
    )
}

/// Reads the admin passwords kept in the secret store every [`ADMIN_PASSWORD_RELOAD`] until
/// `shutdown`; returns at once when every password comes from the environment.
pub async fn keep_admin_passwords_current(
    servers: Arc<Servers>,
    store: Arc<dyn SecretStore>,
    shutdown: CancellationToken,
) {
    let from_store = servers
        .iter()
        .any(|server| matches!(server.config.admin_password, AdminPassword::Secret(_)));
    if !from_store {
        return;
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(ADMIN_PASSWORD_RELOAD) => {}
        }
        servers.reload_admin_passwords(store.as_ref()).await;
    }
}
