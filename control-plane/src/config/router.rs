//! The `[router]` section: where tenant traffic is served and what each tenant may use.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{default_plan, RawPlan, RawRouter};
use super::{duration, invalid, resolve, socket_addr, ConfigError, ServerConfig};

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

/// The `[router]` section, checked against the `servers` it connects to; relative paths are
/// relative to `base`.
pub(super) fn parse(r: RawRouter, servers: &[ServerConfig], base: &Path) -> Result<RouterConfig, ConfigError> {
    let resolve = |p| resolve(base, p);
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
    Ok(RouterConfig {
        listen: socket_addr("router.listen", &r.listen)?,
        base_domains: base_domains(r.base_domains)?,
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
        plans: plans(r.plans, &r.default_plan)?,
        default_plan: r.default_plan,
    })
}

/// `router.base_domains`, lower case and without a trailing dot.
fn base_domains(raw: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let mut base_domains = Vec::with_capacity(raw.len());
    for d in raw {
        let d = d.trim_end_matches('.').to_ascii_lowercase();
        if d.is_empty() || !d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
            return Err(invalid("router.base_domains", format!("{d:?} is not a domain name")));
        }
        base_domains.push(d);
    }
    Ok(base_domains)
}

/// `[router.plans.NAME]`, with `default` among them (the built-in default plan's limits if
/// it is not configured).
fn plans(mut raw: BTreeMap<String, RawPlan>, default: &str) -> Result<BTreeMap<String, PlanLimits>, ConfigError> {
    if !raw.contains_key(default) {
        if default != default_plan() {
            return Err(invalid(
                "router.default_plan",
                format!("{default:?} is not in router.plans"),
            ));
        }
        raw.insert(default_plan(), RawPlan::default());
    }
    let mut plans = BTreeMap::new();
    for (name, p) in raw {
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
    Ok(plans)
}
