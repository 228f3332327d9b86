//! `POST /v1/tenants/{slug}/backup`: a backup of a tenant's database while it keeps serving
//! (a `backup` job; the file goes to `[backups] dir`, named in the job's progress),
//! `GET /v1/tenants/{slug}/backups`: the backups a tenant can be restored from,
//! `DELETE /v1/tenants/{slug}/backups/{file}`: one erased,
//! `GET /v1/tenants/{slug}/backups/{file}/content`: one as the `pg_dump` file it was taken
//! as (a tenant's data handed back),
//! `POST /v1/tenants/{slug}/restore`: a tenant's data put back as one of its backups holds
//! it (a `restore` job; see `crate::restores`), and
//! `POST /v1/tenants/{slug}/backups/verify`: a restore drill of one of them into a scratch
//! database (a `verify` job; see `crate::verify`).

use std::collections::HashMap;

use axum::extract::State;
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::io::ReaderStream;

use super::auth::Actor;
use super::error::ApiError;
use super::extract::{Body, Path};
use super::holds::refuse_if_held;
use super::tenant_jobs::{accepted, asked_again, enqueue_audited, NewJob};
use super::tenants::{check_backup, lock_active_or_suspended, parse_slug};
use super::ApiState;
use crate::catalog::tenants;
use crate::restores::RestoreParams;
use crate::verify::VerifyParams;
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
    if let Some(job) = asked_again(&mut tx, &slug, |job| job.kind == "backup").await? {
        return Ok(accepted(job));
    }
    let new = NewJob {
        kind: "backup",
        params: &json!({}),
        action: "tenant.backup",
        detail: json!({}),
    };
    enqueue_audited(tx, &actor, &slug, new).await
}

