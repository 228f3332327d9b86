//! `GET /v1/servers/check`: whether each PostgreSQL server holds what the catalog says it
//! holds, no more and no less. The catalog and the servers part ways when the catalog is
//! restored from a backup older than the fleet (tenants created, moved or deleted since), or
//! when someone changed a server by hand; this finds where, without changing anything.
//!
//! Only silo's names are looked at: databases named `tenant_*` and the roles of tenants. A
//! tenant being moved is expected on both of its servers; one still provisioning, failed or
//! being deleted may or may not have its database yet, so it is never reported missing.
//!
//! With `logins=true`, each active or suspended tenant whose database is there is also logged
//! in to as a router would (its `AWSCURRENT` secret, the server's TLS settings), a few at a
//! time: a password the secret store no longer matches (a catalog restored with the local
//! store) is named before a request meets it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use super::error::ApiError;
use super::extract::Query;
use super::{ask_server, ApiState};
use crate::config::ServerTls;
use crate::names::TenantSlug;
use crate::secrets::{tenant_secret_name, DbSecret, SecretStore, AWSCURRENT};
use crate::servers::Server;

/// How long one tenant login may take before it is reported refused.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Tenant logins tried at once.
const LOGINS_AT_ONCE: usize = 4;
/// Suffixes of a tenant's role names after its database name (see `names::TenantSlug`).
const ROLE_SUFFIXES: [&str; 3] = ["_owner", "_app_b", "_app"];

/// `GET /v1/servers/check` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckQuery {
    /// Also log in to each tenant's database with its secret.
    #[serde(default)]
    logins: bool,
}

/// A tenant the catalog places on a server.
#[derive(sqlx::FromRow)]
struct Placed {
    slug: String,
    status: String,
    server: String,
    moving_to: Option<String>,
    database: String,
}

/// What one server holds under silo's names.
struct Found {
    databases: BTreeSet<String>,
    roles: BTreeSet<String>,
}

/// `GET /v1/servers/check?logins=` → 200 `{"consistent": bool, "servers": [{"name",
/// "untracked_databases": [...], "untracked_roles": [...], "missing_databases": [{"slug",
/// "database"}], "refused_logins": [{"slug", "error"}] (with `logins=true`)} | {"name",
/// "error"}]}`. Untracked: on the server under a tenant's name, but no tenant of the catalog
/// is there. Missing: an active or suspended tenant of that server whose database is not
/// there. Refused: such a tenant whose secret does not log in to its database. `consistent`
/// is false when anything is reported, an unreachable server and a server that holds tenants
/// but is no longer configured included.
pub async fn check(State(state): State<ApiState>, Query(q): Query<CheckQuery>) -> Result<Json<Value>, ApiError> {
    let placed: Vec<Placed> = sqlx::query_as(
        "SELECT slug, status::text, server, moving_to, database FROM tenants WHERE status <> 'deleted' ORDER BY slug",
    )
    .fetch_all(&state.catalog)
    .await?;
    let mut consistent = true;
    let mut servers = Vec::new();
    for server in state.servers.iter() {
        let name = server.config.name.as_str();
        let found = match found_on(server).await {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(server = name, %error, "server not checked");
                consistent = false;
                servers.push(json!({"name": name, "error": error}));
                continue;
            }
        };
        let expected: BTreeSet<&str> = placed
            .iter()
            .filter(|t| t.server == name || t.moving_to.as_deref() == Some(name))
            .map(|t| t.database.as_str())
            .collect();
        let untracked_databases: Vec<&String> = found
            .databases
            .iter()
            .filter(|d| !expected.contains(d.as_str()))
            .collect();
        let untracked_roles: Vec<&String> = found
            .roles
            .iter()
            .filter(|r| !database_of_role(r).is_some_and(|d| expected.contains(d)))
            .collect();
        let (present, missing): (Vec<&Placed>, Vec<&Placed>) = placed
            .iter()
            .filter(|t| t.server == name && t.moving_to.is_none())
            .filter(|t| matches!(t.status.as_str(), "active" | "suspended"))
            .partition(|t| found.databases.contains(&t.database));
        let missing_databases: Vec<Value> = missing
            .iter()
            .map(|t| json!({"slug": t.slug, "database": t.database}))
            .collect();
        if !(untracked_databases.is_empty() && untracked_roles.is_empty() && missing_databases.is_empty()) {
            consistent = false;
        }
        let mut entry = json!({
            "name": name,
            "untracked_databases": untracked_databases,
            "untracked_roles": untracked_roles,
            "missing_databases": missing_databases,
        });
        if q.logins {
            let slugs = present.iter().map(|t| t.slug.clone()).collect();
            let refused = refused_logins(&state, server, slugs).await;
            consistent &= refused.is_empty();
            entry["refused_logins"] = Value::Array(refused);
        }
        servers.push(entry);
    }
    let unconfigured: BTreeSet<&str> = placed
        .iter()
        .map(|t| t.server.as_str())
        .filter(|name| state.servers.get(name).is_none())
        .collect();
    for name in unconfigured {
        consistent = false;
        servers.push(json!({"name": name, "error": "not configured: its tenants cannot be served"}));
    }
    Ok(Json(json!({"consistent": consistent, "servers": servers})))
}

