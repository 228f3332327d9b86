//! Restoring a tenant in place from one of its own backups: the steps of the `restore` job,
//! for an SRE putting a tenant's data back as it was (a bad deploy, a script that deleted the
//! wrong rows). The tenant keeps its slug, name, plan, domains, server and credentials; its
//! data, API keys included, become the backup's, with any tenant migration written since
//! applied on top. It is unavailable while the job runs (routers answer 503 with
//! Retry-After):
//!
//! 1. `fence`: the catalog marks the tenant as being restored (routers close its pools and
//!    stop serving it), its login roles get a password only this job knows, and the sessions
//!    still open on its database end.
//! 2. `backup`: a backup of the database as it is now, so the restore can be undone (kept,
//!    and named in the job's progress).
//! 3. `restore`: the database is dropped, created empty and restored from the backup as the
//!    owner role, in one transaction; pending migrations are applied. If that fails, the
//!    backup of step 2 is put back the same way before the job fails.
//! 4. `unfence`: the login roles get the secret's password back and routers serve the tenant.
//!
//! Every step is idempotent: a resumed job fences again and reuses its step-2 backup. A job
//! that failed for good is undone by [`Provisioner::abandon_restore`], which serves the tenant
//! again only if its database is whole.

use serde::{Deserialize, Serialize};
use sqlx::Connection;
use tracing::{info, instrument, warn};

use crate::catalog::routes::TenantStatus;
use crate::catalog::tenants;
use crate::jobs::{self, Job};
use crate::moves::fence_database;
use crate::names::{quote_ident, TenantSlug};
use crate::provision::{
    create_database, drop_database, ensure_login_role, hand_over_database, own_public_schema, own_schema_and_migrate,
    role_exists, Placement, ProvisionError, Provisioner, StepContext,
};
use crate::secrets::DbSecret;
use crate::tenant_schema::applied_version;

/// Parameters of a `restore` job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreParams {
    /// The backup's file name, among the tenant's own.
    pub backup: String,
}

/// The steps of a `restore` job, in order.
pub const RESTORE_STEPS: [&str; 4] = ["fence", "backup", "restore", "unfence"];

impl Provisioner {
    /// Runs (or resumes) a `restore` job to completion.
    #[instrument(skip_all, fields(tenant = job.tenant.as_deref().unwrap_or(""), job = job.id))]
    pub async fn restore_tenant(&self, job: &Job) -> Result<(), ProvisionError> {
        let params = restore_params(job)?;
        let (slug, secret_name) = self.tenant_of(job)?;
        // A job resumed after its last step cleared the mark is done, and must not fence a
        // tenant already written to again. (A failed job retried by an operator, whose mark
        // `abandon_restore` cleared earlier, starts over.)
        let tenant = self.catalog_tenant(&slug).await?;
        if job.step.as_deref() == Some("unfence") && tenant.restoring_from.is_none() {
            return Ok(());
        }
        let at = self.placement_of(&tenant)?;
        let source = self.backups.fetch(&slug, &params.backup).await?.ok_or_else(|| {
            ProvisionError::InvalidJob(format!("tenant {slug} has no backup named {:?}", params.backup))
        })?;
        let login = self
            .job_step(
                job,
                "restore",
                "fence",
                self.fence_for_restore(&slug, &secret_name, &at, &params),
            )
            .await?;
        let before = self
            .job_step(
                job,
                "restore",
                "backup",
                self.backup_once(job, &slug, &secret_name, &at, Some(&login), Some(&source)),
            )
            .await?;
        self.job_step(job, "restore", "restore", async {
            let restored = self.replace_database(&at, &slug, &login, &source).await;
            if let Err(e) = &restored {
                warn!(error = %e, backup = %before.display(), "restore failed; putting the database back as it was");
                self.replace_database(&at, &slug, &login, &before).await?;
            }
            restored
        })
        .await?;
        self.job_step(job, "restore", "unfence", self.unfence(&slug, &secret_name, &at))
            .await?;
        info!(backup = %params.backup, "tenant restored");
        Ok(())
    }

