//! A server's limits on its tenants' login roles (`tenant_connection_limit`,
//! `tenant_idle_in_transaction_timeout`), enforced by PostgreSQL on whoever logs in with a
//! tenant's credentials, on every login role the tenant gets (an alternating rotation's too).

use std::time::Duration;

use silo_control_plane::config::TenantRoleLimits;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::{secret_connect_options, unique_name};
use sqlx::{ConnectOptions, Connection, PgConnection};

/// The login role's `rolconnlimit` and its `idle_in_transaction_session_timeout` setting.
async fn role_limits(stack: &Stack, role: &str) -> (i32, Option<String>) {
    let mut admin = stack.pg().admin_options("postgres").connect().await.unwrap();
    let limits = sqlx::query_as(
        "SELECT r.rolconnlimit, (SELECT s FROM pg_db_role_setting d, unnest(d.setconfig) s \
           WHERE d.setrole = r.oid AND d.setdatabase = 0 AND s LIKE 'idle_in_transaction_session_timeout=%') \
         FROM pg_roles r WHERE r.rolname = $1",
    )
    .bind(role)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    admin.close().await.unwrap();
    limits
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_login_role_is_held_to_its_servers_limits() {
    let stack = Stack::start(StackOptions {
        server_toml: "tenant_connection_limit = 3\ntenant_idle_in_transaction_timeout = \"1s\"\n".into(),
        // A limit of 3 leaves room for a router pool of 1 and silo's jobs.
        router_toml: "max_connections_per_tenant = 1\n".into(),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let slug = unique_name("limited");
    stack.create_tenant(&slug).await.unwrap();
    let secret = stack.credentials(&slug).await.unwrap();
    let role = secret["username"].as_str().unwrap().to_owned();
    assert_eq!(
        role_limits(&stack, &role).await,
        (3, Some("idle_in_transaction_session_timeout=1000ms".into()))
    );

    // A transaction left open is ended by the server.
    let options = secret_connect_options(&secret);
    let mut idle = options.connect().await.unwrap();
    sqlx::raw_sql("BEGIN; SELECT 1").execute(&mut idle).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let ended = sqlx::query("SELECT 1").execute(&mut idle).await.unwrap_err();
    assert!(ended.to_string().contains("idle-in-transaction"), "{ended}");

    // Three sessions at most; a fourth is refused.
    let mut open: Vec<PgConnection> = Vec::new();
    for _ in 0..3 {
        open.push(options.connect().await.unwrap());
    }
    let refused = options.connect().await.unwrap_err();
    assert!(
        refused.to_string().contains("too many connections for role"),
        "{refused}"
    );
    for conn in open {
        conn.close().await.unwrap();
    }

    // The login role an alternating rotation brings in is held to the same limits.
    let job = stack.rotate(&slug, "alternating").await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    let rotated = stack.credentials(&slug).await.unwrap();
    let other = rotated["username"].as_str().unwrap();
    assert_ne!(other, role);
    assert_eq!(
        role_limits(&stack, other).await,
        (3, Some("idle_in_transaction_session_timeout=1000ms".into()))
    );
    stack.stop().await.unwrap();
}

/// Waits up to 30 s for `role`'s limits to become `wanted`.
async fn wait_for_role_limits(stack: &Stack, role: &str, wanted: (i32, Option<String>)) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let limits = role_limits(stack, role).await;
        if limits == wanted {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{role} still has {limits:?}, not {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_changed_in_the_config_reach_existing_tenants_when_the_control_plane_starts() {
    let mut stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("existing");
    stack.create_tenant(&slug).await.unwrap();
    let role = stack.credentials(&slug).await.unwrap()["username"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(role_limits(&stack, &role).await, (-1, None));

    // Set: the role gets them with no rotation, and keeps its password.
    stack.config_mut().servers[0].tenant_roles = TenantRoleLimits {
        connection_limit: Some(8),
        idle_in_transaction_timeout: Some(Duration::from_secs(30)),
    };
    stack.restart_control_plane().await.unwrap();
    wait_for_role_limits(
        &stack,
        &role,
        (8, Some("idle_in_transaction_session_timeout=30000ms".into())),
    )
    .await;
    let secret = stack.credentials(&slug).await.unwrap();
    assert_eq!(secret["username"], role.as_str());
    secret_connect_options(&secret)
        .connect()
        .await
        .unwrap()
        .close()
        .await
        .unwrap();

    // Lifted: the role is unlimited again.
    stack.config_mut().servers[0].tenant_roles = TenantRoleLimits::default();
    stack.restart_control_plane().await.unwrap();
    wait_for_role_limits(&stack, &role, (-1, None)).await;
    stack.stop().await.unwrap();
}
