//! `silo.toml`: TOML → raw structs (`raw`, `deny_unknown_fields`) → a validated [`Config`].
//!
//! Secrets never live in the file: the file names environment variables (or secret-store
//! entries) and the values are read once, here, into `SecretString`s. Every error is one line
//! naming the key and the problem.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;

use raw::{default_plan, RawConfig, RawPlan};
pub use server_tls::ServerTls;

mod raw;
mod server_tls;

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

/// Which secret store holds tenant credentials.
#[derive(Debug, Clone)]
pub enum SecretsBackend {
    /// Encrypted in the catalog under a local master key file (mode 0600).
    Local {
        /// Path of the master key file (32 random bytes, base64): it encrypts.
        master_key_file: PathBuf,
        /// Keys that encrypted before the current one: they still decrypt, until
        /// `silo-control-plane rekey-secrets` has re-encrypted everything under the current key.
        previous_master_key_files: Vec<PathBuf>,
    },
    /// AWS Secrets Manager.
    Aws {
        /// The AWS region.
        region: String,
        /// An endpoint override (moto, LocalStack).
        endpoint_url: Option<String>,
        /// Days a deleted secret can be recovered (7..=30).
        recovery_window_days: u32,
        /// The KMS key new secrets are encrypted under (an id, ARN or alias); None: the
        /// account's `aws/secretsmanager` key.
        kms_key_id: Option<String>,
    },
}

/// The `[secrets]` section.
#[derive(Debug, Clone)]
pub struct SecretsConfig {
    /// The backend.
    pub backend: SecretsBackend,
    /// Prefix of every secret name, e.g. `silo/`.
    pub name_prefix: String,
}

/// Where a server's admin password comes from. Resolved only by the control plane, so a
/// router never needs the servers' admin passwords.
#[derive(Clone)]
pub enum AdminPassword {
    /// The environment variable holding it.
    Env(String),
    /// Stored in the secret store under this name (JSON with a `password` field, or plain).
    Secret(String),
}

impl std::fmt::Debug for AdminPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Env(var) => f.debug_tuple("Env").field(var).finish(),
            Self::Secret(name) => f.debug_tuple("Secret").field(name).finish(),
        }
    }
}

/// One PostgreSQL server that holds tenant databases.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Unique name, e.g. `pg-1`.
    pub name: String,
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// A superuser (or CREATEROLE + CREATEDB) role the control plane uses.
    pub admin_user: String,
    /// The admin role's password.
    pub admin_password: AdminPassword,
    /// No more tenants are placed here beyond this many.
    pub max_tenants: u32,
    /// TLS of every connection silo opens to it (`sslmode`, `sslrootcert`).
    pub tls: ServerTls,
    /// What each tenant's login roles on this server are held to.
    pub tenant_roles: TenantRoleLimits,
    /// Where its data lives (`region`, e.g. "eu-west-1"): a tenant created for a region is
    /// placed on a server there, and no move takes a tenant out of its server's region unless
    /// asked to. None: no region.
    pub region: Option<String>,
}

/// Whether `name` can be a region: 1-63 of `[a-z0-9-]`, not starting with '-'.
pub fn is_region_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Limits PostgreSQL enforces on every tenant login role of a server, whoever connects with
/// it (the routers' pools, silo's jobs, someone with the break-glass credentials), so that one
/// tenant cannot take the server's connections or hold back its vacuum.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantRoleLimits {
    /// `tenant_connection_limit`: sessions of each login role at once (`CONNECTION LIMIT`);
    /// None: unlimited.
    pub connection_limit: Option<u32>,
    /// `tenant_idle_in_transaction_timeout`: a session idle inside a transaction this long is
    /// ended (`idle_in_transaction_session_timeout`); None: never.
    pub idle_in_transaction_timeout: Option<Duration>,
}