/// `GET /v1/tenants/{slug}/backups` → 200 `{"items":[{"file","bytes","created_at","job"}]}`,
/// newest first: the files `siloctl tenant create SLUG --restore-from FILE` restores. A
/// deleted tenant's backups are listed too; 404 for a slug that has neither a tenant nor
/// backups.
pub async fn list(State(state): State<ApiState>, Path(slug): Path<String>) -> Result<Json<Value>, ApiError> {
    let slug = parse_slug(&slug)?;
    require_backups_dir(&state, "listing backups")?;
    let backups = state.backups.list(&slug).await?;
    if backups.is_empty() {
        let mut conn = state.catalog.acquire().await?;
        if tenants::get(&mut conn, slug.as_str()).await?.is_none() {
            return Err(ApiError::tenant_not_found(slug.as_str()));
        }
    }
    // When each was last proved by a restore drill.
    let verified: HashMap<String, chrono::DateTime<chrono::Utc>> = sqlx::query_as(
        "SELECT progress->>'backup', max(updated_at) FROM jobs \
         WHERE tenant = $1 AND kind = 'verify' AND state = 'succeeded' AND progress ? 'backup' GROUP BY 1",
    )
    .bind(slug.as_str())
    .fetch_all(&state.catalog)
    .await?
    .into_iter()
    .collect();
    let mut items = Vec::with_capacity(backups.len());
    for backup in backups {
        let verified_at = verified.get(&backup.file).copied();
        let mut item = serde_json::to_value(backup).map_err(|e| ApiError::Internal(e.into()))?;
        item["verified_at"] = json!(verified_at);
        items.push(item);
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
    refuse_if_held(&mut tx, slug.as_str(), "erasing its backups").await?;
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
    if !backups.exists(&slug, &file).await? {
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
    if !backups.remove(&slug, &file).await? {
        return Err(not_found());
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/tenants/{slug}/backups/{file}/content` → 200 `application/octet-stream`: the
/// backup as the `pg_dump --format=custom` file it was taken as, decrypted on its way out, for
/// handing a tenant its data (offboarding, a data-portability request) or a restore outside
/// silo. Audited (`tenant.backup.download`) before a byte is sent; not for viewer tokens. A
/// backup that fails to decrypt part way ends the response with an error, never with a clean
/// end. 404 `backup_not_found`, 422 `backup_unreadable` (not a backup silo took, or encrypted
/// under a key this control plane lacks).
pub async fn download(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path((slug, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let slug = parse_slug(&slug)?;
    require_backups_dir(&state, "downloading a backup")?;
    let Some(path) = state.backups.fetch(&slug, &file).await? else {
        return Err(ApiError::NotFound(
            "backup_not_found",
            format!("tenant {slug} has no backup named {file:?}"),
        ));
    };
    let dump = state.backups.pg_dump_reader(&slug, &path).await.map_err(|e| {
        if e.is_transient() {
            return ApiError::from(e);
        }
        tracing::warn!(tenant = %slug, error = %e, "backup not readable for a download");
        ApiError::Unprocessable(
            "backup_unreadable",
            format!(
                "backup {file:?} of tenant {slug} cannot be read: it is not a backup silo took, or it is encrypted under a key this control plane does not have"
            ),
        )
    })?;
    let mut tx = state.catalog.begin().await?;
    audit::record(
        &mut tx,
        &actor,
        "tenant.backup.download",
        Some(slug.as_str()),
        json!({ "file": file }),
    )
    .await?;
    tx.commit().await?;
    let headers = [
        (CONTENT_TYPE, "application/octet-stream".to_owned()),
        (CONTENT_DISPOSITION, format!("attachment; filename=\"{file}\"")),
    ];
    Ok((headers, axum::body::Body::from_stream(ReaderStream::new(dump))).into_response())
}

/// `POST /v1/tenants/{slug}/restore` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreTenant {
    /// The file name of one of the tenant's backups.
    backup: String,
}

/// `POST /v1/tenants/{slug}/restore` `{"backup"}` → 202 `{"job"}`: the tenant's database
/// becomes the backup's (after a backup of it as it is now), and the tenant answers 503 from
/// the moment the job is queued until it is done. Asking again while the same restore runs
/// returns that job. 422 `backup_not_found` for anything but one of the tenant's own
/// backups, 409 `rollout_running` while a migration rollout runs.
pub async fn restore(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(slug): Path<String>,
    Body(req): Body<RestoreTenant>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let slug = parse_slug(&slug)?;
    let mut tx = state.catalog.begin().await?;
    lock_active_or_suspended(&mut tx, &slug, "restored").await?;
    let same = |job: &jobs::Job| job.kind == "restore" && job.params["backup"] == req.backup.as_str();
    if let Some(job) = asked_again(&mut tx, &slug, same).await? {
        return Ok(accepted(job));
    }
    check_backup(&state, &slug, &req.backup).await?;
    if let Some(id) = jobs::lock_for_rollout(&mut tx).await? {
        return Err(ApiError::Conflict(
            "rollout_running",
            format!("migration rollout job {id} is running; restore the tenant once it is done"),
        ));
    }
    // Marked at once: routers stop serving the tenant before its data is replaced.
    tenants::set_restoring_from(&mut tx, slug.as_str(), Some(&req.backup)).await?;
    let new = NewJob {
        kind: "restore",
        params: &RestoreParams {
            backup: req.backup.clone(),
        },
        action: "tenant.restore",
        detail: json!({"backup": req.backup}),
    };
    enqueue_audited(tx, &actor, &slug, new).await
}

/// `POST /v1/tenants/{slug}/backups/verify` body.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct VerifyBackup {
    /// The file name of one of the tenant's backups; default: its newest.
    #[serde(default)]
    backup: Option<String>,
}

/// `POST /v1/tenants/{slug}/backups/verify` `{"backup"?}` → 202 `{"job"}`: the backup (by
/// default the tenant's newest) is restored into a scratch database on the tenant's server,
/// checked and dropped, while the tenant keeps serving. Asking again while the same drill
/// runs returns that job. 422 `backup_not_found` when the tenant has no such backup (or none
/// at all), 409 `tenant_busy` while another job of the tenant runs.
pub async fn verify(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(slug): Path<String>,
    body: Option<Body<VerifyBackup>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let slug = parse_slug(&slug)?;
    let req = body.map(|Body(req)| req).unwrap_or_default();
    require_backups_dir(&state, "verifying a backup")?;
    let backup = match req.backup {
        Some(backup) => {
            check_backup(&state, &slug, &backup).await?;
            backup
        }
        None => state
            .backups
            .latest(&slug)
            .await?
            .map(|newest| newest.file)
            .ok_or_else(|| {
                ApiError::Unprocessable(
                    "backup_not_found",
                    format!("tenant {slug} has no backups to verify (siloctl tenant backup {slug} takes one)"),
                )
            })?,
    };
    let mut tx = state.catalog.begin().await?;
    lock_active_or_suspended(&mut tx, &slug, "verified").await?;
    let same = |job: &jobs::Job| job.kind == "verify" && job.params["backup"] == backup.as_str();
    if let Some(job) = asked_again(&mut tx, &slug, same).await? {
        return Ok(accepted(job));
    }
    let new = NewJob {
        kind: "verify",
        params: &VerifyParams {
            backup: Some(backup.clone()),
        },
        action: "tenant.backup.verify",
        detail: json!({"backup": backup}),
    };
    enqueue_audited(tx, &actor, &slug, new).await
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
