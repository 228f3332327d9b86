//! An in-process silo: the control plane and the router on real sockets, over a catalog
//! database of their own on the process's shared [`TestCluster`], with the local secret store.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use silo_control_plane::config::Config;
use silo_control_plane::server::ControlPlane;
use silo_router::RouterServer;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::pg::TestCluster;

/// Environment variable holding the shared cluster's superuser password for `[[servers]]`.
const PG_PASSWORD_ENV: &str = "SILO_TEST_PG_PASSWORD";

/// Which secret store a stack uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// The encrypted local store in the catalog.
    Local,
    /// AWS Secrets Manager, served by the process's shared `moto_server`.
    Aws,
}

/// Knobs of a test stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// The secret store.
    pub secrets: Secrets,
    /// `router.pool_idle_timeout`.
    pub pool_idle_timeout: Duration,
    /// `router.path_prefix_routing`.
    pub path_prefix_routing: bool,
    /// Extra TOML appended to the generated config (e.g. a `[rotation]` section).
    pub extra_toml: String,
    /// Extra `key = value` lines inside the generated `[router]` table.
    pub router_toml: String,
    /// Extra `key = value` lines inside the generated `[control_plane]` table.
    pub control_plane_toml: String,
    /// Extra `key = value` lines inside the generated `[[servers]]` table of `pg-1`.
    pub server_toml: String,
    /// `router.connect_timeout`. Generous by default: the whole suite shares 2 cores, and a
    /// starved connect must not read as a failed rotation or budget test.
    pub connect_timeout: Duration,
    /// `tenant_migrations_dir` (embedded migrations when None).
    pub tenant_migrations_dir: Option<std::path::PathBuf>,
    /// The control plane and the router reach the catalog as a role that is not a superuser
    /// and owns the catalog database (else as the cluster's superuser).
    pub catalog_not_superuser: bool,
    /// Writes a new key to `backup.key` in the stack's directory before the control plane
    /// starts, for `encryption_key_file = "backup.key"` in an `extra_toml` `[backups]`.
    pub backup_key: bool,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            secrets: Secrets::Local,
            pool_idle_timeout: Duration::from_secs(300),
            path_prefix_routing: false,
            extra_toml: String::new(),
            router_toml: String::new(),
            control_plane_toml: String::new(),
            server_toml: String::new(),
            connect_timeout: Duration::from_secs(10),
            tenant_migrations_dir: None,
            catalog_not_superuser: false,
            backup_key: false,
        }
    }
}

