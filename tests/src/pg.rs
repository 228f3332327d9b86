//! Throw-away PostgreSQL clusters with SCRAM password auth on a free 127.0.0.1 port, in a
//! temp dir under `$TMPDIR/silo-test-{pid}-{n}`.
//!
//! A cluster stops when its [`TestCluster`] drops, or when the test process ends in any way
//! (the server gets a parent-death signal). Directories of processes that no longer exist
//! are swept when the next cluster starts.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use silo_control_plane::localpg::{self, ClusterOptions, LocalCluster};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::sync::OnceCell;

const DIR_PREFIX: &str = "silo-test-";

/// `max_connections` of the shared cluster (see [`TestCluster::set_shared_max_connections`]).
static SHARED_MAX_CONNECTIONS: AtomicU32 = AtomicU32::new(400);

/// A running throw-away cluster; superuser `postgres` with a random password.
pub struct TestCluster {
    cluster: std::sync::Mutex<Option<LocalCluster>>,
    dir: PathBuf,
    port: u16,
    password: SecretString,
    max_connections: u32,
}

impl TestCluster {
    /// Sets `max_connections` of the shared cluster (default 400, enough for any test);
    /// benchmarks that open a connection per tenant for many tenants raise it. Takes effect
    /// only before the first [`TestCluster::shared`].
    pub fn set_shared_max_connections(max_connections: u32) {
        SHARED_MAX_CONNECTIONS.store(max_connections, Ordering::Relaxed);
    }

