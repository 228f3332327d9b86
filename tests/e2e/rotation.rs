//! Credential rotation, on both secret stores: the four AWS steps as a resumable job, both
//! strategies, stages afterwards, old credentials retired, zero failed requests under load,
//! and the schedule running exactly once across control planes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use silo_control_plane::rotation::ROTATE_STEPS;
use silo_control_plane::secrets::{self, SecretStore, AWSCURRENT, AWSPENDING, AWSPREVIOUS};
use silo_control_plane::server::ControlPlane;
use silo_tests::stack::{Secrets, Stack, StackOptions};
use silo_tests::{secret_connect_options, unique_name};
use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

/// A stack whose tenants are never rate limited: the load tests send requests back to back.
async fn stack(secrets: Secrets) -> Stack {
    Stack::start(StackOptions {
        secrets,
        extra_toml: "[router.plans.standard]\nrequests_per_second = 1000000\nburst = 1000000\n".into(),
        ..StackOptions::default()
    })
    .await
    .unwrap()
}

async fn store(stack: &Stack) -> Arc<dyn SecretStore> {
    secrets::open(&stack.config().secrets, stack.catalog().clone())
        .await
        .unwrap()
}

async fn logs_in(creds: &Value) -> bool {
    match secret_connect_options(creds).connect().await {
        Ok(c) => {
            c.close().await.unwrap();
            true
        }
        Err(e) => {
            assert!(e.to_string().contains("password authentication failed"), "{e}");
            false
        }
    }
}

async fn assert_stages_after_rotation(stack: &Stack, store: &dyn SecretStore, slug: &str, old_version: &str) -> String {
    let versions = store
        .list_version_stages(&stack.secret_name(slug))
        .await
        .unwrap()
        .unwrap();
    let with = |stage: &str| {
        versions
            .iter()
            .filter(|v| v.stages.iter().any(|s| s == stage))
            .collect::<Vec<_>>()
    };
    assert_eq!(with(AWSPENDING).len(), 0, "no AWSPENDING left: {versions:?}");
    assert_eq!(with(AWSPREVIOUS).len(), 1, "{versions:?}");
    assert_eq!(with(AWSPREVIOUS)[0].version_id, old_version);
    assert_eq!(with(AWSCURRENT).len(), 1, "{versions:?}");
    assert_ne!(with(AWSCURRENT)[0].version_id, old_version);
    with(AWSCURRENT)[0].version_id.clone()
}

