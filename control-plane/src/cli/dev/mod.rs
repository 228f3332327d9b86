//! `siloctl dev`: a complete local stack in the foreground. PostgreSQL clusters in the data
//! dir, the catalog, the control plane and the router as child processes, the siloctl
//! context for later calls; Ctrl-C (or SIGTERM) stops everything it started.
//!
//! Order: prepare files, ports and the dev CA (no threads yet: it exports env vars) → start
//! clusters → catalog database → control plane → router → wait until both answer → write the
//! context → demo tenant → print `ready` → wait for a signal or a child's death → stop in
//! reverse.

mod children;
mod files;
mod tls;

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use secrecy::ExposeSecret;
use sqlx::ConnectOptions;
use tokio::signal::unix::{signal, SignalKind};

use super::args::DevArgs;
use super::client::ApiClient;
use super::context::{self, ApiContext};
use crate::localpg::{ClusterOptions, LocalCluster};
use crate::names::TenantSlug;
use children::{sibling_binary, Child};
use files::{server_name, Prepared, DATA_DIR_HINT};
use tls::DevTls;

/// How long the control plane and router get to answer after they start.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the children get to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(8);
/// How often new tenants are looked for, to issue their `{slug}.localhost` certificates.
const TENANT_CERTS_INTERVAL: Duration = Duration::from_secs(2);
/// How long `ready` waits for the router to serve the tenant certificates issued at start.
const CERTIFICATE_WAIT: Duration = Duration::from_secs(10);

/// Runs `siloctl dev` until a signal, then stops everything.
pub(crate) fn run(args: DevArgs) -> anyhow::Result<()> {
    let prepared = files::prepare(&args)?;
    let rt = super::runtime()?;
    let mut stack = Stack::default();
    let result = rt.block_on(run_stack(&args, &prepared, &mut stack));
    stack.stop();
    if result.is_ok() {
        say!("stopped");
    }
    result
}

/// What `siloctl dev` started, stopped in reverse order.
#[derive(Default)]
struct Stack {
    clusters: Vec<LocalCluster>,
    children: Vec<Child>,
}

impl Stack {
    fn stop(&mut self) {
        // Router and control plane first (they hold connections), then PostgreSQL.
        for child in self.children.iter_mut().rev() {
            child.terminate();
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for child in self.children.iter_mut().rev() {
            child.wait_or_kill(deadline);
        }
        self.children.clear();
        while let Some(cluster) = self.clusters.pop() {
            drop(cluster);
        }
    }

    /// The first child that has exited, with its exit status.
    fn exited_child(&mut self) -> Option<(&Child, String)> {
        let i = self.children.iter_mut().position(|c| c.exited().is_some())?;
        let child = self.children.get_mut(i)?;
        let status = child.exited().unwrap_or_default().to_owned();
        Some((&*child, status))
    }

    /// Fails if a child has exited, with the last line it logged (its error, as every silo
    /// binary ends with one) and where its whole log is: one line.
    fn check_children(&mut self) -> anyhow::Result<()> {
        if let Some((child, status)) = self.exited_child() {
            let last = child.last_log_line().unwrap_or_else(|| "nothing logged".to_owned());
            bail!(
                "the {} exited ({status}): {last} (its log: {})",
                child.what,
                child.log.display()
            );
        }
        Ok(())
    }
}

async fn run_stack(args: &DevArgs, p: &Prepared, stack: &mut Stack) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    let client = tokio::select! {
        result = start(args, p, stack) => result?,
        _ = sigterm.recv() => bail!("interrupted before the stack was ready"),
        _ = sigint.recv() => bail!("interrupted before the stack was ready"),
    };
    say!("ready");
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut certs_tick = tokio::time::interval(TENANT_CERTS_INTERVAL);
    let mut certs_error = None;
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = tick.tick() => stack.check_children()?,
            _ = certs_tick.tick() => {
                // Reported once per distinct cause: the control plane may be restarting.
                let error = issue_tenant_certificates(&client, &p.tls).await.err().map(|e| format!("{e:#}"));
                if let Some(e) = error.as_ref().filter(|e| certs_error.as_ref() != Some(*e)) {
                    eprintln!("warning: tenant certificates: {e}");
                }
                certs_error = error;
            }
        }
    }
    say!("stopping");
    Ok(())
}

