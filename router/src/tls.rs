//! HTTPS for tenant traffic: the rustls server config (aws-lc-rs, ALPN `h2` and `http/1.1`),
//! the TLS handshake of each accepted connection, and the 421 check for a request whose Host
//! is not the name of the tenant certificate its connection was opened for.
//!
//! Certificates: the default one (`router.tls_cert_file`/`tls_key_file`, typically a wildcard
//! for the base domains) and per-domain ones from `router.tls_sni_dir`, chosen by SNI and
//! re-read while the router runs ([`sni`]).
//!
//! Why 421: a client may reuse an HTTP/2 connection (or send any Host it likes) on a
//! connection whose certificate names one tenant's custom domain. Serving another host on it
//! would answer for a name the certificate never vouched for, so such requests get
//! 421 Misdirected Request (RFC 9110 §15.5.20) and the client retries on a fresh connection.

mod sni;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, StatusCode};
use silo_control_plane::config::TlsFiles;
use silo_control_plane::tls::{load_certified_key, TlsConfigError};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use sni::SniCertificates;

/// A client must finish its TLS handshake within this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS termination for one listener: the acceptor and the certificates it serves.
#[derive(Clone)]
pub(crate) struct Tls {
    acceptor: TlsAcceptor,
    certificates: Arc<SniCertificates>,
    reload_interval: Duration,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("certificates", &self.certificates)
            .finish_non_exhaustive()
    }
}

/// The name of a tenant-specific certificate a connection was opened for (its SNI matched a
/// certificate from `router.tls_sni_dir`). Inserted into every request of that connection as
/// an extension; absent for the default certificate and for plain HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TenantSni(Arc<str>);

impl Tls {
    /// Loads the default certificate and the SNI directory. Errors are one line naming the
    /// config key (a missing file, no PEM certificate or key, a key that does not match).
    pub(crate) fn from_config(files: &TlsFiles) -> anyhow::Result<Tls> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let default = load_certified_key(&files.cert_file, &files.key_file, &provider).map_err(|e| {
            let key = if e.is_about_the_key() {
                "tls_key_file"
            } else {
                "tls_cert_file"
            };
            TlsConfigError::new(format!("router.{key}"), e.to_string())
        })?;
        let certificates = Arc::new(
            SniCertificates::new(Arc::new(default), files.sni_dir.clone(), provider.clone())
                .map_err(|e| TlsConfigError::new("router.tls_sni_dir", e.to_string()))?,
        );
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("set up TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(certificates.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            certificates,
            reload_interval: files.sni_reload_interval,
        })
    }

    /// Runs the TLS handshake of an accepted connection (bounded by [`HANDSHAKE_TIMEOUT`]).
    /// Also says which tenant certificate, if any, the client asked for by SNI.
    pub(crate) async fn accept(&self, stream: TcpStream) -> io::Result<(TlsStream<TcpStream>, Option<TenantSni>)> {
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let sni = stream
            .get_ref()
            .1
            .server_name()
            .filter(|name| self.certificates.has_domain(name))
            .map(|name| TenantSni(name.into()));
        Ok((stream, sni))
    }

    /// Re-scans `router.tls_sni_dir` every `router.tls_sni_reload_interval` until `stop`:
    /// added, changed and removed certificates take effect for new connections.
    pub(crate) async fn reload(self, stop: CancellationToken) {
        if !self.certificates.has_dir() {
            return;
        }
        let mut tick = tokio::time::interval(self.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let certificates = self.certificates.clone();
            if let Err(error) = tokio::task::spawn_blocking(move || certificates.rescan()).await {
                tracing::error!(%error, "SNI certificate scan failed");
            }
        }
    }
}

/// A tenant-traffic connection: plain TCP, or TLS over it.
pub(crate) type Stream = Either<TcpStream, TlsStream<TcpStream>>;

/// Wraps an accepted connection in TLS when `tls` is set. `None` when the handshake failed
/// (logged at debug: a plain-HTTP client or a port scanner is not the router's problem);
/// the caller drops the connection.
pub(crate) async fn handshake(
    tls: Option<&Tls>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
) -> Option<(Stream, Option<TenantSni>)> {
    let Some(tls) = tls else {
        return Some((Either::Left(stream), None));
    };
    match tls.accept(stream).await {
        Ok((stream, sni)) => Some((Either::Right(stream), sni)),
        Err(error) => {
            tracing::debug!(%peer, %error, "TLS handshake failed");
            None
        }
    }
}

/// 421 Misdirected Request when the request came in on a connection opened for a tenant
/// certificate (see [`TenantSni`]) and its Host names another host; `None` otherwise (also
/// when there is no Host: the handler answers that one).
pub(crate) fn misdirected<B>(request: &Request<B>) -> Option<Response> {
    let TenantSni(sni) = request.extensions().get::<TenantSni>()?;
    let host = request_host(request)?;
    if host.trim_end_matches('.').eq_ignore_ascii_case(sni) {
        return None;
    }
    tracing::debug!(%sni, %host, "request for another host on a tenant certificate's connection");
    let body = serde_json::json!({
        "error": "misdirected_request",
        "message": "this connection is for another host; open a new connection for this host",
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = StatusCode::MISDIRECTED_REQUEST;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Some(response)
}

/// The host a request names, without the port: the URI's authority (HTTP/2 `:authority`,
/// absolute-form HTTP/1.1) or else the Host header.
fn request_host<B>(request: &Request<B>) -> Option<&str> {
    if let Some(host) = request.uri().host() {
        return Some(host);
    }
    let host = request.headers().get(HOST)?.to_str().ok()?;
    Some(match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn request(host: Option<&str>, sni: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().uri("/api/v1/me");
        if let Some(host) = host {
            builder = builder.header(HOST, host);
        }
        let mut request = builder.body(()).unwrap();
        if let Some(sni) = sni {
            request.extensions_mut().insert(TenantSni(sni.into()));
        }
        request
    }

    #[test]
    fn host_must_match_a_tenant_certificate_name() {
        assert!(
            misdirected(&request(Some("other.localhost"), None)).is_none(),
            "default certificate: no check"
        );
        assert!(misdirected(&request(Some("shop.example.com"), Some("shop.example.com"))).is_none());
        assert!(misdirected(&request(Some("Shop.Example.com:8443"), Some("shop.example.com"))).is_none());
        assert!(misdirected(&request(Some("shop.example.com."), Some("shop.example.com"))).is_none());
        assert!(
            misdirected(&request(None, Some("shop.example.com"))).is_none(),
            "no Host: the handler's 400"
        );
        let response = misdirected(&request(Some("other.localhost"), Some("shop.example.com"))).unwrap();
        assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
        let authority = Request::builder()
            .uri("https://other.localhost/api/v1/me")
            .extension(TenantSni("shop.example.com".into()))
            .body(())
            .unwrap();
        assert!(misdirected(&authority).is_some(), "HTTP/2 :authority is checked too");
    }
}
