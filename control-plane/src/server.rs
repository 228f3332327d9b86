//! The control plane as a value tests can start: `ControlPlane::bind(config)` →
//! `.local_addr()` → `.run(shutdown)`. It serves the admin API and runs the job workers.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AdminTokens, ApiState};
use crate::backup::Backups;
use crate::config::{Config, SecretsBackend};
use crate::provision::Provisioner;
use crate::servers::Servers;
use crate::tenant_schema::MigrationSource;
use crate::worker::Workers;
use crate::{catalog, schedule, secrets, spares};

/// A bound, ready control plane.
pub struct ControlPlane {
    listener: TcpListener,
    api: ApiState,
    workers: Workers,
    spares: Spares,
}

/// What keeps the servers' spare databases filled.
struct Spares {
    servers: Arc<Servers>,
    migrations: MigrationSource,
    /// Per server; 0 when spares (or templates) are off.
    count: usize,
    /// Notified by provisionings that took a spare.
    claimed: Arc<tokio::sync::Notify>,
}

/// The process-wide Prometheus recorder (installed once; several control planes may run in
/// one test process).
fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .clone()
}

impl ControlPlane {
    /// Connects the catalog (applying its migrations), the secret store and the servers,
    /// registers the bootstrap admin token and binds `control_plane.listen`.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        let catalog = catalog::pool(&config.catalog, 16)?;
        catalog::migrate(&catalog)
            .await
            .context("connect to the catalog and apply its migrations")?;
        let store = secrets::open(&config.secrets, catalog.clone())
            .await
            .context("open the secret store")?;
        let servers = Arc::new(Servers::open(&config, store.as_ref()).await?);
        servers.sync_catalog(&catalog).await?;
        let tokens = AdminTokens::load(catalog.clone(), config.control_plane.admin_token.as_ref())
            .await
            .context("load admin tokens")?;
        if tokens.is_empty() {
            anyhow::bail!(
                "config key `control_plane.admin_token_env`: environment variable {} is not set and the catalog has no admin token",
                config.control_plane.admin_token_env
            );
        }
        let migrations = MigrationSource::new(config.tenant_migrations_dir.as_deref());
        migrations.load().await.context("load tenant migrations")?;
        let spares = Spares {
            servers: servers.clone(),
            migrations: migrations.clone(),
            count: if config.migrations.templates {
                config.migrations.spare_databases
            } else {
                0
            },
            claimed: Arc::new(tokio::sync::Notify::new()),
        };
        let listener = TcpListener::bind(config.control_plane.listen)
            .await
            .with_context(|| format!("bind control_plane.listen {}", config.control_plane.listen))?;
        let provisioner = Arc::new(
            Provisioner::new(
                catalog.clone(),
                store.clone(),
                servers.clone(),
                migrations,
                config.secrets.name_prefix.clone(),
                config.migrations.templates,
                (spares.count > 0).then(|| spares.claimed.clone()),
            )
            .with_backups(Backups::new(config.backups.clone())),
        );
        // The local store has no recovery window; AWS keeps deleted secrets for the window.
        let force_secret_delete = matches!(config.secrets.backend, SecretsBackend::Local { .. });
        let workers = Workers::new(
            catalog.clone(),
            provisioner,
            config.control_plane.job_lease,
            config.control_plane.workers,
            force_secret_delete,
        );
        let api = ApiState {
            catalog,
            store,
            servers,
            config: Arc::new(config),
            tokens: Arc::new(tokens),
            metrics: prometheus(),
        };
        Ok(Self {
            listener,
            api,
            workers,
            spares,
        })
    }

    /// The admin API's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.api.config.control_plane.listen)
    }

    /// Serves the admin API and runs the workers until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let workers = tokio::spawn(self.workers.run(shutdown.clone()));
        let scheduler = tokio::spawn(schedule::run(
            self.api.catalog.clone(),
            self.api.config.rotation.clone(),
            shutdown.clone(),
        ));
        let spares = tokio::spawn(spares::keep_filled(
            self.spares.servers,
            self.spares.migrations,
            self.spares.count,
            self.spares.claimed,
            shutdown.clone(),
        ));
        let app = api::router(self.api.clone());
        let serve = axum::serve(self.listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let result = serve.await.context("serve the admin API");
        shutdown.cancel();
        let _ = workers.await;
        let _ = scheduler.await;
        let _ = spares.await;
        self.api.catalog.close().await;
        result
    }
}
