//! Request extractors whose rejections are [`ApiError`]s rather than axum's plain-text ones.
//!
//! [`ApiJson`] wraps axum's `Json` (so content-type checks and the `DefaultBodyLimit` set in
//! `app()` still apply) and maps each `JsonRejection` to its API error: syntax → 400,
//! schema → 422, content type → 415, body too large → 413. Path and query rejections map to
//! 400 through the `From` impls below, used via `#[from_request(rejection(ApiError))]`.
//!
//! Bodies must be JSON objects: serde's derived `Deserialize` would also accept a struct
//! written as an array (`["buy milk", true]`), which is not part of the API.

use std::fmt;
use std::marker::PhantomData;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::Json;
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::error::ApiError;

/// A JSON request body of type `T`, or the matching [`ApiError`].
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<Object<T>>::from_request(req, state).await {
            Ok(Json(Object(value))) => Ok(ApiJson(value)),
            Err(rejection) => Err(rejection.into()),
        }
    }
}

/// A `T` that may only be written as a JSON object.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }

        deserializer.deserialize_map(ObjectVisitor(PhantomData)).map(Object)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => ApiError::ValidationFailed(e.body_text()),
            JsonRejection::JsonSyntaxError(e) => ApiError::InvalidRequest(e.body_text()),
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge
            }
            // The body could not be read (client went away, bad chunking): the client's fault.
            other => ApiError::InvalidRequest(other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        // A missing path parameter is a routing bug, not the client's fault.
        if rejection.status().is_server_error() {
            return ApiError::Internal(Box::new(rejection));
        }
        ApiError::InvalidRequest(rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::InvalidRequest(rejection.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Pair {
        a: String,
        #[serde(default)]
        b: bool,
    }

    #[test]
    fn objects_deserialize_as_usual() {
        let Object(pair) = serde_json::from_str::<Object<Pair>>(r#"{"a":"x"}"#).expect("object");
        assert_eq!(
            pair,
            Pair {
                a: "x".into(),
                b: false
            }
        );
        assert!(serde_json::from_str::<Object<Pair>>(r#"{"a":"x","c":1}"#).is_err());
    }

    #[test]
    fn arrays_are_not_objects() {
        let err = serde_json::from_str::<Object<Pair>>(r#"["x", true]"#)
            .err()
            .expect("refused");
        assert_eq!(err.classify(), serde_json::error::Category::Data);
    }
}
