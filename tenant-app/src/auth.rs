//! Bearer-key authentication, and `GET /api/v1/me`.
//!
//! [`Caller`] is the only way a handler reaches the tenant's database, so a handler cannot
//! touch it without having authenticated the request first. A key is accepted when the
//! tenant's own `api_keys` table has its SHA-256 (one indexed query), or when that table
//! confirmed it less than `VERIFIED_KEY_TTL` ago (`verified_keys`). The connection the
//! lookup took stays with the request for the handler's query: one checkout per request, so
//! a cold pool opens one connection, not two.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::Json;
use serde::Serialize;
use sqlx::PgConnection;

use crate::api_keys;
use crate::error::ApiError;
use crate::{DbConnection, TenantContext};

/// An authenticated request: the tenant it is for and the name of the key it presented.
pub(crate) struct Caller {
    pub(crate) tenant: TenantContext,
    pub(crate) key_name: String,
    /// Checked out on first use and kept for the rest of the request.
    conn: Option<DbConnection>,
}

impl Caller {
    /// A connection to the tenant's own database: the only database this request may use.
    pub(crate) async fn db(&mut self) -> Result<&mut PgConnection, ApiError> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.tenant.pool.acquire().await?,
        };
        Ok(&mut **self.conn.insert(conn))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let tenant = parts
            .extensions
            .get::<TenantContext>()
            .cloned()
            .ok_or(ApiError::MissingTenantContext)?;
        let key = bearer_token(&parts.headers)?;
        if !api_keys::is_well_formed(key) {
            return Err(ApiError::Unauthorized("unknown API key"));
        }
        let hash = api_keys::hash(key);
        if let Some(key_name) = tenant.keys.get(&hash) {
            return Ok(Caller {
                tenant,
                key_name,
                conn: None,
            });
        }
        let mut conn = tenant.pool.acquire().await?;
        let key_name: Option<String> = sqlx::query_scalar("SELECT name FROM api_keys WHERE key_hash = $1")
            .bind(&hash[..])
            .fetch_optional(&mut *conn)
            .await?;
        let key_name = key_name.ok_or(ApiError::Unauthorized("unknown API key"))?;
        tenant.keys.confirm(hash, &key_name);
        Ok(Caller {
            tenant,
            key_name,
            conn: Some(conn),
        })
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    const MALFORMED: ApiError = ApiError::Unauthorized("expected an `Authorization: Bearer <api key>` header");
    let value = headers.get(AUTHORIZATION).ok_or(MALFORMED)?;
    let value = value.to_str().map_err(|_| MALFORMED)?;
    let (scheme, token) = value.split_once(' ').ok_or(MALFORMED)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(MALFORMED);
    }
    Ok(token)
}

/// Body of `GET /api/v1/me`.
#[derive(Serialize)]
pub(crate) struct Me {
    tenant: String,
    key: String,
}

/// `GET /api/v1/me`: which tenant this is and which key the caller used.
pub(crate) async fn me(caller: Caller) -> Json<Me> {
    Json(Me {
        tenant: caller.tenant.slug,
        key: caller.key_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(value).expect("header"));
        headers
    }

    #[test]
    fn bearer_token_accepts_any_scheme_case() {
        assert_eq!(bearer_token(&headers("Bearer abc")).ok(), Some("abc"));
        assert_eq!(bearer_token(&headers("bearer abc")).ok(), Some("abc"));
    }

    #[test]
    fn bearer_token_refuses_other_shapes() {
        assert!(bearer_token(&HeaderMap::new()).is_err());
        assert!(bearer_token(&headers("Basic abc")).is_err());
        assert!(bearer_token(&headers("Bearer")).is_err());
        assert!(bearer_token(&headers("Bearer  ")).is_err());
        assert!(bearer_token(&headers("abc")).is_err());
    }
}
