//! [`ApiError`]: every way a request can fail, and the one mapping to what clients see.
//!
//! Bodies are `{"error":"<code>","message":"<text>"}`. Server-side failures (500, 503) are
//! logged here, where they are handled, with their cause; the client gets a fixed message
//! with no DSN, host, SQL or driver text.

use std::error::Error as StdError;

use axum::http::header::{RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// A failed request. Client errors carry a message for the client; server errors carry
/// their cause for the log.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// 400 `invalid_request`: malformed JSON, bad query parameters or path segments.
    #[error("{0}")]
    InvalidRequest(String),
    /// 401 `unauthorized`: no, malformed or unknown API key.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 404 `not_found`: no such task.
    #[error("task not found")]
    TaskNotFound,
    /// 404 `not_found`: no such route.
    #[error("no such endpoint")]
    RouteNotFound,
    /// 405 `method_not_allowed`.
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    /// 413 `payload_too_large`.
    #[error("request body is larger than {} bytes", crate::MAX_BODY_BYTES)]
    PayloadTooLarge,
    /// 415 `unsupported_media_type`.
    #[error("expected a request body with `Content-Type: application/json`")]
    UnsupportedMediaType,
    /// 422 `validation_failed`: well-formed JSON that breaks the schema or a rule.
    #[error("{0}")]
    ValidationFailed(String),
    /// 503 `tenant_unavailable`: the tenant's database cannot be reached right now.
    #[error("tenant database unavailable")]
    TenantUnavailable(#[source] sqlx::Error),
    /// 500 `internal`: the host did not insert a `TenantContext` (a bug in the host).
    #[error("request has no TenantContext extension: the host of app() must insert one")]
    MissingTenantContext,
    /// 500 `internal`: anything else.
    #[error("internal error")]
    Internal(#[source] Box<dyn StdError + Send + Sync>),
}

/// Response extension on a 503 whose cause was SQLSTATE 28P01 (password authentication
/// failed): the pool's credentials are stale, e.g. mid-rotation. A host that can refresh the
/// tenant's credentials (the silo router) does so and retries the request once; no statement
/// ran on a connection that never logged in, so the retry is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatabaseAuthFailed;

/// Response extension on every 503 `tenant_unavailable`: connections of the tenant's pool may
/// be broken (`db::verify_after_failure`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DatabaseUnreachable;

/// SQLSTATE `invalid_password`.
const INVALID_PASSWORD: &str = "28P01";

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if is_unavailable(&e) {
            ApiError::TenantUnavailable(e)
        } else {
            ApiError::Internal(Box::new(e))
        }
    }
}

/// Whether `e` means "the database cannot serve us right now" rather than a bug.
fn is_unavailable(e: &sqlx::Error) -> bool {
    use sqlx::Error as E;
    match e {
        E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::Tls(_) | E::WorkerCrashed => true,
        E::Database(db) => db.code().is_some_and(|code| {
            // Class 08: connection exception. Then: query_canceled (statement timeout),
            // admin/crash shutdown, cannot_connect_now (starting up), too_many_connections,
            // read-only transaction (standby after a failover), database or role gone or
            // refused (mid-rotation or mid-move credentials).
            code.starts_with("08")
                || matches!(
                    &*code,
                    "57014" | "57P01" | "57P02" | "57P03" | "53300" | "25006" | "3D000" | "28000" | "28P01"
                )
        }),
        _ => false,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let auth_failed = matches!(&self, ApiError::TenantUnavailable(cause) if is_auth_failure(cause));
        let (status, code) = match &self {
            ApiError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::TaskNotFound | ApiError::RouteNotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            ApiError::ValidationFailed(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            ApiError::TenantUnavailable(cause) => {
                tracing::warn!(error = %ErrorChain(cause), "tenant database unavailable");
                (StatusCode::SERVICE_UNAVAILABLE, "tenant_unavailable")
            }
            ApiError::MissingTenantContext => {
                tracing::error!("{self}");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
            ApiError::Internal(cause) => {
                tracing::error!(error = %ErrorChain(cause.as_ref()), "request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let message = match &self {
            ApiError::MissingTenantContext | ApiError::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        };
        let mut response = (
            status,
            Json(ErrorBody {
                error: code,
                message: &message,
            }),
        )
            .into_response();
        let headers = response.headers_mut();
        match status {
            StatusCode::UNAUTHORIZED => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
                response.extensions_mut().insert(DatabaseUnreachable);
            }
            _ => {}
        }
        if auth_failed {
            response.extensions_mut().insert(DatabaseAuthFailed);
        }
        response
    }
}

/// Whether `e` is PostgreSQL refusing the pool's password.
fn is_auth_failure(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some(INVALID_PASSWORD))
}

/// Displays an error and its sources as `outer: inner: ...`, for one-line logs.
struct ErrorChain<'a>(&'a (dyn StdError + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// Fallback for paths that match no route.
pub(crate) async fn not_found() -> ApiError {
    ApiError::RouteNotFound
}

/// Fallback for known paths called with a method they do not support (axum adds `Allow`).
pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
