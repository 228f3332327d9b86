//! AWS Secrets Manager as the secret store, through the real `aws-sdk-secretsmanager` client
//! (tested against `moto_server` through an endpoint override).
//!
//! Version ids are sent as `ClientRequestToken`s, which makes every write idempotent on the
//! AWS side. Reads always name the stage: `GetSecretValue` without one is both ambiguous in
//! intent and wrong on moto after a stage move. Errors carry the SDK's error code and message,
//! never a request, so no secret value can end up in them.

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::types::Tag;
use aws_sdk_secretsmanager::Client;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use super::{check_version_id, SecretStore, SecretStoreError, SecretVersion, VersionStages};

/// Secrets kept in AWS Secrets Manager (or an API-compatible endpoint such as moto).
#[derive(Clone)]
pub struct AwsSecretStore {
    client: Client,
    region: String,
    endpoint_url: Option<String>,
    recovery_window_days: u32,
    kms_key_id: Option<String>,
}

impl std::fmt::Debug for AwsSecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsSecretStore")
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("recovery_window_days", &self.recovery_window_days)
            .field("kms_key_id", &self.kms_key_id)
            .finish_non_exhaustive()
    }
}

/// `Backend` error for a failed call (see [`sdk_error_detail`]).
fn backend<E, R>(op: &str, name: &str, err: &SdkError<E, R>) -> SecretStoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    SecretStoreError::Backend(format!("{op} {name:?}: {}", sdk_error_detail(err)))
}

/// What a failed AWS SDK call (of any AWS service) says: the service's error code and
/// message, or the SDK's description of a transport failure. Neither includes request
/// parameters.
pub(crate) fn sdk_error_detail<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match (err.code(), err.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(err).to_string(),
    }
}

impl AwsSecretStore {
    /// A client for `region`, with the standard credential chain (environment, profile, web
    /// identity, container/instance roles) and `endpoint_url` overriding the AWS endpoint.
    /// `recovery_window_days` (7..=30) applies to deletions without `force`; new secrets are
    /// encrypted under `kms_key_id` (else the account's `aws/secretsmanager` key).
    pub async fn new(
        region: &str,
        endpoint_url: Option<&str>,
        recovery_window_days: u32,
        kms_key_id: Option<&str>,
    ) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(Region::new(region.to_owned()));
        if let Some(url) = endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk_config = loader.load().await;
        Self {
            client: Client::new(&sdk_config),
            region: region.to_owned(),
            endpoint_url: endpoint_url.map(str::to_owned),
            recovery_window_days,
            kms_key_id: kms_key_id.map(str::to_owned),
        }
    }

    /// Whether the secret exists and, if so, whether it is scheduled for deletion (AWS refuses
    /// most calls on such a secret with `InvalidRequestException`, and keeps its name taken
    /// for the recovery window): None when there is no such secret.
    async fn scheduled_for_deletion(&self, name: &str) -> Result<Option<bool>, SecretStoreError> {
        match self.client.describe_secret().secret_id(name).send().await {
            Ok(out) => Ok(Some(out.deleted_date().is_some())),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                Ok(None)
            }
            Err(e) => Err(backend("DescribeSecret", name, &e)),
        }
    }

    /// Whether the secret is absent or scheduled for deletion: to callers it no longer exists.
    async fn is_gone(&self, name: &str) -> Result<bool, SecretStoreError> {
        Ok(self.scheduled_for_deletion(name).await?.unwrap_or(true))
    }

    /// `CreateSecret` over a secret scheduled for deletion: the secret is restored, takes the
    /// configured KMS key and `tags`, and `value` becomes its current version (its old ones,
    /// whose logins were dropped with the tenant, stay behind it).
    async fn create_over_deleted(
        &self,
        name: &str,
        version_id: &str,
        value: &SecretString,
        tags: Vec<Tag>,
    ) -> Result<(), SecretStoreError> {
        self.client
            .restore_secret()
            .secret_id(name)
            .send()
            .await
            .map_err(|e| backend("RestoreSecret", name, &e))?;
        if let Some(key) = &self.kms_key_id {
            self.client
                .update_secret()
                .secret_id(name)
                .kms_key_id(key)
                .send()
                .await
                .map_err(|e| backend("UpdateSecret", name, &e))?;
        }
        if !tags.is_empty() {
            self.client
                .tag_resource()
                .secret_id(name)
                .set_tags(Some(tags))
                .send()
                .await
                .map_err(|e| backend("TagResource", name, &e))?;
        }
        // Without stages, the new version is staged AWSCURRENT.
        self.put_secret_value(name, version_id, value, &[]).await
    }

    /// After `CreateSecret` found the secret already there: fine if it holds `version_id`
    /// with the same value (a retried create), an error otherwise.
    async fn check_existing_version(
        &self,
        name: &str,
        version_id: &str,
        value: &SecretString,
    ) -> Result<(), SecretStoreError> {
        let out = match self
            .client
            .get_secret_value()
            .secret_id(name)
            .version_id(version_id)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                return Err(SecretStoreError::Backend(format!(
                    "secret {name:?} already exists (without version {version_id:?})"
                )))
            }
            Err(e) => return Err(backend("GetSecretValue", name, &e)),
        };
        let stored = SecretString::from(out.secret_string.unwrap_or_default());
        if bool::from(
            stored
                .expose_secret()
                .as_bytes()
                .ct_eq(value.expose_secret().as_bytes()),
        ) {
            Ok(())
        } else {
            Err(SecretStoreError::Backend(format!(
                "secret {name:?} already has a version {version_id:?} with a different value; versions cannot be modified"
            )))
        }
    }
}

