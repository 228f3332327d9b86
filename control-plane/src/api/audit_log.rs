//! `GET /v1/audit`: the audit log, newest first a page at a time, or followed oldest first
//! from a cursor (`after`); `GET /v1/audit/verify`: its seals checked.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::Query;
use super::{paging, ApiState};
use crate::audit;

/// Entries per page unless `limit` says otherwise.
const DEFAULT_LIMIT: i64 = 100;

/// `GET /v1/audit` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    tenant: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    before: Option<i64>,
    after: Option<String>,
    limit: Option<i64>,
}

/// `GET /v1/audit?tenant=&actor=&action=&before=&limit=` → 200
/// `{"items":[{"id","at","actor","action","tenant","detail"}],"next_before"}`, newest first;
/// `next_before` (null on the last page) is the `before` of the next page.
///
/// With `after=CURSOR` (`0-0`: from the start; `end`: from now on) → 200 `{"items","next"}`:
/// the entries after the cursor in commit order, oldest first, each with its `cursor`, and the
/// `after` of the next call. An entry is handed out once no running transaction can still
/// add one before it, so a follower neither skips nor repeats entries.
pub async fn list(State(state): State<ApiState>, Query(q): Query<AuditQuery>) -> Result<Json<Value>, ApiError> {
    let limit = paging::limit(q.limit, DEFAULT_LIMIT)?;
    let filter = audit::Filter {
        tenant: q.tenant,
        actor: q.actor,
        action: q.action,
        before: q.before,
    };
    let mut conn = state.catalog.acquire().await?;
    if let Some(after) = q.after {
        if filter.before.is_some() {
            return Err(ApiError::BadRequest(
                "invalid_query",
                "before pages back newest first and after follows oldest first: give one of them".into(),
            ));
        }
        let after = match after.as_str() {
            "end" => audit::After::End,
            cursor => audit::After::Cursor(
                cursor
                    .parse()
                    .map_err(|e: audit::BadCursor| ApiError::BadRequest("invalid_query", format!("after: {e}")))?,
            ),
        };
        let page = audit::follow(&mut conn, &filter, after, limit).await?;
        return Ok(Json(json!(page)));
    }
    let items = audit::list(&mut conn, &filter, limit).await?;
    let next_before = paging::next_before(items.iter().map(|e| e.id), limit);
    Ok(Json(json!({ "items": items, "next_before": next_before })))
}

/// `GET /v1/audit/verify` → 200 `{"intact","sealed","unsealed","head":{"seq","entry","hash",
/// "sealed_at"}|null,"problems":[{"entry","problem"}]}`: every sealed entry checked against
/// its seal (see `crate::audit::seal`). `intact` is false when any entry was changed, removed
/// or slipped in after it was sealed; `head` is the chain's last seal, to compare with a copy
/// kept elsewhere.
pub async fn verify(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let verification = audit::seal::verify(&state.catalog).await?;
    Ok(Json(json!(verification)))
}
