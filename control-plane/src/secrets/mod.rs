//! The secret store: one trait, two backends (encrypted local store, AWS Secrets Manager),
//! with AWS's version/stage model so rotation code is written once.
//!
//! A secret has versions; stages are labels on versions. `AWSCURRENT` marks the value in use,
//! `AWSPENDING` the value being rotated in, `AWSPREVIOUS` the value rotated out.

pub mod aws;
pub mod local;

use std::sync::Arc;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// The stage of the value in use.
pub const AWSCURRENT: &str = "AWSCURRENT";
/// The stage of a value being rotated in.
pub const AWSPENDING: &str = "AWSPENDING";
/// The stage of the value rotated out by the last rotation.
pub const AWSPREVIOUS: &str = "AWSPREVIOUS";

/// Errors of a secret store. Messages never contain secret values.
#[derive(Debug, thiserror::Error)]
pub enum SecretStoreError {
    /// No secret (or no version with that stage) by that name.
    #[error("secret {0:?} not found")]
    NotFound(String),
    /// The stored value could not be decrypted (wrong master key or tampered data).
    #[error("secret {0:?} cannot be decrypted: wrong master key or corrupted data")]
    Decrypt(String),
    /// The master key file is missing, unreadable, malformed or not mode 0600.
    #[error("master key file {path}: {problem}")]
    MasterKey {
        /// The key file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// The backend failed (database, network, AWS).
    #[error("secret store backend: {0}")]
    Backend(String),
}

/// One version of a secret.
pub struct SecretVersion {
    /// The version id.
    pub version_id: String,
    /// The stages on this version.
    pub stages: Vec<String>,
    /// The value.
    pub value: SecretString,
}

impl std::fmt::Debug for SecretVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretVersion")
            .field("version_id", &self.version_id)
            .field("stages", &self.stages)
            .finish_non_exhaustive()
    }
}

/// A version id and its stages, without the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionStages {
    /// The version id.
    pub version_id: String,
    /// Stages on it.
    pub stages: Vec<String>,
}

/// A secret store with AWS Secrets Manager semantics.
///
/// Version ids are what AWS calls `ClientRequestToken`s: 32 to 64 printable ASCII characters
/// (a UUID is the usual choice); both backends refuse others. A stage is on at most one
/// version at a time.
#[async_trait]
pub trait SecretStore: Send + Sync + 'static {
    /// Creates the secret with `value` as its first version, staged `AWSCURRENT`.
    /// Idempotent: if the secret already has version `version_id` with this value, nothing
    /// changes; if it exists without that version (or with another value), it is an error.
    async fn create_secret(
        &self,
        name: &str,
        version_id: &str,
        value: &SecretString,
        tags: &[(&str, &str)],
    ) -> Result<(), SecretStoreError>;

    /// Adds version `version_id` with `stages` (moving those stages off other versions;
    /// no stages means `AWSCURRENT`). Moving `AWSCURRENT` puts `AWSPREVIOUS` on the version
    /// that had it. Idempotent by version id: the same value again is a no-op, a different
    /// value for an existing version id is an error. `NotFound` if there is no such secret.
    async fn put_secret_value(
        &self,
        name: &str,
        version_id: &str,
        value: &SecretString,
        stages: &[&str],
    ) -> Result<(), SecretStoreError>;

    /// The version carrying `stage`, or `None` if the secret or the stage does not exist.
    async fn get_secret_value(&self, name: &str, stage: &str) -> Result<Option<SecretVersion>, SecretStoreError>;

    /// Every version that carries at least one stage, ordered by version id. `None` if the
    /// secret does not exist (or is scheduled for deletion).
    async fn list_version_stages(&self, name: &str) -> Result<Option<Vec<VersionStages>>, SecretStoreError>;

    /// Moves `stage` to `to_version` (or only removes it when `None`) and off `from_version`
    /// when given. Moving `AWSCURRENT` puts `AWSPREVIOUS` on the version that had it.
    /// As on AWS, a stage attached to another version must be removed from it in the same
    /// call (`from_version` names that version). `NotFound` if there is no such secret.
    async fn update_version_stage(
        &self,
        name: &str,
        stage: &str,
        to_version: Option<&str>,
        from_version: Option<&str>,
    ) -> Result<(), SecretStoreError>;

    /// Deletes the secret; `force` skips any recovery window (the local store has none).
    /// Deleting a missing secret is Ok.
    async fn delete_secret(&self, name: &str, force: bool) -> Result<(), SecretStoreError>;
}

