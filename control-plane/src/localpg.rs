//! Local PostgreSQL clusters for `siloctl dev` and the test harness: `initdb` with SCRAM
//! password auth, a `postgres` process on 127.0.0.1, stopped with the process that started it.
//!
//! PostgreSQL refuses to run as root, so when we are root the cluster runs as the `postgres`
//! user (or `nobody`). The server is a direct child with a parent-death signal, spawned from a
//! thread that lives exactly as long as the server: if our process dies, even by SIGKILL, the
//! server gets SIGINT (fast shutdown) and no `postgres` process is left behind.

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{chown, Gid, Pid, Uid, User};
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions;

/// The superuser every local cluster is initialised with.
pub const SUPERUSER: &str = "postgres";

/// Finds the PostgreSQL server binaries: `$SILO_PG_BINDIR`, then `pg_config --bindir` (if it
/// has `initdb`), then the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("SILO_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
        bail!("SILO_PG_BINDIR={} has no initdb", dir.display());
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, bin)| bin).context(
        "PostgreSQL server binaries not found (no initdb): install them with \
         `apt-get install postgresql` or set SILO_PG_BINDIR",
    )
}

/// The user a cluster runs as: ourselves, or `postgres`/`nobody` when we are root.
fn run_as() -> anyhow::Result<Option<(Uid, Gid)>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Ok(Some(user)) = User::from_name(name) {
            return Ok(Some((user.uid, user.gid)));
        }
    }
    bail!("running as root, but there is no `postgres` or `nobody` user to run PostgreSQL as")
}

/// A free TCP port on 127.0.0.1 (free now; a caller retries if it is taken by the time it binds).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Settings of a local cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `fsync` on or off (off for throw-away test clusters).
    pub fsync: bool,
    /// `max_connections`.
    pub max_connections: u32,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            fsync: true,
            max_connections: 300,
        }
    }
}

/// A running local cluster. Dropping it stops the server (fast shutdown).
pub struct LocalCluster {
    data_dir: PathBuf,
    port: u16,
    password: SecretString,
    pid: Pid,
    supervisor: Option<JoinHandle<std::io::Result<ExitStatus>>>,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("data_dir", &self.data_dir)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl LocalCluster {
    /// Creates the cluster in `data_dir` unless it already holds one, with superuser
    /// `postgres` and `password`, SCRAM auth for every connection.
    pub fn init(data_dir: &Path, password: &SecretString) -> anyhow::Result<()> {
        if data_dir.join("PG_VERSION").exists() {
            return Ok(());
        }
        let bindir = find_bindir()?;
        let owner = run_as()?;
        fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
        fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700))?;
        // initdb reads the password from a file; keep it inside the (0700) data dir's parent
        // only for the duration of the call.
        let pwfile = data_dir.with_extension("pwfile");
        write_private(&pwfile, password.expose_secret().as_bytes())?;
        if let Some((uid, gid)) = owner {
            chown(data_dir, Some(uid), Some(gid)).context("chown the data dir to the postgres user")?;
            chown(&pwfile, Some(uid), Some(gid))?;
        }
        let mut cmd = Command::new(bindir.join("initdb"));
        cmd.arg("-D")
            .arg(data_dir)
            .args([
                "-U",
                SUPERUSER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null());
        if let Some((uid, gid)) = owner {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        let out = cmd.output().context("run initdb");
        let _ = fs::remove_file(&pwfile);
        let out = out?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let hint = if stderr.contains("Permission denied") {
                " (every parent directory of the data dir must be readable by the postgres user)"
            } else {
                ""
            };
            bail!("initdb failed{hint}: {}", stderr.trim());
        }
        Ok(())
    }

    /// Starts the cluster in `data_dir` on 127.0.0.1:`port` and waits until it accepts a
    /// password login as `postgres`. `wal_level = logical`, for online moves.
    pub async fn start(
        data_dir: &Path,
        port: u16,
        password: SecretString,
        options: &ClusterOptions,
    ) -> anyhow::Result<Self> {
        let bindir = find_bindir()?;
        let owner = run_as()?;
        let log_path = data_dir.join("server.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let mut cmd = Command::new(bindir.join("postgres"));
        cmd.arg("-D")
            .arg(data_dir)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
            ])
            .args(["-c", &format!("max_connections={}", options.max_connections)])
            .args(["-c", &format!("fsync={}", if options.fsync { "on" } else { "off" })])
            // Any of them may be the old server of an online move.
            .args(["-c", "wal_level=logical"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some((uid, gid)) = owner {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        set_parent_death_signal(&mut cmd);
        let (pid, supervisor) = spawn_supervised(cmd).context("start postgres")?;
        let mut cluster = Self {
            data_dir: data_dir.to_owned(),
            port,
            password,
            pid,
            supervisor: Some(supervisor),
        };
        if let Err(e) = cluster.wait_ready(Duration::from_secs(30)).await {
            cluster.stop();
            let tail = log_tail(&log_path);
            bail!("postgres did not start on port {port}: {e:#}; server log: {tail}");
        }
        Ok(cluster)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.supervisor.as_ref().is_some_and(JoinHandle::is_finished) {
                bail!("postgres exited");
            }
            match self.connect_options("postgres").connect().await {
                Ok(conn) => {
                    drop(conn);
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => return Err(e).context("connect"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The superuser's password.
    pub fn password(&self) -> &SecretString {
        &self.password
    }

    /// Connect options for the superuser to `database`.
    pub fn connect_options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username(SUPERUSER)
            .password(self.password.expose_secret())
            .database(database)
    }

    /// Stops the server (fast shutdown: open sessions are disconnected) and waits for it.
    pub fn stop(&mut self) {
        let Some(supervisor) = self.supervisor.take() else {
            return;
        };
        let _ = kill(self.pid, Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !supervisor.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !supervisor.is_finished() {
            let _ = kill(self.pid, Signal::SIGQUIT);
        }
        let _ = supervisor.join();
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes `contents` to `path` with mode 0600.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    f.write_all(contents)?;
    Ok(())
}

/// Spawns `cmd` from a dedicated thread that waits for it. The parent-death signal is tied
/// to the spawning thread, so that thread must live exactly as long as the child.
pub fn spawn_supervised(mut cmd: Command) -> anyhow::Result<(Pid, JoinHandle<std::io::Result<ExitStatus>>)> {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("child-supervisor".into())
        .spawn(move || match cmd.spawn() {
            Ok(mut child) => {
                let _ = tx.send(Ok(child.id()));
                child.wait()
            }
            Err(e) => {
                let kind = e.kind();
                let _ = tx.send(Err(e));
                Err(std::io::Error::from(kind))
            }
        })?;
    let pid = rx.recv().context("supervisor thread ended")??;
    Ok((Pid::from_raw(pid as i32), handle))
}

/// Makes the child receive SIGINT when the thread that spawned it exits.
#[allow(unsafe_code)]
pub fn set_parent_death_signal(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent. It runs after
    // std has switched uid/gid (which would clear the setting), just before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn log_tail(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}
