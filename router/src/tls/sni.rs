//! The certificates the router serves, chosen by SNI: one per domain from
//! `router.tls_sni_dir` (`DOMAIN.crt` + `DOMAIN.key`, PEM; e.g. tenants' custom domains), and
//! the default certificate for every other name (and for clients that send no SNI).
//!
//! The directory is re-scanned on a timer. A file is (re)loaded only when its size or mtime
//! changed, so an unchanged directory costs a `stat` per file. The domain map is swapped
//! whole (`ArcSwap`): handshakes never wait for a scan. A bad pair (unreadable, not PEM, key
//! not matching) is logged once and skipped; it never takes the listener down, and it is
//! retried when either file changes. An unreadable directory keeps what was loaded before.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The default certificate and the per-domain ones.
pub(super) struct SniCertificates {
    default: Arc<CertifiedKey>,
    by_domain: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    dir: Option<PathBuf>,
    provider: Arc<CryptoProvider>,
    scan: Mutex<ScanState>,
}

/// What the last scan found, to reload only what changed and warn only once.
#[derive(Default)]
struct ScanState {
    files: HashMap<String, Seen>,
    dir_error: Option<String>,
}

/// One `DOMAIN.crt`/`DOMAIN.key` pair as last seen.
struct Seen {
    stamps: (Option<Stamp>, Option<Stamp>),
    certificate: Option<Arc<CertifiedKey>>,
}

/// Enough of a file's metadata to notice that it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl SniCertificates {
    /// Serves `default`, plus the certificates in `dir` (which must be a readable
    /// directory; the pairs in it are loaded now).
    pub(super) fn new(
        default: Arc<CertifiedKey>,
        dir: Option<PathBuf>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, std::io::Error> {
        if let Some(dir) = &dir {
            std::fs::read_dir(dir).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        }
        let certificates = Self {
            default,
            by_domain: ArcSwap::from_pointee(HashMap::new()),
            dir,
            provider,
            scan: Mutex::new(ScanState::default()),
        };
        certificates.rescan();
        Ok(certificates)
    }

    /// True when there is a directory to re-scan.
    pub(super) fn has_dir(&self) -> bool {
        self.dir.is_some()
    }

    /// True when `domain` (lower case, as rustls hands SNI over) has a certificate of its own.
    pub(super) fn has_domain(&self, domain: &str) -> bool {
        self.by_domain.load().contains_key(domain)
    }

    /// Reads the directory again and swaps in the resulting domain map. Blocking file I/O.
    pub(super) fn rescan(&self) {
        let Some(dir) = &self.dir else { return };
        let mut state = self.scan.lock().unwrap_or_else(PoisonError::into_inner);
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => {
                state.dir_error = None;
                entries
            }
            Err(error) => {
                let error = error.to_string();
                if state.dir_error.as_ref() != Some(&error) {
                    tracing::warn!(dir = %dir.display(), %error, "cannot read router.tls_sni_dir; keeping the certificates loaded before");
                    state.dir_error = Some(error);
                }
                return;
            }
        };
        let mut files = HashMap::new();
        for entry in entries.flatten() {
            let cert_file = entry.path();
            if cert_file.extension().is_none_or(|e| e != "crt") {
                continue;
            }
            let Some(domain) = cert_file
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_ascii_lowercase)
            else {
                continue;
            };
            let key_file = cert_file.with_extension("key");
            let stamps = (stamp(&cert_file), stamp(&key_file));
            if let Some(seen) = state.files.remove(&domain).filter(|seen| seen.stamps == stamps) {
                files.insert(domain, seen);
                continue;
            }
            let certificate = match self.load(&domain, &cert_file, &key_file) {
                Ok(certificate) => {
                    tracing::info!(%domain, "SNI certificate loaded");
                    Some(Arc::new(certificate))
                }
                Err(error) => {
                    tracing::warn!(file = %cert_file.display(), %error, "SNI certificate skipped");
                    None
                }
            };
            files.insert(domain, Seen { stamps, certificate });
        }
        for (domain, seen) in &state.files {
            if seen.certificate.is_some() {
                tracing::info!(%domain, "SNI certificate removed");
            }
        }
        let by_domain = files
            .iter()
            .filter_map(|(domain, seen)| Some((domain.clone(), seen.certificate.clone()?)))
            .collect();
        self.by_domain.store(Arc::new(by_domain));
        state.files = files;
    }

    fn load(&self, domain: &str, cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, String> {
        let labels_ok = domain.split('.').all(|label| {
            !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
        if !labels_ok || !domain.contains('.') {
            return Err(format!(
                "{domain:?} is not a domain name (expected DOMAIN.crt next to DOMAIN.key)"
            ));
        }
        silo_control_plane::tls::load_certified_key(cert_file, key_file, &self.provider).map_err(|e| e.to_string())
    }
}

fn stamp(path: &Path) -> Option<Stamp> {
    let metadata = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: metadata.modified().ok(),
        len: metadata.len(),
    })
}

impl ResolvesServerCert for SniCertificates {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let own = client_hello
            .server_name()
            .and_then(|name| self.by_domain.load().get(name).cloned());
        Some(own.unwrap_or_else(|| self.default.clone()))
    }
}

impl std::fmt::Debug for SniCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SniCertificates")
            .field("dir", &self.dir)
            .field("domains", &self.by_domain.load().len())
            .finish_non_exhaustive()
    }
}
