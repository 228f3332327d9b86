//! `siloctl tenant move SLUG --to SERVER --online`: the tenant's database is copied by
//! logical replication while the tenant is served, and it answers 503 only for the cutover;
//! no acknowledged write is lost. A move interrupted at any step resumes or is undone, and
//! what logical replication cannot carry is refused before anything is made.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use silo_tests::pg::TestCluster;
use silo_tests::stack::{Secrets, Stack};
use silo_tests::unique_name;
use sqlx::{ConnectOptions, Connection};

use crate::backups::titles_in;
use crate::moves::{left_on, tenant_with_tasks, two_server_stack_with};

async fn start_online_move(stack: &Stack, slug: &str) -> (StatusCode, Value) {
    stack
        .admin(
            Method::POST,
            &format!("/v1/tenants/{slug}/move"),
            Some(json!({ "server": "pg-2", "online": true })),
        )
        .await
        .unwrap()
}

/// What replication objects `pg` still has: slots, and roles made for a move.
async fn replication_left_on(pg: &TestCluster) -> (i64, i64) {
    let mut conn = pg.admin_options("postgres").connect().await.unwrap();
    let left = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_replication_slots), \
                (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'silo\\_move\\_%')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    left
}

/// Posts a task every 20 ms until `stop`; returns the titles acknowledged (201) and the
/// number of 503 answers. Any other answer fails the test.
async fn write_until(stack: &Stack, slug: &str, key: &str, stop: &AtomicBool) -> (Vec<String>, u32) {
    let (mut acknowledged, mut unavailable) = (Vec::new(), 0);
    for n in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let title = format!("written during the move {n}");
        let resp = stack
            .tenant_request(Method::POST, &format!("{slug}.localhost"), "/api/v1/tasks")
            .bearer_auth(key)
            .json(&json!({ "title": title }))
            .send()
            .await
            .unwrap();
        match resp.status() {
            StatusCode::CREATED => acknowledged.push(title),
            StatusCode::SERVICE_UNAVAILABLE => unavailable += 1,
            other => panic!("{other} while moving: {}", resp.text().await.unwrap()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (acknowledged, unavailable)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_moves_online_served_until_the_cutover_and_loses_no_acknowledged_write() {
    let (stack, pg2) = two_server_stack_with(Secrets::Local, 1).await;
    let slug = unique_name("mvo");
    let key = tenant_with_tasks(&stack, &slug, &["first", "second"]).await;
    let database = stack.database_of(&slug).await.unwrap();
    // Once every table is copied, the job waits: replication follows the writes meanwhile.
    fail::cfg("move-stall-after-copy", "1*return(2000)").unwrap();

    let stop = AtomicBool::new(false);
    let writer = write_until(&stack, &slug, &key, &stop);
    let mover = async {
        let (status, body) = start_online_move(&stack, &slug).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let id = body["job"]["id"].as_i64().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, job) = stack.admin(Method::GET, &format!("/v1/jobs/{id}"), None).await.unwrap();
            let tables = job["progress"]["tables"].as_i64().unwrap_or(0);
            if job["step"] == "copy" && tables > 0 && job["progress"]["tables_copied"] == tables {
                break;
            }
            assert!(Instant::now() < deadline, "the copy never finished: {job}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Copied and followed, and still served from pg-1.
        let tenant = stack.tenant(&slug).await.unwrap();
        assert_eq!(tenant["moving_to"], "pg-2", "{tenant}");
        assert_eq!(tenant["moving_online"], true, "{tenant}");
        assert_eq!(tenant["server"], "pg-1", "{tenant}");
        let resp = stack
            .tenant_request(Method::POST, &format!("{slug}.localhost"), "/api/v1/tasks")
            .bearer_auth(&key)
            .json(&json!({ "title": "while copied" }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED, "served while it moves");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !titles_in(&pg2, &database).await.iter().any(|t| t == "while copied") {
            assert!(Instant::now() < deadline, "the write never reached pg-2");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let job = stack.wait_job(id).await.unwrap();
        stop.store(true, Ordering::Relaxed);
        job
    };
    let ((acknowledged, unavailable), job) = tokio::join!(writer, mover);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["step"], "cleanup", "{job}");
    eprintln!(
        "{} writes acknowledged during the move, {unavailable} answered 503 (one every 20 ms)",
        acknowledged.len()
    );
    assert!(
        acknowledged.len() >= 20,
        "the tenant was served during the move: {} writes",
        acknowledged.len()
    );

    let moved = stack.tenant(&slug).await.unwrap();
    assert_eq!(moved["server"], "pg-2", "{moved}");
    assert!(
        moved.get("moving_to").is_none() && moved.get("moving_online").is_none(),
        "{moved}"
    );
    // Every row, read on pg-2 itself (the API serves 100 at a time).
    let served = titles_in(&pg2, &database).await;
    for title in ["first", "second", "while copied"]
        .into_iter()
        .chain(acknowledged.iter().map(String::as_str))
    {
        assert!(served.iter().any(|t| t == title), "{title:?} was lost");
    }
    // The sequences came along: new rows get new ids.
    let resp = stack
        .tenant_request(Method::POST, &format!("{slug}.localhost"), "/api/v1/tasks")
        .bearer_auth(&key)
        .json(&json!({ "title": "after" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", resp.text().await.unwrap());
    assert_eq!(
        left_on(stack.pg(), &database).await,
        (false, 0),
        "the old database is gone"
    );
    assert_eq!(
        replication_left_on(stack.pg()).await,
        (0, 0),
        "no slot or role left on pg-1"
    );
    let mut conn = pg2.admin_options(&database).connect().await.unwrap();
    let subscriptions: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_subscription")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    assert_eq!(subscriptions, 0, "no subscription left on pg-2");
    let (_, audit) = stack
        .admin(
            Method::GET,
            &format!("/v1/audit?tenant={slug}&action=tenant.move"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(audit["items"][0]["detail"]["online"], true, "{audit}");
    stack.stop().await.unwrap();
    pg2.stop();
}

/// A failure that the job retries by itself after the copy or the cutover resumes it; one
/// that fails it for good after either is undone (the tenant served from pg-1 with everything
/// written meanwhile, nothing left on pg-2), and the retried job copies again.
#[tokio::test(flavor = "multi_thread")]
async fn an_online_move_resumes_after_each_step_and_a_failed_one_is_undone() {
    let (stack, pg2) = two_server_stack_with(Secrets::Local, 1).await;
    let slug = unique_name("mvr");
    let key = tenant_with_tasks(&stack, &slug, &["kept"]).await;
    let database = stack.database_of(&slug).await.unwrap();
    let mut expected = vec!["kept".to_owned()];

    for step in ["copy", "cutover"] {
        fail::cfg("move-after-step", &format!("return({step})")).unwrap();
        let (status, body) = start_online_move(&stack, &slug).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let job = stack.wait_job(body["job"]["id"].as_i64().unwrap()).await.unwrap();
        assert_eq!(job["state"], "failed", "{job}");
        assert_eq!(job["step"], step, "{job}");
        let back = stack.tenant(&slug).await.unwrap();
        assert!(back.get("moving_to").is_none(), "undone after {step}: {back}");
        assert_eq!(back["server"], "pg-1", "{back}");
        assert_eq!(
            left_on(&pg2, &database).await,
            (false, 0),
            "pg-2 keeps nothing after {step}"
        );
        assert_eq!(replication_left_on(stack.pg()).await, (0, 0), "after {step}");
        let title = format!("after the failed {step}");
        stack.add_tasks(&slug, &key, &[title.as_str()]).await.unwrap();
        expected.push(title);
        assert_eq!(stack.served_titles(&slug, &key).await.unwrap(), expected);
    }
    fail::remove("move-after-step");

    // The copy and the cutover are each followed by a transient failure once: the job runs
    // again from where the catalog says it is (copy again while the tenant is served, else
    // the cutover again).
    for step in ["copy", "cutover"] {
        fail::cfg(format!("move-unavailable-after-{step}"), "1*return").unwrap();
    }
    let (status, body) = start_online_move(&stack, &slug).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job = stack.wait_job(body["job"]["id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 3, "{job}");
    assert_eq!(stack.tenant(&slug).await.unwrap()["server"], "pg-2");
    assert_eq!(stack.served_titles(&slug, &key).await.unwrap(), expected);
    assert_eq!(replication_left_on(stack.pg()).await, (0, 0));
    stack.stop().await.unwrap();
    pg2.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_online_move_of_a_table_replication_cannot_follow_is_refused_before_anything_is_made() {
    let (stack, pg2) = two_server_stack_with(Secrets::Local, 1).await;
    let slug = unique_name("mvn");
    let key = tenant_with_tasks(&stack, &slug, &["kept"]).await;
    let database = stack.database_of(&slug).await.unwrap();
    let mut conn = stack.pg().admin_options(&database).connect().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE notes (body text); ALTER TABLE notes OWNER TO {database}_owner"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();

    let (status, body) = start_online_move(&stack, &slug).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "online_move_unavailable", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("notes") && message.contains("primary key"),
        "{message}"
    );
    let tenant = stack.tenant(&slug).await.unwrap();
    assert!(tenant.get("moving_to").is_none(), "{tenant}");
    assert_eq!(stack.served_titles(&slug, &key).await.unwrap(), ["kept"]);
    assert_eq!(left_on(&pg2, &database).await, (false, 0));

    // The CLI says the same in one line, exit 1; an offline move still moves it.
    let (code, stdout, stderr) = stack
        .siloctl(&["tenant", "move", &slug, "--to", "pg-2", "--online"])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("online_move_unavailable"), "{stderr}");
    let (code, stdout, stderr) = stack.siloctl(&["tenant", "move", &slug, "--to", "pg-2"]).await.unwrap();
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(stack.served_titles(&slug, &key).await.unwrap(), ["kept"]);
    stack.stop().await.unwrap();
    pg2.stop();
}
