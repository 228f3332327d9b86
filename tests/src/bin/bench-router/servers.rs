//! The servers under test as processes of their own: `silo-tenant-app` (the baseline) and
//! `silo-router`, built next to this binary and stopped with SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use secrecy::ExposeSecret;
use silo_tests::stack::Stack;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Builds the two server binaries next to this one (a no-op when they are up to date).
pub(crate) async fn build_servers() -> anyhow::Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-q", "--manifest-path"]).arg(&manifest);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    build.args([
        "-p",
        "silo-router",
        "--bin",
        "silo-router",
        "-p",
        "silo-tenant-app",
        "--bin",
        "silo-tenant-app",
    ]);
    if !build.status().await.context("run cargo build")?.success() {
        bail!("building silo-router and silo-tenant-app failed");
    }
    let exe = std::env::current_exe().context("locate this binary")?;
    Ok(exe.parent().context("binary directory")?.to_owned())
}

/// A server process; SIGTERM and wait on [`Server::stop`], killed if dropped.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    /// The ops port (`/metrics`), for servers that print one.
    pub(crate) ops: Option<SocketAddr>,
}

impl Server {
    /// Starts `cmd` and waits (30 s at most) for the stdout line `{prefix}ADDR`, and then
    /// for `{ops_prefix}ADDR` when there is an ops prefix. Its stderr goes to `log`.
    pub(crate) async fn start(
        mut cmd: Command,
        prefix: &str,
        ops_prefix: Option<&str>,
        log: &Path,
    ) -> anyhow::Result<Server> {
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .kill_on_drop(true)
            .spawn()
            .context("start the server")?;
        let mut lines = BufReader::new(child.stdout.take().context("server stdout")?).lines();
        let (addr, ops) = tokio::time::timeout(Duration::from_secs(30), async {
            let mut addr = None;
            while let Some(line) = lines.next_line().await? {
                if let Some(found) = line.strip_prefix(prefix) {
                    addr = Some(found.parse::<SocketAddr>()?);
                } else if let Some(found) = ops_prefix.and_then(|ops| line.strip_prefix(ops)) {
                    return Ok((addr.context("the ops address came first")?, Some(found.parse()?)));
                }
                if let (Some(addr), None) = (addr, ops_prefix) {
                    return Ok((addr, None));
                }
            }
            bail!("the server exited; see {}", log.display())
        })
        .await
        .context("the server did not print its addresses within 30 s")??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Server { child, addr, ops })
    }

    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await?;
        }
        Ok(())
    }
}

/// Starts the `silo-router` binary on `config`.
pub(crate) async fn start_router(bin_dir: &Path, stack: &Stack, config: &Path, log: &Path) -> anyhow::Result<Server> {
    let mut router = Command::new(bin_dir.join("silo-router"));
    router
        .arg("--config")
        .arg(config)
        .env("SILO_CATALOG_PASSWORD", stack.pg().password().expose_secret());
    Server::start(
        router,
        "router listening on http://",
        Some("ops listening on http://"),
        log,
    )
    .await
}
