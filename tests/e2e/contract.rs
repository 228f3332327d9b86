//! Contract items of DESIGN.md that no other module exercises, checked as a user notices them:
//! a server at `[[servers]] max_tenants` refuses the next tenant with 503 `no_capacity` and
//! makes nothing for it; operations a tenant's state does not allow are 409 `invalid_state`;
//! the router answers 503 `tenant_unavailable` with `Retry-After` while a tenant is still
//! provisioning, and serves it once done; `GET /v1/jobs` and the control plane's `/metrics`
//! report that activity; `silo-control-plane` and `silo-router` run from `SILO_CONFIG` and
//! refuse a bad config file with exit code 2 and one stderr line naming the key.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use silo_control_plane::names::{NamingKey, TenantNames, TenantSlug};
use silo_tests::pg::TestCluster;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use sqlx::ConnectOptions;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The fields DESIGN.md fixes for a job's JSON.
const JOB_FIELDS: [&str; 8] = ["id", "kind", "tenant", "state", "step", "attempts", "error", "progress"];

/// Asserts `body` is the documented error JSON with this code and a message.
fn assert_error(status: StatusCode, body: &Value, want_status: StatusCode, want_code: &str) {
    assert_eq!(
        (status, body["error"].as_str()),
        (want_status, Some(want_code)),
        "{body}"
    );
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

/// How many databases and login/owner roles the cluster holds for tenant `slug`, named as
/// the control plane names a new tenant (from the naming key in `catalog_db`).
async fn databases_and_roles_of(pg: &TestCluster, catalog_db: &str, slug: &str) -> (i64, i64) {
    let mut catalog = pg.admin_options(catalog_db).connect().await.unwrap();
    let key: Vec<u8> = sqlx::query_scalar("SELECT key FROM naming_key")
        .fetch_one(&mut catalog)
        .await
        .unwrap();
    let key = NamingKey::from_bytes(&key).unwrap();
    let names = TenantNames::derive(&key, &TenantSlug::parse(slug).unwrap());
    let db = names.database();
    let mut conn = pg.admin_options("postgres").connect().await.unwrap();
    let databases = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(db)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let roles = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1 || '\\_%'")
        .bind(db)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    (databases, roles)
}

/// The jobs `GET /v1/jobs` lists for `slug`, each checked for the documented fields.
fn jobs_of<'a>(list: &'a Value, slug: &str) -> Vec<&'a Value> {
    let items = list["items"].as_array().unwrap_or_else(|| panic!("no items: {list}"));
    for job in items {
        for field in JOB_FIELDS {
            assert!(job.get(field).is_some(), "job JSON lacks {field:?}: {job}");
        }
    }
    items.iter().filter(|j| j["tenant"] == slug).collect()
}

