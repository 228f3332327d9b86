//! The router under pressure: credentials that change under a warm pool, the connection
//! budget per server, per-tenant limits, protection (timeouts, body limit, shutdown) and
//! faults (a database that goes away and comes back).
//!
//! Metric assertions assume one test per process (`cargo nextest run`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde_json::Value;
use silo_control_plane::secrets::{self, DbSecret, AWSCURRENT, AWSPENDING};
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use sqlx::{ConnectOptions, Connection};

async fn stack_with(router_toml: &str) -> Stack {
    Stack::start(StackOptions {
        router_toml: router_toml.to_owned(),
        ..StackOptions::default()
    })
    .await
    .unwrap()
}

/// Superuser connection to the tenants' cluster.
async fn superuser(stack: &Stack) -> sqlx::PgConnection {
    stack.pg().admin_options("postgres").connect().await.unwrap()
}

/// Terminates the router's sessions on `database`.
async fn terminate_router_sessions(stack: &Stack, database: &str) -> i64 {
    let mut admin = superuser(stack).await;
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = 'silo-router') t",
    )
    .bind(database)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    admin.close().await.unwrap();
    n
}

/// A rotation half done (`single`: PostgreSQL already has the AWSPENDING password,
/// AWSCURRENT has not moved yet, no event sent): a warm pool that must open new
/// connections switches to the pending secret and no request fails.
#[tokio::test(flavor = "multi_thread")]
async fn pending_password_is_used_when_the_current_one_is_refused() {
    let stack = Arc::new(stack_with("").await);
    let slug = unique_name("pend");
    let key = stack.create_tenant(&slug).await.unwrap();
    let host = format!("{slug}.localhost");
    let get = || {
        stack
            .tenant_request(Method::GET, &host, "/api/v1/tasks")
            .bearer_auth(&key)
    };
    assert_eq!(get().send().await.unwrap().status(), StatusCode::OK, "warm the pool");

    // Stage a new password as AWSPENDING and set it in PostgreSQL, as `set_secret` does.
    let store = secrets::open(&stack.config().secrets, stack.catalog().clone())
        .await
        .unwrap();
    let name = stack.secret_name(&slug);
    let current = store.get_secret_value(&name, AWSCURRENT).await.unwrap().unwrap();
    let mut pending = DbSecret::from_secret(&current.value, &name).unwrap();
    pending.password = secrets::generate_password();
    let version = uuid_like();
    store
        .put_secret_value(&name, &version, &pending.to_secret_string(), &[AWSPENDING])
        .await
        .unwrap();
    let mut admin = superuser(&stack).await;
    let alter = format!(
        "ALTER ROLE \"{}\" PASSWORD '{}'",
        pending.username,
        pending.password.expose_secret()
    );
    sqlx::query(sqlx::AssertSqlSafe(alter))
        .execute(&mut admin)
        .await
        .unwrap();

    // Force new connections: the pool's sessions are gone, and the idle ones are noticed.
    assert!(terminate_router_sessions(&stack, &pending.dbname).await >= 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;

    for i in 0..10 {
        let resp = get().send().await.unwrap();
        let status = resp.status();
        assert_eq!(status, StatusCode::OK, "request {i}: {}", resp.text().await.unwrap());
    }
    // Concurrent requests open more connections, all with the pending password.
    let mut concurrent = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let request = get();
        concurrent.spawn(async move { request.send().await.unwrap().status() });
    }
    let results = concurrent.join_all().await;
    assert!(results.iter().all(|s| *s == StatusCode::OK), "{results:?}");
    let metrics = stack.router_metrics().await.unwrap();
    assert!(
        metrics.contains(r#"silo_router_credential_switches_total{stage="AWSPENDING"} 1"#),
        "{metrics}"
    );
    admin.close().await.unwrap();
}

/// The login role of the router's sessions on `database` (one role expected).
async fn router_session_role(stack: &Stack, database: &str) -> String {
    let mut admin = superuser(stack).await;
    let roles: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT usename::text FROM pg_stat_activity WHERE datname = $1 AND application_name = 'silo-router'",
    )
    .bind(database)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(roles.len(), 1, "{roles:?}");
    roles.into_iter().next().unwrap()
}

