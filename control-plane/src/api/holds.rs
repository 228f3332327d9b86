//! `POST /v1/tenants/{slug}/hold` and `DELETE /v1/tenants/{slug}/hold`: a legal hold on a
//! tenant's data. While held, the tenant cannot be deleted and none of its backups is erased —
//! not by hand, not by `keep_last` or `keep_for`. A deleted tenant can be held too (its
//! backups are what is left of its data). The hold stays on the slug until released.

use axum::extract::State;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::auth::Actor;
use super::error::ApiError;
use super::extract::{Body, Path};
use super::tenants::parse_slug;
use super::ApiState;
use crate::audit;
use crate::catalog::tenants::{self, Tenant};

/// `POST /v1/tenants/{slug}/hold` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hold {
    /// Why: a case or ticket reference, shown with the tenant and in refusals.
    reason: String,
}

/// `POST /v1/tenants/{slug}/hold` `{"reason"}` → 200 tenant (with `legal_hold`). Holding a
/// held tenant again replaces the reason. 404 when no tenant, not even a deleted one, has the
/// slug.
pub async fn hold(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(slug): Path<String>,
    Body(req): Body<Hold>,
) -> Result<Json<Tenant>, ApiError> {
    let reason = req.reason.trim();
    let len = reason.chars().count();
    if len == 0 || len > 500 || reason.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "invalid_reason",
            "reason must be 1-500 printable characters (e.g. a case reference)".into(),
        ));
    }
    set(&state, &actor, &slug, Some(reason)).await
}

/// `DELETE /v1/tenants/{slug}/hold` → 200 tenant: the hold is released (nothing to do when
/// there is none); retention erases what it would have, at its next pass.
pub async fn release(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(slug): Path<String>,
) -> Result<Json<Tenant>, ApiError> {
    set(&state, &actor, &slug, None).await
}

async fn set(state: &ApiState, actor: &str, slug: &str, reason: Option<&str>) -> Result<Json<Tenant>, ApiError> {
    let slug = parse_slug(slug)?;
    let mut tx = state.catalog.begin().await?;
    if !tenants::set_legal_hold(&mut tx, slug.as_str(), reason).await? {
        return Err(ApiError::tenant_not_found(slug.as_str()));
    }
    let (action, detail) = match reason {
        Some(reason) => ("tenant.hold", json!({ "reason": reason })),
        None => ("tenant.release", json!({})),
    };
    audit::record(&mut tx, actor, action, Some(slug.as_str()), detail).await?;
    let tenant = tenants::get(&mut tx, slug.as_str())
        .await?
        .ok_or_else(|| ApiError::tenant_not_found(slug.as_str()))?;
    tx.commit().await?;
    Ok(Json(tenant))
}

/// 409 `legal_hold` when `slug`'s data is under legal hold; `what` names what was refused.
pub(super) async fn refuse_if_held(tx: &mut sqlx::PgConnection, slug: &str, what: &str) -> Result<(), ApiError> {
    match tenants::legal_hold(tx, slug).await? {
        Some(reason) => Err(ApiError::Conflict(
            "legal_hold",
            format!("tenant {slug} is under legal hold ({reason}): {what} is refused until the hold is released"),
        )),
        None => Ok(()),
    }
}