/// The value of the Prometheus sample `series` (name and labels exactly as rendered) in
/// `text`; 0 when it is not there yet.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(series))
        .find_map(|rest| rest.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

/// A `silo-control-plane` or `silo-router` child, killed if the test ends before it is
/// stopped.
struct Binary {
    child: tokio::process::Child,
}

impl Binary {
    /// Starts binary `name` with `SILO_CONFIG` (no `--config`) and `envs`; returns it with the
    /// address its stdout line starting with `listening_prefix` names.
    async fn start(name: &str, config: &Path, envs: &[(&str, &str)], listening_prefix: &str) -> (Binary, String) {
        let mut cmd = tokio::process::Command::new(silo_tests::workspace_binary(name));
        cmd.env("SILO_CONFIG", config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (key, value) in envs {
            cmd.env(key, value);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let prefix = listening_prefix.to_owned();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(addr) = line.strip_prefix(prefix.as_str()) {
                    return addr.trim().to_owned();
                }
            }
            panic!("{name} ended without printing {prefix:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("{name} did not print {listening_prefix:?} within 60 s"));
        // Keep reading: the binary may print more, and a closed pipe would fail it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        (Binary { child }, addr)
    }

    /// SIGTERM, then the exit status (15 s at most).
    async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id().unwrap()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("exit within 15 s of SIGTERM")
            .unwrap()
    }
}

/// The admin API of a control plane binary.
struct Admin {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Admin {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Polls job `id` until it finishes (60 s at most).
    async fn wait_job(&self, id: i64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, job) = self.call(Method::GET, &format!("/v1/jobs/{id}"), None).await;
            assert_eq!(status, StatusCode::OK, "{job}");
            if matches!(job["state"].as_str(), Some("succeeded" | "failed")) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} did not finish: {job}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The control plane and router binaries, started from `SILO_CONFIG` alone with one server
/// whose `max_tenants = 1`: of two tenants created at once exactly one is placed and the
/// other refused with 503 `no_capacity` with nothing made for it (no tenant, database, role,
/// secret or job); the router serves the placed one; deleting it frees the place.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_server_refuses_a_tenant_with_503_no_capacity_and_makes_nothing_for_it() {
    silo_tests::init_logging();
    let pg = TestCluster::shared().await;
    let dir = tempfile::tempdir().unwrap();
    let catalog_db = unique_name("catalog_");
    pg.create_database(&catalog_db).await.unwrap();
    silo_control_plane::secrets::local::create_master_key(&dir.path().join("master.key")).unwrap();
    let prefix = format!("{}/", unique_name("silo"));
    let config = dir.path().join("silo.toml");
    std::fs::write(
        &config,
        format!(
            r#"catalog_url = "postgres://postgres@127.0.0.1:{port}/{catalog_db}"
[secrets]
local_master_key_file = "master.key"
name_prefix = "{prefix}"
[[servers]]
name = "pg-1"
host = "127.0.0.1"
port = {port}
admin_user = "postgres"
admin_password_env = "CONTRACT_PG_PASSWORD"
max_tenants = 1
[control_plane]
listen = "127.0.0.1:0"
admin_token_env = "CONTRACT_ADMIN_TOKEN"
[router]
listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
base_domains = ["localhost"]
"#,
            port = pg.port()
        ),
    )
    .unwrap();
    let token = format!("admin-{}", unique_name(""));
    let password = pg.password().expose_secret().to_owned();
    let envs = [
        ("SILO_CATALOG_PASSWORD", password.as_str()),
        ("CONTRACT_PG_PASSWORD", password.as_str()),
        ("CONTRACT_ADMIN_TOKEN", token.as_str()),
    ];
    let (control_plane, cp_addr) = Binary::start(
        "silo-control-plane",
        &config,
        &envs,
        "control plane listening on http://",
    )
    .await;
    let admin = Admin {
        base: format!("http://{cp_addr}"),
        token: token.clone(),
        http: reqwest::Client::new(),
    };

    // Two creations at once: the server has room for one.
    let (a, b) = (unique_name("first"), unique_name("second"));
    let ((status_a, body_a), (status_b, body_b)) = tokio::join!(
        admin.call(Method::POST, "/v1/tenants", Some(json!({"slug": a}))),
        admin.call(Method::POST, "/v1/tenants", Some(json!({"slug": b}))),
    );
    let mut answers = [(a.clone(), status_a, body_a), (b.clone(), status_b, body_b)];
    answers.sort_by_key(|(_, status, _)| *status);
    let [(placed, placed_status, created), (refused, refused_status, refusal)] = answers;
    assert_eq!(placed_status, StatusCode::ACCEPTED, "{placed}: {created}");
    assert_error(refused_status, &refusal, StatusCode::SERVICE_UNAVAILABLE, "no_capacity");
    let job = admin.wait_job(created["job"]["id"].as_i64().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");

    // Nothing was made for the refused tenant.
    let (status, body) = admin.call(Method::GET, &format!("/v1/tenants/{refused}"), None).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "tenant_not_found");
    assert_eq!(databases_and_roles_of(pg, &catalog_db, &refused).await, (0, 0));
    let mut catalog = pg.admin_options(&catalog_db).connect().await.unwrap();
    let secrets: i64 = sqlx::query_scalar("SELECT count(*) FROM secret_versions WHERE name = $1")
        .bind(format!("{prefix}tenants/{refused}"))
        .fetch_one(&mut catalog)
        .await
        .unwrap();
    assert_eq!(secrets, 0, "no secret for {refused}");
    let (status, jobs) = admin.call(Method::GET, "/v1/jobs", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(jobs_of(&jobs, &refused).is_empty(), "{jobs}");
    assert_eq!(databases_and_roles_of(pg, &catalog_db, &placed).await, (1, 2));
    let (_, servers) = admin.call(Method::GET, "/v1/servers", None).await;
    assert_eq!(
        (&servers["items"][0]["max_tenants"], &servers["items"][0]["tenants"]),
        (&json!(1), &json!(1)),
        "{servers}"
    );

    // The router binary, from the same SILO_CONFIG, serves the placed tenant only.
    let (router, router_addr) = Binary::start("silo-router", &config, &envs[..1], "router listening on http://").await;
    let http = reqwest::Client::new();
    let get = |slug: &str| {
        http.get(format!("http://{router_addr}/api/v1/me"))
            .header(reqwest::header::HOST, format!("{slug}.localhost"))
            .bearer_auth(created["api_key"].as_str().unwrap())
            .send()
    };
    let resp = get(&placed).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap()["tenant"], placed.as_str());
    let resp = get(&refused).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "tenant_not_found");

    // A deleted tenant no longer counts: the refused slug fits now.
    let (status, deleted) = admin.call(Method::DELETE, &format!("/v1/tenants/{placed}"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{deleted}");
    let job = admin.wait_job(deleted["job"]["id"].as_i64().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let (status, created) = admin
        .call(Method::POST, "/v1/tenants", Some(json!({"slug": refused})))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let job = admin.wait_job(created["job"]["id"].as_i64().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");

    assert!(router.terminate().await.success(), "the router exits 0 on SIGTERM");
    assert!(
        control_plane.terminate().await.success(),
        "the control plane exits 0 on SIGTERM"
    );
}

/// A tenant whose provisioning failed cannot be suspended, resumed, rotated, given a key or
/// have its credentials read: each is 409 `invalid_state` with the error JSON, and nothing
/// changes; a job that succeeded cannot be retried (409 `invalid_state`).
#[tokio::test(flavor = "multi_thread")]
async fn operations_a_tenants_state_does_not_allow_are_409_invalid_state() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("broken");
    fail::cfg("provision-after-step", "return(roles)").unwrap();
    let (status, created) = stack
        .admin(Method::POST, "/v1/tenants", Some(json!({"slug": slug})))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let job = stack.wait_job(created["job"]["id"].as_i64().unwrap()).await.unwrap();
    fail::remove("provision-after-step");
    assert_eq!(job["state"], "failed", "{job}");

    for (method, path, body) in [
        (Method::POST, "suspend", None),
        (Method::POST, "resume", None),
        (Method::POST, "rotate", Some(json!({}))),
        (Method::POST, "keys", Some(json!({"name": "ci"}))),
        (Method::GET, "credentials", None),
    ] {
        let (status, answer) = stack
            .admin(method, &format!("/v1/tenants/{slug}/{path}"), body)
            .await
            .unwrap();
        assert_error(status, &answer, StatusCode::CONFLICT, "invalid_state");
    }
    let (_, tenant) = stack
        .admin(Method::GET, &format!("/v1/tenants/{slug}"), None)
        .await
        .unwrap();
    assert_eq!(tenant["status"], "failed", "{tenant}");
    let (_, jobs) = stack.admin(Method::GET, "/v1/jobs", None).await.unwrap();
    let kinds: Vec<&Value> = jobs_of(&jobs, &slug).iter().map(|j| &j["kind"]).collect();
    assert_eq!(kinds, [&json!("provision")], "no job was queued: {jobs}");

    // Retried, it succeeds; a succeeded job is not retried again.
    let id = job["id"].as_i64().unwrap();
    assert_eq!(stack.retry_job(id).await.unwrap()["state"], "succeeded");
    let (status, answer) = stack
        .admin(Method::POST, &format!("/v1/jobs/{id}/retry"), None)
        .await
        .unwrap();
    assert_error(status, &answer, StatusCode::CONFLICT, "invalid_state");
    stack.stop().await.unwrap();
}

/// While provisioning waits to retry a transient failure, the tenant is `provisioning`: the
/// router answers 503 `tenant_unavailable` with `Retry-After`, suspending or rotating it is
/// 409 `invalid_state`, and `GET /v1/jobs` shows its job with the error and attempts so far.
/// Once the failure clears the job succeeds by itself, the tenant is served, and the control
/// plane's `/metrics` counted the provisioning.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_still_provisioning_gets_503_with_retry_after_until_it_is_served() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let metrics_url = format!("http://{}/metrics", stack.control_plane_addr());
    let provisioned = r#"silo_job_step_seconds_count{kind="provision",step="activate"}"#;
    let before = reqwest::get(&metrics_url).await.unwrap();
    assert_eq!(before.status(), StatusCode::OK);
    let content_type = before.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let before = before.text().await.unwrap();
    let retried = r#"silo_job_runs_total{kind="provision",outcome="retried"}"#;
    let succeeded = r#"silo_job_runs_total{kind="provision",outcome="succeeded"}"#;
    let (retried_before, succeeded_before) = (sample(&before, retried), sample(&before, succeeded));
    let before = sample(&before, provisioned);

    fail::cfg("provision-unavailable-after-database", "return").unwrap();
    let slug = unique_name("slow");
    let (status, created) = stack
        .admin(Method::POST, "/v1/tenants", Some(json!({"slug": slug})))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(created["tenant"]["status"], "provisioning", "{created}");
    let key = created["api_key"].as_str().unwrap().to_owned();
    let id = created["job"]["id"].as_i64().unwrap();

    // Wait for the first attempt to fail; the job is queued to run again.
    let deadline = Instant::now() + Duration::from_secs(20);
    let job = loop {
        let (status, jobs) = stack.admin(Method::GET, "/v1/jobs", None).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{jobs}");
        let mine = jobs_of(&jobs, &slug);
        assert_eq!(mine.len(), 1, "{jobs}");
        if mine[0]["error"].is_string() {
            break mine[0].clone();
        }
        assert!(Instant::now() < deadline, "the first attempt did not fail: {jobs}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (&job["id"], &job["kind"], &job["step"]),
        (&json!(id), &json!("provision"), &json!("database")),
        "{job}"
    );
    assert!(matches!(job["state"].as_str(), Some("queued" | "running")), "{job}");
    assert!(job["attempts"].as_i64().unwrap() >= 1, "{job}");
    let (_, tenant) = stack
        .admin(Method::GET, &format!("/v1/tenants/{slug}"), None)
        .await
        .unwrap();
    assert_eq!(tenant["status"], "provisioning", "{tenant}");

    let resp = stack.tenant_get(&slug, &key, "/api/v1/me").await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .expect("Retry-After on 503")
        .to_str()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    let body: Value = resp.json().await.unwrap();
    assert_error(
        StatusCode::SERVICE_UNAVAILABLE,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "tenant_unavailable",
    );
    for action in ["suspend", "rotate"] {
        let (status, answer) = stack
            .admin(Method::POST, &format!("/v1/tenants/{slug}/{action}"), None)
            .await
            .unwrap();
        assert_error(status, &answer, StatusCode::CONFLICT, "invalid_state");
    }

    // The failure clears: the queued job resumes on its own.
    fail::remove("provision-unavailable-after-database");
    let job = stack.wait_job(id).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(job["attempts"].as_i64().unwrap() >= 2, "{job}");
    assert_eq!(job["error"], Value::Null, "{job}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = stack.tenant_get(&slug, &key, "/api/v1/me").await.unwrap();
        if resp.status() == StatusCode::OK {
            assert_eq!(resp.json::<Value>().await.unwrap()["tenant"], slug.as_str());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not served 10 s after provisioning: {}",
            resp.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, jobs) = stack.admin(Method::GET, "/v1/jobs", None).await.unwrap();
    assert_eq!(jobs_of(&jobs, &slug)[0]["state"], "succeeded", "{jobs}");

    let after = reqwest::get(&metrics_url).await.unwrap().text().await.unwrap();
    assert!(after.contains("# TYPE silo_job_step_seconds "), "{after}");
    assert_eq!(
        sample(&after, provisioned),
        before + 1.0,
        "one more provisioning: {after}"
    );
    assert!(
        sample(&after, retried) > retried_before,
        "the transient failures were counted: {after}"
    );
    assert_eq!(sample(&after, succeeded), succeeded_before + 1.0, "{after}");
    stack.stop().await.unwrap();
}

/// Bad config files, given by `SILO_CONFIG` (or `--config`, which wins over it): both
/// binaries exit 2 with one stderr line naming the key, and print nothing on stdout.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_config_stops_both_binaries_with_exit_2_and_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = "catalog_url = \"postgres://postgres@127.0.0.1:1/silo_catalog\"\n\
                [secrets]\nlocal_master_key_file = \"master.key\"\n";
    let server = "[[servers]]\nname = \"pg-1\"\nhost = \"127.0.0.1\"\nport = 5432\n\
                  admin_user = \"postgres\"\nadmin_password_env = \"PG1_PASSWORD\"\n";
    let cases = [
        (
            "[router]\nmax_connections_per_tenant = \"five\"\n".to_owned(),
            "router.max_connections_per_tenant",
        ),
        (format!("{server}max_tenants = \"many\"\n"), "servers.max_tenants"),
        (
            "[control_plane]\nlisten_port = 7070\n".to_owned(),
            "control_plane.listen_port",
        ),
        ("[routr]\nlisten = \"127.0.0.1:8080\"\n".to_owned(), "routr"),
        ("[rotation]\ninterval = \"soon\"\n".to_owned(), "rotation.interval"),
    ];
    let run = |binary: &'static str, env_config: std::path::PathBuf, flag_config: Option<std::path::PathBuf>| async move {
        let mut cmd = tokio::process::Command::new(silo_tests::workspace_binary(binary));
        cmd.env("SILO_CONFIG", &env_config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(path) = &flag_config {
            cmd.arg("--config").arg(path);
        }
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("{binary} did not stop within 30 s"))
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{binary}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{binary}: one line: {stderr:?}");
        assert!(stderr.starts_with("error: "), "{binary}: {stderr:?}");
        assert!(
            out.stdout.is_empty(),
            "{binary}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    };
    let mut files = Vec::new();
    for (n, (bad, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad-{n}.toml"));
        std::fs::write(&path, format!("{base}{bad}")).unwrap();
        for binary in ["silo-control-plane", "silo-router"] {
            let stderr = run(binary, path.clone(), None).await;
            assert!(stderr.contains(key), "{binary} names {key}: {stderr:?}");
        }
        files.push(path);
    }
    // `--config` wins over SILO_CONFIG.
    for binary in ["silo-control-plane", "silo-router"] {
        let stderr = run(binary, files[0].clone(), Some(files[2].clone())).await;
        assert!(stderr.contains("control_plane.listen_port"), "{binary}: {stderr:?}");
    }
}

/// The control plane says in one line what keeps it from starting: a missing master key file
/// before it tries the catalog, and the catalog connection's own error (not a pool timeout).
#[tokio::test(flavor = "multi_thread")]
async fn the_control_plane_says_why_it_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("silo.toml");
    std::fs::write(
        &config,
        "catalog_url = \"postgres://postgres@127.0.0.1:1/silo_catalog\"\n\
         [secrets]\nlocal_master_key_file = \"master.key\"\n",
    )
    .unwrap();
    let run = || async {
        let out = tokio::process::Command::new(silo_tests::workspace_binary("silo-control-plane"))
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), out)
            .await
            .expect("the control plane did not stop within 30 s")
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_ne!(out.status.code(), Some(0), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
        stderr
    };
    let stderr = run().await;
    assert!(stderr.contains("master.key"), "names the key file: {stderr:?}");

    silo_control_plane::secrets::local::create_master_key(&dir.path().join("master.key")).unwrap();
    let stderr = run().await;
    assert!(
        stderr.contains("refused") && !stderr.contains("timed out"),
        "the connection's own error: {stderr:?}"
    );
}
