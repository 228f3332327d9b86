//! The end-to-end slice: tenants created through the admin API, served through the router by
//! Host, isolated from each other at every layer, suspended, resumed and deleted.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use sqlx::{ConnectOptions, Connection};

async fn get_json(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Retries `f` until it returns true or `within` passes; returns how long it took.
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_tenants_are_served_and_isolated() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (a, b) = (unique_name("a"), unique_name("b"));
    let key_a = stack.create_tenant(&a).await.unwrap();
    let key_b = stack.create_tenant(&b).await.unwrap();
    let (host_a, host_b) = (format!("{a}.localhost"), format!("{b}.LOCALHOST:8080"));

    let (status, task) = get_json(
        stack
            .tenant_request(Method::POST, &host_a, "/api/v1/tasks")
            .bearer_auth(&key_a)
            .json(&json!({"title": "a's task"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let (status, list) = get_json(
        stack
            .tenant_request(Method::GET, &host_a, "/api/v1/tasks")
            .bearer_auth(&key_a),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["items"][0]["title"], "a's task");

    // B sees none of A's tasks, and the Host decides the tenant (case and port ignored).
    let (status, list) = get_json(
        stack
            .tenant_request(Method::GET, &host_b, "/api/v1/tasks")
            .bearer_auth(&key_b),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["items"], json!([]));
    let (_, me) = get_json(
        stack
            .tenant_request(Method::GET, &host_b, "/api/v1/me")
            .bearer_auth(&key_b),
    )
    .await;
    assert_eq!(me, json!({"tenant": b, "key": "default"}));

    // A's key is unknown at B's host.
    let (status, body) = get_json(
        stack
            .tenant_request(Method::GET, &host_b, "/api/v1/tasks")
            .bearer_auth(&key_a),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "unauthorized");

    // A's database role cannot open B's database, nor create databases or roles.
    let (status, creds_a) = stack
        .admin(Method::GET, &format!("/v1/tenants/{a}/credentials"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let a_opts = sqlx::postgres::PgConnectOptions::new()
        .host("127.0.0.1")
        .port(creds_a["port"].as_u64().unwrap() as u16)
        .username(creds_a["username"].as_str().unwrap())
        .password(creds_a["password"].as_str().unwrap());
    let (_, tenant_b) = stack
        .admin(Method::GET, &format!("/v1/tenants/{b}"), None)
        .await
        .unwrap();
    let err = a_opts
        .clone()
        .database(tenant_b["database"].as_str().unwrap())
        .connect()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
    let mut conn = a_opts
        .clone()
        .database(creds_a["dbname"].as_str().unwrap())
        .connect()
        .await
        .unwrap();
    for ddl in [
        "CREATE DATABASE stolen",
        "CREATE ROLE intruder",
        "ALTER ROLE CURRENT_USER CREATEDB",
    ] {
        let err = sqlx::query(ddl).execute(&mut conn).await.unwrap_err();
        assert!(err.to_string().contains("permission denied"), "{ddl}: {err}");
    }
    // ... but it can use its own tables.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 1);
    conn.close().await.unwrap();

    // The secret is in the catalog only as ciphertext.
    let password = creds_a["password"].as_str().unwrap();
    let leaked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM secret_versions WHERE position($1::bytea IN ciphertext) > 0")
            .bind(password.as_bytes())
            .fetch_one(stack.catalog())
            .await
            .unwrap();
    assert_eq!(leaked, 0);

    // Every change is in the audit log.
    let actions: Vec<String> = sqlx::query_scalar("SELECT action FROM audit_log WHERE tenant = $1 ORDER BY id")
        .bind(&a)
        .fetch_all(stack.catalog())
        .await
        .unwrap();
    assert_eq!(actions, ["tenant.create", "tenant.credentials.read"]);
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn suspend_and_resume_reach_the_router_within_a_second() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("s");
    let key = stack.create_tenant(&slug).await.unwrap();
    let host = format!("{slug}.localhost");
    let get = || {
        stack
            .tenant_request(Method::GET, &host, "/api/v1/tasks")
            .bearer_auth(&key)
    };
    assert_eq!(get().send().await.unwrap().status(), StatusCode::OK);

    let (status, tenant) = stack
        .admin(Method::POST, &format!("/v1/tenants/{slug}/suspend"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(tenant["status"], "suspended");
    let took = eventually(Duration::from_secs(1), || async {
        let (status, body) = get_json(get()).await;
        status == StatusCode::FORBIDDEN && body["error"] == "tenant_suspended"
    })
    .await;
    assert!(took < Duration::from_secs(1), "{took:?}");

    let (status, _) = stack
        .admin(Method::POST, &format!("/v1/tenants/{slug}/resume"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    eventually(Duration::from_secs(1), || async {
        get().send().await.unwrap().status() == StatusCode::OK
    })
    .await;

    // Resuming an active tenant is a no-op; suspending a missing one is 404.
    let (status, _) = stack
        .admin(Method::POST, &format!("/v1/tenants/{slug}/resume"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let (status, body) = stack
        .admin(Method::POST, "/v1/tenants/nobody-here/suspend", None)
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("tenant_not_found"))
    );
    stack.stop().await.unwrap();
}

/// `siloctl tenant update` (`PATCH /v1/tenants/{slug}`): a custom domain added later is
/// routed within a second, a new plan's limits apply, a removed domain stops routing.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_plan_and_domains_change_without_recreating_it() {
    let stack = Stack::start(StackOptions {
        extra_toml: "[router.plans.trial]\nrequests_per_second = 1\nburst = 2\n".into(),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let slug = unique_name("up");
    let key = stack.create_tenant(&slug).await.unwrap();
    let other = unique_name("up");
    stack.create_tenant(&other).await.unwrap();
    let domain = format!("{slug}.example.com");
    let me_via = |host: String| {
        let req = stack.tenant_request(Method::GET, &host, "/api/v1/me").bearer_auth(&key);
        async move { req.send().await.unwrap().status() }
    };
    assert_eq!(me_via(domain.clone()).await, StatusCode::NOT_FOUND);

    let (code, stdout, stderr) = stack
        .siloctl(&[
            "-o",
            "json",
            "tenant",
            "update",
            &slug,
            "--add-domain",
            &domain.to_uppercase(),
            "--plan",
            "trial",
        ])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let updated: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(updated["domains"], json!([domain]), "{updated}");
    assert_eq!(updated["plan"], "trial");
    eventually(Duration::from_secs(1), || {
        let status = me_via(domain.clone());
        async move { status.await == StatusCode::OK }
    })
    .await;

    // The trial plan's burst of 2: the requests after it are limited.
    let statuses: Vec<StatusCode> = {
        let mut statuses = Vec::new();
        for _ in 0..5 {
            statuses.push(me_via(format!("{slug}.localhost")).await);
        }
        statuses
    };
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");

    // A domain can only belong to one tenant; bad input is refused and changes nothing.
    for (who, body, status, error) in [
        (
            other.as_str(),
            json!({"add_domains": [domain]}),
            StatusCode::CONFLICT,
            "domain_taken",
        ),
        (
            slug.as_str(),
            json!({"add_domains": ["not a domain"]}),
            StatusCode::BAD_REQUEST,
            "invalid_domain",
        ),
        (
            slug.as_str(),
            json!({"plan": "Gold!"}),
            StatusCode::BAD_REQUEST,
            "invalid_plan",
        ),
        (
            slug.as_str(),
            json!({"colour": "red"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            "nobody-here",
            json!({"plan": "trial"}),
            StatusCode::NOT_FOUND,
            "tenant_not_found",
        ),
    ] {
        let (got, answer) = stack
            .admin(Method::PATCH, &format!("/v1/tenants/{who}"), Some(body.clone()))
            .await
            .unwrap();
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(error)),
            "{body}: {answer}"
        );
    }
    let (code, _, stderr) = stack.siloctl(&["tenant", "update", &slug]).await.unwrap();
    assert_eq!(code, Some(2), "nothing to change: {stderr}");

    let (status, tenant) = stack
        .admin(
            Method::PATCH,
            &format!("/v1/tenants/{slug}"),
            Some(json!({"remove_domains": [domain], "plan": "standard", "name": "Up Inc"})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{tenant}");
    assert_eq!(
        (tenant["name"].as_str(), tenant["plan"].as_str()),
        (Some("Up Inc"), Some("standard"))
    );
    assert_eq!(tenant["domains"], json!([]));
    eventually(Duration::from_secs(1), || {
        let status = me_via(domain.clone());
        async move { status.await == StatusCode::NOT_FOUND }
    })
    .await;
    let (_, audit) = stack
        .admin(
            Method::GET,
            &format!("/v1/audit?tenant={slug}&action=tenant.update"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(audit["items"].as_array().unwrap().len(), 2, "{audit}");
    stack.stop().await.unwrap();
}

/// `siloctl tenant key list | revoke`: a leaked key is revoked by name and the router refuses
/// it within seconds, while the tenant's other keys keep working.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_api_key_is_refused_within_seconds_and_the_others_keep_working() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("k");
    let first = stack.create_tenant(&slug).await.unwrap();
    let (code, stdout, stderr) = stack
        .siloctl(&["-o", "json", "tenant", "key", "create", &slug, "--name", "ci"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let leaked = serde_json::from_str::<Value>(&stdout).unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let status_of = |key: String| {
        let stack = &stack;
        let slug = &slug;
        async move { stack.tenant_get(slug, &key, "/api/v1/tasks").await.unwrap().status() }
    };
    assert_eq!(status_of(leaked.clone()).await, StatusCode::OK);

    let (status, list) = stack
        .admin(Method::GET, &format!("/v1/tenants/{slug}/keys"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{list}");
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ci", "default"]);
    assert!(list["items"][0]["created_at"].is_string(), "{list}");
    assert!(!list.to_string().contains(&leaked), "never the key");

    let (code, stdout, stderr) = stack
        .siloctl(&["tenant", "key", "revoke", &slug, "--name", "ci"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("revoked"), "{stdout}");
    let took = eventually(Duration::from_secs(10), || {
        let key = leaked.clone();
        async move { status_of(key).await == StatusCode::UNAUTHORIZED }
    })
    .await;
    assert!(took < Duration::from_secs(7), "refused after {took:?}");
    assert_eq!(status_of(first.clone()).await, StatusCode::OK);

    let (code, stdout, stderr) = stack.siloctl(&["tenant", "key", "list", &slug]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("default") && !stdout.contains("ci "), "{stdout}");
    let (code, _, stderr) = stack
        .siloctl(&["tenant", "key", "revoke", &slug, "--name", "ci"])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "revoking twice: {stderr}");
    assert!(stderr.contains("key_not_found"), "{stderr}");
    let (status, audit) = stack
        .admin(
            Method::GET,
            &format!("/v1/audit?tenant={slug}&action=tenant.key.revoke"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(audit["items"][0]["detail"], json!({"name": "ci"}), "{audit}");
    let (status, _) = stack
        .admin(Method::GET, "/v1/tenants/nobody-here/keys", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    stack.stop().await.unwrap();
}

async fn raw_response(stack: &Stack, host: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(stack.router_addr()).await.unwrap();
    s.write_all(format!("GET /api/v1/tasks HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    // Drop the Date header: the only part allowed to differ between two responses.
    String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_drops_everything_and_answers_like_an_unknown_host() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("d");
    let key = stack.create_tenant(&slug).await.unwrap();
    let host = format!("{slug}.localhost");
    // Open a pool on the tenant database: deletion must terminate its sessions.
    let ok = stack
        .tenant_request(Method::GET, &host, "/api/v1/tasks")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);

    stack.delete_tenant(&slug).await.unwrap();

    let mut admin = stack.pg().admin_options("postgres").connect().await.unwrap();
    let db = stack.database_of(&slug).await.unwrap();
    let dbs: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&db)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    let roles: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1 || '%'")
        .bind(&db)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!((dbs, roles), (0, 0));
    let secrets: i64 = sqlx::query_scalar("SELECT count(*) FROM secrets WHERE name = $1")
        .bind(stack.secret_name(&slug))
        .fetch_one(stack.catalog())
        .await
        .unwrap();
    assert_eq!(secrets, 0);
    let status: String = sqlx::query_scalar("SELECT status FROM tenants WHERE slug = $1")
        .bind(&slug)
        .fetch_one(stack.catalog())
        .await
        .unwrap();
    assert_eq!(status, "deleted", "a tombstone stays for audit");
    let (status, _) = stack
        .admin(Method::GET, &format!("/v1/tenants/{slug}"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);

    let unknown = format!("{}.localhost", unique_name("never"));
    eventually(Duration::from_secs(2), || async {
        raw_response(&stack, &host).await.starts_with(b"HTTP/1.1 404")
    })
    .await;
    let deleted_answer = raw_response(&stack, &host).await;
    let unknown_answer = raw_response(&stack, &unknown).await;
    assert_eq!(
        String::from_utf8_lossy(&deleted_answer),
        String::from_utf8_lossy(&unknown_answer)
    );
    assert!(String::from_utf8_lossy(&unknown_answer).contains("tenant_not_found"));

    // The slug can be used again.
    stack.create_tenant(&slug).await.unwrap();
    stack.stop().await.unwrap();
}

/// A server's admin password can come from the secret store, and a new one put there (by
/// Secrets Manager's rotation, or by RDS managing the master password) is used without a
/// restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_servers_admin_password_comes_from_the_secret_store_and_follows_its_rotation() {
    use secrecy::SecretString;
    use silo_control_plane::config::AdminPassword;

    let mut stack = Stack::start(StackOptions::default()).await.unwrap();
    // An admin role of its own, so that changing its password touches no other test.
    let role = unique_name("siloadmin");
    let mut superuser = stack.pg().admin_options("postgres").connect().await.unwrap();
    let set_password = |password: &str| format!("ALTER ROLE {role} PASSWORD '{password}'");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE ROLE {role} LOGIN SUPERUSER")))
        .execute(&mut superuser)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(set_password("first-password")))
        .execute(&mut superuser)
        .await
        .unwrap();
    let store = silo_control_plane::secrets::open(&stack.config().secrets, stack.catalog().clone())
        .await
        .unwrap();
    let name = format!("{}servers/pg-1", stack.config().secrets.name_prefix);
    let secret = |password: &str| SecretString::from(json!({ "password": password }).to_string());
    store
        .create_secret(&name, &uuid_like(), &secret("first-password"), &[])
        .await
        .unwrap();
    stack.config_mut().servers[0].admin_user = role.clone();
    stack.config_mut().servers[0].admin_password = AdminPassword::Secret(name.clone());
    stack.restart_control_plane().await.unwrap();

    let create = |slug: String| {
        let stack = &stack;
        async move {
            let (status, created) = stack
                .admin(Method::POST, "/v1/tenants", Some(json!({ "slug": slug })))
                .await
                .unwrap();
            assert_eq!(status, StatusCode::ACCEPTED, "{created}");
            stack.wait_job(created["job"]["id"].as_i64().unwrap()).await.unwrap()
        }
    };
    let job = create(unique_name("vault")).await;
    assert_eq!(
        (&job["state"], &job["attempts"]),
        (&"succeeded".into(), &1.into()),
        "{job}"
    );

    // Rotated: the role's password changes, then the secret's current version.
    sqlx::raw_sql(sqlx::AssertSqlSafe(set_password("second-password")))
        .execute(&mut superuser)
        .await
        .unwrap();
    store
        .put_secret_value(&name, &uuid_like(), &secret("second-password"), &[])
        .await
        .unwrap();
    // The admin sessions open before end (as pooled connections do when they idle out), so
    // the control plane has to log in again.
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1")
        .bind(&role)
        .execute(&mut superuser)
        .await
        .unwrap();
    // The new tenant's first admin login is refused; the job reads the secret again and runs
    // once more with the new password.
    let job = create(unique_name("rotated")).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(job["attempts"].as_i64().unwrap() >= 2, "{job}");
    stack.stop().await.unwrap();
}

fn uuid_like() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A deleted tenant's slug can be created again at once, even on AWS Secrets Manager, which
/// keeps a deleted secret's name for its recovery window: the new tenant is served with the
/// new credentials, and the old API key opens nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_tenant_is_created_again_under_its_slug_with_aws_secrets() {
    let stack = Stack::start(StackOptions {
        secrets: silo_tests::stack::Secrets::Aws,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let slug = unique_name("again");
    let old_key = stack.create_tenant(&slug).await.unwrap();
    stack.delete_tenant(&slug).await.unwrap();
    let new_key = stack.create_tenant(&slug).await.unwrap();
    assert_eq!(stack.tenant(&slug).await.unwrap()["status"], "active");
    assert_eq!(
        stack.served_titles(&slug, &new_key).await.unwrap(),
        Vec::<String>::new()
    );
    let resp = stack.tenant_get(&slug, &old_key, "/api/v1/tasks").await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    stack.stop().await.unwrap();
}
