//! `POST /v1/tenants/{slug}/move`: move a tenant's database to another server (a `move` job;
//! see `crate::moves`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Actor;
use super::backups::require_backups_dir;
use super::error::ApiError;
use super::extract::{Body, Path};
use super::tenant_jobs::{accepted, asked_again, enqueue_audited, NewJob};
use super::tenants::{lock_active_or_suspended, parse_slug};
use super::ApiState;
use crate::catalog::tenants::{self, StartMoveError};
use crate::jobs::Job;
use crate::moves::MoveParams;
use crate::replication;

/// `POST /v1/tenants/{slug}/move` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveTenant {
    /// The server to move to.
    server: String,
    /// Allow a server in another region than the tenant's.
    #[serde(default)]
    allow_region_change: bool,
    /// Copy the database by logical replication while the tenant is served.
    #[serde(default)]
    online: bool,
}

/// `POST /v1/tenants/{slug}/move` → 202 `{"job"}`. The tenant answers 503 from the moment
/// the job is queued until its database is served from the new server. Asking again while
/// the same move runs returns that job.
pub async fn move_tenant(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(slug): Path<String>,
    Body(req): Body<MoveTenant>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let slug = parse_slug(&slug)?;
    let Some(target) = state.servers.get(&req.server) else {
        return Err(ApiError::BadRequest(
            "unknown_server",
            format!("server {:?} is not configured", req.server),
        ));
    };
    require_backups_dir(&state, "a move (it copies the database through a backup)")?;
    let mut tx = state.catalog.begin().await?;
    lock_active_or_suspended(&mut tx, &slug, "moved").await?;
    let tenant = tenants::get(&mut tx, slug.as_str())
        .await?
        .ok_or_else(|| ApiError::tenant_not_found(slug.as_str()))?;
    let same = |job: &Job| job.kind == "move" && tenant.moving_to.as_deref() == Some(req.server.as_str());
    if let Some(job) = asked_again(&mut tx, &slug, same).await? {
        return Ok(accepted(job));
    }
    if tenant.server == req.server {
        return Err(ApiError::Conflict(
            "already_on_server",
            format!("tenant {slug} already lives on server {:?}", req.server),
        ));
    }
    let target_region = target.config.region.as_deref();
    if tenant.region.as_deref() != target_region && !req.allow_region_change {
        let region = |r: Option<&str>| r.map_or_else(|| "no region".to_owned(), |r| format!("region {r:?}"));
        return Err(ApiError::Conflict(
            "region_mismatch",
            format!(
                "tenant {slug} lives in {}, server {:?} is in {}: allow_region_change moves its data there",
                region(tenant.region.as_deref()),
                req.server,
                region(target_region)
            ),
        ));
    }
    if req.online {
        let source = state.servers.get(&tenant.server).ok_or_else(|| {
            ApiError::Unavailable(
                "unknown_server",
                format!("server {:?} is not configured", tenant.server),
            )
        })?;
        let unavailable = replication::unavailable(source, target, &tenant.database)
            .await
            .map_err(|e| ApiError::Unavailable("server_unavailable", e.to_string()))?;
        if let Some(why) = unavailable {
            return Err(ApiError::Unprocessable(
                "online_move_unavailable",
                format!(
                    "tenant {slug} cannot move online: {why}; a move without online copies it while it is unavailable"
                ),
            ));
        }
    }
    // Marked at once: the target's room is taken, and routers stop serving the tenant
    // (online: from the cutover).
    tenants::start_move(&mut tx, slug.as_str(), &req.server, req.online)
        .await
        .map_err(|e| match e {
            StartMoveError::RolloutRunning(_) => ApiError::Conflict("rollout_running", e.to_string()),
            StartMoveError::NoCapacity(_) => ApiError::Unavailable("no_capacity", e.to_string()),
            StartMoveError::Database(e) => e.into(),
        })?;
    let new = NewJob {
        kind: "move",
        params: &MoveParams {
            from: tenant.server.clone(),
            to: req.server.clone(),
            secret_version: uuid::Uuid::new_v4().to_string(),
            online: req.online,
        },
        action: "tenant.move",
        detail: json!({
            "from": tenant.server, "to": req.server,
            "from_region": tenant.region, "to_region": target_region, "online": req.online,
        }),
    };
    enqueue_audited(tx, &actor, &slug, new).await
}
