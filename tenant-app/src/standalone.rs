//! Serving one tenant database directly: the `silo-tenant-app` bin and [`SingleTenantServer`].
//!
//! Used for app development, as the single-tenant benchmark baseline, and by the end-to-end
//! tests, which start a [`SingleTenantServer`] in-process on port 0.

use std::future::Future;
use std::io::{self, IsTerminal as _};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::postgres::PgConnectOptions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use crate::{DbPool, DbPoolSettings, TenantContext};

/// How long in-flight requests may take to finish once shutdown starts.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// How long a request waits for a pooled connection before answering 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often connections left idle are looked for.
const IDLE_SWEEP: Duration = Duration::from_secs(1);

/// Command line of `silo-tenant-app`.
#[derive(clap::Parser)]
#[command(name = "silo-tenant-app", version, about = "Serve one silo tenant database directly")]
pub struct Args {
    /// PostgreSQL URL of the tenant database, e.g. postgres://USER@HOST:PORT/DB. Prefer the
    /// DATABASE_URL env var to keep a password out of `ps`; without a password in the URL,
    /// PGPASSWORD and ~/.pgpass are used as libpq would.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_parser = parse_secret)]
    pub database_url: SecretString,

    /// Address to listen on (HTTP).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    /// Tenant slug reported by GET /api/v1/me.
    #[arg(long, value_parser = parse_slug)]
    pub tenant: String,

    /// Size of the connection pool.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_connections: u32,

    /// Close a pooled connection unused this long (e.g. 10m, 30s).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// End any statement running longer than this (PostgreSQL's `statement_timeout`; the
    /// request gets 503). 0s: never.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub statement_timeout: Duration,

    /// Apply the tenant schema migrations before serving.
    #[arg(long)]
    pub migrate: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_secret(s: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(s.to_owned()))
}

/// Checks the slug shape of the contract (`^[a-z][a-z0-9-]{1,30}[a-z0-9]$`).
fn parse_slug(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let ok = (3..=32).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.last().is_some_and(|b| *b != b'-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err("expected 3-32 of [a-z0-9-], starting with a letter, not ending with '-'".into())
    }
}

/// Runs the standalone app until SIGTERM or Ctrl-C: bind, connect, (migrate), serve, drain.
pub async fn run(args: Args) -> anyhow::Result<()> {
    init_logging();
    let options = args
        .database_url
        .expose_secret()
        .parse::<PgConnectOptions>()
        .context("parse --database-url")?
        .options([("statement_timeout", format!("{}ms", args.statement_timeout.as_millis()))]);
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let pool = DbPool::connect(options, DbPoolSettings::new(args.max_connections, ACQUIRE_TIMEOUT))
        .await
        .context("connect to the tenant database")?;
    if args.migrate {
        let mut conn = pool.acquire().await.context("connect to the tenant database")?;
        sqlx::migrate!("../migrations/tenant")
            .run(&mut *conn)
            .await
            .context("apply tenant migrations")?;
        tracing::info!("tenant migrations applied");
    }
    let sweeper = tokio::spawn(close_idle_connections(pool.clone(), args.idle_timeout));
    let tenant = TenantContext::new(args.tenant, pool.clone());
    let server = SingleTenantServer::new(listener, tenant);
    let addr = server.local_addr().context("read the listen address")?;
    println!("listening on http://{addr}");
    let result = server.run(shutdown_signal()).await;
    sweeper.abort();
    // Requests cut off by the drain deadline may still hold connections: don't wait forever.
    if tokio::time::timeout(DRAIN_DEADLINE, pool.close_and_wait())
        .await
        .is_err()
    {
        tracing::warn!("database connections still busy at exit");
    }
    result.context("serve HTTP")
}

/// Every [`IDLE_SWEEP`], closes the connections unused for `idle_timeout`: an app nobody
/// calls for hours should not keep PostgreSQL backends waiting with it.
async fn close_idle_connections(pool: DbPool, idle_timeout: Duration) {
    let mut ticks = tokio::time::interval(IDLE_SWEEP);
    loop {
        ticks.tick().await;
        pool.close_idle(idle_timeout);
    }
}

/// `error` and its causes on one line, `outer: inner`, skipping a cause whose text the
/// previous message already ends with (sqlx repeats a database error as its own source).
pub fn error_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    let mut previous = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !previous.ends_with(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        previous = text;
    }
    line
}

/// The tenant app bound to a socket and serving one tenant.
pub struct SingleTenantServer {
    listener: TcpListener,
    app: Router,
}

impl SingleTenantServer {
    /// Serves [`crate::app()`] on `listener`, with `tenant` inserted into every request.
    pub fn new(listener: TcpListener, tenant: TenantContext) -> Self {
        let slug = tenant.slug.clone();
        let app = crate::app().layer(axum::Extension(tenant)).layer(
            TraceLayer::new_for_http()
                .make_span_with(move |req: &axum::http::Request<_>| {
                    // Method and path only: headers carry the API key.
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        path = %req.uri().path(),
                        tenant = %slug,
                    )
                })
                // ApiError logs server errors with their cause; don't log them twice.
                .on_failure(()),
        );
        SingleTenantServer { listener, app }
    }

    /// The address the server listens on (useful after binding port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish for up to
    /// 10 s before returning.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
        let token = CancellationToken::new();
        let serve = axum::serve(self.listener, self.app).with_graceful_shutdown(token.clone().cancelled_owned());
        let trigger = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight requests");
            trigger.cancel();
        });
        tokio::select! {
            result = serve => result,
            () = async { token.cancelled().await; tokio::time::sleep(DRAIN_DEADLINE).await } => {
                tracing::warn!("drain deadline passed: dropping remaining connections");
                Ok(())
            }
        }
    }
}

/// Completes on the first SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second init (e.g. a host that already set a subscriber) keeps the first one.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines_skip_repeated_causes() {
        let inner = anyhow::anyhow!("password authentication failed");
        let outer = inner
            .context("error returned from database: password authentication failed")
            .context("connect to the tenant database");
        assert_eq!(
            error_line(&outer),
            "connect to the tenant database: error returned from database: password \
             authentication failed"
        );
    }

    #[test]
    fn slugs_follow_the_contract() {
        for ok in ["acme", "acme-corp", "a1b", "abc"] {
            assert!(parse_slug(ok).is_ok(), "{ok}");
        }
        for bad in ["", "ab", "1abc", "acme-", "Acme", "ac_me", &"a".repeat(33)] {
            assert!(parse_slug(bad).is_err(), "{bad}");
        }
    }
}