/// The tenants among `slugs` (of `server`) whose secret does not log in to their database,
/// each `{"slug", "error"}`, in slug order.
async fn refused_logins(state: &ApiState, server: &Server, slugs: Vec<String>) -> Vec<Value> {
    let mut refused = Vec::new();
    let mut queue = slugs.into_iter();
    let mut lanes = JoinSet::new();
    loop {
        while lanes.len() < LOGINS_AT_ONCE {
            let Some(slug) = queue.next() else { break };
            let store = Arc::clone(&state.store);
            let prefix = state.config.secrets.name_prefix.clone();
            let tls = server.config.tls.clone();
            lanes.spawn(async move {
                let outcome = log_in(store.as_ref(), &prefix, &slug, &tls).await;
                (slug, outcome)
            });
        }
        let Some(done) = lanes.join_next().await else { break };
        match done {
            Ok((_, Ok(()))) => {}
            Ok((slug, Err(error))) => refused.push((slug, error)),
            Err(e) => refused.push(("?".into(), format!("login check stopped: {e}"))),
        }
    }
    refused.sort();
    refused
        .into_iter()
        .map(|(slug, error)| json!({"slug": slug, "error": error}))
        .collect()
}

/// Logs in to tenant `slug`'s database as its current secret says; why not, if it cannot.
async fn log_in(store: &dyn SecretStore, prefix: &str, slug: &str, tls: &ServerTls) -> Result<(), String> {
    let slug = TenantSlug::parse(slug).map_err(|e| e.to_string())?;
    let name = tenant_secret_name(prefix, &slug);
    let current = store
        .get_secret_value(&name, AWSCURRENT)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("secret {name} has no current version"))?;
    let secret = DbSecret::from_secret(&current.value, &name).map_err(|e| e.to_string())?;
    let conn = silo_tenant_app::connect(&secret.connect_options(tls), LOGIN_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    let _ = sqlx::Connection::close(conn).await;
    Ok(())
}

/// The database name a tenant role is named after, if `role` is named like one.
fn database_of_role(role: &str) -> Option<&str> {
    ROLE_SUFFIXES.iter().find_map(|suffix| role.strip_suffix(suffix))
}

/// The `tenant_*` databases and roles on `server`; an error to report when it cannot be asked.
async fn found_on(server: &Server) -> Result<Found, String> {
    let query = async {
        let databases: Vec<String> =
            sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE starts_with(datname::text, 'tenant_')")
                .fetch_all(&server.admin)
                .await?;
        let roles: Vec<String> =
            sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE starts_with(rolname::text, 'tenant_')")
                .fetch_all(&server.admin)
                .await?;
        Ok::<_, sqlx::Error>(Found {
            databases: databases.into_iter().collect(),
            roles: roles.into_iter().filter(|r| database_of_role(r).is_some()).collect(),
        })
    };
    ask_server(query).await
}

#[cfg(test)]
mod tests {
    use super::database_of_role;

    #[test]
    fn a_role_is_traced_to_its_tenants_database() {
        assert_eq!(database_of_role("tenant_acme_owner"), Some("tenant_acme"));
        assert_eq!(database_of_role("tenant_acme_app"), Some("tenant_acme"));
        assert_eq!(database_of_role("tenant_acme_app_b"), Some("tenant_acme"));
        assert_eq!(database_of_role("tenant_acme_app_x"), None);
    }
}
