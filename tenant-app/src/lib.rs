//! silo's tenant app: the per-tenant HTTP API as a stateless axum [`Router`].
//!
//! The app knows nothing of other tenants. Whoever hosts it (the silo router per request, or
//! the standalone `silo-tenant-app` bin once for all requests) inserts a [`TenantContext`]
//! request extension, and every handler takes its database pool from there and nowhere else.
//! One [`app()`] therefore serves every tenant.
//!
//! Request path: `auth` (bearer key → key name: from the tenant's recently verified keys, or
//! one query) → `tasks` (one query, on the connection auth took if it took one) → JSON.
//! A request checks out at most one connection, after its body has been read (`body`).
//! Every failure leaves through `error::ApiError`, the single mapping to
//! `{"error","message"}` bodies. `openapi` serves the contract of all this, without a key.

pub mod api_keys;
mod auth;
mod body;
mod connect;
mod db;
mod error;
mod json;
mod openapi;
pub mod standalone;
mod tasks;
mod verified_keys;

use std::fmt;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;

pub use connect::connect;
pub use db::{
    AfterConnect, AfterConnectFuture, BudgetPermit, ConnectionBudget, DbConnection, DbPool, DbPoolSettings, TakePermit,
};
pub use error::DatabaseAuthFailed;
pub use standalone::SingleTenantServer;
use verified_keys::VerifiedKeys;
pub use verified_keys::TTL as VERIFIED_KEY_TTL;

/// Largest request body the app accepts; bigger bodies get 413 `payload_too_large`.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The tenant a request belongs to: inserted as a request extension by the host of [`app()`].
///
/// The pool must point at the tenant's own database; API keys are looked up there, so a key
/// of tenant A is unknown to tenant B. Build one per tenant pool and clone it per request:
/// clones share the tenant's [`VerifiedKeys`].
#[derive(Clone)]
pub struct TenantContext {
    /// The tenant's slug, echoed by `GET /api/v1/me`.
    pub slug: String,
    /// Pool of connections to the tenant's own database.
    pub pool: DbPool,
    /// Keys this tenant's database confirmed recently.
    keys: VerifiedKeys,
}

impl TenantContext {
    /// The context of tenant `slug`, whose own database `pool` points at.
    pub fn new(slug: impl Into<String>, pool: DbPool) -> Self {
        Self {
            slug: slug.into(),
            pool,
            keys: VerifiedKeys::default(),
        }
    }
}

// Hand-written so that no pool or connect-option internals ever reach a log line.
impl fmt::Debug for TenantContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantContext")
            .field("slug", &self.slug)
            .finish_non_exhaustive()
    }
}

/// The whole tenant API (`/api/v1/...`) and its OpenAPI document (`/api/v1/openapi.json`,
/// served without a key), with JSON 404/405 answers for everything else.
///
/// Other requests must carry a [`TenantContext`] extension; without one they fail with 500
/// `internal` (and an error log), since that is a bug in the host, not in the request.
pub fn app() -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi::document))
        .route("/api/v1/me", get(auth::me))
        .route("/api/v1/tasks", get(tasks::list).post(tasks::create))
        .route(
            "/api/v1/tasks/{id}",
            get(tasks::get).patch(tasks::update).delete(tasks::delete),
        )
        // Must come after the routes: it applies to the method routers that exist now.
        .method_not_allowed_fallback(error::method_not_allowed)
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn(body::read_whole))
        .layer(axum::middleware::from_fn(db::verify_after_failure))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

#[cfg(test)]
mod tests {
    //! Routing and the error mapping, without a database (see `tests/e2e/tenant_app.rs` for
    //! everything that needs one).

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt as _;

    use super::*;

    async fn call(method: &str, path: &str) -> (StatusCode, serde_json::Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .expect("request");
        let response = app().oneshot(request).await.expect("infallible");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, serde_json::from_slice(&body).expect("JSON body"))
    }

    #[tokio::test]
    async fn unknown_routes_are_json_404s() {
        let (status, body) = call("GET", "/nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "not_found");
    }

    #[tokio::test]
    async fn wrong_methods_are_json_405s() {
        let (status, body) = call("PUT", "/api/v1/tasks/1").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(body["error"], "method_not_allowed");
    }

    #[tokio::test]
    async fn a_missing_tenant_context_is_an_internal_error() {
        let (status, body) = call("GET", "/api/v1/me").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"], "internal");
        assert_eq!(body["message"], "internal error");
    }
}
