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
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use silo_control_plane::config::TlsFiles;
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

/// A TLS file or directory the config names is unusable: the router refuses to start, as
/// for any other bad config (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("config key `router.{key}`: {message}")]
pub(crate) struct TlsConfigError {
    key: &'static str,
    message: String,
}

impl Tls {
    /// Loads the default certificate and the SNI directory. Errors are one line naming the
    /// config key (a missing file, no PEM certificate or key, a key that does not match).
    pub(crate) fn from_config(files: &TlsFiles) -> anyhow::Result<Tls> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let default = load_certified_key(&files.cert_file, &files.key_file, &provider).map_err(|e| {
            let key = if matches!(e, CertError::Key { .. } | CertError::NoKey { .. }) {
                "tls_key_file"
            } else {
                "tls_cert_file"
            };
            TlsConfigError {
                key,
                message: e.to_string(),
            }
        })?;
        let certificates = Arc::new(
            SniCertificates::new(Arc::new(default), files.sni_dir.clone(), provider.clone()).map_err(|e| {
                TlsConfigError {
                    key: "tls_sni_dir",
                    message: e.to_string(),
                }
            })?,
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

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
enum CertError {
    /// The certificate file could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    /// The key file could not be read.
    #[error("cannot read {path}: {source}")]
    ReadKey { path: String, source: io::Error },
    /// No `CERTIFICATE` section (not PEM, or only a key).
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    /// A PEM section could not be decoded.
    #[error("{path} is not valid PEM: {source}")]
    Pem {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    /// No private key section.
    #[error("{path} holds no PEM private key")]
    NoKey { path: String },
    /// The key is unusable or does not belong to the certificate.
    #[error("{path}: {source}")]
    Key { path: String, source: rustls::Error },
}

/// Reads a PEM certificate chain and its PEM private key into a [`CertifiedKey`], checking
/// that the key belongs to the first certificate.
fn load_certified_key(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, CertError> {
    let cert_path = cert_file.display().to_string();
    let key_path = key_file.display().to_string();
    let pem = std::fs::read(cert_file).map_err(|source| CertError::Read {
        path: cert_path.clone(),
        source,
    })?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem {
            path: cert_path.clone(),
            source,
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate { path: cert_path });
    }
    let pem = std::fs::read(key_file).map_err(|source| CertError::ReadKey {
        path: key_path.clone(),
        source,
    })?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => CertError::NoKey { path: key_path.clone() },
        source => CertError::Pem {
            path: key_path.clone(),
            source,
        },
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| CertError::Key { path: key_path, source })
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