    /// One cluster shared by every test in this process (with nextest, a process runs one
    /// test). Never stop it: other tests may use it.
    pub async fn shared() -> &'static TestCluster {
        static SHARED: OnceCell<TestCluster> = OnceCell::const_new();
        SHARED
            .get_or_init(|| async {
                TestCluster::start_with(SHARED_MAX_CONNECTIONS.load(Ordering::Relaxed))
                    .await
                    .expect("start the shared test cluster")
            })
            .await
    }

    /// A cluster of its own, for tests that stop or restart it.
    pub async fn start() -> anyhow::Result<TestCluster> {
        TestCluster::start_with(400).await
    }

    /// A cluster of its own that refuses every connection not over TLS (`hostssl` only in
    /// `pg_hba.conf`), serving the certificate `cert_pem` with key `key_pem`.
    pub async fn start_tls_only(cert_pem: &str, key_pem: &str) -> anyhow::Result<TestCluster> {
        TestCluster::start_configured(400, |data_dir| require_tls(data_dir, cert_pem, key_pem)).await
    }

    async fn start_with(max_connections: u32) -> anyhow::Result<TestCluster> {
        TestCluster::start_configured(max_connections, |_| Ok(())).await
    }

    /// Inits a cluster, lets `configure` change its data directory, then starts it.
    async fn start_configured(
        max_connections: u32,
        configure: impl FnOnce(&std::path::Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<TestCluster> {
        static N: AtomicU32 = AtomicU32::new(0);
        sweep_stale_dirs();
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let data_dir = dir.join("data");
        let password = SecretString::from(format!("pw-{}", crate::unique_name("")));
        tokio::task::block_in_place(|| LocalCluster::init(&data_dir, &password))?;
        configure(&data_dir)?;
        let options = ClusterOptions {
            fsync: false,
            max_connections,
        };
        let mut last_err = None;
        for _ in 0..3 {
            let port = localpg::free_port()?;
            match LocalCluster::start(&data_dir, port, password.clone(), &options).await {
                Ok(cluster) => {
                    return Ok(TestCluster {
                        cluster: std::sync::Mutex::new(Some(cluster)),
                        dir,
                        port,
                        password,
                        max_connections,
                    })
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.context("start cluster")?)
    }

    /// A `[[servers]]` entry named `name` for this cluster (127.0.0.1, its port, superuser
    /// `postgres`), whose admin password is in env `SILO_TEST_{NAME}_PASSWORD`, which this
    /// sets. More keys of that server (`max_tenants`, `region`) may follow it.
    pub fn server_toml(&self, name: &str) -> String {
        let env = format!("SILO_TEST_{}_PASSWORD", name.to_ascii_uppercase().replace('-', "_"));
        std::env::set_var(&env, self.password.expose_secret());
        format!(
            "[[servers]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {}\nadmin_user = \"postgres\"\n\
             admin_password_env = \"{env}\"\n",
            self.port
        )
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's password.
    pub fn password(&self) -> &SecretString {
        &self.password
    }

    /// What the server has written to its log so far.
    pub fn server_log(&self) -> anyhow::Result<String> {
        let path = self.dir.join("data").join("server.log");
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    }

    /// Superuser connect options to `db`.
    pub fn admin_options(&self, db: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username(localpg::SUPERUSER)
            .password(self.password.expose_secret())
            .database(db)
    }

    /// Creates an empty database `name` (a validated identifier: letters, digits, `_`).
    pub async fn create_database(&self, name: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "test database names are [a-z0-9_]"
        );
        let mut conn = self.admin_options("postgres").connect().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .with_context(|| format!("create database {name}"))?;
        conn.close().await?;
        Ok(())
    }

    /// Creates login role `owner` (not a superuser, no other attribute) with `password`, and
    /// an empty database `name` that it owns: what a managed PostgreSQL service gives an
    /// application. Both names are validated identifiers: letters, digits, `_`.
    pub async fn create_owned_database(&self, name: &str, owner: &str, password: &str) -> anyhow::Result<()> {
        for ident in [name, owner, password] {
            anyhow::ensure!(
                ident
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "test names are [a-z0-9_]"
            );
        }
        let mut conn = self.admin_options("postgres").connect().await?;
        for statement in [
            format!("CREATE ROLE \"{owner}\" LOGIN PASSWORD '{password}'"),
            format!("CREATE DATABASE \"{name}\" OWNER \"{owner}\""),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&mut conn)
                .await
                .with_context(|| format!("create database {name} owned by {owner}"))?;
        }
        conn.close().await?;
        Ok(())
    }

    /// Stops the server (tests of an unavailable database). [`TestCluster::restart`] brings
    /// it back on the same port.
    pub fn stop(&self) {
        if let Some(mut c) = self.lock().take() {
            c.stop();
        }
    }

    /// Starts a stopped cluster again on the same port.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop();
        let options = ClusterOptions {
            fsync: false,
            max_connections: self.max_connections,
        };
        let cluster = LocalCluster::start(&self.dir.join("data"), self.port, self.password.clone(), &options).await?;
        *self.lock() = Some(cluster);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<LocalCluster>> {
        self.cluster.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes cluster dirs left by test processes that no longer exist (a shared cluster is
/// stopped by the parent-death signal at exit, but its files stay).
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Turns TLS on in the cluster at `data_dir` with this certificate and key, and lets only TLS
/// connections in (SCRAM still required). Files are given to the data directory's owner.
fn require_tls(data_dir: &std::path::Path, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    let owner = std::fs::metadata(data_dir)?;
    let give = |name: &str, contents: &str| -> anyhow::Result<()> {
        let path = data_dir.join(name);
        std::fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        nix::unistd::chown(
            &path,
            Some(nix::unistd::Uid::from_raw(owner.uid())),
            Some(nix::unistd::Gid::from_raw(owner.gid())),
        )?;
        Ok(())
    };
    give("server.crt", cert_pem)?;
    give("server.key", key_pem)?;
    give(
        "pg_hba.conf",
        "hostssl all all 127.0.0.1/32 scram-sha-256\nhostnossl all all 127.0.0.1/32 reject\n",
    )?;
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data_dir.join("postgresql.conf"))?;
    writeln!(
        conf,
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'"
    )?;
    Ok(())
}
