//! Admin tokens: stored as SHA-256 hashes in the catalog, compared in constant time. The
//! token named by `control_plane.admin_token_env` is registered as `bootstrap` at start;
//! operators get tokens of their own through `POST /v1/tokens` (`crate::api::tokens`). The
//! tokens are read again from the catalog when the copy in memory is older than a few
//! seconds, so a token revoked on one control plane stops working on every other one within
//! that time.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::ApiState;

/// Who made an admin request (the token's name), for the audit log.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

/// The admin tokens known to this control plane.
pub struct AdminTokens {
    catalog: PgPool,
    hashes: RwLock<Loaded>,
}

/// Token names and hashes, and when they were read from the catalog.
struct Loaded {
    tokens: Vec<(String, [u8; 32])>,
    at: Instant,
}

/// How long the tokens read from the catalog are trusted before they are read again.
const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// A new admin token: `silo_admin_` and 32 random letters and digits.
pub fn new_admin_token() -> SecretString {
    use rand::distr::{Alphanumeric, SampleString};
    SecretString::from(format!(
        "silo_admin_{}",
        Alphanumeric.sample_string(&mut rand::rng(), 32)
    ))
}

/// What the catalog stores of a token.
pub(super) fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl AdminTokens {
    /// Registers `bootstrap` (if given) and loads every token hash.
    pub async fn load(catalog: PgPool, bootstrap: Option<&SecretString>) -> Result<Self, sqlx::Error> {
        if let Some(token) = bootstrap {
            sqlx::query(
                "INSERT INTO admin_tokens (name, token_hash) VALUES ('bootstrap', $1) \
                 ON CONFLICT (name) DO UPDATE SET token_hash = EXCLUDED.token_hash",
            )
            .bind(&token_hash(token.expose_secret())[..])
            .execute(&catalog)
            .await?;
        }
        let tokens = Self {
            catalog,
            hashes: RwLock::new(Loaded {
                tokens: Vec::new(),
                at: Instant::now(),
            }),
        };
        tokens.reload().await?;
        Ok(tokens)
    }

    /// Number of registered tokens.
    pub fn len(&self) -> usize {
        self.hashes.read().map(|h| h.tokens.len()).unwrap_or(0)
    }

    /// True when no token is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads every token from the catalog again (after a change made here, at once).
    pub(super) async fn reload(&self) -> Result<(), sqlx::Error> {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as("SELECT name, token_hash FROM admin_tokens")
            .fetch_all(&self.catalog)
            .await?;
        let hashes = rows
            .into_iter()
            .filter_map(|(name, h)| Some((name, <[u8; 32]>::try_from(h).ok()?)))
            .collect();
        if let Ok(mut guard) = self.hashes.write() {
            *guard = Loaded {
                tokens: hashes,
                at: Instant::now(),
            };
        }
        Ok(())
    }

    fn find(&self, presented: &[u8; 32]) -> Option<String> {
        let guard = self.hashes.read().ok()?;
        // Compare against every token, so timing does not tell which (or whether one) matched.
        let mut found = None;
        for (name, h) in &guard.tokens {
            if bool::from(h.ct_eq(presented)) {
                found = Some(name.clone());
            }
        }
        found
    }

    /// The name of the token `token`. The tokens are read from the catalog again first when
    /// they are older than `RELOAD_INTERVAL`, by one request at a time and at most that often
    /// (so bad tokens cannot hammer the catalog); if the catalog cannot be read, the tokens
    /// known are used.
    pub async fn authenticate(&self, token: &str) -> Option<String> {
        let stale = match self.hashes.write() {
            Ok(mut guard) if guard.at.elapsed() > RELOAD_INTERVAL => {
                guard.at = Instant::now();
                true
            }
            _ => false,
        };
        if stale {
            if let Err(e) = self.reload().await {
                tracing::warn!(error = %e, "admin tokens not reloaded from the catalog");
            }
        }
        self.find(&token_hash(token))
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive,
/// RFC 9110 section 11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Middleware: a valid `Authorization: Bearer <admin token>` or 401.
pub async fn require_admin(State(state): State<ApiState>, mut req: Request, next: Next) -> Result<Response, ApiError> {
    let token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .ok_or(ApiError::Unauthorized)?;
    let name = state.tokens.authenticate(token).await.ok_or(ApiError::Unauthorized)?;
    tracing::Span::current().record("actor", name.as_str());
    req.extensions_mut().insert(Actor(name));
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_required() {
        for value in ["Bearer tok", "bearer tok", "BEARER  tok "] {
            assert_eq!(bearer_token(value), Some("tok"), "{value:?}");
        }
        for value in ["Bearer", "Bearer ", "Basic tok", "Bearertok", ""] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }
}
