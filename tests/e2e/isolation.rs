//! The router's isolation self-check: a pooled connection that lands in another tenant's
//! database (here: tenant A's secret tampered to hold tenant B's credentials) is refused;
//! A's requests fail closed and never see B's data.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use secrecy::SecretString;
use serde_json::{json, Value};
use silo_control_plane::secrets::{self, AWSCURRENT};
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;

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
