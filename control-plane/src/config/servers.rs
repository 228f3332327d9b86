//! The `[[servers]]` tables: the PostgreSQL servers that hold tenant databases.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::RawServer;
use super::{duration, invalid, resolve, ConfigError, ServerTls};

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

/// The `[[servers]]` tables, checked; relative paths are relative to `base`.
pub(super) fn parse(raw: Vec<RawServer>, base: &Path) -> Result<Vec<ServerConfig>, ConfigError> {
    let mut servers: Vec<ServerConfig> = Vec::with_capacity(raw.len());
    for (i, s) in raw.into_iter().enumerate() {
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
        let root_cert = s.sslrootcert.map(|p| resolve(base, PathBuf::from(p)));
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
    Ok(servers)
}
