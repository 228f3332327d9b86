//! `silo.toml`: TOML → raw structs (`raw`, `deny_unknown_fields`) → a validated [`Config`].
//!
//! Secrets never live in the file: the file names environment variables (or secret-store
//! entries) and the values are read once, here, into `SecretString`s. Every error is one line
//! naming the key and the problem.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;

pub use backups::{BackupPolicy, BackupsConfig, BackupsS3Config, S3Encryption};
use raw::{RawConfig, RawControlPlane, RawMigrations, RawRotation};
pub use router::{PlanLimits, RouterConfig, TlsFiles};
pub use secrets::{SecretsBackend, SecretsConfig};
pub use server_tls::ServerTls;
pub use servers::{is_region_name, AdminPassword, ServerConfig, TenantRoleLimits};

mod backups;
mod raw;
mod router;
mod secrets;
mod server_tls;
mod servers;

/// More spares than this is a typo, not a plan: each is a full copy of the template.
const MAX_SPARE_DATABASES: usize = 64;

/// Environment variable holding the catalog database password.
pub const CATALOG_PASSWORD_ENV: &str = "SILO_CATALOG_PASSWORD";

/// A config error: the key at fault and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The config path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown or missing keys.
    #[error("config {path}: {message}")]
    Parse {
        /// The config path.
        path: PathBuf,
        /// The parser's message, flattened to one line.
        message: String,
    },
    /// A key has a value that is not acceptable.
    #[error("config key `{key}`: {problem}")]
    Invalid {
        /// The dotted key.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The validated configuration of a silo deployment.
#[derive(Debug, Clone)]
pub struct Config {
    /// The catalog database.
    pub catalog: CatalogConfig,
    /// Read tenant migrations from this directory instead of the embedded ones.
    pub tenant_migrations_dir: Option<PathBuf>,
    /// The secret store.
    pub secrets: SecretsConfig,
    /// PostgreSQL servers that hold tenant databases.
    pub servers: Vec<ServerConfig>,
    /// The control plane's admin API and workers.
    pub control_plane: ControlPlaneConfig,
    /// Credential rotation.
    pub rotation: RotationConfig,
    /// Tenant migration rollouts.
    pub migrations: MigrationsConfig,
    /// Backups of tenant databases (`tenant delete --backup`).
    pub backups: BackupsConfig,
    /// The router.
    pub router: RouterConfig,
}

/// Where the catalog lives. The password comes from `SILO_CATALOG_PASSWORD`.
#[derive(Clone)]
pub struct CatalogConfig {
    /// `postgres://USER@HOST:PORT/DB` without a password.
    pub url: String,
    /// From `SILO_CATALOG_PASSWORD`, if set.
    pub password: Option<SecretString>,
}

impl std::fmt::Debug for CatalogConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogConfig")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// The `[control_plane]` section.
#[derive(Clone)]
pub struct ControlPlaneConfig {
    /// The admin API address.
    pub listen: SocketAddr,
    /// Name of the environment variable with the bootstrap admin token.
    pub admin_token_env: String,
    /// The bootstrap admin token, if the variable is set.
    pub admin_token: Option<SecretString>,
    /// Jobs run concurrently by one control plane.
    pub workers: usize,
    /// How long a claimed job stays with its worker without a heartbeat.
    pub job_lease: Duration,
    /// PEM certificate chain and key: the admin API is served over HTTPS (plain HTTP without).
    pub tls: Option<CertFiles>,
}

/// A PEM certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate chain, the server's own first.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
}

impl std::fmt::Debug for ControlPlaneConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneConfig")
            .field("listen", &self.listen)
            .field("admin_token_env", &self.admin_token_env)
            .field("workers", &self.workers)
            .field("job_lease", &self.job_lease)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// How credentials are rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationStrategy {
    /// One login role; its password changes.
    Single,
    /// Two login roles take turns.
    Alternating,
}

impl RotationStrategy {
    /// The name the config, the API and job parameters use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Alternating => "alternating",
        }
    }
}

