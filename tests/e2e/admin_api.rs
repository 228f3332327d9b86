//! Bad input at the admin API: clear 4xx JSON errors, nothing created, nothing leaked.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use sqlx::{ConnectOptions, Connection};

async fn tenant_rows(stack: &Stack) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tenants")
        .fetch_one(stack.catalog())
        .await
        .unwrap()
}

async fn raw(stack: &Stack, token: Option<&str>, content_type: Option<&str>, body: Vec<u8>) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("http://{}/v1/tenants", stack.control_plane_addr()))
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(ct) = content_type {
        req = req.header(reqwest::header::CONTENT_TYPE, ct);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_json_4xx_and_creates_nothing() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let taken = unique_name("taken");
    stack.create_tenant(&taken).await.unwrap();
    let before = tenant_rows(&stack).await;

    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (json!({"slug": "Bad_Slug"}), StatusCode::BAD_REQUEST, "invalid_slug"),
        (json!({"slug": "ab"}), StatusCode::BAD_REQUEST, "invalid_slug"),
        (json!({"slug": "a".repeat(33)}), StatusCode::BAD_REQUEST, "invalid_slug"),
        (json!({"slug": "acme-"}), StatusCode::BAD_REQUEST, "invalid_slug"),
        (
            json!({"slug": "x\"; DROP DATABASE postgres; --"}),
            StatusCode::BAD_REQUEST,
            "invalid_slug",
        ),
        (json!({"slug": "admin"}), StatusCode::BAD_REQUEST, "invalid_slug"),
        (json!({"slug": "postgres"}), StatusCode::BAD_REQUEST, "invalid_slug"),
        (json!({"slug": "template1"}), StatusCode::BAD_REQUEST, "invalid_slug"),
        (json!({"slug": taken}), StatusCode::CONFLICT, "tenant_exists"),
        (
            json!({"slug": unique_name("ok"), "domains": ["evil.localhost"]}),
            StatusCode::BAD_REQUEST,
            "invalid_domain",
        ),
        (
            json!({"slug": unique_name("ok"), "domains": ["127.0.0.1"]}),
            StatusCode::BAD_REQUEST,
            "invalid_domain",
        ),
        (
            json!({"slug": unique_name("ok"), "domains": ["not a domain"]}),
            StatusCode::BAD_REQUEST,
            "invalid_domain",
        ),
        (
            json!({"slug": unique_name("ok"), "server": "pg-404"}),
            StatusCode::BAD_REQUEST,
            "unknown_server",
        ),
        (
            json!({"slug": unique_name("ok"), "plan": "Gold Plan"}),
            StatusCode::BAD_REQUEST,
            "invalid_plan",
        ),
        (
            json!({"slug": unique_name("ok"), "colour": "blue"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (json!({"slug": 42}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (json!({}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        // No PostgreSQL text can hold a NUL.
        (
            json!({"slug": unique_name("ok"), "name": "a\u{0}b"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
    ];
    for (body, want_status, want_code) in cases {
        let (status, answer) = stack
            .admin(Method::POST, "/v1/tenants", Some(body.clone()))
            .await
            .unwrap();
        assert_eq!(
            (status, answer["error"].as_str()),
            (want_status, Some(want_code)),
            "{body}: {answer}"
        );
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
    }

    let token = Some(stack.admin_token());
    let json_ct = Some("application/json");
    let (status, body) = raw(&stack, token, json_ct, b"{\"slug\": ".to_vec()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("malformed_json"))
    );
    let (status, body) = raw(&stack, token, Some("text/plain"), b"{\"slug\":\"plain\"}".to_vec()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("unsupported_media_type"))
    );
    let (status, body) = raw(&stack, token, json_ct, vec![b' '; 200_000]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
    let long = "x".repeat(5000);
    for bad_token in [None, Some("wrong"), Some(""), Some(long.as_str())] {
        let (status, body) = raw(&stack, bad_token, json_ct, br#"{"slug":"sneaky"}"#.to_vec()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized")),
            "{bad_token:?}"
        );
    }
    assert_eq!(tenant_rows(&stack).await, before, "nothing was created");

    // Unknown things are 404 with JSON; bad ids are 400.
    let (status, body) = stack.admin(Method::GET, "/v1/jobs/999999", None).await.unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("job_not_found"))
    );
    let (status, body) = stack.admin(Method::GET, "/v1/jobs/abc", None).await.unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_job_id"))
    );
    let (status, body) = stack.admin(Method::GET, "/v1/tenants/Not_A_Slug", None).await.unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_slug"))
    );
    let (status, body) = stack.admin(Method::GET, "/v1/nothing", None).await.unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );

    // A NUL anywhere is refused before it reaches a query.
    for (method, path, body, want_status, want_code) in [
        (
            Method::GET,
            "/v1/tenants?plan=a%00b".to_owned(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            Method::GET,
            "/v1/audit?actor=%00".to_owned(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            Method::DELETE,
            "/v1/tokens/a%00b".to_owned(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            Method::PATCH,
            format!("/v1/tenants/{taken}"),
            Some(json!({"name": "a\u{0}b"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            Method::PATCH,
            format!("/v1/tenants/{taken}"),
            Some(json!(["renamed", null])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            Method::POST,
            format!("/v1/tenants/{taken}/keys"),
            Some(json!({"name": "k\u{0}"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
    ] {
        let (status, answer) = stack.admin(method.clone(), &path, body).await.unwrap();
        assert_eq!(
            (status, answer["error"].as_str()),
            (want_status, Some(want_code)),
            "{method} {path}: {answer}"
        );
    }
    assert_eq!(
        stack.tenant(&taken).await.unwrap()["name"],
        taken.as_str(),
        "not renamed"
    );

    // A duplicate key name is a conflict; the first key creation works.
    let (status, body) = stack
        .admin(
            Method::POST,
            &format!("/v1/tenants/{taken}/keys"),
            Some(json!({"name": "ci"})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let key = body["api_key"].as_str().unwrap().to_owned();
    let (status, body) = stack
        .admin(
            Method::POST,
            &format!("/v1/tenants/{taken}/keys"),
            Some(json!({"name": "ci"})),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("key_exists"))
    );
    let me: Value = stack
        .tenant_get(&taken, &key, "/api/v1/me")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["key"], "ci");

    // Listing, the OpenAPI document and the server list answer.
    let (status, list) = stack.admin(Method::GET, "/v1/tenants", None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(list["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["slug"] == taken.as_str()));
    let (status, doc) = stack.admin(Method::GET, "/v1/openapi.json", None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let (status, servers) = stack.admin(Method::GET, "/v1/servers", None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(servers["items"][0]["name"], "pg-1");
    assert_eq!(servers["items"][0]["sslmode"], "prefer", "the default, as libpq's");
    assert!(servers["items"][0]["tenants"].as_i64().unwrap() >= 1);
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_json_has_the_documented_fields() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("fields");
    let domain = format!("{slug}.example.com");
    stack
        .create_tenant_with(
            json!({"slug": slug, "name": "Fields Inc", "plan": "gold", "domains": [domain.to_uppercase()]}),
        )
        .await
        .unwrap();
    let (_, t) = stack
        .admin(Method::GET, &format!("/v1/tenants/{slug}"), None)
        .await
        .unwrap();
    for field in silo_tests::TENANT_FIELDS {
        assert!(t.get(field).is_some(), "missing {field}: {t}");
    }
    assert_eq!(t["status"], "active");
    assert_eq!(t["plan"], "gold");
    assert_eq!(t["domains"], json!([domain]));
    assert_eq!(t["schema_version"], 1);
    assert!(t["credentials_rotated_at"].is_string());
    // The custom domain routes to the tenant.
    let resp = stack
        .tenant_request(Method::GET, &domain, "/api/v1/tasks")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "reached the tenant app, which wants a key"
    );
    stack.stop().await.unwrap();
}

/// The ids of the jobs `GET /v1/jobs?{query}` lists, and its `next_before`.
async fn listed_jobs(stack: &Stack, query: &str) -> (Vec<i64>, Option<i64>) {
    let (status, page) = stack
        .admin(Method::GET, &format!("/v1/jobs?{query}"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{query}: {page}");
    let ids = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["id"].as_i64().unwrap())
        .collect();
    (ids, page["next_before"].as_i64())
}

/// `siloctl jobs list --state --kind --tenant --limit --before` (`GET /v1/jobs?...`): an SRE
/// finds what failed overnight, or one tenant's jobs, a page at a time.
#[tokio::test(flavor = "multi_thread")]
async fn jobs_are_listed_by_state_kind_and_tenant_a_page_at_a_time() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (a, b) = (unique_name("ja"), unique_name("jb"));
    stack.create_tenant(&a).await.unwrap();
    stack.create_tenant(&b).await.unwrap();
    let rotated = stack.rotate(&a, "single").await.unwrap();
    let rotated = rotated["id"].as_i64().unwrap();
    fail::cfg("rotate-after-step", "return(set_secret)").unwrap();
    let failed = stack.rotate(&b, "single").await.unwrap();
    fail::remove("rotate-after-step");
    assert_eq!(failed["state"], "failed", "{failed}");
    let failed = failed["id"].as_i64().unwrap();

    assert_eq!(
        listed_jobs(&stack, &format!("tenant={a}&kind=rotate")).await.0,
        [rotated]
    );
    assert_eq!(
        listed_jobs(&stack, &format!("tenant={b}&state=failed")).await.0,
        [failed]
    );
    let (of_a, _) = listed_jobs(&stack, &format!("tenant={a}")).await;
    assert_eq!(of_a.len(), 2, "provision and rotate: {of_a:?}");
    assert!(of_a[0] > of_a[1], "newest first: {of_a:?}");
    let (first, next) = listed_jobs(&stack, &format!("tenant={a}&limit=1")).await;
    assert_eq!((first, next), (vec![of_a[0]], Some(of_a[0])));
    let (second, _) = listed_jobs(&stack, &format!("tenant={a}&limit=1&before={}", of_a[0])).await;
    assert_eq!(second, [of_a[1]]);
    for bad in ["state=done", "kind=rotation", "limit=0", "colour=red"] {
        let (status, body) = stack
            .admin(Method::GET, &format!("/v1/jobs?{bad}"), None)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }

    let (code, stdout, stderr) = stack
        .siloctl(&["jobs", "list", "--state", "failed", "--tenant", &b])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[1].starts_with(&failed.to_string()) && lines[1].contains("rotate"),
        "{stdout}"
    );
    let (code, _, stderr) = stack.siloctl(&["jobs", "list", "--state", "done"]).await.unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    // Refused by the API (400) is a usage error too: one line, exit 2.
    for args in [
        vec!["jobs", "list", "--kind", "rotation"],
        vec!["jobs", "show", "abc"],
        vec!["migrate", "--all", "--concurrency", "0"],
    ] {
        let (code, _, stderr) = stack.siloctl(&args).await.unwrap();
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    }
    stack.stop().await.unwrap();
}

/// The slugs `GET /v1/tenants?{query}` lists, among `ours`.
async fn listed_tenants(stack: &Stack, query: &str, ours: &[&str]) -> Vec<String> {
    let (status, list) = stack
        .admin(Method::GET, &format!("/v1/tenants?{query}"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{query}: {list}");
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["slug"].as_str().unwrap().to_owned())
        .filter(|slug| ours.contains(&slug.as_str()))
        .collect()
}

/// `siloctl tenant list --status --server --plan` (`GET /v1/tenants?...`).
#[tokio::test(flavor = "multi_thread")]
async fn tenants_are_listed_by_status_server_and_plan() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (kept, paused, gold, gone) = (
        unique_name("lk"),
        unique_name("lp"),
        unique_name("lg"),
        unique_name("lx"),
    );
    for slug in [&kept, &paused, &gone] {
        stack.create_tenant(slug).await.unwrap();
    }
    stack
        .create_tenant_with(json!({"slug": gold, "plan": "gold"}))
        .await
        .unwrap();
    let (status, _) = stack
        .admin(Method::POST, &format!("/v1/tenants/{paused}/suspend"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    stack.delete_tenant(&gone).await.unwrap();
    let ours = [kept.as_str(), paused.as_str(), gold.as_str(), gone.as_str()];
    let mut live = vec![kept.clone(), paused.clone(), gold.clone()];
    live.sort();

    assert_eq!(
        listed_tenants(&stack, "", &ours).await,
        live,
        "deleted tenants are not listed"
    );
    assert_eq!(listed_tenants(&stack, "server=pg-1", &ours).await, live);
    assert_eq!(
        listed_tenants(&stack, "status=suspended", &ours).await,
        std::slice::from_ref(&paused)
    );
    assert_eq!(
        listed_tenants(&stack, "plan=gold", &ours).await,
        std::slice::from_ref(&gold)
    );
    assert_eq!(
        listed_tenants(&stack, "status=deleted", &ours).await,
        std::slice::from_ref(&gone)
    );
    // A typo is refused, not answered as "none there".
    for query in ["status=asleep", "server=pg-9"] {
        let (status, body) = stack
            .admin(Method::GET, &format!("/v1/tenants?{query}"), None)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["error"], "invalid_query", "{query}: {body}");
    }

    let (code, stdout, stderr) = stack
        .siloctl(&["tenant", "list", "--status", "suspended"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(&paused) && !stdout.contains(&kept), "{stdout}");
    let (code, _, stderr) = stack.siloctl(&["tenant", "list", "--status", "asleep"]).await.unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    stack.stop().await.unwrap();
}

/// `siloctl tenant sizes` (`GET /v1/database-sizes`): tenants' databases by the disk they
/// take, largest first, and each server's total.
#[tokio::test(flavor = "multi_thread")]
async fn tenants_are_listed_by_database_size_with_each_servers_total() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (big, small) = (unique_name("big"), unique_name("small"));
    stack.create_tenant(&small).await.unwrap();
    stack.create_tenant(&big).await.unwrap();
    let mut conn = stack
        .pg()
        .admin_options(&stack.database_of(&big).await.unwrap())
        .connect()
        .await
        .unwrap();
    sqlx::query("INSERT INTO tasks (title) SELECT md5(i::text) || md5((i * 3)::text) FROM generate_series(1, 20000) i")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    let (status, sizes) = stack.admin(Method::GET, "/v1/database-sizes", None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{sizes}");
    let items = sizes["items"].as_array().unwrap();
    let listed: Vec<&str> = items.iter().map(|t| t["slug"].as_str().unwrap()).collect();
    assert_eq!(listed, [big.as_str(), small.as_str()], "{sizes}");
    let bytes = |v: &Value| v["bytes"].as_i64().unwrap();
    assert!(bytes(&items[0]) > bytes(&items[1]) + 1_000_000, "{sizes}");
    assert_eq!(items[0]["server"], "pg-1");
    assert_eq!(items[0]["database"], stack.database_of(&big).await.unwrap().as_str());
    assert_eq!(sizes["servers"][0]["name"], "pg-1", "{sizes}");
    assert_eq!(sizes["servers"][0]["tenants"], 2, "{sizes}");
    assert_eq!(bytes(&sizes["servers"][0]), bytes(&items[0]) + bytes(&items[1]));

    let (status, top) = stack
        .admin(Method::GET, "/v1/database-sizes?limit=1&server=pg-1", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{top}");
    assert_eq!(top["items"].as_array().unwrap().len(), 1, "{top}");
    assert_eq!(top["items"][0]["slug"], big.as_str());
    let (status, body) = stack
        .admin(Method::GET, "/v1/database-sizes?server=nope", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "unknown_server", "{body}");

    let (code, table, stderr) = stack.siloctl(&["tenant", "sizes"]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("TENANT"), "{table}");
    assert!(lines[1].starts_with(&big) && lines[1].contains("MiB"), "{table}");
    assert!(
        lines.iter().any(|l| l.starts_with("pg-1") && l.contains("MiB")),
        "the server's total: {table}"
    );
    let (code, _, stderr) = stack.siloctl(&["tenant", "sizes", "--limit", "0"]).await.unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    stack.stop().await.unwrap();
}

/// Every operation the served OpenAPI document names is routed, and what it answers a request
/// for nothing (an unknown tenant, job, key or file; no body) is a JSON error the document
/// lists for it: a client generated from the document meets no surprise.
#[tokio::test(flavor = "multi_thread")]
async fn every_documented_operation_is_served_and_answers_as_documented() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (status, doc) = stack.admin(Method::GET, "/v1/openapi.json", None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let base = doc["servers"][0]["url"].as_str().unwrap();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{slug}", "no-such-tenant")
            .replace("{id}", "2147483646")
            .replace("{name}", "no-such-name")
            .replace("{file}", "no-such-file.dump");
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let (status, body) = stack
                .admin(method.clone(), &format!("{base}{concrete}"), None)
                .await
                .unwrap();
            let what = format!("{method} {path}: {status} {body}");
            assert!(
                op["responses"].get(status.as_str()).is_some(),
                "undocumented status: {what}"
            );
            if !status.is_success() {
                assert!(body["error"].is_string(), "not a JSON error: {what}");
                assert_ne!(body["error"], "not_found", "not routed: {what}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 35, "only {checked} operations in the document");
    stack.stop().await.unwrap();
}

/// A method an endpoint does not take gets 405 with a JSON body, as every refusal does.
#[tokio::test(flavor = "multi_thread")]
async fn a_method_an_endpoint_does_not_take_gets_405_json() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    for path in ["/v1/tenants", "/healthz"] {
        let (status, body) = stack.admin(Method::PUT, path, None).await.unwrap();
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{path}: {body}");
        assert_eq!(body["error"], "method_not_allowed", "{path}: {body}");
    }
    stack.stop().await.unwrap();
}

/// A client that never finishes its request head is disconnected (slowloris), as the router
/// does it, and the admin API goes on answering others.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_head_never_finished_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(stack.control_plane_addr())
        .await
        .unwrap();
    slow.write_all(b"GET /v1/tenants HTTP/1.1\r\nHost: x").await.unwrap();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), slow.read(&mut buf)).await;
    assert!(read.is_ok(), "the connection was still open after 30 s");
    let (status, _) = stack.admin(Method::GET, "/v1/tenants", None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    stack.stop().await.unwrap();
}
