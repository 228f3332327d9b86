//! Test support for silo's end-to-end tests: throw-away PostgreSQL clusters ([`pg`]) and
//! unique names so tests run in parallel without sharing state.

pub mod bench;
pub mod moto;
pub mod openapi;
pub mod pg;
pub mod stack;

use std::sync::atomic::{AtomicU32, Ordering};

/// A name no other test in any process uses: `{prefix}{pid}{counter}{random}`, lowercase
/// letters and digits only (valid as a tenant slug when `prefix` is one).
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r: u32 = rand::random::<u32>() % 1_000_000;
    format!("{prefix}{}x{n}x{r}", std::process::id() % 100_000)
}

/// Turns on test logs when `TEST_LOG=1`, and installs the process's rustls crypto provider
/// (reqwest needs it: see `silo_control_plane::install_crypto_provider`).
pub fn init_logging() {
    silo_control_plane::install_crypto_provider();
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()),
            )
            .with_test_writer()
            .try_init();
    }
}

/// What this test process logged at info and above, from [`capture_logs`] on.
#[derive(Clone, Default)]
pub struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Everything logged so far, one event a line.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Sends this process's logs to the returned buffer, instead of wherever [`init_logging`]
/// would. Call it first thing in a test (nextest runs each test in a process of its own).
pub fn capture_logs() -> CapturedLogs {
    silo_control_plane::install_crypto_provider();
    let logs = CapturedLogs::default();
    tracing_subscriber::fmt()
        .with_env_filter("info,sqlx=warn")
        .with_writer(logs.clone())
        .with_ansi(false)
        .try_init()
        .expect("nothing set up logging before capture_logs");
    logs
}

/// A binary of the workspace (`silo-router`, `siloctl`, ...), built next to the running test
/// binary in `target/debug/`. Panics with the build command when it is missing.
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("path of the test binary");
    let dir = exe.parent().and_then(std::path::Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --workspace --all-targets` first",
        path.display()
    );
    path
}

/// The fields DESIGN.md fixes for a tenant's JSON.
pub const TENANT_FIELDS: [&str; 10] = [
    "slug",
    "name",
    "status",
    "plan",
    "server",
    "database",
    "domains",
    "schema_version",
    "credentials_rotated_at",
    "created_at",
];

/// Runs `binary --config FILE` (a silo binary) on a config made of `toml`, written to
/// `dir/silo.toml`, which the binary must refuse: asserts exit code 2 and one line on stderr,
/// and returns that line.
pub fn refused_config(binary: &str, dir: &std::path::Path, toml: &str) -> String {
    let config = dir.join("silo.toml");
    std::fs::write(&config, toml).expect("write the config");
    let out = std::process::Command::new(workspace_binary(binary))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "off")
        .output()
        .expect("run the binary");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "a bad config: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

/// Runs the built `silo-control-plane --config CONFIG ARGS...` (a maintenance command) with
/// `env` set and logging off: exit code, stdout, stderr.
pub fn run_control_plane(
    config: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(workspace_binary("silo-control-plane"))
        .arg("--config")
        .arg(config)
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "off")
        .output()
        .expect("run silo-control-plane");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Options to log in with a tenant secret's JSON (`host`, `port`, `username`, `password`,
/// `dbname`), as the tenant app would.
pub fn secret_connect_options(secret: &serde_json::Value) -> sqlx::postgres::PgConnectOptions {
    let field = |name: &str| secret[name].as_str().unwrap_or_else(|| panic!("secret without {name}"));
    let port = secret["port"]
        .as_u64()
        .and_then(|port| u16::try_from(port).ok())
        .expect("secret with a port");
    sqlx::postgres::PgConnectOptions::new()
        .host(field("host"))
        .port(port)
        .username(field("username"))
        .password(field("password"))
        .database(field("dbname"))
}
