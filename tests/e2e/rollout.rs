//! Fleet migrations: canaries, failures that keep their tenant's version, resuming, a
//! control plane restarted mid-rollout, a rollout stopped by an operator, template
//! onboarding, serving during a migration.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use sqlx::{ConnectOptions, Connection};

const MARKER: &str = "fail-migration";

/// A migrations dir with the shipped first migration.
fn migrations_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/tenant/0001_init.sql");
    std::fs::copy(shipped, dir.path().join("0001_init.sql")).unwrap();
    dir
}

/// Adds migration 2: raises in databases holding a marker task, else adds a column (and
/// sleeps `sleep_ms`, to make the rollout observable).
fn add_failing_migration(dir: &Path, sleep_ms: u64) {
    let sql = format!(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM tasks WHERE title = '{MARKER}') THEN \
         RAISE EXCEPTION 'marker row found'; END IF; END $$;\n\
         SELECT pg_sleep({});\n\
         ALTER TABLE tasks ADD COLUMN priority integer NOT NULL DEFAULT 0;\n",
        sleep_ms as f64 / 1000.0
    );
    std::fs::write(dir.join("0002_priority.sql"), sql).unwrap();
}

async fn stack_with(dir: &Path) -> Stack {
    let options = StackOptions {
        tenant_migrations_dir: Some(PathBuf::from(dir)),
        ..StackOptions::default()
    };
    Stack::start(options).await.unwrap()
}

async fn tenant_sql(stack: &Stack, slug: &str, sql: &str) {
    let db = stack.database_of(slug).await.unwrap();
    let mut conn = stack.pg().admin_options(&db).connect().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}

async fn versions(stack: &Stack, slugs: &[String]) -> Vec<i64> {
    let mut out = Vec::new();
    for slug in slugs {
        let (_, t) = stack
            .admin(Method::GET, &format!("/v1/tenants/{slug}"), None)
            .await
            .unwrap();
        out.push(t["schema_version"].as_i64().unwrap());
    }
    out
}

async fn rollout(stack: &Stack, body: Value) -> Value {
    let (status, started) = stack.admin(Method::POST, "/v1/migrations", Some(body)).await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    wait_long(stack, started["job"]["id"].as_i64().unwrap()).await
}

