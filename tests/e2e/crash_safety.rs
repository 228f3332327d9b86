//! Provisioning interrupted after each step in turn (a fail point) leaves a `failed` tenant
//! that a retry completes, with no orphaned or duplicated database, role or secret; a
//! transient failure (an unreachable database) is retried by the control plane itself. A
//! job runs once at a time: a run that lost its lease records nothing. `/metrics` shows
//! failed tenants and a stuck queue.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use silo_control_plane::jobs;
use silo_control_plane::provision::{DELETE_STEPS, PROVISION_STEPS};
use silo_tests::pg::TestCluster;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use sqlx::postgres::PgPoolOptions;
use sqlx::ConnectOptions;

async fn count(stack: &Stack, sql: &str, arg: &str) -> i64 {
    let mut conn = stack.pg().admin_options("postgres").connect().await.unwrap();
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(arg)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transient_failure_is_retried_without_an_operator() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    // Twice in a row, after different steps: the job waits 1 s, then 2 s, and resumes.
    fail::cfg("provision-unavailable-after-roles", "1*return").unwrap();
    fail::cfg("provision-unavailable-after-database", "1*return").unwrap();
    let slug = unique_name("flaky");
    let (status, created) = stack
        .admin(Method::POST, "/v1/tenants", Some(json!({"slug": slug})))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED);
    let job = stack.wait_job(created["job"]["id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 3, "{job}");
    assert_eq!(job["error"], serde_json::Value::Null, "{job}");
    let resp = stack
        .tenant_request(Method::GET, &format!("{slug}.localhost"), "/api/v1/me")
        .bearer_auth(created["api_key"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    stack.stop().await.unwrap();
}

/// An operator's retry queues a job with all its automatic retries, however often it ran
/// before: a transient failure after the fifth manual retry is still retried by itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_retried_by_an_operator_gets_its_automatic_retries_again() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    fail::cfg("provision-after-step", "return(roles)").unwrap();
    let slug = unique_name("again");
    let (status, created) = stack
        .admin(Method::POST, "/v1/tenants", Some(json!({"slug": slug})))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED);
    let job_id = created["job"]["id"].as_i64().unwrap();
    let mut job = stack.wait_job(job_id).await.unwrap();
    for _ in 0..4 {
        assert_eq!(job["state"], "failed", "{job}");
        job = stack.retry_job(job_id).await.unwrap();
    }
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["attempts"], 5, "{job}");

    fail::remove("provision-after-step");
    fail::cfg("provision-unavailable-after-database", "1*return").unwrap();
    let job = stack.retry_job(job_id).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        job["attempts"], 7,
        "one transient failure, retried automatically: {job}"
    );
    let resp = stack
        .tenant_get(&slug, created["api_key"].as_str().unwrap(), "/api/v1/me")
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn provisioning_interrupted_after_each_step_completes_on_retry() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    for step in PROVISION_STEPS {
        let slug = unique_name("crash");
        fail::cfg("provision-after-step", &format!("return({step})")).unwrap();
        let (status, created) = stack
            .admin(Method::POST, "/v1/tenants", Some(json!({"slug": slug})))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::ACCEPTED);
        let key = created["api_key"].as_str().unwrap().to_owned();
        let job_id = created["job"]["id"].as_i64().unwrap();
        let job = stack.wait_job(job_id).await.unwrap();
        assert_eq!(job["state"], "failed", "step {step}: {job}");
        assert_eq!(job["step"], step);
        assert!(job["error"].as_str().unwrap().contains(step), "{job}");
        let (_, tenant) = stack
            .admin(Method::GET, &format!("/v1/tenants/{slug}"), None)
            .await
            .unwrap();
        assert_eq!(tenant["status"], "failed", "step {step}");

        fail::remove("provision-after-step");
        let job = stack.retry_job(job_id).await.unwrap();
        assert_eq!(job["state"], "succeeded", "step {step}: {job}");
        assert_eq!(job["attempts"], 2);

        let db = stack.database_of(&slug).await.unwrap();
        assert_eq!(
            count(&stack, "SELECT count(*) FROM pg_database WHERE datname = $1", &db).await,
            1
        );
        assert_eq!(
            count(
                &stack,
                "SELECT count(*) FROM pg_roles WHERE rolname LIKE $1 || '\\_%'",
                &db
            )
            .await,
            2
        );
        let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM secret_versions WHERE name = $1")
            .bind(stack.secret_name(&slug))
            .fetch_one(stack.catalog())
            .await
            .unwrap();
        assert_eq!(versions, 1, "step {step}: one secret version, not one per attempt");

        let resp = stack.tenant_get(&slug, &key, "/api/v1/me").await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "step {step}: the first API key works after the retry"
        );
    }
    let (_, adopted) = stack
        .admin(Method::GET, "/v1/audit?action=tenant.database.adopt", None)
        .await
        .unwrap();
    assert_eq!(
        adopted["items"],
        json!([]),
        "a retry finds the database its own first run made: nothing was adopted"
    );
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn deletion_interrupted_after_each_step_completes_on_retry() {
    // With a backup, so that every step runs; the retry finds the backup already taken (even
    // once the database is dropped) instead of taking another.
    let stack = Stack::start(StackOptions {
        extra_toml: "[backups]\ndir = \"backups\"\n".into(),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    for step in DELETE_STEPS {
        let slug = unique_name("gone");
        stack.create_tenant(&slug).await.unwrap();
        fail::cfg("delete-after-step", &format!("return({step})")).unwrap();
        let (status, body) = stack
            .admin(Method::DELETE, &format!("/v1/tenants/{slug}?backup=true"), None)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::ACCEPTED);
        let job_id = body["job"]["id"].as_i64().unwrap();
        assert_eq!(stack.wait_job(job_id).await.unwrap()["state"], "failed");
        fail::remove("delete-after-step");
        let retried = stack.retry_job(job_id).await.unwrap();
        assert_eq!(retried["state"], "succeeded", "step {step}: {retried}");
        let db = stack.database_of(&slug).await.unwrap();
        assert_eq!(
            count(&stack, "SELECT count(*) FROM pg_database WHERE datname = $1", &db).await,
            0
        );
        assert_eq!(
            count(
                &stack,
                "SELECT count(*) FROM pg_roles WHERE rolname LIKE $1 || '\\_%'",
                &db
            )
            .await,
            0
        );
        let status: String = sqlx::query_scalar("SELECT status FROM tenants WHERE slug = $1")
            .bind(&slug)
            .fetch_one(stack.catalog())
            .await
            .unwrap();
        assert_eq!(status, "deleted");
        let backups = std::fs::read_dir(stack.dir().join("backups").join(&slug))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>();
        assert_eq!(backups.len(), 1, "step {step}: one backup, complete: {backups:?}");
        assert!(backups[0].ends_with(&format!("-job{job_id}.dump")), "{backups:?}");
    }
    stack.stop().await.unwrap();
}

/// Two runs of one job, as when a worker stalls past its lease and another claims the job:
/// only the run that holds the job records steps, progress and an outcome.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_lost_its_lease_records_nothing() {
    let pg = TestCluster::shared().await;
    let db = unique_name("catalog_");
    pg.create_database(&db).await.unwrap();
    let catalog = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(pg.admin_options(&db))
        .await
        .unwrap();
    silo_control_plane::catalog::migrate(&catalog).await.unwrap();
    let mut conn = catalog.acquire().await.unwrap();
    let queued = jobs::enqueue(&mut conn, "migrate", None, json!({})).await.unwrap();

    let stale = jobs::claim(&catalog, "worker-a", Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let current = jobs::claim(&catalog, "worker-b", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((stale.id, current.id), (queued.id, queued.id));
    assert_eq!((stale.attempts, current.attempts), (1, 2));

    assert!(!jobs::renew(&catalog, &stale, Duration::from_secs(60)).await.unwrap());
    assert!(!jobs::set_step(&catalog, &stale, "stale step").await.unwrap());
    jobs::set_progress(&catalog, &stale, &json!({"stale": true}))
        .await
        .unwrap();
    assert!(!jobs::retry_later(&mut conn, &stale, "stale failure", Duration::ZERO)
        .await
        .unwrap());
    assert!(!jobs::finish(&mut conn, &stale, Some("stale failure")).await.unwrap());
    let job = jobs::get(&mut conn, queued.id).await.unwrap().unwrap();
    assert_eq!(
        (
            job.state.as_str(),
            job.step.as_deref(),
            &job.progress,
            job.error.as_deref()
        ),
        ("running", None, &json!({}), None),
        "the stale run changed the job"
    );

    assert!(jobs::renew(&catalog, &current, Duration::from_secs(60)).await.unwrap());
    assert!(jobs::set_step(&catalog, &current, "step").await.unwrap());
    jobs::set_progress(&catalog, &current, &json!({"done": 1}))
        .await
        .unwrap();
    assert!(jobs::finish(&mut conn, &current, None).await.unwrap());
    let job = jobs::get(&mut conn, queued.id).await.unwrap().unwrap();
    assert_eq!(
        (
            job.state.as_str(),
            job.step.as_deref(),
            &job.progress,
            job.error.as_deref()
        ),
        ("succeeded", Some("step"), &json!({"done": 1}), None)
    );
    // A finished job has no running run left to write it.
    assert!(!jobs::finish(&mut conn, &current, Some("late")).await.unwrap());
}

/// A restore whose worker stalls past its lease once the tenant is fenced (cut off from the
/// catalog, its renewals lost) is taken over by another worker, which finishes it. The
/// stalled run, when it wakes, changes nothing: not the job, not the tenant. (Before, it went
/// on with a login the new run had replaced, and recorded the job as failed.)
#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_stalls_past_its_lease_is_taken_over_and_changes_nothing_after() {
    const STALL: Duration = Duration::from_secs(12);
    let stack = Stack::start(StackOptions {
        extra_toml: "[backups]\ndir = \"backups\"\n".into(),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let slug = unique_name("stall");
    let key = stack.create_tenant(&slug).await.unwrap();
    stack.add_tasks(&slug, &key, &["kept"]).await.unwrap();
    let (status, body) = stack
        .admin(Method::POST, &format!("/v1/tenants/{slug}/backup"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let backup = stack.wait_job(body["job"]["id"].as_i64().unwrap()).await.unwrap();
    let path = backup["progress"]["backup"].as_str().unwrap();
    let file = path.rsplit('/').next().unwrap();

    // No lease is renewed from now on (the job's runs are shorter than the 5 s lease).
    fail::cfg("renew-job-lease", "return").unwrap();
    fail::cfg("restore-stall-after-fence", &format!("1*return({})", STALL.as_millis())).unwrap();
    let started = std::time::Instant::now();
    let (status, body) = stack
        .admin(
            Method::POST,
            &format!("/v1/tenants/{slug}/restore"),
            Some(json!({"backup": file})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["job"]["id"].as_i64().unwrap();
    let job = stack.wait_job(id).await.unwrap();
    assert!(started.elapsed() < STALL, "the job waited for the stalled run: {job}");
    assert_eq!(
        (&job["state"], &job["error"]),
        (&json!("succeeded"), &json!(null)),
        "{job}"
    );
    assert!(job["attempts"].as_i64().unwrap() >= 2, "{job}");

    tokio::time::sleep(STALL.saturating_sub(started.elapsed()) + Duration::from_secs(3)).await;
    let (_, woken) = stack.admin(Method::GET, &format!("/v1/jobs/{id}"), None).await.unwrap();
    assert_eq!(
        [&woken["state"], &woken["attempts"], &woken["step"], &woken["error"]],
        [&job["state"], &job["attempts"], &job["step"], &job["error"]],
        "the stalled run changed the job once it woke"
    );
    let tenant = stack.tenant(&slug).await.unwrap();
    assert_eq!(tenant["restoring_from"], json!(null), "{tenant}");
    assert_eq!(stack.served_titles(&slug, &key).await.unwrap(), ["kept"]);
    stack.stop().await.unwrap();
}

/// `/metrics` says how many tenants are in each status (a failed one waits for an operator),
/// how many jobs are queued and running, and how long the job longest due has waited with no
/// worker on it: what an SRE alerts on when the queue is stuck.
#[tokio::test(flavor = "multi_thread")]
async fn tenants_by_status_and_a_stuck_queue_are_in_the_control_planes_metrics() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    stack.create_tenant(&unique_name("ok")).await.unwrap();
    fail::cfg("provision-after-step", "return(roles)").unwrap();
    let (status, created) = stack
        .admin(
            Method::POST,
            "/v1/tenants",
            Some(json!({"slug": unique_name("broken")})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let job = stack.wait_job(created["job"]["id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(job["state"], "failed", "{job}");

    // A job due in 2 s that no worker can take: the test holds its row.
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO jobs (kind, created_at, run_after) \
         VALUES ('migrate', now() - interval '1 minute', now() + interval '2 seconds') RETURNING id",
    )
    .fetch_one(stack.catalog())
    .await
    .unwrap();
    let mut held = stack.catalog().begin().await.unwrap();
    sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *held)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3_500)).await;

    let gauge = |series: &'static str| stack.control_plane_gauge(series);
    assert_eq!(gauge("silo_tenants{status=\"active\"}").await.unwrap(), 1.0);
    assert_eq!(gauge("silo_tenants{status=\"failed\"}").await.unwrap(), 1.0);
    assert_eq!(gauge("silo_tenants{status=\"deleted\"}").await.unwrap(), 0.0);
    assert_eq!(gauge("silo_jobs{state=\"queued\"}").await.unwrap(), 1.0);
    assert_eq!(gauge("silo_jobs{state=\"running\"}").await.unwrap(), 0.0);
    let delay = gauge("silo_job_queue_delay_seconds_max").await.unwrap();
    assert!(
        (1.0..30.0).contains(&delay),
        "due for 1.5 s (queued for a minute): {delay}"
    );
    sqlx::query("DELETE FROM jobs WHERE id = $1")
        .bind(id)
        .execute(&mut *held)
        .await
        .unwrap();
    held.commit().await.unwrap();
    stack.stop().await.unwrap();
}
