//! Admin tokens of their own for operators and automation, so the audit log says who did
//! what: `POST /v1/tokens`, `GET /v1/tokens`, `DELETE /v1/tokens/{name}`. A token is shown
//! once, when it is created, and stored as its SHA-256 only; its role (`TokenRole`) says what
//! it may do.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::auth::{new_admin_token, token_hash, Actor, TokenRole};
use super::error::ApiError;
use super::extract::{Body, Path};
use super::ApiState;
use crate::audit;
use crate::names::{is_admin_token_name, ADMIN_TOKEN_NAME_RULE};

/// The token `control_plane.admin_token_env` sets at every start.
const BOOTSTRAP: &str = "bootstrap";
/// The actor the control plane's own schedule is audited as.
const SCHEDULER: &str = "scheduler";

/// `POST /v1/tokens` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    name: String,
    /// `operator` unless given.
    role: Option<TokenRole>,
    /// How long the token works, e.g. `90d` (forever unless given).
    expires_in: Option<String>,
}

/// A token as `GET /v1/tokens` lists it (never the token itself).
#[derive(Serialize, sqlx::FromRow)]
pub struct TokenInfo {
    name: String,
    role: String,
    created_at: chrono::DateTime<chrono::Utc>,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    last_used_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The longest `expires_in`.
const MAX_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10 * 366 * 86_400);

/// `expires_in` as seconds: a duration such as `90d` or `12h`, from 1 s to 10 years.
fn parse_lifetime(expires_in: Option<&str>) -> Result<Option<f64>, ApiError> {
    let Some(text) = expires_in else {
        return Ok(None);
    };
    match humantime::parse_duration(text) {
        Ok(lifetime) if lifetime >= std::time::Duration::from_secs(1) && lifetime <= MAX_LIFETIME => {
            Ok(Some(lifetime.as_secs_f64()))
        }
        _ => Err(ApiError::BadRequest(
            "invalid_expires_in",
            format!("expires_in {text:?} must be a duration from 1s to 10 years, e.g. 90d or 12h"),
        )),
    }
}

fn parse_name(name: &str) -> Result<&str, ApiError> {
    if !is_admin_token_name(name) {
        return Err(ApiError::BadRequest("invalid_token_name", ADMIN_TOKEN_NAME_RULE.into()));
    }
    Ok(name)
}

/// `POST /v1/tokens {"name","role"?,"expires_in"?}` → 201
/// `{"name","role","token","created_at","expires_at"}`; 409 `token_exists`. Admin tokens only
/// (see `TokenRole`).
pub async fn create(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Body(req): Body<CreateToken>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let name = parse_name(&req.name)?;
    if name == BOOTSTRAP || name == SCHEDULER {
        return Err(ApiError::BadRequest(
            "invalid_token_name",
            format!("{name:?} is reserved: {BOOTSTRAP:?} is the token of control_plane.admin_token_env, {SCHEDULER:?} the control plane's own schedule"),
        ));
    }
    let role = req.role.unwrap_or(TokenRole::Operator);
    let lifetime = parse_lifetime(req.expires_in.as_deref())?;
    let token = new_admin_token();
    let mut tx = state.catalog.begin().await?;
    type Times = (chrono::DateTime<chrono::Utc>, Option<chrono::DateTime<chrono::Utc>>);
    let created: Option<Times> = sqlx::query_as(
        "INSERT INTO admin_tokens (name, token_hash, role, expires_at) \
         VALUES ($1, $2, $3, now() + make_interval(secs => $4)) ON CONFLICT (name) DO NOTHING \
         RETURNING created_at, expires_at",
    )
    .bind(name)
    .bind(&token_hash(token.expose_secret())[..])
    .bind(role.as_str())
    .bind(lifetime)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((created_at, expires_at)) = created else {
        return Err(ApiError::Conflict(
            "token_exists",
            format!("there is already a token named {name:?}; revoke it first to replace it"),
        ));
    };
    let detail = json!({ "name": name, "role": role, "expires_at": expires_at });
    audit::record(&mut tx, &actor, "token.create", None, detail).await?;
    tx.commit().await?;
    state.tokens.reload().await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "name": name,
            "role": role,
            "token": token.expose_secret(),
            "created_at": created_at,
            "expires_at": expires_at,
        })),
    ))
}

/// `GET /v1/tokens` → 200 `{"items":[{"name","role","created_at","expires_at","last_used_at"}]}`.
pub async fn list(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let items: Vec<TokenInfo> =
        sqlx::query_as("SELECT name, role, created_at, expires_at, last_used_at FROM admin_tokens ORDER BY name")
            .fetch_all(&state.catalog)
            .await?;
    Ok(Json(json!({ "items": items })))
}

/// `DELETE /v1/tokens/{name}` → 204: the token stops working at once on this control plane
/// and within seconds on the others. 404 `token_not_found`; 409 `token_managed` for the
/// bootstrap token, which the control plane sets again at every start. Admin tokens only.
pub async fn revoke(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let name = parse_name(&name)?;
    if name == BOOTSTRAP {
        return Err(ApiError::Conflict(
            "token_managed",
            "the bootstrap token is set from control_plane.admin_token_env at every start; change it there".into(),
        ));
    }
    let mut tx = state.catalog.begin().await?;
    let removed = sqlx::query("DELETE FROM admin_tokens WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if removed == 0 {
        return Err(ApiError::NotFound(
            "token_not_found",
            format!("there is no token named {name:?}"),
        ));
    }
    audit::record(&mut tx, &actor, "token.revoke", None, json!({ "name": name })).await?;
    tx.commit().await?;
    state.tokens.reload().await?;
    Ok(StatusCode::NO_CONTENT)
}
