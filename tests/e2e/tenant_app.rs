//! The tenant app over real HTTP against a real tenant database: CRUD, pagination, auth
//! (including a key of another tenant's database), and every error code of the contract.
//!
//! Each test gets its own database on the process's shared cluster and its own
//! `SingleTenantServer` on 127.0.0.1:0, exactly as the standalone bin serves; the test of the
//! OpenAPI document goes through the router of a `Stack`, as tenants' clients do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{ALLOW, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{Client, Method, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};
use silo_tenant_app::{
    api_keys, BudgetPermit, ConnectionBudget, DbPool, DbPoolSettings, SingleTenantServer, TakePermit, TenantContext,
    VERIFIED_KEY_TTL,
};
use silo_tests::openapi::{operations, resolve};
use silo_tests::pg::TestCluster;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use tokio::net::TcpListener;

/// A new empty database on `pg`; its name.
async fn fresh_database(pg: &TestCluster) -> String {
    let db = unique_name("tapp_");
    pg.create_database(&db).await.unwrap();
    db
}

/// Applies the tenant migrations to the database `options` reach and stores API key `ci`;
/// returns a pool on that database and the key.
async fn migrated_with_key(options: PgConnectOptions) -> (PgPool, String) {
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .unwrap();
    sqlx::migrate!("../migrations/tenant").run(&pool).await.unwrap();
    let (key, hash) = api_keys::generate();
    api_keys::insert(&pool, "ci", &hash).await.unwrap();
    (pool, key)
}

/// A connection to `pg`'s `postgres` database, to count sessions from.
async fn observer(pg: &TestCluster) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .connect_with(pg.admin_options("postgres"))
        .await
        .unwrap()
}

/// A tenant database with the tenant schema and one key, served over HTTP.
struct Tenant {
    slug: String,
    base: String,
    key: String,
    http: Client,
    /// The test's own pool on the tenant database (the server has another).
    pool: PgPool,
}

impl Tenant {
    /// A fresh database on the shared cluster, migrated, with key `ci`, and its server.
    async fn start() -> Tenant {
        let pg = TestCluster::shared().await;
        let db = fresh_database(pg).await;
        Tenant::serve(pg.admin_options(&db)).await
    }

    async fn serve(options: PgConnectOptions) -> Tenant {
        silo_tests::init_logging();
        let (pool, key) = migrated_with_key(options.clone()).await;
        let slug = unique_name("t");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // The pool the standalone bin uses.
        let served = DbPool::connect(options, DbPoolSettings::new(4, std::time::Duration::from_secs(2)))
            .await
            .unwrap();
        let server = SingleTenantServer::new(listener, TenantContext::new(slug.clone(), served));
        let base = format!("http://{}", server.local_addr().unwrap());
        tokio::spawn(server.run(std::future::pending()));
        Tenant {
            slug,
            base,
            key,
            http: Client::new(),
            pool,
        }
    }

