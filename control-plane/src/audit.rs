//! The append-only audit log: who changed what, when, for which tenant. Written in the same
//! transaction as the change it records.

use serde_json::Value;
use sqlx::PgConnection;

/// Appends one entry.
pub async fn record(
    tx: &mut PgConnection,
    actor: &str,
    action: &str,
    tenant: Option<&str>,
    detail: Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO audit_log (actor, action, tenant, detail) VALUES ($1, $2, $3, $4)")
        .bind(actor)
        .bind(action)
        .bind(tenant)
        .bind(detail)
        .execute(tx)
        .await?;
    Ok(())
}

/// One audit log entry, as `GET /v1/audit` shows it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Entry {
    /// Increasing with time: pages are asked for with `before`.
    pub id: i64,
    /// When.
    pub at: chrono::DateTime<chrono::Utc>,
    /// The admin token's name (`scheduler` for the control plane's own schedule).
    pub actor: String,
    /// What, e.g. `tenant.create`.
    pub action: String,
    /// For which tenant, if any.
    pub tenant: Option<String>,
    /// The request's details (never a secret).
    pub detail: Value,
}

/// Which entries [`list`] returns: all of them when every field is None.
#[derive(Debug, Default)]
pub struct Filter {
    /// Only this tenant's.
    pub tenant: Option<String>,
    /// Only this actor's.
    pub actor: Option<String>,
    /// Only this action.
    pub action: Option<String>,
    /// Only entries older than this id (the next page).
    pub before: Option<i64>,
}

/// Up to `limit` entries matching `filter`, newest first.
pub async fn list(exec: &mut PgConnection, filter: &Filter, limit: i64) -> Result<Vec<Entry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, at, actor, action, tenant, detail FROM audit_log \
         WHERE ($1::text IS NULL OR tenant = $1) AND ($2::text IS NULL OR actor = $2) \
           AND ($3::text IS NULL OR action = $3) AND ($4::bigint IS NULL OR id < $4) \
         ORDER BY id DESC LIMIT $5",
    )
    .bind(&filter.tenant)
    .bind(&filter.actor)
    .bind(&filter.action)
    .bind(filter.before)
    .bind(limit)
    .fetch_all(exec)
    .await
}