async fn stages_and_retired_credentials(secrets: Secrets) {
    let stack = stack(secrets).await;
    let store = store(&stack).await;
    let slug = unique_name("rot");
    let key = stack.create_tenant(&slug).await.unwrap();
    let name = stack.secret_name(&slug);
    let (_, before) = stack
        .admin(Method::GET, &format!("/v1/tenants/{slug}"), None)
        .await
        .unwrap();

    // single: the one login role gets a new password; the old one stops working at once.
    let c0 = stack.credentials(&slug).await.unwrap();
    let v0 = store
        .get_secret_value(&name, AWSCURRENT)
        .await
        .unwrap()
        .unwrap()
        .version_id;
    assert_eq!(stack.rotate(&slug, "single").await.unwrap()["state"], "succeeded");
    let v1 = assert_stages_after_rotation(&stack, store.as_ref(), &slug, &v0).await;
    let c1 = stack.credentials(&slug).await.unwrap();
    assert_eq!(c1["username"], c0["username"]);
    assert!(!logs_in(&c0).await, "single: the old password no longer logs in");
    assert!(logs_in(&c1).await);

    // alternating: the other login role takes over; the previous credentials stay valid
    // until the next rotation, and credentials two rotations old no longer log in.
    assert_eq!(stack.rotate(&slug, "alternating").await.unwrap()["state"], "succeeded");
    let v2 = assert_stages_after_rotation(&stack, store.as_ref(), &slug, &v1).await;
    let c2 = stack.credentials(&slug).await.unwrap();
    assert_ne!(c2["username"], c1["username"]);
    assert!(logs_in(&c1).await && logs_in(&c2).await);
    assert_eq!(stack.rotate(&slug, "alternating").await.unwrap()["state"], "succeeded");
    assert_stages_after_rotation(&stack, store.as_ref(), &slug, &v2).await;
    let c3 = stack.credentials(&slug).await.unwrap();
    assert_eq!(c3["username"], c1["username"]);
    assert!(!logs_in(&c1).await, "alternating: two rotations old no longer logs in");
    assert!(logs_in(&c2).await && logs_in(&c3).await);

    // Objects created through either login role belong to the owner: both can use them.
    let mut as_c3 = secret_connect_options(&c3).connect().await.unwrap();
    sqlx::query("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        .execute(&mut as_c3)
        .await
        .unwrap();
    sqlx::query("INSERT INTO notes VALUES (1, 'from c3')")
        .execute(&mut as_c3)
        .await
        .unwrap();
    let mut as_c2 = secret_connect_options(&c2).connect().await.unwrap();
    sqlx::query("INSERT INTO notes VALUES (2, 'from c2')")
        .execute(&mut as_c2)
        .await
        .unwrap();
    sqlx::query("UPDATE notes SET body = 'edited by c2' WHERE id = 1")
        .execute(&mut as_c2)
        .await
        .unwrap();
    sqlx::query("INSERT INTO tasks (title) VALUES ('direct')")
        .execute(&mut as_c2)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&mut as_c3)
        .await
        .unwrap();
    assert_eq!(n, 2);

    // The tenant still serves, and the catalog shows the rotation time.
    let resp = stack.tenant_get(&slug, &key, "/api/v1/tasks").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (_, after) = stack
        .admin(Method::GET, &format!("/v1/tenants/{slug}"), None)
        .await
        .unwrap();
    assert!(after["credentials_rotated_at"].as_str() > before["credentials_rotated_at"].as_str());
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn stages_and_retired_credentials_local() {
    stages_and_retired_credentials(Secrets::Local).await;
}

async fn set_log_statement(admin: &mut sqlx::PgConnection, value: &str) {
    for statement in [
        format!("ALTER SYSTEM SET log_statement = {value}"),
        "SELECT pg_reload_conf()".into(),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut *admin)
            .await
            .unwrap();
    }
}

