//! `[backups.s3]`: the bucket every backup is copied to, so that losing the control plane's
//! machine (and `[backups] dir` with it) loses no backup. Objects are named
//! `{prefix}{slug}/{file}`, the same names as in `[backups] dir`; what they hold is the
//! backup file as it is on disk (encrypted when backups are). Credentials come from the AWS
//! SDK's standard chain (environment, profile, web identity, instance or container role).
//!
//! Backups larger than `part_size` are uploaded in parts, read straight from the file; an
//! upload that fails is aborted, so the bucket keeps no stray parts of it.
//!
//! With `server_side_encryption`, every upload asks for it, and an object the store kept
//! otherwise (a store that ignores the request) is removed and the upload fails.

use std::path::Path;

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, ObjectStorageClass, ServerSideEncryption};
use aws_sdk_s3::Client;
use tokio::io::AsyncWriteExt;

use super::sealed::{self, Format};
use super::BackupError;
use crate::config::{BackupsS3Config, S3Encryption};
use crate::names::TenantSlug;
use crate::secrets::aws::sdk_error_detail;

/// A backup as the bucket lists it.
#[derive(Debug, Clone)]
pub(super) struct Object {
    /// The file name (the key without `{prefix}{slug}/`).
    pub file: String,
    /// Its size.
    pub bytes: u64,
    /// When it was uploaded.
    pub uploaded_at: chrono::DateTime<chrono::Utc>,
    /// Whether a lifecycle rule moved it to an archive storage class (Glacier Flexible
    /// Retrieval, Deep Archive), where it cannot be read until a copy is restored.
    pub archived: bool,
}

/// How long a connection to the bucket may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take to get the first byte of its answer, its body (up to a part of
/// `part_size`) sent included: a stalled upload fails, and is retried, instead of holding its
/// job forever.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

/// The configured bucket.
#[derive(Clone)]
pub(super) struct Bucket {
    client: Client,
    bucket: String,
    prefix: String,
    part_size: u64,
    encryption: Option<S3Encryption>,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("encryption", &self.encryption)
            .finish_non_exhaustive()
    }
}

/// The S3 name of `encryption`'s algorithm.
fn algorithm(encryption: &S3Encryption) -> ServerSideEncryption {
    match encryption {
        S3Encryption::S3Managed => ServerSideEncryption::Aes256,
        S3Encryption::Kms { .. } => ServerSideEncryption::AwsKms,
    }
}

/// What is wrong with an object stored with `got` encryption when `wanted` was asked for.
fn encryption_mismatch(wanted: Option<&ServerSideEncryption>, got: Option<&ServerSideEncryption>) -> Option<String> {
    let wanted = wanted?;
    match got {
        Some(got) if got == wanted => None,
        Some(got) => Some(format!(
            "the bucket stored it encrypted with {}, not {}",
            got.as_str(),
            wanted.as_str()
        )),
        None => Some(format!(
            "the bucket stored it without server-side encryption, not with {}",
            wanted.as_str()
        )),
    }
}

/// The region could not be found: neither in the config nor in the environment.
#[derive(Debug, thiserror::Error)]
#[error("backups.s3.region is not set and the AWS SDK found no region (AWS_REGION, the profile)")]
pub struct NoRegion;

impl Bucket {
    /// A client for the bucket `config` names.
    pub(super) async fn new(config: &BackupsS3Config) -> Result<Self, NoRegion> {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(ANSWER_TIMEOUT)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(timeouts);
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let sdk_config = loader.load().await;
        if sdk_config.region().is_none() {
            return Err(NoRegion);
        }
        let mut s3_config = aws_sdk_s3::config::Builder::from(&sdk_config).force_path_style(config.path_style);
        if let Some(url) = &config.endpoint_url {
            s3_config = s3_config.endpoint_url(url);
        }
        Ok(Self {
            client: Client::from_conf(s3_config.build()),
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            part_size: config.part_size,
            encryption: config.encryption.clone(),
        })
    }

    fn key(&self, slug: &TenantSlug, file: &str) -> String {
        format!("{}{slug}/{file}", self.prefix)
    }

