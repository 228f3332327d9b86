//! The file format of `silo.toml`: what serde reads (unknown keys refused), with the
//! defaults of every key. [`super::Config`] validates it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) catalog_url: String,
    pub(super) tenant_migrations_dir: Option<PathBuf>,
    #[serde(default)]
    pub(super) secrets: RawSecrets,
    #[serde(default)]
    pub(super) servers: Vec<RawServer>,
    #[serde(default)]
    pub(super) control_plane: RawControlPlane,
    #[serde(default)]
    pub(super) rotation: RawRotation,
    #[serde(default)]
    pub(super) migrations: RawMigrations,
    #[serde(default)]
    pub(super) backups: RawBackups,
    #[serde(default)]
    pub(super) router: RawRouter,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackups {
    pub(super) dir: Option<PathBuf>,
    pub(super) pg_dump: Option<PathBuf>,
    pub(super) keep_last: Option<usize>,
    pub(super) keep_for: Option<String>,
    pub(super) every: Option<String>,
    pub(super) verify_every: Option<String>,
    #[serde(default)]
    pub(super) plans: BTreeMap<String, RawBackupPolicy>,
    pub(super) max_concurrent: Option<u32>,
    pub(super) encryption_key_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) previous_encryption_key_files: Vec<PathBuf>,
    pub(super) s3: Option<RawBackupsS3>,
}

/// `[backups.plans.NAME]`: the plan's own `keep_last`, `keep_for`, `every`, `verify_every`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackupPolicy {
    pub(super) keep_last: Option<usize>,
    pub(super) keep_for: Option<String>,
    pub(super) every: Option<String>,
    pub(super) verify_every: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackupsS3 {
    pub(super) bucket: String,
    #[serde(default)]
    pub(super) prefix: String,
    pub(super) region: Option<String>,
    pub(super) endpoint_url: Option<String>,
    #[serde(default)]
    pub(super) path_style: bool,
    #[serde(default = "default_part_size_mib")]
    pub(super) part_size_mib: u64,
    pub(super) server_side_encryption: Option<String>,
    pub(super) kms_key_id: Option<String>,
}

fn default_part_size_mib() -> u64 {
    64
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMigrations {
    #[serde(default = "default_rollout_concurrency")]
    pub(super) concurrency: usize,
    #[serde(default = "default_per_server_concurrency")]
    pub(super) per_server_concurrency: usize,
    #[serde(default = "default_canary")]
    pub(super) canary: usize,
    #[serde(default = "default_max_failure_percent")]
    pub(super) max_failure_percent: u32,
    #[serde(default = "default_templates")]
    pub(super) templates: bool,
    #[serde(default = "default_spare_databases")]
    pub(super) spare_databases: usize,
}

fn default_templates() -> bool {
    true
}
fn default_spare_databases() -> usize {
    2
}

impl Default for RawMigrations {
    fn default() -> Self {
        Self {
            concurrency: default_rollout_concurrency(),
            per_server_concurrency: default_per_server_concurrency(),
            canary: default_canary(),
            max_failure_percent: default_max_failure_percent(),
            templates: default_templates(),
            spare_databases: default_spare_databases(),
        }
    }
}

fn default_rollout_concurrency() -> usize {
    8
}
fn default_per_server_concurrency() -> usize {
    4
}
fn default_canary() -> usize {
    1
}
fn default_max_failure_percent() -> u32 {
    25
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSecrets {
    #[serde(default = "default_backend")]
    pub(super) backend: String,
    #[serde(default = "default_name_prefix")]
    pub(super) name_prefix: String,
    pub(super) local_master_key_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) local_previous_master_key_files: Vec<PathBuf>,
    pub(super) aws_region: Option<String>,
    pub(super) aws_endpoint_url: Option<String>,
    pub(super) aws_kms_key_id: Option<String>,
    #[serde(default = "default_recovery_window_days")]
    pub(super) aws_recovery_window_days: u32,
}

impl Default for RawSecrets {
    fn default() -> Self {
        Self {
            backend: default_backend(),
            name_prefix: default_name_prefix(),
            local_master_key_file: None,
            local_previous_master_key_files: Vec::new(),
            aws_region: None,
            aws_endpoint_url: None,
            aws_kms_key_id: None,
            aws_recovery_window_days: default_recovery_window_days(),
        }
    }
}

fn default_backend() -> String {
    "local".into()
}
fn default_name_prefix() -> String {
    "silo/".into()
}
fn default_recovery_window_days() -> u32 {
    7
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) name: String,
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) admin_user: String,
    pub(super) admin_password_env: Option<String>,
    pub(super) admin_password_secret: Option<String>,
    #[serde(default = "default_max_tenants")]
    pub(super) max_tenants: u32,
    pub(super) sslmode: Option<String>,
    pub(super) sslrootcert: Option<String>,
    pub(super) tenant_connection_limit: Option<u32>,
    pub(super) tenant_idle_in_transaction_timeout: Option<String>,
    pub(super) region: Option<String>,
}

