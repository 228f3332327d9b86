//! [`RouterServer`]: binds the tenant and operations listeners, builds the router's state,
//! serves connections (HTTP/1.1 and HTTP/2, over TLS when configured, one task each), and
//! shuts down gracefully.
//!
//! Shutdown, when the token is cancelled: stop accepting, mark not ready, ask every
//! connection to finish its in-flight requests (hyper `graceful_shutdown`), wait up to
//! `router.shutdown_timeout` then drop what is left, stop the background tasks, close every tenant
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
use silo_control_plane::{response_headers, secrets};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::directory::Directory;
use crate::handler::{self, RouterState};
use crate::limits::Limits;
use crate::ops::{self, Health, Metrics};
use crate::pools::{PoolSettings, Pools};
use crate::resolve::Resolver;
use crate::tls::{self, Tls};

/// The operations port's connection settings (its own, not tenant traffic's).
const OPS_CONNECTIONS: ConnectionLimits = ConnectionLimits {
    header_read_timeout: Duration::from_secs(10),
    drain_deadline: Duration::from_secs(10),
    max_connections: 1024,
};
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
    /// `router.https_listen`: HTTPS here, plain HTTP on `listener`.
    https_listener: Option<TcpListener>,
    https_addr: Option<SocketAddr>,
    tls: Option<Tls>,
    ops_listener: TcpListener,
    local_addr: SocketAddr,
    ops_addr: SocketAddr,
    state: Arc<RouterState>,
    health: Arc<Health>,
    catalog: PgPool,
    listen_pool: PgPool,
    connections: ConnectionLimits,
}