    /// `s3://bucket/key`, for messages.
    fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// Uploads the backup file `path` as `slug`'s backup `file`, replacing any object of that
    /// name, and checks that the bucket then holds as many bytes as the file.
    pub(super) async fn upload(&self, slug: &TenantSlug, file: &str, path: &Path) -> Result<(), BackupError> {
        let key = self.key(slug, file);
        let bytes = tokio::fs::metadata(path).await.map_err(super::io("read", path))?.len();
        if bytes <= self.part_size {
            let body = ByteStream::read_from()
                .path(path)
                .build()
                .await
                .map_err(|e| s3_error("upload to", self.url(&key), &e))?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .set_server_side_encryption(self.algorithm())
                .set_ssekms_key_id(self.kms_key_id())
                .body(body)
                .send()
                .await
                .map_err(|e| sdk_error("upload to", self.url(&key), &e))?;
            return self.check_stored(&key, bytes).await;
        }
        let started = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&key)
            .set_server_side_encryption(self.algorithm())
            .set_ssekms_key_id(self.kms_key_id())
            .send()
            .await
            .map_err(|e| sdk_error("upload to", self.url(&key), &e))?;
        let upload_id = started.upload_id().unwrap_or_default().to_owned();
        match self.upload_parts(&key, &upload_id, path, bytes).await {
            Ok(()) => self.check_stored(&key, bytes).await,
            Err(e) => {
                // Parts of an upload never completed are billed until aborted.
                let _ = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&key)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                Err(e)
            }
        }
    }

    async fn upload_parts(&self, key: &str, upload_id: &str, path: &Path, bytes: u64) -> Result<(), BackupError> {
        let mut parts = Vec::new();
        let mut offset = 0;
        let mut number = 1;
        while offset < bytes {
            let length = self.part_size.min(bytes - offset);
            let body = ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(Length::Exact(length))
                .build()
                .await
                .map_err(|e| s3_error("upload to", self.url(key), &e))?;
            let part = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(body)
                .send()
                .await
                .map_err(|e| sdk_error("upload part to", self.url(key), &e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_owned))
                    .set_checksum_crc32(part.checksum_crc32().map(str::to_owned))
                    .build(),
            );
            offset += length;
            number += 1;
        }
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await;
        match completed {
            Ok(_) => Ok(()),
            // Some S3-compatible servers (moto 5.2) answer 200 with a body the SDK cannot read:
            // the upload completed, as the size check after it confirms.
            Err(SdkError::ServiceError(e)) if e.raw().status().is_success() => Ok(()),
            Err(e) => Err(sdk_error("complete the upload to", self.url(key), &e)),
        }
    }

    /// The server-side encryption every upload asks for.
    fn algorithm(&self) -> Option<ServerSideEncryption> {
        self.encryption.as_ref().map(algorithm)
    }

    /// The KMS key every upload asks for.
    fn kms_key_id(&self) -> Option<String> {
        match &self.encryption {
            Some(S3Encryption::Kms { key_id }) => key_id.clone(),
            _ => None,
        }
    }

    /// Fails unless the object `key` holds `bytes` bytes, encrypted as configured; an object
    /// stored without that encryption is removed.
    async fn check_stored(&self, key: &str, bytes: u64) -> Result<(), BackupError> {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| sdk_error("check the upload to", self.url(key), &e))?;
        let stored = head.content_length().and_then(|n| u64::try_from(n).ok());
        if stored != Some(bytes) {
            return Err(BackupError::S3 {
                what: "check the upload to",
                url: self.url(key),
                detail: format!("the bucket holds {stored:?} bytes, the backup file {bytes}"),
            });
        }
        if let Some(wrong) = encryption_mismatch(self.algorithm().as_ref(), head.server_side_encryption()) {
            let _ = self.client.delete_object().bucket(&self.bucket).key(key).send().await;
            return Err(BackupError::S3 {
                what: "check the upload to",
                url: self.url(key),
                detail: format!("{wrong}; the object was removed"),
            });
        }
        Ok(())
    }

    /// `slug`'s backups in the bucket, in key order.
    pub(super) async fn list(&self, slug: &TenantSlug) -> Result<Vec<Object>, BackupError> {
        let prefix = self.key(slug, "");
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&prefix)
            .into_paginator()
            .send();
        let mut objects = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| sdk_error("list", self.url(&prefix), &e))?;
            for object in page.contents() {
                let Some(file) = object.key().and_then(|key| key.strip_prefix(&prefix)) else {
                    continue;
                };
                if file.contains('/') || !super::is_backup_name(file) {
                    continue;
                }
                let uploaded_at = object
                    .last_modified()
                    .and_then(|at| chrono::DateTime::from_timestamp(at.secs(), at.subsec_nanos()))
                    .unwrap_or_default();
                let archived = matches!(
                    object.storage_class(),
                    Some(ObjectStorageClass::Glacier | ObjectStorageClass::DeepArchive)
                );
                objects.push(Object {
                    file: file.to_owned(),
                    bytes: object.size().and_then(|size| u64::try_from(size).ok()).unwrap_or(0),
                    uploaded_at,
                    archived,
                });
            }
        }
        Ok(objects)
    }

    /// The tenants with backups in the bucket (`{prefix}{slug}/`), deleted ones included.
    pub(super) async fn tenants(&self) -> Result<Vec<TenantSlug>, BackupError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .delimiter("/")
            .into_paginator()
            .send();
        let mut slugs = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| sdk_error("list", self.url(&self.prefix), &e))?;
            let names = page
                .common_prefixes()
                .iter()
                .filter_map(|common| common.prefix()?.strip_prefix(&self.prefix)?.strip_suffix('/'));
            slugs.extend(names.filter_map(|name| TenantSlug::parse(name).ok()));
        }
        Ok(slugs)
    }

    /// When `slug`'s backup `file` was uploaded to the bucket; None when it is not there.
    pub(super) async fn uploaded_at(
        &self,
        slug: &TenantSlug,
        file: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, BackupError> {
        let key = self.key(slug, file);
        match self.client.head_object().bucket(&self.bucket).key(&key).send().await {
            Ok(head) => Ok(Some(
                head.last_modified()
                    .and_then(|at| chrono::DateTime::from_timestamp(at.secs(), at.subsec_nanos()))
                    .unwrap_or_default(),
            )),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_not_found()) => Ok(None),
            Err(e) => Err(sdk_error("look up", self.url(&key), &e)),
        }
    }

    /// How `slug`'s backup `file` is stored, from its first bytes.
    pub(super) async fn format_of(&self, slug: &TenantSlug, file: &str) -> Result<Format, BackupError> {
        let key = self.key(slug, file);
        let start = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .range(format!("bytes=0-{}", sealed::MAGIC.len() - 1))
            .send()
            .await
            .map_err(|e| self.read_error("read", &key, &e))?
            .body
            .collect()
            .await
            .map_err(|e| s3_error("read", self.url(&key), &e))?
            .into_bytes();
        Ok(sealed::format_of(&start))
    }

    /// Downloads `slug`'s backup `file` into the new file `to`, flushed to disk.
    pub(super) async fn download(&self, slug: &TenantSlug, file: &str, to: &Path) -> Result<(), BackupError> {
        let key = self.key(slug, file);
        let object = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| self.read_error("download", &key, &e))?;
        let mut output = tokio::fs::File::create(to).await.map_err(super::io("write", to))?;
        let mut body = object.body.into_async_read();
        tokio::io::copy_buf(&mut body, &mut output)
            .await
            .map_err(|e| s3_error("download", self.url(&key), &e))?;
        output.flush().await.map_err(super::io("write", to))?;
        output.sync_all().await.map_err(super::io("write", to))
    }

    /// Removes `slug`'s backup `file` from the bucket (nothing to do when it is not there).
    pub(super) async fn remove(&self, slug: &TenantSlug, file: &str) -> Result<(), BackupError> {
        let key = self.key(slug, file);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| sdk_error("remove", self.url(&key), &e))?;
        Ok(())
    }

    /// Whether the bucket can be reached with these credentials (checked at start).
    pub(super) async fn check(&self) -> Result<(), BackupError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| sdk_error("reach", format!("s3://{}", self.bucket), &e))?;
        Ok(())
    }
}

