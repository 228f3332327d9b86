//! `POST /v1/tenants/{slug}/move` (`siloctl tenant move SLUG --to SERVER`): a tenant's
//! database moves to another PostgreSQL server, its data, API keys and credentials with it;
//! it answers 503 while it moves; a move that fails is undone, and one interrupted after its
//! switch finishes when retried. `siloctl server drain` moves a whole server's tenants.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use silo_tests::pg::TestCluster;
use silo_tests::stack::{Secrets, Stack, StackOptions};
use silo_tests::{secret_connect_options, unique_name};
use sqlx::{ConnectOptions, Connection};

/// A stack with encrypted backups and a second server, `pg-2`, on a cluster of its own, with
/// room for one tenant.
async fn two_server_stack() -> (Stack, TestCluster) {
    two_server_stack_with(Secrets::Local, 1).await
}

/// The same with `secrets` and room for `room` tenants on `pg-2`.
pub(crate) async fn two_server_stack_with(secrets: Secrets, room: u32) -> (Stack, TestCluster) {
    let pg2 = TestCluster::start().await.unwrap();
    let stack = Stack::start(StackOptions {
        extra_toml: format!(
            "[backups]\ndir = \"backups\"\nencryption_key_file = \"backup.key\"\n{}max_tenants = {room}\n",
            pg2.server_toml("pg-2")
        ),
        secrets,
        backup_key: true,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    (stack, pg2)
}

/// Creates a tenant on `pg-1` holding tasks with these titles; returns its API key.
pub(crate) async fn tenant_with_tasks(stack: &Stack, slug: &str, titles: &[&str]) -> String {
    let key = stack
        .create_tenant_with(json!({"slug": slug, "server": "pg-1"}))
        .await
        .unwrap();
    stack.add_tasks(slug, &key, titles).await.unwrap();
    key
}

async fn start_move(stack: &Stack, slug: &str, to: &str) -> (StatusCode, Value) {
    stack
        .admin(
            Method::POST,
            &format!("/v1/tenants/{slug}/move"),
            Some(json!({ "server": to })),
        )
        .await
        .unwrap()
}

/// Whether `pg` has the tenant database `name`, and how many of its roles.
pub(crate) async fn left_on(pg: &TestCluster, name: &str) -> (bool, i64) {
    let mut admin = pg.admin_options("postgres").connect().await.unwrap();
    let database: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    let roles: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE starts_with(rolname, $1)")
        .bind(name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    (database, roles)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_moves_to_another_server_with_its_data_keys_and_credentials() {
    a_tenant_moves_with_its_data_keys_and_credentials(Secrets::Local).await;
}

/// The move's switch writes a new current version of the secret in AWS Secrets Manager too.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_moves_with_its_credentials_in_aws_secrets_manager() {
    a_tenant_moves_with_its_data_keys_and_credentials(Secrets::Aws).await;
}

async fn a_tenant_moves_with_its_data_keys_and_credentials(secrets: Secrets) {
    let (stack, pg2) = two_server_stack_with(secrets, 1).await;
    let slug = unique_name("mv");
    let key = tenant_with_tasks(&stack, &slug, &["first", "second", "third"]).await;
    let (status, minted) = stack
        .admin(
            Method::POST,
            &format!("/v1/tenants/{slug}/keys"),
            Some(json!({"name": "ci"})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{minted}");
    let second_key = minted["api_key"].as_str().unwrap().to_owned();
    let before = stack.credentials(&slug).await.unwrap();

    let (status, body) = start_move(&stack, &slug, "pg-2").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["job"]["kind"], "move");
    let job = stack.wait_job(body["job"]["id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["step"], "cleanup");

    let moved = stack.tenant(&slug).await.unwrap();
    assert_eq!(moved["server"], "pg-2", "{moved}");
    assert_eq!(moved["status"], "active");
    assert!(moved.get("moving_to").is_none(), "{moved}");

    // Served from the new server: the same data, both keys, and new writes.
    assert_eq!(
        stack.served_titles(&slug, &key).await.unwrap(),
        ["first", "second", "third"]
    );
    assert_eq!(
        stack.served_titles(&slug, &second_key).await.unwrap(),
        ["first", "second", "third"]
    );
    let created = stack
        .tenant_request(Method::POST, &format!("{slug}.localhost"), "/api/v1/tasks")
        .bearer_auth(&key)
        .json(&json!({ "title": "after the move" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);

    // The secret names the new server; the login and password are the tenant's own still.
    let after = stack.credentials(&slug).await.unwrap();
    assert_eq!(after["port"], pg2.port(), "{after:?}");
    assert_eq!(after["username"], before["username"]);
    assert_eq!(after["dbname"], before["dbname"]);
    let mut conn = secret_connect_options(&after).connect().await.unwrap();
    let (database, acting): (String, String) = sqlx::query_as("SELECT current_database()::text, current_user::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(database, stack.database_of(&slug).await.unwrap());
    assert!(
        acting.ends_with("_owner"),
        "the login acts as the tenant's owner role: {acting}"
    );
    conn.close().await.unwrap();

    // Nothing of the tenant is left on the old server; the new one has database and roles.
    assert_eq!(left_on(stack.pg(), &database).await, (false, 0));
    let (database_on_new, roles_on_new) = left_on(&pg2, &database).await;
    assert!(database_on_new);
    assert!(roles_on_new >= 2, "owner and login roles on pg-2");

    // The copy went through a backup, which is kept.
    let dump = job["progress"]["backup"].as_str().expect("backup path in progress");
    let copy = std::fs::read(dump).unwrap();
    assert!(copy.starts_with(b"SILOBK"), "the copy is kept encrypted: {dump}");

    // Asking again is refused: the tenant is there already.
    let (status, body) = start_move(&stack, &slug, "pg-2").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "already_on_server");
    stack.stop().await.unwrap();
    pg2.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_moving_tenant_answers_503_and_its_old_credentials_no_longer_log_in() {
    let (stack, pg2) = two_server_stack().await;
    let slug = unique_name("mvf");
    let key = tenant_with_tasks(&stack, &slug, &["kept"]).await;
    let old = stack.credentials(&slug).await.unwrap();
    // Every attempt stops after the fence as an unreachable server would: the job waits to
    // be retried, with the tenant fenced.
    fail::cfg("move-unavailable-after-fence", "return").unwrap();

    let (status, body) = start_move(&stack, &slug, "pg-2").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["job"]["id"].as_i64().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, job) = stack.admin(Method::GET, &format!("/v1/jobs/{id}"), None).await.unwrap();
        if job["state"] == "queued" && !job["error"].is_null() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the move never reached its fence: {job}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(stack.tenant(&slug).await.unwrap()["moving_to"], "pg-2");

    let resp = stack.tenant_get(&slug, &key, "/api/v1/tasks").await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "tenant_unavailable");

    // The old database refuses the tenant's own password while it is being copied.
    let refused = secret_connect_options(&old).connect().await;
    assert!(refused.is_err(), "the fenced database let the tenant's login in");

    // Another job for the tenant, or a rollout, waits for the move; the same move is the
    // same job.
    let (status, body) = stack
        .admin(Method::POST, &format!("/v1/tenants/{slug}/rotate"), Some(json!({})))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = stack
        .admin(Method::POST, "/v1/migrations", Some(json!({})))
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a rollout would migrate the database being copied: {body}"
    );
    assert_eq!(body["error"], "tenant_busy");
    let (status, again) = start_move(&stack, &slug, "pg-2").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["job"]["id"], id);

    fail::remove("move-unavailable-after-fence");
    let job = stack.wait_job(id).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(stack.served_titles(&slug, &key).await.unwrap(), ["kept"]);
    stack.stop().await.unwrap();
    pg2.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_move_is_undone_and_one_interrupted_after_its_switch_finishes_on_retry() {
    let (stack, pg2) = two_server_stack().await;
    let slug = unique_name("mvu");
    let key = tenant_with_tasks(&stack, &slug, &["one", "two"]).await;
    let database = stack.database_of(&slug).await.unwrap();

    // Fails for good once the copy is restored: the move is undone.
    fail::cfg("move-after-step", "return(restore)").unwrap();
    let (status, body) = start_move(&stack, &slug, "pg-2").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["job"]["id"].as_i64().unwrap();
    let job = stack.wait_job(id).await.unwrap();
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["step"], "restore");
    // Undone before the job is recorded as failed.
    let back = stack.tenant(&slug).await.unwrap();
    assert!(back.get("moving_to").is_none(), "{back}");
    assert_eq!(back["server"], "pg-1", "{back}");
    assert_eq!(back["status"], "active", "{back}");
    assert_eq!(stack.served_titles(&slug, &key).await.unwrap(), ["one", "two"]);
    assert_eq!(
        left_on(&pg2, &database).await,
        (false, 0),
        "pg-2 keeps nothing of the tenant"
    );
    // Written after the undo: the retry must copy it too.
    let created = stack
        .tenant_request(Method::POST, &format!("{slug}.localhost"), "/api/v1/tasks")
        .bearer_auth(&key)
        .json(&json!({ "title": "three" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);

    // A retry must find room again: with pg-2 full, the move is refused (503 through the API)
    // and the retried job stops at its fence and is undone.
    let filler = unique_name("fill");
    stack
        .create_tenant_with(json!({"slug": filler, "server": "pg-2"}))
        .await
        .unwrap();
    let (status, body) = start_move(&stack, &slug, "pg-2").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "no_capacity");
    let job = stack.retry_job(id).await.unwrap();
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["step"], "fence", "{job}");
    assert!(job["error"].as_str().unwrap().contains("max_tenants"), "{job}");
    let back = stack.tenant(&slug).await.unwrap();
    assert!(back.get("moving_to").is_none(), "the refused move was undone: {back}");
    assert_eq!(stack.served_titles(&slug, &key).await.unwrap(), ["one", "two", "three"]);
    stack.delete_tenant(&filler).await.unwrap();

    // Interrupted right after the switch: served from pg-2 already; the retry drops the old
    // database.
    fail::cfg("move-after-step", "return(switch)").unwrap();
    let job = stack.retry_job(id).await.unwrap();
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["step"], "switch");
    assert_eq!(stack.tenant(&slug).await.unwrap()["server"], "pg-2");
    assert_eq!(stack.served_titles(&slug, &key).await.unwrap(), ["one", "two", "three"]);
    assert!(
        left_on(stack.pg(), &database).await.0,
        "the old database waits for the retry"
    );

    fail::remove("move-after-step");
    let job = stack.retry_job(id).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(left_on(stack.pg(), &database).await, (false, 0));
    assert_eq!(stack.served_titles(&slug, &key).await.unwrap(), ["one", "two", "three"]);
    stack.stop().await.unwrap();
    pg2.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn moves_that_cannot_be_done_are_refused_with_clear_errors_and_siloctl_moves_a_tenant() {
    let (stack, pg2) = two_server_stack().await;
    let slug = unique_name("mvr");
    stack
        .create_tenant_with(json!({"slug": slug, "server": "pg-1"}))
        .await
        .unwrap();
    for (target, path_slug, status, code) in [
        ("pg-9", slug.as_str(), StatusCode::BAD_REQUEST, "unknown_server"),
        ("pg-1", slug.as_str(), StatusCode::CONFLICT, "already_on_server"),
        ("pg-2", "nobody-here", StatusCode::NOT_FOUND, "tenant_not_found"),
    ] {
        let (got, body) = start_move(&stack, path_slug, target).await;
        assert_eq!(got, status, "{target} {path_slug}: {body}");
        assert_eq!(body["error"], code, "{body}");
    }
    let (got, body) = stack
        .admin(
            Method::POST,
            &format!("/v1/tenants/{slug}/move"),
            Some(json!({"to": "pg-2"})),
        )
        .await
        .unwrap();
    assert_eq!(got, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "invalid_body");
    assert_eq!(stack.tenant(&slug).await.unwrap()["server"], "pg-1");

    // The same through siloctl: one line and exit 2 for a server that does not exist (a
    // usage error, refused with 400), 2 without --to, and a move that waits for its job.
    let (code, stdout, stderr) = stack.siloctl(&["tenant", "move", &slug, "--to", "pg-9"]).await.unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("pg-9"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let (code, _, stderr) = stack.siloctl(&["tenant", "move", &slug]).await.unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    let (code, stdout, stderr) = stack
        .siloctl(&["-o", "json", "tenant", "move", &slug, "--to", "pg-2"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let job: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(job["job"]["state"], "succeeded", "{job}");
    let (code, stdout, _) = stack.siloctl(&["tenant", "show", &slug]).await.unwrap();
    assert_eq!(code, Some(0));
    assert!(
        stdout.lines().any(|l| l.starts_with("server:") && l.ends_with("pg-2")),
        "{stdout}"
    );
    stack.stop().await.unwrap();
    pg2.stop();
}

/// `siloctl server drain pg-1 --to pg-2` moves every active and suspended tenant, two at a
/// time, with its data and keys. One that does not fit on pg-2 stays where it is, named, as
/// does one whose provisioning failed, and the command exits 1; once there is room, running
/// it again finishes. Naming the same server twice, or one that does not exist, is a usage
/// error.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_is_drained_onto_another_and_a_second_run_finishes_it() {
    let (stack, _pg2) = two_server_stack_with(Secrets::Local, 4).await;
    let (a, b, c, d) = (
        unique_name("dra"),
        unique_name("drb"),
        unique_name("drc"),
        unique_name("drd"),
    );
    let key_a = tenant_with_tasks(&stack, &a, &["a's task"]).await;
    let key_c = tenant_with_tasks(&stack, &c, &["c's task"]).await;
    tenant_with_tasks(&stack, &b, &[]).await;
    let (status, body) = stack
        .admin(Method::POST, &format!("/v1/tenants/{b}/suspend"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    tenant_with_tasks(&stack, &d, &[]).await;
    // A tenant whose provisioning failed is not moved.
    let broken = unique_name("drbroken");
    fail::cfg("provision-after-step", "return(roles)").unwrap();
    let (status, body) = stack
        .admin(
            Method::POST,
            "/v1/tenants",
            Some(json!({"slug": broken, "server": "pg-1"})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    stack.wait_job(body["job"]["id"].as_i64().unwrap()).await.unwrap();
    fail::remove("provision-after-step");
    // pg-2 already holds one tenant: room for three of the four.
    let there = unique_name("there");
    stack
        .create_tenant_with(json!({"slug": there, "server": "pg-2"}))
        .await
        .unwrap();

    for (args, needle) in [
        (["server", "drain", "pg-1", "--to", "pg-1"], "another server"),
        (["server", "drain", "pg-9", "--to", "pg-2"], "no server named \"pg-9\""),
    ] {
        let (code, _, stderr) = stack.siloctl(&args).await.unwrap();
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }

    let (code, stdout, stderr) = stack
        .siloctl(&[
            "-o",
            "json",
            "server",
            "drain",
            "pg-1",
            "--to",
            "pg-2",
            "--concurrency",
            "2",
        ])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("2 tenant(s) are still on pg-1"), "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        report["skipped"],
        json!([{"slug": broken, "status": "failed"}]),
        "{report}"
    );
    let moved = report["moved"].as_array().unwrap();
    let failed = report["failed"].as_array().unwrap();
    assert_eq!((moved.len(), failed.len()), (3, 1), "{report}");
    assert!(failed[0]["error"].as_str().unwrap().contains("no_capacity"), "{report}");
    let left = failed[0]["slug"].as_str().unwrap().to_owned();
    assert_eq!(stack.tenant(&left).await.unwrap()["server"], "pg-1");
    for slug in moved.iter().map(|m| m["slug"].as_str().unwrap()) {
        assert_eq!(stack.tenant(slug).await.unwrap()["server"], "pg-2", "{slug}");
    }

    // Room for one more, and the failed tenant deleted: the same command moves the one left.
    for slug in [&there, &broken] {
        stack.delete_tenant(slug).await.unwrap();
    }
    let (code, stdout, stderr) = stack
        .siloctl(&["server", "drain", "pg-1", "--to", "pg-2"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains(&format!("moved {left} to pg-2")), "{stdout}");
    assert!(stdout.contains("pg-1 drained: 1 tenant(s) moved to pg-2"), "{stdout}");
    let (_, on_pg1) = stack.admin(Method::GET, "/v1/tenants?server=pg-1", None).await.unwrap();
    assert_eq!(on_pg1["items"], json!([]), "{on_pg1}");

    // Data and keys moved with them; the suspended tenant is still suspended.
    for slug in [&a, &b, &c, &d] {
        assert_eq!(stack.tenant(slug).await.unwrap()["server"], "pg-2", "{slug}");
    }
    assert_eq!(stack.served_titles(&a, &key_a).await.unwrap(), ["a's task"]);
    assert_eq!(stack.served_titles(&c, &key_c).await.unwrap(), ["c's task"]);
    assert_eq!(stack.tenant(&b).await.unwrap()["status"], "suspended");
    stack.stop().await.unwrap();
}
