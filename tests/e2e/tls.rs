//! HTTPS at the router, as clients see it: certificates from a test CA (rcgen), clients that
//! trust only that CA. ALPN picks HTTP/1.1 or HTTP/2; a custom domain's certificate from
//! `router.tls_sni_dir` is served for its name, also when added while the router runs; a
//! request for another host on that certificate's connection gets 421; plain HTTP on the
//! HTTPS port is closed without harm; unusable TLS files stop the router with one line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use reqwest::{StatusCode, Version};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A certificate authority of the test's own.
pub(crate) struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub(crate) pem: String,
}

impl TestCa {
    pub(crate) fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "silo test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A certificate for `names`, written to `{dir}/{file}.crt` and `.key`; returns its DER.
    pub(crate) fn issue(&self, names: &[&str], dir: &Path, file: &str) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).unwrap();
        cert.der().clone()
    }

    /// reqwest trusting this CA only, with `host` resolving to `addr`.
    pub(crate) fn reqwest(&self, host: &str, addr: SocketAddr) -> reqwest::ClientBuilder {
        silo_control_plane::install_crypto_provider();
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.pem.as_bytes()).unwrap())
            .resolve(host, addr)
            .timeout(Duration::from_secs(10))
    }

    /// A raw TLS connection to `addr` with SNI `sni` and ALPN `http/1.1`.
    async fn connect(&self, addr: SocketAddr, sni: &str) -> std::io::Result<TlsStream<TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from(sni.to_owned()).unwrap();
        TlsConnector::from(Arc::new(config)).connect(name, tcp).await
    }
}

/// The certificate the server presented on `stream`.
fn peer_certificate(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

/// Sends one HTTP/1.1 request (`Connection: close`) and returns the status and JSON body.
async fn raw_get(mut stream: TlsStream<TcpStream>, host: &str, path: &str, key: &str) -> (u16, Value) {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    // The peer may close without close_notify after `Connection: close`: keep what came.
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes)).await;
    let text = String::from_utf8_lossy(&bytes);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = match (text.find('{'), text.rfind('}')) {
        (Some(start), Some(end)) => serde_json::from_str(&text[start..=end]).unwrap(),
        _ => Value::Null,
    };
    (status, body)
}

/// Test certificates in a directory of their own: the default one, and an SNI directory.
///
/// The default certificate names its hosts one by one: TLS clients refuse a wildcard with a
/// single label right of the `*` (`*.localhost`, like `*.com`). In production it is a
/// wildcard under the base domain (`*.silo.example.com`).
struct Certs {
    ca: TestCa,
    dir: tempfile::TempDir,
}

impl Certs {
    fn new(default_names: &[&str]) -> Self {
        let ca = TestCa::new();
        let dir = tempfile::tempdir().unwrap();
        ca.issue(default_names, dir.path(), "default");
        std::fs::create_dir(dir.path().join("sni")).unwrap();
        Self { ca, dir }
    }

    fn sni_dir(&self) -> PathBuf {
        self.dir.path().join("sni")
    }

