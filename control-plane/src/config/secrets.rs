//! The `[secrets]` section: which store holds tenant credentials.

use std::path::{Path, PathBuf};

use super::raw::RawSecrets;
use super::{invalid, resolve, ConfigError};

/// Which secret store holds tenant credentials.
#[derive(Debug, Clone)]
pub enum SecretsBackend {
    /// Encrypted in the catalog under a local master key file (mode 0600).
    Local {
        /// Path of the master key file (32 random bytes, base64): it encrypts.
        master_key_file: PathBuf,
        /// Keys that encrypted before the current one: they still decrypt, until
        /// `silo-control-plane rekey-secrets` has re-encrypted everything under the current key.
        previous_master_key_files: Vec<PathBuf>,
    },
    /// AWS Secrets Manager.
    Aws {
        /// The AWS region.
        region: String,
        /// An endpoint override (moto, LocalStack).
        endpoint_url: Option<String>,
        /// Days a deleted secret can be recovered (7..=30).
        recovery_window_days: u32,
        /// The KMS key new secrets are encrypted under (an id, ARN or alias); None: the
        /// account's `aws/secretsmanager` key.
        kms_key_id: Option<String>,
    },
}

/// The `[secrets]` section.
#[derive(Debug, Clone)]
pub struct SecretsConfig {
    /// The backend.
    pub backend: SecretsBackend,
    /// Prefix of every secret name, e.g. `silo/`.
    pub name_prefix: String,
}

/// The `[secrets]` section, checked; relative paths are relative to `base`.
pub(super) fn parse(raw: RawSecrets, base: &Path) -> Result<SecretsConfig, ConfigError> {
    let resolve = |p| resolve(base, p);
    let backend = match raw.backend.as_str() {
        "local" if raw.aws_kms_key_id.is_some() => {
            return Err(invalid("secrets.aws_kms_key_id", "is only for backend = \"aws\""));
        }
        "local" => SecretsBackend::Local {
            master_key_file: resolve(
                raw.local_master_key_file
                    .ok_or_else(|| invalid("secrets.local_master_key_file", "is required with backend = \"local\""))?,
            ),
            previous_master_key_files: raw.local_previous_master_key_files.into_iter().map(resolve).collect(),
        },
        "aws" => {
            if !raw.local_previous_master_key_files.is_empty() {
                return Err(invalid(
                    "secrets.local_previous_master_key_files",
                    "is only for backend = \"local\"",
                ));
            }
            let days = raw.aws_recovery_window_days;
            if !(7..=30).contains(&days) {
                return Err(invalid("secrets.aws_recovery_window_days", "must be between 7 and 30"));
            }
            SecretsBackend::Aws {
                region: raw
                    .aws_region
                    .ok_or_else(|| invalid("secrets.aws_region", "is required with backend = \"aws\""))?,
                endpoint_url: raw.aws_endpoint_url,
                recovery_window_days: days,
                kms_key_id: match raw.aws_kms_key_id {
                    Some(key) if key.trim().is_empty() => {
                        return Err(invalid("secrets.aws_kms_key_id", "must not be empty"));
                    }
                    key => key,
                },
            }
        }
        other => {
            return Err(invalid(
                "secrets.backend",
                format!("must be \"local\" or \"aws\", not {other:?}"),
            ))
        }
    };
    Ok(SecretsConfig {
        backend,
        name_prefix: raw.name_prefix,
    })
}
