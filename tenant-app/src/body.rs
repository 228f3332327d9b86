//! Reads a request's whole body (at most `MAX_BODY_BYTES`) before any handler runs.
//!
//! Handlers authenticate first and may take a database connection for it (`auth`); reading
//! the body before that means a client that sends its body slowly never holds one of the
//! tenant's connections while it does. Bodies already in memory (the router buffers every
//! request) pass through at the cost of a reference count.

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::LengthLimitError;

use crate::error::ApiError;
use crate::MAX_BODY_BYTES;

/// Middleware: the request with its body read whole, or 413 / 400.
pub(crate) async fn read_whole(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(bytes) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Err(error) if is_too_large(&error) => ApiError::PayloadTooLarge.into_response(),
        Err(_) => ApiError::InvalidRequest("cannot read the request body".into()).into_response(),
    }
}

fn is_too_large(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if error.is::<LengthLimitError>() {
            return true;
        }
        source = error.source();
    }
    false
}
