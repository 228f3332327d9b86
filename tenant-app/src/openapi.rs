//! `GET /api/v1/openapi.json`: the tenant API described for tenants' clients and code
//! generators, served without a key (it is the public contract). The document is written by
//! hand next to the handlers, and lists the router's own answers too, since every client
//! meets the app through the router. `tests/e2e/openapi_documents.rs` checks that it is
//! whole (each path parameter declared, each operation's request errors and the router's
//! answers documented), and `tenant_app` calls each operation it names through the router.

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

/// The document, as served.
const DOCUMENT: &str = include_str!("openapi.json");

/// `GET /api/v1/openapi.json`.
pub(crate) async fn document() -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], DOCUMENT)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use serde_json::Value;
    use tower::ServiceExt as _;

    use super::DOCUMENT;

    #[tokio::test]
    async fn the_document_is_served_as_json_without_a_key() {
        let request = Request::builder()
            .uri("/api/v1/openapi.json")
            .body(Body::empty())
            .unwrap();
        let response = crate::app().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        assert_eq!(body, DOCUMENT.as_bytes());
        let doc: Value = serde_json::from_str(DOCUMENT).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
    }
}
