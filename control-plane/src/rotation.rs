//! Credential rotation as the four steps of AWS's rotation protocol, as a durable job:
//!
//! 1. `create_secret`: a new version staged `AWSPENDING` (version id fixed by the job, so a
//!    re-run adds no second one);
//! 2. `set_secret`: PostgreSQL gets the pending password;
//! 3. `test_secret`: log in with the pending secret, check `current_database()` and
//!    `current_user`;
//! 4. `finish_secret`: `AWSCURRENT` moves to the new version (the old one becomes
//!    `AWSPREVIOUS`), `AWSPENDING` is removed, routers are told.
//!
//! Strategies: `single` changes the password of the one login role; `alternating` gives the
//! new password to the *other* login role, so the credentials in use stay valid until the
//! next rotation. Both login roles are members of the NOLOGIN owner role that owns every
//! object, so neither ever loses access to anything.

use serde::{Deserialize, Serialize};
use sqlx::Connection;
use tracing::{info, instrument};

use crate::catalog;
use crate::config::RotationStrategy;
use crate::jobs::{self, Job};
use crate::names::{quote_ident, TenantNames, TenantSlug};
use crate::provision::{ddl, ensure_login_role, fail_after, Placement, ProvisionError, Provisioner, StepContext};
use crate::secrets::{self, DbSecret, SecretStoreError, AWSCURRENT, AWSPENDING};
use crate::servers::{Server, ADMIN_CONNECT_TIMEOUT};

/// Parameters of a `rotate` job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotateParams {
    /// `single` or `alternating`.
    pub strategy: String,
    /// Version id of the new secret version (the ClientRequestToken).
    pub version: String,
}

impl RotateParams {
    /// Parameters for a new rotation.
    pub fn new(strategy: RotationStrategy) -> Self {
        Self {
            strategy: strategy.name().into(),
            version: uuid::Uuid::new_v4().to_string(),
        }
    }
}

/// The steps of a `rotate` job, in order.
pub const ROTATE_STEPS: [&str; 4] = ["create_secret", "set_secret", "test_secret", "finish_secret"];

impl Provisioner {
    /// Runs (or resumes) a `rotate` job to completion.
    #[instrument(skip_all, fields(tenant = job.tenant.as_deref().unwrap_or(""), job = job.id))]
    pub async fn rotate(&self, job: &Job) -> Result<(), ProvisionError> {
        let params: RotateParams = serde_json::from_value(job.params.clone())
            .map_err(|e| ProvisionError::InvalidJob(format!("bad params: {e}")))?;
        let strategy: RotationStrategy = params
            .strategy
            .parse()
            .map_err(|e: String| ProvisionError::InvalidJob(e))?;
        let (slug, secret_name) = self.tenant_of(job)?;
        let Placement { server, names } = self.placement(&slug).await?;
        for step in ROTATE_STEPS {
            self.record_step(job, step).await?;
            let started = std::time::Instant::now();
            match step {
                "create_secret" => {
                    self.create_pending(&names, &secret_name, &params.version, strategy)
                        .await?
                }
                "set_secret" => {
                    let pending = self.pending(&secret_name, &params.version).await?;
                    set_password(server, &names, &pending).await?;
                }
                "test_secret" => {
                    let pending = self.pending(&secret_name, &params.version).await?;
                    test_login(server, &names, &pending).await?;
                }
                _ => self.finish(&slug, &secret_name, &params.version).await?,
            }
            jobs::observe_step("rotate", step, started);
            fail_after("rotate", step)?;
        }
        info!(strategy = %params.strategy, "credentials rotated");
        Ok(())
    }

    /// Step `create_secret`: stage the new credentials as `AWSPENDING` under our version id,
    /// unless that version exists already (a re-run) or is already current (finished).
    async fn create_pending(
        &self,
        names: &TenantNames,
        secret_name: &str,
        version: &str,
        strategy: RotationStrategy,
    ) -> Result<(), ProvisionError> {
        let stages = self
            .store
            .list_version_stages(secret_name)
            .await?
            .ok_or_else(|| SecretStoreError::NotFound(secret_name.to_owned()))?;
        if stages.iter().any(|v| v.version_id == version) {
            return Ok(());
        }
        let current = self.current(secret_name).await?;
        let username = match strategy {
            RotationStrategy::Single => current.username.clone(),
            RotationStrategy::Alternating => {
                let [a, b] = names.login_roles();
                if current.username == a {
                    b
                } else {
                    a
                }
            }
        };
        let pending = DbSecret {
            username,
            password: secrets::generate_password(),
            ..current
        };
        // Staging AWSPENDING on our version takes it off any version a dead rotation left.
        self.store
            .put_secret_value(secret_name, version, &pending.to_secret_string(), &[AWSPENDING])
            .await?;
        Ok(())
    }

