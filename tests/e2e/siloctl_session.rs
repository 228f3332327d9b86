//! An operator's session with the real `siloctl` binary against a real control plane and
//! router (no scripted API): every client subcommand, checked by what a user notices — exit
//! codes, `-o json` fields, tables, and the effect on tenant traffic through the router.

// Tests may unwrap (STYLE.md); that covers this module's helpers too.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::{unique_name, TENANT_FIELDS};

/// Runs `siloctl` with a clean environment (no SILO_*, an empty HOME) against `stack`.
struct Ctl<'a> {
    stack: &'a Stack,
    home: &'a Path,
}

impl Ctl<'_> {
    /// `siloctl --endpoint .. --token .. ARGS`.
    async fn run(&self, args: &[&str]) -> Output {
        let endpoint = format!("http://{}", self.stack.control_plane_addr());
        let mut cmd = self.command();
        cmd.args(["--endpoint", &endpoint, "--token", self.stack.admin_token()])
            .args(args);
        output(cmd, args).await
    }

    /// `siloctl ARGS` with the endpoint and token from SILO_ENDPOINT / SILO_TOKEN.
    async fn run_env(&self, args: &[&str]) -> Output {
        let mut cmd = self.command();
        cmd.env("SILO_ENDPOINT", format!("http://{}", self.stack.control_plane_addr()))
            .env("SILO_TOKEN", self.stack.admin_token())
            .args(args);
        output(cmd, args).await
    }

    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(silo_tests::workspace_binary("siloctl"));
        cmd.current_dir(self.home)
            .env_remove("SILO_ENDPOINT")
            .env_remove("SILO_TOKEN")
            .env("HOME", self.home)
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs ARGS, expects exit 0 and a quiet stderr, returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert_eq!(out.status.code(), Some(0), "siloctl {args:?}: {}", show(&out));
        assert!(out.stderr.is_empty(), "siloctl {args:?}: {}", show(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `-o json ARGS`, expects exit 0, returns the parsed stdout.
    async fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let stdout = self.ok(&all).await;
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("siloctl {all:?} printed no JSON ({e}): {stdout}"))
    }
}

async fn output(mut cmd: tokio::process::Command, args: &[&str]) -> Output {
    tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("siloctl {args:?} did not finish within 90 s"))
        .unwrap()
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts a failed run: exit `code`, nothing on stdout, one `error: ` line on stderr (returned).
fn failed(out: &Output, code: i32) -> String {
    assert_eq!(out.status.code(), Some(code), "{}", show(out));
    assert!(out.stdout.is_empty(), "{}", show(out));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "one stderr line: {stderr:?}");
    assert!(stderr.starts_with("error: "), "{stderr:?}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr:?}"
    );
    stderr.trim_end().to_owned()
}

fn assert_tenant_json(t: &Value) {
    let fields = t.as_object().unwrap_or_else(|| panic!("tenant is not an object: {t}"));
    for key in TENANT_FIELDS {
        assert!(fields.contains_key(key), "tenant JSON lacks {key:?}: {t}");
    }
    assert!(t["domains"].is_array() && t["schema_version"].is_i64(), "{t}");
}

/// The value of the `key: value` line of `siloctl`'s table output.
fn line_value<'a>(table: &'a str, key: &str) -> &'a str {
    table
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key:?} line in {table}"))
        .trim()
}