    /// A request with this tenant's key.
    fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    async fn create(&self, title: &str) -> Value {
        let resp = self
            .req(Method::POST, "/api/v1/tasks")
            .json(&json!({ "title": title }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        resp.json().await.unwrap()
    }
}

/// Asserts an error response: status, JSON `error` code, a non-empty message.
async fn assert_error(resp: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(resp.status(), status, "{}", resp.url());
    assert_eq!(
        resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], code, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    body
}

fn assert_rfc3339(v: &Value) {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    // e.g. 2026-11-26T10:00:00.123456Z
    assert!(
        s.len() >= 20 && &s[4..5] == "-" && &s[10..11] == "T" && s.ends_with('Z'),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn crud_round_trip() {
    let t = Tenant::start().await;

    let created = t.create("write the docs").await;
    let id = created["id"].as_i64().expect("numeric id");
    assert_eq!(created["title"], "write the docs");
    assert_eq!(created["done"], false);
    assert_rfc3339(&created["created_at"]);
    assert_eq!(created["created_at"], created["updated_at"]);

    let path = format!("/api/v1/tasks/{id}");
    let got: Value = t.req(Method::GET, &path).send().await.unwrap().json().await.unwrap();
    assert_eq!(got, created);

    // An empty patch changes nothing, not even updated_at.
    let resp = t.req(Method::PATCH, &path).json(&json!({})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap(), created);

    let resp = t
        .req(Method::PATCH, &path)
        .json(&json!({ "done": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let patched: Value = resp.json().await.unwrap();
    assert_eq!(patched["done"], true);
    assert_eq!(patched["title"], "write the docs");
    assert_eq!(patched["created_at"], created["created_at"]);
    assert_ne!(patched["updated_at"], created["updated_at"]);

    let patched: Value = t
        .req(Method::PATCH, &path)
        .json(&json!({ "title": "write better docs", "done": false }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(patched["title"], "write better docs");
    assert_eq!(patched["done"], false);
    let got: Value = t.req(Method::GET, &path).send().await.unwrap().json().await.unwrap();
    assert_eq!(got, patched);

    // POST honours "done", and the row is really in the tenant's database.
    let second = t
        .req(Method::POST, "/api/v1/tasks")
        .json(&json!({ "title": "ship", "done": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::CREATED);
    assert_eq!(second.json::<Value>().await.unwrap()["done"], true);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(rows, 2);

    let resp = t.req(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.bytes().await.unwrap().is_empty());
    for method in [Method::GET, Method::DELETE] {
        let resp = t.req(method, &path).send().await.unwrap();
        assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
    }
    let resp = t
        .req(Method::PATCH, &path)
        .json(&json!({ "done": true }))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pagination_walks_every_task_once() {
    let t = Tenant::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(t.create(&format!("task {i}")).await["id"].as_i64().unwrap());
    }

    let mut seen = Vec::new();
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/api/v1/tasks?limit=2".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let resp = t.req(Method::GET, &path).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let page: Value = resp.json().await.unwrap();
        let items = page["items"].as_array().unwrap();
        pages.push(items.len());
        seen.extend(items.iter().map(|task| task["id"].as_i64().unwrap()));
        match &page["next_cursor"] {
            Value::Null => break,
            Value::String(c) => cursor = Some(c.clone()),
            other => panic!("next_cursor: {other}"),
        }
        assert!(pages.len() < 10, "pagination does not end");
    }
    assert_eq!(pages, [2, 2, 1]);
    assert_eq!(seen, ids, "every task once, by ascending id");

    // A page that ends exactly at the last task says so (no empty extra page).
    let page: Value = t
        .req(Method::GET, "/api/v1/tasks?limit=5")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 5);
    assert_eq!(page["next_cursor"], Value::Null);

    // Default limit (50) returns everything here.
    let page: Value = t
        .req(Method::GET, "/api/v1/tasks")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 5);
    assert_eq!(page["next_cursor"], Value::Null);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_list_parameters_are_invalid_requests() {
    let t = Tenant::start().await;
    for query in [
        "limit=abc",
        "limit=0",
        "limit=201",
        "limit=-1",
        "cursor=not-a-cursor",
        "cursor=",
        "colour=blue",
    ] {
        let resp = t
            .req(Method::GET, &format!("/api/v1/tasks?{query}"))
            .send()
            .await
            .unwrap();
        assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    let resp = t.req(Method::GET, "/api/v1/tasks?limit=200").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn me_names_the_tenant_and_the_key() {
    let t = Tenant::start().await;
    let (key, hash) = api_keys::generate();
    api_keys::insert(&t.pool, "deploy-bot", &hash).await.unwrap();
    // Idempotent on the name: a second insert neither fails nor replaces the key.
    let (_, other_hash) = api_keys::generate();
    api_keys::insert(&t.pool, "deploy-bot", &other_hash).await.unwrap();

    let resp = t.req(Method::GET, "/api/v1/me").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({ "tenant": t.slug, "key": "ci" })
    );
    let resp = t
        .http
        .get(format!("{}/api/v1/me", t.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({ "tenant": t.slug, "key": "deploy-bot" })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_without_a_valid_key_are_unauthorized() {
    let t = Tenant::start().await;
    let (unknown_key, _) = api_keys::generate();
    let me = format!("{}/api/v1/me", t.base);
    let tasks = format!("{}/api/v1/tasks", t.base);
    let attempts = [
        t.http.get(&me),
        t.http.get(&me).header("authorization", "Basic Y2k6Y2k="),
        t.http.get(&me).header("authorization", "Bearer"),
        t.http.get(&me).bearer_auth("not-a-key"),
        t.http.get(&me).bearer_auth(&unknown_key),
        t.http.get(&tasks).bearer_auth(&unknown_key),
        // Auth comes before input checks: no hint about the body to an anonymous caller.
        t.http.post(&tasks).body("{oops"),
    ];
    for attempt in attempts {
        let resp = attempt.send().await.unwrap();
        assert_eq!(
            resp.headers().get(WWW_AUTHENTICATE).map(|v| v.as_bytes()),
            Some(&b"Bearer"[..])
        );
        assert_error(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_of_another_tenant_database_is_unknown() {
    let (a, b) = tokio::join!(Tenant::start(), Tenant::start());
    for t in [&a, &b] {
        let resp = t.req(Method::GET, "/api/v1/me").send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    // Both keys are named "ci", but each exists only in its own tenant's database.
    for (key, server) in [(&a.key, &b), (&b.key, &a)] {
        let resp = server
            .http
            .get(format!("{}/api/v1/tasks", server.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_error(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_key_stops_working_within_the_verified_key_ttl() {
    let t = Tenant::start().await;
    let me = || t.req(Method::GET, "/api/v1/me").send();
    assert_eq!(me().await.unwrap().status(), StatusCode::OK);

    sqlx::query("DELETE FROM api_keys WHERE name = 'ci'")
        .execute(&t.pool)
        .await
        .unwrap();
    let deleted = std::time::Instant::now();
    let limit = VERIFIED_KEY_TTL + std::time::Duration::from_secs(2);
    loop {
        let resp = me().await.unwrap();
        if resp.status() == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(deleted.elapsed() < limit, "a deleted key still works after {limit:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Once refused, it stays refused: only confirmations are remembered.
    for _ in 0..3 {
        assert_error(me().await.unwrap(), StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_is_an_invalid_request() {
    let t = Tenant::start().await;
    for body in ["{\"title\": ", "not json", "", "{\"title\":\"a\"} trailing"] {
        let resp = t
            .req(Method::POST, "/api/v1/tasks")
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    let id = t.create("x").await["id"].as_i64().unwrap();
    let resp = t
        .req(Method::PATCH, &format!("/api/v1/tasks/{id}"))
        .header(CONTENT_TYPE, "application/json")
        .body("{,}")
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_tasks_fail_validation() {
    let t = Tenant::start().await;
    let invalid = [
        json!({ "title": "" }),
        json!({ "title": "a".repeat(501) }),
        json!({ "title": "é".repeat(501) }),
        json!({ "title": "nul\u{0}byte" }),
        json!({ "title": 5 }),
        json!({ "title": null }),
        json!({ "title": "ok", "done": "yes" }),
        json!({ "title": "ok", "done": null }),
        json!({ "title": "ok", "owner": "me" }),
        json!({ "done": true }),
        json!(["title"]),
    ];
    for body in &invalid {
        let resp = t.req(Method::POST, "/api/v1/tasks").json(body).send().await.unwrap();
        assert_error(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    }

    // 500 characters is the limit, counted as characters, not bytes (1000 here).
    let longest = "é".repeat(500);
    let task = t.create(&longest).await;
    assert_eq!(task["title"], longest.as_str());

    let path = format!("/api/v1/tasks/{}", task["id"]);
    for body in [
        json!({ "title": "" }),
        json!({ "title": "b".repeat(501) }),
        json!({ "title": null }),
        json!({ "done": 1 }),
        json!({ "id": 7 }),
    ] {
        let resp = t.req(Method::PATCH, &path).json(&body).send().await.unwrap();
        assert_error(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    }
    let unchanged: Value = t.req(Method::GET, &path).send().await.unwrap().json().await.unwrap();
    assert_eq!(unchanged, task);
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_over_64_kib_are_too_large() {
    let t = Tenant::start().await;
    let body = json!({ "title": "x".repeat(64 * 1024) });
    let resp = t.req(Method::POST, "/api/v1/tasks").json(&body).send().await.unwrap();
    assert_error(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    let id = t.create("x").await["id"].as_i64().unwrap();
    let resp = t
        .req(Method::PATCH, &format!("/api/v1/tasks/{id}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn non_json_bodies_are_unsupported_media_types() {
    let t = Tenant::start().await;
    let id = t.create("x").await["id"].as_i64().unwrap();
    let task_path = format!("/api/v1/tasks/{id}");
    for (method, path) in [(Method::POST, "/api/v1/tasks"), (Method::PATCH, task_path.as_str())] {
        for content_type in [None, Some("text/plain"), Some("application/x-www-form-urlencoded")] {
            let mut req = t.req(method.clone(), path).body(r#"{"title":"x"}"#);
            if let Some(content_type) = content_type {
                req = req.header(CONTENT_TYPE, content_type);
            }
            let resp = req.send().await.unwrap();
            assert_error(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await;
        }
    }
    // A charset parameter is fine.
    let resp = t
        .req(Method::POST, "/api/v1/tasks")
        .header(CONTENT_TYPE, "application/json; charset=utf-8")
        .body(r#"{"title":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_tasks_routes_and_methods() {
    let t = Tenant::start().await;
    let resp = t.req(Method::GET, "/api/v1/tasks/999999").send().await.unwrap();
    assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
    for path in [
        "/api/v1/tasks/abc",
        "/api/v1/tasks/1.5",
        "/api/v1/tasks/99999999999999999999",
    ] {
        let resp = t.req(Method::GET, path).send().await.unwrap();
        assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    for path in ["/", "/api/v1/nope", "/api/v2/tasks"] {
        let resp = t.req(Method::GET, path).send().await.unwrap();
        assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
    }
    let resp = t.req(Method::PUT, "/api/v1/tasks").send().await.unwrap();
    let allow = resp
        .headers()
        .get(ALLOW)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    assert_error(resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    let resp = t.req(Method::POST, "/api/v1/me").send().await.unwrap();
    assert_error(resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_is_down_is_tenant_unavailable() {
    // A cluster of its own: this test stops it.
    let pg = TestCluster::start().await.unwrap();
    let db = fresh_database(&pg).await;
    let t = Tenant::serve(pg.admin_options(&db)).await;
    t.create("before").await;

    pg.stop();
    let resp = t.req(Method::GET, "/api/v1/tasks").send().await.unwrap();
    assert!(resp.headers().contains_key("retry-after"));
    let body = assert_error(resp, StatusCode::SERVICE_UNAVAILABLE, "tenant_unavailable").await;
    let message = body["message"].as_str().unwrap();
    for leak in ["127.0.0.1", &pg.port().to_string(), "postgres", "SELECT"] {
        assert!(!message.contains(leak), "{message}");
    }

    // Back up: the pool replaces its broken connections without a restart of the app.
    pg.restart().await.unwrap();
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..50 {
        status = t.req(Method::GET, "/api/v1/tasks").send().await.unwrap().status();
        if status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::OK);
}

/// Sessions on `db` as PostgreSQL counts them.
async fn sessions_on(pool: &PgPool, db: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
        .bind(db)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Sessions on `db` once they have settled at `expected` (a closed connection's backend
/// leaves `pg_stat_activity` a moment after the client hangs up), or after 5 s.
async fn settled_sessions_on(pool: &PgPool, db: &str, expected: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let sessions = sessions_on(pool, db).await;
        if sessions == expected || Instant::now() > deadline {
            return sessions;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pool_reuses_its_busiest_connection_and_closes_one_left_idle() {
    let pg = TestCluster::shared().await;
    let db = fresh_database(pg).await;
    let observer = observer(pg).await;
    let pool = DbPool::connect(pg.admin_options(&db), DbPoolSettings::new(4, Duration::from_secs(2)))
        .await
        .unwrap();
    // Two requests at once: two connections.
    let (first, second) = (pool.acquire().await.unwrap(), pool.acquire().await.unwrap());
    drop((first, second));
    assert_eq!(sessions_on(&observer, &db).await, 2);

    // Requests one at a time keep taking the connection used last; the other idles.
    for _ in 0..10 {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("SELECT 1").execute(&mut *conn).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pool.close_idle(Duration::from_millis(400));
    assert_eq!(pool.size(), 1, "the connection left idle is closed, the busy one kept");
    assert_eq!(settled_sessions_on(&observer, &db, 1).await, 1);

    // Closing waits for the connection a request still holds, then ends every session.
    let held = pool.acquire().await.unwrap();
    let closing = tokio::spawn({
        let pool = pool.clone();
        async move { pool.close_and_wait().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !closing.is_finished(),
        "close_and_wait returned while a connection was out"
    );
    assert!(pool.acquire().await.is_err(), "a closed pool hands out nothing");
    drop(held);
    tokio::time::timeout(Duration::from_secs(5), closing)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pool.size(), 0);
    assert_eq!(settled_sessions_on(&observer, &db, 0).await, 0);
}

/// A budget of `permits` connections shared by the pools given it; gives up after 300 ms.
struct SemaphoreBudget(Arc<tokio::sync::Semaphore>);

impl ConnectionBudget for SemaphoreBudget {
    fn take(&self, _first: bool) -> TakePermit<'_> {
        Box::pin(async move {
            let permit = tokio::time::timeout(Duration::from_millis(300), self.0.clone().acquire_owned()).await;
            permit.ok()?.ok().map(BudgetPermit::new)
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pools_hold_one_budget_permit_per_open_connection_and_wait_for_their_own_when_it_is_spent() {
    let pg = TestCluster::shared().await;
    let db = fresh_database(pg).await;
    let permits = Arc::new(tokio::sync::Semaphore::new(2));
    let settings = DbPoolSettings {
        budget: Some(Arc::new(SemaphoreBudget(permits.clone()))),
        ..DbPoolSettings::new(4, Duration::from_secs(5))
    };
    let (a, b) = (
        DbPool::new(pg.admin_options(&db), settings.clone()),
        DbPool::new(pg.admin_options(&db), settings),
    );

    // Pool a opens two connections: the whole budget.
    let (first, second) = (a.acquire().await.unwrap(), a.acquire().await.unwrap());
    assert_eq!(permits.available_permits(), 0);

    // A third request on a waits for budget, and takes a's own connection when it comes back.
    let third = tokio::spawn({
        let a = a.clone();
        async move {
            let started = Instant::now();
            let mut conn = a.acquire().await.unwrap();
            sqlx::query("SELECT 1").execute(&mut *conn).await.unwrap();
            started.elapsed()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!third.is_finished(), "no connection and no budget: it waits");
    drop(first);
    let waited = third.await.unwrap();
    assert!(
        waited < Duration::from_millis(300),
        "took the returned connection ({waited:?})"
    );
    assert_eq!(a.size(), 2, "no third connection");

    // Pool b has no room: it gets a timeout, not an error from PostgreSQL.
    let refused = b.acquire().await.err().unwrap();
    assert!(matches!(refused, sqlx::Error::PoolTimedOut), "{refused:?}");

    // Connections closed for being idle give their permits back; b can connect then.
    drop(second);
    a.close_idle(Duration::ZERO);
    assert_eq!((a.size(), permits.available_permits()), (0, 2));
    drop(b.acquire().await.unwrap());
    assert_eq!((b.size(), permits.available_permits()), (1, 1));
}

/// Starts the `silo-tenant-app` bin on database `db` with `args`; the child and its address.
async fn standalone_app(pg: &TestCluster, db: &str, args: &[&str]) -> (tokio::process::Child, String) {
    use secrecy::ExposeSecret;
    use tokio::io::AsyncBufReadExt;

    let url = format!(
        "postgres://{}@127.0.0.1:{}/{db}",
        silo_control_plane::localpg::SUPERUSER,
        pg.port()
    );
    let mut app = tokio::process::Command::new(silo_tests::workspace_binary("silo-tenant-app"))
        .args(["--listen", "127.0.0.1:0", "--tenant", "acme"])
        .args(args)
        .env("DATABASE_URL", url)
        .env("PGPASSWORD", pg.password().expose_secret())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(app.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next_line().await.unwrap().expect("the app printed its address");
        if let Some(addr) = line.strip_prefix("listening on http://") {
            return (app, addr.to_owned());
        }
    }
}

/// The standalone bin closes a connection left idle for `--idle-timeout`, and opens one again
/// for the next request.
#[tokio::test(flavor = "multi_thread")]
async fn the_standalone_app_closes_connections_left_idle() {
    silo_tests::init_logging();
    let pg = TestCluster::shared().await;
    let db = fresh_database(pg).await;
    let observer = observer(pg).await;
    let (setup, key) = migrated_with_key(pg.admin_options(&db)).await;
    setup.close().await;

    let (mut app, addr) = standalone_app(pg, &db, &["--idle-timeout", "1s"]).await;
    let http = Client::new();
    let get = || http.get(format!("http://{addr}/api/v1/tasks")).bearer_auth(&key).send();

    assert_eq!(get().await.unwrap().status(), StatusCode::OK);
    assert_eq!(sessions_on(&observer, &db).await, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sessions_on(&observer, &db).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the idle connection is still open after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get().await.unwrap().status(), StatusCode::OK);
    assert_eq!(sessions_on(&observer, &db).await, 1);
    app.kill().await.unwrap();
}

/// A request whose statement waits past the standalone bin's `--statement-timeout` (here on a
/// lock someone else holds) gets 503 then, not a hang; the next one is served.
#[tokio::test(flavor = "multi_thread")]
async fn the_standalone_app_ends_statements_that_run_past_its_timeout() {
    silo_tests::init_logging();
    let pg = TestCluster::shared().await;
    let db = fresh_database(pg).await;
    let (setup, key) = migrated_with_key(pg.admin_options(&db)).await;
    setup.close().await;

    let (mut app, addr) = standalone_app(pg, &db, &["--statement-timeout", "1s"]).await;
    let http = Client::new();
    let get = || {
        http.get(format!("http://{addr}/api/v1/tasks"))
            .bearer_auth(&key)
            .timeout(Duration::from_secs(20))
            .send()
    };
    assert_eq!(get().await.unwrap().status(), StatusCode::OK);

    let mut locker = pg.admin_options(&db).connect().await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let started = Instant::now();
    let blocked = get().await.unwrap();
    let waited = started.elapsed();
    assert_eq!(blocked.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(10),
        "answered after {waited:?}"
    );
    sqlx::raw_sql("ROLLBACK").execute(&mut locker).await.unwrap();
    assert_eq!(get().await.unwrap().status(), StatusCode::OK);
    app.kill().await.unwrap();
}

/// The tenant API's OpenAPI document, as the repository holds it.
const OPENAPI: &str = include_str!("../../tenant-app/src/openapi.json");

/// A tenant's client, through the router: `/api/v1/openapi.json` is served without a key and
/// is the document in the repository; every operation it names answers a real key with a
/// success it lists for that operation and a body of the documented shape, and answers no key
/// with its documented 401.
#[tokio::test(flavor = "multi_thread")]
async fn every_documented_operation_is_served_through_the_router_as_documented() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("doc");
    let key = stack.create_tenant(&slug).await.unwrap();
    let host = format!("{slug}.localhost");
    let resp = stack
        .tenant_request(Method::GET, &host, "/api/v1/openapi.json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
    let served = resp.text().await.unwrap();
    assert!(
        served == OPENAPI,
        "the document served is not tenant-app/src/openapi.json"
    );
    let doc: Value = serde_json::from_str(&served).unwrap();
    let base = doc["servers"][0]["url"].as_str().unwrap();

    let mut checked = 0;
    for (method, path, op) in operations(&doc) {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        // A task of its own for each call on one, so that each can succeed.
        let concrete = if path.contains("{id}") {
            let created = stack
                .tenant_request(Method::POST, &host, "/api/v1/tasks")
                .bearer_auth(&key)
                .json(&json!({ "title": "for the contract" }))
                .send()
                .await
                .unwrap();
            assert_eq!(created.status(), StatusCode::CREATED);
            let task: Value = created.json().await.unwrap();
            path.replace("{id}", &task["id"].to_string())
        } else {
            path.clone()
        };
        let request = || {
            let request = stack.tenant_request(method.clone(), &host, &format!("{base}{concrete}"));
            if op.get("requestBody").is_some() {
                request.json(&json!({ "title": "as documented" }))
            } else {
                request
            }
        };

        let resp = request().bearer_auth(&key).send().await.unwrap();
        let status = resp.status();
        let content_type = resp.headers().get(CONTENT_TYPE).cloned();
        let body = resp.text().await.unwrap();
        let what = format!("{method} {path}: {status} {body}");
        let documented = op["responses"]
            .get(status.as_str())
            .unwrap_or_else(|| panic!("undocumented status: {what}"));
        assert!(status.is_success(), "{what}");
        match resolve(&doc, documented)["content"]["application/json"].get("schema") {
            Some(schema) => {
                assert_eq!(content_type.unwrap(), "application/json", "{what}");
                let body: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {what}"));
                for field in resolve(&doc, schema)["required"].as_array().unwrap() {
                    assert!(body.get(field.as_str().unwrap()).is_some(), "no {field}: {what}");
                }
            }
            None => assert!(body.is_empty(), "a body where none is documented: {what}"),
        }

        let resp = request().send().await.unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        let what = format!("{method} {path} without a key: {status} {body}");
        assert!(
            op["responses"].get(status.as_str()).is_some(),
            "undocumented status: {what}"
        );
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(body["error"], "unauthorized", "{what}");
        checked += 1;
    }
    assert_eq!(checked, 6, "operations in the document");
    stack.stop().await.unwrap();
}

/// The limits the document states are the ones the app enforces: a title of `maxLength`
/// characters is taken and one more is refused, a page of the largest `limit` is served and
/// a larger one refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_documented_limits_are_the_enforced_ones() {
    let t = Tenant::start().await;
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    let body = &doc["paths"]["/tasks"]["post"]["requestBody"]["content"]["application/json"]["schema"];
    let max_title = body["properties"]["title"]["maxLength"].as_u64().unwrap() as usize;
    let resp = t
        .req(Method::POST, "/api/v1/tasks")
        .json(&json!({ "title": "é".repeat(max_title) }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = t
        .req(Method::POST, "/api/v1/tasks")
        .json(&json!({ "title": "é".repeat(max_title + 1) }))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;

    let limit = doc["paths"]["/tasks"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .unwrap();
    let max_limit = limit["schema"]["maximum"].as_u64().unwrap();
    let resp = t
        .req(Method::GET, &format!("/api/v1/tasks?limit={max_limit}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = t
        .req(Method::GET, &format!("/api/v1/tasks?limit={}", max_limit + 1))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
}
