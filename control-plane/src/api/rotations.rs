//! `POST /v1/tenants/{slug}/rotate` and `POST /v1/rotations`: queue credential rotations.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::PgConnection;

use super::auth::Actor;
use super::error::ApiError;
use super::extract::{Body, Path};
use super::tenants::{lock_active_or_suspended, parse_slug};
use super::ApiState;
use crate::config::RotationStrategy;
use crate::rotation::RotateParams;
use crate::{audit, jobs, schedule};

/// Body of both endpoints (`tenants`/`all`/`due` only for `/v1/rotations`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    strategy: Option<String>,
    #[serde(default)]
    tenants: Vec<String>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    due: bool,
}

/// The strategy of a rotation request, and whether the request named it.
#[derive(Clone, Copy)]
struct Strategy {
    strategy: RotationStrategy,
    named: bool,
}

fn strategy(state: &ApiState, requested: Option<&str>) -> Result<Strategy, ApiError> {
    match requested {
        None => Ok(Strategy {
            strategy: state.config.rotation.strategy,
            named: false,
        }),
        Some(s) => Ok(Strategy {
            strategy: s
                .parse()
                .map_err(|e: String| ApiError::BadRequest("invalid_strategy", e))?,
            named: true,
        }),
    }
}

/// Queues a rotation of `slug`: the tenant must be active or suspended, with no other job.
/// A rotation already queued or running is returned instead, unless the request named
/// another strategy than it has (409: the request would be silently ignored).
async fn queue_one(tx: &mut PgConnection, actor: &str, slug: &str, strategy: Strategy) -> Result<jobs::Job, ApiError> {
    let slug = parse_slug(slug)?;
    lock_active_or_suspended(tx, &slug, "rotated").await?;
    if let Some(job) = jobs::active_for_tenant(tx, slug.as_str()).await? {
        if job.kind == "rotate" {
            let wanted = strategy.strategy.name();
            let running = serde_json::from_value::<RotateParams>(job.params.clone()).map(|p| p.strategy);
            match running {
                Ok(running) if strategy.named && running != wanted => {
                    return Err(ApiError::Conflict(
                        "tenant_busy",
                        format!(
                            "job {} is rotating tenant {slug} with strategy {running}; wait for it to finish to rotate with {wanted}",
                            job.id
                        ),
                    ))
                }
                _ => return Ok(job),
            }
        }
        return Err(ApiError::tenant_busy(&job));
    }
    let params =
        serde_json::to_value(RotateParams::new(strategy.strategy)).map_err(|e| ApiError::Internal(e.into()))?;
    let job = jobs::enqueue(tx, "rotate", Some(slug.as_str()), params).await?;
    audit::record(tx, actor, "tenant.rotate", Some(slug.as_str()), json!({"job": job.id})).await?;
    Ok(job)
}

/// `POST /v1/tenants/{slug}/rotate` → 202 `{"job"}`.
pub async fn rotate_tenant(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(slug): Path<String>,
    body: Option<Body<RotateRequest>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req = body.map(|Body(b)| b).unwrap_or_default();
    let strategy = strategy(&state, req.strategy.as_deref())?;
    let mut tx = state.catalog.begin().await?;
    let job = queue_one(&mut tx, &actor, &slug, strategy).await?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"job": job}))))
}

/// `POST /v1/rotations` with `tenants`, `all` or `due` → 202 `{"jobs":[...]}`.
pub async fn rotate_many(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Body(req): Body<RotateRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let strategy = strategy(&state, req.strategy.as_deref())?;
    let chosen = usize::from(!req.tenants.is_empty()) + usize::from(req.all) + usize::from(req.due);
    if chosen != 1 {
        return Err(ApiError::BadRequest(
            "invalid_request",
            "give exactly one of tenants, all, due".into(),
        ));
    }
    let mut tx = state.catalog.begin().await?;
    let slugs: Vec<String> = if req.all {
        sqlx::query_scalar("SELECT slug FROM tenants WHERE status IN ('active','suspended') ORDER BY slug")
            .fetch_all(&mut *tx)
            .await?
    } else if req.due {
        schedule::due_tenants(&mut tx, state.config.rotation.interval, i64::MAX).await?
    } else {
        req.tenants
    };
    let mut queued = Vec::with_capacity(slugs.len());
    for slug in &slugs {
        // `all` and `due` skip tenants busy with another job; named tenants must be free.
        match queue_one(&mut tx, &actor, slug, strategy).await {
            Ok(job) => queued.push(job),
            Err(ApiError::Conflict(..)) if req.all || req.due => {}
            Err(e) => return Err(e),
        }
    }
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"jobs": queued}))))
}