/// Polls `GET /api/v1/me` through the router until it answers `want` (5 s at most).
async fn router_answers(stack: &Stack, host: &str, key: &str, want: StatusCode) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = stack
            .tenant_request(Method::GET, host, "/api/v1/me")
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status == want {
            return body;
        }
        assert!(Instant::now() < deadline, "{host}: {status} {body}, want {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every `.dump` file under `dir`, at any depth.
fn dumps_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(dumps_under(&path));
        } else if path.extension().is_some_and(|e| e == "dump") {
            found.push(path);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn siloctl_session_against_a_real_control_plane() {
    let stack = Stack::start(StackOptions {
        extra_toml: "[backups]\ndir = \"backups\"\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let home = tempfile::tempdir().unwrap();
    let ctl = Ctl {
        stack: &stack,
        home: home.path(),
    };
    let (a, b) = (unique_name("ses"), unique_name("ses"));
    let domain = format!("{a}.example.com");

    // tenant create -o json: the finished tenant with every DESIGN field, and a working key.
    let created = ctl
        .json(&["tenant", "create", &a, "--name", "Acme Corp", "--domain", &domain])
        .await;
    let mut top: Vec<&String> = created.as_object().unwrap().keys().collect();
    top.sort_unstable();
    assert_eq!(top, ["api_key", "tenant"], "{created}");
    let tenant = &created["tenant"];
    assert_tenant_json(tenant);
    assert_eq!(tenant["slug"], a.as_str(), "{created}");
    assert_eq!(tenant["name"], "Acme Corp", "{created}");
    assert_eq!(tenant["status"], "active", "{created}");
    assert_eq!(tenant["server"], "pg-1", "{created}");
    assert_eq!(tenant["domains"], serde_json::json!([domain]), "{created}");
    let key_a = created["api_key"].as_str().unwrap().to_owned();
    assert!(!key_a.is_empty());
    let database_a = tenant["database"].as_str().unwrap().to_owned();
    let me = router_answers(&stack, &format!("{a}.localhost"), &key_a, StatusCode::OK).await;
    assert_eq!(me["tenant"], a.as_str(), "{me}");
    let me = router_answers(&stack, &domain, &key_a, StatusCode::OK).await;
    assert_eq!(me["tenant"], a.as_str(), "the custom domain reaches the tenant: {me}");

    // tenant create, table output (endpoint from the environment): the tenant and its key.
    let out = ctl.run_env(&["tenant", "create", &b]).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(out.stderr.is_empty(), "{}", show(&out));
    let table = String::from_utf8(out.stdout).unwrap();
    assert_eq!(line_value(&table, "slug"), b);
    assert_eq!(line_value(&table, "status"), "active");
    let key_b = line_value(&table, "API key").to_owned();
    let resp = stack.tenant_get(&b, &key_b, "/api/v1/tasks").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "the printed key works");

    // tenant list: both tenants, as a table and as JSON.
    let table = ctl.ok(&["tenant", "list"]).await;
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("SLUG") && header.contains("STATUS"), "{table}");
    for slug in [&a, &b] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(slug.as_str()) && l.contains("active")),
            "{table}"
        );
    }
    // Which tenant a database seen on a server is: database names do not say.
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(a.as_str()) && l.contains(database_a.as_str())),
        "{table}"
    );
    let list = ctl.json(&["tenant", "list"]).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{list}");
    items.iter().for_each(assert_tenant_json);

    // tenant show.
    let table = ctl.ok(&["tenant", "show", &a]).await;
    assert_eq!(line_value(&table, "name"), "Acme Corp");
    assert_eq!(line_value(&table, "domains"), domain);
    let shown = ctl.json(&["tenant", "show", &a]).await;
    assert_tenant_json(&shown);
    assert_eq!(shown["database"], database_a.as_str());

    // suspend: the state shows, and the router refuses the tenant; resume undoes both.
    let suspended = ctl.json(&["tenant", "suspend", &a]).await;
    assert_tenant_json(&suspended);
    assert_eq!(suspended["status"], "suspended", "{suspended}");
    let table = ctl.ok(&["tenant", "show", &a]).await;
    assert_eq!(line_value(&table, "status"), "suspended");
    let table = ctl.ok(&["tenant", "list"]).await;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(a.as_str()) && l.contains("suspended")),
        "{table}"
    );
    let body = router_answers(&stack, &format!("{a}.localhost"), &key_a, StatusCode::FORBIDDEN).await;
    assert_eq!(body["error"], "tenant_suspended", "{body}");
    let table = ctl.ok(&["tenant", "resume", &a]).await;
    assert_eq!(line_value(&table, "status"), "active");
    router_answers(&stack, &format!("{a}.localhost"), &key_a, StatusCode::OK).await;

    // key create: a new key that works through the router, under its name.
    let table = ctl.ok(&["tenant", "key", "create", &a, "--name", "ci"]).await;
    let key_ci = line_value(&table, "API key").to_owned();
    let me = router_answers(&stack, &format!("{a}.localhost"), &key_ci, StatusCode::OK).await;
    assert_eq!(
        (&me["tenant"], &me["key"]),
        (&Value::from(a.as_str()), &Value::from("ci"))
    );
    let minted = ctl.json(&["tenant", "key", "create", &a, "--name", "deploy"]).await;
    assert_eq!(minted["name"], "deploy", "{minted}");
    let key_deploy = minted["api_key"].as_str().unwrap();
    let me = router_answers(&stack, &format!("{a}.localhost"), key_deploy, StatusCode::OK).await;
    assert_eq!(me["key"], "deploy", "{me}");

    // credentials: the AWS-shaped secret JSON, in either output mode.
    let secret: Value = serde_json::from_str(&ctl.ok(&["tenant", "credentials", &a]).await).unwrap();
    let fields: Vec<&str> = secret.as_object().unwrap().keys().map(String::as_str).collect();
    for key in ["engine", "host", "port", "username", "password", "dbname"] {
        assert!(fields.contains(&key), "secret lacks {key:?}: {fields:?}");
    }
    assert_eq!(secret["engine"], "postgres");
    assert_eq!(secret["dbname"], database_a.as_str());
    assert_eq!(secret["port"], stack.pg().port());
    assert!(!secret["password"].as_str().unwrap().is_empty());

    // rotate SLUG: waits, the job succeeded, new credentials, the tenant still served.
    // (a list of slugs: a job table, one row per tenant).
    let table = ctl.ok(&["rotate", &a]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[0].starts_with("ID") && lines[0].contains("STATE"), "{table}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[1..4], ["rotate", a.as_str(), "succeeded"], "{table}");
    let rotated_job: i64 = row[0].parse().unwrap();
    let after = ctl.json(&["tenant", "credentials", &a]).await;
    assert_ne!(after["password"], secret["password"], "rotation changed the password");
    router_answers(&stack, &format!("{a}.localhost"), &key_a, StatusCode::OK).await;

    // rotate --all --no-wait: one queued job per tenant, which finish on their own.
    let queued = ctl.json(&["rotate", "--all", "--no-wait"]).await;
    let jobs = queued["jobs"].as_array().unwrap();
    let mut tenants: Vec<&str> = jobs.iter().map(|j| j["tenant"].as_str().unwrap()).collect();
    tenants.sort_unstable();
    let mut want = vec![a.as_str(), b.as_str()];
    want.sort_unstable();
    assert_eq!(tenants, want, "{queued}");
    for job in jobs {
        let id = job["id"].as_i64().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let job = ctl.json(&["jobs", "show", &id]).await;
            assert_eq!(job["kind"], "rotate", "{job}");
            match job["state"].as_str() {
                Some("succeeded") => break,
                Some("queued" | "running") if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => panic!("rotate job {id}: {job}"),
            }
        }
    }
    router_answers(&stack, &format!("{b}.localhost"), &key_b, StatusCode::OK).await;

    // migrate --all, then migrate one tenant with concurrency and canary: both succeed and
    // every tenant is at the target version.
    let table = ctl.ok(&["migrate", "--all"]).await;
    assert_eq!(line_value(&table, "kind"), "migrate");
    assert_eq!(line_value(&table, "state"), "succeeded");
    let migrated = ctl.json(&["migrate", &a, "--concurrency", "2", "--canary", "1"]).await;
    assert_eq!(migrated["job"]["kind"], "migrate", "{migrated}");
    assert_eq!(migrated["job"]["state"], "succeeded", "{migrated}");
    let migrate_job = migrated["job"]["id"].as_i64().unwrap();
    let status = ctl.json(&["migrate", "status"]).await;
    let target = status["target_version"].as_i64().unwrap();
    assert!(target > 0, "{status}");
    let items = status["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{status}");
    for item in items {
        assert_eq!(item["schema_version"], target, "{status}");
    }
    let table = ctl.ok(&["migrate", "status"]).await;
    assert_eq!(line_value(&table, "target version"), target.to_string());
    assert!(table.lines().any(|l| l.starts_with(b.as_str())), "{table}");
    // A slug with a typo is an error, not a rollout that succeeds doing nothing.
    let line = failed(&ctl.run(&["migrate", "nobody-here"]).await, 1);
    assert!(
        line.contains("nobody-here") && line.contains("does not exist"),
        "{line}"
    );

    // jobs list and jobs show.
    let table = ctl.ok(&["jobs", "list"]).await;
    assert!(table.lines().next().unwrap().starts_with("ID"), "{table}");
    for kind in ["provision", "rotate", "migrate"] {
        assert!(table.contains(kind), "no {kind} job listed: {table}");
    }
    let listed = ctl.json(&["jobs", "list"]).await;
    let ids: Vec<i64> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert!(ids.contains(&rotated_job) && ids.contains(&migrate_job), "{listed}");
    let table = ctl.ok(&["jobs", "show", &rotated_job.to_string()]).await;
    assert_eq!(line_value(&table, "id"), rotated_job.to_string());
    assert_eq!(line_value(&table, "tenant"), a);
    assert_eq!(line_value(&table, "state"), "succeeded");
    let job = ctl.json(&["jobs", "show", &migrate_job.to_string()]).await;
    for key in ["id", "kind", "tenant", "state", "step", "attempts", "error", "progress"] {
        assert!(job.get(key).is_some(), "job JSON lacks {key:?}: {job}");
    }
    failed(&ctl.run(&["jobs", "show", "987654321"]).await, 1);

    // server list: the one server, holding both tenants.
    let table = ctl.ok(&["server", "list"]).await;
    assert!(table.lines().any(|l| l.starts_with("pg-1")), "{table}");
    let servers = ctl.json(&["server", "list"]).await;
    assert_eq!(servers["items"][0]["name"], "pg-1", "{servers}");
    assert_eq!(servers["items"][0]["tenants"], 2, "{servers}");

    // Usage errors exit 2, send nothing, and leave the tenant alone.
    failed(&ctl.run(&["tenant", "delete", &a]).await, 2);
    failed(&ctl.run(&["tenant", "create", "Not_A_Slug"]).await, 2);
    failed(&ctl.run(&["migrate", "--all", "--concurrency", "many"]).await, 2);
    assert_eq!(ctl.json(&["tenant", "show", &a]).await["status"], "active");

    // A wrong token fails with one line that does not echo it.
    let endpoint = format!("http://{}", stack.control_plane_addr());
    let mut cmd = ctl.command();
    cmd.args(["--endpoint", &endpoint, "--token", "not-the-token", "tenant", "list"]);
    let line = failed(&output(cmd, &["tenant", "list"]).await, 1);
    assert!(!line.contains("not-the-token"), "{line}");

    // Deleting an unknown tenant fails with one line.
    let line = failed(&ctl.run(&["tenant", "delete", "nobody-here", "--yes"]).await, 1);
    assert!(line.contains("nobody-here"), "{line}");

    // delete: the tenant is gone for siloctl and for the router.
    let table = ctl.ok(&["tenant", "delete", &b, "--yes"]).await;
    assert_eq!(line_value(&table, "kind"), "delete");
    assert_eq!(line_value(&table, "state"), "succeeded");
    failed(&ctl.run(&["tenant", "show", &b]).await, 1);
    let body = router_answers(&stack, &format!("{b}.localhost"), &key_b, StatusCode::NOT_FOUND).await;
    assert_eq!(body["error"], "tenant_not_found", "{body}");

    // delete --backup: a dump is left under the backups directory.
    let backups = stack.dir().join("backups");
    assert!(dumps_under(&backups).is_empty());
    let deleted = ctl.json(&["tenant", "delete", &a, "--yes", "--backup"]).await;
    assert_eq!(deleted["job"]["state"], "succeeded", "{deleted}");
    let dumps = dumps_under(&backups);
    assert_eq!(dumps.len(), 1, "{dumps:?}");
    assert_eq!(
        deleted["job"]["progress"]["backup"],
        dumps[0].to_str().unwrap(),
        "{deleted}"
    );
    assert!(std::fs::metadata(&dumps[0]).unwrap().len() > 0, "{dumps:?}");
    router_answers(&stack, &format!("{a}.localhost"), &key_a, StatusCode::NOT_FOUND).await;
    let list = ctl.json(&["tenant", "list"]).await;
    let live: Vec<&Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["status"] != "deleted")
        .collect();
    assert!(live.is_empty(), "{list}");

    stack.stop().await.unwrap();
}
