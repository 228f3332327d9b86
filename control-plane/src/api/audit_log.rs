//! `GET /v1/audit`: the audit log, newest first, a page at a time.

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
    limit: Option<i64>,
}

/// `GET /v1/audit?tenant=&actor=&action=&before=&limit=` → 200
/// `{"items":[{"id","at","actor","action","tenant","detail"}],"next_before"}`, newest first;
/// `next_before` (null on the last page) is the `before` of the next page.
pub async fn list(State(state): State<ApiState>, Query(q): Query<AuditQuery>) -> Result<Json<Value>, ApiError> {
    let limit = paging::limit(q.limit, DEFAULT_LIMIT)?;
    let filter = audit::Filter {
        tenant: q.tenant,
        actor: q.actor,
        action: q.action,
        before: q.before,
    };
    let mut conn = state.catalog.acquire().await?;
    let items = audit::list(&mut conn, &filter, limit).await?;
    let next_before = paging::next_before(items.iter().map(|e| e.id), limit);
    Ok(Json(json!({ "items": items, "next_before": next_before })))
}