fn default_max_tenants() -> u32 {
    1000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControlPlane {
    #[serde(default = "default_cp_listen")]
    pub(super) listen: String,
    #[serde(default = "default_admin_token_env")]
    pub(super) admin_token_env: String,
    #[serde(default = "default_workers")]
    pub(super) workers: usize,
    #[serde(default = "default_job_lease")]
    pub(super) job_lease: String,
    pub(super) tls_cert_file: Option<PathBuf>,
    pub(super) tls_key_file: Option<PathBuf>,
}

impl Default for RawControlPlane {
    fn default() -> Self {
        Self {
            listen: default_cp_listen(),
            admin_token_env: default_admin_token_env(),
            workers: default_workers(),
            job_lease: default_job_lease(),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

fn default_cp_listen() -> String {
    "127.0.0.1:7070".into()
}
fn default_admin_token_env() -> String {
    "SILO_ADMIN_TOKEN".into()
}
fn default_workers() -> usize {
    4
}
fn default_job_lease() -> String {
    "30s".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRotation {
    #[serde(default = "default_strategy")]
    pub(super) strategy: String,
    #[serde(default = "default_interval")]
    pub(super) interval: String,
    #[serde(default = "default_rotation_jitter")]
    pub(super) jitter: String,
    #[serde(default = "default_rotation_max_concurrent")]
    pub(super) max_concurrent: u32,
    #[serde(default = "default_rotation_check_every")]
    pub(super) check_every: String,
}

impl Default for RawRotation {
    fn default() -> Self {
        Self {
            strategy: default_strategy(),
            interval: default_interval(),
            jitter: default_rotation_jitter(),
            max_concurrent: default_rotation_max_concurrent(),
            check_every: default_rotation_check_every(),
        }
    }
}

fn default_rotation_jitter() -> String {
    "10m".into()
}
fn default_rotation_max_concurrent() -> u32 {
    4
}
fn default_rotation_check_every() -> String {
    "1m".into()
}

fn default_strategy() -> String {
    "alternating".into()
}
fn default_interval() -> String {
    "30d".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouter {
    #[serde(default = "default_router_listen")]
    pub(super) listen: String,
    #[serde(default = "default_base_domains")]
    pub(super) base_domains: Vec<String>,
    pub(super) tls_cert_file: Option<PathBuf>,
    pub(super) tls_key_file: Option<PathBuf>,
    pub(super) https_listen: Option<String>,
    pub(super) tls_sni_dir: Option<PathBuf>,
    #[serde(default = "default_tls_sni_reload_interval")]
    pub(super) tls_sni_reload_interval: String,
    #[serde(default = "default_metrics_listen")]
    pub(super) metrics_listen: String,
    #[serde(default = "default_max_conns_per_tenant")]
    pub(super) max_connections_per_tenant: u32,
    #[serde(default = "default_budget")]
    pub(super) connection_budget_per_server: u32,
    #[serde(default = "default_pool_idle")]
    pub(super) pool_idle_timeout: String,
    #[serde(default)]
    pub(super) path_prefix_routing: bool,
    #[serde(default = "default_tenant_cache_ttl")]
    pub(super) tenant_cache_ttl: String,
    #[serde(default = "default_connect_timeout")]
    pub(super) connect_timeout: String,
    #[serde(default = "default_budget_wait")]
    pub(super) budget_wait: String,
    #[serde(default = "default_pool_max_lifetime")]
    pub(super) pool_max_lifetime: String,
    #[serde(default = "default_header_read_timeout")]
    pub(super) header_read_timeout: String,
    #[serde(default = "default_request_timeout")]
    pub(super) request_timeout: String,
    #[serde(default = "default_max_body_bytes")]
    pub(super) max_body_bytes: usize,
    #[serde(default = "default_router_max_connections")]
    pub(super) max_connections: usize,
    #[serde(default = "default_shutdown_timeout")]
    pub(super) shutdown_timeout: String,
    #[serde(default)]
    pub(super) per_tenant_metrics: bool,
    #[serde(default = "default_plan")]
    pub(super) default_plan: String,
    #[serde(default)]
    pub(super) plans: BTreeMap<String, RawPlan>,
}

/// `[router.plans.NAME]`: the limits of tenants on plan NAME.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlan {
    #[serde(default = "default_requests_per_second")]
    pub(super) requests_per_second: u32,
    #[serde(default = "default_burst")]
    pub(super) burst: u32,
    #[serde(default = "default_max_in_flight")]
    pub(super) max_in_flight: u32,
}

impl Default for RawPlan {
    fn default() -> Self {
        Self {
            requests_per_second: default_requests_per_second(),
            burst: default_burst(),
            max_in_flight: default_max_in_flight(),
        }
    }
}

impl Default for RawRouter {
    fn default() -> Self {
        Self {
            listen: default_router_listen(),
            base_domains: default_base_domains(),
            tls_cert_file: None,
            tls_key_file: None,
            https_listen: None,
            tls_sni_dir: None,
            tls_sni_reload_interval: default_tls_sni_reload_interval(),
            metrics_listen: default_metrics_listen(),
            max_connections_per_tenant: default_max_conns_per_tenant(),
            connection_budget_per_server: default_budget(),
            pool_idle_timeout: default_pool_idle(),
            path_prefix_routing: false,
            tenant_cache_ttl: default_tenant_cache_ttl(),
            connect_timeout: default_connect_timeout(),
            budget_wait: default_budget_wait(),
            pool_max_lifetime: default_pool_max_lifetime(),
            header_read_timeout: default_header_read_timeout(),
            request_timeout: default_request_timeout(),
            max_body_bytes: default_max_body_bytes(),
            max_connections: default_router_max_connections(),
            shutdown_timeout: default_shutdown_timeout(),
            per_tenant_metrics: false,
            default_plan: default_plan(),
            plans: BTreeMap::new(),
        }
    }
}

fn default_router_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_base_domains() -> Vec<String> {
    vec!["localhost".into()]
}
fn default_tls_sni_reload_interval() -> String {
    "5s".into()
}
fn default_metrics_listen() -> String {
    "127.0.0.1:9090".into()
}
fn default_max_conns_per_tenant() -> u32 {
    5
}
fn default_budget() -> u32 {
    200
}
fn default_pool_idle() -> String {
    "5m".into()
}
fn default_tenant_cache_ttl() -> String {
    "60s".into()
}
fn default_connect_timeout() -> String {
    "2s".into()
}
fn default_budget_wait() -> String {
    "2s".into()
}
fn default_pool_max_lifetime() -> String {
    "10m".into()
}
fn default_header_read_timeout() -> String {
    "10s".into()
}
fn default_request_timeout() -> String {
    "30s".into()
}
fn default_max_body_bytes() -> usize {
    64 * 1024
}
fn default_router_max_connections() -> usize {
    10_000
}
fn default_shutdown_timeout() -> String {
    "10s".into()
}
pub(super) fn default_plan() -> String {
    "standard".into()
}
// Generous: a plan that should hold tenants back is configured as such.
fn default_requests_per_second() -> u32 {
    1000
}
fn default_burst() -> u32 {
    2000
}
fn default_max_in_flight() -> u32 {
    200
}
