//! The `[backups]` section: where tenant backups go, how often they are taken and drilled,
//! how long they are kept, and the S3 bucket they are copied to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{RawBackupPolicy, RawBackups, RawBackupsS3};
use super::{duration, invalid, resolve, ConfigError};

/// The `[backups]` section: where `pg_dump` writes tenant backups (and the copies moves
/// restore).
#[derive(Debug, Clone, Default)]
pub struct BackupsConfig {
    /// The directory backups go to, one subdirectory per tenant; None: backups are off.
    pub dir: Option<PathBuf>,
    /// The `pg_dump` to run (moves take `pg_restore` from its directory); None: found like
    /// the PostgreSQL binaries of `siloctl dev`
    /// (`SILO_PG_BINDIR`, `pg_config --bindir`, the newest `/usr/lib/postgresql/*/bin`), else
    /// on `PATH`.
    pub pg_dump: Option<PathBuf>,
    /// The policy of tenants whose plan has none of its own.
    pub policy: BackupPolicy,
    /// `[backups.plans.NAME]`: the policy of tenants on plan NAME (each key the section
    /// leaves out is `[backups]`'s).
    pub plans: BTreeMap<String, BackupPolicy>,
    /// At most this many scheduled backups (and, apart, scheduled drills) are queued or
    /// running at once.
    pub max_concurrent: u32,
    /// The key new backups are encrypted under (32 bytes, base64, mode 0600); None: backups
    /// are written as plain `pg_dump` files.
    pub encryption_key_file: Option<PathBuf>,
    /// Keys older backups were encrypted under: they only decrypt.
    pub previous_encryption_key_files: Vec<PathBuf>,
    /// `[backups.s3]`: where every backup is copied to, off this machine; None: backups stay
    /// in `dir` only.
    pub s3: Option<BackupsS3Config>,
}

/// How often a tenant is backed up and its backup drilled, and how long its backups are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupPolicy {
    /// How many of a tenant's backups are kept: taking one removes the oldest beyond this
    /// many. None: every backup is kept.
    pub keep_last: Option<usize>,
    /// How long a backup is kept: older ones are erased (and audited as `tenant.backup.expire`),
    /// except the newest of a tenant that still exists. None: kept until deleted by hand.
    pub keep_for: Option<Duration>,
    /// Each live tenant is backed up this often by the control planes' schedule (a `backup`
    /// job queued once its last one is older). None: backups are taken on request only.
    pub every: Option<Duration>,
    /// Each live tenant's newest backup is proved by a restore drill (a `verify` job) this
    /// often. None: drills are run on request only.
    pub verify_every: Option<Duration>,
}

impl BackupsConfig {
    /// The policy of tenants on `plan`.
    pub fn policy_of(&self, plan: &str) -> &BackupPolicy {
        self.plans.get(plan).unwrap_or(&self.policy)
    }

    /// Every policy in force: `[backups]`'s, then each plan's.
    pub fn policies(&self) -> impl Iterator<Item = &BackupPolicy> {
        std::iter::once(&self.policy).chain(self.plans.values())
    }
}

/// The `[backups.s3]` section: an S3 bucket (or an S3-compatible store) every backup is
/// uploaded to before it counts as taken, and restored from when `dir` has lost it.
#[derive(Debug, Clone)]
pub struct BackupsS3Config {
    /// The bucket (made beforehand; silo never creates or deletes buckets).
    pub bucket: String,
    /// Prepended to every object key: `{prefix}{slug}/{file}`. Empty, or ends with `/`.
    pub prefix: String,
    /// The bucket's region; None: the AWS SDK's (`AWS_REGION`, the profile, ...).
    pub region: Option<String>,
    /// Another endpoint than AWS's: MinIO, Ceph, a test server.
    pub endpoint_url: Option<String>,
    /// `https://host/bucket/key` addresses instead of `https://bucket.host/key` (MinIO).
    pub path_style: bool,
    /// Backups larger than this are uploaded in parts of this size (S3 allows 10,000 parts).
    pub part_size: u64,
    /// How the bucket encrypts the objects silo writes (`server_side_encryption`); None: as
    /// the bucket's default encryption says.
    pub encryption: Option<S3Encryption>,
}

/// Server-side encryption silo asks the bucket for, and checks it got, on every upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum S3Encryption {
    /// `"AES256"`: keys the store manages (SSE-S3).
    S3Managed,
    /// `"aws:kms"`: a KMS key (SSE-KMS): `kms_key_id` (an id, ARN or alias), else the
    /// account's `aws/s3` key.
    Kms {
        /// `kms_key_id`.
        key_id: Option<String>,
    },
}

