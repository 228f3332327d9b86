//! A tenant's API keys, kept in its own database: `POST /v1/tenants/{slug}/keys` mints one
//! (shown once), `GET` lists their names, `DELETE .../keys/{name}` revokes one. A revoked
//! key stops working within `VERIFIED_KEY_TTL` (5 s), how long a router remembers a key the
//! database confirmed.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::PgConnection;

use super::auth::Actor;
use super::error::ApiError;
use super::extract::{Body, Path};
use super::tenants::tenant_with_database;
use super::ApiState;
use crate::audit;
use crate::names::{quote_ident, TenantNames, TenantSlug};
use crate::provision::insert_key_as_owner;

/// `POST /v1/tenants/{slug}/keys` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    name: String,
}

/// A key as `GET /v1/tenants/{slug}/keys` lists it (never the key, nor its hash).
#[derive(Serialize, sqlx::FromRow)]
pub struct KeyInfo {
    name: String,
    created_at: chrono::DateTime<chrono::Utc>,
}

fn check_key_name(name: &str) -> Result<(), ApiError> {
    let len = name.chars().count();
    if len == 0 || len > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "invalid_key_name",
            "key name must be 1-100 printable characters".into(),
        ));
    }
    Ok(())
}

/// A connection to the database of tenant `slug` (active or suspended), with the names of
/// that database and its roles; 503 when it cannot be reached.
async fn tenant_database(state: &ApiState, slug: &str) -> Result<(TenantSlug, TenantNames, PgConnection), ApiError> {
    let (tenant, slug) = tenant_with_database(state, slug).await?;
    let server = state
        .servers
        .get(&tenant.server)
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("server {} is not configured", tenant.server)))?;
    let conn = server.connect(&tenant.database).await.map_err(|e| {
        tracing::warn!(error = %e, tenant = %slug, "connect to tenant database");
        ApiError::Unavailable("tenant_unavailable", "the tenant's database is unavailable".into())
    })?;
    Ok((slug, TenantNames::of_database(tenant.database), conn))
}

/// `SET LOCAL ROLE` to the tenant's owner, so the statements that follow in the transaction
/// act as the role that owns `api_keys` (an admin role that is not a superuser is a member
/// of it, not more).
async fn act_as_owner(tx: &mut PgConnection, names: &TenantNames) -> Result<(), ApiError> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET LOCAL ROLE {}",
        quote_ident(&names.owner_role())
    )))
    .execute(tx)
    .await?;
    Ok(())
}

/// `POST /v1/tenants/{slug}/keys` → 201 `{"name","api_key"}`; 409 `key_exists`.
pub async fn create(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(slug): Path<String>,
    Body(req): Body<CreateKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_key_name(&req.name)?;
    let (slug, names, mut conn) = tenant_database(&state, &slug).await?;
    let taken: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys WHERE name = $1)")
        .bind(&req.name)
        .fetch_one(&mut conn)
        .await?;
    if taken {
        return Err(ApiError::Conflict(
            "key_exists",
            format!("tenant already has a key named {:?}", req.name),
        ));
    }
    let (api_key, hash) = silo_tenant_app::api_keys::generate();
    insert_key_as_owner(&mut conn, &names, &req.name, &hash)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    let mut tx = state.catalog.begin().await?;
    audit::record(
        &mut tx,
        &actor,
        "tenant.key.create",
        Some(slug.as_str()),
        json!({"name": req.name}),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(json!({"name": req.name, "api_key": api_key}))))
}

/// `GET /v1/tenants/{slug}/keys` → 200 `{"items":[{"name","created_at"}]}`, by name.
pub async fn list(State(state): State<ApiState>, Path(slug): Path<String>) -> Result<Json<Value>, ApiError> {
    let (_, names, mut conn) = tenant_database(&state, &slug).await?;
    let mut tx = sqlx::Connection::begin(&mut conn).await?;
    act_as_owner(&mut tx, &names).await?;
    let items: Vec<KeyInfo> = sqlx::query_as("SELECT name, created_at FROM api_keys ORDER BY name")
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Json(json!({ "items": items })))
}

/// `DELETE /v1/tenants/{slug}/keys/{name}` → 204; 404 `key_not_found`.
pub async fn revoke(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path((slug, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    check_key_name(&name)?;
    let (_, names, mut conn) = tenant_database(&state, &slug).await?;
    let mut tx = sqlx::Connection::begin(&mut conn).await?;
    act_as_owner(&mut tx, &names).await?;
    let removed = sqlx::query("DELETE FROM api_keys WHERE name = $1")
        .bind(&name)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if removed == 0 {
        return Err(ApiError::NotFound(
            "key_not_found",
            format!("tenant {slug} has no key named {name:?}"),
        ));
    }
    // The audit entry is committed first: should the revocation's own commit fail after it,
    // the log shows an attempt, rather than missing a revocation.
    let mut audit_tx = state.catalog.begin().await?;
    audit::record(
        &mut audit_tx,
        &actor,
        "tenant.key.revoke",
        Some(slug.as_str()),
        json!({ "name": name }),
    )
    .await?;
    audit_tx.commit().await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
