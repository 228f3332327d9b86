//! `GET /v1/database-sizes`: the disk each tenant's database takes, largest first, and each
//! server's total: for capacity planning (which server fills up, which tenant to move to a
//! server of its own) and for billing by storage.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::Query;
use super::{ask_server, paging, ApiState};
use crate::servers::Server;

/// Tenants listed unless `limit` says otherwise.
const DEFAULT_LIMIT: i64 = 100;

/// `GET /v1/database-sizes` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizesQuery {
    server: Option<String>,
    limit: Option<i64>,
}

/// One tenant database as the catalog names it.
#[derive(sqlx::FromRow)]
struct TenantDatabase {
    slug: String,
    server: String,
    database: String,
}

/// `GET /v1/database-sizes?server=&limit=` → 200 `{"items":[{"slug","server","database",
/// "bytes"}],"servers":[{"name","tenants","bytes"} | {"name","tenants","error"}]}`: the live
/// tenants' databases, largest first (at most `limit`), and every server's total over all of
/// its tenants. A server that cannot be reached is reported in `servers` with its `error`;
/// the others are still listed. 400 `unknown_server`.
pub async fn list(State(state): State<ApiState>, Query(q): Query<SizesQuery>) -> Result<Json<Value>, ApiError> {
    let limit = paging::limit(q.limit, DEFAULT_LIMIT)?;
    if let Some(server) = &q.server {
        if state.servers.get(server).is_none() {
            return Err(ApiError::BadRequest(
                "unknown_server",
                format!("server {server:?} is not configured"),
            ));
        }
    }
    let databases: Vec<TenantDatabase> = sqlx::query_as(
        "SELECT slug, server, database FROM tenants \
         WHERE status <> 'deleted' AND ($1::text IS NULL OR server = $1) ORDER BY slug",
    )
    .bind(&q.server)
    .fetch_all(&state.catalog)
    .await?;
    let mut by_server: BTreeMap<&str, Vec<&TenantDatabase>> = BTreeMap::new();
    for database in &databases {
        by_server.entry(database.server.as_str()).or_default().push(database);
    }
    let mut items: Vec<(i64, Value)> = Vec::new();
    let mut servers = Vec::new();
    for (name, tenants) in by_server {
        let Some(server) = state.servers.get(name) else {
            servers.push(json!({"name": name, "tenants": tenants.len(), "error": "not configured"}));
            continue;
        };
        match sizes_on(server, &tenants).await {
            Ok(sizes) => {
                let total: i64 = sizes.values().sum();
                servers.push(json!({"name": name, "tenants": tenants.len(), "bytes": total}));
                for tenant in tenants {
                    // A database dropped since the catalog was read has no size: left out.
                    if let Some(&bytes) = sizes.get(tenant.database.as_str()) {
                        items.push((
                            bytes,
                            json!({"slug": tenant.slug, "server": name, "database": tenant.database, "bytes": bytes}),
                        ));
                    }
                }
            }
            Err(error) => {
                tracing::warn!(server = name, %error, "database sizes not read");
                servers.push(json!({"name": name, "tenants": tenants.len(), "error": error}));
            }
        }
    }
    items.sort_by_key(|(bytes, _)| std::cmp::Reverse(*bytes));
    let items: Vec<Value> = items
        .into_iter()
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .map(|(_, item)| item)
        .collect();
    Ok(Json(json!({"items": items, "servers": servers})))
}

/// The size in bytes of each of `tenants`' databases on `server`, by database name; an error
/// to report when the server cannot be asked.
async fn sizes_on(server: &Server, tenants: &[&TenantDatabase]) -> Result<BTreeMap<String, i64>, String> {
    let names: Vec<&str> = tenants.iter().map(|t| t.database.as_str()).collect();
    let query = sqlx::query_as::<_, (String, i64)>(
        "SELECT datname::text, pg_database_size(oid) FROM pg_database WHERE datname = ANY($1)",
    )
    .bind(&names)
    .fetch_all(&server.admin);
    Ok(ask_server(query).await?.into_iter().collect())
}