    async fn current(&self, secret_name: &str) -> Result<DbSecret, ProvisionError> {
        let v = self
            .store
            .get_secret_value(secret_name, AWSCURRENT)
            .await?
            .ok_or_else(|| SecretStoreError::NotFound(secret_name.to_owned()))?;
        Ok(DbSecret::from_secret(&v.value, secret_name)?)
    }

    /// Our pending version: staged `AWSPENDING`, or already `AWSCURRENT` when a re-run
    /// finds the rotation finished.
    async fn pending(&self, secret_name: &str, version: &str) -> Result<DbSecret, ProvisionError> {
        for stage in [AWSPENDING, AWSCURRENT] {
            if let Some(v) = self.store.get_secret_value(secret_name, stage).await? {
                if v.version_id == version {
                    return Ok(DbSecret::from_secret(&v.value, secret_name)?);
                }
            }
        }
        Err(ProvisionError::InvalidJob(format!(
            "version {version} of {secret_name} is neither pending nor current: another rotation replaced it"
        )))
    }

    /// Step `finish_secret`: `AWSCURRENT` to our version (the store puts `AWSPREVIOUS` on the
    /// old one), `AWSPENDING` removed, rotation time recorded, routers told.
    async fn finish(&self, slug: &TenantSlug, secret_name: &str, version: &str) -> Result<(), ProvisionError> {
        let stages = self
            .store
            .list_version_stages(secret_name)
            .await?
            .ok_or_else(|| SecretStoreError::NotFound(secret_name.to_owned()))?;
        let current = stages.iter().find(|v| v.stages.iter().any(|s| s == AWSCURRENT));
        if current.is_none_or(|c| c.version_id != version) {
            let from = current.map(|c| c.version_id.clone());
            self.store
                .update_version_stage(secret_name, AWSCURRENT, Some(version), from.as_deref())
                .await?;
        }
        if stages
            .iter()
            .any(|v| v.version_id == version && v.stages.iter().any(|s| s == AWSPENDING))
        {
            self.store
                .update_version_stage(secret_name, AWSPENDING, None, Some(version))
                .await?;
        }
        let mut tx = self.catalog.begin().await.step("record rotation")?;
        sqlx::query("UPDATE tenants SET credentials_rotated_at = now(), updated_at = now() WHERE slug = $1")
            .bind(slug.as_str())
            .execute(&mut *tx)
            .await
            .step("record rotation")?;
        catalog::notify_tenant_changed(&mut *tx, slug.as_str())
            .await
            .step("record rotation")?;
        tx.commit().await.step("record rotation")
    }
}

/// Step `set_secret`: the pending login role exists, has the pending password, and may
/// connect to the tenant database.
async fn set_password(server: &Server, names: &TenantNames, pending: &DbSecret) -> Result<(), ProvisionError> {
    let mut conn = server.admin.acquire().await.step("connect to server")?;
    ensure_login_role(
        &mut conn,
        names,
        &pending.username,
        &pending.password,
        &server.config.tenant_roles,
    )
    .await?;
    ddl(
        &mut conn,
        &format!(
            "GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}",
            quote_ident(names.database()),
            quote_ident(&pending.username)
        ),
        "grant connect to login role",
    )
    .await
}

/// Step `test_secret`: the pending secret logs in, to the right database, as the right role
/// (`session_user`), acting as the tenant's owner role (`current_user`).
pub(crate) async fn test_login(server: &Server, names: &TenantNames, pending: &DbSecret) -> Result<(), ProvisionError> {
    let mut conn = silo_tenant_app::connect(&pending.connect_options(&server.config.tls), ADMIN_CONNECT_TIMEOUT)
        .await
        .step("log in with the pending secret")?;
    let (db, login, acting): (String, String, String) =
        sqlx::query_as("SELECT current_database()::text, session_user::text, current_user::text")
            .fetch_one(&mut conn)
            .await
            .step("check the pending login")?;
    let _ = conn.close().await;
    let owner = names.owner_role();
    if db != pending.dbname || login != pending.username || acting != owner {
        return Err(ProvisionError::InvalidJob(format!(
            "pending secret logged in as {login} (acting as {acting}) to {db}, expected {} as {owner} to {}",
            pending.username, pending.dbname
        )));
    }
    Ok(())
}
