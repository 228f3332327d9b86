//! What `siloctl dev` keeps in its data dir, prepared before anything starts: the generated
//! secrets (kept across runs), the dev CA and the router's certificate (`tls/`), the
//! PostgreSQL ports (`ports.toml`, stable across runs) and the `silo.toml` the control plane
//! and router run from.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::tls::DevTls;
use crate::cli::args::{DevArgs, SecretsKind};
use crate::config::Config;
use crate::localpg::{free_port, write_private};

/// Environment variable the dev config names for every dev cluster's superuser password.
pub(super) const PG_PASSWORD_ENV: &str = "SILO_DEV_PG_PASSWORD";
/// Where a permission problem can be avoided.
pub(super) const DATA_DIR_HINT: &str = "use a data dir the postgres user can reach, e.g. --data-dir /var/tmp/silo-dev";

/// Everything `siloctl dev` decided before starting processes.
pub(super) struct Prepared {
    /// The data dir, absolute.
    pub(super) data_dir: PathBuf,
    /// `{data-dir}/silo.toml`.
    pub(super) config_path: PathBuf,
    /// Superuser password of every dev cluster (also the catalog password).
    pub(super) pg_password: SecretString,
    /// The admin API token.
    pub(super) admin_token: SecretString,
    /// Port of pg-1..pg-N.
    pub(super) pg_ports: Vec<u16>,
    /// Admin API port.
    pub(super) api_port: u16,
    /// Router HTTP port.
    pub(super) http_port: u16,
    /// Router HTTPS port.
    pub(super) https_port: u16,
    /// The dev CA and the router's `*.localhost` certificate.
    pub(super) tls: DevTls,
    /// Router operations port.
    pub(super) metrics_port: u16,
    /// `tenant_migrations_dir`, absolute, if given.
    pub(super) tenant_migrations_dir: Option<PathBuf>,
    /// Held while the stack runs: one `siloctl dev` per data dir.
    _lock: Flock<File>,
}

/// `ports.toml`: the dev clusters' ports, so they stay the same across runs.
#[derive(Default, Serialize, Deserialize)]
struct PortsFile {
    #[serde(default)]
    servers: BTreeMap<String, u16>,
}

/// The name of dev server `i` (1-based).
pub(super) fn server_name(i: usize) -> String {
    format!("pg-{i}")
}

/// Creates the data dir and its files, picks ports, writes and validates `silo.toml`, and
/// exports the variables the config names into this process's environment (inherited by
/// the children). Must run before any thread is started.
pub(super) fn prepare(args: &DevArgs) -> anyhow::Result<Prepared> {
    let tenant_migrations_dir = match &args.tenant_migrations_dir {
        Some(dir) if dir.is_dir() => Some(std::path::absolute(dir).context("resolve --tenant-migrations-dir")?),
        Some(dir) => {
            return Err(crate::cli::usage(format!(
                "--tenant-migrations-dir {}: no such directory",
                dir.display()
            )))
        }
        None => None,
    };
    let data_dir = std::path::absolute(&args.data_dir).context("resolve the data dir")?;
    fs::create_dir_all(&data_dir).with_context(|| format!("create data dir {}", data_dir.display()))?;
    let root = nix::unistd::Uid::effective().is_root();
    if root {
        // PostgreSQL runs as the `postgres` user: it must be able to reach its clusters.
        // Traversable, not listable; the files in here are 0600.
        fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o711))
            .with_context(|| format!("set permissions of {}", data_dir.display()))?;
        check_ancestors_traversable(&data_dir)?;
    }
    let lock = lock(&data_dir)?;
    fs::create_dir_all(data_dir.join("logs")).context("create the logs dir")?;

    let pg_password = read_or_create(&data_dir.join("pg-password"), crate::secrets::generate_password)?;
    let admin_token = read_or_create(&data_dir.join("admin-token"), crate::api::new_admin_token)?;
    if args.secrets == SecretsKind::Local {
        // Created once; an existing key is kept (the store checks it when it opens it).
        crate::secrets::local::create_master_key(&data_dir.join("master.key"))?;
    }
    crate::keyfile::create(&data_dir.join("backup.key"))?;

    let mut taken = Vec::new();
    let pg_ports = pg_ports(&data_dir, usize::from(args.servers), &mut taken)?;
    let api_port = internal_port("--api-port", args.api_port, DEFAULT_API_PORT, &mut taken)?;
    let http_port = listen_port("--http-port", args.http_port, &mut taken)?;
    let https_port = listen_port("--https-port", args.https_port, &mut taken)?;
    let tls = DevTls::prepare(&data_dir)?;
    let metrics_port = internal_port("--metrics-port", args.metrics_port, DEFAULT_METRICS_PORT, &mut taken)?;

    let prepared = Prepared {
        config_path: data_dir.join("silo.toml"),
        data_dir,
        pg_password,
        admin_token,
        pg_ports,
        api_port,
        http_port,
        https_port,
        tls,
        metrics_port,
        tenant_migrations_dir,
        _lock: lock,
    };
    fs::write(&prepared.config_path, render_config(args, &prepared))
        .with_context(|| format!("write {}", prepared.config_path.display()))?;
    export_env(args, &prepared);
    Config::load(&prepared.config_path).context("the generated dev config is invalid")?;
    Ok(prepared)
}

