//! `siloctl tenant hold SLUG --reason TEXT` / `--release` (`POST`/`DELETE
//! /v1/tenants/{slug}/hold`): while a tenant's data is under legal hold it cannot be deleted
//! and none of its backups is erased, not by hand, not by `keep_last`, not by `keep_for` — a
//! deleted tenant's backups included; released, retention erases what it would have.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;

/// The file names of `slug`'s backups, newest first.
async fn backups_of(stack: &Stack, slug: &str) -> Vec<String> {
    crate::backups::listed_backups(stack, slug)
        .await
        .iter()
        .map(|b| b["file"].as_str().unwrap().to_owned())
        .collect()
}

async fn back_up(stack: &Stack, slug: &str) {
    let (code, _, stderr) = stack.siloctl(&["tenant", "backup", slug]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
}

async fn hold(stack: &Stack, slug: &str, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json", "tenant", "hold", slug];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = stack.siloctl(&all).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_tenant_keeps_its_data_and_backups_until_the_hold_is_released() {
    let stack = Stack::start(StackOptions {
        extra_toml: "[backups]\ndir = \"backups\"\nkeep_last = 1\nkeep_for = \"3s\"\n".into(),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let held = unique_name("lh");
    stack.create_tenant(&held).await.unwrap();
    let (code, _, stderr) = stack.siloctl(&["tenant", "hold", &held]).await.unwrap();
    assert_eq!(code, Some(2), "a hold needs a reason: {stderr}");
    let tenant = hold(&stack, &held, &["--reason", "case 2026-117"]).await;
    assert_eq!(tenant["legal_hold"], "case 2026-117", "{tenant}");
    let (_, shown, _) = stack.siloctl(&["tenant", "show", &held]).await.unwrap();
    assert!(
        shown.contains("legal hold:") && shown.contains("case 2026-117"),
        "{shown}"
    );

    // keep_last = 1 keeps both; neither deleting the tenant nor one of its backups is allowed.
    back_up(&stack, &held).await;
    back_up(&stack, &held).await;
    let two = backups_of(&stack, &held).await;
    assert_eq!(two.len(), 2, "{two:?}");
    let (code, _, stderr) = stack.siloctl(&["tenant", "delete", &held, "--yes"]).await.unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("legal_hold") && stderr.contains("case 2026-117"),
        "{stderr}"
    );
    let (status, body) = stack
        .admin(Method::DELETE, &format!("/v1/tenants/{held}/backups/{}", two[1]), None)
        .await
        .unwrap();
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::CONFLICT, &"legal_hold".into()),
        "{body}"
    );
    assert_eq!(stack.tenant(&held).await.unwrap()["status"], "active");

    // A deleted tenant's backup, held: keep_for (3 s) leaves it until the hold is released.
    let gone = unique_name("lg");
    stack.create_tenant(&gone).await.unwrap();
    crate::backups::delete_with_backup(&stack, &gone).await;
    let tombstone = hold(&stack, &gone, &["--reason", "regulator request 88"]).await;
    assert_eq!(tombstone["status"], "deleted", "{tombstone}");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        backups_of(&stack, &gone).await.len(),
        1,
        "kept past keep_for while held"
    );
    assert_eq!(backups_of(&stack, &held).await.len(), 2, "and past keep_last");

    let released = hold(&stack, &gone, &["--release"]).await;
    assert!(released.get("legal_hold").is_none(), "{released}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !backups_of(&stack, &gone).await.is_empty() {
        assert!(Instant::now() < deadline, "released backups expire at the next sweep");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    hold(&stack, &held, &["--release"]).await;
    back_up(&stack, &held).await;
    assert_eq!(backups_of(&stack, &held).await.len(), 1, "keep_last applies again");
    let (code, _, stderr) = stack.siloctl(&["tenant", "delete", &held, "--yes"]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");

    let (status, audit) = stack
        .admin(Method::GET, &format!("/v1/audit?tenant={gone}"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions[..3],
        ["tenant.backup.expire", "tenant.release", "tenant.hold"],
        "{audit}"
    );
    let (status, body) = stack
        .admin(
            Method::POST,
            "/v1/tenants/nobody-here/hold",
            Some(serde_json::json!({"reason": "x"})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    stack.stop().await.unwrap();
}