/// Starts every component and prints where they are; `ready` follows. Returns an admin API
/// client for the stack.
async fn start(args: &DevArgs, p: &Prepared, stack: &mut Stack) -> anyhow::Result<ApiClient> {
    let control_plane = sibling_binary("silo-control-plane")?;
    let router = sibling_binary("silo-router")?;

    for (i, port) in p.pg_ports.iter().enumerate() {
        let name = server_name(i + 1);
        let dir = p.data_dir.join(&name);
        LocalCluster::init(&dir, &p.pg_password).map_err(|e| {
            let e = format!("{e:#}");
            if e.contains("Permission denied") || e.contains("permission denied") {
                anyhow!("initialise PostgreSQL server {name}: {e}; {DATA_DIR_HINT}")
            } else {
                anyhow!("initialise PostgreSQL server {name}: {e}")
            }
        })?;
        let cluster = LocalCluster::start(&dir, *port, p.pg_password.clone(), &ClusterOptions::default())
            .await
            .with_context(|| format!("start PostgreSQL server {name}"))?;
        stack.clusters.push(cluster);
    }
    if let Some(pg1) = stack.clusters.first() {
        create_catalog_database(pg1).await?;
    }

    let logs = p.data_dir.join("logs");
    stack.children.push(Child::spawn(
        "control plane",
        &control_plane,
        &p.config_path,
        logs.join("control-plane.log"),
    )?);
    stack.children.push(Child::spawn(
        "router",
        &router,
        &p.config_path,
        logs.join("router.log"),
    )?);
    wait_healthy(p, stack).await?;

    let endpoint = format!("http://127.0.0.1:{}", p.api_port);
    let env_file = p.data_dir.join("env");
    context::write_env_file(&env_file, &endpoint, &p.admin_token)?;
    let user_context = context::user_context_file();
    if let Some(path) = &user_context {
        context::write_env_file(path, &endpoint, &p.admin_token)?;
    }

    let client = ApiClient::new(ApiContext {
        endpoint: endpoint.clone(),
        token: p.admin_token.clone(),
        cacerts: Vec::new(),
    })?;
    if args.demo {
        demo(&client, p).await?;
    }
    let issued = issue_tenant_certificates(&client, &p.tls).await?;
    wait_for_certificates(p, &issued).await?;

    say!("silo dev stack (data dir {})", p.data_dir.display());
    say!("  tenants      http://{{slug}}.localhost:{}/", p.http_port);
    say!("  router       http://127.0.0.1:{}", p.http_port);
    say!(
        "  https        https://{{slug}}.localhost:{}/ (certificate from the dev CA {})",
        p.https_port,
        p.tls.ca_cert.display()
    );
    say!("  admin API    {endpoint}");
    say!("  metrics      http://127.0.0.1:{}/metrics", p.metrics_port);
    for (i, port) in p.pg_ports.iter().enumerate() {
        say!(
            "  {:<12} 127.0.0.1:{port} (user postgres, password in {})",
            server_name(i + 1),
            p.data_dir.join("pg-password").display()
        );
    }
    say!("  logs         {}", logs.display());
    match &user_context {
        Some(path) => say!("  env file     {} (also {})", env_file.display(), path.display()),
        None => say!("  env file     {}", env_file.display()),
    }
    say!("  admin token  {}", p.admin_token.expose_secret());
    say!("trust the dev CA for HTTPS:");
    say!(
        "  curl         curl --cacert {} https://SLUG.localhost:{}/api/v1/tasks",
        p.tls.ca_cert.display(),
        p.https_port
    );
    say!("  system       {}", system_trust_command(&p.tls.ca_cert));
    Ok(client)
}

/// Issues the `{slug}.localhost` certificate of every tenant that has none yet (a
/// `*.localhost` wildcard is refused by TLS clients, see [`tls`]) and removes those of
/// deleted tenants, whose handshake must fail as an unknown tenant's does; the router follows
/// its SNI dir. Returns the hosts issued now.
async fn issue_tenant_certificates(client: &ApiClient, tls: &DevTls) -> anyhow::Result<Vec<String>> {
    let list = client
        .get("/v1/tenants")
        .await
        .map_err(|e| anyhow!("list tenants: {e}"))?;
    // Checked: a slug names a file.
    let live: Vec<TenantSlug> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["status"] != "deleted")
        .filter_map(|t| TenantSlug::parse(t["slug"].as_str()?).ok())
        .collect();
    let mut issued = Vec::new();
    for slug in &live {
        if tls.ensure_tenant(slug.as_str())? {
            issued.push(format!("{slug}.localhost"));
        }
    }
    tls.retain_tenants(&live)?;
    Ok(issued)
}

