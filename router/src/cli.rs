//! `silo-router --config FILE`: parse args → logging → config → bind (fail fast) → print
//! the addresses → serve until SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use silo_control_plane::config::Config;
use tokio_util::sync::CancellationToken;

use crate::RouterServer;
use silo_control_plane::tls::TlsConfigError;

/// silo router: routes each request to its tenant's database and the tenant app.
#[derive(Debug, Parser)]
#[command(name = "silo-router", version)]
struct Args {
    /// The silo config file (silo.toml).
    #[arg(long, env = "SILO_CONFIG", value_name = "FILE")]
    config: PathBuf,
    /// Log line format (level filter from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Runs the router binary; returns its exit code (2 for a usage or config error).
pub async fn run_cli() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(args.log_format);
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let server = match RouterServer::bind(config).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("error: {error:#}");
            // Unusable TLS files are a bad config; a taken port or an unreachable catalog is not.
            return if error.downcast_ref::<TlsConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            };
        }
    };
    if server.https_addr() != Some(server.local_addr()) {
        println!("router listening on http://{}", server.local_addr());
    }
    if let Some(addr) = server.https_addr() {
        println!("router listening on https://{addr}");
    }
    println!("ops listening on http://{}", server.ops_addr());

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match server.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C (SIGINT).
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
