//! What the endpoints that queue a job for one tenant (backup, restore, verify, move) share:
//! asking again while the same job runs returns that job, another job of the tenant is 409
//! `tenant_busy`, and a new job is queued and audited in the request's transaction.

use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::{PgConnection, Postgres, Transaction};

use super::error::ApiError;
use crate::audit;
use crate::jobs::{self, Job};
use crate::names::TenantSlug;

/// The tenant's job in progress when it is the one asked for again (`same`), for the request
/// to return; None when no job of the tenant runs; 409 `tenant_busy` when another one does.
pub(super) async fn asked_again(
    tx: &mut PgConnection,
    slug: &TenantSlug,
    same: impl FnOnce(&Job) -> bool,
) -> Result<Option<Job>, ApiError> {
    match jobs::active_for_tenant(tx, slug.as_str()).await? {
        Some(job) if same(&job) => Ok(Some(job)),
        Some(job) => Err(ApiError::tenant_busy(&job)),
        None => Ok(None),
    }
}

/// 202 `{"job"}`.
pub(super) fn accepted(job: Job) -> (StatusCode, Json<Value>) {
    (StatusCode::ACCEPTED, Json(json!({ "job": job })))
}

/// A job to queue for a tenant, and how the audit log records the request.
pub(super) struct NewJob<'a, P> {
    /// The job's kind.
    pub kind: &'a str,
    /// Its parameters (never secrets).
    pub params: &'a P,
    /// The audit log's action.
    pub action: &'a str,
    /// The audit entry's detail; the job's id is added as `job`.
    pub detail: Value,
}

/// Queues `new` for `slug`, records it in the audit log as done by `actor`, and commits `tx`:
/// 202 `{"job"}`.
pub(super) async fn enqueue_audited<P: Serialize>(
    mut tx: Transaction<'static, Postgres>,
    actor: &str,
    slug: &TenantSlug,
    new: NewJob<'_, P>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let params = serde_json::to_value(new.params).map_err(|e| ApiError::Internal(e.into()))?;
    let job = jobs::enqueue(&mut tx, new.kind, Some(slug.as_str()), params).await?;
    let mut detail = new.detail;
    if let Some(fields) = detail.as_object_mut() {
        fields.insert("job".into(), job.id.into());
    }
    audit::record(&mut tx, actor, new.action, Some(slug.as_str()), detail).await?;
    tx.commit().await?;
    Ok(accepted(job))
}
