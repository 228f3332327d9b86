//! The router over real sockets: Host and custom-domain routing, hostile Host headers, path
//! mode, the pool map's idle eviction and single build, and the operations port.
//!
//! Metric deltas assume one test per process (`cargo nextest run`): the metrics recorder is
//! process-global.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get_json(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Retries `f` until it returns true; panics after `within`.
async fn eventually<F, Fut>(within: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "condition not met within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `head` (request line and headers, without the final blank line) on a fresh
/// connection and returns (status, body) of the response.
async fn raw(stack: &Stack, head: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(stack.router_addr()).await.unwrap();
    s.write_all(head).await.unwrap();
    s.write_all(b"Connection: close\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Every sample of a Prometheus text exposition, keyed by `name{labels}` as written.
/// Panics on a line that is not a comment or `series value`.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad metrics line {l:?}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad metrics value in {l:?}"));
            (series.to_owned(), value)
        })
        .collect()
}

/// Sum of the samples of `name` whose labels include every `label="value"` in `labels`.
fn metric(samples: &HashMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
            n == name && labels.iter().all(|l| rest.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}

async fn scrape(stack: &Stack) -> HashMap<String, f64> {
    parse_metrics(&stack.router_metrics().await.unwrap())
}

/// Connections open on `db` (any role, any client).
async fn connections_to(stack: &Stack, db: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
        .bind(db)
        .fetch_one(stack.catalog())
        .await
        .unwrap()
}

/// The router's connections open on `db`.
async fn router_connections_to(stack: &Stack, db: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'silo-router'")
        .bind(db)
        .fetch_one(stack.catalog())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn subdomains_and_custom_domains_reach_their_tenant() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (a, b) = (unique_name("ra"), unique_name("rb"));
    let domain = format!("{b}.example.com");
    let key_a = stack.create_tenant(&a).await.unwrap();
    let key_b = stack
        .create_tenant_with(json!({"slug": b, "domains": [domain.to_uppercase()]}))
        .await
        .unwrap();

    for (host, key, tenant) in [
        (format!("{a}.localhost"), &key_a, &a),
        (format!("{}.LOCALHOST.:8080", a.to_uppercase()), &key_a, &a),
        (format!("{b}.localhost"), &key_b, &b),
        (domain.clone(), &key_b, &b),
        (format!("{}:443", domain.to_uppercase()), &key_b, &b),
    ] {
        let (status, me) = get_json(stack.tenant_request(Method::GET, &host, "/api/v1/me").bearer_auth(key)).await;
        assert_eq!(
            (status, &me["tenant"]),
            (StatusCode::OK, &json!(tenant)),
            "{host}: {me}"
        );
    }

    // A base domain in the middle of a host is not a base domain; unknown domains are 404.
    for host in [
        format!("{a}.localhost.evil.com"),
        format!("{a}.example.com"),
        "localhost".into(),
    ] {
        let (status, body) = get_json(
            stack
                .tenant_request(Method::GET, &host, "/api/v1/me")
                .bearer_auth(&key_a),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::NOT_FOUND, Some("tenant_not_found")),
            "{host}"
        );
    }
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_hosts_get_json_errors_and_leak_nothing() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("rh");
    stack.create_tenant(&slug).await.unwrap();
    let db = stack.database_of(&slug).await.unwrap();
    let get = |host: &[u8]| [b"GET /api/v1/tasks HTTP/1.1\r\nHost: ", host, b"\r\n"].concat();

    // The real tenant, unauthenticated: the app itself answers (401), proving the route.
    let (status, body) = raw(
        &stack,
        &get(format!("{}.LOCALHOST:8080", slug.to_uppercase()).as_bytes()),
    )
    .await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).unwrap()["error"].clone()),
        (401, json!("unauthorized"))
    );

    let long = format!("{}.localhost", "a".repeat(290));
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            get(format!("{slug}.localhost.evil.com").as_bytes()),
            404,
            "tenant_not_found",
        ),
        (get(format!("x.{slug}.localhost").as_bytes()), 404, "tenant_not_found"),
        (get(b"localhost"), 404, "tenant_not_found"),
        (get(b"127.0.0.1"), 404, "tenant_not_found"),
        (get(b""), 400, "invalid_host"),
        (get(format!("{slug} .localhost").as_bytes()), 400, "invalid_host"),
        (get(format!("{slug}_x.localhost").as_bytes()), 400, "invalid_host"),
        (get(format!("user@{slug}.localhost").as_bytes()), 400, "invalid_host"),
        (get(format!("\u{fc}{slug}.localhost").as_bytes()), 400, "invalid_host"),
        (get(long.as_bytes()), 400, "invalid_host"),
        (b"GET /api/v1/tasks HTTP/1.1\r\n".to_vec(), 400, "invalid_host"),
        (
            format!("GET / HTTP/1.1\r\nHost: {slug}.localhost\r\nHost: other.localhost\r\n").into_bytes(),
            400,
            "invalid_host",
        ),
        // NUL never reaches the router: hyper's parser refuses the request head (400, no body).
        (get(format!("{slug}\0.localhost").as_bytes()), 400, ""),
    ];
    for (request, want_status, want_error) in cases {
        let (status, body) = raw(&stack, &request).await;
        let shown = String::from_utf8_lossy(&request).into_owned();
        assert_eq!(status, want_status, "{shown:?}: {body}");
        if !want_error.is_empty() {
            let json: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{shown:?}: not JSON: {body}"));
            assert_eq!(json["error"], want_error, "{shown:?}");
            assert!(json["message"].is_string(), "{shown:?}");
        }
        for secret in [slug.as_str(), db.as_str(), "postgres", "127.0.0.1", "sqlx", "password"] {
            assert!(!body.contains(secret), "{shown:?} leaked {secret:?}: {body}");
        }
    }
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn path_mode_strips_the_prefix() {
    let stack = Stack::start(StackOptions {
        path_prefix_routing: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let slug = unique_name("rp");
    let key = stack.create_tenant(&slug).await.unwrap();
    let host = stack.router_addr().to_string();

    let (status, me) = get_json(
        stack
            .tenant_request(Method::GET, &host, &format!("/t/{slug}/api/v1/me"))
            .bearer_auth(&key),
    )
    .await;
    assert_eq!((status, &me["tenant"]), (StatusCode::OK, &json!(slug)), "{me}");
    let (status, task) = get_json(
        stack
            .tenant_request(Method::POST, &host, &format!("/t/{slug}/api/v1/tasks"))
            .bearer_auth(&key)
            .json(&json!({"title": "by path"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    // The query string survives the rewrite.
    let (status, list) = get_json(
        stack
            .tenant_request(Method::GET, &host, &format!("/t/{slug}/api/v1/tasks?limit=1"))
            .bearer_auth(&key),
    )
    .await;
    assert_eq!(
        (status, &list["items"][0]["title"]),
        (StatusCode::OK, &json!("by path")),
        "{list}"
    );
    // Host routing still works in path mode.
    let (status, me) = get_json(
        stack
            .tenant_request(Method::GET, &format!("{slug}.localhost"), "/api/v1/me")
            .bearer_auth(&key),
    )
    .await;
    assert_eq!((status, &me["tenant"]), (StatusCode::OK, &json!(slug)));
    // Unknown or malformed slugs in the path: the router's 404, not the app's.
    for path in ["/t/nobody-here/api/v1/me", "/t/Bad_Slug/api/v1/me", "/api/v1/me"] {
        let (status, body) = get_json(stack.tenant_request(Method::GET, &host, path).bearer_auth(&key)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::NOT_FOUND, Some("tenant_not_found")),
            "{path}"
        );
    }
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_pool_is_closed_and_rebuilt_on_the_next_request() {
    let idle = Duration::from_secs(2);
    let stack = Stack::start(StackOptions {
        pool_idle_timeout: idle,
        ..Default::default()
    })
    .await
    .unwrap();
    let slug = unique_name("ri");
    let key = stack.create_tenant(&slug).await.unwrap();
    let db = stack.database_of(&slug).await.unwrap();
    let host = format!("{slug}.localhost");
    let get = || {
        stack
            .tenant_request(Method::GET, &host, "/api/v1/tasks")
            .bearer_auth(&key)
    };

    // A key lookup and a task query, on the one connection a cold pool opens.
    assert_eq!(get().send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        router_connections_to(&stack, &db).await,
        1,
        "a request opens the tenant's pool, with one connection"
    );
    // Requests one after another take turns on that connection: it is back in the pool as
    // soon as a request is done with it.
    for _ in 0..20 {
        assert_eq!(get().send().await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(
        router_connections_to(&stack, &db).await,
        1,
        "sequential requests opened another connection"
    );
    let before = scrape(&stack).await;

    // No traffic: the sweeper evicts the pool after `idle` and closing it ends every session.
    let took = eventually(idle * 4, || async { connections_to(&stack, &db).await == 0 }).await;
    assert!(took >= idle / 2, "closed too early: {took:?}");
    let after = scrape(&stack).await;
    let idle_evictions = |m: &HashMap<String, f64>| metric(m, "silo_router_pool_evictions_total", &[r#"cause="idle""#]);
    assert!(idle_evictions(&after) > idle_evictions(&before));

    // The next request builds a new pool.
    assert_eq!(get().send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(router_connections_to(&stack, &db).await, 1);
    stack.stop().await.unwrap();
}

/// The budget counts open connections, not pool sizes: with a budget of 4 and up to 2
/// connections per tenant, 4 tenants served one request at a time keep 4 pools of one
/// connection each; a fifth tenant's pool closes the least valuable one, which among tenants
/// with as many requests is the least recently used.
#[tokio::test(flavor = "multi_thread")]
async fn the_budget_counts_open_connections_not_pool_sizes() {
    let stack = Stack::start(StackOptions {
        router_toml: "connection_budget_per_server = 4\nmax_connections_per_tenant = 2".into(),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let mut tenants = Vec::new();
    for _ in 0..5 {
        let slug = unique_name("bc");
        let key = stack.create_tenant(&slug).await.unwrap();
        tenants.push((slug, key));
    }
    let budget_evictions =
        |m: &HashMap<String, f64>| metric(m, "silo_router_pool_evictions_total", &[r#"cause="budget""#]);
    let status = |(slug, key): &(String, String)| {
        let (slug, key) = (slug.clone(), key.clone());
        let stack = &stack;
        async move {
            stack
                .tenant_get(&slug, &key, "/api/v1/tasks?limit=1")
                .await
                .unwrap()
                .status()
        }
    };
    for _ in 0..3 {
        for tenant in &tenants[..4] {
            assert_eq!(status(tenant).await, StatusCode::OK);
        }
    }
    let served = scrape(&stack).await;
    assert_eq!(
        budget_evictions(&served),
        0.0,
        "four one-connection pools fit a budget of four"
    );
    assert_eq!(metric(&served, "silo_router_pools_open", &[]), 4.0);
    assert_eq!(metric(&served, "silo_router_server_budget_reserved", &[]), 4.0);

    assert_eq!(status(&tenants[4]).await, StatusCode::OK);
    let after = scrape(&stack).await;
    assert_eq!(budget_evictions(&after), 1.0, "the fifth pool made room");
    assert_eq!(metric(&after, "silo_router_pools_open", &[]), 4.0);
    assert_eq!(metric(&after, "silo_router_server_budget_reserved", &[]), 4.0);
    // The evicted pool was the least recently used: the first tenant's.
    let first = stack.database_of(&tenants[0].0).await.unwrap();
    eventually(Duration::from_secs(5), || async {
        router_connections_to(&stack, &first).await == 0
    })
    .await;
    stack.stop().await.unwrap();
}

/// A stack whose router has the settings `router_toml`, with `n` tenants named `prefix…`:
/// their slugs, API keys and database names.
async fn stack_with_tenants(router_toml: &str, prefix: &str, n: usize) -> (Stack, Vec<(String, String, String)>) {
    let stack = Stack::start(StackOptions {
        router_toml: router_toml.into(),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let mut tenants = Vec::new();
    for _ in 0..n {
        let slug = unique_name(prefix);
        let key = stack.create_tenant(&slug).await.unwrap();
        let db = stack.database_of(&slug).await.unwrap();
        tenants.push((slug, key, db));
    }
    (stack, tenants)
}

/// A full budget closes the pool of the tenant that made the fewest requests lately, not the
/// least recently used one: a busy tenant between two bursts keeps its connection while
/// tenants seen once come and go.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_budget_closes_the_least_valuable_pool_not_the_least_recently_used() {
    let (stack, tenants) = stack_with_tenants(
        "connection_budget_per_server = 3\nmax_connections_per_tenant = 1",
        "lv",
        4,
    )
    .await;
    let get = |(slug, key, _): &(String, String, String)| {
        let (slug, key) = (slug.clone(), key.clone());
        let stack = &stack;
        async move {
            stack
                .tenant_get(&slug, &key, "/api/v1/tasks?limit=1")
                .await
                .unwrap()
                .status()
        }
    };
    let [busy, once, later, newcomer] = &tenants[..] else {
        unreachable!()
    };
    for _ in 0..5 {
        assert_eq!(get(busy).await, StatusCode::OK);
    }
    assert_eq!(get(once).await, StatusCode::OK);
    assert_eq!(get(later).await, StatusCode::OK);

    // The budget is full; the busy tenant is the least recently used.
    assert_eq!(get(newcomer).await, StatusCode::OK);
    let after = scrape(&stack).await;
    assert_eq!(
        metric(&after, "silo_router_pool_evictions_total", &[r#"cause="budget""#]),
        1.0
    );
    eventually(Duration::from_secs(5), || async {
        router_connections_to(&stack, &once.2).await == 0
    })
    .await;
    for (tenant, open) in [(busy, 1), (later, 1), (newcomer, 1)] {
        assert_eq!(router_connections_to(&stack, &tenant.2).await, open, "{}", tenant.0);
    }
    stack.stop().await.unwrap();
}

/// When a new pool finds the budget spent, the idle spare connection of a pool that has two
/// makes room before any whole pool is closed: every tenant keeps a connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_spare_connection_makes_room_before_a_pool_is_closed() {
    let (stack, tenants) = stack_with_tenants(
        "connection_budget_per_server = 3\nmax_connections_per_tenant = 2",
        "sp",
        3,
    )
    .await;
    let get = |(slug, key, _): &(String, String, String)| {
        stack
            .tenant_request(Method::GET, &format!("{slug}.localhost"), "/api/v1/tasks?limit=1")
            .bearer_auth(key)
            .send()
    };
    // Concurrent requests grow the first tenant's pool to two connections.
    for _ in 0..50 {
        let burst = futures_join_all((0..16).map(|_| get(&tenants[0]))).await;
        assert!(burst.into_iter().all(|resp| resp.unwrap().status() == StatusCode::OK));
        if router_connections_to(&stack, &tenants[0].2).await == 2 {
            break;
        }
    }
    assert_eq!(router_connections_to(&stack, &tenants[0].2).await, 2);
    assert_eq!(get(&tenants[1]).await.unwrap().status(), StatusCode::OK);
    let full = scrape(&stack).await;
    assert_eq!(metric(&full, "silo_router_server_budget_reserved", &[]), 3.0);

    // The budget is spent: the third tenant's pool takes the first one's spare connection.
    assert_eq!(get(&tenants[2]).await.unwrap().status(), StatusCode::OK);
    let after = scrape(&stack).await;
    assert_eq!(metric(&after, "silo_router_spare_connections_closed_total", &[]), 1.0);
    assert_eq!(
        metric(&after, "silo_router_pool_evictions_total", &[r#"cause="budget""#]),
        0.0,
        "a whole pool was closed although a spare connection was idle"
    );
    assert_eq!(metric(&after, "silo_router_pools_open", &[]), 3.0);
    eventually(Duration::from_secs(5), || async {
        router_connections_to(&stack, &tenants[0].2).await == 1
    })
    .await;
    for tenant in &tenants {
        assert_eq!(get(tenant).await.unwrap().status(), StatusCode::OK);
        assert_eq!(router_connections_to(&stack, &tenant.2).await, 1, "{}", tenant.0);
    }
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_first_requests_build_one_pool() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("rc");
    let key = stack.create_tenant(&slug).await.unwrap();
    let db = stack.database_of(&slug).await.unwrap();
    let host = format!("{slug}.localhost");
    let creations = |m: &HashMap<String, f64>| metric(m, "silo_router_pool_creations_total", &[]);
    let before = creations(&scrape(&stack).await);

    let requests = (0..20).map(|_| {
        stack
            .tenant_request(Method::GET, &host, "/api/v1/me")
            .bearer_auth(&key)
            .send()
    });
    for response in futures_join_all(requests).await {
        assert_eq!(response.unwrap().status(), StatusCode::OK);
    }

    assert_eq!(
        creations(&scrape(&stack).await) - before,
        1.0,
        "20 concurrent first requests build one pool"
    );
    let max = i64::from(stack.config().router.max_connections_per_tenant);
    let open = connections_to(&stack, &db).await;
    assert!((1..=max).contains(&open), "{open} connections, pool cap {max}");
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn per_tenant_series_appear_when_the_operator_opts_in() {
    let stack = Stack::start(StackOptions {
        router_toml: "per_tenant_metrics = true\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (a, b) = (unique_name("pa"), unique_name("pb"));
    let key_a = stack.create_tenant(&a).await.unwrap();
    stack.create_tenant(&b).await.unwrap();
    for _ in 0..2 {
        let resp = stack.tenant_get(&a, &key_a, "/api/v1/me").await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    // A's key at B: B's series, as a client error.
    let resp = stack.tenant_get(&b, &key_a, "/api/v1/me").await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let m = scrape(&stack).await;
    let tenant = |slug: &str, class: &str| {
        metric(
            &m,
            "silo_router_tenant_requests_total",
            &[&format!("tenant=\"{slug}\""), &format!("status_class=\"{class}\"")],
        )
    };
    assert_eq!(tenant(&a, "2xx"), 2.0);
    assert_eq!(tenant(&b, "4xx"), 1.0);
    assert_eq!(tenant(&b, "2xx"), 0.0);
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn ops_port_reports_health_and_metrics_that_move_with_traffic() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("rm");
    let key = stack.create_tenant(&slug).await.unwrap();
    let ops = format!("http://{}", stack.ops_addr());
    let http = reqwest::Client::new();

    assert_eq!(
        http.get(format!("{ops}/healthz")).send().await.unwrap().status(),
        StatusCode::OK
    );
    eventually(Duration::from_secs(5), || async {
        http.get(format!("{ops}/readyz")).send().await.unwrap().status() == StatusCode::OK
    })
    .await;

    let forwarded = |m: &HashMap<String, f64>| {
        metric(
            m,
            "silo_router_requests_total",
            &[r#"outcome="forwarded""#, r#"status_class="2xx""#],
        )
    };
    let not_found = |m: &HashMap<String, f64>| {
        metric(
            m,
            "silo_router_requests_total",
            &[r#"outcome="tenant_not_found""#, r#"status_class="4xx""#],
        )
    };
    let durations = |m: &HashMap<String, f64>| metric(m, "silo_router_request_duration_seconds_count", &[]);
    let lookups = |m: &HashMap<String, f64>| metric(m, "silo_router_directory_lookups_total", &[]);
    let before = scrape(&stack).await;

    let host = format!("{slug}.localhost");
    for _ in 0..3 {
        let resp = stack
            .tenant_request(Method::GET, &host, "/api/v1/me")
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let unknown = format!("{}.localhost", unique_name("nobody"));
    let resp = stack
        .tenant_request(Method::GET, &unknown, "/api/v1/me")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    let after = scrape(&stack).await;
    assert_eq!(forwarded(&after) - forwarded(&before), 3.0);
    assert_eq!(not_found(&after) - not_found(&before), 1.0);
    assert_eq!(durations(&after) - durations(&before), 4.0);
    assert!(lookups(&after) - lookups(&before) >= 4.0);
    assert!(metric(&after, "silo_router_pools_open", &[]) >= 1.0);
    assert!(after
        .keys()
        .any(|k| k.starts_with("silo_router_request_duration_seconds_bucket{")));
    // Bounded labels: no series names a tenant.
    assert!(
        after.keys().all(|k| !k.contains(&slug)),
        "a metric series names the tenant"
    );
    stack.stop().await.unwrap();
}

/// The stack's catalog database name (the last path segment of `catalog_url`).
fn catalog_db(stack: &Stack) -> String {
    stack.config().catalog.url.rsplit('/').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn events_still_arrive_after_the_listener_connection_is_killed() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("rl");
    let key = stack.create_tenant(&slug).await.unwrap();
    let host = format!("{slug}.localhost");
    let get = || stack.tenant_request(Method::GET, &host, "/api/v1/me").bearer_auth(&key);
    assert_eq!(get().send().await.unwrap().status(), StatusCode::OK);

    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = 'silo-router' AND query ILIKE 'LISTEN%'",
    )
    .bind(catalog_db(&stack))
    .fetch_all(stack.catalog())
    .await
    .unwrap();
    assert_eq!(killed, [true], "exactly one LISTEN session per router");

    // The router reconnects (readiness recovers) and the next change still reaches it.
    let ops = format!("http://{}/readyz", stack.ops_addr());
    eventually(Duration::from_secs(5), || async {
        reqwest::get(&ops).await.unwrap().status() == StatusCode::OK
    })
    .await;
    let (status, _) = stack
        .admin(Method::POST, &format!("/v1/tenants/{slug}/suspend"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    eventually(Duration::from_secs(2), || async {
        get().send().await.unwrap().status() == StatusCode::FORBIDDEN
    })
    .await;
    stack.stop().await.unwrap();
}

/// Pooled catalog connections cut while idle (a catalog restart or failover, an idle timeout
/// on the way) are found dead and replaced before a statement runs on them: the next
/// lookups of router and control plane succeed.
#[tokio::test(flavor = "multi_thread")]
async fn catalog_connections_cut_while_idle_are_replaced_before_use() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (first, second) = (unique_name("rc"), unique_name("rc"));
    let first_key = stack.create_tenant(&first).await.unwrap();
    let second_key = stack.create_tenant(&second).await.unwrap();
    let get = |slug: &str, key: &str| {
        stack
            .tenant_request(Method::GET, &format!("{slug}.localhost"), "/api/v1/me")
            .bearer_auth(key)
            .send()
    };
    assert_eq!(get(&first, &first_key).await.unwrap().status(), StatusCode::OK);

    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid() AND query NOT ILIKE 'LISTEN%'",
    )
    .bind(catalog_db(&stack))
    .fetch_all(stack.catalog())
    .await
    .unwrap();
    assert!(cut.len() >= 2, "router and control plane had catalog connections open");
    tokio::time::sleep(silo_control_plane::pooling::PING_IDLE_AFTER + Duration::from_millis(500)).await;

    // Not cached by the router yet: resolved through its catalog pool.
    assert_eq!(get(&second, &second_key).await.unwrap().status(), StatusCode::OK);
    let (status, body) = stack.admin(Method::GET, "/v1/tenants", None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn known_tenants_are_served_while_the_catalog_fails() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("rf");
    let key = stack.create_tenant(&slug).await.unwrap();
    let host = format!("{slug}.localhost");
    let get = |host: String| stack.tenant_request(Method::GET, &host, "/api/v1/me").bearer_auth(&key);
    assert_eq!(get(host.clone()).send().await.unwrap().status(), StatusCode::OK);

    // Break the read model, then announce a change so the router drops its cache.
    sqlx::query("ALTER TABLE tenants RENAME TO tenants_away")
        .execute(stack.catalog())
        .await
        .unwrap();
    sqlx::query("SELECT pg_notify('silo_tenant_events', $1)")
        .bind(&slug)
        .execute(stack.catalog())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    for _ in 0..3 {
        let (status, me) = get_json(get(host.clone())).await;
        assert_eq!(
            (status, &me["tenant"]),
            (StatusCode::OK, &json!(slug)),
            "known tenant keeps being served"
        );
    }
    let unknown = format!("{}.localhost", unique_name("nobody"));
    let resp = get(unknown).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "tenant_unavailable");

    sqlx::query("ALTER TABLE tenants_away RENAME TO tenants")
        .execute(stack.catalog())
        .await
        .unwrap();
    stack.stop().await.unwrap();
}

/// A second router on the stack's configuration, started after everything the test set up:
/// it has served no request and received no tenant event. Ready when this returns.
struct LateRouter {
    addr: std::net::SocketAddr,
    ops: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl LateRouter {
    async fn start(stack: &Stack) -> LateRouter {
        let router = silo_router::RouterServer::bind(stack.config().clone()).await.unwrap();
        let (addr, ops) = (router.local_addr(), router.ops_addr());
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(router.run(stop.clone()));
        let ready = format!("http://{ops}/readyz");
        eventually(Duration::from_secs(10), || async {
            reqwest::get(&ready).await.unwrap().status() == StatusCode::OK
        })
        .await;
        LateRouter { addr, ops, stop, task }
    }

    async fn get(&self, host: &str, key: &str) -> reqwest::Response {
        reqwest::Client::new()
            .get(format!("http://{}/api/v1/me", self.addr))
            .header(reqwest::header::HOST, host)
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
    }

    async fn metrics(&self) -> HashMap<String, f64> {
        let text = reqwest::get(format!("http://{}/metrics", self.ops)).await.unwrap();
        parse_metrics(&text.text().await.unwrap())
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A router loads every tenant's route when it starts: a tenant's first request finds it
/// without asking the catalog, and tenants nobody has requested yet are served through a
/// catalog outage too, by slug and by custom domain.
#[tokio::test(flavor = "multi_thread")]
async fn a_router_serves_tenants_it_never_saw_through_a_catalog_outage() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (a, b) = (unique_name("rl"), unique_name("rl"));
    let domain = format!("{b}.example.com");
    let key_a = stack.create_tenant(&a).await.unwrap();
    let key_b = stack
        .create_tenant_with(json!({"slug": b, "domains": [domain]}))
        .await
        .unwrap();
    let late = LateRouter::start(&stack).await;

    let resp = late.get(&format!("{a}.localhost"), &key_a).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let lookups = late.metrics().await;
    let outcome = |result: &str| {
        metric(
            &lookups,
            "silo_router_directory_lookups_total",
            &[&format!("result=\"{result}\"")],
        )
    };
    assert_eq!(
        (outcome("hit"), outcome("miss")),
        (1.0, 0.0),
        "the first request found the route loaded"
    );

    // The catalog's read model breaks: lookups fail from here on.
    sqlx::query("ALTER TABLE tenants RENAME TO tenants_away")
        .execute(stack.catalog())
        .await
        .unwrap();
    let (status, me) = get_json(
        reqwest::Client::new()
            .get(format!("http://{}/api/v1/me", late.addr))
            .header(reqwest::header::HOST, &domain)
            .bearer_auth(&key_b),
    )
    .await;
    assert_eq!(
        (status, &me["tenant"]),
        (StatusCode::OK, &json!(b)),
        "never requested, served by its domain"
    );
    assert_eq!(
        late.get(&format!("{b}.localhost"), &key_b).await.status(),
        StatusCode::OK
    );
    let unknown = late.get(&format!("{}.localhost", unique_name("nobody")), &key_a).await;
    assert_eq!(unknown.status(), StatusCode::SERVICE_UNAVAILABLE);

    sqlx::query("ALTER TABLE tenants_away RENAME TO tenants")
        .execute(stack.catalog())
        .await
        .unwrap();
    late.stop().await;
    stack.stop().await.unwrap();
}

/// An event about one tenant re-reads that tenant's route only: while a tenant's credentials
/// rotate, the others' requests keep finding their routes in the cache (a fleet-wide
/// rotation does not send every request to the catalog), and so does its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_event_leaves_the_other_tenants_routes_cached() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (a, b) = (unique_name("re"), unique_name("re"));
    let domain = format!("{a}.example.com");
    let key_a = stack
        .create_tenant_with(json!({"slug": a, "domains": [domain]}))
        .await
        .unwrap();
    let key_b = stack.create_tenant(&b).await.unwrap();
    let requests = [
        (format!("{a}.localhost"), &key_a),
        (domain.clone(), &key_a),
        (format!("{b}.localhost"), &key_b),
    ];
    let serve_all = || async {
        for (host, key) in &requests {
            let resp = stack
                .tenant_request(Method::GET, host, "/api/v1/me")
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{host}");
        }
    };
    serve_all().await;
    let misses = |m: &HashMap<String, f64>| metric(m, "silo_router_directory_lookups_total", &[r#"result="miss""#]);
    let before = misses(&scrape(&stack).await);

    let job = stack.rotate(&b, "single").await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    serve_all().await;
    assert_eq!(
        misses(&scrape(&stack).await),
        before,
        "rotating one tenant sent requests to the catalog"
    );
    stack.stop().await.unwrap();
}

/// Awaits all `futures` concurrently (without pulling in the `futures` crate).
async fn futures_join_all<F: std::future::Future + Send + 'static>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
