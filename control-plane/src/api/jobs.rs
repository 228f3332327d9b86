//! `/v1/jobs` and `/v1/servers`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Actor;
use super::error::ApiError;
use super::extract::{Path, Query};
use super::{paging, ApiState};
use crate::{audit, jobs};

/// Jobs per page unless `limit` says otherwise.
const DEFAULT_LIMIT: i64 = 200;

/// `GET /v1/jobs` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    state: Option<String>,
    kind: Option<String>,
    tenant: Option<String>,
    before: Option<i64>,
    limit: Option<i64>,
}

/// `GET /v1/jobs?state=&kind=&tenant=&before=&limit=` → 200 `{"items":[job...],
/// "next_before"}`, newest first (200 unless `limit` says otherwise).
pub async fn list(State(state): State<ApiState>, Query(q): Query<JobsQuery>) -> Result<Json<Value>, ApiError> {
    let limit = paging::limit(q.limit, DEFAULT_LIMIT)?;
    if let Some(job_state) = &q.state {
        if !["queued", "running", "succeeded", "failed"].contains(&job_state.as_str()) {
            return Err(ApiError::BadRequest(
                "invalid_query",
                format!("state {job_state:?} is not one of queued, running, succeeded, failed"),
            ));
        }
    }
    if let Some(kind) = q.kind.as_deref().filter(|kind| !jobs::KINDS.contains(kind)) {
        return Err(ApiError::BadRequest(
            "invalid_query",
            format!("kind {kind:?} is not one of {}", jobs::KINDS.join(", ")),
        ));
    }
    let filter = jobs::Filter {
        state: q.state,
        kind: q.kind,
        tenant: q.tenant,
        before: q.before,
    };
    let items = jobs::list(&state.catalog, &filter, limit).await?;
    let next_before = paging::next_before(items.iter().map(|job| job.id), limit);
    Ok(Json(json!({ "items": items, "next_before": next_before })))
}

fn parse_id(id: &str) -> Result<i64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::BadRequest("invalid_job_id", format!("{id:?} is not a job id")))
}

/// `GET /v1/jobs/{id}`.
pub async fn show(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Json<jobs::Job>, ApiError> {
    let id = parse_id(&id)?;
    jobs::get(&mut *state.catalog.acquire().await?, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound("job_not_found", format!("job {id} does not exist")))
}

/// `POST /v1/jobs/{id}/retry`: queues a failed job again; it resumes where it stopped.
pub async fn retry(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id)?;
    let mut tx = state.catalog.begin().await?;
    let job = match jobs::requeue(&mut tx, id).await? {
        None => return Err(ApiError::NotFound("job_not_found", format!("job {id} does not exist"))),
        Some(Err(job_state)) => {
            return Err(ApiError::Conflict(
                "invalid_state",
                format!("job {id} is {job_state}; only failed jobs are retried"),
            ))
        }
        Some(Ok(job)) => job,
    };
    audit::record(&mut tx, &actor, "job.retry", job.tenant.as_deref(), json!({"job": id})).await?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"job": job}))))
}

/// `POST /v1/jobs/{id}/cancel`: a queued backup, drill, rotation or rollout is failed at once
/// (200 `{"job"}`, error "cancelled by NAME before it started", or "while it waited to run
/// again" after a transient failure); a running rollout migrates no
/// further tenant, lets the ones in flight finish and ends failed (202 `{"job"}`); `jobs
/// retry` resumes either. 409 `not_cancellable` for any other running job (none is stopped
/// halfway) or a queued one that already marked its tenant; 409 `invalid_state` once ended.
pub async fn cancel(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id)?;
    let mut tx = state.catalog.begin().await?;
    let (status, job) = match jobs::cancel(&mut tx, id, &actor).await? {
        None => return Err(ApiError::NotFound("job_not_found", format!("job {id} does not exist"))),
        Some(jobs::Cancel::Unstarted(job)) => (StatusCode::OK, job),
        Some(jobs::Cancel::Stopping(job)) => (StatusCode::ACCEPTED, job),
        Some(jobs::Cancel::Refused(job)) => {
            return Err(ApiError::Conflict(
                "not_cancellable",
                format!(
                    "job {id} ({}) is {} and is not cancelled: only queued backups, drills, rotations \
                     and rollouts, and running rollouts, are",
                    job.kind, job.state
                ),
            ))
        }
        Some(jobs::Cancel::Ended(job)) => {
            return Err(ApiError::Conflict(
                "invalid_state",
                format!("job {id} is {}; there is nothing to cancel", job.state),
            ))
        }
    };
    audit::record(
        &mut tx,
        &actor,
        "job.cancel",
        job.tenant.as_deref(),
        json!({"job": id, "kind": job.kind}),
    )
    .await?;
    tx.commit().await?;
    Ok((status, Json(json!({"job": job}))))
}

/// `GET /v1/servers`: configured servers, how many live tenants each holds, and the
/// `sslmode` this control plane reaches it with.
pub async fn servers(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let rows: Vec<(String, String, i32, i32, i64)> = sqlx::query_as(
        "SELECT s.name, s.host, s.port, s.max_tenants, count(t.slug) FROM servers s \
         LEFT JOIN tenants t ON t.server = s.name AND t.status <> 'deleted' \
         GROUP BY s.name ORDER BY s.name",
    )
    .fetch_all(&state.catalog)
    .await?;
    let items: Vec<Value> = rows
        .into_iter()
        .filter_map(|(name, host, port, max, tenants)| {
            let config = &state.servers.get(&name)?.config;
            Some(json!({
                "name": name, "host": host, "port": port, "max_tenants": max, "tenants": tenants,
                "sslmode": config.tls.mode_name(), "region": config.region,
            }))
        })
        .collect();
    Ok(Json(json!({"items": items})))
}
