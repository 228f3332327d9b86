//! [`RouterServer`]: binds the tenant and operations listeners, builds the router's state,
//! serves connections (HTTP/1.1 and h2c, one task each), and shuts down gracefully.
//!
//! Shutdown, when the token is cancelled: stop accepting, mark not ready, ask every
//! connection to finish its in-flight requests (hyper `graceful_shutdown`), wait up to
//! [`DRAIN_DEADLINE`] then drop what is left, stop the background tasks, close every tenant
//! pool, and finally stop the operations port.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::response::Response;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use silo_control_plane::catalog;
use silo_control_plane::config::Config;
use silo_control_plane::secrets;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::directory::Directory;
use crate::handler::{self, RouterState};
use crate::ops::{self, Health, Metrics};
use crate::pools::{PoolSettings, Pools};
use crate::resolve::Resolver;

/// In-flight requests get this long to finish after shutdown starts.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// A client must send its request head within this long (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Catalog connections for directory misses and the local secret store.
const CATALOG_POOL_SIZE: u32 = 4;
/// Waiting longer for a catalog connection than this fails the lookup.
const CATALOG_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// `application_name` of every connection the router opens.
pub(crate) const APPLICATION_NAME: &str = "silo-router";
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// A bound, not yet running router. Tests start it in-process; the binary via `run_cli`.
pub struct RouterServer {
    listener: TcpListener,
    ops_listener: TcpListener,
    local_addr: SocketAddr,
    ops_addr: SocketAddr,
    state: Arc<RouterState>,
    health: Arc<Health>,
    catalog: PgPool,
    listen_pool: PgPool,
}

impl std::fmt::Debug for RouterServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterServer")
            .field("local_addr", &self.local_addr)
            .field("ops_addr", &self.ops_addr)
            .finish_non_exhaustive()
    }
}

impl RouterServer {
    /// Binds `router.listen` and `router.metrics_listen` (port 0 picks a free port) and
    /// builds the router's state. Fails fast on a busy port or an unusable secret store;
    /// the catalog itself may still be down (known tenants are served once it answers, and
    /// `/readyz` says so).
    pub async fn bind(config: Config) -> anyhow::Result<RouterServer> {
        let cfg = &config.router;
        if cfg.tls.is_some() {
            anyhow::bail!("config key `router.tls_cert_file`: HTTPS is not supported by this router version yet");
        }
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("bind router.listen {}", cfg.listen))?;
        let ops_listener = TcpListener::bind(cfg.metrics_listen)
            .await
            .with_context(|| format!("bind router.metrics_listen {}", cfg.metrics_listen))?;
        let local_addr = listener.local_addr().context("read router.listen address")?;
        let ops_addr = ops_listener
            .local_addr()
            .context("read router.metrics_listen address")?;

        let metrics = Arc::new(Metrics::new().context("set up metrics")?);
        let catalog = catalog_pool(&config, CATALOG_POOL_SIZE)?;
        // The events listener holds its connection for good: a pool of its own.
        let listen_pool = catalog_pool(&config, 1)?;
        let secrets = secrets::open(&config.secrets, catalog.clone())
            .await
            .context("open the secret store")?;

        let health = Arc::new(Health::default());
        let state = Arc::new(RouterState {
            resolver: Resolver::new(&cfg.base_domains, cfg.path_prefix_routing),
            directory: Arc::new(Directory::new(
                catalog.clone(),
                cfg.tenant_cache_ttl,
                health.clone(),
                metrics.clone(),
            )),
            pools: Pools::new(secrets, PoolSettings::from_config(&config), metrics.clone()),
            app: silo_tenant_app::app(),
            metrics,
        });
        Ok(RouterServer {
            listener,
            ops_listener,
            local_addr,
            ops_addr,
            state,
            health,
            catalog,
            listen_pool,
        })
    }

    /// The address tenant traffic is served on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of `/healthz`, `/readyz` and `/metrics`.
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// Serves until `shutdown` is cancelled, then drains and closes everything it opened.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            ops_listener,
            state,
            health,
            catalog,
            listen_pool,
            ..
        } = self;

        // Background work, stopped after the connections have drained.
        let background = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (directory, pools) = (state.directory.clone(), state.pools.clone());
        let (events_pool, stop) = (listen_pool.clone(), background.clone());
        tasks.spawn(async move { directory.watch_tenant_events(events_pool, pools, stop).await });
        let (pools, stop) = (state.pools.clone(), background.clone());
        tasks.spawn(async move { pools.sweep(stop).await });
        let (metrics, stop) = (state.metrics.clone(), background.clone());
        tasks.spawn(async move { metrics.upkeep(stop).await });

        // The operations port outlives tenant traffic, so /readyz can say "draining".
        let ops_stop = CancellationToken::new();
        let (ops_health, ops_metrics) = (health.clone(), state.metrics.clone());
        let ops_server = tokio::spawn(serve(
            ops_listener,
            ops_stop.clone(),
            move |request: Request<Incoming>| {
                let response = ops::respond(&ops_health, &ops_metrics, &request);
                async move { response }
            },
        ));

        let tenant_state = state.clone();
        serve(listener, shutdown, move |request| {
            handler::handle(tenant_state.clone(), request)
        })
        .await;

        health.set_draining();
        background.cancel();
        tasks.close();
        tasks.wait().await;
        state.pools.close_all().await;
        ops_stop.cancel();
        match ops_server.await {
            // Cancelled: the runtime itself is shutting down (e.g. a test ending).
            Err(error) if !error.is_cancelled() => tracing::warn!(%error, "operations server task failed"),
            _ => {}
        }
        listen_pool.close().await;
        catalog.close().await;
        tracing::info!("router stopped");
        Ok(())
    }
}

/// A lazy pool on the catalog (the router starts, and serves known tenants, while the
/// catalog is down), named `silo-router` in `pg_stat_activity`.
fn catalog_pool(config: &Config, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = catalog::connect_options(&config.catalog).context("catalog_url")?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CATALOG_ACQUIRE_TIMEOUT)
        .connect_lazy_with(options.application_name(APPLICATION_NAME)))
}

/// Accepts connections until `stop`, serving each with `handle` in a task of its own; then
/// drains them: graceful shutdown, [`DRAIN_DEADLINE`], then the rest are dropped.
async fn serve<H, F>(listener: TcpListener, stop: CancellationToken, handle: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    // Request body limits and request timeouts (a later issue) wrap `handle` here.
    let builder = Arc::new(builder);
    let connections = TaskTracker::new();
    let hard_stop = CancellationToken::new();

    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (builder, handle, stop, hard_stop) = (builder.clone(), handle.clone(), stop.clone(), hard_stop.clone());
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = handle(request);
                async move { Ok::<_, Infallible>(response.await) }
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let mut draining = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(%peer, %error, "connection ended with an error");
                        }
                        break;
                    }
                    () = stop.cancelled(), if !draining => {
                        draining = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    () = hard_stop.cancelled() => break,
                }
            }
        });
    }

    drop(listener);
    connections.close();
    if tokio::time::timeout(DRAIN_DEADLINE, connections.wait()).await.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open at the drain deadline; closing them"
        );
        hard_stop.cancel();
        connections.wait().await;
    }
}
