//! Admin tokens: stored as SHA-256 hashes in the catalog, compared in constant time. The
//! token named by `control_plane.admin_token_env` is registered as `bootstrap` at start;
//! operators get tokens of their own through `POST /v1/tokens` (`crate::api::tokens`). The
//! tokens are read again from the catalog when the copy in memory is older than a few
//! seconds, so a token revoked on one control plane stops working on every other one within
//! that time.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::ApiState;

/// Who made an admin request (the token's name), for the audit log.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

/// What an admin token may do, from least to most (also `siloctl token create --role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    /// Read everything but tenants' credentials (auditors, dashboards).
    Viewer,
    /// Everything but creating and revoking admin tokens.
    Operator,
    /// Everything.
    Admin,
}

impl TokenRole {
    /// The name stored in the catalog and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    fn parse(role: &str) -> Option<Self> {
        [Self::Viewer, Self::Operator, Self::Admin]
            .into_iter()
            .find(|r| r.as_str() == role)
    }

    /// Whether a token of this role may send `method` to the route `route` (its pattern,
    /// e.g. `/v1/tenants/{slug}/credentials`).
    fn may(self, method: &Method, route: &str) -> bool {
        let reads = method == Method::GET || method == Method::HEAD;
        match self {
            Self::Admin => true,
            Self::Operator => reads || !(route.ends_with("/tokens") || route.ends_with("/tokens/{name}")),
            // The break-glass read of a tenant's secret, and of its data in a backup, are
            // reads, but not for viewers.
            Self::Viewer => reads && !route.ends_with("/credentials") && !route.ends_with("/content"),
        }
    }
}

/// The admin tokens known to this control plane.
pub struct AdminTokens {
    catalog: PgPool,
    hashes: RwLock<Loaded>,
    /// When this control plane last recorded each token's use in the catalog.
    recorded_use: Mutex<HashMap<String, Instant>>,
}

/// A token as read from the catalog.
struct Token {
    name: String,
    hash: [u8; 32],
    role: TokenRole,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The tokens, and when they were read from the catalog.
struct Loaded {
    tokens: Vec<Token>,
    at: Instant,
}

/// How long the tokens read from the catalog are trusted before they are read again.
const RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// How often one control plane writes a token's `last_used_at`: at most once a minute.
const RECORD_USE_INTERVAL: Duration = Duration::from_secs(60);

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
                "INSERT INTO admin_tokens (name, token_hash, role) VALUES ('bootstrap', $1, 'admin') \
                 ON CONFLICT (name) DO UPDATE SET token_hash = EXCLUDED.token_hash, role = 'admin'",
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
            recorded_use: Mutex::new(HashMap::new()),
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
        type Row = (String, Vec<u8>, String, Option<chrono::DateTime<chrono::Utc>>);
        let rows: Vec<Row> = sqlx::query_as("SELECT name, token_hash, role, expires_at FROM admin_tokens")
            .fetch_all(&self.catalog)
            .await?;
        let hashes = rows
            .into_iter()
            .filter_map(|(name, hash, role, expires_at)| {
                Some(Token {
                    name,
                    hash: <[u8; 32]>::try_from(hash).ok()?,
                    role: TokenRole::parse(&role)?,
                    expires_at,
                })
            })
            .collect();
        if let Ok(mut guard) = self.hashes.write() {
            *guard = Loaded {
                tokens: hashes,
                at: Instant::now(),
            };
        }
        Ok(())
    }

    fn find(&self, presented: &[u8; 32]) -> Option<(String, TokenRole)> {
        let guard = self.hashes.read().ok()?;
        // Compare against every token, so timing does not tell which (or whether one) matched.
        let mut found = None;
        for token in &guard.tokens {
            if bool::from(token.hash.ct_eq(presented)) {
                found = Some(token);
            }
        }
        let token = found?;
        let expired = token.expires_at.is_some_and(|at| at <= chrono::Utc::now());
        (!expired).then(|| (token.name.clone(), token.role))
    }

    /// The name and role of the token `token`. The tokens are read from the catalog again first when
    /// they are older than `RELOAD_INTERVAL`, by one request at a time and at most that often
    /// (so bad tokens cannot hammer the catalog); if the catalog cannot be read, the tokens
    /// known are used.
    pub async fn authenticate(&self, token: &str) -> Option<(String, TokenRole)> {
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
        let found = self.find(&token_hash(token));
        if let Some((name, _)) = &found {
            self.record_use(name);
        }
        found
    }

    /// Sets the token's `last_used_at` in the catalog, at most once a minute per token, off the
    /// request's path: a catalog that cannot be written does not fail the request.
    fn record_use(&self, name: &str) {
        let due = match self.recorded_use.lock() {
            Ok(mut recorded) => {
                let due = recorded.get(name).is_none_or(|at| at.elapsed() >= RECORD_USE_INTERVAL);
                if due {
                    recorded.insert(name.to_owned(), Instant::now());
                }
                due
            }
            Err(_) => false,
        };
        if !due {
            return;
        }
        let (catalog, name) = (self.catalog.clone(), name.to_owned());
        tokio::spawn(async move {
            let written = sqlx::query("UPDATE admin_tokens SET last_used_at = now() WHERE name = $1")
                .bind(&name)
                .execute(&catalog)
                .await;
            if let Err(e) = written {
                tracing::debug!(token = %name, error = %e, "last use of an admin token not recorded");
            }
        });
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive,
/// RFC 9110 section 11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Middleware: a valid `Authorization: Bearer <admin token>` (401 otherwise) whose role
/// allows the request (403 otherwise). The request, and the response for the access log,
/// carry the token's [`Actor`] once it is known.
pub async fn require_admin(State(state): State<ApiState>, mut req: Request, next: Next) -> Result<Response, ApiError> {
    let token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .ok_or(ApiError::Unauthorized)?;
    let (name, role) = state.tokens.authenticate(token).await.ok_or(ApiError::Unauthorized)?;
    let actor = Actor(name);
    let route = req.extensions().get::<MatchedPath>().map_or("", MatchedPath::as_str);
    let mut response = if role.may(req.method(), route) {
        req.extensions_mut().insert(actor.clone());
        next.run(req).await
    } else {
        ApiError::Forbidden(format!(
            "token {:?} has the {} role: it may not {} {route}",
            actor.0,
            role.as_str(),
            req.method()
        ))
        .into_response()
    };
    response.extensions_mut().insert(actor);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_read_but_not_credentials_or_backups_and_only_admins_manage_tokens() {
        let cases = [
            (Method::GET, "/v1/tenants/{slug}", [true, true, true]),
            (Method::GET, "/v1/audit", [true, true, true]),
            (Method::GET, "/v1/audit/verify", [true, true, true]),
            (Method::GET, "/v1/tokens", [true, true, true]),
            (Method::GET, "/v1/tenants/{slug}/credentials", [false, true, true]),
            (
                Method::GET,
                "/v1/tenants/{slug}/backups/{file}/content",
                [false, true, true],
            ),
            (Method::POST, "/v1/tenants", [false, true, true]),
            (Method::DELETE, "/v1/tenants/{slug}", [false, true, true]),
            (Method::DELETE, "/v1/tenants/{slug}/keys/{name}", [false, true, true]),
            (Method::POST, "/v1/tokens", [false, false, true]),
            (Method::DELETE, "/v1/tokens/{name}", [false, false, true]),
        ];
        for (method, route, expected) in cases {
            let got = [TokenRole::Viewer, TokenRole::Operator, TokenRole::Admin].map(|role| role.may(&method, route));
            assert_eq!(got, expected, "{method} {route}");
        }
    }

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
