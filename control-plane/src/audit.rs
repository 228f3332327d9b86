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
