//! The dev CA of `siloctl dev`: a local certificate authority made once per data dir
//! (`tls/ca.crt`, `tls/ca.key` mode 0600), the router's default certificate for `localhost`
//! and `*.localhost` (`tls/localhost.crt`/`.key`), and one certificate per tenant in the
//! router's SNI dir (`tls/sni/{slug}.localhost.crt`/`.key`).
//!
//! Why per tenant: TLS clients (rustls/webpki, OpenSSL and so curl, browsers) refuse a
//! wildcard with a single label right of the `*`, as in `*.localhost`, just as they refuse
//! `*.com`. So `https://acme.localhost` needs a certificate naming `acme.localhost`. `siloctl
//! dev` issues one for every tenant it sees (at start, and by polling the admin API while it
//! runs); the router picks new files up from its SNI dir without a restart.
//!
//! Trust is anchored at the CA, so certificates are re-issued on every start (an ECDSA key
//! and a signature each) and never expire under a long-lived data dir. Deleting `tls/` makes
//! a new CA, which clients must then trust again.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use chrono::{Datelike, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::localpg::write_private;
use crate::names::TenantSlug;

/// Subject of the dev CA. Fixed: certificates are signed by a CA rebuilt from these
/// parameters and its key, so the issuer name must be the same every run.
const CA_NAME: &str = "silo dev CA (siloctl dev, local use only)";
/// The dev CA is valid this long.
const CA_VALID_DAYS: i64 = 10 * 365;
/// A server certificate is valid this long (under the 398 days browsers accept).
const LEAF_VALID_DAYS: i64 = 397;

/// The dev CA and where its certificates are.
pub(super) struct DevTls {
    /// The CA certificate clients trust (`curl --cacert`).
    pub(super) ca_cert: PathBuf,
    /// The router's default certificate (`localhost`, `*.localhost`).
    pub(super) cert_file: PathBuf,
    /// Its key (mode 0600).
    pub(super) key_file: PathBuf,
    /// The router's `tls_sni_dir`: one certificate per tenant host.
    pub(super) sni_dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl DevTls {
    /// Makes the CA unless `{data_dir}/tls` has one, issues the default certificate and
    /// empties the SNI dir (its certificates are issued again for the tenants that exist).
    pub(super) fn prepare(data_dir: &Path) -> anyhow::Result<DevTls> {
        let dir = data_dir.join("tls");
        let sni_dir = dir.join("sni");
        fs::create_dir_all(&sni_dir).with_context(|| format!("create {}", sni_dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("set permissions of {}", dir.display()))?;
        for entry in fs::read_dir(&sni_dir).with_context(|| format!("read {}", sni_dir.display()))? {
            let path = entry.with_context(|| format!("read {}", sni_dir.display()))?.path();
            fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        }
        let ca_cert = dir.join("ca.crt");
        let ca_key_file = dir.join("ca.key");
        let ca_key = if ca_cert.is_file() && ca_key_file.is_file() {
            let pem = fs::read_to_string(&ca_key_file).with_context(|| format!("read {}", ca_key_file.display()))?;
            KeyPair::from_pem(&pem).map_err(|e| anyhow!("read the dev CA key {}: {e}", ca_key_file.display()))?
        } else {
            let key = KeyPair::generate().map_err(|e| anyhow!("generate the dev CA key: {e}"))?;
            let cert = ca_params()?
                .self_signed(&key)
                .map_err(|e| anyhow!("make the dev CA: {e}"))?;
            write_private(&ca_key_file, key.serialize_pem().as_bytes())?;
            fs::write(&ca_cert, cert.pem()).with_context(|| format!("write {}", ca_cert.display()))?;
            key
        };
        let tls = DevTls {
            ca_cert,
            cert_file: dir.join("localhost.crt"),
            key_file: dir.join("localhost.key"),
            sni_dir,
            issuer: Issuer::new(ca_params()?, ca_key),
        };
        tls.issue(&["localhost", "*.localhost"], &tls.cert_file, &tls.key_file)?;
        Ok(tls)
    }

    /// Issues the certificate of `{slug}.localhost` into the SNI dir unless it is there.
    /// True when it was issued now.
    pub(super) fn ensure_tenant(&self, slug: &str) -> anyhow::Result<bool> {
        let host = format!("{slug}.localhost");
        let cert_file = self.sni_dir.join(format!("{host}.crt"));
        if cert_file.is_file() {
            return Ok(false);
        }
        // Key first: the router loads a pair once the certificate appears.
        self.issue(&[&host], &cert_file, &self.sni_dir.join(format!("{host}.key")))?;
        Ok(true)
    }

    /// Removes the certificates (and keys) of every tenant host but those of `live`.
    pub(super) fn retain_tenants(&self, live: &[TenantSlug]) -> anyhow::Result<()> {
        let keep: Vec<String> = live.iter().map(|slug| format!("{slug}.localhost.")).collect();
        let mut doomed = Vec::new();
        for entry in fs::read_dir(&self.sni_dir).with_context(|| format!("read {}", self.sni_dir.display()))? {
            let path = entry
                .with_context(|| format!("read {}", self.sni_dir.display()))?
                .path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if !keep.iter().any(|host| name.starts_with(host.as_str())) {
                doomed.push(path);
            }
        }
        // Certificates before keys: the router drops a pair once its certificate is gone.
        doomed.sort_by_key(|path| path.extension().is_none_or(|ext| ext != "crt"));
        for path in doomed {
            fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        }
        Ok(())
    }

    /// Writes a server certificate for `names` signed by the CA, and its key (0600).
    fn issue(&self, names: &[&str], cert_file: &Path, key_file: &Path) -> anyhow::Result<()> {
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .map_err(|e| anyhow!("dev certificate names {names:?}: {e}"))?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("localhost"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, LEAF_VALID_DAYS);
        let key = KeyPair::generate().map_err(|e| anyhow!("generate a dev certificate key: {e}"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| anyhow!("sign the dev certificate: {e}"))?;
        write_private(key_file, key.serialize_pem().as_bytes())?;
        // Renamed into place: the router never reads a half-written certificate.
        let partial = cert_file.with_extension("crt.partial");
        fs::write(&partial, cert.pem()).with_context(|| format!("write {}", partial.display()))?;
        fs::rename(&partial, cert_file).with_context(|| format!("write {}", cert_file.display()))
    }
}

/// The dev CA's parameters: a CA for server certificates only, no intermediates.
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| anyhow!("dev CA parameters: {e}"))?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name.push(DnType::OrganizationName, "silo");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_VALID_DAYS);
    Ok(params)
}

