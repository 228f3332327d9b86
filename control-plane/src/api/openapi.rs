//! `GET /v1/openapi.json`: the admin API described for clients and code generators. The
//! document is written by hand next to the handlers; `tests/e2e/openapi_documents.rs` checks
//! that it is whole (each path parameter declared, each operation's request errors
//! documented), and `admin_api` that each operation it names is served as it says.

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

/// The document, as served.
const DOCUMENT: &str = include_str!("openapi.json");

pub(super) async fn document() -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], DOCUMENT)
}
