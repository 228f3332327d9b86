//! The control plane as a value tests can start: `ControlPlane::bind(config)` →
//! `.local_addr()` → `.run(shutdown)`. It serves the admin API (over HTTPS when
//! `control_plane.tls_cert_file` is set) and runs the job workers.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AdminTokens, ApiState};
use crate::backup::schedule::Scheduled;
use crate::backup::{self, retention, Backups};
use crate::config::{Config, SecretsBackend};
use crate::gauges::Gauges;
use crate::provision::Provisioner;
use crate::servers::{self, Servers};
use crate::tenant_schema::MigrationSource;
use crate::worker::Workers;
use crate::{audit, catalog, response_headers, role_limits, schedule, secrets, spares, tls};

/// A client must finish its TLS handshake within this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must send a request's headers within this long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Open admin connections get this long to finish their requests at shutdown.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// A bound, ready control plane.
pub struct ControlPlane {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
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
    /// Reads the TLS and backup key files, connects the catalog (applying its migrations),
    /// the secret store and the servers, registers the bootstrap admin token and binds
    /// `control_plane.listen`.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        let tls = config
            .control_plane
            .tls
            .as_ref()
            .map(tls::admin_api_acceptor)
            .transpose()?;
        let listen = config.control_plane.listen;
        if tls.is_none() && !listen.ip().is_loopback() {
            tracing::warn!(
                %listen,
                "the admin API is served over plain HTTP beyond loopback: admin tokens and break-glass \
                 credentials cross the network in clear; set control_plane.tls_cert_file and tls_key_file"
            );
        }
        let backups = Backups::open(config.backups.clone()).await?;
        if config.backups.dir.is_some() && !backups.encrypted() {
            tracing::warn!(
                "backups are written unencrypted: set [backups] encryption_key_file to encrypt them at rest"
            );
        }
        if let Err(e) = backups.check_s3().await {
            tracing::error!(error = %e, "the [backups.s3] bucket cannot be used: backups fail until it can");
        }
        // Each running job may hold a catalog connection; the admin API, the schedules and the
        // sealer keep 16 beside them, so that busy workers cannot starve the API into 503s.
        let catalog_connections = u32::try_from(config.control_plane.workers)
            .unwrap_or(u32::MAX)
            .saturating_add(16);
        let catalog = catalog::pool(&config.catalog, catalog_connections)?;
        // Before the catalog: a missing or unreadable key file is told at once.
        let store = secrets::open(&config.secrets, catalog.clone())
            .await
            .context("open the secret store")?;
        catalog::migrate(&catalog)
            .await
            .context("connect to the catalog and apply its migrations")?;
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
            .with_backups(backups.clone()),
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
        let gauges = Arc::new(Gauges::new(catalog.clone(), backups.clone()));
        let api = ApiState {
            catalog,
            store,
            servers,
            config: Arc::new(config),
            tokens: Arc::new(tokens),
            gauges,
            backups,
            metrics: prometheus(),
        };
        Ok(Self {
            listener,
            tls,
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

    /// The admin API's base URL (`https://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.local_addr())
    }

    /// Serves the admin API and runs the workers until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let workers = tokio::spawn(self.workers.run(shutdown.clone()));
        let scheduler = tokio::spawn(schedule::run(
            self.api.catalog.clone(),
            self.api.config.rotation.clone(),
            shutdown.clone(),
        ));
        let backups = &self.api.config.backups;
        let backup_schedule = tokio::spawn(backup::schedule::run(
            self.api.catalog.clone(),
            Scheduled::Backup,
            backups.clone(),
            shutdown.clone(),
        ));
        let drill_schedule = tokio::spawn(backup::schedule::run(
            self.api.catalog.clone(),
            Scheduled::Verify,
            backups.clone(),
            shutdown.clone(),
        ));
        let retention = tokio::spawn(retention::run(
            self.api.catalog.clone(),
            self.api.backups.clone(),
            shutdown.clone(),
        ));
        let audit_seals = tokio::spawn(audit::seal::run(self.api.catalog.clone(), shutdown.clone()));
        let admin_passwords = tokio::spawn(servers::keep_admin_passwords_current(
            self.api.servers.clone(),
            self.api.store.clone(),
            shutdown.clone(),
        ));
        let role_limits = tokio::spawn(role_limits::apply(
            self.api.catalog.clone(),
            self.api.servers.clone(),
            shutdown.clone(),
        ));
        let spares = tokio::spawn(spares::keep_filled(
            self.spares.servers,
            self.spares.migrations,
            self.spares.count,
            self.spares.claimed,
            shutdown.clone(),
        ));
        let over_tls = self.tls.is_some();
        let app = api::router(self.api.clone()).layer(axum::middleware::map_response(
            move |mut response: axum::response::Response| async move {
                response_headers::add(response.headers_mut(), over_tls);
                response
            },
        ));
        serve(self.listener, self.tls, app, shutdown.clone()).await;
        shutdown.cancel();
        let _ = workers.await;
        let _ = scheduler.await;
        let _ = retention.await;
        let _ = backup_schedule.await;
        let _ = drill_schedule.await;
        let _ = spares.await;
        let _ = audit_seals.await;
        let _ = role_limits.await;
        let _ = admin_passwords.await;
        self.api.catalog.close().await;
        Ok(())
    }
}

/// Serves `app` on `listener` until `shutdown`, over HTTPS (HTTP/1.1 or HTTP/2 by ALPN) when
/// `tls` is given, then lets open connections finish for up to `DRAIN_DEADLINE`. A client
/// must send a request's headers within `HEADER_READ_TIMEOUT` (slowloris).
async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, app: axum::Router, shutdown: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (tls, app, builder, watcher) = (tls.clone(), app.clone(), builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            let service = TowerToHyperService::new(app.layer(axum::Extension(ConnectInfo(peer))));
            let served = match tls {
                None => {
                    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(connection.into_owned()).await
                }
                Some(tls) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(connection.into_owned()).await
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "admin API: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "admin API: TLS handshake timed out");
                        return;
                    }
                },
            };
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "admin API: connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown()).await.is_err() {
        tracing::warn!("admin API: connections still open at the drain deadline; closing them");
    }
}
