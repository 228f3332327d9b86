//! Hands a request, with its tenant's pool, to the tenant app.
//!
//! The app is one axum `Router` built once and shared by every tenant: what makes a request
//! a tenant's is the [`TenantContext`] extension inserted here, and nothing else.
//!
//! Requests are buffered first ([`BufferedRequest`], at most `router.max_body_bytes`), so a
//! request can be handed to the app a second time: when PostgreSQL refused the pool's
//! password, the router switches credentials and retries once (see `handler`).

use axum::body::{Body, Bytes};
use axum::response::Response;
use http::header::CONTENT_LENGTH;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use silo_tenant_app::TenantContext;
use tower::ServiceExt;

use crate::errors::RouterError;

/// A request read whole, ready to be handed to the app (again).
pub(crate) struct BufferedRequest {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl BufferedRequest {
    /// Reads `request`'s body, refusing more than `max_body_bytes` (413), early when the
    /// declared length already says so.
    pub(crate) async fn read(request: Request<Body>, max_body_bytes: usize) -> Result<Self, RouterError> {
        let (parts, body) = request.into_parts();
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max_body_bytes as u64) {
            return Err(RouterError::PayloadTooLarge);
        }
        let body = match Limited::new(body, max_body_bytes).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.is::<LengthLimitError>() => return Err(RouterError::PayloadTooLarge),
            Err(error) => {
                tracing::debug!(%error, "cannot read the request body");
                return Err(RouterError::BodyUnreadable);
            }
        };
        Ok(Self {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }

    fn to_request(&self) -> Request<Body> {
        let mut request = Request::new(Body::from(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// Calls the tenant app with `tenant` as the request's context; with path-prefix routing,
/// the app sees `path` (prefix removed) instead of the original target.
pub(crate) async fn forward(
    app: &axum::Router,
    buffered: &BufferedRequest,
    tenant: TenantContext,
    path: Option<&PathAndQuery>,
) -> Response {
    let mut request = buffered.to_request();
    if let Some(path) = path {
        // Origin form: the app routes on the path and never needs scheme or authority.
        *request.uri_mut() = Uri::from(path.clone());
    }
    request.extensions_mut().insert(tenant);
    match app.clone().oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}
