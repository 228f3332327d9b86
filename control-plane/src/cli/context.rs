//! Where the admin API is and which token to send: `--endpoint`/`--token` (or
//! `SILO_ENDPOINT`/`SILO_TOKEN`), else `./.silo/env`, else the user context file that the
//! last `siloctl dev` wrote (`$XDG_CONFIG_HOME/silo/context.env`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use secrecy::{ExposeSecret, SecretString};

use super::args::GlobalArgs;
use super::usage;

/// Environment variable (and context file key) naming the admin API URL.
pub(crate) const ENDPOINT_KEY: &str = "SILO_ENDPOINT";
/// Environment variable (and context file key) holding the admin token.
pub(crate) const TOKEN_KEY: &str = "SILO_TOKEN";

/// A resolved admin API endpoint and token.
#[derive(Clone)]
pub(crate) struct ApiContext {
    /// Base URL without a trailing slash.
    pub(crate) endpoint: String,
    pub(crate) token: SecretString,
    /// CA certificates (PEM) to trust next to the system's.
    pub(crate) cacerts: Vec<reqwest::Certificate>,
}

/// The context a `siloctl dev` data dir provides to siloctl calls in that directory.
pub(crate) fn local_env_file() -> PathBuf {
    Path::new(".silo").join("env")
}

/// `$XDG_CONFIG_HOME/silo/context.env`, or `~/.config/silo/context.env`.
pub(crate) fn user_context_file() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".config"),
    };
    Some(base.join("silo").join("context.env"))
}

/// Resolves the context from the global options and the context files.
pub(crate) fn resolve(global: &GlobalArgs) -> anyhow::Result<ApiContext> {
    let files = || {
        [Some(local_env_file()), user_context_file()]
            .into_iter()
            .flatten()
            .find_map(|path| read_env_file(&path))
    };
    let (endpoint, token) = match global.endpoint.as_deref().filter(|e| !e.is_empty()) {
        Some(endpoint) => {
            // Only send a token from a context file to the endpoint that file is for.
            let token = global.token.clone().or_else(|| {
                files()
                    .and_then(|(e, t)| (trim_url(&e) == trim_url(endpoint)).then_some(t))
                    .flatten()
            });
            (endpoint.to_owned(), token)
        }
        None => match files() {
            Some((endpoint, file_token)) => (endpoint, global.token.clone().or(file_token)),
            None => {
                return Err(usage(
                    "no admin API configured: run `siloctl dev`, or set SILO_ENDPOINT and SILO_TOKEN",
                ))
            }
        },
    };
    let endpoint = trim_url(&endpoint).to_owned();
    let is_url = reqwest::Url::parse(&endpoint)
        .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some());
    if !is_url {
        return Err(usage(format!(
            "endpoint {endpoint:?} must be an http:// or https:// URL"
        )));
    }
    let token = token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| usage("no admin token: set SILO_TOKEN or pass --token"))?;
    let cacerts = match &global.cacert {
        Some(path) => read_cacerts(path)?,
        None => Vec::new(),
    };
    Ok(ApiContext {
        endpoint,
        token: SecretString::from(token),
        cacerts,
    })
}

/// The certificates of PEM file `path` (`--cacert`); a usage error when there are none.
fn read_cacerts(path: &Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(path).map_err(|e| usage(format!("--cacert {}: {e}", path.display())))?;
    let certs =
        reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| usage(format!("--cacert {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(usage(format!("--cacert {}: no PEM certificate in it", path.display())));
    }
    Ok(certs)
}

fn trim_url(url: &str) -> &str {
    url.trim().trim_end_matches('/')
}

/// Reads `SILO_ENDPOINT` (required) and `SILO_TOKEN` from a `KEY=VALUE` file.
fn read_env_file(path: &Path) -> Option<(String, Option<String>)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut endpoint = None;
    let mut token = None;
    for line in text.lines() {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'').to_owned();
        match key.trim() {
            ENDPOINT_KEY => endpoint = Some(value),
            TOKEN_KEY => token = Some(value),
            _ => {}
        }
    }
    Some((endpoint.filter(|e| !e.is_empty())?, token))
}

/// Writes a context file (mode 0600, parent directories created).
pub(crate) fn write_env_file(path: &Path, endpoint: &str, token: &SecretString) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let text = format!("{ENDPOINT_KEY}={endpoint}\n{TOKEN_KEY}={}\n", token.expose_secret());
    crate::localpg::write_private(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_it_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/context.env");
        write_env_file(&path, "http://127.0.0.1:7070", &SecretString::from("tok")).unwrap();
        let (endpoint, token) = read_env_file(&path).unwrap();
        assert_eq!(endpoint, "http://127.0.0.1:7070");
        assert_eq!(token.as_deref(), Some("tok"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn file_without_endpoint_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("env");
        std::fs::write(&path, "SILO_TOKEN=x\n").unwrap();
        assert!(read_env_file(&path).is_none());
    }
}
