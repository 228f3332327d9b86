//! What the router answers for itself: the one mapping from a routing failure to a status
//! and a `{"error","message"}` body.
//!
//! Bodies are fixed text. They never echo the request (no host, no path) and never carry a
//! cause (no DSN, host name or SQL): the cause is logged where it is handled. In particular
//! the 404 for an unknown host and the 404 for a deleted tenant are the same bytes, so the
//! router does not reveal which tenants once existed.

use axum::body::Body;
use axum::response::Response;
use http::header::{CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, StatusCode};

use crate::resolve::InvalidHost;

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: &str = "5";

/// Why the router answered instead of the tenant app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RouterError {
    /// The host is missing or malformed.
    #[error("invalid host: {0}")]
    InvalidHost(#[from] InvalidHost),
    /// No tenant is served at this host, or the tenant was deleted.
    #[error("tenant not found")]
    TenantNotFound,
    /// The tenant is suspended.
    #[error("tenant suspended")]
    TenantSuspended,
    /// The tenant exists but cannot be served right now (provisioning, failed, its database
    /// or the catalog unreachable).
    #[error("tenant unavailable")]
    TenantUnavailable,
    /// The tenant is over its plan's request rate or in-flight cap; retry after this many
    /// seconds.
    #[error("rate limited")]
    RateLimited {
        /// Seconds until a retry can succeed (at least 1).
        retry_after_secs: u64,
    },
    /// The request body is larger than `router.max_body_bytes`.
    #[error("request body too large")]
    PayloadTooLarge,
    /// The request body could not be read (the client went away or sent a broken body).
    #[error("request body unreadable")]
    BodyUnreadable,
    /// The request was not answered within `router.request_timeout`.
    #[error("request timed out")]
    RequestTimeout,
}

impl RouterError {
    /// The `error` code of the body; also the `outcome` label of request metrics.
    pub(crate) fn code(self) -> &'static str {
        match self {
            Self::InvalidHost(_) => "invalid_host",
            Self::TenantNotFound => "tenant_not_found",
            Self::TenantSuspended => "tenant_suspended",
            Self::TenantUnavailable => "tenant_unavailable",
            Self::RateLimited { .. } => "rate_limited",
            Self::PayloadTooLarge => "payload_too_large",
            Self::BodyUnreadable => "invalid_request",
            Self::RequestTimeout => "request_timeout",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::InvalidHost(_) => StatusCode::BAD_REQUEST,
            Self::TenantNotFound => StatusCode::NOT_FOUND,
            Self::TenantSuspended => StatusCode::FORBIDDEN,
            Self::TenantUnavailable | Self::RequestTimeout => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyUnreadable => StatusCode::BAD_REQUEST,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::InvalidHost(InvalidHost(reason)) => reason,
            Self::TenantNotFound => "no tenant is served at this address",
            Self::TenantSuspended => "this tenant is suspended",
            Self::TenantUnavailable => "this tenant is temporarily unavailable; retry later",
            Self::RateLimited { .. } => "too many requests for this tenant; retry later",
            Self::PayloadTooLarge => "the request body is too large",
            Self::BodyUnreadable => "the request body could not be read",
            Self::RequestTimeout => "the request took too long; retry later",
        }
    }

    /// The response: status, JSON body, `Retry-After` on 429 and 503, `Connection: close` on 413.
    pub(crate) fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code(), "message": self.message() }).to_string();
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            Self::TenantUnavailable | Self::RequestTimeout => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
            }
            Self::RateLimited { retry_after_secs } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs.max(1)));
            }
            // The rest of the body was not read: the connection cannot carry another request,
            // and the client must know not to reuse it.
            Self::PayloadTooLarge => {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn body(response: Response) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn each_error_has_its_status_and_code() {
        for (error, status, code) in [
            (RouterError::InvalidHost(InvalidHost("x")), 400, "invalid_host"),
            (RouterError::TenantNotFound, 404, "tenant_not_found"),
            (RouterError::TenantSuspended, 403, "tenant_suspended"),
            (RouterError::TenantUnavailable, 503, "tenant_unavailable"),
            (RouterError::RequestTimeout, 503, "request_timeout"),
            (RouterError::RateLimited { retry_after_secs: 2 }, 429, "rate_limited"),
            (RouterError::PayloadTooLarge, 413, "payload_too_large"),
            (RouterError::BodyUnreadable, 400, "invalid_request"),
        ] {
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
            assert_eq!(
                response.headers().contains_key(RETRY_AFTER),
                status == 503 || status == 429
            );
            let json = body(response).await;
            assert_eq!(json["error"], code);
            assert!(json["message"].is_string());
        }
    }
}
