//! `silo-control-plane --config FILE`: the admin API and the job workers.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::backup::{BackupError, Backups};
use crate::catalog;
use crate::config::{Config, SecretsBackend};
use crate::keyfile::KeyFileError;
use crate::secrets::local::LocalSecretStore;
use crate::server::ControlPlane;

/// silo control plane: admin API and job workers.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of silo.toml.
    #[arg(long, env = "SILO_CONFIG")]
    config: PathBuf,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Maintenance commands (without one, the control plane runs).
#[derive(Subcommand)]
enum Command {
    /// Re-encrypt every secret of the local store under the current master key
    /// (secrets.local_master_key_file) after a master key rotation, then exit.
    RekeySecrets,
    /// Encrypt every backup in [backups] dir under the current key
    /// (backups.encryption_key_file): plain ones taken before a key was set, and those under
    /// a key of backups.previous_encryption_key_files; then exit.
    RekeyBackups,
    /// Decrypt one backup into a pg_dump custom-format file, for pg_restore outside silo.
    DecryptBackup {
        /// The encrypted backup (a file in [backups] dir/SLUG/).
        file: PathBuf,
        /// The file to write (must not exist; created readable by its owner only).
        #[arg(long, short)]
        output: PathBuf,
    },
}

/// Runs the control plane until SIGTERM or Ctrl-C. Exit 2 for a bad config, 1 when it fails.
pub async fn run() -> ExitCode {
    let args = Args::parse();
    init_logging(&args.log_format);
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match args.command {
        Some(Command::RekeySecrets) => return rekey_secrets(&config).await,
        Some(Command::RekeyBackups) => return rekey_backups(&config).await,
        Some(Command::DecryptBackup { file, output }) => return decrypt_backup(&config, &file, &output).await,
        None => {}
    }
    let cp = match ControlPlane::bind(config).await {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("error: {e:#}");
            let bad_config = e.downcast_ref::<crate::tls::TlsConfigError>().is_some()
                || e.downcast_ref::<KeyFileError>().is_some()
                || e.downcast_ref::<crate::backup::OpenError>().is_some();
            return ExitCode::from(if bad_config { 2 } else { 1 });
        }
    };
    println!("control plane listening on {}", cp.url());
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match cp.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `rekey-secrets`: re-encrypts the local store under the current master key. Exit 2 for a
/// config that has no local store or unusable key files, 1 when the catalog fails.
async fn rekey_secrets(config: &Config) -> ExitCode {
    let SecretsBackend::Local {
        master_key_file,
        previous_master_key_files,
    } = &config.secrets.backend
    else {
        eprintln!(
            "error: config key `secrets.backend`: rekey-secrets re-encrypts the local store; AWS Secrets Manager's keys are rotated in AWS KMS"
        );
        return ExitCode::from(2);
    };
    let catalog = match catalog::pool(&config.catalog, 2) {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = catalog::migrate(&catalog).await {
        eprintln!("error: connect to the catalog and apply its migrations: {e:#}");
        return ExitCode::from(1);
    }
    let store = match LocalSecretStore::open(master_key_file, previous_master_key_files, catalog) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match store.rekey().await {
        Ok(report) => {
            println!(
                "{} secret versions re-encrypted under {}, {} already under it ({} secrets)",
                report.reencrypted,
                master_key_file.display(),
                report.current,
                report.secrets
            );
            if !previous_master_key_files.is_empty() {
                println!(
                    "secrets.local_previous_master_key_files can now be removed from the config of every control plane and router"
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// The backups `config` sets up, with their keys; exit 2 when a key file is unusable.
async fn backups_of(config: &Config) -> Result<Backups, ExitCode> {
    Backups::open(config.backups.clone()).await.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

/// Exit 2 for what the config lacks, 1 for what went wrong with the files.
fn backup_failure(e: &BackupError) -> ExitCode {
    eprintln!("error: {e}");
    match e {
        BackupError::NotConfigured | BackupError::NotEncrypting => ExitCode::from(2),
        _ => ExitCode::from(1),
    }
}

/// `rekey-backups`: encrypts every backup under the current key. Exit 1 when any could not be.
async fn rekey_backups(config: &Config) -> ExitCode {
    let backups = match backups_of(config).await {
        Ok(backups) => backups,
        Err(code) => return code,
    };
    let report = match backups.rekey().await {
        Ok(report) => report,
        Err(e) => return backup_failure(&e),
    };
    for failure in &report.failed {
        eprintln!("error: {failure}");
    }
    println!(
        "backups: {} encrypted, {} re-encrypted from a previous key, {} already under the current key, {} failed",
        report.encrypted,
        report.reencrypted,
        report.current,
        report.failed.len()
    );
    if !report.failed.is_empty() {
        return ExitCode::from(1);
    }
    if !config.backups.previous_encryption_key_files.is_empty() {
        println!("backups.previous_encryption_key_files can now be removed from the config of every control plane");
    }
    ExitCode::SUCCESS
}

/// `decrypt-backup FILE --output OUT`.
async fn decrypt_backup(config: &Config, file: &std::path::Path, output: &std::path::Path) -> ExitCode {
    let backups = match backups_of(config).await {
        Ok(backups) => backups,
        Err(code) => return code,
    };
    match backups.decrypt(file, output).await {
        Ok(decrypted) => {
            println!(
                "{}: backup of tenant {}, {} bytes of pg_dump output written to {} (restore it with pg_restore)",
                file.display(),
                decrypted.slug,
                decrypted.bytes,
                output.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => backup_failure(&e),
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
pub async fn cancel_on_signal(token: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    token.cancel();
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON lines.
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
