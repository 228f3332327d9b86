//! Connection benchmark: what one new PostgreSQL connection costs silo, without TLS and with
//! `sslmode = verify-full`. Run with `scripts/bench connect`.
//!
//! Every pool silo builds, every rollout step and every provisioning opens connections like
//! these (sqlx, SCRAM-SHA-256, loopback). Two throw-away clusters: one that accepts plain
//! connections, one that accepts only TLS (certificate from a CA made for the run). The
//! connects alternate between the two, so both see the same machine; each is a connect,
//! `SELECT 1` and a close. `SILO_BENCH_CONNECTS` (default 50) sets how many of each.
//!
//! TLS should add a few milliseconds (two more round trips and the handshake's crypto). It
//! added ~90 ms with sqlx-core 0.9.0 as released, which does not set `TCP_NODELAY`: the
//! handshake then waits for delayed ACKs (see `vendor/sqlx-core/VENDORED.md`).

use std::time::Instant;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use silo_tests::bench::{load_average, percentile};
use silo_tests::pg::TestCluster;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{Connection, PgConnection};

/// Connects of each kind, unless `SILO_BENCH_CONNECTS` says otherwise.
const CONNECTS: usize = 50;

/// A certificate for 127.0.0.1 (PEM cert, PEM key) and the PEM of the CA that signed it.
fn certificates() -> anyhow::Result<(String, String, String)> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "silo bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate()?;
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut server = CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
    server.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    let key = KeyPair::generate()?;
    let cert = server.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem(), ca_pem))
}

/// Milliseconds to connect, run `SELECT 1` and close.
async fn time_connect(options: &PgConnectOptions) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut conn = PgConnection::connect_with(options).await?;
    sqlx::query("SELECT 1").execute(&mut conn).await?;
    conn.close().await?;
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

fn summary(label: &str, sorted: &[f64]) {
    println!(
        "  {label:<28} {:>7.2} {:>7.2} {:>7.2}",
        percentile(sorted, 0.5),
        percentile(sorted, 0.95),
        sorted.last().copied().unwrap_or(f64::NAN)
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    silo_tests::init_logging();
    let connects: usize = match std::env::var("SILO_BENCH_CONNECTS") {
        Ok(n) => n.parse()?,
        Err(_) => CONNECTS,
    };
    let (cert, key, ca_pem) = certificates()?;
    let plain_cluster = TestCluster::start().await?;
    let tls_cluster = TestCluster::start_tls_only(&cert, &key).await?;
    let plain = plain_cluster.admin_options("postgres").ssl_mode(PgSslMode::Disable);
    let tls = tls_cluster
        .admin_options("postgres")
        .ssl_mode(PgSslMode::VerifyFull)
        .ssl_root_cert_from_pem(ca_pem.into_bytes());
    println!(
        "silo connection benchmark: PostgreSQL on 127.0.0.1, SCRAM-SHA-256, sqlx; load average {}",
        load_average()
    );
    println!("{connects} connects of each kind, alternating, one at a time (connect, SELECT 1, close)\n");

    // One of each first, so neither pays for the other's first-use costs.
    time_connect(&plain).await?;
    time_connect(&tls).await?;
    let (mut plain_ms, mut tls_ms) = (Vec::with_capacity(connects), Vec::with_capacity(connects));
    for _ in 0..connects {
        plain_ms.push(time_connect(&plain).await?);
        tls_ms.push(time_connect(&tls).await?);
    }
    plain_ms.sort_by(f64::total_cmp);
    tls_ms.sort_by(f64::total_cmp);

    println!("  {:<28} {:>7} {:>7} {:>7}", "ms per connection", "p50", "p95", "max");
    summary("without TLS", &plain_ms);
    summary("TLS, sslmode = verify-full", &tls_ms);
    let (p, t) = (percentile(&plain_ms, 0.5), percentile(&tls_ms, 0.5));
    println!(
        "\n  TLS adds {:.2} ms per connection at the median ({:.2}x); sqlx-core 0.9.0 without TCP_NODELAY added ~90 ms",
        t - p,
        t / p
    );
    Ok(())
}