/// The `[backups]` section, checked; relative paths are relative to `base`.
pub(super) fn parse(raw: RawBackups, base: &Path) -> Result<BackupsConfig, ConfigError> {
    let resolve = |p| resolve(base, p);
    let has_dir = raw.dir.is_some();
    let policy = backup_policy(
        "backups",
        RawBackupPolicy {
            keep_last: raw.keep_last,
            keep_for: raw.keep_for,
            every: raw.every,
            verify_every: raw.verify_every,
        },
        has_dir,
        &BackupPolicy::default(),
    )?;
    let mut backup_plans = BTreeMap::new();
    for (name, plan) in raw.plans {
        let section = format!("backups.plans.{name}");
        backup_plans.insert(name, backup_policy(&section, plan, has_dir, &policy)?);
    }
    let max_concurrent = raw.max_concurrent.unwrap_or(2);
    if max_concurrent == 0 {
        return Err(invalid("backups.max_concurrent", "must be at least 1"));
    }
    if raw.encryption_key_file.is_none() && !raw.previous_encryption_key_files.is_empty() {
        return Err(invalid(
            "backups.previous_encryption_key_files",
            "needs backups.encryption_key_file (the key new backups are encrypted under)",
        ));
    }

    let s3 = raw.s3.map(backups_s3).transpose()?;
    if s3.is_some() && raw.dir.is_none() {
        return Err(invalid(
            "backups.s3",
            "needs backups.dir, where backups are written before they are uploaded",
        ));
    }
    Ok(BackupsConfig {
        dir: raw.dir.map(resolve),
        pg_dump: raw.pg_dump.map(resolve),
        policy,
        plans: backup_plans,
        max_concurrent,
        encryption_key_file: raw.encryption_key_file.map(resolve),
        previous_encryption_key_files: raw.previous_encryption_key_files.into_iter().map(resolve).collect(),
        s3,
    })
}

/// The policy of `section` (`backups`, `backups.plans.NAME`), each key it leaves out
/// `inherited`'s.
fn backup_policy(
    section: &str,
    raw: RawBackupPolicy,
    has_dir: bool,
    inherited: &BackupPolicy,
) -> Result<BackupPolicy, ConfigError> {
    if raw.keep_last == Some(0) {
        return Err(invalid(
            format!("{section}.keep_last"),
            "must be at least 1 (leave it out to keep every backup)",
        ));
    }
    let period = |key: &str, value: Option<String>, too_short: &str| {
        backup_period(&format!("{section}.{key}"), value.as_deref(), has_dir, too_short)
    };
    Ok(BackupPolicy {
        keep_last: raw.keep_last.or(inherited.keep_last),
        keep_for: period(
            "keep_for",
            raw.keep_for,
            "must be at least 1s (leave it out to keep backups until they are deleted)",
        )?
        .or(inherited.keep_for),
        every: period("every", raw.every, "must be at least 1s")?.or(inherited.every),
        verify_every: period("verify_every", raw.verify_every, "must be at least 1s")?.or(inherited.verify_every),
    })
}

/// A `[backups]` period (`key` = `value`): at least a second (else `too_short`), and only
/// with `backups.dir`, where the backups are.
fn backup_period(
    key: &str,
    value: Option<&str>,
    has_dir: bool,
    too_short: &str,
) -> Result<Option<Duration>, ConfigError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let period = duration(key, value)?;
    if period < Duration::from_secs(1) {
        return Err(invalid(key, too_short));
    }
    if !has_dir {
        return Err(invalid(key, "needs backups.dir, where the backups are"));
    }
    Ok(Some(period))
}

/// The `[backups.s3]` section, checked.
fn backups_s3(raw: RawBackupsS3) -> Result<BackupsS3Config, ConfigError> {
    // S3's bucket naming rules, for the names a configuration would use.
    let bucket_ok = (3..=63).contains(&raw.bucket.len())
        && raw
            .bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && raw.bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && raw.bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !bucket_ok {
        return Err(invalid(
            "backups.s3.bucket",
            format!(
                "{:?} is not a bucket name (3 to 63 lower-case letters, digits, '-' and '.')",
                raw.bucket
            ),
        ));
    }
    if !(raw.prefix.is_empty() || raw.prefix.ends_with('/')) || raw.prefix.starts_with('/') {
        return Err(invalid(
            "backups.s3.prefix",
            "must be empty or end with '/', and not start with '/' (e.g. \"silo/\")",
        ));
    }
    if let Some(url) = &raw.endpoint_url {
        let parsed = reqwest::Url::parse(url).ok();
        if !parsed.is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some()) {
            return Err(invalid(
                "backups.s3.endpoint_url",
                format!("{url:?} is not an http(s) URL"),
            ));
        }
    }
    if !(5..=5120).contains(&raw.part_size_mib) {
        return Err(invalid(
            "backups.s3.part_size_mib",
            "must be between 5 and 5120 (S3's limits on a part)",
        ));
    }
    let encryption = match (raw.server_side_encryption.as_deref(), raw.kms_key_id) {
        (_, Some(key)) if key.trim().is_empty() => {
            return Err(invalid("backups.s3.kms_key_id", "must not be empty"));
        }
        (None, None) => None,
        (Some("AES256"), None) => Some(S3Encryption::S3Managed),
        (Some("aws:kms"), key_id) => Some(S3Encryption::Kms { key_id }),
        (None | Some("AES256"), Some(_)) => {
            return Err(invalid(
                "backups.s3.kms_key_id",
                "needs server_side_encryption = \"aws:kms\"",
            ));
        }
        (Some(other), _) => {
            return Err(invalid(
                "backups.s3.server_side_encryption",
                format!("{other:?} is not \"AES256\" or \"aws:kms\""),
            ));
        }
    };
    Ok(BackupsS3Config {
        bucket: raw.bucket,
        prefix: raw.prefix,
        region: raw.region,
        endpoint_url: raw.endpoint_url,
        path_style: raw.path_style,
        part_size: raw.part_size_mib * 1024 * 1024,
        encryption,
    })
}
