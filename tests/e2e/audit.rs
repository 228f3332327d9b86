//! Admin tokens of their own for operators (`siloctl token`, `/v1/tokens`) and the audit
//! log read back (`siloctl audit`, `GET /v1/audit`): who did what, when, to which tenant;
//! a revoked token stops working, on every control plane; a token's role bounds what it may
//! do.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use silo_control_plane::server::ControlPlane;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use tokio_util::sync::CancellationToken;

/// `GET path` on the control plane at `addr` with admin token `token`: the status.
pub(crate) async fn status_with(addr: std::net::SocketAddr, token: &str, path: &str) -> StatusCode {
    reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

async fn audit(stack: &Stack, query: &str) -> Value {
    let (status, page) = stack
        .admin(Method::GET, &format!("/v1/audit?{query}"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{page}");
    page
}

/// `(actor, action)` of each entry of an audit page.
fn who_did_what(page: &Value) -> Vec<(String, String)> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_act_with_tokens_of_their_own_and_the_audit_log_names_them() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let alice = "alice@example.com";
    let (code, stdout, stderr) = stack.siloctl(&["-o", "json", "token", "create", alice]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let created: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(created["name"], alice);
    let token = created["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("silo_admin_"), "{created}");

    // The list names the tokens and never shows one.
    let (code, stdout, stderr) = stack.siloctl(&["token", "list"]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(alice) && stdout.contains("bootstrap"), "{stdout}");
    assert!(!stdout.contains(&token), "{stdout}");

    // Alice's changes are hers in the audit log, newest first.
    let slug = unique_name("au");
    for args in [["tenant", "create", &slug], ["tenant", "suspend", &slug]] {
        let (code, _, stderr) = stack
            .siloctl(&[&["--token", token.as_str()], &args[..]].concat())
            .await
            .unwrap();
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
    }
    let page = audit(&stack, &format!("tenant={slug}")).await;
    let alices = |action: &str| (alice.to_owned(), action.to_owned());
    assert_eq!(who_did_what(&page), [alices("tenant.suspend"), alices("tenant.create")]);
    assert!(page["items"][0]["at"].is_string(), "{page}");
    assert_eq!(page["items"][0]["tenant"], slug.as_str());
    assert!(page["next_before"].is_null(), "one page: {page}");
    let created_by_bootstrap = audit(&stack, "actor=bootstrap&action=token.create").await;
    assert_eq!(
        created_by_bootstrap["items"][0]["detail"],
        json!({ "name": alice, "role": "operator", "expires_at": null })
    );

    // A page at a time.
    let first = audit(&stack, &format!("tenant={slug}&limit=1")).await;
    assert_eq!(who_did_what(&first), [alices("tenant.suspend")]);
    let before = first["next_before"].as_i64().expect("a next page");
    let second = audit(&stack, &format!("tenant={slug}&limit=1&before={before}")).await;
    assert_eq!(who_did_what(&second), [alices("tenant.create")]);
    for bad in ["limit=0", "limit=lots", "colour=red"] {
        let (status, body) = stack
            .admin(Method::GET, &format!("/v1/audit?{bad}"), None)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }

    let (code, stdout, stderr) = stack.siloctl(&["audit", "--tenant", &slug]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("ID") && lines[0].contains("ACTOR"), "{stdout}");
    assert!(
        lines[1].contains(alice) && lines[1].contains("tenant.suspend"),
        "{stdout}"
    );

    // Names that cannot be used.
    let (status, body) = stack
        .admin(Method::POST, "/v1/tokens", Some(json!({ "name": alice })))
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("token_exists"))
    );
    for reserved in ["bootstrap", "scheduler"] {
        let (status, body) = stack
            .admin(Method::POST, "/v1/tokens", Some(json!({ "name": reserved })))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{reserved}: {body}");
    }
    let (code, _, stderr) = stack.siloctl(&["token", "create", "no spaces"]).await.unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let (status, body) = stack.admin(Method::DELETE, "/v1/tokens/bootstrap", None).await.unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("token_managed"))
    );

    // Revoked: refused at once here, and within seconds by another control plane.
    let other = ControlPlane::bind(stack.config().clone()).await.unwrap();
    let other_addr = other.local_addr();
    let stop_other = CancellationToken::new();
    let other = tokio::spawn(other.run(stop_other.clone()));
    assert_eq!(status_with(other_addr, &token, "/v1/tenants").await, StatusCode::OK);
    let (code, stdout, stderr) = stack.siloctl(&["token", "revoke", alice]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("revoked"), "{stdout}");
    assert_eq!(
        status_with(stack.control_plane_addr(), &token, "/v1/tenants").await,
        StatusCode::UNAUTHORIZED
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while status_with(other_addr, &token, "/v1/tenants").await != StatusCode::UNAUTHORIZED {
        assert!(
            Instant::now() < deadline,
            "the other control plane still takes the revoked token"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, _, stderr) = stack.siloctl(&["--token", &token, "tenant", "list"]).await.unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let (code, _, stderr) = stack.siloctl(&["token", "revoke", alice]).await.unwrap();
    assert_eq!(code, Some(1), "revoking twice: {stderr}");
    let revoked = audit(&stack, "action=token.revoke").await;
    assert_eq!(
        who_did_what(&revoked),
        [("bootstrap".to_owned(), "token.revoke".to_owned())]
    );

    stop_other.cancel();
    other.await.unwrap().unwrap();
    stack.stop().await.unwrap();
}

/// A request with admin token `token`: the status and the JSON body.
async fn send_with(stack: &Stack, token: &str, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("http://{}{path}", stack.control_plane_addr()))
        .bearer_auth(token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    (resp.status(), resp.json().await.unwrap_or(Value::Null))
}

pub(crate) async fn token_of_role(stack: &Stack, name: &str, role: &str) -> String {
    let (code, stdout, stderr) = stack
        .siloctl(&["-o", "json", "token", "create", name, "--role", role])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let created: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(created["role"], role, "{created}");
    created["token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_token_only_reads_and_an_operator_token_cannot_manage_tokens() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let viewer = token_of_role(&stack, "auditor", "viewer").await;
    let operator = token_of_role(&stack, "ops", "operator").await;
    let slug = unique_name("rl");
    let forbidden = |(status, body): (StatusCode, Value)| {
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["error"], "forbidden", "{body}");
    };

    // The operator runs tenants and reads their credentials, but makes no tokens.
    let create = json!({ "slug": slug });
    let (status, body) = send_with(&stack, &operator, Method::POST, "/v1/tenants", Some(create.clone())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    stack.wait_job(body["job"]["id"].as_i64().unwrap()).await.unwrap();
    let credentials = format!("/v1/tenants/{slug}/credentials");
    let (status, _) = send_with(&stack, &operator, Method::GET, &credentials, None).await;
    assert_eq!(status, StatusCode::OK);
    let new_token = json!({ "name": "mallory" });
    forbidden(send_with(&stack, &operator, Method::POST, "/v1/tokens", Some(new_token.clone())).await);
    forbidden(send_with(&stack, &operator, Method::DELETE, "/v1/tokens/auditor", None).await);

    // The viewer reads tenants, jobs, the audit log and the tokens' names, and nothing else.
    for path in [
        "/v1/tenants",
        &format!("/v1/tenants/{slug}"),
        "/v1/jobs",
        "/v1/audit",
        "/v1/tokens",
    ] {
        let (status, body) = send_with(&stack, &viewer, Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    forbidden(send_with(&stack, &viewer, Method::GET, &credentials, None).await);
    forbidden(
        send_with(
            &stack,
            &viewer,
            Method::POST,
            "/v1/tenants",
            Some(json!({ "slug": "other-one" })),
        )
        .await,
    );
    forbidden(send_with(&stack, &viewer, Method::DELETE, &format!("/v1/tenants/{slug}"), None).await);
    forbidden(send_with(&stack, &viewer, Method::POST, "/v1/tokens", Some(new_token)).await);
    let (code, _, stderr) = stack
        .siloctl(&["--token", &viewer, "tenant", "suspend", &slug])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("forbidden") && stderr.contains("viewer"), "{stderr}");
    let (_, tenant) = send_with(&stack, &viewer, Method::GET, &format!("/v1/tenants/{slug}"), None).await;
    assert_eq!(tenant["status"], "active", "nothing changed");

    // Refused requests are counted for alerting, by route and status.
    let (status, _) = send_with(&stack, "not-a-token", Method::GET, "/v1/tenants", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let metrics = stack.control_plane_metrics().await.unwrap();
    let counted = |route: &str, status: &str| {
        metrics.lines().any(|line| {
            line.starts_with("silo_admin_requests_total{")
                && line.contains(&format!("route=\"{route}\""))
                && line.contains(&format!("status=\"{status}\""))
        })
    };
    assert!(counted("/v1/tenants/{slug}/credentials", "403"), "{metrics}");
    assert!(counted("/v1/tenants", "401"), "{metrics}");
    assert!(counted("/v1/tenants", "202"), "{metrics}");

    let (code, stdout, stderr) = stack.siloctl(&["token", "list"]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.lines().next().unwrap().contains("ROLE"), "{stdout}");
    let roles: Vec<(&str, &str)> = stdout
        .lines()
        .skip(1)
        .map(|line| {
            let mut cells = line.split_whitespace();
            (cells.next().unwrap(), cells.next().unwrap())
        })
        .collect();
    assert_eq!(
        roles,
        [("auditor", "viewer"), ("bootstrap", "admin"), ("ops", "operator")]
    );
    let (code, _, stderr) = stack
        .siloctl(&["token", "create", "x", "--role", "root"])
        .await
        .unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    stack.stop().await.unwrap();
}

/// `siloctl token create NAME --expires-in DURATION`: the token works until then and is
/// refused after, without anyone revoking it.
#[tokio::test(flavor = "multi_thread")]
async fn an_admin_token_stops_working_when_it_expires() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (code, stdout, stderr) = stack
        .siloctl(&[
            "-o",
            "json",
            "token",
            "create",
            "contractor",
            "--role",
            "viewer",
            "--expires-in",
            "3s",
        ])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let created: Value = serde_json::from_str(&stdout).unwrap();
    assert!(created["expires_at"].is_string(), "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    assert_eq!(
        status_with(stack.control_plane_addr(), &token, "/v1/tenants").await,
        StatusCode::OK
    );

    let (status, list) = stack.admin(Method::GET, "/v1/tokens", None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let expiry = |name: &str| {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["expires_at"].clone())
            .unwrap()
    };
    assert_eq!(expiry("contractor"), created["expires_at"]);
    assert!(expiry("bootstrap").is_null(), "{list}");

    let deadline = Instant::now() + Duration::from_secs(15);
    while status_with(stack.control_plane_addr(), &token, "/v1/tenants").await != StatusCode::UNAUTHORIZED {
        assert!(Instant::now() < deadline, "the expired token still works");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    for bad in ["soon", "0s", "20years"] {
        let (status, body) = stack
            .admin(
                Method::POST,
                "/v1/tokens",
                Some(json!({"name": "x", "expires_in": bad})),
            )
            .await
            .unwrap();
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_expires_in")),
            "{bad}: {body}"
        );
    }
    let (code, _, stderr) = stack
        .siloctl(&["token", "create", "y", "--expires-in", "soon"])
        .await
        .unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    stack.stop().await.unwrap();
}

/// The actions of an audit page's entries, in the page's order.
fn actions(page: &Value) -> Vec<&str> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect()
}

/// Following the log (`GET /v1/audit?after=`, `siloctl audit --follow`) hands out every entry
/// once, in commit order: an entry whose transaction commits late holds back the entries
/// committed after it instead of being skipped, as a follower going by id would skip it.
#[tokio::test(flavor = "multi_thread")]
async fn the_audit_log_is_followed_in_commit_order_and_a_late_commit_is_not_skipped() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("fl");
    stack.create_tenant(&slug).await.unwrap();

    let all = audit(&stack, "after=0-0").await;
    assert!(actions(&all).contains(&"tenant.create"), "{all}");
    let start = all["next"].as_str().unwrap().to_owned();
    let last = all["items"].as_array().unwrap().last().unwrap();
    assert_eq!(last["cursor"].as_str().unwrap(), start, "{all}");
    let nothing_new = audit(&stack, &format!("after={start}")).await;
    assert_eq!(nothing_new["items"], json!([]), "{nothing_new}");
    assert_eq!(nothing_new["next"], start.as_str());

    // A transaction writes an entry and stays open while a suspension is audited and
    // committed after it, with a larger id.
    let mut late = stack.catalog().begin().await.unwrap();
    sqlx::query("INSERT INTO audit_log (actor, action, detail) VALUES ('test', 'test.late', '{}')")
        .execute(&mut *late)
        .await
        .unwrap();
    let (code, _, stderr) = stack.siloctl(&["tenant", "suspend", &slug]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let newest = audit(&stack, "limit=1").await;
    assert_eq!(actions(&newest), ["tenant.suspend"], "committed and listed");
    let held = audit(&stack, &format!("after={start}")).await;
    assert_eq!(
        held["items"],
        json!([]),
        "held back behind the open transaction: {held}"
    );
    assert_eq!(held["next"], start.as_str(), "and the cursor does not pass it");

    late.commit().await.unwrap();
    // Any other transaction of the cluster still running (the control plane's own) holds
    // entries back too, for as long as it runs.
    let deadline = Instant::now() + Duration::from_secs(5);
    let both = loop {
        let page = audit(&stack, &format!("after={start}")).await;
        if page["items"].as_array().unwrap().len() >= 2 || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(actions(&both), ["test.late", "tenant.suspend"], "{both}");
    let next = both["next"].as_str().unwrap().to_owned();
    let page = audit(&stack, &format!("after={start}&limit=1")).await;
    assert_eq!(actions(&page), ["test.late"], "a page at a time");
    let rest = audit(&stack, &format!("after={}", page["next"].as_str().unwrap())).await;
    assert_eq!(actions(&rest), ["tenant.suspend"], "{rest}");
    assert_eq!(audit(&stack, "after=end").await["next"], next.as_str());
    let theirs = audit(&stack, &format!("after=0-0&tenant={slug}")).await;
    assert_eq!(actions(&theirs), ["tenant.create", "tenant.suspend"], "{theirs}");
    assert_eq!(theirs["next"], next.as_str(), "past what the filter skipped");

    for bad in ["after=12", "after=x-1", &format!("after={next}&before=5")] {
        let (status, body) = stack
            .admin(Method::GET, &format!("/v1/audit?{bad}"), None)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"], "invalid_query", "{body}");
    }
    let (code, _, stderr) = stack.siloctl(&["audit", "--after", "12"]).await.unwrap();
    assert_eq!(code, Some(2), "{stderr}");

    // `siloctl audit --follow -o json` prints what happens from now on, one JSON line each.
    let home = tempfile::tempdir().unwrap();
    let mut follower = stack
        .siloctl_command(home.path())
        .args(["-o", "json", "audit", "--follow", "--tenant", &slug])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for action in ["resume", "suspend"] {
        let (code, _, stderr) = stack.siloctl(&["tenant", action, &slug]).await.unwrap();
        assert_eq!(code, Some(0), "{stderr}");
    }
    let started = Instant::now();
    let mut followed = Vec::new();
    while followed.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("an entry within 10 s")
            .unwrap()
            .expect("siloctl still running");
        let entry: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(entry["tenant"], slug.as_str(), "{entry}");
        followed.push(entry["action"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        followed,
        ["tenant.resume", "tenant.suspend"],
        "only what happened since it started"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    follower.kill().await.unwrap();
    stack.stop().await.unwrap();
}

/// `siloctl token list` says when each token was last used, so tokens nobody uses any more
/// can be found and revoked.
#[tokio::test(flavor = "multi_thread")]
async fn a_tokens_last_use_is_listed_so_unused_tokens_can_be_found() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let used = token_of_role(&stack, "ci-deploy", "operator").await;
    token_of_role(&stack, "forgotten", "viewer").await;
    let before = chrono::Utc::now();
    assert_eq!(
        status_with(stack.control_plane_addr(), &used, "/v1/tenants").await,
        StatusCode::OK
    );
    let last_used = |list: &Value, name: &str| {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["last_used_at"].clone())
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let list = loop {
        let (status, list) = stack.admin(Method::GET, "/v1/tokens", None).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{list}");
        // Both uses are recorded off the request path, each in its own time.
        if !last_used(&list, "ci-deploy").is_null() && !last_used(&list, "bootstrap").is_null() {
            break list;
        }
        assert!(Instant::now() < deadline, "last use not recorded: {list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let at: chrono::DateTime<chrono::Utc> = last_used(&list, "ci-deploy").as_str().unwrap().parse().unwrap();
    assert!(
        at >= before - chrono::Duration::seconds(1) && at <= chrono::Utc::now(),
        "{at}"
    );
    assert!(last_used(&list, "forgotten").is_null(), "{list}");
    assert!(
        !last_used(&list, "bootstrap").is_null(),
        "the test's own requests: {list}"
    );

    let (code, table, stderr) = stack.siloctl(&["token", "list"]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(table.lines().next().unwrap().ends_with("LAST USED"), "{table}");
    let forgotten = table.lines().find(|l| l.starts_with("forgotten")).unwrap();
    assert!(forgotten.trim_end().ends_with('-'), "{table}");
    stack.stop().await.unwrap();
}

/// `GET /v1/audit/verify` as the bootstrap token, once every entry is sealed (within 30 s).
async fn verified_once_sealed(stack: &Stack) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, verification) = stack.admin(Method::GET, "/v1/audit/verify", None).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{verification}");
        if verification["unsealed"] == 0 || Instant::now() > deadline {
            return verification;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Every entry is sealed into a hash chain within seconds. An entry changed afterwards, even
/// by a superuser who lifts the append-only trigger, and one slipped in behind the sealed part
/// of the log, are named by `siloctl audit verify`, which then exits 1; the head it prints is
/// what to keep elsewhere. A sealed entry removed stops the sealer, which `/metrics` shows.
#[tokio::test(flavor = "multi_thread")]
async fn the_audit_log_is_sealed_and_a_changed_entry_is_found() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("sealed");
    stack.create_tenant(&slug).await.unwrap();
    for action in ["suspend", "resume"] {
        let (status, body) = stack
            .admin(Method::POST, &format!("/v1/tenants/{slug}/{action}"), None)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let verification = verified_once_sealed(&stack).await;
    assert_eq!(
        (
            &verification["intact"],
            &verification["sealed"],
            &verification["unsealed"]
        ),
        (&json!(true), &json!(3), &json!(0)),
        "{verification}"
    );
    let head = verification["head"]["hash"].as_str().unwrap().to_owned();
    assert_eq!(head.len(), 64, "{verification}");
    let lag = stack
        .control_plane_gauge("silo_audit_unsealed_seconds_max")
        .await
        .unwrap();
    assert!(lag < 5.0, "everything is sealed: {lag}");
    let (code, stdout, stderr) = stack.siloctl(&["audit", "verify"]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("3 entries sealed") && stdout.contains(&head),
        "{stdout}"
    );
    // A viewer may check the log too.
    let viewer = token_of_role(&stack, "auditor", "viewer").await;
    let (status, _) = send_with(&stack, &viewer, Method::GET, "/v1/audit/verify", None).await;
    assert_eq!(status, StatusCode::OK);

    // The suspension is rewritten as someone else's, as only a superuser can.
    let page = audit(&stack, &format!("tenant={slug}&action=tenant.suspend")).await;
    let suspended = page["items"][0]["id"].as_i64().unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only; \
         UPDATE audit_log SET actor = 'someone-else' WHERE id = {suspended}; \
         ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only; \
         INSERT INTO audit_log (actor, action, tenant, txid) VALUES ('someone-else', 'tenant.resume', '{slug}', '1');"
    )))
    .execute(stack.catalog())
    .await
    .unwrap();
    let slipped: i64 = sqlx::query_scalar("SELECT max(id) FROM audit_log")
        .fetch_one(stack.catalog())
        .await
        .unwrap();

    let (code, stdout, stderr) = stack.siloctl(&["audit", "verify"]).await.unwrap();
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("entry {suspended}: the entry does not match its seal")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "entry {slipped}: the entry was added to the part of the log already sealed"
        )),
        "{stdout}"
    );
    assert!(stderr.contains("not as it was sealed"), "{stderr}");
    let (_, verification) = stack.admin(Method::GET, "/v1/audit/verify", None).await.unwrap();
    let problems: Vec<i64> = verification["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["entry"].as_i64().unwrap())
        .collect();
    assert_eq!(problems, [suspended, slipped], "{verification}");
    assert_eq!(verification["intact"], false);

    // The last sealed entry removed: the sealer stops, and /metrics shows the new entries
    // waiting ever longer for their seals.
    let last = verification["head"]["entry"].as_i64().unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE audit_log DISABLE TRIGGER ALL; DELETE FROM audit_log WHERE id = {last}; \
         ALTER TABLE audit_log ENABLE TRIGGER ALL;"
    )))
    .execute(stack.catalog())
    .await
    .unwrap();
    let (status, body) = stack
        .admin(Method::POST, &format!("/v1/tenants/{slug}/suspend"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    // Past the gauges' 10 s between measurements.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let lag = stack
        .control_plane_gauge("silo_audit_unsealed_seconds_max")
        .await
        .unwrap();
    assert!(lag > 5.0, "the new entry waits for a seal: {lag}");
    let (_, verification) = stack.admin(Method::GET, "/v1/audit/verify", None).await.unwrap();
    assert!(
        verification["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["entry"] == last && p["problem"] == "the entry is gone; its seal is left"),
        "{verification}"
    );
    stack.stop().await.unwrap();
}

/// Every admin request is logged with where it came from, whose token it carried, what it
/// asked and how it ended; refused ones at warn. No token appears in the log.
#[tokio::test(flavor = "multi_thread")]
async fn every_admin_request_is_logged_with_its_peer_actor_and_status() {
    let logs = silo_tests::capture_logs();
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let viewer = token_of_role(&stack, "auditor", "viewer").await;
    let (status, _) = send_with(&stack, stack.admin_token(), Method::GET, "/v1/tenants", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send_with(&stack, &viewer, Method::GET, "/v1/jobs", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send_with(&stack, &viewer, Method::POST, "/v1/rotations", Some(json!({}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let guess = "silo_admin_guessedguessedguessedguessed00";
    let (status, _) = send_with(&stack, guess, Method::DELETE, "/v1/tenants/acme", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let bootstrap = stack.admin_token().to_owned();
    stack.stop().await.unwrap();

    let text = logs.text();
    let line = |parts: &[&str]| {
        text.lines()
            .find(|line| parts.iter().all(|part| line.contains(part)))
            .unwrap_or_else(|| panic!("no line with {parts:?} in:\n{text}"))
            .to_owned()
    };
    for logged in [
        line(&[
            "INFO",
            "admin request",
            "\"bootstrap\"",
            "GET",
            "\"/v1/tenants\"",
            "status=200",
        ]),
        line(&[
            "INFO",
            "admin request",
            "\"auditor\"",
            "GET",
            "\"/v1/jobs\"",
            "status=200",
        ]),
        line(&[
            "WARN",
            "admin request refused",
            "\"auditor\"",
            "POST",
            "\"/v1/rotations\"",
            "status=403",
        ]),
        line(&[
            "WARN",
            "admin request refused",
            "actor=\"-\"",
            "DELETE",
            "\"/v1/tenants/acme\"",
            "status=401",
        ]),
    ] {
        assert!(logged.contains("peer=127.0.0.1:"), "{logged}");
    }
    for token in [bootstrap.as_str(), viewer.as_str(), guess] {
        assert!(!text.contains(token), "a token in the log");
    }
}