async fn wait_long(stack: &Stack, id: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, job) = stack.admin(Method::GET, &format!("/v1/jobs/{id}"), None).await.unwrap();
        if matches!(job["state"].as_str(), Some("succeeded" | "failed")) {
            return job;
        }
        assert!(Instant::now() < deadline, "rollout did not finish: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every table of `slug`'s database belongs to its owner role, and its key creates a task
/// through the router.
async fn assert_owned_and_served(stack: &Stack, slug: &str, key: &str) {
    let db = stack.database_of(slug).await.unwrap();
    let mut conn = stack.pg().admin_options(&db).connect().await.unwrap();
    let owners: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT tableowner::text FROM pg_tables WHERE schemaname = 'public'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(owners, [format!("{db}_owner")]);
    conn.close().await.unwrap();
    let resp = stack
        .tenant_request(Method::POST, &format!("{slug}.localhost"), "/api/v1/tasks")
        .bearer_auth(key)
        .json(&json!({"title": "a task"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread")]
async fn canary_failures_stop_tenant_failures_are_isolated_and_reruns_resume() {
    let dir = migrations_dir();
    let stack = stack_with(dir.path()).await;
    let slugs: Vec<String> = (0..20).map(|i| unique_name(&format!("fleet{i:02}x"))).collect();
    for slug in &slugs {
        stack.create_tenant(slug).await.unwrap();
    }
    assert_eq!(versions(&stack, &slugs).await, vec![1; 20]);
    add_failing_migration(dir.path(), 0);
    let (_, status) = stack.admin(Method::GET, "/v1/migrations/status", None).await.unwrap();
    assert_eq!(status["target_version"], 2);

    // A failing canary stops the rollout before any other tenant is touched.
    tenant_sql(
        &stack,
        &slugs[0],
        &format!("INSERT INTO tasks (title) VALUES ('{MARKER}')"),
    )
    .await;
    let job = rollout(&stack, json!({"tenants": slugs, "canary": 1, "concurrency": 4})).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap().contains("canary"), "{job}");
    assert_eq!(
        versions(&stack, &slugs).await,
        vec![1; 20],
        "nothing beyond the canary ran"
    );

    // Clean canary, three bad tenants: they fail and keep version 1, the rest reach 2.
    tenant_sql(
        &stack,
        &slugs[0],
        &format!("DELETE FROM tasks WHERE title = '{MARKER}'"),
    )
    .await;
    let bad = [3usize, 9, 15];
    for i in bad {
        tenant_sql(
            &stack,
            &slugs[i],
            &format!("INSERT INTO tasks (title) VALUES ('{MARKER}')"),
        )
        .await;
    }
    let job = rollout(&stack, json!({"tenants": slugs, "canary": 1, "concurrency": 4})).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["progress"]["failed"], 3, "{job}");
    assert_eq!(job["progress"]["total"], 20, "{job}");
    for i in bad {
        assert!(job["error"].as_str().unwrap().contains(&slugs[i]), "{job}");
    }
    let expected: Vec<i64> = (0..20).map(|i| if bad.contains(&i) { 1 } else { 2 }).collect();
    assert_eq!(versions(&stack, &slugs).await, expected);
    let job_id = job["id"].as_i64().unwrap();
    let runs: Vec<(String, i64, i64, String, Option<String>)> = sqlx::query_as(
        "SELECT slug, from_version, to_version, outcome, error FROM migration_runs WHERE job_id = $1 AND outcome = 'failed' ORDER BY slug",
    )
    .bind(job_id)
    .fetch_all(stack.catalog())
    .await
    .unwrap();
    assert_eq!(runs.len(), 3);
    for (slug, from, to, _, error) in &runs {
        assert_eq!((*from, *to), (1, 1), "{slug}");
        assert!(error.as_deref().unwrap().contains("marker row found"), "{error:?}");
    }
    let (_, status) = stack.admin(Method::GET, "/v1/migrations/status", None).await.unwrap();
    let at_one = status["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["schema_version"] == 1)
        .count();
    assert_eq!(at_one, 3);

    // Fix the data, run again: only the three are migrated, the rest are skipped.
    for i in bad {
        tenant_sql(
            &stack,
            &slugs[i],
            &format!("DELETE FROM tasks WHERE title = '{MARKER}'"),
        )
        .await;
    }
    let job = rollout(&stack, json!({"tenants": slugs})).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["progress"]["skipped"], 17, "{job}");
    assert_eq!(versions(&stack, &slugs).await, vec![2; 20]);
    let touched: i64 = sqlx::query_scalar("SELECT count(*) FROM migration_runs WHERE job_id = $1")
        .bind(job["id"].as_i64().unwrap())
        .fetch_one(stack.catalog())
        .await
        .unwrap();
    assert_eq!(touched, 3);

    // A tenant created now comes from the new template, at version 2, owned by its owner.
    let fresh = unique_name("fresh");
    let key = stack.create_tenant(&fresh).await.unwrap();
    assert_eq!(versions(&stack, std::slice::from_ref(&fresh)).await, vec![2]);
    let mut admin = stack.pg().admin_options("postgres").connect().await.unwrap();
    let templates: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datistemplate AND datname LIKE 'silo\\_template\\_%'",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(templates.len(), 1, "{templates:?}");
    assert!(templates[0].starts_with("silo_template_v2_"), "{templates:?}");
    assert_owned_and_served(&stack, &fresh, &key).await;
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_resumes_after_the_control_plane_restarts() {
    let dir = migrations_dir();
    let mut stack = stack_with(dir.path()).await;
    let slugs: Vec<String> = (0..20).map(|i| unique_name(&format!("resume{i:02}x"))).collect();
    for slug in &slugs {
        stack.create_tenant(slug).await.unwrap();
    }
    add_failing_migration(dir.path(), 150);
    let (status, started) = stack
        .admin(
            Method::POST,
            "/v1/migrations",
            Some(json!({"concurrency": 1, "canary": 1})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = started["job"]["id"].as_i64().unwrap();
    // Wait until the rollout is under way, then kill the control plane.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let migrated: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants WHERE schema_version = 2")
            .fetch_one(stack.catalog())
            .await
            .unwrap();
        if migrated >= 3 {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The job's progress (what `siloctl migrate` draws its bar from) moves as tenants finish,
    // not only when a phase ends.
    let progress = loop {
        let (_, job) = stack.admin(Method::GET, &format!("/v1/jobs/{id}"), None).await.unwrap();
        let progress = job["progress"].clone();
        if progress["done"].as_u64().is_some_and(|done| done >= 3) {
            break progress;
        }
        assert!(Instant::now() < deadline, "progress did not move: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(progress["phase"], "rollout", "{progress}");
    assert!(progress["done"].as_u64() < Some(20), "{progress}");
    stack.restart_control_plane().await.unwrap();
    let at_restart: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants WHERE schema_version = 2")
        .fetch_one(stack.catalog())
        .await
        .unwrap();
    assert!(at_restart < 20, "the restart happened mid-rollout ({at_restart} done)");
    let job = wait_long(&stack, id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(
        job["attempts"].as_i64().unwrap() >= 2,
        "the job was claimed again: {job}"
    );
    assert_eq!(versions(&stack, &slugs).await, vec![2; 20]);
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_serves_requests_while_it_is_migrated() {
    let dir = migrations_dir();
    let stack = stack_with(dir.path()).await;
    let slug = unique_name("busy");
    let key = stack.create_tenant(&slug).await.unwrap();
    add_failing_migration(dir.path(), 1500);
    let (status, started) = stack
        .admin(Method::POST, "/v1/migrations", Some(json!({"tenants": [slug]})))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = started["job"]["id"].as_i64().unwrap();
    let host = format!("{slug}.localhost");
    let mut served = 0;
    loop {
        let (_, job) = stack.admin(Method::GET, &format!("/v1/jobs/{id}"), None).await.unwrap();
        if job["state"] == "succeeded" {
            break;
        }
        assert_ne!(job["state"], "failed", "{job}");
        let resp = stack
            .tenant_request(Method::GET, &host, "/api/v1/tasks")
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        served += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served >= 10, "requests were served during the migration ({served})");
    assert_eq!(versions(&stack, &[slug]).await, vec![2]);
    stack.stop().await.unwrap();
}

/// Claimable spare databases on the stack's server: (name, oid), and whether PUBLIC may
/// connect to any of them.
async fn spares(stack: &Stack) -> (Vec<(String, i64)>, bool) {
    let mut admin = stack.pg().admin_options("postgres").connect().await.unwrap();
    let spares: Vec<(String, i64)> = sqlx::query_as(
        "SELECT datname::text, oid::int8 FROM pg_database WHERE starts_with(datname::text, 'silo_spare_') ORDER BY 1",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    let public: bool = sqlx::query_scalar(
        "SELECT COALESCE(bool_or(has_database_privilege('public', datname, 'CONNECT')), false) \
         FROM pg_database WHERE starts_with(datname::text, 'silo_spare_')",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    (spares, public)
}

async fn until_spares(stack: &Stack, count: usize) -> Vec<(String, i64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (spares, public) = spares(stack).await;
        assert!(!public, "PUBLIC may connect to a spare database");
        if spares.len() == count {
            return spares;
        }
        assert!(Instant::now() < deadline, "{} spares, expected {count}", spares.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn onboarding_takes_a_spare_database_and_the_spares_refill() {
    let stack = std::sync::Arc::new(Stack::start(StackOptions::default()).await.unwrap());
    let ready = until_spares(&stack, stack.config().migrations.spare_databases).await;

    // The tenant's database is one of the spares, renamed: same oid, new name, its owner's.
    let slug = unique_name("spare");
    let key = stack.create_tenant(&slug).await.unwrap();
    let db = stack.database_of(&slug).await.unwrap();
    let mut admin = stack.pg().admin_options("postgres").connect().await.unwrap();
    let (oid, owner): (i64, String) =
        sqlx::query_as("SELECT oid::int8, pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1")
            .bind(&db)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert!(
        ready.iter().any(|(_, spare)| *spare == oid),
        "{db} is not one of {ready:?}"
    );
    assert_eq!(owner, format!("{db}_owner"));
    assert_owned_and_served(&stack, &slug, &key).await;

    // Spares are made again; more tenants at once than there are spares all succeed.
    until_spares(&stack, ready.len()).await;
    let burst: Vec<String> = (0..ready.len() + 2).map(|_| unique_name("burst")).collect();
    let creations: Vec<_> = burst
        .iter()
        .map(|slug| {
            let (stack, slug) = (stack.clone(), slug.clone());
            tokio::spawn(async move { stack.create_tenant(&slug).await.unwrap() })
        })
        .collect();
    for (slug, creation) in burst.iter().zip(creations) {
        let key = creation.await.unwrap();
        let resp = stack.tenant_get(slug, &key, "/api/v1/tasks").await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{slug}");
    }
    assert_eq!(versions(&stack, &burst).await, vec![1; burst.len()]);
    until_spares(&stack, ready.len()).await;
    std::sync::Arc::into_inner(stack).unwrap().stop().await.unwrap();
}

/// An operator stops a running rollout with `siloctl jobs cancel`: the tenant being migrated
/// finishes, no other starts, the job ends failed saying who stopped it, and `jobs retry`
/// finishes the fleet. A queued job with nothing done yet is cancelled outright; an ended one,
/// or a running job of another kind, is not.
#[tokio::test(flavor = "multi_thread")]
async fn an_operator_stops_a_rollout_and_a_retry_finishes_it() {
    let dir = migrations_dir();
    let stack = stack_with(dir.path()).await;
    let slugs: Vec<String> = (0..8).map(|i| unique_name(&format!("stop{i}x"))).collect();
    for slug in &slugs {
        stack.create_tenant(slug).await.unwrap();
    }
    add_failing_migration(dir.path(), 600);
    let (status, started) = stack
        .admin(
            Method::POST,
            "/v1/migrations",
            Some(json!({"tenants": slugs, "canary": 1, "concurrency": 1})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let id = started["job"]["id"].as_i64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, job) = stack.admin(Method::GET, &format!("/v1/jobs/{id}"), None).await.unwrap();
        if job["progress"]["done"].as_u64() >= Some(2) {
            break;
        }
        assert!(Instant::now() < deadline, "the rollout did not get going: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (code, stdout, stderr) = stack
        .siloctl(&["-o", "json", "jobs", "cancel", &id.to_string()])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let job: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(job["job"]["state"], "failed", "{job}");
    let error = job["job"]["error"].as_str().unwrap();
    assert!(error.starts_with("cancelled by bootstrap:"), "{error}");
    let reached = versions(&stack, &slugs).await;
    let migrated = reached.iter().filter(|v| **v == 2).count();
    assert!((2..slugs.len()).contains(&migrated), "stopped partway: {reached:?}");
    assert!(reached.iter().all(|v| matches!(v, 1 | 2)), "{reached:?}");
    let (_, audit) = stack
        .admin(Method::GET, "/v1/audit?action=job.cancel", None)
        .await
        .unwrap();
    assert_eq!(audit["items"][0]["detail"], json!({"job": id, "kind": "migrate"}));

    // Cancelled once, ended: nothing more to cancel; the retry finishes the fleet.
    let (code, _, stderr) = stack.siloctl(&["jobs", "cancel", &id.to_string()]).await.unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("invalid_state"), "{stderr}");
    let (status, body) = stack
        .admin(Method::POST, &format!("/v1/jobs/{id}/retry"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job = wait_long(&stack, id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(versions(&stack, &slugs).await, vec![2; slugs.len()]);

    // A backup not due for an hour is cancelled before it starts.
    let queued: i64 = sqlx::query_scalar(
        "INSERT INTO jobs (kind, tenant, run_after) VALUES ('backup', $1, now() + interval '1 hour') RETURNING id",
    )
    .bind(&slugs[0])
    .fetch_one(stack.catalog())
    .await
    .unwrap();
    let (status, body) = stack
        .admin(Method::POST, &format!("/v1/jobs/{queued}/cancel"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (&body["job"]["state"], &body["job"]["error"]),
        (&json!("failed"), &json!("cancelled by bootstrap before it started"))
    );
    // A running job of another kind is never stopped halfway.
    let running: i64 = sqlx::query_scalar(
        "INSERT INTO jobs (kind, tenant, state, locked_by, locked_until) \
         VALUES ('move', $1, 'running', 'elsewhere', now() + interval '1 hour') RETURNING id",
    )
    .bind(&slugs[1])
    .fetch_one(stack.catalog())
    .await
    .unwrap();
    let (status, body) = stack
        .admin(Method::POST, &format!("/v1/jobs/{running}/cancel"), None)
        .await
        .unwrap();
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::CONFLICT, &json!("not_cancellable")),
        "{body}"
    );
    stack.stop().await.unwrap();
}
