//! A throw-away `moto_server` (AWS service mock, Python package `moto[server]`) on a free
//! 127.0.0.1 port, for testing the AWS Secrets Manager backend and the S3 copies of backups
//! with the real AWS SDK.
//!
//! The server is a supervised child with a parent-death signal, like the PostgreSQL clusters:
//! it stops when its [`MotoServer`] drops or when the test process ends in any way. A missing
//! `moto_server` is an error (run `scripts/install-deps`), never a skipped test.

use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use silo_control_plane::localpg;
use tokio::sync::OnceCell;

/// The region the tests' AWS clients use.
pub const REGION: &str = "us-east-1";

/// A running `moto_server`. Dropping it stops the server.
pub struct MotoServer {
    port: u16,
    pid: Pid,
    supervisor: Option<JoinHandle<std::io::Result<ExitStatus>>>,
    log: PathBuf,
}

impl std::fmt::Debug for MotoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MotoServer")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// `moto_server` on `PATH`, or in the venv `scripts/install-deps` creates.
fn find_moto_server() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("moto_server"));
    let in_venv = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/silo/venv/bin/moto_server"));
    on_path.chain(in_venv).find(|p| p.is_file()).context(
        "moto_server not found on PATH or in ~/.cache/silo/venv/bin: run scripts/install-deps \
         (it installs moto[server]) to run the AWS Secrets Manager and S3 tests",
    )
}

/// Points the AWS SDK's default credential chain and region at moto's fake account. Done
/// once per process, before any client is built.
fn set_aws_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_REGION", REGION);
        std::env::remove_var("AWS_SESSION_TOKEN");
        std::env::remove_var("AWS_PROFILE");
    });
}

impl MotoServer {
    /// One server shared by every test in this process (with nextest, a process runs one
    /// test). Never stop it: other tests may use it.
    pub async fn shared() -> &'static MotoServer {
        static SHARED: OnceCell<MotoServer> = OnceCell::const_new();
        SHARED
            .get_or_init(|| async { MotoServer::start().await.expect("start the shared moto_server") })
            .await
    }

    /// A server of its own. Also sets `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY=testing` and
    /// `AWS_REGION=us-east-1` in this process's environment.
    pub async fn start() -> anyhow::Result<MotoServer> {
        set_aws_env();
        let program = find_moto_server()?;
        let mut last_err = None;
        for _ in 0..3 {
            let port = localpg::free_port()?;
            match Self::start_on(&program, port).await {
                Ok(server) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.context("start moto_server")?)
    }

    async fn start_on(program: &PathBuf, port: u16) -> anyhow::Result<MotoServer> {
        let log = std::env::temp_dir().join(format!("silo-moto-{}-{port}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        localpg::set_parent_death_signal(&mut cmd);
        let (pid, supervisor) = localpg::spawn_supervised(cmd).with_context(|| format!("run {}", program.display()))?;
        let mut server = MotoServer {
            port,
            pid,
            supervisor: Some(supervisor),
            log,
        };
        if let Err(e) = server.wait_ready(Duration::from_secs(30)).await {
            let log = std::fs::read_to_string(&server.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            server.stop();
            bail!(
                "moto_server did not start on port {port}: {e:#}; log: {}",
                tail.join(" | ")
            );
        }
        Ok(server)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        silo_control_plane::install_crypto_provider();
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let url = format!("{}/moto-api/", self.endpoint_url());
        let deadline = Instant::now() + timeout;
        loop {
            if self.supervisor.as_ref().is_some_and(JoinHandle::is_finished) {
                bail!("moto_server exited");
            }
            match client.get(&url).send().await {
                // Another test's server may hold the port this one failed to bind: only
                // this process's own startup line says the answer came from it.
                Ok(r) if r.status().is_success() && self.says_it_listens() => return Ok(()),
                Ok(r) if Instant::now() > deadline => {
                    bail!(
                        "GET /moto-api/ answered {}, and the log says it listens: {}",
                        r.status(),
                        self.says_it_listens()
                    )
                }
                Err(e) if Instant::now() > deadline => return Err(e).context("GET /moto-api/"),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Whether the server's log says it bound its port (werkzeug prints this after binding).
    fn says_it_listens(&self) -> bool {
        let line = format!("Running on http://127.0.0.1:{}", self.port);
        std::fs::read_to_string(&self.log).is_ok_and(|log| log.contains(&line))
    }

    /// `http://127.0.0.1:PORT`, for `aws_endpoint_url`.
    pub fn endpoint_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An S3 client of this server's (path-style addresses, the credentials `start` set).
    pub async fn s3(&self) -> aws_sdk_s3::Client {
        let sdk_config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(REGION))
            .load()
            .await;
        let config = aws_sdk_s3::config::Builder::from(&sdk_config)
            .endpoint_url(self.endpoint_url())
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// A Secrets Manager client of this server's (the credentials `start` set).
    pub async fn secrets_manager(&self) -> aws_sdk_secretsmanager::Client {
        let sdk_config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(REGION))
            .endpoint_url(self.endpoint_url())
            .load()
            .await;
        aws_sdk_secretsmanager::Client::new(&sdk_config)
    }

    /// Creates the S3 bucket `name`.
    pub async fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        self.s3()
            .await
            .create_bucket()
            .bucket(name)
            .send()
            .await
            .with_context(|| format!("create bucket {name}"))?;
        Ok(())
    }

    /// Stops the server and waits for it.
    fn stop(&mut self) {
        let Some(supervisor) = self.supervisor.take() else {
            return;
        };
        let _ = kill(self.pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !supervisor.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !supervisor.is_finished() {
            let _ = kill(self.pid, Signal::SIGKILL);
        }
        let _ = supervisor.join();
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}