impl Bucket {
    /// A failed read of `key`: [`BackupError::Archived`] for an object in an archive storage
    /// class, else as [`sdk_error`].
    fn read_error<E, R>(&self, what: &'static str, key: &str, err: &SdkError<E, R>) -> BackupError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        if err.code() == Some("InvalidObjectState") {
            return BackupError::Archived {
                bucket: self.bucket.clone(),
                key: key.to_owned(),
            };
        }
        sdk_error(what, self.url(key), err)
    }
}

fn sdk_error<E, R>(what: &'static str, url: String, err: &SdkError<E, R>) -> BackupError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    BackupError::S3 {
        what,
        url,
        detail: sdk_error_detail(err),
    }
}

fn s3_error(what: &'static str, url: String, err: &dyn std::error::Error) -> BackupError {
    BackupError::S3 {
        what,
        url,
        detail: err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_is_checked_for_the_encryption_asked_for() {
        let kms = ServerSideEncryption::AwsKms;
        let aes = ServerSideEncryption::Aes256;
        assert_eq!(encryption_mismatch(None, None), None);
        assert_eq!(encryption_mismatch(None, Some(&aes)), None);
        assert_eq!(encryption_mismatch(Some(&kms), Some(&kms)), None);
        assert_eq!(
            encryption_mismatch(Some(&kms), Some(&aes)).as_deref(),
            Some("the bucket stored it encrypted with AES256, not aws:kms")
        );
        assert_eq!(
            encryption_mismatch(Some(&aes), None).as_deref(),
            Some("the bucket stored it without server-side encryption, not with AES256")
        );
    }
}