/// Opens the secret store `cfg` selects: the local store on the `catalog` pool (checking the
/// master key file), or AWS Secrets Manager (which needs no connection to open).
pub async fn open(
    cfg: &crate::config::SecretsConfig,
    catalog: sqlx::PgPool,
) -> Result<Arc<dyn SecretStore>, SecretStoreError> {
    use crate::config::SecretsBackend;
    Ok(match &cfg.backend {
        SecretsBackend::Local {
            master_key_file,
            previous_master_key_files,
        } => Arc::new(local::LocalSecretStore::open(
            master_key_file,
            previous_master_key_files,
            catalog,
        )?),
        SecretsBackend::Aws {
            region,
            endpoint_url,
            recovery_window_days,
            kms_key_id,
        } => Arc::new(
            aws::AwsSecretStore::new(
                region,
                endpoint_url.as_deref(),
                *recovery_window_days,
                kms_key_id.as_deref(),
            )
            .await,
        ),
    })
}

/// Refuses version ids AWS would refuse as a `ClientRequestToken`, so code that works on the
/// local store works on AWS. Printable ASCII also keeps NUL out of the local store's
/// associated data.
pub(crate) fn check_version_id(version_id: &str) -> Result<(), SecretStoreError> {
    if (32..=64).contains(&version_id.len()) && version_id.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(SecretStoreError::Backend(format!(
            "version id {version_id:?} must be 32 to 64 printable ASCII characters (e.g. a UUID)"
        )))
    }
}

/// A tenant's database credentials, in the shape AWS uses for database secrets.
#[derive(Clone, Serialize, Deserialize)]
pub struct DbSecret {
    /// Always `postgres`.
    pub engine: String,
    /// Server host.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Login role.
    pub username: String,
    /// Password.
    #[serde(serialize_with = "expose")]
    pub password: SecretString,
    /// Database name.
    pub dbname: String,
}

fn expose<S: serde::Serializer>(s: &SecretString, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.expose_secret())
}

impl std::fmt::Debug for DbSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbSecret")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("dbname", &self.dbname)
            .finish_non_exhaustive()
    }
}

impl DbSecret {
    /// Serialises to the JSON stored in the secret store.
    pub fn to_secret_string(&self) -> SecretString {
        SecretString::from(serde_json::to_string(self).unwrap_or_default())
    }

    /// Parses the JSON stored in the secret store.
    pub fn from_secret(value: &SecretString, name: &str) -> Result<Self, SecretStoreError> {
        serde_json::from_str(value.expose_secret())
            .map_err(|_| SecretStoreError::Backend(format!("secret {name:?} is not a database secret")))
    }

    /// Connect options for this secret, with the TLS settings of its server. Never from
    /// `~/.pgpass`: the secret holds the password.
    pub fn connect_options(&self, tls: &crate::config::ServerTls) -> sqlx::postgres::PgConnectOptions {
        let options = sqlx::postgres::PgConnectOptions::new_without_pgpass()
            .host(&self.host)
            .port(self.port)
            .username(&self.username)
            .password(self.password.expose_secret())
            .database(&self.dbname);
        tls.apply(options)
    }
}

/// The secret name of a tenant: `{name_prefix}tenants/{slug}`.
pub fn tenant_secret_name(prefix: &str, slug: &crate::names::TenantSlug) -> String {
    format!("{prefix}tenants/{slug}")
}

/// A new random password: 32 URL-safe characters (~190 bits).
pub fn generate_password() -> SecretString {
    use rand::distr::{Alphanumeric, SampleString};
    SecretString::from(Alphanumeric.sample_string(&mut rand::rng(), 32))
}