impl std::str::FromStr for RotationStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "single" => Ok(Self::Single),
            "alternating" => Ok(Self::Alternating),
            other => Err(format!("must be \"single\" or \"alternating\", not {other:?}")),
        }
    }
}

/// The `[rotation]` section.
#[derive(Debug, Clone)]
pub struct RotationConfig {
    /// Default strategy.
    pub strategy: RotationStrategy,
    /// Rotate credentials older than this.
    pub interval: Duration,
    /// Scheduled rotations start at a random delay up to this, spreading them over time.
    pub jitter: Duration,
    /// At most this many scheduled rotations are queued or running at once.
    pub max_concurrent: u32,
    /// How often the scheduler looks for due tenants.
    pub check_every: Duration,
}

/// The `[migrations]` section: defaults of a rollout.
#[derive(Debug, Clone)]
pub struct MigrationsConfig {
    /// Tenants migrated at once.
    pub concurrency: usize,
    /// Tenants migrated at once on one PostgreSQL server.
    pub per_server_concurrency: usize,
    /// Tenants migrated first, alone; any failure among them stops the rollout.
    pub canary: usize,
    /// The rollout halts once more than this percentage of its tenants failed.
    pub max_failure_percent: u32,
    /// New tenant databases are copied from a per-server template at the current schema
    /// (false: created empty and migrated, slower).
    pub templates: bool,
    /// Copies of the template kept ready per server, so onboarding renames a database
    /// instead of copying one (with `templates` only; 0 turns them off).
    pub spare_databases: usize,
}

/// `path` as named in the config file in `base`: relative paths are relative to it.
fn resolve(base: &Path, path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

fn duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value).map_err(|e| {
        invalid(
            key,
            format!("{value:?} is not a duration like \"30s\", \"5m\", \"30d\": {e}"),
        )
    })
}

fn socket_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| invalid(key, format!("{value:?} is not an address like \"127.0.0.1:8080\"")))
}

impl Config {
    /// Reads and validates the config file at `path`; relative paths in it are relative to
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: parse_error_message(text, &e),
        })?;
        let servers = servers::parse(raw.servers, base)?;
        Ok(Self {
            catalog: catalog(raw.catalog_url)?,
            tenant_migrations_dir: raw.tenant_migrations_dir.map(|p| resolve(base, p)),
            secrets: secrets::parse(raw.secrets, base)?,
            control_plane: control_plane(raw.control_plane, base)?,
            rotation: rotation(raw.rotation)?,
            migrations: migrations(raw.migrations)?,
            router: router::parse(raw.router, &servers, base)?,
            backups: backups::parse(raw.backups, base)?,
            servers,
        })
    }

    /// The server named `name`.
    pub fn server(&self, name: &str) -> Option<&ServerConfig> {
        self.servers.iter().find(|s| s.name == name)
    }
}

/// `catalog_url`, checked, with the password from [`CATALOG_PASSWORD_ENV`].
fn catalog(url: String) -> Result<CatalogConfig, ConfigError> {
    if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
        return Err(invalid("catalog_url", "must be a postgres:// URL"));
    }
    if url.contains(':') && url_has_password(&url) {
        return Err(invalid(
            "catalog_url",
            format!("must not contain a password; set {CATALOG_PASSWORD_ENV} instead"),
        ));
    }
    Ok(CatalogConfig {
        url,
        password: std::env::var(CATALOG_PASSWORD_ENV)
            .ok()
            .filter(|p| !p.is_empty())
            .map(SecretString::from),
    })
}

/// The `[control_plane]` section, checked; relative paths are relative to `base`.
fn control_plane(cp: RawControlPlane, base: &Path) -> Result<ControlPlaneConfig, ConfigError> {
    if cp.workers == 0 {
        return Err(invalid("control_plane.workers", "must be at least 1"));
    }
    Ok(ControlPlaneConfig {
        listen: socket_addr("control_plane.listen", &cp.listen)?,
        admin_token: std::env::var(&cp.admin_token_env)
            .ok()
            .filter(|t| !t.is_empty())
            .map(SecretString::from),
        admin_token_env: cp.admin_token_env,
        workers: cp.workers,
        job_lease: duration("control_plane.job_lease", &cp.job_lease)?,
        tls: match (cp.tls_cert_file, cp.tls_key_file) {
            (Some(cert), Some(key)) => Some(CertFiles {
                cert_file: resolve(base, cert),
                key_file: resolve(base, key),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "control_plane.tls_key_file",
                    "is required with control_plane.tls_cert_file",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "control_plane.tls_cert_file",
                    "is required with control_plane.tls_key_file",
                ))
            }
        },
    })
}