    /// `[router]` lines for these files (plus `extra`).
    fn router_toml(&self, extra: &str) -> String {
        let d = self.dir.path().display();
        format!(
            "tls_cert_file = \"{d}/default.crt\"\ntls_key_file = \"{d}/default.key\"\n\
             tls_sni_dir = \"{d}/sni\"\ntls_sni_reload_interval = \"100ms\"\n{extra}"
        )
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn https_listener_negotiates_http1_and_http2_next_to_plain_http() {
    let slug = unique_name("tls");
    let host = format!("{slug}.localhost");
    let certs = Certs::new(&[&host]);
    let router_toml = certs.router_toml("https_listen = \"127.0.0.1:0\"\n");
    let stack = Stack::start(StackOptions {
        router_toml,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let https = stack.router_https_addr().expect("an HTTPS address");
    assert_ne!(https, stack.router_addr(), "https_listen is a listener of its own");
    let key = stack.create_tenant(&slug).await.unwrap();
    let url = format!("https://{host}:{}/api/v1/me", https.port());

    let http1 = certs.ca.reqwest(&host, https).http1_only().build().unwrap();
    let resp = http1.get(&url).bearer_auth(&key).send().await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(resp.status(), StatusCode::OK);
    // Private answers, never cached nor sniffed; over TLS, HTTPS only from now on.
    assert_eq!(
        [
            &resp.headers()["strict-transport-security"],
            &resp.headers()["cache-control"],
            &resp.headers()["x-content-type-options"]
        ],
        ["max-age=31536000", "no-store", "nosniff"]
    );
    assert_eq!(resp.json::<Value>().await.unwrap()["tenant"], slug.as_str());

    // No prior knowledge: ALPN offers h2 and http/1.1, the router picks h2.
    let http2 = certs.ca.reqwest(&host, https).build().unwrap();
    for _ in 0..3 {
        let resp = http2.get(&url).bearer_auth(&key).send().await.unwrap();
        assert_eq!(resp.version(), Version::HTTP_2);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.json::<Value>().await.unwrap()["tenant"], slug.as_str());
    }

    // `listen` stays plain HTTP, where HSTS means nothing; an error of the router's own has
    // the same headers as the app's answers.
    let resp = stack
        .tenant_request(reqwest::Method::GET, &host, "/api/v1/me")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(!resp.headers().contains_key("strict-transport-security"));
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    let resp = http2
        .get(format!("https://{host}:{}/api/v1/me", https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        [
            &resp.headers()["strict-transport-security"],
            &resp.headers()["cache-control"]
        ],
        ["max-age=31536000", "no-store"]
    );

    // Plain HTTP on the HTTPS port: the connection is closed, no HTTP answer, no harm done.
    let mut tcp = TcpStream::connect(https).await.unwrap();
    tcp.write_all(format!("GET /api/v1/me HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut bytes)).await;
    assert!(read.is_ok(), "the router must close the connection, not wait");
    assert!(
        !bytes.starts_with(b"HTTP/"),
        "no HTTP answer on the HTTPS port: {:?}",
        String::from_utf8_lossy(&bytes)
    );
    let resp = http2.get(&url).bearer_auth(&key).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "HTTPS still served afterwards");

    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_domain_certificates_come_from_the_sni_dir_and_are_reloaded() {
    let slug = unique_name("sni");
    let certs = Certs::new(&[&format!("{slug}.localhost")]);
    let domain = format!("{slug}.example.com");
    let domain_cert = certs.ca.issue(&[&domain], &certs.sni_dir(), &domain);
    // TLS on `listen` itself (no https_listen), as in production.
    let stack = Stack::start(StackOptions {
        router_toml: certs.router_toml(""),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let addr = stack.router_https_addr().expect("an HTTPS address");
    assert_eq!(addr, stack.router_addr());
    let key = stack
        .create_tenant_with(json!({ "slug": slug, "domains": [domain] }))
        .await
        .unwrap();

    // The custom domain's own certificate, and the tenant behind it.
    let stream = certs.ca.connect(addr, &domain).await.unwrap();
    assert_eq!(peer_certificate(&stream), domain_cert);
    let (status, body) = raw_get(stream, &domain, "/api/v1/me", &key).await;
    assert_eq!((status, &body["tenant"]), (200, &json!(slug)), "{body}");

    // Another host on that certificate's connection: 421, JSON.
    let stream = certs.ca.connect(addr, &domain).await.unwrap();
    let (status, body) = raw_get(stream, "other.localhost", "/api/v1/me", &key).await;
    assert_eq!(status, 421, "{body}");
    assert_eq!(body["error"], "misdirected_request");
    assert!(body["message"].is_string(), "{body}");
    // The default certificate is not tied to one host: no 421 there.
    let stream = certs.ca.connect(addr, &format!("{slug}.localhost")).await.unwrap();
    let (status, body) = raw_get(stream, &format!("{slug}.localhost"), "/api/v1/me", &key).await;
    assert_eq!(status, 200, "{body}");

    // A domain without a certificate of its own gets the default one, which does not name it.
    let later = format!("later-{slug}.example.com");
    let err = certs.ca.connect(addr, &later).await.unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");

    // Added while the router runs (next to a broken pair, which is skipped): served without a
    // restart.
    std::fs::write(certs.sni_dir().join("broken.example.com.crt"), "not a certificate").unwrap();
    std::fs::write(certs.sni_dir().join("broken.example.com.key"), "not a key").unwrap();
    let later_cert = certs.ca.issue(&[&later], &certs.sni_dir(), &later);
    let deadline = Instant::now() + Duration::from_secs(10);
    let served = loop {
        match certs.ca.connect(addr, &later).await {
            Ok(stream) => break peer_certificate(&stream),
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("the added certificate was not picked up within 10 s: {e}"),
        }
    };
    assert_eq!(served, later_cert);
    let stream = certs.ca.connect(addr, &domain).await.unwrap();
    assert_eq!(
        peer_certificate(&stream),
        domain_cert,
        "the first certificate is still served"
    );

    // Removed: back to the default certificate.
    std::fs::remove_file(certs.sni_dir().join(format!("{later}.crt"))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while certs.ca.connect(addr, &later).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the removed certificate is still served after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    stack.stop().await.unwrap();
}

#[test]
fn unusable_tls_files_stop_the_router_with_one_line_naming_the_key() {
    let certs = Certs::new(&["localhost"]);
    let d = certs.dir.path();
    std::fs::write(d.join("junk.pem"), "hello\n").unwrap();
    certs.ca.issue(&["other.localhost"], d, "other");
    let run = |cert: &Path, key: &Path, extra: &str| {
        let stderr = silo_tests::refused_config(
            "silo-router",
            d,
            &format!(
                "catalog_url = \"postgres://postgres@127.0.0.1:1/silo_catalog\"\n[secrets]\n\
                 local_master_key_file = \"master.key\"\n[router]\nlisten = \"127.0.0.1:0\"\n\
                 metrics_listen = \"127.0.0.1:0\"\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}\n{extra}"
            ),
        );
        assert!(stderr.starts_with("error: config key `router."), "{stderr}");
        stderr
    };
    let (crt, key) = (d.join("default.crt"), d.join("default.key"));
    for (cert, key, named, detail) in [
        (
            d.join("missing.crt"),
            key.clone(),
            "router.tls_cert_file",
            "missing.crt",
        ),
        (
            d.join("junk.pem"),
            key.clone(),
            "router.tls_cert_file",
            "no PEM certificate",
        ),
        (key.clone(), key.clone(), "router.tls_cert_file", "no PEM certificate"),
        (
            crt.clone(),
            d.join("junk.pem"),
            "router.tls_key_file",
            "no PEM private key",
        ),
        (crt.clone(), d.join("other.key"), "router.tls_key_file", "other.key"),
        (crt.clone(), d.join("missing.key"), "router.tls_key_file", "missing.key"),
    ] {
        let stderr = run(&cert, &key, "");
        assert!(
            stderr.contains(named) && stderr.contains(detail),
            "{named}, {detail}: {stderr}"
        );
    }
    let stderr = run(&crt, &key, &format!("tls_sni_dir = {:?}\n", d.join("no-such-dir")));
    assert!(
        stderr.contains("router.tls_sni_dir") && stderr.contains("no-such-dir"),
        "{stderr}"
    );
}