/// Every directory above the data dir must be traversable by others (the postgres user).
fn check_ancestors_traversable(data_dir: &Path) -> anyhow::Result<()> {
    for dir in data_dir.ancestors().skip(1) {
        let mode = fs::metadata(dir)
            .with_context(|| format!("inspect {}", dir.display()))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            bail!(
                "PostgreSQL runs as user postgres and cannot reach {}: {} is not traversable (mode {:o}); {DATA_DIR_HINT}",
                data_dir.display(),
                dir.display(),
                mode & 0o777
            );
        }
    }
    Ok(())
}

fn lock(data_dir: &Path) -> anyhow::Result<Flock<File>> {
    let path = data_dir.join("dev.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!(
            "another `siloctl dev` is already running with data dir {}",
            data_dir.display()
        )
    })
}

/// Reads a generated secret, or creates it (mode 0600) on the first run.
fn read_or_create(path: &Path, make: impl FnOnce() -> SecretString) -> anyhow::Result<SecretString> {
    match fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(SecretString::from(s.trim().to_owned())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    }
    let value = make();
    write_private(path, value.expose_secret().as_bytes())?;
    Ok(value)
}

/// True if nothing listens on 127.0.0.1:`port` right now.
fn is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A free port that is not in `taken`.
fn fresh_port(taken: &mut Vec<u16>) -> anyhow::Result<u16> {
    for _ in 0..20 {
        let port = free_port()?;
        if !taken.contains(&port) {
            taken.push(port);
            return Ok(port);
        }
    }
    bail!("could not find a free port")
}

/// The admin API's port unless `--api-port` says otherwise.
const DEFAULT_API_PORT: u16 = 7070;
/// The router operations port unless `--metrics-port` says otherwise.
const DEFAULT_METRICS_PORT: u16 = 9090;

/// The port of a listener that siloctl finds by itself (the admin API through the context
/// it writes, the ops port through the printed URLs): as `flag` says if given, else
/// `default`, or a free port while `default` is taken (another `siloctl dev`, say).
fn internal_port(flag: &str, given: Option<u16>, default: u16, taken: &mut Vec<u16>) -> anyhow::Result<u16> {
    match given {
        Some(port) => listen_port(flag, port, taken),
        None if !taken.contains(&default) && is_free(default) => {
            taken.push(default);
            Ok(default)
        }
        None => fresh_port(taken),
    }
}

/// The port for a listener flag: a free one for 0, else the given one if it is free.
fn listen_port(flag: &str, port: u16, taken: &mut Vec<u16>) -> anyhow::Result<u16> {
    if port == 0 {
        return fresh_port(taken);
    }
    if taken.contains(&port) || !is_free(port) {
        bail!("port {port} is in use: pass {flag} N (0 picks a free port)");
    }
    taken.push(port);
    Ok(port)
}

