//! TLS certificates from PEM files, for the HTTPS listeners of the control plane's admin API
//! and of the router.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The certificate file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The key file could not be read.
    #[error("cannot read {path}: {source}")]
    ReadKey {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// No `CERTIFICATE` section (not PEM, or only a key).
    #[error("{path} holds no PEM certificate")]
    NoCertificate {
        /// The file.
        path: String,
    },
    /// A PEM section of the certificate file could not be decoded.
    #[error("{path} is not valid PEM: {source}")]
    Pem {
        /// The file.
        path: String,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM section of the key file could not be decoded.
    #[error("{path} is not valid PEM: {source}")]
    PemKey {
        /// The file.
        path: String,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// No private key section.
    #[error("{path} holds no PEM private key")]
    NoKey {
        /// The file.
        path: String,
    },
    /// The key is unusable or does not belong to the certificate.
    #[error("{path}: {source}")]
    Key {
        /// The key file.
        path: String,
        /// Why.
        source: rustls::Error,
    },
    /// The crypto provider cannot do the default TLS versions (a build problem).
    #[error("set up TLS: {0}")]
    Provider(rustls::Error),
}

impl CertError {
    /// Whether the key file, rather than the certificate file, is the problem.
    pub fn is_about_the_key(&self) -> bool {
        matches!(
            self,
            Self::ReadKey { .. } | Self::PemKey { .. } | Self::NoKey { .. } | Self::Key { .. }
        )
    }
}

/// A TLS file or directory the config names is unusable: the process refuses to start, as
/// for any other bad config (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct TlsConfigError {
    key: String,
    message: String,
}

impl TlsConfigError {
    /// The error for config key `key` (e.g. `router.tls_cert_file`).
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The TLS acceptor of the admin API (`control_plane.tls_cert_file`/`tls_key_file`).
pub fn admin_api_acceptor(files: &crate::config::CertFiles) -> Result<tokio_rustls::TlsAcceptor, TlsConfigError> {
    let config = server_config(&files.cert_file, &files.key_file).map_err(|e| {
        let key = if e.is_about_the_key() {
            "control_plane.tls_key_file"
        } else {
            "control_plane.tls_cert_file"
        };
        TlsConfigError::new(key, e.to_string())
    })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Reads a PEM certificate chain and its PEM private key into a [`CertifiedKey`], checking
/// that the key belongs to the first certificate.
pub fn load_certified_key(
    cert_file: &Path,
    key_file: &Path,
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
        source => CertError::PemKey {
            path: key_path.clone(),
            source,
        },
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| CertError::Key { path: key_path, source })
}

/// A rustls server config for one certificate (aws-lc-rs, TLS 1.2 and 1.3, ALPN `h2` and
/// `http/1.1`).
fn server_config(cert_file: &Path, key_file: &Path) -> Result<rustls::ServerConfig, CertError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = load_certified_key(cert_file, key_file, &provider)?;
    let resolver = Arc::new(rustls::sign::SingleCertAndKey::from(key));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(CertError::Provider)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
