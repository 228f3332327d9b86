//! The admin API: JSON over HTTP under `/v1`, bearer admin tokens, every change in the audit
//! log. Handlers are thin: auth → typed JSON → catalog/job → JSON.

mod audit_log;
mod auth;
mod backups;
pub mod error;
mod extract;
mod holds;
mod jobs;
mod keys;
mod migrations;
mod moves;
mod openapi;
mod paging;
mod rotations;
mod server_check;
mod sizes;
mod tenant_jobs;
mod tenants;
mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, OriginalUri, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use auth::Actor;
pub use auth::{new_admin_token, AdminTokens, TokenRole};
use error::ApiError;

use crate::backup::Backups;
use crate::config::Config;
use crate::gauges::Gauges;
use crate::secrets::SecretStore;
use crate::servers::Servers;

/// Largest admin request body.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long one PostgreSQL server may take to answer a report's query before it is reported
/// unreachable (the others are still reported).
const SERVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs a report's `query` against one server within [`SERVER_TIMEOUT`]; on failure, the
/// error to report for that server.
async fn ask_server<T>(query: impl std::future::Future<Output = Result<T, sqlx::Error>>) -> Result<T, String> {
    match tokio::time::timeout(SERVER_TIMEOUT, query).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(format!("unreachable: {e}")),
        Err(_) => Err(format!("no answer within {}s", SERVER_TIMEOUT.as_secs())),
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The catalog.
    pub catalog: PgPool,
    /// The secret store.
    pub store: Arc<dyn SecretStore>,
    /// Tenant database servers.
    pub servers: Arc<Servers>,
    /// The configuration.
    pub config: Arc<Config>,
    /// Admin tokens.
    pub tokens: Arc<AdminTokens>,
    /// Tenant backups (`[backups]`).
    pub backups: Backups,
    /// The gauges measured for `/metrics`.
    pub gauges: Arc<Gauges>,
    /// Prometheus exposition.
    pub metrics: Option<PrometheusHandle>,
}

/// The admin API router.
pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/tenants", get(tenants::list).post(tenants::create))
        .route(
            "/tenants/{slug}",
            get(tenants::show).patch(tenants::update).delete(tenants::delete),
        )
        .route("/tenants/{slug}/suspend", post(tenants::suspend))
        .route("/tenants/{slug}/hold", post(holds::hold).delete(holds::release))
        .route("/tenants/{slug}/resume", post(tenants::resume))
        .route("/tenants/{slug}/keys", get(keys::list).post(keys::create))
        .route("/tenants/{slug}/keys/{name}", delete(keys::revoke))
        .route("/tenants/{slug}/credentials", get(tenants::credentials))
        .route("/tenants/{slug}/rotate", post(rotations::rotate_tenant))
        .route("/tenants/{slug}/move", post(moves::move_tenant))
        .route("/tenants/{slug}/backup", post(backups::back_up))
        .route("/tenants/{slug}/backups", get(backups::list))
        .route("/tenants/{slug}/backups/{file}", delete(backups::remove))
        .route("/tenants/{slug}/backups/{file}/content", get(backups::download))
        .route("/tenants/{slug}/restore", post(backups::restore))
        .route("/tenants/{slug}/backups/verify", post(backups::verify))
        .route("/rotations", post(rotations::rotate_many))
        .route("/migrations", post(migrations::start))
        .route("/migrations/status", get(migrations::status))
        .route("/jobs", get(jobs::list))
        .route("/jobs/{id}", get(jobs::show))
        .route("/jobs/{id}/retry", post(jobs::retry))
        .route("/jobs/{id}/cancel", post(jobs::cancel))
        .route("/servers", get(jobs::servers))
        .route("/servers/check", get(server_check::check))
        .route("/database-sizes", get(sizes::list))
        .route("/tokens", get(tokens::list).post(tokens::create))
        .route("/tokens/{name}", delete(tokens::revoke))
        .route("/audit", get(audit_log::list))
        .route("/audit/verify", get(audit_log::verify))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_admin))
        .route_layer(middleware::from_fn(observe_request))
        .route("/openapi.json", get(openapi::document))
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Counts every admin request by route, method and status (`silo_admin_requests_total`),
/// refused ones included: a rise of 401 or 403 is worth an alert. Logs each one too: who
/// (the token's name, `-` when none was valid), from where (the peer's address), what, the
/// status and how long it took; refused ones at warn. The audit log records what changed;
/// this is the record of every access, reads and refusals included.
async fn observe_request(request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(String::new, |path| path.as_str().to_owned());
    let method = request.method().clone();
    // The path as sent, /v1 included (the nested router sees it without).
    let path = request
        .extensions()
        .get::<OriginalUri>()
        .map_or_else(|| request.uri().path(), |OriginalUri(uri)| uri.path())
        .to_owned();
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "-".to_owned(), |ConnectInfo(peer)| peer.to_string());
    let response = next.run(request).await;
    let status = response.status();
    let actor = response
        .extensions()
        .get::<Actor>()
        .map_or("-", |actor| actor.0.as_str());
    let ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1000.0);
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        tracing::warn!(%peer, actor, %method, path, status = status.as_u16(), ms, "admin request refused");
    } else {
        tracing::info!(%peer, actor, %method, path, status = status.as_u16(), ms, "admin request");
    }
    metrics::counter!(
        "silo_admin_requests_total",
        "route" => route,
        "method" => method.to_string(),
        "status" => status.as_u16().to_string()
    )
    .increment(1);
    response
}

async fn healthz(axum::extract::State(state): axum::extract::State<ApiState>) -> impl IntoResponse {
    match sqlx::query("SELECT 1").execute(&state.catalog).await {
        Ok(_) => (
            axum::http::StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok"})),
        ),
        Err(_) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "catalog_unavailable"})),
        ),
    }
}

async fn metrics(axum::extract::State(state): axum::extract::State<ApiState>) -> impl IntoResponse {
    state.gauges.update().await;
    let body = state.metrics.as_ref().map(PrometheusHandle::render).unwrap_or_default();
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("not_found", "no such endpoint".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
