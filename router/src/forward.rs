//! Hands a request, with its tenant's pool, to the tenant app.
//!
//! The app is one axum `Router` built once and shared by every tenant: what makes a request
//! a tenant's is the [`TenantContext`] extension inserted here, and nothing else.

use axum::body::Body;
use axum::response::Response;
use http::uri::PathAndQuery;
use http::{Request, Uri};
use silo_tenant_app::TenantContext;
use tower::ServiceExt;

/// Calls the tenant app with `tenant` as the request's context; with path-prefix routing,
/// the app sees `path` (prefix removed) instead of the original target.
pub(crate) async fn forward(
    app: &axum::Router,
    mut request: Request<Body>,
    tenant: TenantContext,
    path: Option<PathAndQuery>,
) -> Response {
    if let Some(path) = path {
        // Origin form: the app routes on the path and never needs scheme or authority.
        *request.uri_mut() = Uri::from(path);
    }
    request.extensions_mut().insert(tenant);
    match app.clone().oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}