/// `silo_router_secret_reads_total{source}` on the stack's router.
async fn secret_reads(stack: &Stack, source: &str) -> u64 {
    let metrics = stack.router_metrics().await.unwrap();
    let series = format!("silo_router_secret_reads_total{{source=\"{source}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |value| value.parse().unwrap())
}

/// Waits until the router has closed every tenant pool (idle timeout).
async fn until_pools_closed(stack: &Stack) {
    for _ in 0..100 {
        if stack
            .router_metrics()
            .await
            .unwrap()
            .contains("silo_router_pools_open 0\n")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the router kept its tenant pools open");
}

/// A pool rebuilt soon after it closed logs in with the secret read for the last one, without
/// asking AWS Secrets Manager again; once a rotation has moved the tenant to another login
/// role (`alternating`), the next pool logs in as that role, though its pool had closed
/// before the rotation's event arrived.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuilt_pool_reuses_the_secret_read_last_until_the_tenant_changes() {
    let stack = Stack::start(StackOptions {
        secrets: silo_tests::stack::Secrets::Aws,
        pool_idle_timeout: Duration::from_millis(300),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let slug = unique_name("kc");
    let key = stack.create_tenant(&slug).await.unwrap();
    let database = stack.database_of(&slug).await.unwrap();
    let served = || async { stack.tenant_get(&slug, &key, "/api/v1/me").await.unwrap().status() };
    assert_eq!(served().await, StatusCode::OK);
    let first_role = router_session_role(&stack, &database).await;
    let from_store = secret_reads(&stack, "store").await;
    assert!(from_store >= 1);

    until_pools_closed(&stack).await;
    assert_eq!(served().await, StatusCode::OK);
    assert_eq!(
        secret_reads(&stack, "store").await,
        from_store,
        "the secret store was asked again"
    );
    assert_eq!(secret_reads(&stack, "kept").await, 1);

    until_pools_closed(&stack).await;
    let job = stack.rotate(&slug, "alternating").await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    until_pools_closed(&stack).await;
    assert_eq!(served().await, StatusCode::OK);
    let role = router_session_role(&stack, &database).await;
    assert_ne!(
        role, first_role,
        "the new pool logged in with the secret kept from before the rotation"
    );
    stack.stop().await.unwrap();
}

fn uuid_like() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Creates `n` tenants named `{prefix}-{i}`, `parallel` at a time; returns (slug, key).
async fn create_tenants(stack: &Arc<Stack>, prefix: &str, n: usize, parallel: usize) -> Vec<(String, String)> {
    let slugs: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let mut out = Vec::with_capacity(n);
    for chunk in slugs.chunks(parallel) {
        let mut set = tokio::task::JoinSet::new();
        for slug in chunk {
            let (stack, slug) = (stack.clone(), slug.clone());
            set.spawn(async move {
                let key = stack.create_tenant(&slug).await.unwrap();
                (slug, key)
            });
        }
        out.extend(set.join_all().await);
    }
    out
}

/// Router sessions on tenant databases, as PostgreSQL sees them.
async fn router_tenant_sessions(admin: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = 'silo-router' AND datname LIKE 'tenant\\_%'",
    )
    .fetch_one(admin)
    .await
    .unwrap()
}

/// 300 tenants, a budget of 20: traffic across all of them succeeds, and PostgreSQL never
/// sees more than 20 router connections to tenant databases.
#[tokio::test(flavor = "multi_thread")]
async fn connection_budget_holds_across_300_tenants() {
    const BUDGET: i64 = 20;
    let stack = Arc::new(
        stack_with("connection_budget_per_server = 20\nmax_connections_per_tenant = 2\nbudget_wait = \"15s\"").await,
    );
    let prefix = unique_name("bud");
    let tenants = Arc::new(create_tenants(&stack, &prefix, 300, 8).await);

    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (stack, stop) = (stack.clone(), stop.clone());
        tokio::spawn(async move {
            let mut admin = superuser(&stack).await;
            let (mut peak, mut samples) = (0, 0);
            while !stop.is_cancelled() {
                peak = peak.max(router_tenant_sessions(&mut admin).await);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (peak, samples)
        })
    };

    let mut clients = tokio::task::JoinSet::new();
    for c in 0..8usize {
        let (stack, tenants) = (stack.clone(), tenants.clone());
        clients.spawn(async move {
            let mut failures = Vec::new();
            // Two passes over every tenant, each client in its own order.
            for i in 0..tenants.len() * 2 / 8 {
                let (slug, key) = &tenants[(i * 8 + c) * 37 % tenants.len()];
                let resp = stack.tenant_get(slug, key, "/api/v1/tasks?limit=1").await.unwrap();
                if resp.status() != StatusCode::OK {
                    failures.push(format!(
                        "{slug}: {} {}",
                        resp.status(),
                        resp.text().await.unwrap_or_default()
                    ));
                }
            }
            failures
        });
    }
    let failures: Vec<String> = clients.join_all().await.into_iter().flatten().collect();
    stop.cancel();
    let (peak, samples) = sampler.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(samples > 10, "the sampler ran ({samples} samples)");
    assert!(peak <= BUDGET, "peak {peak} router connections > budget {BUDGET}");
    assert!(peak >= BUDGET / 2, "the budget was used (peak {peak})");
    let metrics = stack.router_metrics().await.unwrap();
    assert!(
        metrics.contains(r#"silo_router_pool_evictions_total{cause="budget"}"#),
        "{metrics}"
    );
}

/// A tenant over its plan's rate gets 429 `rate_limited` with `Retry-After`; another
/// tenant's concurrent requests all succeed.
/// Sessions of `database` waiting for a lock.
async fn sessions_waiting_for_a_lock(stack: &Stack, database: &str) -> i64 {
    let mut admin = superuser(stack).await;
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'")
        .bind(database)
        .fetch_one(&mut admin)
        .await
        .unwrap()
}

/// With the budget spent, room made by closing an idle pool goes to the tenant that has no
/// connection, not to a busier tenant's pool waiting to grow (which gets its own connection
/// back when its request is done).
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_without_a_connection_gets_the_room_before_a_pool_that_grows() {
    let stack =
        stack_with("connection_budget_per_server = 2\nmax_connections_per_tenant = 2\nbudget_wait = \"3s\"").await;
    let mut tenants = Vec::new();
    for _ in 0..3 {
        let slug = unique_name("gr");
        let key = stack.create_tenant(&slug).await.unwrap();
        tenants.push((slug, key));
    }
    let [(busy, busy_key), (idle, idle_key), (new, new_key)] = &tenants[..] else {
        unreachable!()
    };
    let created = stack
        .tenant_request(Method::POST, &format!("{busy}.localhost"), "/api/v1/tasks")
        .bearer_auth(busy_key)
        .json(&serde_json::json!({ "title": "contended" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let task = created.json::<serde_json::Value>().await.unwrap()["id"].clone();
    assert_eq!(
        stack.tenant_get(idle, idle_key, "/api/v1/me").await.unwrap().status(),
        StatusCode::OK
    );

    // The busy tenant's requests wait on a row lock: its first holds its one connection, its
    // second waits for budget to grow the pool. The budget (2) is spent: busy 1 + idle 1.
    let busy_db = stack.database_of(busy).await.unwrap();
    let mut locker = stack.pg().admin_options(&busy_db).connect().await.unwrap();
    let mut lock = locker.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE")
        .bind(task.as_i64().unwrap())
        .execute(&mut *lock)
        .await
        .unwrap();
    let update = || {
        stack
            .tenant_request(
                Method::PATCH,
                &format!("{busy}.localhost"),
                &format!("/api/v1/tasks/{task}"),
            )
            .bearer_auth(busy_key)
            .json(&serde_json::json!({ "done": true }))
            .send()
    };
    let first = tokio::spawn(update());
    for _ in 0..100 {
        if sessions_waiting_for_a_lock(&stack, &busy_db).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sessions_waiting_for_a_lock(&stack, &busy_db).await, 1);
    let second = tokio::spawn(update());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A tenant with no pool: the idle tenant's pool is closed for it, and the room is its.
    let served = stack.tenant_get(new, new_key, "/api/v1/me").await.unwrap();
    assert_eq!(served.status(), StatusCode::OK, "the room went to the pool that grows");

    lock.commit().await.unwrap();
    for request in [first, second] {
        assert_eq!(request.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    let metrics = stack.router_metrics().await.unwrap();
    assert!(
        metrics.contains(r#"silo_router_pool_evictions_total{cause="budget"} 1"#),
        "{metrics}"
    );
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_over_its_rate_gets_429_and_others_are_served() {
    let stack = Arc::new(
        Stack::start(StackOptions {
            extra_toml: "[router.plans.tiny]\nrequests_per_second = 1\nburst = 5\nmax_in_flight = 50\n".into(),
            ..StackOptions::default()
        })
        .await
        .unwrap(),
    );
    let (a, b) = (unique_name("noisy"), unique_name("calm"));
    let key_a = stack
        .create_tenant_with(serde_json::json!({ "slug": a, "plan": "tiny" }))
        .await
        .unwrap();
    let key_b = stack.create_tenant(&b).await.unwrap();

    let noisy = {
        let (stack, a, key_a) = (stack.clone(), a.clone(), key_a.clone());
        tokio::spawn(async move {
            let (mut ok, mut limited) = (0, Vec::new());
            for _ in 0..30 {
                let resp = stack.tenant_get(&a, &key_a, "/api/v1/tasks").await.unwrap();
                match resp.status() {
                    StatusCode::OK => ok += 1,
                    StatusCode::TOO_MANY_REQUESTS => {
                        let retry_after = resp.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap();
                        let body: serde_json::Value = resp.json().await.unwrap();
                        limited.push((retry_after, body["error"].as_str().unwrap_or_default().to_owned()));
                    }
                    other => panic!("noisy tenant: unexpected {other}"),
                }
            }
            (ok, limited)
        })
    };
    let mut calm = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (stack, b, key_b) = (stack.clone(), b.clone(), key_b.clone());
        calm.spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..15 {
                let resp = stack.tenant_get(&b, &key_b, "/api/v1/tasks").await.unwrap();
                statuses.push(resp.status());
            }
            statuses
        });
    }
    let (ok, limited) = noisy.await.unwrap();
    let calm: Vec<StatusCode> = calm.join_all().await.into_iter().flatten().collect();
    assert!(calm.iter().all(|s| *s == StatusCode::OK), "the calm tenant: {calm:?}");
    assert!(
        (5..=10).contains(&ok),
        "the noisy tenant got its burst and little more: {ok}"
    );
    assert!(!limited.is_empty());
    assert!(
        limited.iter().all(|(secs, code)| *secs >= 1 && code == "rate_limited"),
        "{limited:?}"
    );
}

/// A client that never finishes its request head is disconnected after
/// `router.header_read_timeout`; a body over `router.max_body_bytes` gets 413 JSON.
#[tokio::test(flavor = "multi_thread")]
async fn slowloris_is_cut_off_and_oversize_bodies_get_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = stack_with("header_read_timeout = \"1s\"").await;
    let slug = unique_name("prot");
    let key = stack.create_tenant(&slug).await.unwrap();

    let mut slow = tokio::net::TcpStream::connect(stack.router_addr()).await.unwrap();
    slow.write_all(b"GET /api/v1/tasks HTTP/1.1\r\nHost: x").await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await;
    let elapsed = started.elapsed();
    assert!(read.is_ok(), "the connection was not closed within 5 s");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "closed after {elapsed:?}"
    );

    let big = serde_json::json!({ "title": "x".repeat(70 * 1024) });
    let resp = stack
        .tenant_request(Method::POST, &format!("{slug}.localhost"), "/api/v1/tasks")
        .bearer_auth(&key)
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "payload_too_large");
    // A body within the limit still works.
    let resp = stack
        .tenant_request(Method::POST, &format!("{slug}.localhost"), "/api/v1/tasks")
        .bearer_auth(&key)
        .json(&serde_json::json!({ "title": "small" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    stack.stop().await.unwrap();
}

/// The tenants' PostgreSQL server stops: requests get 503 `tenant_unavailable` within the
/// connect timeout (no hang); it comes back: requests succeed again, same router.
#[tokio::test(flavor = "multi_thread")]
async fn database_down_is_503_within_the_connect_timeout_and_recovers() {
    let stack = Stack::start(StackOptions {
        connect_timeout: Duration::from_secs(2),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let slug = unique_name("down");
    let key = stack.create_tenant(&slug).await.unwrap();
    let host = format!("{slug}.localhost");
    let get = || {
        stack
            .tenant_request(Method::GET, &host, "/api/v1/tasks")
            .bearer_auth(&key)
            .send()
    };
    assert_eq!(get().await.unwrap().status(), StatusCode::OK);

    stack.pg().stop();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let resp = get().await.unwrap();
        let elapsed = started.elapsed();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(resp.headers().contains_key("retry-after"));
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "tenant_unavailable");
        assert!(elapsed < Duration::from_millis(4500), "answered after {elapsed:?}");
    }

    stack.pg().restart().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if get().await.unwrap().status() == StatusCode::OK {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not serving again after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Once back, it keeps serving.
    for _ in 0..5 {
        assert_eq!(get().await.unwrap().status(), StatusCode::OK);
    }
}

/// A request the router gives up on (`router.request_timeout`) is answered 503
/// `request_timeout`, and its query does not go on running on the tenant's server: sessions
/// carry a `statement_timeout` a second longer.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_past_its_timeout_is_answered_503_and_its_query_stopped_on_the_server() {
    let migrations = tempfile::tempdir().unwrap();
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/tenant/0001_init.sql");
    std::fs::copy(shipped, migrations.path().join("0001_init.sql")).unwrap();
    // Reading a task takes 60 s: a runaway query.
    std::fs::write(
        migrations.path().join("0002_slow_reads.sql"),
        "CREATE FUNCTION slow_read() RETURNS boolean LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_sleep(60); RETURN true; END $$;\n\
         ALTER TABLE tasks ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;\n\
         CREATE POLICY slow_reads ON tasks FOR SELECT USING (slow_read());\n",
    )
    .unwrap();
    let stack = Stack::start(StackOptions {
        tenant_migrations_dir: Some(migrations.path().to_owned()),
        router_toml: "request_timeout = \"2s\"\n".into(),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let slug = unique_name("rt");
    let key = stack.create_tenant(&slug).await.unwrap();
    let database = stack.database_of(&slug).await.unwrap();
    let mut admin = stack.pg().admin_options(&database).connect().await.unwrap();
    sqlx::query("INSERT INTO tasks (title) VALUES ('behind a slow policy')")
        .execute(&mut admin)
        .await
        .unwrap();

    let started = Instant::now();
    let resp = stack.tenant_get(&slug, &key, "/api/v1/tasks").await.unwrap();
    let waited = started.elapsed();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "request_timeout", "{body}");
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(10),
        "{waited:?}"
    );

    // The query stops on the server within the margin, not after its 60 s.
    let running = || async {
        let mut admin = stack.pg().admin_options("postgres").connect().await.unwrap();
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND state = 'active' \
             AND query ILIKE '%tasks%'",
        )
        .bind(&database)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        n
    };
    let deadline = Instant::now() + Duration::from_secs(6);
    while running().await > 0 {
        assert!(Instant::now() < deadline, "the query still runs 8 s after its request");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let me = stack.tenant_get(&slug, &key, "/api/v1/me").await.unwrap();
    assert_eq!(me.status(), StatusCode::OK, "the tenant is served");
    stack.stop().await.unwrap();
}