/// A running control plane + router.
pub struct Stack {
    pg: &'static TestCluster,
    dir: tempfile::TempDir,
    config: Config,
    cp_addr: SocketAddr,
    router_addr: SocketAddr,
    https_addr: Option<SocketAddr>,
    ops_addr: SocketAddr,
    token: String,
    catalog: PgPool,
    http: reqwest::Client,
    shutdown: CancellationToken,
    control_plane: Option<(CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>)>,
    router: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Stack {
    /// Starts a stack with `options`.
    pub async fn start(options: StackOptions) -> anyhow::Result<Stack> {
        crate::init_logging();
        let pg = TestCluster::shared().await;
        let dir = tempfile::tempdir()?;
        let catalog_db = crate::unique_name("catalog_");
        let (catalog_user, catalog_password) = if options.catalog_not_superuser {
            let owner = format!("{catalog_db}_owner");
            let password = crate::unique_name("pw_");
            pg.create_owned_database(&catalog_db, &owner, &password).await?;
            (owner, SecretString::from(password))
        } else {
            pg.create_database(&catalog_db).await?;
            ("postgres".to_owned(), pg.password().clone())
        };
        if options.backup_key {
            silo_control_plane::keyfile::create(&dir.path().join("backup.key"))?;
        }
        let secrets_toml = match options.secrets {
            Secrets::Local => {
                silo_control_plane::secrets::local::create_master_key(&dir.path().join("master.key"))?;
                "backend = \"local\"\nlocal_master_key_file = \"master.key\"".to_owned()
            }
            Secrets::Aws => {
                let moto = crate::moto::MotoServer::shared().await;
                format!(
                    "backend = \"aws\"\naws_region = \"us-east-1\"\naws_endpoint_url = \"{}\"",
                    moto.endpoint_url()
                )
            }
        };
        // Secret names are unique per stack: moto is shared by every stack of the process.
        let prefix = format!("{}/", crate::unique_name("silo"));
        std::env::set_var(PG_PASSWORD_ENV, pg.password().expose_secret());
        let migrations_dir = match &options.tenant_migrations_dir {
            Some(dir) => format!("tenant_migrations_dir = {:?}", dir.display().to_string()),
            None => String::new(),
        };
        let toml = format!(
            r#"
{migrations_dir}
catalog_url = "postgres://{catalog_user}@127.0.0.1:{port}/{catalog_db}"
[secrets]
{secrets_toml}
name_prefix = "{prefix}"
[[servers]]
name = "pg-1"
host = "127.0.0.1"
port = {port}
admin_user = "postgres"
admin_password_env = "{PG_PASSWORD_ENV}"
{server_extra}
[control_plane]
listen = "127.0.0.1:0"
job_lease = "5s"
workers = 8
{control_plane_extra}
[router]
listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
base_domains = ["localhost"]
pool_idle_timeout = "{idle}ms"
path_prefix_routing = {path}
connect_timeout = "{connect}ms"
{router_extra}
{extra}
"#,
            port = pg.port(),
            idle = options.pool_idle_timeout.as_millis(),
            path = options.path_prefix_routing,
            connect = options.connect_timeout.as_millis(),
            router_extra = options.router_toml,
            control_plane_extra = options.control_plane_toml,
            server_extra = options.server_toml,
            extra = options.extra_toml,
        );
        let path = dir.path().join("silo.toml");
        std::fs::write(&path, toml)?;
        let mut config = Config::load(&path)?;
        config.catalog.password = Some(catalog_password);
        let token = format!("admin-{}", crate::unique_name(""));
        config.control_plane.admin_token = Some(SecretString::from(token.clone()));

        let shutdown = CancellationToken::new();
        let cp = ControlPlane::bind(config.clone())
            .await
            .context("start the control plane")?;
        let cp_addr = cp.local_addr();
        let cp_shutdown = shutdown.child_token();
        let control_plane = Some((cp_shutdown.clone(), tokio::spawn(cp.run(cp_shutdown))));
        let router = RouterServer::bind(config.clone()).await.context("start the router")?;
        let (router_addr, https_addr, ops_addr) = (router.local_addr(), router.https_addr(), router.ops_addr());
        let router = Some(tokio::spawn(router.run(shutdown.clone())));
        let catalog = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(pg.admin_options(&catalog_db))
            .await?;
        Ok(Stack {
            pg,
            dir,
            config,
            cp_addr,
            router_addr,
            https_addr,
            ops_addr,
            token,
            catalog,
            http: reqwest::Client::new(),
            shutdown,
            control_plane,
            router,
        })
    }

    /// The cluster holding the catalog and the tenant databases.
    pub fn pg(&self) -> &'static TestCluster {
        self.pg
    }

    /// The stack's validated config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The secret name of tenant `slug`.
    pub fn secret_name(&self, slug: &str) -> String {
        format!("{}tenants/{slug}", self.config.secrets.name_prefix)
    }

    /// The config the next `restart_control_plane` starts from.
    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    /// The stack's directory (config, master key).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Superuser pool on the catalog database.
    pub fn catalog(&self) -> &PgPool {
        &self.catalog
    }

    /// The database of tenant `slug`, as the catalog records it.
    pub async fn database_of(&self, slug: &str) -> anyhow::Result<String> {
        Ok(sqlx::query_scalar("SELECT database FROM tenants WHERE slug = $1")
            .bind(slug)
            .fetch_one(self.catalog())
            .await?)
    }

    /// Admin API address.
    pub fn control_plane_addr(&self) -> SocketAddr {
        self.cp_addr
    }

