//! [`ApiError`]: how an admin request fails, and the one mapping to `{"error","message"}`.
//! Server-side causes are logged here with their chain; clients get a fixed message with no
//! DSN, host or SQL.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// A failed admin request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed.
    #[error("{1}")]
    BadRequest(&'static str, String),
    /// 401: no or bad admin token.
    #[error("missing or invalid admin token")]
    Unauthorized,
    /// 403: the admin token's role does not allow the request.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such thing.
    #[error("{1}")]
    NotFound(&'static str, String),
    /// 409: conflicts with the current state.
    #[error("{1}")]
    Conflict(&'static str, String),
    /// 405: the endpoint does not take this method.
    #[error("this endpoint does not take this method")]
    MethodNotAllowed,
    /// 413: body too large.
    #[error("request body too large")]
    PayloadTooLarge,
    /// 415: not JSON.
    #[error("expected `Content-Type: application/json`")]
    UnsupportedMediaType,
    /// 422: well-formed but not acceptable.
    #[error("{1}")]
    Unprocessable(&'static str, String),
    /// 503: a dependency is down or there is no capacity.
    #[error("{1}")]
    Unavailable(&'static str, String),
    /// 500: a bug or an unexpected failure (logged, never shown).
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    /// 409 `tenant_busy`: another job (`job`) is still running for the tenant.
    pub fn tenant_busy(job: &crate::jobs::Job) -> Self {
        Self::Conflict(
            "tenant_busy",
            format!(
                "job {} ({}) is still running for tenant {}",
                job.id,
                job.kind,
                job.tenant.as_deref().unwrap_or("-")
            ),
        )
    }

    /// 404 for tenant `slug`.
    pub fn tenant_not_found(slug: &str) -> Self {
        Self::NotFound("tenant_not_found", format!("tenant {slug:?} does not exist"))
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                tracing::warn!(error = %e, "catalog unavailable");
                Self::Unavailable("catalog_unavailable", "the catalog database is unavailable".into())
            }
            other => Self::Internal(other.into()),
        }
    }
}

impl From<crate::backup::BackupError> for ApiError {
    fn from(e: crate::backup::BackupError) -> Self {
        if matches!(e, crate::backup::BackupError::Archived { .. }) {
            return Self::Conflict("backup_archived", e.to_string());
        }
        if e.is_transient() {
            tracing::warn!(error = %e, "backup bucket unavailable");
            return Self::Unavailable(
                "backup_store_unavailable",
                "the [backups.s3] bucket cannot be reached; try again later".into(),
            );
        }
        Self::Internal(e.into())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonDataError(e) => Self::Unprocessable("invalid_body", e.body_text()),
            JsonRejection::JsonSyntaxError(e) => Self::BadRequest("malformed_json", e.body_text()),
            JsonRejection::MissingJsonContentType(_) => Self::UnsupportedMediaType,
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            other => Self::BadRequest("invalid_request", other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::BadRequest("invalid_path", r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::BadRequest("invalid_query", r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::BadRequest(c, _) => (StatusCode::BAD_REQUEST, *c),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound(c, _) => (StatusCode::NOT_FOUND, *c),
            Self::Conflict(c, _) => (StatusCode::CONFLICT, *c),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            Self::Unprocessable(c, _) => (StatusCode::UNPROCESSABLE_ENTITY, *c),
            Self::Unavailable(c, _) => (StatusCode::SERVICE_UNAVAILABLE, *c),
            Self::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "admin request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let mut response = (status, Json(json!({"error": code, "message": self.to_string()}))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
