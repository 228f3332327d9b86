//! The admin API over HTTPS (`control_plane.tls_cert_file`/`tls_key_file`): siloctl trusts a
//! private CA with `--cacert` and refuses a server it cannot verify; plain HTTP gets no
//! answer; unusable files stop the control plane with one line and exit code 2.

use reqwest::{StatusCode, Version};
use serde_json::Value;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;

use crate::tls::TestCa;

#[tokio::test(flavor = "multi_thread")]
async fn siloctl_reaches_the_admin_api_over_https_with_the_ca_it_is_given() {
    let logs = silo_tests::capture_logs();
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    ca.issue(&["localhost", "127.0.0.1"], dir.path(), "admin");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let d = dir.path().display();
    let stack = Stack::start(StackOptions {
        control_plane_toml: format!("tls_cert_file = \"{d}/admin.crt\"\ntls_key_file = \"{d}/admin.key\"\n"),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let addr = stack.control_plane_addr();
    let endpoint = format!("https://127.0.0.1:{}", addr.port());
    let ca_arg = ca_file.to_str().unwrap();

    let slug = unique_name("tls");
    let (code, stdout, stderr) = stack
        .siloctl(&[
            "--endpoint",
            &endpoint,
            "--cacert",
            ca_arg,
            "-o",
            "json",
            "tenant",
            "create",
            &slug,
        ])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let created: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(created["tenant"]["status"], "active", "{created}");

    // ALPN: HTTP/2 for clients that offer it, HTTP/1.1 for the others.
    for (client, version) in [
        (ca.reqwest("localhost", addr).build().unwrap(), Version::HTTP_2),
        (
            ca.reqwest("localhost", addr).http1_only().build().unwrap(),
            Version::HTTP_11,
        ),
    ] {
        let url = format!("https://localhost:{}/v1/tenants/{slug}", addr.port());
        let resp = client.get(&url).bearer_auth(stack.admin_token()).send().await.unwrap();
        assert_eq!((resp.status(), resp.version()), (StatusCode::OK, version));
        assert_eq!(
            [
                &resp.headers()["strict-transport-security"],
                &resp.headers()["cache-control"],
                &resp.headers()["x-content-type-options"]
            ],
            ["max-age=31536000", "no-store", "nosniff"]
        );
    }
    // The access log has the client's address over TLS too.
    let path = format!("path=\"/v1/tenants/{slug}\"");
    let text = logs.text();
    let logged: Vec<&str> = text.lines().filter(|line| line.contains(&path)).collect();
    assert!(
        logged.len() >= 2
            && logged
                .iter()
                .all(|line| line.contains("peer=127.0.0.1:") && line.contains("status=200")),
        "{text}"
    );

    // A server siloctl cannot verify is refused, in one line; so is an unusable --cacert.
    let (code, _, stderr) = stack
        .siloctl(&["--endpoint", &endpoint, "tenant", "list"])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    let missing = dir.path().join("missing.pem");
    let (code, _, stderr) = stack
        .siloctl(&[
            "--endpoint",
            &endpoint,
            "--cacert",
            missing.to_str().unwrap(),
            "tenant",
            "list",
        ])
        .await
        .unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--cacert"), "{stderr}");

    // Plain HTTP on the HTTPS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{addr}/v1/tenants"))
        .bearer_auth(stack.admin_token())
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    stack.stop().await.unwrap();
}

#[test]
fn unusable_admin_tls_files_stop_the_control_plane_with_one_line_naming_the_key() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca.issue(&["localhost"], d, "admin");
    ca.issue(&["other.localhost"], d, "other");
    let run = |cert: &str, key: &str| {
        silo_tests::refused_config(
            "silo-control-plane",
            d,
            &format!(
                "catalog_url = \"postgres://postgres@127.0.0.1:1/silo_catalog\"\n[secrets]\n\
                 local_master_key_file = \"master.key\"\n[control_plane]\nlisten = \"127.0.0.1:0\"\n\
                 tls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\n"
            ),
        )
    };
    for (cert, key, named) in [
        ("missing.crt", "admin.key", "control_plane.tls_cert_file"),
        ("admin.key", "admin.key", "control_plane.tls_cert_file"),
        ("admin.crt", "missing.key", "control_plane.tls_key_file"),
        ("admin.crt", "other.key", "control_plane.tls_key_file"),
    ] {
        let stderr = run(cert, key);
        assert!(
            stderr.starts_with(&format!("error: config key `{named}`")),
            "{cert}, {key}: {stderr}"
        );
    }
    let stderr = silo_tests::refused_config(
        "silo-control-plane",
        d,
        "catalog_url = \"postgres://postgres@127.0.0.1:1/c\"\n[secrets]\nlocal_master_key_file = \"master.key\"\n\
         [control_plane]\ntls_cert_file = \"admin.crt\"\n",
    );
    assert!(stderr.contains("control_plane.tls_key_file"), "{stderr}");
}
