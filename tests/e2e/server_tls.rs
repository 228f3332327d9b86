//! Connections to a PostgreSQL server that lets only TLS connections in, configured with
//! `[[servers]] sslmode = "verify-full"` and the server's CA in `sslrootcert`: the control
//! plane provisions and rotates over verified TLS, the router serves the tenant over it, and
//! the same settings with a CA that did not sign the server's certificate get no connection.
//! `PGSSLMODE=disable` in the environment changes none of it.

use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde_json::json;
use silo_control_plane::config::Config;
use silo_tests::pg::TestCluster;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use sqlx::{ConnectOptions, Connection};

use crate::tls::TestCa;

/// The TLS cluster's superuser password, for `admin_password_env`.
const PASSWORD_ENV: &str = "SILO_TEST_TLS_PG_PASSWORD";

/// A `[[servers]]` entry for the TLS cluster on `port`, verified with the CA in `ca_file`.
fn server_toml(name: &str, port: u16, ca_file: &std::path::Path) -> String {
    format!(
        "[[servers]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\nadmin_user = \"postgres\"\n\
         admin_password_env = \"{PASSWORD_ENV}\"\nsslmode = \"verify-full\"\nsslrootcert = {:?}\n",
        ca_file.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_only_server_is_provisioned_rotated_and_served_over_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    ca.issue(&["127.0.0.1"], dir.path(), "server");
    let cert = std::fs::read_to_string(dir.path().join("server.crt")).unwrap();
    let key = std::fs::read_to_string(dir.path().join("server.key")).unwrap();
    let pg = TestCluster::start_tls_only(&cert, &key).await.unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    std::env::set_var(PASSWORD_ENV, pg.password().expose_secret());
    // Were silo's connections built from the environment, they would go without TLS and be
    // refused.
    std::env::set_var("PGSSLMODE", "disable");
    let stack = Stack::start(StackOptions {
        extra_toml: server_toml("pg-tls", pg.port(), &ca_file),
        ..StackOptions::default()
    })
    .await
    .unwrap();

    let slug = unique_name("tls");
    let api_key = stack
        .create_tenant_with(json!({"slug": slug, "server": "pg-tls"}))
        .await
        .unwrap();
    let me = stack.tenant_get(&slug, &api_key, "/api/v1/me").await.unwrap();
    assert_eq!(me.status(), StatusCode::OK);
    let (_, servers) = stack.admin(Method::GET, "/v1/servers", None).await.unwrap();
    let tls_server = servers["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "pg-tls")
        .cloned()
        .unwrap();
    assert_eq!(tls_server["sslmode"], "verify-full", "{servers}");
    assert_eq!(tls_server["tenants"], 1, "{servers}");

    let (status, rotation) = stack
        .admin(Method::POST, &format!("/v1/tenants/{slug}/rotate"), Some(json!({})))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{rotation}");
    let job = stack.wait_job(rotation["job"]["id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(job["state"], "succeeded", "rotation over TLS: {job}");
    let me = stack.tenant_get(&slug, &api_key, "/api/v1/me").await.unwrap();
    assert_eq!(me.status(), StatusCode::OK);

    // The router's sessions on the tenant database are TLS sessions (pg_hba.conf refuses any
    // other, so this checks they are the router's, on this server).
    let mut admin = pg
        .admin_options("postgres")
        .ssl_mode(sqlx::postgres::PgSslMode::Require)
        .connect()
        .await
        .unwrap();
    let router_sessions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name = 'silo-router' AND a.datname = $1 AND s.ssl",
    )
    .bind(stack.database_of(&slug).await.unwrap())
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(
        router_sessions >= 1,
        "no TLS session of the router on the tenant database"
    );
    admin.close().await.unwrap();

    // The same settings with a CA of someone else's: the server's certificate is refused.
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, TestCa::new().pem).unwrap();
    let config = Config::parse(&server_toml_config(pg.port(), &other_ca), dir.path()).unwrap();
    let untrusted = config.servers[0].tls.apply(pg.admin_options("postgres"));
    let refused = untrusted
        .connect()
        .await
        .expect_err("a server certificate from an unknown CA");
    assert!(
        refused.to_string().to_lowercase().contains("certificate"),
        "the error says why: {refused}"
    );

    stack.stop().await.unwrap();
}

/// A minimal config whose only server is the TLS cluster, verified with `ca_file`.
fn server_toml_config(port: u16, ca_file: &std::path::Path) -> String {
    format!(
        "catalog_url = \"postgres://postgres@127.0.0.1:{port}/postgres\"\n[secrets]\nbackend = \"local\"\n\
         local_master_key_file = \"master.key\"\n{}",
        server_toml("pg-tls", port, ca_file)
    )
}
