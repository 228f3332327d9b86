//! Extractors whose rejections are [`ApiError`]s (JSON bodies) instead of axum's plain text.
//!
//! Each also refuses text holding a NUL character, which no PostgreSQL text can store: such a
//! value would otherwise reach a query and fail there as an internal error. A body must be a
//! JSON object.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;

/// A NUL character, percent-encoded in a path or query.
const ENCODED_NUL: &str = "%00";

/// A JSON body.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(value) = axum::Json::<Value>::from_request(req, state).await?;
        // serde would also fill a struct from an array of its fields in order.
        if !value.is_object() {
            return Err(ApiError::Unprocessable(
                "invalid_body",
                "the body must be a JSON object".into(),
            ));
        }
        if holds_nul(&value) {
            return Err(ApiError::Unprocessable(
                "invalid_body",
                "text in the body may not contain NUL (\\u0000)".into(),
            ));
        }
        let v = serde_json::from_value(value).map_err(|e| ApiError::Unprocessable("invalid_body", e.to_string()))?;
        Ok(Self(v))
    }
}

/// Whether a string (or an object key) anywhere in `value` holds a NUL character.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(fields) => fields.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// `Option<Body<T>>`: `None` when the request has no body at all.
impl<S: Send + Sync, T: DeserializeOwned> axum::extract::OptionalFromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, ApiError> {
        use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
        let headers = req.headers();
        let no_body = headers.get(CONTENT_LENGTH).is_some_and(|v| v.as_bytes() == b"0")
            || (headers.get(CONTENT_LENGTH).is_none() && headers.get(TRANSFER_ENCODING).is_none());
        if no_body && headers.get(CONTENT_TYPE).is_none() {
            return Ok(None);
        }
        <Self as FromRequest<S>>::from_request(req, state).await.map(Some)
    }
}

/// A path parameter.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if parts.uri.path().contains(ENCODED_NUL) {
            return Err(ApiError::BadRequest(
                "invalid_path",
                "the path may not contain NUL (%00)".into(),
            ));
        }
        let axum::extract::Path(v) = axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(Self(v))
    }
}

/// A query string.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if parts.uri.query().is_some_and(|q| q.contains(ENCODED_NUL)) {
            return Err(ApiError::BadRequest(
                "invalid_query",
                "the query may not contain NUL (%00)".into(),
            ));
        }
        let axum::extract::Query(v) = axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(v))
    }
}