/// Valid from yesterday (clock skew) for `days`.
fn validity(params: &mut CertificateParams, days: i64) {
    let date = |d: chrono::DateTime<Utc>| {
        rcgen::date_time_ymd(
            d.year(),
            u8::try_from(d.month()).unwrap_or(1),
            u8::try_from(d.day()).unwrap_or(1),
        )
    };
    let now = Utc::now();
    params.not_before = date(now - chrono::Duration::days(1));
    params.not_after = date(now + chrono::Duration::days(days));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_ca_is_made_once_and_certificates_are_issued_per_start() {
        let dir = tempfile::tempdir().unwrap();
        let first = DevTls::prepare(dir.path()).unwrap();
        let ca = fs::read_to_string(&first.ca_cert).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("tls/ca.key")), 0o600);
        assert_eq!(mode(&first.key_file), 0o600);
        let leaf = fs::read_to_string(&first.cert_file).unwrap();
        assert_eq!(leaf.matches("BEGIN CERTIFICATE").count(), 1);
        assert!(first.ensure_tenant("acme").unwrap());
        assert!(!first.ensure_tenant("acme").unwrap(), "issued once");
        assert!(first.sni_dir.join("acme.localhost.crt").is_file());
        assert_eq!(mode(&first.sni_dir.join("acme.localhost.key")), 0o600);

        assert!(first.ensure_tenant("acme-2").unwrap());
        first.retain_tenants(&[TenantSlug::parse("acme-2").unwrap()]).unwrap();
        assert!(!first.sni_dir.join("acme.localhost.crt").exists(), "a deleted tenant's");
        assert!(!first.sni_dir.join("acme.localhost.key").exists());
        assert!(first.sni_dir.join("acme-2.localhost.crt").is_file());
        assert!(first.sni_dir.join("acme-2.localhost.key").is_file());
        assert!(first.ensure_tenant("acme").unwrap());

        let second = DevTls::prepare(dir.path()).unwrap();
        assert_eq!(fs::read_to_string(&second.ca_cert).unwrap(), ca, "the CA is reused");
        assert_ne!(
            fs::read_to_string(&second.cert_file).unwrap(),
            leaf,
            "the leaf is issued anew"
        );
        assert!(
            !second.sni_dir.join("acme.localhost.crt").exists(),
            "tenant certificates are issued anew"
        );
    }
}