#[async_trait]
impl SecretStore for AwsSecretStore {
    async fn create_secret(
        &self,
        name: &str,
        version_id: &str,
        value: &SecretString,
        tags: &[(&str, &str)],
    ) -> Result<(), SecretStoreError> {
        check_version_id(version_id)?;
        let tags: Vec<Tag> = tags
            .iter()
            .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
            .collect();
        let result = self
            .client
            .create_secret()
            .name(name)
            .client_request_token(version_id)
            .secret_string(value.expose_secret())
            .set_kms_key_id(self.kms_key_id.clone())
            .set_tags(Some(tags.clone()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // A tenant deleted and created again: AWS keeps the name for the recovery window
            // (InvalidRequestException; moto says ResourceExistsException).
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_invalid_request_exception() || e.is_resource_exists_exception())
                    && self.scheduled_for_deletion(name).await? == Some(true) =>
            {
                self.create_over_deleted(name, version_id, value, tags).await
            }
            Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_exists_exception()) => {
                self.check_existing_version(name, version_id, value).await
            }
            Err(e) => Err(backend("CreateSecret", name, &e)),
        }
    }

    async fn put_secret_value(
        &self,
        name: &str,
        version_id: &str,
        value: &SecretString,
        stages: &[&str],
    ) -> Result<(), SecretStoreError> {
        check_version_id(version_id)?;
        // Without VersionStages AWS stages the new version AWSCURRENT, like the local store.
        let stages = (!stages.is_empty()).then(|| stages.iter().map(|s| (*s).to_owned()).collect());
        let result = self
            .client
            .put_secret_value()
            .secret_id(name)
            .client_request_token(version_id)
            .secret_string(value.expose_secret())
            .set_version_stages(stages)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                Err(SecretStoreError::NotFound(name.to_owned()))
            }
            Err(e) => Err(backend("PutSecretValue", name, &e)),
        }
    }

    async fn get_secret_value(&self, name: &str, stage: &str) -> Result<Option<SecretVersion>, SecretStoreError> {
        let result = self
            .client
            .get_secret_value()
            .secret_id(name)
            .version_stage(stage)
            .send()
            .await;
        let out = match result {
            Ok(out) => out,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                return Ok(None)
            }
            Err(e) if e.as_service_error().is_some_and(|e| e.is_invalid_request_exception()) => {
                return if self.is_gone(name).await? {
                    Ok(None)
                } else {
                    Err(backend("GetSecretValue", name, &e))
                };
            }
            Err(e) => return Err(backend("GetSecretValue", name, &e)),
        };
        let (Some(version_id), Some(value)) = (out.version_id, out.secret_string) else {
            return Err(SecretStoreError::Backend(format!(
                "GetSecretValue {name:?}: the answer has no version id or no string value"
            )));
        };
        Ok(Some(SecretVersion {
            version_id,
            stages: out.version_stages.unwrap_or_default(),
            value: SecretString::from(value),
        }))
    }

    async fn list_version_stages(&self, name: &str) -> Result<Option<Vec<VersionStages>>, SecretStoreError> {
        let out = match self.client.describe_secret().secret_id(name).send().await {
            Ok(out) => out,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(backend("DescribeSecret", name, &e)),
        };
        if out.deleted_date().is_some() {
            return Ok(None);
        }
        let mut versions: Vec<VersionStages> = out
            .version_ids_to_stages
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, stages)| !stages.is_empty())
            .map(|(version_id, stages)| VersionStages { version_id, stages })
            .collect();
        versions.sort_by(|a, b| a.version_id.cmp(&b.version_id));
        Ok(Some(versions))
    }

    async fn update_version_stage(
        &self,
        name: &str,
        stage: &str,
        to_version: Option<&str>,
        from_version: Option<&str>,
    ) -> Result<(), SecretStoreError> {
        let result = self
            .client
            .update_secret_version_stage()
            .secret_id(name)
            .version_stage(stage)
            .set_move_to_version_id(to_version.map(str::to_owned))
            .set_remove_from_version_id(from_version.map(str::to_owned))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                Err(SecretStoreError::NotFound(name.to_owned()))
            }
            Err(e) => Err(backend("UpdateSecretVersionStage", name, &e)),
        }
    }

    /// Without `force`, the secret stays recoverable for the configured recovery window (and
    /// its name stays taken); reads treat it as deleted right away.
    async fn delete_secret(&self, name: &str, force: bool) -> Result<(), SecretStoreError> {
        let request = self.client.delete_secret().secret_id(name);
        let request = if force {
            request.force_delete_without_recovery(true)
        } else {
            request.recovery_window_in_days(i64::from(self.recovery_window_days))
        };
        match request.send().await {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                Ok(())
            }
            // Already scheduled for deletion: deleting it again is done.
            Err(e) if !force && e.as_service_error().is_some_and(|e| e.is_invalid_request_exception()) => {
                if self.is_gone(name).await? {
                    Ok(())
                } else {
                    Err(backend("DeleteSecret", name, &e))
                }
            }
            Err(e) => Err(backend("DeleteSecret", name, &e)),
        }
    }
}
