//! `[[servers]] region`: a tenant asked for in a region is placed on a server there, shows
//! its region, and no move or drain takes its data out of that region unless asked to.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use silo_tests::pg::TestCluster;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;

#[tokio::test(flavor = "multi_thread")]
async fn tenants_live_in_the_region_asked_for_and_leave_it_only_when_asked() {
    let pg2 = TestCluster::start().await.unwrap();
    let stack = Stack::start(StackOptions {
        server_toml: "region = \"eu-west-1\"\n".into(),
        extra_toml: format!(
            "[backups]\ndir = \"backups\"\n{}region = \"us-east-1\"\n",
            pg2.server_toml("pg-2")
        ),
        ..StackOptions::default()
    })
    .await
    .unwrap();

    // Placed by region, whichever server has fewer tenants.
    let (eu, us) = (unique_name("eu"), unique_name("us"));
    let eu_key = stack
        .create_tenant_with(json!({"slug": eu, "region": "eu-west-1"}))
        .await
        .unwrap();
    stack
        .create_tenant_with(json!({"slug": us, "region": "us-east-1"}))
        .await
        .unwrap();
    for (slug, server, region) in [(&eu, "pg-1", "eu-west-1"), (&us, "pg-2", "us-east-1")] {
        let tenant = stack.tenant(slug).await.unwrap();
        assert_eq!(
            (&tenant["server"], &tenant["region"]),
            (&server.into(), &region.into()),
            "{tenant}"
        );
    }

    // A region no server is in, or a server outside the region asked for: 422, nothing made.
    let refused = unique_name("nowhere");
    for (body, code) in [
        (json!({"slug": refused, "region": "ap-south-1"}), "unknown_region"),
        (
            json!({"slug": refused, "region": "eu-west-1", "server": "pg-2"}),
            "region_mismatch",
        ),
    ] {
        let (status, answer) = stack.admin(Method::POST, "/v1/tenants", Some(body)).await.unwrap();
        assert_eq!(
            (status, &answer["error"]),
            (StatusCode::UNPROCESSABLE_ENTITY, &code.into()),
            "{answer}"
        );
    }
    let (status, _) = stack
        .admin(Method::GET, &format!("/v1/tenants/{refused}"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (code, stdout, stderr) = stack
        .siloctl(&["-o", "json", "tenant", "list", "--region", "eu-west-1"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    let slugs: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["slug"].as_str().unwrap())
        .collect();
    assert_eq!(slugs, [eu.as_str()]);

    let (code, stdout, stderr) = stack.siloctl(&["-o", "json", "server", "list"]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let servers: Value = serde_json::from_str(&stdout).unwrap();
    let regions: Vec<(&str, &str)> = servers["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["region"].as_str().unwrap()))
        .collect();
    assert_eq!(regions, [("pg-1", "eu-west-1"), ("pg-2", "us-east-1")]);

    // A move or a drain out of the region is refused; the tenant keeps being served.
    let (status, answer) = stack
        .admin(
            Method::POST,
            &format!("/v1/tenants/{eu}/move"),
            Some(json!({"server": "pg-2"})),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, &answer["error"]),
        (StatusCode::CONFLICT, &"region_mismatch".into()),
        "{answer}"
    );
    let tenant = stack.tenant(&eu).await.unwrap();
    assert!(
        tenant.get("moving_to").is_none() && tenant["status"] == "active",
        "{tenant}"
    );
    assert_eq!(
        stack.tenant_get(&eu, &eu_key, "/api/v1/tasks").await.unwrap().status(),
        StatusCode::OK
    );
    let (code, _, stderr) = stack
        .siloctl(&["server", "drain", "pg-1", "--to", "pg-2"])
        .await
        .unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.trim().lines().count() == 1 && stderr.contains("--allow-region-change"),
        "{stderr}"
    );
    assert_eq!(stack.tenant(&eu).await.unwrap()["server"], "pg-1");

    // Asked for, it moves, and its region is its new server's.
    let (code, _, stderr) = stack
        .siloctl(&["tenant", "move", &eu, "--to", "pg-2", "--allow-region-change"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let tenant = stack.tenant(&eu).await.unwrap();
    assert_eq!(
        (&tenant["server"], &tenant["region"]),
        (&"pg-2".into(), &"us-east-1".into()),
        "{tenant}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while stack.tenant_get(&eu, &eu_key, "/api/v1/tasks").await.unwrap().status() != StatusCode::OK {
        assert!(std::time::Instant::now() < deadline, "not served from pg-2 within 10 s");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (status, audit) = stack
        .admin(Method::GET, &format!("/v1/audit?tenant={eu}&action=tenant.move"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{audit}");
    let detail = &audit["items"][0]["detail"];
    assert_eq!(
        (&detail["from_region"], &detail["to_region"]),
        (&"eu-west-1".into(), &"us-east-1".into()),
        "{audit}"
    );
    stack.stop().await.unwrap();
}