/// How client connections are bounded: `router.header_read_timeout` (slowloris),
/// `router.shutdown_timeout` (drain deadline), `router.max_connections` (beyond it, accepting
/// waits; shared by the HTTP and HTTPS listeners).
#[derive(Debug, Clone, Copy)]
struct ConnectionLimits {
    header_read_timeout: Duration,
    drain_deadline: Duration,
    max_connections: usize,
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
        for warning in config.servers.iter().filter_map(|s| s.unverified_tls_warning()) {
            tracing::warn!("{warning}");
        }
        let cfg = &config.router;
        let tls = cfg.tls.as_ref().map(Tls::from_config).transpose()?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("bind router.listen {}", cfg.listen))?;
        let https_listener = match cfg.https_listen.filter(|_| tls.is_some()) {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("bind router.https_listen {addr}"))?,
            ),
            None => None,
        };
        let ops_listener = TcpListener::bind(cfg.metrics_listen)
            .await
            .with_context(|| format!("bind router.metrics_listen {}", cfg.metrics_listen))?;
        let local_addr = listener.local_addr().context("read router.listen address")?;
        let https_addr = match &https_listener {
            Some(https) => Some(https.local_addr().context("read router.https_listen address")?),
            None => tls.as_ref().map(|_| local_addr),
        };
        let ops_addr = ops_listener
            .local_addr()
            .context("read router.metrics_listen address")?;

        let metrics = Arc::new(
            Metrics::new()
                .context("set up metrics")?
                .with_per_tenant(cfg.per_tenant_metrics),
        );
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
            limits: Arc::new(Limits::from_config(cfg)),
            max_body_bytes: cfg.max_body_bytes,
            request_timeout: cfg.request_timeout,
        });
        Ok(RouterServer {
            listener,
            https_listener,
            https_addr,
            tls,
            ops_listener,
            local_addr,
            ops_addr,
            state,
            health,
            catalog,
            listen_pool,
            connections: ConnectionLimits {
                header_read_timeout: cfg.header_read_timeout,
                drain_deadline: cfg.shutdown_timeout,
                max_connections: cfg.max_connections,
            },
        })
    }

    /// The address tenant traffic is served on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address HTTPS is served on: `router.https_listen`, or `router.listen` when TLS is
    /// configured without it; `None` without TLS.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// The address of `/healthz`, `/readyz` and `/metrics`.
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// Serves until `shutdown` is cancelled, then drains and closes everything it opened.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            https_listener,
            tls,
            ops_listener,
            state,
            health,
            catalog,
            listen_pool,
            connections,
            ..
        } = self;
        let slots = Arc::new(Semaphore::new(connections.max_connections));

        // Background work, stopped after the connections have drained.
        let background = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (directory, pools) = (state.directory.clone(), state.pools.clone());
        let (events_pool, stop) = (listen_pool.clone(), background.clone());
        tasks.spawn(async move { directory.watch_tenant_events(events_pool, pools, stop).await });
        let (directory, stop) = (state.directory.clone(), background.clone());
        tasks.spawn(async move { directory.reload_periodically(stop).await });
        let (pools, stop) = (state.pools.clone(), background.clone());
        tasks.spawn(async move { pools.sweep(stop).await });
        let (metrics, stop) = (state.metrics.clone(), background.clone());
        tasks.spawn(async move { metrics.upkeep(stop).await });
        let (limits, stop) = (state.limits.clone(), background.clone());
        tasks.spawn(async move { limits.upkeep(stop).await });
        if let Some(tls) = tls.clone() {
            tasks.spawn(tls.reload(background.clone()));
        }

        // The operations port outlives tenant traffic, so /readyz can say "draining".
        let ops_stop = CancellationToken::new();
        let (ops_health, ops_metrics) = (health.clone(), state.metrics.clone());
        let ops_server = tokio::spawn(serve(
            ops_listener,
            None,
            OPS_CONNECTIONS,
            Arc::new(Semaphore::new(OPS_CONNECTIONS.max_connections)),
            ops_stop.clone(),
            move |request: Request<Incoming>| {
                let response = ops::respond(&ops_health, &ops_metrics, &request);
                async move { response }
            },
        ));

        let tenant_state = state.clone();
        let tenant = move |request: Request<Incoming>| {
            let state = tenant_state.clone();
            async move {
                match tls::misdirected(&request) {
                    Some(response) => response,
                    None => handler::handle(state, request).await,
                }
            }
        };
        // TLS on `listen`, unless `https_listen` takes it (then both are served).
        let (listener_tls, https) = match https_listener {
            Some(https) => (None, tls.map(|tls| (https, tls))),
            None => (tls, None),
        };
        let serve_https = async {
            if let Some((https, tls)) = https {
                serve(
                    https,
                    Some(tls),
                    connections,
                    slots.clone(),
                    shutdown.clone(),
                    tenant.clone(),
                )
                .await;
            }
        };
        tokio::join!(
            serve(
                listener,
                listener_tls,
                connections,
                slots.clone(),
                shutdown.clone(),
                tenant.clone()
            ),
            serve_https
        );

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
    Ok(silo_control_plane::pooling::options()
        .max_connections(max_connections)
        .acquire_timeout(CATALOG_ACQUIRE_TIMEOUT)
        .connect_lazy_with(options.application_name(APPLICATION_NAME)))
}

/// Accepts connections until `stop`, serving each with `handle` in a task of its own (behind
/// a TLS handshake when `tls` is set); then drains them: graceful shutdown,
/// `limits.drain_deadline`, then the rest are dropped. At most as many connections as
/// `slots` has permits are served at once; beyond that, accepting waits.
async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<Tls>,
    limits: ConnectionLimits,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
    handle: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let connections = TaskTracker::new();
    let hard_stop = CancellationToken::new();

    loop {
        let slot = tokio::select! {
            () = stop.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
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
        let tls = tls.clone();
        let over_tls = tls.is_some();
        connections.spawn(async move {
            let _slot = slot;
            let handshake = tokio::select! {
                accepted = tls::handshake(tls.as_ref(), stream, peer) => accepted,
                () = stop.cancelled() => None,
            };
            let Some((stream, sni)) = handshake else { return };
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                if let Some(sni) = &sni {
                    request.extensions_mut().insert(sni.clone());
                }
                let response = handle(request);
                async move {
                    let mut response = response.await;
                    response_headers::add(response.headers_mut(), over_tls);
                    Ok::<_, Infallible>(response)
                }
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
    if tokio::time::timeout(limits.drain_deadline, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "connections still open at the drain deadline; closing them"
        );
        hard_stop.cancel();
        connections.wait().await;
    }
}