/// The `[rotation]` section, checked.
fn rotation(raw: RawRotation) -> Result<RotationConfig, ConfigError> {
    Ok(RotationConfig {
        strategy: raw
            .strategy
            .parse()
            .map_err(|e: String| invalid("rotation.strategy", e))?,
        interval: duration("rotation.interval", &raw.interval)?,
        jitter: duration("rotation.jitter", &raw.jitter)?,
        max_concurrent: raw.max_concurrent.max(1),
        check_every: duration("rotation.check_every", &raw.check_every)?,
    })
}

/// The `[migrations]` section, checked.
fn migrations(m: RawMigrations) -> Result<MigrationsConfig, ConfigError> {
    if m.concurrency == 0 {
        return Err(invalid("migrations.concurrency", "must be at least 1"));
    }
    if m.per_server_concurrency == 0 {
        return Err(invalid("migrations.per_server_concurrency", "must be at least 1"));
    }
    if m.max_failure_percent > 100 {
        return Err(invalid("migrations.max_failure_percent", "must be between 0 and 100"));
    }
    if m.spare_databases > MAX_SPARE_DATABASES {
        return Err(invalid(
            "migrations.spare_databases",
            format!("must be at most {MAX_SPARE_DATABASES}"),
        ));
    }
    Ok(MigrationsConfig {
        concurrency: m.concurrency,
        per_server_concurrency: m.per_server_concurrency,
        canary: m.canary,
        max_failure_percent: m.max_failure_percent,
        templates: m.templates,
        spare_databases: m.spare_databases,
    })
}

/// A TOML error on one line, with where it is: serde's messages for a value of the wrong
/// type do not name the key (`invalid type: string "5432", expected u16`), so the line, the
/// key on it and its table are added. The value is not repeated beyond what the message
/// says.
fn parse_error_message(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', " ");
    let Some(span) = error.span() else {
        return message;
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or_default().trim();
    let table = text
        .lines()
        .take(line_no)
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .last()
        .and_then(|header| header.split(']').next())
        .map(|header| header.trim_start_matches('[').trim());
    let key = line
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|key| !key.is_empty() && !key.starts_with('['));
    match (table, key) {
        (Some(table), Some(key)) => format!("line {line_no}, {table}.{key}: {message}"),
        (None, Some(key)) => format!("line {line_no}, {key}: {message}"),
        _ => format!("line {line_no}: {message}"),
    }
}

