//! `POST /v1/migrations` (queue a rollout) and `GET /v1/migrations/status` (fleet versions).

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Actor;
use super::error::ApiError;
use super::extract::Body;
use super::ApiState;
use crate::names::TenantSlug;
use crate::rollout::RolloutParams;
use crate::tenant_schema::MigrationSource;
use crate::{audit, jobs};

/// `POST /v1/migrations` body.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    tenants: Option<Vec<String>>,
    concurrency: Option<usize>,
    canary: Option<usize>,
    per_server_concurrency: Option<usize>,
    max_failure_percent: Option<u32>,
}

/// `POST /v1/migrations` → 202 `{"job"}`. One rollout at a time: while one is unfinished,
/// the same job is returned.
pub async fn start(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    body: Option<Body<RolloutRequest>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req = body.map(|Body(b)| b).unwrap_or_default();
    let defaults = &state.config.migrations;
    if let Some(tenants) = &req.tenants {
        if tenants.is_empty() {
            return Err(ApiError::BadRequest(
                "invalid_request",
                "tenants must not be empty; omit it for all".into(),
            ));
        }
        for t in tenants {
            TenantSlug::parse(t).map_err(|e| ApiError::BadRequest("invalid_slug", format!("{t:?}: {e}")))?;
        }
        // A slug with a typo would otherwise make a rollout that succeeds doing nothing.
        let known: Vec<String> =
            sqlx::query_scalar("SELECT slug FROM tenants WHERE slug = ANY($1) AND status <> 'deleted'")
                .bind(tenants)
                .fetch_all(&state.catalog)
                .await?;
        if let Some(unknown) = tenants.iter().find(|t| !known.contains(t)) {
            return Err(ApiError::tenant_not_found(unknown));
        }
    }
    let positive = |v: Option<usize>, default: usize, name: &str| match v {
        Some(0) => Err(ApiError::BadRequest(
            "invalid_request",
            format!("{name} must be at least 1"),
        )),
        Some(n) => Ok(n.min(256)),
        None => Ok(default),
    };
    let params = RolloutParams {
        tenants: req.tenants,
        concurrency: positive(req.concurrency, defaults.concurrency, "concurrency")?,
        per_server_concurrency: positive(
            req.per_server_concurrency,
            defaults.per_server_concurrency,
            "per_server_concurrency",
        )?,
        canary: req.canary.unwrap_or(defaults.canary),
        max_failure_percent: req.max_failure_percent.unwrap_or(defaults.max_failure_percent).min(100),
    };
    let mut tx = state.catalog.begin().await?;
    let job = match jobs::lock_for_rollout(&mut tx).await? {
        Some(id) => jobs::get(&mut tx, id).await?,
        None => {
            // A tenant being moved would be migrated on the server it is leaving, one being
            // restored in a database about to be replaced.
            let busy: Option<(String, Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT slug, moving_to, restoring_from FROM tenants \
                 WHERE (moving_to IS NOT NULL OR restoring_from IS NOT NULL) \
                 AND ($1::text[] IS NULL OR slug = ANY($1)) ORDER BY slug LIMIT 1",
            )
            .bind(params.tenants.as_deref())
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((slug, moving_to, restoring_from)) = busy {
                let doing = match (moving_to, restoring_from) {
                    (Some(to), _) => format!("is moving to server {to}"),
                    (None, Some(file)) => format!("is being restored from {file}"),
                    (None, None) => "is busy".to_owned(),
                };
                return Err(ApiError::Conflict(
                    "tenant_busy",
                    format!("tenant {slug} {doing}; start the rollout once that is done"),
                ));
            }
            let params = serde_json::to_value(&params).map_err(|e| ApiError::Internal(e.into()))?;
            let job = jobs::enqueue(&mut tx, "migrate", None, params.clone()).await?;
            audit::record(
                &mut tx,
                &actor,
                "migrations.rollout",
                None,
                json!({"job": job.id, "params": params}),
            )
            .await?;
            Some(job)
        }
    };
    tx.commit().await?;
    let job = job.ok_or_else(|| ApiError::Internal(anyhow::anyhow!("rollout job vanished")))?;
    Ok((StatusCode::ACCEPTED, Json(json!({"job": job}))))
}

/// `GET /v1/migrations/status` → the target version and every tenant's version.
pub async fn status(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let migrations = MigrationSource::new(state.config.tenant_migrations_dir.as_deref())
        .load()
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    let rows: Vec<(String, String, i64, String)> = sqlx::query_as(
        "SELECT slug, server, schema_version, status FROM tenants WHERE status <> 'deleted' ORDER BY slug",
    )
    .fetch_all(&state.catalog)
    .await?;
    let items: Vec<Value> = rows
        .into_iter()
        .map(|(slug, server, v, status)| json!({"slug": slug, "server": server, "schema_version": v, "status": status}))
        .collect();
    Ok(Json(
        json!({"target_version": migrations.latest_version(), "items": items}),
    ))
}
