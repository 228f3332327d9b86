//! A thin client of the admin API: bearer auth, JSON in and out, and one-line errors built
//! from the API's `{"error","message"}` body.

use std::time::Duration;

use anyhow::{anyhow, bail};
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde_json::Value;

use super::context::ApiContext;

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a download may take (a whole database's dump).
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An admin API client.
#[derive(Clone)]
pub(crate) struct ApiClient {
    http: reqwest::Client,
    ctx: ApiContext,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// The API answered with an error status.
    #[error("{code}: {message}")]
    Status {
        /// The HTTP status.
        status: StatusCode,
        /// The `error` code from the body (or the status).
        code: String,
        /// The `message` from the body.
        message: String,
    },
    /// The server could not be reached or the connection broke.
    #[error("cannot reach the admin API at {endpoint}: {cause}")]
    Unreachable {
        /// The endpoint.
        endpoint: String,
        /// The innermost cause.
        cause: String,
    },
    /// The API answered 2xx with something that is not the expected JSON.
    #[error("unexpected response from {path}: {0}", path = .1)]
    Malformed(String, String),
}

impl ApiError {
    /// The API refused the request as invalid (400): a usage error of the command line.
    pub(crate) fn is_invalid_input(&self) -> bool {
        matches!(self, Self::Status { status, .. } if *status == StatusCode::BAD_REQUEST)
    }

    /// True for a 404.
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, Self::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }

    /// True when the server could not be reached (worth retrying while waiting on a job).
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
            || matches!(self, Self::Status { status, .. } if *status == StatusCode::SERVICE_UNAVAILABLE)
    }
}

impl ApiClient {
    /// A client for `ctx`.
    pub(crate) fn new(ctx: ApiContext) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("siloctl/", env!("CARGO_PKG_VERSION")));
        for cert in &ctx.cacerts {
            builder = builder.add_root_certificate(cert.clone());
        }
        let http = builder.build().map_err(|e| anyhow!("build the HTTP client: {e}"))?;
        Ok(Self { http, ctx })
    }

    /// `GET path`.
    pub(crate) async fn get(&self, path: &str) -> Result<Value, ApiError> {
        self.send(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub(crate) async fn post(&self, path: &str, body: &Value) -> Result<Value, ApiError> {
        self.send(Method::POST, path, Some(body)).await
    }

    /// `PATCH path` with a JSON body.
    pub(crate) async fn patch(&self, path: &str, body: &Value) -> Result<Value, ApiError> {
        self.send(Method::PATCH, path, Some(body)).await
    }

    /// `DELETE path`.
    pub(crate) async fn delete(&self, path: &str) -> Result<Value, ApiError> {
        self.send(Method::DELETE, path, None).await
    }

    async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, ApiError> {
        let url = format!("{}{path}", self.ctx.endpoint);
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(self.ctx.token.expose_secret());
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(&e))?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|e| ApiError::Malformed(e.to_string(), path.to_owned()));
        }
        Err(status_error(status, &bytes))
    }

    /// `GET path` into the new file `output` (mode 0600), streamed; the bytes written. Nothing
    /// is left at `output` unless all of it arrived.
    pub(crate) async fn download(&self, path: &str, output: &std::path::Path) -> anyhow::Result<u64> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // Made first: a file that is there already is never overwritten, nor the request sent.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(output)
            .map_err(|e| anyhow!("create {}: {e}", output.display()))?;
        let written = async {
            let url = format!("{}{path}", self.ctx.endpoint);
            let mut resp = self
                .http
                .get(&url)
                .bearer_auth(self.ctx.token.expose_secret())
                .timeout(DOWNLOAD_TIMEOUT)
                .send()
                .await
                .map_err(|e| self.unreachable(&e))?;
            let status = resp.status();
            if !status.is_success() {
                let body = resp.bytes().await.map_err(|e| self.unreachable(&e))?;
                return Err(status_error(status, &body).into());
            }
            let mut bytes = 0;
            loop {
                let chunk = match resp.chunk().await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break,
                    Err(e) => bail!(
                        "the download broke off after {bytes} bytes ({}); nothing was kept, and the control plane's log says why",
                        innermost(&e)
                    ),
                };
                file.write_all(&chunk)
                    .map_err(|e| anyhow!("write {}: {e}", output.display()))?;
                bytes += chunk.len() as u64;
            }
            file.sync_all()
                .map_err(|e| anyhow!("write {}: {e}", output.display()))?;
            anyhow::Ok(bytes)
        }
        .await;
        if written.is_err() {
            let _ = std::fs::remove_file(output);
        }
        written
    }

    fn unreachable(&self, e: &reqwest::Error) -> ApiError {
        let cause = if e.is_timeout() {
            "request timed out".to_owned()
        } else {
            innermost(e)
        };
        ApiError::Unreachable {
            endpoint: self.ctx.endpoint.clone(),
            cause,
        }
    }
}

/// The innermost cause of `e`: reqwest's own message repeats the URL, the cause is what helps.
fn innermost(e: &reqwest::Error) -> String {
    let mut inner: &dyn std::error::Error = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    inner.to_string()
}

/// Builds the error for a non-2xx response from its `{"error","message"}` body.
fn status_error(status: StatusCode, body: &[u8]) -> ApiError {
    #[derive(serde::Deserialize)]
    struct Body {
        error: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(b) => ApiError::Status {
            status,
            code: b.error,
            message: b.message,
        },
        Err(_) => {
            let text: String = String::from_utf8_lossy(body).chars().take(200).collect();
            let message = if text.trim().is_empty() {
                status.canonical_reason().unwrap_or("error").to_owned()
            } else {
                super::one_line(&text)
            };
            ApiError::Status {
                status,
                code: format!("HTTP {}", status.as_u16()),
                message,
            }
        }
    }
}

/// Percent-encodes one path segment (job ids and slugs are plain, but be safe).
pub(crate) fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_body_becomes_code_and_message() {
        let e = status_error(
            StatusCode::CONFLICT,
            br#"{"error":"tenant_exists","message":"slug taken"}"#,
        );
        assert_eq!(e.to_string(), "tenant_exists: slug taken");
        let e = status_error(StatusCode::BAD_GATEWAY, b"<html>\nbad\n</html>");
        assert_eq!(e.to_string(), "HTTP 502: <html> bad </html>");
    }

    #[test]
    fn segments_are_escaped() {
        assert_eq!(segment("acme-1"), "acme-1");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }
}