impl ServerConfig {
    /// Why silo's connections to this server could be answered by an impostor, if they
    /// could: its `sslmode` does not verify the server's certificate and the host is not this
    /// machine. For a warning at start (both the control plane and the router give it).
    pub fn unverified_tls_warning(&self) -> Option<String> {
        let local = self.host == "localhost"
            || self.host.starts_with('/')
            || self.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        (!local && !self.tls.verifies_server()).then(|| {
            format!(
                "server {} ({}): sslmode = \"{}\" does not verify who answers; set sslmode = \"verify-full\" (and sslrootcert)",
                self.name,
                self.host,
                self.tls.mode_name()
            )
        })
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

/// The `[backups]` section: where `pg_dump` writes tenant backups (and the copies moves
/// restore).
#[derive(Debug, Clone, Default)]
pub struct BackupsConfig {
    /// The directory backups go to, one subdirectory per tenant; None: backups are off.
    pub dir: Option<PathBuf>,
    /// The `pg_dump` to run (moves take `pg_restore` from its directory); None: found like
    /// the PostgreSQL binaries of `siloctl dev`
    /// (`SILO_PG_BINDIR`, `pg_config --bindir`, the newest `/usr/lib/postgresql/*/bin`), else
    /// on `PATH`.
    pub pg_dump: Option<PathBuf>,
    /// The policy of tenants whose plan has none of its own.
    pub policy: BackupPolicy,
    /// `[backups.plans.NAME]`: the policy of tenants on plan NAME (each key the section
    /// leaves out is `[backups]`'s).
    pub plans: BTreeMap<String, BackupPolicy>,
    /// At most this many scheduled backups (and, apart, scheduled drills) are queued or
    /// running at once.
    pub max_concurrent: u32,
    /// The key new backups are encrypted under (32 bytes, base64, mode 0600); None: backups
    /// are written as plain `pg_dump` files.
    pub encryption_key_file: Option<PathBuf>,
    /// Keys older backups were encrypted under: they only decrypt.
    pub previous_encryption_key_files: Vec<PathBuf>,
    /// `[backups.s3]`: where every backup is copied to, off this machine; None: backups stay
    /// in `dir` only.
    pub s3: Option<BackupsS3Config>,
}

/// The `[backups.s3]` section: an S3 bucket (or an S3-compatible store) every backup is
/// uploaded to before it counts as taken, and restored from when `dir` has lost it.
/// How often a tenant is backed up and its backup drilled, and how long its backups are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupPolicy {
    /// How many of a tenant's backups are kept: taking one removes the oldest beyond this
    /// many. None: every backup is kept.
    pub keep_last: Option<usize>,
    /// How long a backup is kept: older ones are erased (and audited as `tenant.backup.expire`),
    /// except the newest of a tenant that still exists. None: kept until deleted by hand.
    pub keep_for: Option<Duration>,
    /// Each live tenant is backed up this often by the control planes' schedule (a `backup`
    /// job queued once its last one is older). None: backups are taken on request only.
    pub every: Option<Duration>,
    /// Each live tenant's newest backup is proved by a restore drill (a `verify` job) this
    /// often. None: drills are run on request only.
    pub verify_every: Option<Duration>,
}

impl BackupsConfig {
    /// The policy of tenants on `plan`.
    pub fn policy_of(&self, plan: &str) -> &BackupPolicy {
        self.plans.get(plan).unwrap_or(&self.policy)
    }

    /// Every policy in force: `[backups]`'s, then each plan's.
    pub fn policies(&self) -> impl Iterator<Item = &BackupPolicy> {
        std::iter::once(&self.policy).chain(self.plans.values())
    }
}

#[derive(Debug, Clone)]
pub struct BackupsS3Config {
    /// The bucket (made beforehand; silo never creates or deletes buckets).
    pub bucket: String,
    /// Prepended to every object key: `{prefix}{slug}/{file}`. Empty, or ends with `/`.
    pub prefix: String,
    /// The bucket's region; None: the AWS SDK's (`AWS_REGION`, the profile, ...).
    pub region: Option<String>,
    /// Another endpoint than AWS's: MinIO, Ceph, a test server.
    pub endpoint_url: Option<String>,
    /// `https://host/bucket/key` addresses instead of `https://bucket.host/key` (MinIO).
    pub path_style: bool,
    /// Backups larger than this are uploaded in parts of this size (S3 allows 10,000 parts).
    pub part_size: u64,
    /// How the bucket encrypts the objects silo writes (`server_side_encryption`); None: as
    /// the bucket's default encryption says.
    pub encryption: Option<S3Encryption>,
}

/// Server-side encryption silo asks the bucket for, and checks it got, on every upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum S3Encryption {
    /// `"AES256"`: keys the store manages (SSE-S3).
    S3Managed,
    /// `"aws:kms"`: a KMS key (SSE-KMS): `kms_key_id` (an id, ARN or alias), else the
    /// account's `aws/s3` key.
    Kms {
        /// `kms_key_id`.
        key_id: Option<String>,
    },
}