    /// Undoes a `restore` job that failed for good: the tenant is served again, with the
    /// password of its secret, if its database is whole (the `restore` step puts the old one
    /// back when the backup cannot be restored); otherwise it stays unavailable and this
    /// fails, for an operator to retry the job or restore another backup.
    #[instrument(skip_all, fields(tenant = job.tenant.as_deref().unwrap_or(""), job = job.id))]
    pub async fn abandon_restore(&self, job: &Job) -> Result<(), ProvisionError> {
        let (slug, secret_name) = self.tenant_of(job)?;
        let tenant = self.catalog_tenant(&slug).await?;
        if tenant.restoring_from.is_none() {
            return Ok(());
        }
        let at = self.placement_of(&tenant)?;
        let mut conn = at
            .server
            .connect(at.names.database())
            .await
            .step("connect to tenant database")?;
        let version = applied_version(&mut conn).await;
        let _ = conn.close().await;
        match version {
            Ok(version) if version == tenant.schema_version => {}
            _ => {
                return Err(ProvisionError::InvalidJob(format!(
                    "tenant {slug}'s database is not whole (schema version {version:?}, the catalog says {})",
                    tenant.schema_version
                )))
            }
        }
        self.unfence(&slug, &secret_name, &at).await?;
        warn!("restore abandoned; the tenant is served with the data it had");
        Ok(())
    }

    /// Step `fence`: the tenant is marked as being restored, and nobody but this job uses its
    /// database. Returns the login this job uses it with.
    async fn fence_for_restore(
        &self,
        slug: &TenantSlug,
        secret_name: &str,
        at: &Placement<'_>,
        params: &RestoreParams,
    ) -> Result<DbSecret, ProvisionError> {
        let mut tx = self.catalog.begin().await.step("mark restoring")?;
        let status = tenants::lock_status(&mut tx, slug.as_str())
            .await
            .step("mark restoring")?;
        if !matches!(status, Some(TenantStatus::Active | TenantStatus::Suspended)) {
            return Err(ProvisionError::InvalidJob(format!(
                "tenant {slug} is {}: only an active or suspended tenant is restored",
                status.map_or("not in the catalog", |s| s.as_str())
            )));
        }
        if let Some(id) = jobs::lock_for_rollout(&mut tx).await.step("mark restoring")? {
            return Err(ProvisionError::InvalidJob(format!(
                "migration rollout job {id} is running; restore the tenant once it is done"
            )));
        }
        tenants::set_restoring_from(&mut tx, slug.as_str(), Some(&params.backup))
            .await
            .step("mark restoring")?;
        tx.commit().await.step("mark restoring")?;
        let current = self.current_login(secret_name).await?;
        fence_database(at.server, &at.names, current).await
    }

    /// The tenant's database dropped, created empty, open to its login roles, restored from
    /// `backup` (logged in as `login`, acting as the owner role) and migrated.
    async fn replace_database(
        &self,
        at: &Placement<'_>,
        slug: &TenantSlug,
        login: &DbSecret,
        backup: &std::path::Path,
    ) -> Result<(), ProvisionError> {
        let Placement { server, names } = at;
        let database = names.database();
        let owner = names.owner_role();
        drop_database(server, names).await?;
        create_database(server, &quote_ident(database), "template0").await?;
        let logins = {
            let mut conn = server.admin.acquire().await.step("connect to server")?;
            let mut logins = Vec::new();
            for role in names.login_roles() {
                if role_exists(&mut conn, &role).await? {
                    logins.push(role);
                }
            }
            logins
        };
        for role in &logins {
            hand_over_database(server, names, role).await?;
        }
        let mut conn = server.connect(database).await.step("connect to tenant database")?;
        own_public_schema(&mut conn, &owner).await?;
        let _ = conn.close().await;
        self.backups
            .restore(slug, &owner, backup, login, &server.config.tls)
            .await?;
        let migrations = self.migrations.load().await?;
        let mut conn = server.connect(database).await.step("connect to tenant database")?;
        let version = own_schema_and_migrate(&mut conn, &owner, &migrations).await?;
        let _ = conn.close().await;
        if version != migrations.latest_version() {
            return Err(ProvisionError::InvalidJob(format!(
                "the restored database is at schema version {version}, expected {}",
                migrations.latest_version()
            )));
        }
        self.record_schema_version(slug, version).await
    }

    /// Step `unfence`: the login role logs in with the secret's password again, and routers
    /// serve the tenant.
    async fn unfence(&self, slug: &TenantSlug, secret_name: &str, at: &Placement<'_>) -> Result<(), ProvisionError> {
        let current = self.current_login(secret_name).await?;
        let mut conn = at.server.admin.acquire().await.step("connect to server")?;
        ensure_login_role(
            &mut conn,
            &at.names,
            &current.username,
            &current.password,
            &at.server.config.tenant_roles,
        )
        .await?;
        drop(conn);
        let mut tx = self.catalog.begin().await.step("end the restore")?;
        tenants::set_restoring_from(&mut tx, slug.as_str(), None)
            .await
            .step("end the restore")?;
        tx.commit().await.step("end the restore")
    }
}

fn restore_params(job: &Job) -> Result<RestoreParams, ProvisionError> {
    serde_json::from_value(job.params.clone()).map_err(|e| ProvisionError::InvalidJob(format!("restore params: {e}")))
}