/// Waits until the router serves each of `hosts` over HTTPS with its own certificate (it
/// picks new ones up from the SNI directory once a second), so that `ready` means
/// `curl --cacert` works at once.
async fn wait_for_certificates(p: &Prepared, hosts: &[String]) -> anyhow::Result<()> {
    let ca = std::fs::read(&p.tls.ca_cert).with_context(|| format!("read {}", p.tls.ca_cert.display()))?;
    let ca = reqwest::Certificate::from_pem(&ca).context("the dev CA certificate")?;
    for host in hosts {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca.clone())
            .resolve(host, ([127, 0, 0, 1], p.https_port).into())
            .timeout(Duration::from_secs(2))
            .build()
            .context("an HTTPS client for the dev CA")?;
        let url = format!("https://{host}:{}/", p.https_port);
        let deadline = Instant::now() + CERTIFICATE_WAIT;
        // Any HTTP answer means the handshake verified the tenant's certificate.
        while client.get(&url).send().await.is_err() {
            if Instant::now() >= deadline {
                bail!(
                    "the router did not serve the certificate for {host} within {}s (see {})",
                    CERTIFICATE_WAIT.as_secs(),
                    p.data_dir.join("logs/router.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// A one-liner that adds the dev CA to the system trust store.
fn system_trust_command(ca: &std::path::Path) -> String {
    let ca = ca.display();
    if cfg!(target_os = "macos") {
        format!("sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {ca}")
    } else {
        format!("sudo cp {ca} /usr/local/share/ca-certificates/silo-dev-ca.crt && sudo update-ca-certificates")
    }
}

async fn create_catalog_database(pg1: &LocalCluster) -> anyhow::Result<()> {
    let mut conn = pg1
        .connect_options("postgres")
        .connect()
        .await
        .context("connect to pg-1")?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'silo_catalog')")
        .fetch_one(&mut conn)
        .await
        .context("look for the catalog database")?;
    if !exists {
        sqlx::query("CREATE DATABASE silo_catalog")
            .execute(&mut conn)
            .await
            .context("create the catalog database")?;
    }
    Ok(())
}

/// Waits until the admin API's `/healthz` and the router's `/readyz` answer 200.
async fn wait_healthy(p: &Prepared, stack: &mut Stack) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| anyhow!("build the HTTP client: {e}"))?;
    let urls = [
        ("control plane", format!("http://127.0.0.1:{}/healthz", p.api_port)),
        ("router", format!("http://127.0.0.1:{}/readyz", p.metrics_port)),
    ];
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut pending: Vec<_> = urls.iter().collect();
    while !pending.is_empty() {
        stack.check_children()?;
        let mut still = Vec::new();
        for entry in pending {
            let ok = http.get(&entry.1).send().await.is_ok_and(|r| r.status().is_success());
            if !ok {
                still.push(entry);
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let (what, url) = pending[0];
            bail!(
                "the {what} did not answer {url} within {}s; see {}",
                STARTUP_TIMEOUT.as_secs(),
                p.data_dir.join("logs").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Creates tenant `demo` unless it exists, and prints how to call it.
async fn demo(client: &ApiClient, p: &Prepared) -> anyhow::Result<()> {
    let slug = TenantSlug::parse("demo").map_err(|e| anyhow!("{e}"))?;
    match client.get("/v1/tenants/demo").await {
        Ok(_) => {
            say!("tenant demo exists already; its API key was shown when it was created.");
            say!("a new key: siloctl tenant key create demo --name laptop");
            return Ok(());
        }
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(anyhow!("look up tenant demo: {e}")),
    }
    let created = client
        .post("/v1/tenants", &serde_json::json!({"slug": "demo", "name": "Demo"}))
        .await
        .map_err(|e| anyhow!("create tenant demo: {e}"))?;
    super::commands::create_and_wait(client, &slug, &created)
        .await
        .context("create tenant demo")?;
    let key = created.get("api_key").and_then(|k| k.as_str()).unwrap_or_default();
    say!("tenant demo created; its API key (shown once): {key}");
    say!(
        "  curl -H 'Authorization: Bearer {key}' http://demo.localhost:{}/api/v1/tasks",
        p.http_port
    );
    say!(
        "  curl --cacert {} -H 'Authorization: Bearer {key}' https://demo.localhost:{}/api/v1/tasks",
        p.tls.ca_cert.display(),
        p.https_port
    );
    Ok(())
}