/// The ports of pg-1..pg-`n`: as recorded in `ports.toml`, re-picked only when taken.
fn pg_ports(data_dir: &Path, n: usize, taken: &mut Vec<u16>) -> anyhow::Result<Vec<u16>> {
    let path = data_dir.join("ports.toml");
    let mut file: PortsFile = match fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("read {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => PortsFile::default(),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let mut changed = false;
    let mut ports = Vec::with_capacity(n);
    for i in 1..=n {
        let name = server_name(i);
        let port = match file.servers.get(&name) {
            Some(&p) if p != 0 && !taken.contains(&p) && is_free(p) => {
                taken.push(p);
                p
            }
            _ => {
                changed = true;
                fresh_port(taken)?
            }
        };
        file.servers.insert(name, port);
        ports.push(port);
    }
    if changed {
        let text = format!(
            "# Ports of the siloctl dev PostgreSQL servers, kept stable across runs.\n{}",
            toml::to_string(&file).context("serialise ports.toml")?
        );
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(ports)
}

/// A TOML string literal.
fn q(s: &str) -> String {
    // JSON string escapes are valid TOML basic-string escapes.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn render_config(args: &DevArgs, p: &Prepared) -> String {
    let pg1 = p.pg_ports.first().copied().unwrap_or_default();
    let mut s = format!(
        "# Written by `siloctl dev` on every start; edits are overwritten.\n\
         catalog_url = {}\n",
        q(&format!("postgres://postgres@127.0.0.1:{pg1}/silo_catalog"))
    );
    if let Some(dir) = &p.tenant_migrations_dir {
        s.push_str(&format!("tenant_migrations_dir = {}\n", q(&dir.display().to_string())));
    }
    s.push_str("\n[secrets]\nname_prefix = \"silo/\"\n");
    match args.secrets {
        SecretsKind::Local => s.push_str("backend = \"local\"\nlocal_master_key_file = \"master.key\"\n"),
        SecretsKind::Aws => {
            s.push_str("backend = \"aws\"\naws_region = \"us-east-1\"\n");
            if let Some(url) = &args.aws_endpoint_url {
                s.push_str(&format!("aws_endpoint_url = {}\n", q(url)));
            }
        }
    }
    for (i, port) in p.pg_ports.iter().enumerate() {
        s.push_str(&format!(
            "\n[[servers]]\nname = {}\nhost = \"127.0.0.1\"\nport = {port}\nadmin_user = \"postgres\"\n\
             admin_password_env = {}\n",
            q(&server_name(i + 1)),
            q(PG_PASSWORD_ENV)
        ));
    }
    s.push_str(&format!(
        "\n[backups]\ndir = \"backups\"\nencryption_key_file = \"backup.key\"\n\n[control_plane]\nlisten = \"127.0.0.1:{}\"\nadmin_token_env = \"SILO_ADMIN_TOKEN\"\n\n[router]\nlisten = \"127.0.0.1:{}\"\n\
         base_domains = [\"localhost\"]\nmetrics_listen = \"127.0.0.1:{}\"\n\
         https_listen = \"127.0.0.1:{}\"\ntls_cert_file = {}\ntls_key_file = {}\ntls_sni_dir = {}\n\
         tls_sni_reload_interval = \"1s\"\n",
        p.api_port,
        p.http_port,
        p.metrics_port,
        p.https_port,
        q(&p.tls.cert_file.display().to_string()),
        q(&p.tls.key_file.display().to_string()),
        q(&p.tls.sni_dir.display().to_string()),
    ));
    s
}

/// Puts the secrets the config names into this process's environment; the control plane
/// and router inherit it. Runs while the process is still single-threaded.
fn export_env(args: &DevArgs, p: &Prepared) {
    std::env::set_var(PG_PASSWORD_ENV, p.pg_password.expose_secret());
    std::env::set_var(crate::config::CATALOG_PASSWORD_ENV, p.pg_password.expose_secret());
    std::env::set_var("SILO_ADMIN_TOKEN", p.admin_token.expose_secret());
    let has_aws_creds = std::env::var_os("AWS_ACCESS_KEY_ID").is_some() || std::env::var_os("AWS_PROFILE").is_some();
    if args.secrets == SecretsKind::Aws && args.aws_endpoint_url.is_some() && !has_aws_creds {
        // moto and LocalStack accept any credentials; the SDK insists on having some.
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unflagged_port_moves_off_a_taken_default_and_a_flagged_one_does_not() {
        let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
        let busy = holder.local_addr().expect("addr").port();
        let mut taken = Vec::new();
        let moved = internal_port("--api-port", None, busy, &mut taken).expect("a free port");
        assert_ne!(moved, busy);
        assert_eq!(taken, [moved]);
        let error = internal_port("--api-port", Some(busy), busy, &mut taken).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("port {busy} is in use: pass --api-port N (0 picks a free port)")
        );
        drop(holder);
        assert_eq!(
            internal_port("--api-port", None, busy, &mut taken).expect("free again"),
            busy
        );
    }
}
