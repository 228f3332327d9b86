//! `siloctl` as a user runs it: the real binary, against a scripted admin API for the client
//! behaviour (exit codes, one-line errors, auth, job waiting, context files), and against a
//! full `siloctl dev` stack end to end.

// Tests may unwrap (STYLE.md); that covers this module's helpers too.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn binary(name: &str) -> PathBuf {
    silo_tests::workspace_binary(name)
}

/// `siloctl` with a clean environment: no SILO_* variables, an empty HOME, run in `cwd`.
fn siloctl(cwd: &Path, home: &Path) -> Command {
    let mut cmd = Command::new(binary("siloctl"));
    cmd.current_dir(cwd)
        .env_remove("SILO_ENDPOINT")
        .env_remove("SILO_TOKEN")
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .stdin(Stdio::null());
    cmd
}

fn stderr_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        stderr.lines().count(),
        1,
        "expected exactly one stderr line, got {stderr:?}"
    );
    assert!(stderr.starts_with("error: "), "{stderr:?}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr:?}"
    );
    stderr.trim_end().to_owned()
}

/// One request the scripted API received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
    body: String,
}

/// A scripted admin API: answers `"METHOD /path"` with a canned status and JSON body (the
/// last one listed for a route repeats), records every request.
struct FakeApi {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeApi {
    fn start(routes: Vec<(&str, u16, Value)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut script: HashMap<String, Vec<(u16, String)>> = HashMap::new();
        for (route, status, body) in routes {
            script
                .entry(route.to_owned())
                .or_default()
                .push((status, body.to_string()));
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let Some(req) = read_request(&stream) else { continue };
                let route = format!("{} {}", req.method, req.path);
                log.lock().unwrap().push(req);
                let (status, body) = match script.get_mut(&route) {
                    Some(answers) if answers.len() > 1 => answers.remove(0),
                    Some(answers) => answers[0].clone(),
                    None => (
                        404,
                        json!({"error": "not_found", "message": "no such route"}).to_string(),
                    ),
                };
                let mut stream = stream;
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self { url, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn read_request(stream: &TcpStream) -> Option<Seen> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut authorization = None;
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "authorization" => authorization = Some(value.trim().to_owned()),
            "content-length" => length = value.trim().parse().ok()?,
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Seen {
        method,
        path,
        authorization,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn tenant(slug: &str, status: &str) -> Value {
    json!({"slug": slug, "name": slug, "status": status, "plan": "free", "server": "pg-1",
           "database": format!("tenant_{slug}"), "domains": [], "schema_version": 3,
           "credentials_rotated_at": null, "created_at": "2026-11-26T00:00:00Z"})
}

fn job(id: u64, state: &str, error: Option<&str>) -> Value {
    json!({"id": id, "kind": "provision", "tenant": "acme", "state": state, "step": "create_database",
           "attempts": 1, "error": error, "progress": {}, "created_at": "2026-11-26T00:00:00Z",
           "updated_at": "2026-11-26T00:00:01Z"})
}

#[test]
fn usage_errors_exit_2_without_a_request() {
    let api = FakeApi::start(vec![]);
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["tenant", "create", "Bad_Slug"][..],
        &["tenant", "delete", "acme"],
        &["tenant", "delete", "x"],
        &["frobnicate"],
        &["rotate", "acme", "--all"],
        &["-o", "yaml", "tenant", "list"],
    ] {
        let out = siloctl(dir.path(), dir.path())
            .args(args)
            .env("SILO_ENDPOINT", &api.url)
            .env("SILO_TOKEN", "t0k3n")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let line = stderr_line(&out);
        if args == ["tenant", "delete", "acme"] {
            assert!(line.contains("--yes"), "{line}");
        }
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert!(api.seen().is_empty(), "usage errors sent requests: {:?}", api.seen());
}

#[test]
fn no_endpoint_configured_is_a_usage_error_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let out = siloctl(dir.path(), dir.path())
        .args(["tenant", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let line = stderr_line(&out);
    assert!(line.contains("siloctl dev") && line.contains("SILO_ENDPOINT"), "{line}");
}

#[test]
fn unreachable_endpoint_fails_with_one_line() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let out = siloctl(dir.path(), dir.path())
        .args(["tenant", "list"])
        .env("SILO_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .env("SILO_TOKEN", "s3cr3t-token")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let line = stderr_line(&out);
    assert!(
        line.contains("cannot reach") && line.contains(&port.to_string()),
        "{line}"
    );
    assert!(!line.contains("s3cr3t-token"));
}

#[test]
fn api_errors_show_code_and_message_and_never_the_token() {
    let api = FakeApi::start(vec![(
        "POST /v1/tenants",
        409,
        json!({"error": "tenant_exists", "message": "tenant acme exists already"}),
    )]);
    let dir = tempfile::tempdir().unwrap();
    let out = siloctl(dir.path(), dir.path())
        .args([
            "--endpoint",
            &api.url,
            "--token",
            "s3cr3t-token",
            "tenant",
            "create",
            "acme",
            "--plan",
            "pro",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr_line(&out), "error: tenant_exists: tenant acme exists already");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cr3t-token"));
    let seen = api.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer s3cr3t-token"));
    let body: Value = serde_json::from_str(&seen[0].body).unwrap();
    assert_eq!(body, json!({"slug": "acme", "plan": "pro"}));
}

#[test]
fn create_waits_for_the_job_and_prints_the_finished_tenant() {
    let api = FakeApi::start(vec![
        (
            "POST /v1/tenants",
            202,
            json!({"tenant": tenant("acme", "provisioning"), "job": job(7, "queued", None), "api_key": "silo_k3y"}),
        ),
        ("GET /v1/jobs/7", 200, job(7, "running", None)),
        ("GET /v1/jobs/7", 200, job(7, "succeeded", None)),
        ("GET /v1/tenants/acme", 200, tenant("acme", "active")),
    ]);
    let dir = tempfile::tempdir().unwrap();
    // The context comes from ./.silo/env, as `siloctl dev` writes it.
    std::fs::create_dir(dir.path().join(".silo")).unwrap();
    std::fs::write(
        dir.path().join(".silo/env"),
        format!("SILO_ENDPOINT={}\nSILO_TOKEN=from-file\n", api.url),
    )
    .unwrap();
    let out = siloctl(dir.path(), dir.path())
        .args(["-o", "json", "tenant", "create", "acme"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        printed,
        json!({"tenant": tenant("acme", "active"), "api_key": "silo_k3y"})
    );
    let seen = api.seen();
    assert!(seen
        .iter()
        .all(|s| s.authorization.as_deref() == Some("Bearer from-file")));
    assert_eq!(seen.iter().filter(|s| s.path == "/v1/jobs/7").count(), 2);

    // The table output shows the key once, with the warning.
    let api = FakeApi::start(vec![
        (
            "POST /v1/tenants",
            202,
            json!({"tenant": tenant("acme", "provisioning"), "job": job(7, "succeeded", None), "api_key": "silo_k3y"}),
        ),
        ("GET /v1/tenants/acme", 200, tenant("acme", "active")),
    ]);
    let out = siloctl(dir.path(), dir.path())
        .args(["tenant", "create", "acme"])
        .env("SILO_ENDPOINT", &api.url)
        .env("SILO_TOKEN", "t")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("silo_k3y") && stdout.contains("shown once") && stdout.contains("active"),
        "{stdout}"
    );
}

#[test]
fn failed_job_exits_1_with_the_job_error() {
    let api = FakeApi::start(vec![
        (
            "DELETE /v1/tenants/acme?backup=true",
            202,
            json!({"job": job(9, "queued", None)}),
        ),
        (
            "GET /v1/jobs/9",
            200,
            job(9, "failed", Some("server pg-1 is unreachable")),
        ),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let out = siloctl(dir.path(), dir.path())
        .args(["tenant", "delete", "acme", "--yes", "--backup"])
        .env("SILO_ENDPOINT", &api.url)
        .env("SILO_TOKEN", "t")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let line = stderr_line(&out);
    assert!(
        line.contains("job 9") && line.contains("server pg-1 is unreachable"),
        "{line}"
    );
}

#[test]
fn list_commands_print_aligned_tables() {
    let api = FakeApi::start(vec![
        (
            "GET /v1/tenants",
            200,
            json!({"items": [tenant("acme", "active"), tenant("globex-industries", "suspended")]}),
        ),
        (
            "GET /v1/servers",
            200,
            json!({"items": [{"name": "pg-1", "host": "127.0.0.1", "port": 5432, "max_tenants": 1000, "tenants": 2, "sslmode": "prefer"}]}),
        ),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = siloctl(dir.path(), dir.path())
            .args(args)
            .env("SILO_ENDPOINT", &api.url)
            .env("SILO_TOKEN", "t")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let table = run(&["tenant", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    let status_col = lines[0].find("STATUS").unwrap();
    assert_eq!(&lines[1][status_col..status_col + 6], "active");
    assert_eq!(&lines[2][status_col..status_col + 9], "suspended");
    let servers = run(&["server", "list"]);
    assert!(
        servers.lines().next().is_some_and(|header| header.contains("SSLMODE")),
        "{servers}"
    );
    assert!(
        servers
            .lines()
            .any(|line| line.contains("pg-1") && line.contains("prefer")),
        "{servers}"
    );
    let json: Value = serde_json::from_str(&run(&["-o", "json", "tenant", "list"])).unwrap();
    assert_eq!(json["items"][1]["slug"], "globex-industries");
}

/// Kills `siloctl dev` if the test fails before stopping it.
struct DevGuard(std::process::Child);

impl Drop for DevGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Full stack: `siloctl dev --demo` in a temp dir, then siloctl and tenant traffic through the
/// router, then SIGTERM: a clean exit and no PostgreSQL left behind.
#[tokio::test(flavor = "multi_thread")]
async fn dev_stack_end_to_end() {
    let data = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_owned();
    let mut dev = Command::new(binary("siloctl"));
    dev.current_dir(home.path())
        .env_remove("SILO_ENDPOINT")
        .env_remove("SILO_TOKEN")
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path().join(".config"))
        .arg("dev")
        .arg("--data-dir")
        .arg(&data_dir)
        .args([
            "--http-port",
            "0",
            "--https-port",
            "0",
            "--api-port",
            "0",
            "--metrics-port",
            "0",
            "--demo",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut guard = DevGuard(dev.spawn().unwrap());
    let stdout = guard.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut printed = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == "ready" => break,
            Ok(line) => printed.push(line),
            Err(_) => panic!("siloctl dev did not print `ready` within 60 s; it printed {printed:#?}"),
        }
    }
    let router_port: u16 = printed
        .iter()
        .find_map(|l| {
            l.trim()
                .strip_prefix("router")?
                .trim()
                .strip_prefix("http://127.0.0.1:")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no router URL in {printed:#?}"));
    let demo_key = printed
        .iter()
        .find_map(|l| Some(l.split("Bearer ").nth(1)?.split('\'').next()?.to_owned()))
        .unwrap_or_else(|| panic!("no demo key in {printed:#?}"));

    // The env file is private and names the admin API.
    let env_file = data_dir.join("env");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&env_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let env = std::fs::read_to_string(&env_file).unwrap();
    assert!(
        env.contains("SILO_ENDPOINT=http://127.0.0.1:") && env.contains("SILO_TOKEN=silo_admin_"),
        "{env}"
    );

    // siloctl finds the stack through the user context file that dev wrote.
    let cwd = tempfile::tempdir().unwrap();
    let slug = silo_tests::unique_name("cli");
    let out = siloctl(cwd.path(), home.path())
        .args(["-o", "json", "tenant", "create", &slug])
        .output()
        .unwrap();
    assert!(out.status.success(), "tenant create: {out:?}");
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["tenant"]["slug"], slug.as_str());
    assert_eq!(created["tenant"]["status"], "active");
    let key = created["api_key"].as_str().unwrap().to_owned();

    let out = siloctl(cwd.path(), home.path())
        .args(["-o", "json", "tenant", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "tenant list: {out:?}");
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let slugs: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["slug"].as_str())
        .collect();
    assert!(slugs.contains(&"demo") && slugs.contains(&slug.as_str()), "{slugs:?}");

    // Tenant traffic through the router, as the printed curl line does it.
    silo_control_plane::install_crypto_provider();
    let http = reqwest::Client::new();
    let tasks = |host: String, key: String| {
        http.get(format!("http://127.0.0.1:{router_port}/api/v1/tasks"))
            .header("host", host)
            .bearer_auth(key)
            .send()
    };
    let resp = tasks("demo.localhost".into(), demo_key.clone()).await.unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    let resp = tasks(format!("{slug}.localhost"), key.clone()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = tasks(format!("{slug}.localhost"), demo_key.clone()).await.unwrap();
    assert_eq!(resp.status(), 401, "demo's key must not open another tenant");

    // HTTPS with the dev CA, as the printed `curl --cacert` line does it: HTTP/2 by ALPN.
    assert!(!printed.iter().any(|l| l.contains("not served yet")), "{printed:#?}");
    let (ca, https_port) = printed
        .iter()
        .find_map(|l| {
            let rest = l.split("curl --cacert ").nth(1)?;
            let (ca, url) = rest.split_once(' ')?;
            let port = url
                .strip_prefix("https://SLUG.localhost:")?
                .split('/')
                .next()?
                .parse::<u16>()
                .ok()?;
            Some((PathBuf::from(ca), port))
        })
        .unwrap_or_else(|| panic!("no `curl --cacert` line in {printed:#?}"));
    assert_eq!(ca, data_dir.join("tls/ca.crt"));
    let https = |host: &str| {
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
            .resolve(host, ([127, 0, 0, 1], https_port).into())
            .build()
            .unwrap()
    };
    let resp = https("demo.localhost")
        .get(format!("https://demo.localhost:{https_port}/api/v1/tasks"))
        .bearer_auth(&demo_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    // A tenant created while dev runs gets its certificate within a few seconds.
    let host = format!("{slug}.localhost");
    let deadline = Instant::now() + Duration::from_secs(15);
    let resp = loop {
        match https(&host)
            .get(format!("https://{host}:{https_port}/api/v1/tasks"))
            .bearer_auth(&key)
            .send()
            .await
        {
            Ok(resp) => break resp,
            Err(e) if Instant::now() > deadline => panic!("no HTTPS for {host} within 15 s: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(resp.status(), 200);
    // Once deleted, its handshake fails as an unknown tenant's does: HTTPS does not tell
    // which tenants existed.
    let out = siloctl(cwd.path(), home.path())
        .args(["tenant", "delete", &slug, "--yes"])
        .output()
        .unwrap();
    assert!(out.status.success(), "tenant delete: {out:?}");
    let unknown = "neverwas.localhost";
    https(unknown)
        .get(format!("https://{unknown}:{https_port}/api/v1/tasks"))
        .send()
        .await
        .expect_err("an unknown tenant has no certificate");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match https(&host)
            .get(format!("https://{host}:{https_port}/api/v1/tasks"))
            .send()
            .await
        {
            Err(_) => break,
            Ok(resp) if Instant::now() > deadline => {
                panic!(
                    "{host} still has its certificate 15 s after its deletion: {}",
                    resp.status()
                )
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }

    // SIGTERM: everything stops, exit 0.
    let pid = nix::unistd::Pid::from_raw(guard.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = guard.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "siloctl dev did not exit within 15 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "siloctl dev exited with {status}");
    let needle = data_dir.to_string_lossy().into_owned();
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect();
    assert!(leftovers.is_empty(), "processes left behind: {leftovers:?}");
}
