//! Bringing the tenants' existing login roles to their server's limits
//! (`tenant_connection_limit`, `tenant_idle_in_transaction_timeout`) when the control plane
//! starts, so a changed limit reaches every tenant at once rather than at its next rotation.
//!
//! Provisioning, rotations, restores and moves set the limits whenever they set up a login
//! role; this pass covers the roles nobody touches. Only roles whose limits differ from the
//! config are altered, one statement batch each. A server that cannot be reached is tried
//! again every [`RETRY_EVERY`] until the pass succeeds or the control plane stops. With
//! several control planes, each one's start applies its own config: keep their configs equal.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::TenantRoleLimits;
use crate::names::TenantNames;
use crate::provision::{ddl, role_limits_sql, setting_value, ProvisionError, StepContext};
use crate::servers::{Server, Servers};

/// How long a server that failed the pass waits before the next try.
const RETRY_EVERY: Duration = Duration::from_secs(30);

/// Brings every tenant login role on every server to the server's limits, each server on its
/// own, retrying a server that fails until it succeeds or `shutdown`.
pub async fn apply(catalog: PgPool, servers: Arc<Servers>, shutdown: CancellationToken) {
    let mut passes = tokio::task::JoinSet::new();
    for name in servers.iter().map(|server| server.config.name.clone()) {
        let (catalog, servers, shutdown) = (catalog.clone(), servers.clone(), shutdown.clone());
        passes.spawn(async move {
            if let Some(server) = servers.get(&name) {
                apply_until_done(&catalog, server, &shutdown).await;
            }
        });
    }
    while passes.join_next().await.is_some() {}
}

/// Passes over `server` until one succeeds or `shutdown`.
async fn apply_until_done(catalog: &PgPool, server: &Server, shutdown: &CancellationToken) {
    loop {
        match apply_on(catalog, server).await {
            Ok(altered) => {
                if altered > 0 {
                    info!(
                        server = %server.config.name,
                        roles = altered,
                        "tenant login roles brought to the server's limits"
                    );
                }
                return;
            }
            Err(error) => warn!(
                server = %server.config.name,
                %error,
                "could not bring tenant login roles to the server's limits; trying again in {}s",
                RETRY_EVERY.as_secs()
            ),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY_EVERY) => {}
        }
    }
}

/// One pass over `server`: the number of login roles altered.
async fn apply_on(catalog: &PgPool, server: &Server) -> Result<usize, ProvisionError> {
    let databases: Vec<String> =
        sqlx::query_scalar("SELECT database FROM tenants WHERE server = $1 AND status <> 'deleted'")
            .bind(&server.config.name)
            .fetch_all(catalog)
            .await
            .step("list the server's tenants")?;
    let roles: Vec<String> = databases
        .into_iter()
        .flat_map(|database| TenantNames::of_database(database).login_roles())
        .collect();
    if roles.is_empty() {
        return Ok(0);
    }
    let limits = &server.config.tenant_roles;
    let current: Vec<(String, i32, Option<String>)> = sqlx::query_as(
        "SELECT rolname::text, rolconnlimit, \
           (SELECT s FROM unnest(rolconfig) s WHERE starts_with(s, 'idle_in_transaction_session_timeout=')) \
         FROM pg_roles WHERE rolname = ANY($1)",
    )
    .bind(&roles)
    .fetch_all(&server.admin)
    .await
    .step("read tenant login roles")?;
    let stale: Vec<String> = current
        .into_iter()
        .filter(|(_, connection_limit, idle)| !holds(limits, *connection_limit, idle.as_deref()))
        .map(|(role, _, _)| role)
        .collect();
    if stale.is_empty() {
        return Ok(0);
    }
    let mut admin = server.admin.acquire().await.step("connect to server")?;
    for role in &stale {
        ddl(&mut admin, &role_limits_sql(role, limits), "set login role limits").await?;
    }
    Ok(stale.len())
}

/// Whether a role with `connection_limit` (`rolconnlimit`, -1: none) and `idle` (its
/// `idle_in_transaction_session_timeout=...` setting, if any) is held to `limits`.
fn holds(limits: &TenantRoleLimits, connection_limit: i32, idle: Option<&str>) -> bool {
    let wanted_limit = limits.connection_limit.map_or(-1, i64::from);
    let wanted_idle = limits
        .idle_in_transaction_timeout
        .map(|timeout| format!("idle_in_transaction_session_timeout={}", setting_value(timeout)));
    i64::from(connection_limit) == wanted_limit && idle == wanted_idle.as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_holds_to_the_limits_exactly_as_set() {
        let none = TenantRoleLimits::default();
        assert!(holds(&none, -1, None));
        assert!(!holds(&none, 5, None));
        assert!(!holds(&none, -1, Some("idle_in_transaction_session_timeout=1000ms")));
        let set = TenantRoleLimits {
            connection_limit: Some(5),
            idle_in_transaction_timeout: Some(Duration::from_secs(60)),
        };
        assert!(holds(&set, 5, Some("idle_in_transaction_session_timeout=60000ms")));
        assert!(!holds(&set, 5, Some("idle_in_transaction_session_timeout=1000ms")));
        assert!(!holds(&set, 6, Some("idle_in_transaction_session_timeout=60000ms")));
        assert!(!holds(&set, 5, None));
    }
}
