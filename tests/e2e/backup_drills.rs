//! `siloctl tenant verify-backup SLUG [--from FILE]` (`POST /v1/tenants/{slug}/backups/verify`):
//! a restore drill — the backup is restored into a scratch database beside the tenant, what
//! it holds is counted into the job, and the scratch database is dropped, whether the drill
//! passed or failed; the tenant keeps serving.

use std::path::PathBuf;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use sqlx::{ConnectOptions, Connection};

/// Tables and rows in `database` (every schema but the system ones), counted as the
/// superuser.
async fn tables_and_rows(stack: &Stack, database: &str) -> (usize, i64) {
    let mut conn = stack.pg().admin_options(database).connect().await.unwrap();
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT schemaname::text, tablename::text FROM pg_tables \
         WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let mut rows = 0;
    for (schema, table) in &tables {
        let sql = format!("SELECT count(*) FROM \"{schema}\".\"{table}\"");
        let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        rows += count;
    }
    conn.close().await.unwrap();
    (tables.len(), rows)
}

/// The scratch databases of drills left on the cluster.
async fn scratch_databases(stack: &Stack) -> Vec<String> {
    let mut conn = stack.pg().admin_options("postgres").connect().await.unwrap();
    let names = sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE datname LIKE 'silo_verify_%'")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_is_proved_by_a_restore_beside_the_tenant_and_a_bad_one_fails_the_drill() {
    let stack = Stack::start(StackOptions {
        extra_toml: "[backups]\ndir = \"backups\"\nencryption_key_file = \"backup.key\"\n".into(),
        backup_key: true,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let slug = unique_name("vb");
    let key = stack.create_tenant(&slug).await.unwrap();
    stack.add_tasks(&slug, &key, &["one", "two", "three"]).await.unwrap();

    let (code, _, stderr) = stack.siloctl(&["tenant", "verify-backup", &slug]).await.unwrap();
    assert_eq!(code, Some(1), "no backup yet: {stderr}");
    assert!(stderr.contains("backup_not_found"), "{stderr}");

    let (code, stdout, stderr) = stack.siloctl(&["-o", "json", "tenant", "backup", &slug]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let taken: Value = serde_json::from_str(&stdout).unwrap();
    let backup = PathBuf::from(taken["job"]["progress"]["backup"].as_str().unwrap());
    let (tables, rows) = tables_and_rows(&stack, &stack.database_of(&slug).await.unwrap()).await;

    let (code, stdout, stderr) = stack
        .siloctl(&["-o", "json", "tenant", "verify-backup", &slug])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let job = &serde_json::from_str::<Value>(&stdout).unwrap()["job"];
    assert_eq!(
        (&job["kind"], &job["state"]),
        (&"verify".into(), &"succeeded".into()),
        "{job}"
    );
    let progress = &job["progress"];
    assert_eq!(
        progress["backup"],
        backup.file_name().unwrap().to_str().unwrap(),
        "the newest backup by default: {job}"
    );
    let tenant = stack.tenant(&slug).await.unwrap();
    assert_eq!(
        progress["restored"]["schema_version"], tenant["schema_version"],
        "{job}"
    );
    assert_eq!(
        (&progress["restored"]["tables"], &progress["restored"]["rows"]),
        (&Value::from(tables), &Value::from(rows)),
        "what the backup holds is what the tenant held: {job}"
    );
    assert_eq!(scratch_databases(&stack).await, Vec::<String>::new());
    let (status, audit) = stack
        .admin(
            Method::GET,
            &format!("/v1/audit?tenant={slug}&action=tenant.backup.verify"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(audit["items"][0]["detail"]["job"], job["id"], "{audit}");

    // A backup cut short fails the drill, which still drops its scratch database.
    let bytes = std::fs::read(&backup).unwrap();
    let cut = backup.with_file_name(format!("{slug}-20250101T000000Z-job999999.dump"));
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (code, stdout, stderr) = stack
        .siloctl(&[
            "-o",
            "json",
            "tenant",
            "verify-backup",
            &slug,
            "--from",
            cut.file_name().unwrap().to_str().unwrap(),
        ])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stderr.contains("step restore"), "{stderr}");
    assert_eq!(scratch_databases(&stack).await, Vec::<String>::new());

    // The listing says which backups a drill proved.
    let (code, stdout, stderr) = stack
        .siloctl(&["-o", "json", "tenant", "backups", &slug])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    let mut verified: Vec<(String, bool)> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["file"].as_str().unwrap().to_owned(), b["verified_at"].is_string()))
        .collect();
    verified.sort();
    assert_eq!(
        verified,
        [
            (cut.file_name().unwrap().to_string_lossy().into_owned(), false),
            (backup.file_name().unwrap().to_string_lossy().into_owned(), true),
        ],
        "{listed}"
    );
    let (code, _, stderr) = stack
        .siloctl(&["tenant", "verify-backup", &slug, "--from", "nothing-like-it.dump"])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("backup_not_found"), "{stderr}");

    // The tenant served throughout, and still does.
    let served = stack.tenant_get(&slug, &key, "/api/v1/tasks").await.unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    stack.stop().await.unwrap();
}

/// The jobs of `kind` for `slug`, as the admin API lists them.
async fn jobs_of(stack: &Stack, kind: &str, slug: &str) -> Vec<Value> {
    let (status, jobs) = stack.admin(Method::GET, "/v1/jobs", None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    jobs["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|job| job["kind"] == kind && job["tenant"] == slug)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_drills_run_on_schedule_for_tenants_with_a_backup() {
    let stack = Stack::start(StackOptions {
        extra_toml: "[backups]\ndir = \"backups\"\nverify_every = \"3s\"\n".into(),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let drilled = unique_name("vd");
    let key = stack.create_tenant(&drilled).await.unwrap();
    stack.add_tasks(&drilled, &key, &["drilled"]).await.unwrap();
    let never = unique_name("vn");
    stack.create_tenant(&never).await.unwrap();
    let (code, _, stderr) = stack.siloctl(&["tenant", "backup", &drilled]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let succeeded = loop {
        let done: Vec<Value> = jobs_of(&stack, "verify", &drilled)
            .await
            .into_iter()
            .filter(|job| job["state"] == "succeeded")
            .collect();
        if done.len() >= 2 || std::time::Instant::now() > deadline {
            break done;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert!(succeeded.len() >= 2, "a drill every 3 s: {succeeded:?}");
    assert!(
        succeeded[0]["progress"]["restored"]["rows"].as_i64().unwrap() > 0,
        "{succeeded:?}"
    );
    assert_eq!(
        jobs_of(&stack, "verify", &never).await,
        Vec::<Value>::new(),
        "no backup, no drill"
    );
    let (status, audit) = stack
        .admin(
            Method::GET,
            &format!("/v1/audit?tenant={drilled}&action=tenant.backup.verify"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(audit["items"][0]["actor"], "scheduler", "{audit}");
    let metrics = stack.control_plane_metrics().await.unwrap();
    let unverified: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("silo_backup_unverified_seconds_max "))
        .unwrap_or_else(|| panic!("{metrics}"))
        .parse()
        .unwrap();
    assert!(unverified < 30.0, "drilled seconds ago: {unverified}");
    stack.stop().await.unwrap();
}