    /// The control plane's `/metrics` (Prometheus text).
    pub async fn control_plane_metrics(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(format!("http://{}/metrics", self.cp_addr))
            .await?
            .text()
            .await?)
    }

    /// The value of `series` (a metric name with its labels, as `/metrics` writes them) in the
    /// control plane's `/metrics`.
    pub async fn control_plane_gauge(&self, series: &str) -> anyhow::Result<f64> {
        let metrics = self.control_plane_metrics().await?;
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("no {series} in {metrics}"))
    }

    /// Router tenant-traffic address.
    pub fn router_addr(&self) -> SocketAddr {
        self.router_addr
    }

    /// Router HTTPS address (`router.https_listen`, or `listen` when TLS is on it).
    pub fn router_https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// Router ops address.
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// The admin token.
    pub fn admin_token(&self) -> &str {
        &self.token
    }

    /// Calls the admin API with the admin token; returns the status and the JSON body
    /// (`Value::Null` for an empty or non-JSON body).
    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<(StatusCode, Value)> {
        let mut req = self
            .http
            .request(method, format!("http://{}{path}", self.cp_addr))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// Polls job `id` until it finishes (30 s at most) and returns it.
    pub async fn wait_job(&self, id: i64) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, job) = self.admin(Method::GET, &format!("/v1/jobs/{id}"), None).await?;
            if status != StatusCode::OK {
                bail!("GET job {id}: {status} {job}");
            }
            if matches!(job["state"].as_str(), Some("succeeded" | "failed")) {
                return Ok(job);
            }
            if Instant::now() > deadline {
                bail!("job {id} did not finish: {job}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Retries failed job `id` through the admin API (expects 202) and waits for it.
    pub async fn retry_job(&self, id: i64) -> anyhow::Result<Value> {
        let (status, body) = self.admin(Method::POST, &format!("/v1/jobs/{id}/retry"), None).await?;
        if status != StatusCode::ACCEPTED {
            bail!("retry job {id}: {status} {body}");
        }
        self.wait_job(id).await
    }

    /// Rotates tenant `slug`'s credentials with `strategy` through the admin API (expects
    /// 202) and returns the finished job.
    pub async fn rotate(&self, slug: &str, strategy: &str) -> anyhow::Result<Value> {
        let body = serde_json::json!({ "strategy": strategy });
        let (status, accepted) = self
            .admin(Method::POST, &format!("/v1/tenants/{slug}/rotate"), Some(body))
            .await?;
        if status != StatusCode::ACCEPTED {
            bail!("rotate {slug}: {status} {accepted}");
        }
        let id = accepted["job"]["id"]
            .as_i64()
            .with_context(|| format!("no job id in {accepted}"))?;
        self.wait_job(id).await
    }

    /// Creates tenant `slug` through the admin API, waits for its job to succeed and returns
    /// its first API key.
    pub async fn create_tenant(&self, slug: &str) -> anyhow::Result<String> {
        self.create_tenant_with(serde_json::json!({ "slug": slug })).await
    }

    /// Like [`Stack::create_tenant`] with a full request body.
    pub async fn create_tenant_with(&self, body: Value) -> anyhow::Result<String> {
        let (status, created) = self.admin(Method::POST, "/v1/tenants", Some(body)).await?;
        if status != StatusCode::ACCEPTED {
            bail!("create tenant: {status} {created}");
        }
        let id = created["job"]["id"].as_i64().context("job id")?;
        let job = self.wait_job(id).await?;
        if job["state"] != "succeeded" {
            bail!("provisioning failed: {job}");
        }
        Ok(created["api_key"].as_str().context("api_key")?.to_owned())
    }

    /// Deletes tenant `slug` (no backup) through the admin API and waits for its job to
    /// succeed.
    pub async fn delete_tenant(&self, slug: &str) -> anyhow::Result<()> {
        let (status, accepted) = self.admin(Method::DELETE, &format!("/v1/tenants/{slug}"), None).await?;
        if status != StatusCode::ACCEPTED {
            bail!("delete {slug}: {status} {accepted}");
        }
        let id = accepted["job"]["id"].as_i64().context("job id")?;
        let job = self.wait_job(id).await?;
        if job["state"] != "succeeded" {
            bail!("deleting {slug} failed: {job}");
        }
        Ok(())
    }

    /// Creates tasks with these titles for tenant `slug` through the router, with API key `key`.
    pub async fn add_tasks(&self, slug: &str, key: &str, titles: &[&str]) -> anyhow::Result<()> {
        for title in titles {
            let created = self
                .tenant_request(Method::POST, &format!("{slug}.localhost"), "/api/v1/tasks")
                .bearer_auth(key)
                .json(&serde_json::json!({ "title": title }))
                .send()
                .await?;
            if created.status() != StatusCode::CREATED {
                bail!("create task {title:?}: {}", created.status());
            }
        }
        Ok(())
    }

    /// Tenant `slug`'s current secret JSON, read through the break-glass endpoint.
    pub async fn credentials(&self, slug: &str) -> anyhow::Result<Value> {
        let (status, secret) = self
            .admin(Method::GET, &format!("/v1/tenants/{slug}/credentials"), None)
            .await?;
        if status != StatusCode::OK {
            bail!("credentials of {slug}: {status} {secret}");
        }
        Ok(secret)
    }

    /// Runs the built `siloctl ARGS` against this stack's control plane (in a fresh home
    /// directory, endpoint and token from the environment): exit code, stdout, stderr.
    pub async fn siloctl(&self, args: &[&str]) -> anyhow::Result<(Option<i32>, String, String)> {
        let home = tempfile::tempdir()?;
        let out = self
            .siloctl_command(home.path())
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .await?;
        Ok((
            out.status.code(),
            String::from_utf8(out.stdout)?,
            String::from_utf8(out.stderr)?,
        ))
    }

    /// The built `siloctl`, to be given arguments, set up to reach this stack's control plane
    /// from the home directory `home` (endpoint and token from the environment); killed when
    /// dropped.
    pub fn siloctl_command(&self, home: &std::path::Path) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(crate::workspace_binary("siloctl"));
        command
            .current_dir(home)
            .env("HOME", home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("SILO_ENDPOINT", format!("http://{}", self.cp_addr))
            .env("SILO_TOKEN", &self.token)
            .kill_on_drop(true);
        command
    }

    /// A request to the router for `host` (sent to the router's socket with that Host).
    pub fn tenant_request(&self, method: Method, host: &str, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("http://{}{path}", self.router_addr))
            .header(reqwest::header::HOST, host)
    }

    /// `GET path` through the router for tenant `slug` (by its subdomain) with API key `key`.
    pub async fn tenant_get(&self, slug: &str, key: &str, path: &str) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .tenant_request(Method::GET, &format!("{slug}.localhost"), path)
            .bearer_auth(key)
            .send()
            .await?)
    }

    /// Tenant `slug`'s JSON from the admin API (expects 200).
    pub async fn tenant(&self, slug: &str) -> anyhow::Result<Value> {
        let (status, body) = self.admin(Method::GET, &format!("/v1/tenants/{slug}"), None).await?;
        if status != StatusCode::OK {
            bail!("GET tenant {slug}: {status} {body}");
        }
        Ok(body)
    }

    /// The titles of the tasks the router serves tenant `slug` to `key` (up to 100, in id
    /// order; expects 200).
    pub async fn served_titles(&self, slug: &str, key: &str) -> anyhow::Result<Vec<String>> {
        let resp = self.tenant_get(slug, key, "/api/v1/tasks?limit=100").await?;
        if resp.status() != StatusCode::OK {
            bail!("GET tasks of {slug}: {}", resp.status());
        }
        let body: Value = resp.json().await?;
        let items = body["items"].as_array().context("no items")?;
        items
            .iter()
            .map(|task| {
                task["title"]
                    .as_str()
                    .map(str::to_owned)
                    .context("a task without a title")
            })
            .collect()
    }

    /// Fetches the router's `/metrics` text.
    pub async fn router_metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("http://{}/metrics", self.ops_addr))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Stops the control plane abruptly (its running jobs keep their leases, as after a
    /// crash) and starts a new one on the same catalog and address.
    pub async fn restart_control_plane(&mut self) -> anyhow::Result<()> {
        self.stop_control_plane().await?;
        self.start_control_plane().await
    }

    /// Stops the control plane abruptly (the router goes on); [`Stack::start_control_plane`]
    /// starts it again.
    pub async fn stop_control_plane(&mut self) -> anyhow::Result<()> {
        if let Some((token, task)) = self.control_plane.take() {
            token.cancel();
            task.await??;
        }
        Ok(())
    }

    /// Starts a control plane on the stack's catalog and address (after
    /// [`Stack::stop_control_plane`]).
    pub async fn start_control_plane(&mut self) -> anyhow::Result<()> {
        let mut config = self.config.clone();
        config.control_plane.listen = self.cp_addr;
        let cp = ControlPlane::bind(config).await.context("restart the control plane")?;
        let token = self.shutdown.child_token();
        self.control_plane = Some((token.clone(), tokio::spawn(cp.run(token))));
        Ok(())
    }

    /// Stops the control plane and the router and waits for them.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some((_, task)) = self.control_plane.take() {
            task.await??;
        }
        if let Some(task) = self.router.take() {
            task.await??;
        }
        Ok(())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