/// The `[router]` section.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Tenant traffic address (HTTPS when both TLS files are set and `https_listen` is not).
    pub listen: SocketAddr,
    /// `{slug}.{base_domain}` hosts route to `slug`. Lower case.
    pub base_domains: Vec<String>,
    /// PEM certificate chain and key for HTTPS.
    pub tls: Option<TlsFiles>,
    /// With `tls`: HTTPS is served here and `listen` stays plain HTTP (`siloctl dev`).
    pub https_listen: Option<SocketAddr>,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub metrics_listen: SocketAddr,
    /// Pool size cap per tenant.
    pub max_connections_per_tenant: u32,
    /// Connections one router may open to one server.
    pub connection_budget_per_server: u32,
    /// A tenant pool unused this long is closed.
    pub pool_idle_timeout: Duration,
    /// Route `/t/{slug}/...` as well as by Host.
    pub path_prefix_routing: bool,
    /// How long tenant metadata is cached; the router loads every route again each half of it
    /// (changes are pushed at once by NOTIFY).
    pub tenant_cache_ttl: Duration,
    /// Connect timeout to a tenant database.
    pub connect_timeout: Duration,
    /// How long a request may wait for room in its server's connection budget before it
    /// gets 503 `tenant_unavailable`.
    pub budget_wait: Duration,
    /// A pooled connection older than this is closed (sessions of a retired login role drain).
    pub pool_max_lifetime: Duration,
    /// A client must send a request head within this long (slowloris).
    pub header_read_timeout: Duration,
    /// A request not answered within this long gets 503.
    pub request_timeout: Duration,
    /// Largest request body the router accepts; larger gets 413.
    pub max_body_bytes: usize,
    /// Client connections served at once; beyond it, accepting waits.
    pub max_connections: usize,
    /// On SIGTERM, in-flight requests get this long to finish.
    pub shutdown_timeout: Duration,
    /// Export per-tenant metric series (capped; the rest are folded into `tenant="other"`).
    pub per_tenant_metrics: bool,
    /// Limits of tenants whose plan is not in `plans`.
    pub default_plan: String,
    /// Per-plan limits, by plan name (always has `default_plan`).
    pub plans: BTreeMap<String, PlanLimits>,
}

/// What a tenant on one plan may do at the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanLimits {
    /// Sustained request rate.
    pub requests_per_second: u32,
    /// Requests allowed in a burst above the sustained rate.
    pub burst: u32,
    /// Requests of one tenant being served at once.
    pub max_in_flight: u32,
}

/// TLS certificate and key files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain: the default (e.g. wildcard) certificate.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// Per-domain certificates (`DOMAIN.crt` + `DOMAIN.key`, PEM), e.g. for tenants' custom
    /// domains, chosen by SNI; re-read while the router runs.
    pub sni_dir: Option<PathBuf>,
    /// How often `sni_dir` is re-scanned for added, changed or removed certificates.
    pub sni_reload_interval: Duration,
}

/// A `[backups]` period (`key` = `value`): at least a second (else `too_short`), and only
/// with `backups.dir`, where the backups are.
/// The policy of `section` (`backups`, `backups.plans.NAME`), each key it leaves out
/// `inherited`'s.
fn backup_policy(
    section: &str,
    raw: raw::RawBackupPolicy,
    has_dir: bool,
    inherited: &BackupPolicy,
) -> Result<BackupPolicy, ConfigError> {
    if raw.keep_last == Some(0) {
        return Err(invalid(
            format!("{section}.keep_last"),
            "must be at least 1 (leave it out to keep every backup)",
        ));
    }
    let period = |key: &str, value: Option<String>, too_short: &str| {
        backup_period(&format!("{section}.{key}"), value.as_deref(), has_dir, too_short)
    };
    Ok(BackupPolicy {
        keep_last: raw.keep_last.or(inherited.keep_last),
        keep_for: period(
            "keep_for",
            raw.keep_for,
            "must be at least 1s (leave it out to keep backups until they are deleted)",
        )?
        .or(inherited.keep_for),
        every: period("every", raw.every, "must be at least 1s")?.or(inherited.every),
        verify_every: period("verify_every", raw.verify_every, "must be at least 1s")?.or(inherited.verify_every),
    })
}

