//! `siloctl tenant restore SLUG --from FILE --yes` (`POST /v1/tenants/{slug}/restore`): a
//! tenant's data put back in place as one of its backups holds it, the data it had kept in a
//! backup first; the tenant answers 503 meanwhile; a restore that fails puts the data back
//! and serves the tenant again.

use std::path::PathBuf;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;

use crate::backups::{restore, titles_in};

async fn stack_with_backups() -> Stack {
    Stack::start(StackOptions {
        extra_toml: "[backups]\ndir = \"backups\"\n".into(),
        ..StackOptions::default()
    })
    .await
    .unwrap()
}

/// A tenant holding tasks `before`, a backup of it, then tasks `after` added; its API key and
/// the backup's path.
async fn tenant_changed_since_its_backup(
    stack: &Stack,
    slug: &str,
    before: &[&str],
    after: &[&str],
) -> (String, PathBuf) {
    let key = stack.create_tenant(slug).await.unwrap();
    stack.add_tasks(slug, &key, before).await.unwrap();
    let (code, stdout, stderr) = stack.siloctl(&["-o", "json", "tenant", "backup", slug]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let job: Value = serde_json::from_str(&stdout).unwrap();
    let backup = PathBuf::from(job["job"]["progress"]["backup"].as_str().unwrap());
    stack.add_tasks(slug, &key, after).await.unwrap();
    (key, backup)
}

fn file_name(path: &std::path::Path) -> &str {
    path.file_name().unwrap().to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_is_restored_in_place_and_the_data_it_had_is_kept_in_a_backup() {
    let stack = stack_with_backups().await;
    let slug = unique_name("rs");
    let (key, backup) =
        tenant_changed_since_its_backup(&stack, &slug, &["kept 1", "kept 2"], &["written after the backup"]).await;
    // A key made after the backup: the restored data does not have it.
    let (code, stdout, stderr) = stack
        .siloctl(&["-o", "json", "tenant", "key", "create", &slug, "--name", "later"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let later_key = serde_json::from_str::<Value>(&stdout).unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, before, _) = stack.siloctl(&["-o", "json", "tenant", "show", &slug]).await.unwrap();
    let before: Value = serde_json::from_str(&before).unwrap();

    let (code, _, stderr) = stack
        .siloctl(&["tenant", "restore", &slug, "--from", file_name(&backup)])
        .await
        .unwrap();
    assert_eq!(code, Some(2), "without --yes: {stderr}");
    assert!(
        stderr.contains("--yes") && stderr.trim().lines().count() == 1,
        "{stderr}"
    );
    let (code, stdout, stderr) = stack
        .siloctl(&[
            "-o",
            "json",
            "tenant",
            "restore",
            &slug,
            "--from",
            backup.to_str().unwrap(),
            "--yes",
        ])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let job = &serde_json::from_str::<Value>(&stdout).unwrap()["job"];
    assert_eq!(job["kind"], "restore", "{job}");
    assert_eq!(job["state"], "succeeded", "{job}");

    assert_eq!(
        served_again(&stack, &slug, &key).await,
        ["kept 1", "kept 2"],
        "the backup's data is served"
    );
    let resp = stack.tenant_get(&slug, &later_key, "/api/v1/me").await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "a key the backup did not have");
    let (_, after, _) = stack.siloctl(&["-o", "json", "tenant", "show", &slug]).await.unwrap();
    let after: Value = serde_json::from_str(&after).unwrap();
    for field in [
        "name",
        "plan",
        "server",
        "database",
        "domains",
        "schema_version",
        "status",
    ] {
        assert_eq!(after[field], before[field], "{field}: {after}");
    }
    assert!(after.get("restoring_from").is_none(), "{after}");

    // What the tenant had before is in the backup the job took first.
    let kept_aside = PathBuf::from(job["progress"]["backup"].as_str().expect("the job's backup"));
    assert_ne!(kept_aside, backup);
    let scratch = restore(&stack, &kept_aside).await;
    assert_eq!(
        titles_in(stack.pg(), &scratch).await,
        ["kept 1", "kept 2", "written after the backup"]
    );
    let (status, audit) = stack
        .admin(
            Method::GET,
            &format!("/v1/audit?tenant={slug}&action=tenant.restore"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(audit["items"][0]["detail"]["backup"], file_name(&backup), "{audit}");

    // Only the tenant's own backups, of a live tenant.
    let (code, _, stderr) = stack
        .siloctl(&["tenant", "restore", &slug, "--from", "nope.dump", "--yes"])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("backup_not_found"), "{stderr}");
    let (status, body) = stack
        .admin(
            Method::POST,
            "/v1/tenants/nobody-here/restore",
            Some(json!({"backup": file_name(&backup)})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restoring_tenant_answers_503_and_a_failed_restore_puts_its_data_back() {
    let stack = stack_with_backups().await;
    let slug = unique_name("rf");
    let (key, backup) = tenant_changed_since_its_backup(&stack, &slug, &["old"], &["new"]).await;

    // The job stops twice after its own backup and resumes 1 s, then 2 s later: meanwhile,
    // from the moment it is queued (as soon as the router hears of it), the tenant is not
    // served.
    fail::cfg("restore-unavailable-after-backup", "2*return").unwrap();
    let (status, body) = stack
        .admin(
            Method::POST,
            &format!("/v1/tenants/{slug}/restore"),
            Some(json!({"backup": file_name(&backup)})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let resp = loop {
        let resp = stack.tenant_get(&slug, &key, "/api/v1/me").await.unwrap();
        if resp.status() != StatusCode::OK || std::time::Instant::now() > deadline {
            break resp;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    let job = stack.wait_job(body["job"]["id"].as_i64().unwrap()).await.unwrap();
    fail::remove("restore-unavailable-after-backup");
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 3, "resumed twice: {job}");
    assert_eq!(served_again(&stack, &slug, &key).await, ["old"]);

    // A backup that cannot be restored (cut in half): the job fails, the data the tenant had
    // is put back, and it is served again.
    stack.add_tasks(&slug, &key, &["newer"]).await.unwrap();
    let bytes = std::fs::read(&backup).unwrap();
    let broken = backup.with_file_name(format!("{slug}-20990101T000000Z-job999999.dump"));
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).unwrap();
    let (code, _, stderr) = stack
        .siloctl(&["tenant", "restore", &slug, "--from", file_name(&broken), "--yes"])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("pg_restore"), "{stderr}");
    assert_eq!(
        served_again(&stack, &slug, &key).await,
        ["old", "newer"],
        "served with the data it had"
    );
    let (_, shown, _) = stack.siloctl(&["-o", "json", "tenant", "show", &slug]).await.unwrap();
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["status"], "active", "{shown}");
    assert!(shown.get("restoring_from").is_none(), "{shown}");
    stack.stop().await.unwrap();
}

/// Asks for a restore of `slug` from `backup` and waits for the job, which fails; its id.
async fn failed_restore(stack: &Stack, slug: &str, backup: &std::path::Path) -> i64 {
    let (status, body) = stack
        .admin(
            Method::POST,
            &format!("/v1/tenants/{slug}/restore"),
            Some(json!({"backup": file_name(backup)})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job = stack.wait_job(body["job"]["id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(job["state"], "failed", "{job}");
    job["id"].as_i64().unwrap()
}

/// The titles served for `slug` once it is served again (a failed job is undone before it
/// is recorded as failed; the router hears of it by notification).
async fn served_again(stack: &Stack, slug: &str, key: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match stack.served_titles(slug, key).await {
            Ok(titles) => return titles,
            Err(e) if std::time::Instant::now() > deadline => panic!("not served again: {e}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

/// `siloctl jobs retry ID`, and the job succeeds.
async fn retry(stack: &Stack, id: i64) {
    let (code, _, stderr) = stack.siloctl(&["jobs", "retry", &id.to_string()]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let job = stack.wait_job(id).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
}

/// A restore job stopped for good (a fail point) and retried by an operator: stopped before
/// its end, it starts over and restores; stopped after the tenant was served again, it is
/// done and does not restore a second time over what was written since.
#[tokio::test(flavor = "multi_thread")]
async fn a_retried_restore_starts_over_or_is_done_but_never_restores_twice() {
    let stack = stack_with_backups().await;
    let slug = unique_name("rr");
    let (key, backup) = tenant_changed_since_its_backup(&stack, &slug, &["old"], &["new"]).await;
    fail::cfg("restore-after-step", "return(backup)").unwrap();
    let id = failed_restore(&stack, &slug, &backup).await;
    fail::remove("restore-after-step");
    assert_eq!(
        served_again(&stack, &slug, &key).await,
        ["old", "new"],
        "undone: served as it was"
    );
    retry(&stack, id).await;
    assert_eq!(served_again(&stack, &slug, &key).await, ["old"], "restored on retry");

    stack.add_tasks(&slug, &key, &["new again"]).await.unwrap();
    fail::cfg("restore-after-step", "return(unfence)").unwrap();
    let id = failed_restore(&stack, &slug, &backup).await;
    fail::remove("restore-after-step");
    assert_eq!(
        served_again(&stack, &slug, &key).await,
        ["old"],
        "restored, then stopped"
    );
    stack
        .add_tasks(&slug, &key, &["written after the restore"])
        .await
        .unwrap();
    retry(&stack, id).await;
    assert_eq!(
        served_again(&stack, &slug, &key).await,
        ["old", "written after the restore"],
        "not restored a second time"
    );
    stack.stop().await.unwrap();
}
