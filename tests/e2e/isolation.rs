//! Isolation below the API: the router's self-check (a pooled connection that lands in
//! another tenant's database, here through tenant A's secret tampered to hold tenant B's
//! credentials, is refused; A's requests fail closed and never see B's data), and what a
//! tenant's own database login can learn of the other tenants on its server.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use secrecy::SecretString;
use serde_json::{json, Value};
use silo_control_plane::secrets::{self, AWSCURRENT};
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::{secret_connect_options, unique_name};
use sqlx::{ConnectOptions, Connection};

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_into_another_tenants_database_is_refused() {
    let stack = Stack::start(StackOptions {
        connect_timeout: Duration::from_secs(2),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let (a, b) = (unique_name("victim"), unique_name("other"));
    let key_a = stack.create_tenant(&a).await.unwrap();
    let key_b = stack.create_tenant(&b).await.unwrap();
    let resp = stack
        .tenant_request(Method::POST, &format!("{b}.localhost"), "/api/v1/tasks")
        .bearer_auth(&key_b)
        .json(&json!({"title": "b's secret task"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);

    // Tamper with A's secret before the router ever opened A's pool.
    let (_, creds_b) = stack
        .admin(Method::GET, &format!("/v1/tenants/{b}/credentials"), None)
        .await
        .unwrap();
    let store = secrets::open(&stack.config().secrets, stack.catalog().clone())
        .await
        .unwrap();
    let version = format!("{:032x}", rand::random::<u128>());
    store
        .put_secret_value(
            &stack.secret_name(&a),
            &version,
            &SecretString::from(creds_b.to_string()),
            &[AWSCURRENT],
        )
        .await
        .unwrap();

    let resp = stack.tenant_get(&a, &key_a, "/api/v1/tasks").await.unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "tenant_unavailable");
    assert!(!body.to_string().contains("secret task"), "{body}");
    // Had the connection been accepted, B's database would have answered 401 (A's key is
    // unknown there): 503 shows the self-check refused it.
    stack.stop().await.unwrap();
}

/// Every role on a PostgreSQL server can list its databases, roles and sessions, and read
/// each database's activity counters: with tenant A's own login, none of that says which
/// customers share A's server, and the catalog that would say it does not let A in.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_login_cannot_tell_which_tenants_share_its_server() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (a, b) = (unique_name("nosy"), unique_name("initech"));
    stack.create_tenant(&a).await.unwrap();
    stack.create_tenant(&b).await.unwrap();
    // B is busy: a session of its own is open on its database.
    let mut busy = secret_connect_options(&stack.credentials(&b).await.unwrap())
        .connect()
        .await
        .unwrap();
    sqlx::query("SELECT 1").execute(&mut busy).await.unwrap();

    let mut nosy = secret_connect_options(&stack.credentials(&a).await.unwrap())
        .connect()
        .await
        .unwrap();
    let mut seen = Vec::new();
    for sql in [
        "SELECT datname::text FROM pg_database",
        "SELECT rolname::text FROM pg_roles",
        "SELECT concat_ws(' ', datname, usename) FROM pg_stat_activity",
        "SELECT datname::text FROM pg_stat_database WHERE datname IS NOT NULL",
    ] {
        let rows: Vec<String> = sqlx::query_scalar(sql).fetch_all(&mut nosy).await.unwrap();
        seen.extend(rows);
    }
    nosy.close().await.unwrap();
    busy.close().await.unwrap();
    // Nor may it open the catalog, on the same server here.
    let catalog: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(stack.catalog())
        .await
        .unwrap();
    let refused = secret_connect_options(&stack.credentials(&a).await.unwrap())
        .database(&catalog)
        .connect()
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("permission denied for database"),
        "{refused}"
    );

    let b_database = stack.database_of(&b).await.unwrap();
    assert!(
        seen.contains(&b_database),
        "B's database is listed (names are public on a server): {seen:?}"
    );
    for slug in [&a, &b] {
        assert!(
            !seen.iter().any(|name| name.contains(slug.as_str())),
            "{slug} named in what A's login reads: {seen:?}"
        );
    }
    stack.stop().await.unwrap();
}