fn backup_period(
    key: &str,
    value: Option<&str>,
    has_dir: bool,
    too_short: &str,
) -> Result<Option<Duration>, ConfigError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let period = duration(key, value)?;
    if period < Duration::from_secs(1) {
        return Err(invalid(key, too_short));
    }
    if !has_dir {
        return Err(invalid(key, "needs backups.dir, where the backups are"));
    }
    Ok(Some(period))
}

/// The `[backups.s3]` section, checked.
fn backups_s3(raw: raw::RawBackupsS3) -> Result<BackupsS3Config, ConfigError> {
    // S3's bucket naming rules, for the names a configuration would use.
    let bucket_ok = (3..=63).contains(&raw.bucket.len())
        && raw
            .bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && raw.bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && raw.bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !bucket_ok {
        return Err(invalid(
            "backups.s3.bucket",
            format!(
                "{:?} is not a bucket name (3 to 63 lower-case letters, digits, '-' and '.')",
                raw.bucket
            ),
        ));
    }
    if !(raw.prefix.is_empty() || raw.prefix.ends_with('/')) || raw.prefix.starts_with('/') {
        return Err(invalid(
            "backups.s3.prefix",
            "must be empty or end with '/', and not start with '/' (e.g. \"silo/\")",
        ));
    }
    if let Some(url) = &raw.endpoint_url {
        let parsed = reqwest::Url::parse(url).ok();
        if !parsed.is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some()) {
            return Err(invalid(
                "backups.s3.endpoint_url",
                format!("{url:?} is not an http(s) URL"),
            ));
        }
    }
    if !(5..=5120).contains(&raw.part_size_mib) {
        return Err(invalid(
            "backups.s3.part_size_mib",
            "must be between 5 and 5120 (S3's limits on a part)",
        ));
    }
    let encryption = match (raw.server_side_encryption.as_deref(), raw.kms_key_id) {
        (_, Some(key)) if key.trim().is_empty() => {
            return Err(invalid("backups.s3.kms_key_id", "must not be empty"));
        }
        (None, None) => None,
        (Some("AES256"), None) => Some(S3Encryption::S3Managed),
        (Some("aws:kms"), key_id) => Some(S3Encryption::Kms { key_id }),
        (None | Some("AES256"), Some(_)) => {
            return Err(invalid(
                "backups.s3.kms_key_id",
                "needs server_side_encryption = \"aws:kms\"",
            ));
        }
        (Some(other), _) => {
            return Err(invalid(
                "backups.s3.server_side_encryption",
                format!("{other:?} is not \"AES256\" or \"aws:kms\""),
            ));
        }
    };
    Ok(BackupsS3Config {
        bucket: raw.bucket,
        prefix: raw.prefix,
        region: raw.region,
        endpoint_url: raw.endpoint_url,
        path_style: raw.path_style,
        part_size: raw.part_size_mib * 1024 * 1024,
        encryption,
    })
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
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

        if !raw.catalog_url.starts_with("postgres://") && !raw.catalog_url.starts_with("postgresql://") {
            return Err(invalid("catalog_url", "must be a postgres:// URL"));
        }
        if raw.catalog_url.contains(':') && url_has_password(&raw.catalog_url) {
            return Err(invalid(
                "catalog_url",
                format!("must not contain a password; set {CATALOG_PASSWORD_ENV} instead"),
            ));
        }
        let catalog = CatalogConfig {
            url: raw.catalog_url,
            password: std::env::var(CATALOG_PASSWORD_ENV)
                .ok()
                .filter(|p| !p.is_empty())
                .map(SecretString::from),
        };

        let backend =
            match raw.secrets.backend.as_str() {
                "local" if raw.secrets.aws_kms_key_id.is_some() => {
                    return Err(invalid("secrets.aws_kms_key_id", "is only for backend = \"aws\""));
                }
                "local" => SecretsBackend::Local {
                    master_key_file: resolve(raw.secrets.local_master_key_file.ok_or_else(|| {
                        invalid("secrets.local_master_key_file", "is required with backend = \"local\"")
                    })?),
                    previous_master_key_files: raw
                        .secrets
                        .local_previous_master_key_files
                        .into_iter()
                        .map(resolve)
                        .collect(),
                },
                "aws" => {
                    if !raw.secrets.local_previous_master_key_files.is_empty() {
                        return Err(invalid(
                            "secrets.local_previous_master_key_files",
                            "is only for backend = \"local\"",
                        ));
                    }
                    let days = raw.secrets.aws_recovery_window_days;
                    if !(7..=30).contains(&days) {
                        return Err(invalid("secrets.aws_recovery_window_days", "must be between 7 and 30"));
                    }
                    SecretsBackend::Aws {
                        region: raw
                            .secrets
                            .aws_region
                            .ok_or_else(|| invalid("secrets.aws_region", "is required with backend = \"aws\""))?,
                        endpoint_url: raw.secrets.aws_endpoint_url,
                        recovery_window_days: days,
                        kms_key_id: match raw.secrets.aws_kms_key_id {
                            Some(key) if key.trim().is_empty() => {
                                return Err(invalid("secrets.aws_kms_key_id", "must not be empty"));
                            }
                            key => key,
                        },
                    }
                }
                other => {
                    return Err(invalid(
                        "secrets.backend",
                        format!("must be \"local\" or \"aws\", not {other:?}"),
                    ))
                }
            };
        let secrets = SecretsConfig {
            backend,
            name_prefix: raw.secrets.name_prefix,
        };

        let mut servers: Vec<ServerConfig> = Vec::with_capacity(raw.servers.len());
        for (i, s) in raw.servers.into_iter().enumerate() {
            let key = |field: &str| format!("servers[{i}].{field}");
            if s.name.is_empty()
                || !s
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(invalid(key("name"), "must be non-empty letters, digits, '-' or '_'"));
            }
            if servers.iter().any(|o| o.name == s.name) {
                return Err(invalid(key("name"), format!("{:?} is used by another server", s.name)));
            }
            if s.port == 0 {
                return Err(invalid(key("port"), "must not be 0"));
            }
            let admin_password = match (s.admin_password_env, s.admin_password_secret) {
                (Some(var), None) => AdminPassword::Env(var),
                (None, Some(name)) => AdminPassword::Secret(name),
                _ => {
                    return Err(invalid(
                        key("admin_password_env"),
                        "set exactly one of admin_password_env and admin_password_secret",
                    ))
                }
            };
            let root_cert = s.sslrootcert.map(|p| resolve(PathBuf::from(p)));
            let tls = ServerTls::parse(s.sslmode.as_deref(), root_cert.as_deref())
                .map_err(|(field, problem)| invalid(key(field), problem))?;
            if s.tenant_connection_limit == Some(0) {
                return Err(invalid(key("tenant_connection_limit"), "must be at least 1"));
            }
            let idle_in_transaction_timeout = s
                .tenant_idle_in_transaction_timeout
                .map(|t| duration(&key("tenant_idle_in_transaction_timeout"), &t))
                .transpose()?;
            if idle_in_transaction_timeout.is_some_and(|t| t < Duration::from_secs(1)) {
                return Err(invalid(
                    key("tenant_idle_in_transaction_timeout"),
                    "must be at least 1s",
                ));
            }
            let tenant_roles = TenantRoleLimits {
                connection_limit: s.tenant_connection_limit,
                idle_in_transaction_timeout,
            };
            if let Some(region) = &s.region {
                if !is_region_name(region) {
                    return Err(invalid(
                        key("region"),
                        "must be 1-63 of [a-z0-9-], starting with a letter or digit (e.g. \"eu-west-1\")",
                    ));
                }
            }
            servers.push(ServerConfig {
                name: s.name,
                host: s.host,
                port: s.port,
                admin_user: s.admin_user,
                admin_password,
                max_tenants: s.max_tenants,
                tls,
                tenant_roles,
                region: s.region,
            });
        }

        let cp = raw.control_plane;
        if cp.workers == 0 {
            return Err(invalid("control_plane.workers", "must be at least 1"));
        }
        let control_plane = ControlPlaneConfig {
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
                    cert_file: resolve(cert),
                    key_file: resolve(key),
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
        };

        let rotation = RotationConfig {
            strategy: raw
                .rotation
                .strategy
                .parse()
                .map_err(|e: String| invalid("rotation.strategy", e))?,
            interval: duration("rotation.interval", &raw.rotation.interval)?,
            jitter: duration("rotation.jitter", &raw.rotation.jitter)?,
            max_concurrent: raw.rotation.max_concurrent.max(1),
            check_every: duration("rotation.check_every", &raw.rotation.check_every)?,
        };

        let m = raw.migrations;
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
        let migrations = MigrationsConfig {
            concurrency: m.concurrency,
            per_server_concurrency: m.per_server_concurrency,
            canary: m.canary,
            max_failure_percent: m.max_failure_percent,
            templates: m.templates,
            spare_databases: m.spare_databases,
        };

        let r = raw.router;
        let tls = match (r.tls_cert_file, r.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert_file: resolve(cert),
                key_file: resolve(key),
                sni_dir: r.tls_sni_dir.map(resolve),
                sni_reload_interval: duration("router.tls_sni_reload_interval", &r.tls_sni_reload_interval)?,
            }),
            (None, None) if r.tls_sni_dir.is_some() => {
                return Err(invalid(
                    "router.tls_sni_dir",
                    "needs router.tls_cert_file and router.tls_key_file",
                ))
            }
            (None, None) if r.https_listen.is_some() => {
                return Err(invalid(
                    "router.https_listen",
                    "needs router.tls_cert_file and router.tls_key_file",
                ))
            }
            (None, None) => None,
            (Some(_), None) => return Err(invalid("router.tls_key_file", "is required with router.tls_cert_file")),
            (None, Some(_)) => return Err(invalid("router.tls_cert_file", "is required with router.tls_key_file")),
        };
        if tls.as_ref().is_some_and(|t| t.sni_reload_interval.is_zero()) {
            return Err(invalid("router.tls_sni_reload_interval", "must be more than 0"));
        }
        let https_listen = r
            .https_listen
            .as_deref()
            .map(|a| socket_addr("router.https_listen", a))
            .transpose()?;
        let mut base_domains = Vec::with_capacity(r.base_domains.len());
        for d in r.base_domains {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if d.is_empty() || !d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
                return Err(invalid("router.base_domains", format!("{d:?} is not a domain name")));
            }
            base_domains.push(d);
        }
        if r.max_connections_per_tenant == 0 {
            return Err(invalid("router.max_connections_per_tenant", "must be at least 1"));
        }
        if r.connection_budget_per_server < r.max_connections_per_tenant {
            return Err(invalid(
                "router.connection_budget_per_server",
                "must be at least router.max_connections_per_tenant",
            ));
        }
        // A tenant's role must let in a router's whole pool and silo's own job sessions.
        let needed = r.max_connections_per_tenant.saturating_add(2);
        for (i, server) in servers.iter().enumerate() {
            if server.tenant_roles.connection_limit.is_some_and(|limit| limit < needed) {
                return Err(invalid(
                    format!("servers[{i}].tenant_connection_limit"),
                    format!(
                        "must be at least {needed}: router.max_connections_per_tenant plus 2 for silo's jobs \
                         (and more with several routers)"
                    ),
                ));
            }
        }
        if r.max_body_bytes == 0 {
            return Err(invalid("router.max_body_bytes", "must be at least 1"));
        }
        if r.max_connections == 0 {
            return Err(invalid("router.max_connections", "must be at least 1"));
        }
        let mut raw_plans = r.plans;
        if !raw_plans.contains_key(&r.default_plan) {
            if r.default_plan != default_plan() {
                return Err(invalid(
                    "router.default_plan",
                    format!("{:?} is not in router.plans", r.default_plan),
                ));
            }
            raw_plans.insert(default_plan(), RawPlan::default());
        }
        let mut plans = BTreeMap::new();
        for (name, p) in raw_plans {
            for (field, value) in [
                ("requests_per_second", p.requests_per_second),
                ("burst", p.burst),
                ("max_in_flight", p.max_in_flight),
            ] {
                if value == 0 {
                    return Err(invalid(format!("router.plans.{name}.{field}"), "must be at least 1"));
                }
            }
            let limits = PlanLimits {
                requests_per_second: p.requests_per_second,
                burst: p.burst,
                max_in_flight: p.max_in_flight,
            };
            plans.insert(name, limits);
        }
        let router = RouterConfig {
            listen: socket_addr("router.listen", &r.listen)?,
            base_domains,
            tls,
            https_listen,
            metrics_listen: socket_addr("router.metrics_listen", &r.metrics_listen)?,
            max_connections_per_tenant: r.max_connections_per_tenant,
            connection_budget_per_server: r.connection_budget_per_server,
            pool_idle_timeout: duration("router.pool_idle_timeout", &r.pool_idle_timeout)?,
            path_prefix_routing: r.path_prefix_routing,
            tenant_cache_ttl: duration("router.tenant_cache_ttl", &r.tenant_cache_ttl)?,
            connect_timeout: duration("router.connect_timeout", &r.connect_timeout)?,
            budget_wait: duration("router.budget_wait", &r.budget_wait)?,
            pool_max_lifetime: duration("router.pool_max_lifetime", &r.pool_max_lifetime)?,
            header_read_timeout: duration("router.header_read_timeout", &r.header_read_timeout)?,
            request_timeout: duration("router.request_timeout", &r.request_timeout)?,
            max_body_bytes: r.max_body_bytes,
            max_connections: r.max_connections,
            shutdown_timeout: duration("router.shutdown_timeout", &r.shutdown_timeout)?,
            per_tenant_metrics: r.per_tenant_metrics,
            default_plan: r.default_plan,
            plans,
        };

        let has_dir = raw.backups.dir.is_some();
        let policy = backup_policy(
            "backups",
            raw::RawBackupPolicy {
                keep_last: raw.backups.keep_last,
                keep_for: raw.backups.keep_for,
                every: raw.backups.every,
                verify_every: raw.backups.verify_every,
            },
            has_dir,
            &BackupPolicy::default(),
        )?;
        let mut backup_plans = BTreeMap::new();
        for (name, plan) in raw.backups.plans {
            let section = format!("backups.plans.{name}");
            backup_plans.insert(name, backup_policy(&section, plan, has_dir, &policy)?);
        }
        let max_concurrent = raw.backups.max_concurrent.unwrap_or(2);
        if max_concurrent == 0 {
            return Err(invalid("backups.max_concurrent", "must be at least 1"));
        }
        if raw.backups.encryption_key_file.is_none() && !raw.backups.previous_encryption_key_files.is_empty() {
            return Err(invalid(
                "backups.previous_encryption_key_files",
                "needs backups.encryption_key_file (the key new backups are encrypted under)",
            ));
        }

        let s3 = raw.backups.s3.map(backups_s3).transpose()?;
        if s3.is_some() && raw.backups.dir.is_none() {
            return Err(invalid(
                "backups.s3",
                "needs backups.dir, where backups are written before they are uploaded",
            ));
        }

        Ok(Self {
            catalog,
            tenant_migrations_dir: raw.tenant_migrations_dir.map(resolve),
            secrets,
            servers,
            control_plane,
            rotation,
            migrations,
            backups: BackupsConfig {
                dir: raw.backups.dir.map(resolve),
                pg_dump: raw.backups.pg_dump.map(resolve),
                policy,
                plans: backup_plans,
                max_concurrent,
                encryption_key_file: raw.backups.encryption_key_file.map(resolve),
                previous_encryption_key_files: raw
                    .backups
                    .previous_encryption_key_files
                    .into_iter()
                    .map(resolve)
                    .collect(),
                s3,
            },
            router,
        })
    }

    /// The server named `name`.
    pub fn server(&self, name: &str) -> Option<&ServerConfig> {
        self.servers.iter().find(|s| s.name == name)
    }
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