/// True if the URL's authority has `user:password@`.
fn url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
catalog_url = "postgres://postgres@127.0.0.1:5432/silo_catalog"
[secrets]
local_master_key_file = "master.key"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = Config::parse(MINIMAL, Path::new("/etc/silo")).unwrap();
        assert_eq!(cfg.router.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.router.pool_idle_timeout, Duration::from_secs(300));
        assert_eq!(cfg.router.max_body_bytes, 64 * 1024);
        assert_eq!(cfg.router.plans["standard"].requests_per_second, 1000);
        assert_eq!(cfg.rotation.strategy, RotationStrategy::Alternating);
        assert_eq!(cfg.rotation.interval, Duration::from_secs(30 * 86400));
        match cfg.secrets.backend {
            SecretsBackend::Local { master_key_file, .. } => {
                assert_eq!(master_key_file, Path::new("/etc/silo/master.key"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let example = include_str!("../../../deploy/silo.toml.example");
        let cfg = Config::parse(example, Path::new("/etc/silo")).unwrap();
        assert_eq!(cfg.migrations.spare_databases, 2);
        assert!(cfg.migrations.templates);
    }

    #[test]
    fn the_deploy_configs_are_valid_and_take_encrypted_backups_on_schedule() {
        let compose = include_str!("../../../deploy/compose/silo.toml");
        let configmap = include_str!("../../../deploy/k8s/configmap.yaml");
        // The ConfigMap's silo.toml: the block scalar after `silo.toml: |`, indented 4 spaces.
        let k8s: String = configmap
            .lines()
            .skip_while(|line| !line.trim_start().starts_with("silo.toml: |"))
            .skip(1)
            .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
            .collect();
        for (name, text) in [("compose", compose), ("k8s", k8s.as_str())] {
            let cfg = Config::parse(text, Path::new("/etc/silo")).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(cfg.backups.dir.is_some(), "{name}");
            assert!(cfg.backups.encryption_key_file.is_some(), "{name}");
            assert!(cfg.backups.policy.keep_for.is_some(), "{name}");
            assert!(cfg.backups.policy.every.is_some(), "{name}");
        }
    }

    #[test]
    fn a_plans_backup_policy_takes_what_it_leaves_out_from_backups() {
        let text = format!(
            "{MINIMAL}\n[backups]\ndir = \"b\"\nevery = \"24h\"\nkeep_last = 7\nkeep_for = \"30d\"\n\
             [backups.plans.enterprise]\nevery = \"6h\"\nkeep_for = \"400d\"\nverify_every = \"7d\"\n"
        );
        let cfg = Config::parse(&text, Path::new(".")).unwrap();
        let day = Duration::from_secs(86_400);
        assert_eq!(
            cfg.backups.policy_of("enterprise"),
            &BackupPolicy {
                keep_last: Some(7),
                keep_for: Some(400 * day),
                every: Some(day / 4),
                verify_every: Some(7 * day),
            }
        );
        let standard = BackupPolicy {
            keep_last: Some(7),
            keep_for: Some(30 * day),
            every: Some(day),
            verify_every: None,
        };
        assert_eq!(cfg.backups.policy_of("standard"), &standard);
        assert_eq!(cfg.backups.policy_of("unknown"), &standard);
        assert_eq!(cfg.backups.policies().count(), 2);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse(&format!("{MINIMAL}\n[router]\nlisten_addr = \"x\"\n"), Path::new(".")).unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn values_of_the_wrong_type_name_their_key_and_line_on_one_line() {
        for (extra, named) in [
            (
                "[[servers]]\nname = \"pg-1\"\nhost = \"h\"\nport = \"5432\"\n",
                "line 8, servers.port: invalid type: string \"5432\", expected u16",
            ),
            (
                "[router]\nmax_connections_per_tenant = \"5\"\n",
                "line 6, router.max_connections_per_tenant: invalid type: string \"5\"",
            ),
            ("[backups]\ndir = 7\n", "line 6, backups.dir: invalid type: integer `7`"),
        ] {
            let err = Config::parse(&format!("{MINIMAL}{extra}"), Path::new(".")).unwrap_err();
            let message = err.to_string();
            assert!(message.contains(named), "{message}");
            assert_eq!(message.lines().count(), 1, "{message}");
        }
        let err = Config::parse("catalog_url = 5\n", Path::new(".")).unwrap_err();
        assert!(err.to_string().contains("line 1, catalog_url: invalid type"), "{err}");
    }

    #[test]
    fn aws_kms_key_id_is_for_the_aws_backend_only() {
        let aws = |key: &str| {
            format!(
                "catalog_url = \"postgres://postgres@127.0.0.1:5432/silo_catalog\"\n[secrets]\n\
                 backend = \"aws\"\naws_region = \"eu-west-1\"\naws_kms_key_id = \"{key}\"\n"
            )
        };
        let cfg = Config::parse(&aws("alias/silo-secrets"), Path::new(".")).unwrap();
        assert!(matches!(
            cfg.secrets.backend,
            SecretsBackend::Aws { kms_key_id: Some(ref key), .. } if key == "alias/silo-secrets"
        ));
        let local = MINIMAL.replace("[secrets]\n", "[secrets]\naws_kms_key_id = \"alias/silo-secrets\"\n");
        for config in [local, aws(" ")] {
            let err = Config::parse(&config, Path::new(".")).unwrap_err();
            assert!(err.to_string().contains("secrets.aws_kms_key_id"), "{err}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        for (extra, key) in [
            ("[router]\npool_idle_timeout = \"soon\"\n", "router.pool_idle_timeout"),
            ("[migrations]\nspare_databases = 1000\n", "migrations.spare_databases"),
            ("[router]\nlisten = \"nowhere\"\n", "router.listen"),
            ("[router]\nbudget_wait = \"later\"\n", "router.budget_wait"),
            ("[router]\ndefault_plan = \"gold\"\n", "router.default_plan"),
            ("[backups]\nkeep_last = 0\n", "backups.keep_last"),
            ("[backups]\nkeep_for = \"soon\"\n", "backups.keep_for"),
            ("[backups]\nkeep_for = \"30d\"\n", "backups.keep_for"),
            ("[backups]\nevery = \"1d\"\n", "backups.every"),
            ("[backups]\nverify_every = \"7d\"\n", "backups.verify_every"),
            (
                "[backups]\ndir = \"b\"\nverify_every = \"0s\"\n",
                "backups.verify_every",
            ),
            (
                "[backups]\ndir = \"b\"\nevery = \"1d\"\nmax_concurrent = 0\n",
                "backups.max_concurrent",
            ),
            ("[backups]\nkeep_for = \"0s\"\n", "backups.keep_for"),
            (
                "[backups]\ndir = \"b\"\n[backups.plans.gold]\nkeep_last = 0\n",
                "backups.plans.gold.keep_last",
            ),
            (
                "[backups]\ndir = \"b\"\n[backups.plans.gold]\nevery = \"0s\"\n",
                "backups.plans.gold.every",
            ),
            ("[backups.plans.gold]\nevery = \"6h\"\n", "backups.plans.gold.every"),
            (
                "[backups]\ndir = \"b\"\n[backups.plans.gold]\nkeep = 3\n",
                "keep",
            ),
            (
                "[backups]\nprevious_encryption_key_files = [\"old.key\"]\n",
                "backups.previous_encryption_key_files",
            ),
            (
                "[backups.s3]\nbucket = \"silo-backups\"\n",
                "`backups.s3`: needs backups.dir",
            ),
            (
                "[backups]\ndir = \"b\"\n[backups.s3]\nbucket = \"Silo_Backups\"\n",
                "backups.s3.bucket",
            ),
            (
                "[backups]\ndir = \"b\"\n[backups.s3]\nbucket = \"sb\"\n",
                "backups.s3.bucket",
            ),
            (
                "[backups]\ndir = \"b\"\n[backups.s3]\nbucket = \"silo-backups\"\nprefix = \"silo\"\n",
                "backups.s3.prefix",
            ),
            (
                "[backups]\ndir = \"b\"\n[backups.s3]\nbucket = \"silo-backups\"\nendpoint_url = \"ftp://x\"\n",
                "backups.s3.endpoint_url",
            ),
            (
                "[backups]\ndir = \"b\"\n[backups.s3]\nbucket = \"silo-backups\"\npart_size_mib = 1\n",
                "backups.s3.part_size_mib",
            ),
            ("[backups]\ndir = \"b\"\n[backups.s3]\nprefix = \"silo/\"\n", "bucket"),
            (
                "[backups]\ndir = \"b\"\n[backups.s3]\nbucket = \"silo-backups\"\nserver_side_encryption = \"aws:kms:dsse\"\n",
                "backups.s3.server_side_encryption",
            ),
            (
                "[backups]\ndir = \"b\"\n[backups.s3]\nbucket = \"silo-backups\"\nkms_key_id = \"alias/silo\"\n",
                "backups.s3.kms_key_id",
            ),
            (
                "[backups]\ndir = \"b\"\n[backups.s3]\nbucket = \"silo-backups\"\nserver_side_encryption = \"aws:kms\"\nkms_key_id = \" \"\n",
                "backups.s3.kms_key_id",
            ),
            ("[router.plans.gold]\nburst = 0\n", "router.plans.gold.burst"),
            ("[rotation]\nstrategy = \"double\"\n", "rotation.strategy"),
        ] {
            let err = Config::parse(&format!("{MINIMAL}\n{extra}"), Path::new(".")).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn bad_server_values_name_their_key() {
        const SERVER: &str = "[[servers]]\nname = \"pg-1\"\nhost = \"h\"\nport = 5432\nadmin_user = \"u\"\n";
        for (extra, key) in [
            ("", "servers[0].admin_password_env"),
            (
                "admin_password_env = \"P\"\nsslmode = \"strict\"\n",
                "servers[0].sslmode",
            ),
            (
                "admin_password_env = \"P\"\nsslmode = \"verify-full\"\nsslrootcert = \"/nonexistent/ca.pem\"\n",
                "servers[0].sslrootcert",
            ),
            (
                "admin_password_env = \"P\"\ntenant_connection_limit = 0\n",
                "servers[0].tenant_connection_limit",
            ),
            (
                "admin_password_env = \"P\"\ntenant_connection_limit = 3\n[router]\nmax_connections_per_tenant = 2\n",
                "servers[0].tenant_connection_limit",
            ),
            (
                "admin_password_env = \"P\"\ntenant_idle_in_transaction_timeout = \"500ms\"\n",
                "servers[0].tenant_idle_in_transaction_timeout",
            ),
            (
                "admin_password_env = \"P\"\nregion = \"EU West\"\n",
                "servers[0].region",
            ),
        ] {
            let err = Config::parse(&format!("{MINIMAL}\n{SERVER}{extra}"), Path::new(".")).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn servers_reached_without_verification_are_named_unless_local() {
        let server = |host: &str, tls: &str| {
            let toml = format!(
                "{MINIMAL}\n[[servers]]\nname = \"pg-1\"\nhost = \"{host}\"\nport = 5432\nadmin_user = \"u\"\n\
                 admin_password_env = \"P\"\n{tls}"
            );
            Config::parse(&toml, Path::new(".")).unwrap().servers.remove(0)
        };
        let warning = server("db.example.com", "")
            .unverified_tls_warning()
            .expect("a warning");
        assert!(warning.contains("pg-1") && warning.contains("\"prefer\""), "{warning}");
        assert!(server("db.example.com", "sslmode = \"require\"\n")
            .unverified_tls_warning()
            .is_some());
        assert!(server("db.example.com", "sslmode = \"verify-full\"\n")
            .unverified_tls_warning()
            .is_none());
        for local in ["127.0.0.1", "::1", "localhost", "/var/run/postgresql"] {
            assert!(server(local, "").unverified_tls_warning().is_none(), "{local}");
        }
    }

    #[test]
    fn tls_keys_are_checked_together() {
        let tls = "[router]\ntls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"\n";
        let cfg = Config::parse(
            &format!("{MINIMAL}\n{tls}https_listen = \"127.0.0.1:8443\"\ntls_sni_dir = \"sni\"\n"),
            Path::new("/etc/silo"),
        )
        .unwrap();
        let files = cfg.router.tls.unwrap();
        assert_eq!(files.sni_dir.as_deref(), Some(Path::new("/etc/silo/sni")));
        assert_eq!(files.sni_reload_interval, Duration::from_secs(5));
        assert_eq!(cfg.router.https_listen.map(|a| a.port()), Some(8443));
        for (extra, key) in [
            ("[router]\nhttps_listen = \"127.0.0.1:8443\"\n", "router.https_listen"),
            ("[router]\ntls_sni_dir = \"sni\"\n", "router.tls_sni_dir"),
            ("[router]\ntls_cert_file = \"c.pem\"\n", "router.tls_key_file"),
            (&format!("{tls}https_listen = \"nowhere\"\n"), "router.https_listen"),
            (
                &format!("{tls}tls_sni_reload_interval = \"0s\"\n"),
                "router.tls_sni_reload_interval",
            ),
        ] {
            let err = Config::parse(&format!("{MINIMAL}\n{extra}"), Path::new(".")).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn password_in_catalog_url_is_refused() {
        let text = MINIMAL.replace("postgres@", "postgres:hunter2@");
        let err = Config::parse(&text, Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("catalog_url") && !err.contains("hunter2"), "{err}");
    }
}
