//! `POST /v1/tenants/{slug}/backup`: a backup of a tenant's database while it keeps serving
//! (a `backup` job; the file goes to `[backups] dir`, named in the job's progress),
//! `GET /v1/tenants/{slug}/backups`: the backups a tenant can be restored from, and
//! `DELETE /v1/tenants/{slug}/backups/{file}`: one erased.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::auth::Actor;
use super::error::ApiError;
use super::extract::Path;
use super::tenants::{lock_active_or_suspended, parse_slug};
use super::ApiState;
use crate::catalog::tenants;
use crate::{audit, jobs};

/// `POST /v1/tenants/{slug}/backup` → 202 `{"job"}`. Asking again while the backup runs
/// returns that job.
pub async fn back_up(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(slug): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let slug = parse_slug(&slug)?;
    require_backups_dir(&state, "a backup")?;
    let mut tx = state.catalog.begin().await?;
    lock_active_or_suspended(&mut tx, &slug, "backed up").await?;
    if let Some(job) = jobs::active_for_tenant(&mut tx, slug.as_str()).await? {
        if job.kind == "backup" {
            return Ok((StatusCode::ACCEPTED, Json(json!({ "job": job }))));
        }
        return Err(ApiError::tenant_busy(&job));
    }
    let job = jobs::enqueue(&mut tx, "backup", Some(slug.as_str()), json!({})).await?;
    audit::record(
        &mut tx,
        &actor,
        "tenant.backup",
        Some(slug.as_str()),
        json!({"job": job.id}),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "job": job }))))
}

/// `GET /v1/tenants/{slug}/backups` → 200 `{"items":[{"file","bytes","created_at","job"}]}`,
/// newest first: the files `siloctl tenant create SLUG --restore-from FILE` restores. A
/// deleted tenant's backups are listed too; 404 for a slug that has neither a tenant nor
/// backups.
pub async fn list(State(state): State<ApiState>, Path(slug): Path<String>) -> Result<Json<Value>, ApiError> {
    let slug = parse_slug(&slug)?;
    require_backups_dir(&state, "listing backups")?;
    let items = state.backups.list(&slug).map_err(|e| ApiError::Internal(e.into()))?;
    if items.is_empty() {
        let mut conn = state.catalog.acquire().await?;
        if tenants::get(&mut conn, slug.as_str()).await?.is_none() {
            return Err(ApiError::tenant_not_found(slug.as_str()));
        }
    }
    Ok(Json(json!({ "items": items })))
}

/// `DELETE /v1/tenants/{slug}/backups/{file}` → 204: the dump is erased (e.g. a deleted
/// tenant's data that must not be kept). 404 `backup_not_found`; 409 `tenant_busy` while a
/// job of the tenant runs, since it may be reading that file.
pub async fn remove(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path((slug, file)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let slug = parse_slug(&slug)?;
    require_backups_dir(&state, "erasing a backup")?;
    let mut tx = state.catalog.begin().await?;
    if let Some(job) = jobs::active_for_tenant(&mut tx, slug.as_str()).await? {
        return Err(ApiError::tenant_busy(&job));
    }
    let backups = &state.backups;
    let not_found = || {
        ApiError::NotFound(
            "backup_not_found",
            format!("tenant {slug} has no backup named {file:?}"),
        )
    };
    if backups
        .find(&slug, &file)
        .map_err(|e| ApiError::Internal(e.into()))?
        .is_none()
    {
        return Err(not_found());
    }
    // The audit entry is committed first: should the removal fail after it, the log shows an
    // attempt, rather than missing an erasure.
    audit::record(
        &mut tx,
        &actor,
        "tenant.backup.delete",
        Some(slug.as_str()),
        json!({ "file": file }),
    )
    .await?;
    tx.commit().await?;
    if !backups.remove(&slug, &file).map_err(|e| ApiError::Internal(e.into()))? {
        return Err(not_found());
    }
    Ok(StatusCode::NO_CONTENT)
}

/// 422 `backup_unavailable` unless `[backups] dir` is set; `what` names what needs it.
pub(super) fn require_backups_dir(state: &ApiState, what: &str) -> Result<(), ApiError> {
    if state.config.backups.dir.is_none() {
        return Err(ApiError::Unprocessable(
            "backup_unavailable",
            format!("{what} needs [backups] dir, which this control plane does not configure"),
        ));
    }
    Ok(())
}
