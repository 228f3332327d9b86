//! How silo's connections to one PostgreSQL server use TLS: `[[servers]] sslmode` and
//! `sslrootcert`, with libpq's names and meanings.
//!
//! Every connection silo opens to a server takes its mode from here, whatever the process
//! environment says (`PGSSLMODE` does not apply): the control plane's admin connections, the
//! rollout's and rotation's connections to tenant databases, and the router's tenant pools.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use sqlx::postgres::{PgConnectOptions, PgSslMode};

/// Every `sslmode`, by its libpq name.
const MODES: [(&str, PgSslMode); 6] = [
    ("disable", PgSslMode::Disable),
    ("allow", PgSslMode::Allow),
    ("prefer", PgSslMode::Prefer),
    ("require", PgSslMode::Require),
    ("verify-ca", PgSslMode::VerifyCa),
    ("verify-full", PgSslMode::VerifyFull),
];

/// A server's TLS settings.
#[derive(Clone)]
pub struct ServerTls {
    mode: PgSslMode,
    /// PEM of the CAs that verify the server's certificate (`verify-ca`, `verify-full`);
    /// without it, the Mozilla roots shipped with silo do.
    root_cert: Option<Arc<Vec<u8>>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mode", &self.mode)
            .field("root_cert", &self.root_cert.is_some())
            .finish()
    }
}

impl ServerTls {
    /// Settings from the `sslmode` and `sslrootcert` values (the latter already resolved
    /// against the config file's directory); without `sslmode`, libpq's default `prefer`
    /// (TLS when the server offers it, its certificate not checked). The error names what is wrong, for the key the
    /// caller reports.
    ///
    /// As with libpq, `require` with a root certificate verifies the server's certificate
    /// against it (`verify-ca`); a root certificate with a mode that may not use TLS at all
    /// is refused rather than silently ignored.
    pub(super) fn parse(mode: Option<&str>, root_cert: Option<&Path>) -> Result<Self, (&'static str, String)> {
        let name = mode.unwrap_or("prefer");
        let Some(&(_, mode)) = MODES.iter().find(|(known, _)| *known == name) else {
            let names: Vec<&str> = MODES.iter().map(|(known, _)| *known).collect();
            return Err(("sslmode", format!("must be one of {}; not {name:?}", names.join(", "))));
        };
        let root_cert = match root_cert {
            None => None,
            Some(path) => {
                let pem =
                    std::fs::read(path).map_err(|e| ("sslrootcert", format!("cannot read {}: {e}", path.display())))?;
                let certificates = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ("sslrootcert", format!("{} is not PEM: {e}", path.display())))?;
                if certificates.is_empty() {
                    return Err(("sslrootcert", format!("{} holds no certificate", path.display())));
                }
                Some(Arc::new(pem))
            }
        };
        let mode = match (mode, &root_cert) {
            (PgSslMode::Require, Some(_)) => PgSslMode::VerifyCa,
            (PgSslMode::Disable | PgSslMode::Allow | PgSslMode::Prefer, Some(_)) => {
                return Err((
                    "sslrootcert",
                    "is used only with sslmode require, verify-ca or verify-full".to_owned(),
                ))
            }
            (mode, _) => mode,
        };
        Ok(Self { mode, root_cert })
    }

    /// Whether the server's certificate is checked (`verify-ca`, `verify-full`).
    pub(super) fn verifies_server(&self) -> bool {
        matches!(self.mode, PgSslMode::VerifyCa | PgSslMode::VerifyFull)
    }

    /// The `sslmode` value these settings act as.
    pub fn mode_name(&self) -> &'static str {
        let this = std::mem::discriminant(&self.mode);
        MODES
            .iter()
            .find(|(_, mode)| std::mem::discriminant(mode) == this)
            .map_or("prefer", |(name, _)| name)
    }

    /// The PEM of the CA certificates that sign the server's certificate, if configured.
    pub fn root_cert_pem(&self) -> Option<&[u8]> {
        self.root_cert.as_deref().map(Vec::as_slice)
    }

    /// `options` set to connect with these settings.
    pub fn apply(&self, options: PgConnectOptions) -> PgConnectOptions {
        let options = options.ssl_mode(self.mode);
        match &self.root_cert {
            Some(pem) => options.ssl_root_cert_from_pem(pem.as_ref().clone()),
            None => options,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_libpqs() {
        let tls = ServerTls::parse(None, None).expect("default");
        assert!(matches!(tls.mode, PgSslMode::Prefer));
    }

    #[test]
    fn every_libpq_mode_is_accepted() {
        for mode in ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] {
            let tls = ServerTls::parse(Some(mode), None).expect(mode);
            assert_eq!(tls.mode_name(), mode, "named back as configured");
        }
        let tls = ServerTls::parse(Some("verify-full"), None).expect("mode");
        assert!(matches!(tls.mode, PgSslMode::VerifyFull));
    }

    #[test]
    fn unknown_modes_are_refused() {
        let (key, problem) = ServerTls::parse(Some("VERIFY_FULL"), None).expect_err("refused");
        assert_eq!(key, "sslmode");
        assert!(problem.contains("verify-full"), "{problem}");
    }

    #[test]
    fn a_root_certificate_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let (key, problem) = ServerTls::parse(Some("verify-full"), Some(&missing)).expect_err("missing");
        assert_eq!(key, "sslrootcert");
        assert!(problem.contains("cannot read"), "{problem}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let (_, problem) = ServerTls::parse(Some("verify-full"), Some(&empty)).expect_err("empty");
        assert!(problem.contains("no certificate"), "{problem}");

        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.cert.pem()).expect("write");
        let tls = ServerTls::parse(Some("verify-full"), Some(&good)).expect("a certificate");
        assert!(tls.root_cert.is_some());
        assert!(!format!("{tls:?}").contains("BEGIN"), "Debug shows whether, not what");

        // libpq's rule: `require` with a root certificate verifies against it.
        let tls = ServerTls::parse(Some("require"), Some(&good)).expect("require");
        assert!(matches!(tls.mode, PgSslMode::VerifyCa));
        for mode in ["disable", "allow", "prefer"] {
            let (key, problem) = ServerTls::parse(Some(mode), Some(&good)).expect_err(mode);
            assert_eq!(key, "sslrootcert");
            assert!(problem.contains("only with"), "{problem}");
        }
    }
}