/// Login passwords reach PostgreSQL only as SCRAM verifiers: with every DDL statement
/// logged, neither the first password nor the ones rotations set are in the server log.
#[tokio::test(flavor = "multi_thread")]
async fn passwords_never_reach_the_server_log() {
    let stack = stack(Secrets::Local).await;
    let mut admin = stack.pg().admin_options("postgres").connect().await.unwrap();
    set_log_statement(&mut admin, "'ddl'").await;
    let slug = unique_name("t");
    stack.create_tenant(&slug).await.unwrap();
    let mut passwords = vec![stack.credentials(&slug).await.unwrap()["password"]
        .as_str()
        .unwrap()
        .to_owned()];
    for strategy in ["single", "alternating"] {
        assert_eq!(stack.rotate(&slug, strategy).await.unwrap()["state"], "succeeded");
        passwords.push(
            stack.credentials(&slug).await.unwrap()["password"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    set_log_statement(&mut admin, "DEFAULT").await;

    let log = stack.pg().server_log().unwrap();
    let role_statements = log
        .lines()
        .filter(|l| l.contains("ROLE") && l.contains("PASSWORD"))
        .count();
    assert!(
        role_statements >= 3,
        "the role statements were logged: {role_statements}\n{log}"
    );
    assert!(log.contains("PASSWORD 'SCRAM-SHA-256$4096:"), "{log}");
    for password in &passwords {
        assert!(!log.contains(password.as_str()), "a password is in the server log");
    }
    stack.stop().await.unwrap();
}

/// A login role someone made a superuser on the server is never given a new password: the
/// rotation fails with a message that says why, and succeeds when retried once the role is
/// plain again.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_refuses_a_login_role_made_superuser_behind_its_back() {
    let stack = stack(Secrets::Local).await;
    let slug = unique_name("t");
    stack.create_tenant(&slug).await.unwrap();
    let creds = stack.credentials(&slug).await.unwrap();
    let role = creds["username"].as_str().unwrap().to_owned();
    let mut admin = stack.pg().admin_options("postgres").connect().await.unwrap();
    let alter = |attribute: &str| format!("ALTER ROLE \"{role}\" {attribute}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(alter("SUPERUSER")))
        .execute(&mut admin)
        .await
        .unwrap();

    let job = stack.rotate(&slug, "single").await.unwrap();
    assert_eq!(job["state"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains(&role) && error.contains("SUPERUSER"), "{error}");
    assert_eq!(
        stack.credentials(&slug).await.unwrap(),
        creds,
        "the secret is unchanged"
    );

    sqlx::raw_sql(sqlx::AssertSqlSafe(alter("NOSUPERUSER")))
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    let job = stack.retry_job(job["id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_ne!(stack.credentials(&slug).await.unwrap()["password"], creds["password"]);
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn stages_and_retired_credentials_aws() {
    stages_and_retired_credentials(Secrets::Aws).await;
}

async fn interrupted_rotation_resumes(secrets: Secrets) {
    let stack = stack(secrets).await;
    let store = store(&stack).await;
    let slug = unique_name("rint");
    let key = stack.create_tenant(&slug).await.unwrap();
    let host = format!("{slug}.localhost");
    for strategy in ["single", "alternating"] {
        for step in ROTATE_STEPS {
            let old = store
                .get_secret_value(&stack.secret_name(&slug), AWSCURRENT)
                .await
                .unwrap()
                .unwrap()
                .version_id;
            fail::cfg("rotate-after-step", &format!("return({step})")).unwrap();
            let job = stack.rotate(&slug, strategy).await.unwrap();
            assert_eq!(job["state"], "failed", "{strategy}/{step}: {job}");
            // The tenant keeps serving with whatever is current.
            let resp = stack
                .tenant_request(Method::GET, &host, "/api/v1/tasks")
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            assert_eq!(
                resp.status(),
                StatusCode::OK,
                "{strategy}/{step}: serving while interrupted"
            );
            fail::remove("rotate-after-step");
            let id = job["id"].as_i64().unwrap();
            assert_eq!(
                stack.retry_job(id).await.unwrap()["state"],
                "succeeded",
                "{strategy}/{step}"
            );
            assert_stages_after_rotation(&stack, store.as_ref(), &slug, &old).await;
            assert!(logs_in(&stack.credentials(&slug).await.unwrap()).await);
            let resp = stack
                .tenant_request(Method::GET, &host, "/api/v1/tasks")
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            assert_eq!(
                resp.status(),
                StatusCode::OK,
                "{strategy}/{step}: serving after the retry"
            );
        }
    }
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn interrupted_rotation_resumes_local() {
    interrupted_rotation_resumes(Secrets::Local).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn interrupted_rotation_resumes_aws() {
    interrupted_rotation_resumes(Secrets::Aws).await;
}

/// Several keep-alive clients read and write tasks through the router while five rotations
/// run back to back: every response must be 2xx. Each client paces itself (a few hundred
/// requests per second in all), so the load cannot starve the control plane of the CPU it
/// rotates with when other tests share the machine.
async fn no_failed_requests_under_load(secrets: Secrets, strategy: &str) {
    let stack = Arc::new(stack(secrets).await);
    let slug = unique_name("load");
    let key = stack.create_tenant(&slug).await.unwrap();
    let host = format!("{slug}.localhost");
    let stop = CancellationToken::new();
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (stack, key, host, stop, ok, failed) = (
            stack.clone(),
            key.clone(),
            host.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
        );
        clients.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut i = 0u64;
            while !stop.is_cancelled() && Instant::now() < deadline {
                i += 1;
                let req = if i % 3 == 0 {
                    stack
                        .tenant_request(Method::POST, &host, "/api/v1/tasks")
                        .json(&json!({"title": format!("c{c} #{i}")}))
                } else {
                    stack.tenant_request(Method::GET, &host, "/api/v1/tasks?limit=5")
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
                match req.bearer_auth(&key).send().await {
                    Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => {
                        eprintln!("client {c}: {} {}", r.status(), r.text().await.unwrap_or_default());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("client {c}: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 0..5 {
        let job = stack.rotate(&slug, strategy).await.unwrap();
        assert_eq!(job["state"], "succeeded", "rotation {n}: {job}");
        // Let the pools open new connections with the new credentials between rotations.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 100, "the load ran: {ok} requests");
    assert_eq!(failed, 0, "{failed} failed requests out of {}", ok + failed);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_failed_requests_under_load_alternating_local() {
    no_failed_requests_under_load(Secrets::Local, "alternating").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_failed_requests_under_load_single_local() {
    no_failed_requests_under_load(Secrets::Local, "single").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_failed_requests_under_load_alternating_aws() {
    no_failed_requests_under_load(Secrets::Aws, "alternating").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_failed_requests_under_load_single_aws() {
    no_failed_requests_under_load(Secrets::Aws, "single").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_schedulers_rotate_each_due_tenant_exactly_once() {
    let extra = "[rotation]\ninterval = \"1d\"\ncheck_every = \"100ms\"\njitter = \"500ms\"\nmax_concurrent = 100\n";
    let stack = Stack::start(StackOptions {
        extra_toml: extra.into(),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let second = ControlPlane::bind(stack.config().clone()).await.unwrap();
    let stop_second = CancellationToken::new();
    let second = tokio::spawn(second.run(stop_second.clone()));

    let slugs: Vec<String> = (0..4).map(|_| unique_name("due")).collect();
    for slug in &slugs {
        stack.create_tenant(slug).await.unwrap();
    }
    let fresh = unique_name("fresh");
    stack.create_tenant(&fresh).await.unwrap();
    // Make the four due (credentials 2 days old); `fresh` is not.
    sqlx::query("UPDATE tenants SET credentials_rotated_at = now() - interval '2 days' WHERE slug = ANY($1)")
        .bind(&slugs)
        .execute(stack.catalog())
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tenants WHERE slug = ANY($1) AND credentials_rotated_at > now() - interval '1 hour'",
        )
        .bind(&slugs)
        .fetch_one(stack.catalog())
        .await
        .unwrap();
        if done == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "only {done} of 4 due tenants rotated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give both schedulers more passes to (wrongly) rotate again.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let per_tenant: Vec<(String, i64)> =
        sqlx::query_as("SELECT tenant, count(*) FROM jobs WHERE kind = 'rotate' GROUP BY tenant ORDER BY tenant")
            .fetch_all(stack.catalog())
            .await
            .unwrap();
    let mut expected: Vec<(String, i64)> = slugs.iter().map(|s| (s.clone(), 1)).collect();
    expected.sort();
    assert_eq!(
        per_tenant, expected,
        "each due tenant exactly once, the fresh one never"
    );
    let states: Vec<String> = sqlx::query_scalar("SELECT DISTINCT state FROM jobs WHERE kind = 'rotate'")
        .fetch_all(stack.catalog())
        .await
        .unwrap();
    assert_eq!(states, ["succeeded"]);
    stop_second.cancel();
    second.await.unwrap().unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_asked_for_with_another_strategy_while_one_runs_is_refused_not_dropped() {
    let stack = stack(Secrets::Local).await;
    let slug = unique_name("rs");
    stack.create_tenant(&slug).await.unwrap();
    // Keep the first rotation pending: it fails like an unreachable database after its first
    // step, and is retried (queued again) until the fail point goes.
    fail::cfg("rotate-unavailable-after-create_secret", "return").unwrap();
    let path = format!("/v1/tenants/{slug}/rotate");
    let (status, first) = stack
        .admin(Method::POST, &path, Some(json!({"strategy": "alternating"})))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let id = first["job"]["id"].as_i64().unwrap();

    // The same strategy, or none, is the same job; another one is a conflict that says why.
    for body in [json!({"strategy": "alternating"}), json!({})] {
        let (status, again) = stack.admin(Method::POST, &path, Some(body)).await.unwrap();
        assert_eq!(
            (status, again["job"]["id"].as_i64()),
            (StatusCode::ACCEPTED, Some(id)),
            "{again}"
        );
    }
    let (status, refused) = stack
        .admin(Method::POST, &path, Some(json!({"strategy": "single"})))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(refused["error"], "tenant_busy", "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("job {id}")) && message.contains("alternating"),
        "{message}"
    );

    fail::remove("rotate-unavailable-after-create_secret");
    assert_eq!(stack.wait_job(id).await.unwrap()["state"], "succeeded");
    stack.stop().await.unwrap();
}
