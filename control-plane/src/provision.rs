//! Provisioning and deletion of a tenant: the steps of the `provision` and `delete` jobs.
//!
//! Every step first looks at what already exists (secret staged? role there? database
//! there? migrations applied? key inserted?) and only does what is missing, so a job re-run
//! after a crash or a failure between any two steps converges to the same tenant, with no
//! orphaned database or role.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection, PgPool};
use tracing::{info, instrument, warn};

use crate::audit;
use crate::backup::{retention, Backups};
use crate::catalog::routes::TenantStatus;
use crate::catalog::tenants;
use crate::config::TenantRoleLimits;
use crate::jobs::{self, Job};
use crate::names::{quote_ident, quote_literal, TenantNames, TenantSlug};
use crate::secrets::{self, DbSecret, SecretStore, AWSCURRENT};
use crate::servers::{Server, Servers};
use crate::tenant_schema::{MigrationSource, TenantMigrations};
use crate::{spares, template};

/// Why a provisioning or deletion step failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The job row is not usable (bad params, unknown tenant).
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// The tenant's server is not configured any more.
    #[error("server {0:?} is not configured")]
    UnknownServer(String),
    /// A PostgreSQL or catalog statement failed.
    #[error("{step}: {source}")]
    Database {
        /// What we were doing.
        step: &'static str,
        /// The database error.
        source: sqlx::Error,
    },
    /// Applying tenant migrations failed.
    #[error("apply tenant migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The secret store failed.
    #[error("secret store: {0}")]
    Secret(#[from] secrets::SecretStoreError),
    /// The backup before a deletion could not be taken (nothing was dropped).
    #[error("backup: {0}")]
    Backup(#[from] crate::backup::BackupError),
    /// A migration rollout failed or halted.
    #[error("{0}")]
    Rollout(String),
    /// This run of the job stalled past its lease and another worker holds the job now; the
    /// run stops at its next step.
    #[error("job {0} was taken over by another worker when this run's lease expired")]
    Superseded(i64),
    /// A fail point interrupted the job (tests only).
    #[error("interrupted after step {0} (fail point)")]
    Interrupted(String),
}

impl ProvisionError {
    /// Whether the same job may succeed later with nobody changing anything: a database or
    /// the secret store was unreachable, restarting, overloaded, or lost a lock race.
    pub fn is_transient(&self) -> bool {
        match self {
            ProvisionError::Database { source, .. } => is_transient(source),
            ProvisionError::Migrate(sqlx::migrate::MigrateError::Execute(source)) => is_transient(source),
            ProvisionError::Secret(secrets::SecretStoreError::Backend(_)) => true,
            ProvisionError::Backup(e) => e.is_transient(),
            _ => false,
        }
    }

    /// Whether PostgreSQL refused a login's password: one changed under the job (an admin
    /// password rotated in the secret store, a tenant's rotated by another job).
    pub fn is_login_refused(&self) -> bool {
        matches!(self, ProvisionError::Database { source, .. } if is_login_refused(source))
    }
}

fn is_login_refused(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("28P01"))
}

fn is_transient(error: &sqlx::Error) -> bool {
    use sqlx::Error as E;
    if is_login_refused(error) {
        // The worker reads the admin passwords again before the job runs again.
        return true;
    }
    match error {
        E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::Tls(_) | E::WorkerCrashed => true,
        E::Database(db) => db.code().is_some_and(|code| {
            // Class 08: connection exception; 53: insufficient resources (too many
            // connections, ...); shutdown and restart; serialization failure, deadlock,
            // lock not available.
            code.starts_with("08")
                || code.starts_with("53")
                || matches!(&*code, "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "55P03")
        }),
        _ => false,
    }
}

pub(crate) trait StepContext<T> {
    fn step(self, step: &'static str) -> Result<T, ProvisionError>;
}

impl<T> StepContext<T> for Result<T, sqlx::Error> {
    fn step(self, step: &'static str) -> Result<T, ProvisionError> {
        self.map_err(|source| ProvisionError::Database { step, source })
    }
}

/// Parameters of a `provision` job, fixed when the tenant is created.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProvisionParams {
    /// Name of the first API key.
    pub api_key_name: String,
    /// SHA-256 of the first API key, hex (the key itself was shown once and is gone).
    pub api_key_hash: String,
    /// Version id of the first secret version, so a retried step does not add another.
    pub secret_version: String,
    /// A backup of this tenant (file name in its backup directory) the database is restored
    /// from, instead of starting empty; pending migrations are applied after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<String>,
    /// The admin token that asked for the tenant: the actor of what the job audits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
}

/// Parameters of a `delete` job.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeleteParams {
    /// Take a backup of the database before anything is dropped.
    #[serde(default)]
    pub backup: bool,
}

/// The steps of a `provision` job, in order.
pub const PROVISION_STEPS: [&str; 5] = ["secret", "roles", "database", "schema", "activate"];
/// The steps of a `delete` job, in order; `backup` only when the job asks for one.
pub const DELETE_STEPS: [&str; 5] = ["backup", "database", "roles", "secret", "tombstone"];
/// SQLSTATE of a role (or other object) that does not exist.
const UNDEFINED_OBJECT: &str = "42704";

/// Where a tenant lives: its server, and its database and roles there.
pub(crate) struct Placement<'a> {
    /// The server holding its database.
    pub server: &'a Server,
    /// Its database and roles, as the catalog records them.
    pub names: TenantNames,
}

/// Runs the steps of tenant jobs: provisioning and deletion here, rotation in `rotation`.
pub struct Provisioner {
    pub(crate) catalog: PgPool,
    pub(crate) store: Arc<dyn SecretStore>,
    pub(crate) servers: Arc<Servers>,
    pub(crate) migrations: MigrationSource,
    name_prefix: String,
    templates: bool,
    /// Notified when a spare database was claimed (`spares::keep_filled` makes another);
    /// None when spares are off.
    spares: Option<Arc<tokio::sync::Notify>>,
    pub(crate) backups: Backups,
}

impl Provisioner {
    /// A provisioner over these parts. With `templates`, new databases are copied from a
    /// template; with `spares` too, taken from the spare databases when there are some.
    pub fn new(
        catalog: PgPool,
        store: Arc<dyn SecretStore>,
        servers: Arc<Servers>,
        migrations: MigrationSource,
        name_prefix: String,
        templates: bool,
        spares: Option<Arc<tokio::sync::Notify>>,
    ) -> Self {
        Self {
            catalog,
            store,
            servers,
            migrations,
            name_prefix,
            templates,
            spares: spares.filter(|_| templates),
            backups: Backups::off(),
        }
    }

    /// This provisioner, taking the backups `delete` jobs ask for with `backups`.
    pub fn with_backups(mut self, backups: Backups) -> Self {
        self.backups = backups;
        self
    }

    pub(crate) fn tenant_of(&self, job: &Job) -> Result<(TenantSlug, String), ProvisionError> {
        let slug = job
            .tenant
            .as_deref()
            .and_then(|s| TenantSlug::parse(s).ok())
            .ok_or_else(|| ProvisionError::InvalidJob("job has no valid tenant".into()))?;
        Ok((slug.clone(), secrets::tenant_secret_name(&self.name_prefix, &slug)))
    }

    /// The tenant's current login, from its secret.
    pub(crate) async fn current_login(&self, secret_name: &str) -> Result<DbSecret, ProvisionError> {
        let current = self
            .store
            .get_secret_value(secret_name, AWSCURRENT)
            .await?
            .ok_or_else(|| ProvisionError::InvalidJob(format!("secret {secret_name} has no current version")))?;
        Ok(DbSecret::from_secret(&current.value, secret_name)?)
    }

    /// The tenant as the catalog has it.
    pub(crate) async fn catalog_tenant(&self, slug: &TenantSlug) -> Result<tenants::Tenant, ProvisionError> {
        let mut conn = self.catalog.acquire().await.step("read tenant")?;
        tenants::get(&mut conn, slug.as_str())
            .await
            .step("read tenant")?
            .ok_or_else(|| ProvisionError::InvalidJob(format!("tenant {slug} is not in the catalog")))
    }

    /// Where `slug` lives, as the catalog says.
    pub(crate) async fn placement(&self, slug: &TenantSlug) -> Result<Placement<'_>, ProvisionError> {
        self.placement_of(&self.catalog_tenant(slug).await?)
    }

    /// Where `tenant`, read from the catalog, lives.
    pub(crate) fn placement_of(&self, tenant: &tenants::Tenant) -> Result<Placement<'_>, ProvisionError> {
        let server = self
            .servers
            .get(&tenant.server)
            .ok_or_else(|| ProvisionError::UnknownServer(tenant.server.clone()))?;
        Ok(Placement {
            server,
            names: TenantNames::of_database(tenant.database.clone()),
        })
    }

    /// Runs (or resumes) a `provision` job to completion.
    #[instrument(skip_all, fields(tenant = job.tenant.as_deref().unwrap_or(""), job = job.id))]
    pub async fn provision(&self, job: &Job) -> Result<(), ProvisionError> {
        let params: ProvisionParams = serde_json::from_value(job.params.clone())
            .map_err(|e| ProvisionError::InvalidJob(format!("bad params: {e}")))?;
        let (slug, secret_name) = self.tenant_of(job)?;
        let Placement { server, mut names } = self.placement(&slug).await?;
        let migrations = self.migrations.load().await?;
        {
            let mut tx = self.catalog.begin().await.step("mark provisioning")?;
            tenants::set_status(&mut tx, slug.as_str(), TenantStatus::Provisioning, None)
                .await
                .step("mark provisioning")?;
            tx.commit().await.step("mark provisioning")?;
        }
        for step in PROVISION_STEPS {
            self.record_step(job, step).await?;
            let started = std::time::Instant::now();
            match step {
                "secret" => {
                    names = self
                        .ensure_secret(server, &slug, &names, &secret_name, &params.secret_version)
                        .await?
                }
                "roles" => self.ensure_roles(server, &names, &secret_name).await?,
                "database" => {
                    // A restore needs an empty database; templates and spares have tables.
                    let copies = self.templates && params.restore_from.is_none();
                    let found = ensure_database(
                        server,
                        &names,
                        copies.then_some(&migrations),
                        self.spares.as_deref().filter(|_| copies),
                    )
                    .await?;
                    // Found, and no earlier run of this job reached this step: it was there
                    // before the job, so it is adopted.
                    if found && !job.steps_started.iter().any(|s| s == "database") {
                        self.record_adoption(job, &slug, server, &names, &params).await?;
                    }
                }
                "schema" => {
                    self.ensure_schema(server, &slug, &names, &secret_name, &migrations, &params)
                        .await?
                }
                _ => self.activate(&slug).await?,
            }
            jobs::observe_step("provision", step, started);
            fail_after("provision", step)?;
        }
        info!("tenant provisioned");
        Ok(())
    }

    /// Step `secret`: the tenant's credentials exist in the store (generated once, for the
    /// database `names`). Returns the names of the database they log in to.
    async fn ensure_secret(
        &self,
        server: &Server,
        slug: &TenantSlug,
        names: &TenantNames,
        secret_name: &str,
        version: &str,
    ) -> Result<TenantNames, ProvisionError> {
        if let Some(current) = self.store.get_secret_value(secret_name, AWSCURRENT).await? {
            let secret = DbSecret::from_secret(&current.value, secret_name)?;
            return self.adopt_secret_database(slug, names, &secret).await;
        }
        let secret = DbSecret {
            engine: "postgres".into(),
            host: server.config.host.clone(),
            port: server.config.port,
            username: names.login_role(),
            password: secrets::generate_password(),
            dbname: names.database().to_owned(),
        };
        self.store
            .create_secret(
                secret_name,
                version,
                &secret.to_secret_string(),
                &[("silo:tenant", slug.as_str())],
            )
            .await?;
        sqlx::query("UPDATE tenants SET credentials_rotated_at = now() WHERE slug = $1")
            .bind(slug.as_str())
            .execute(&self.catalog)
            .await
            .step("record credentials time")?;
        Ok(names.clone())
    }

    /// The names of the database `secret`, the tenant's credentials from before this job,
    /// logs in to. They differ from the catalog's `names` for a tenant created again over its
    /// own database after the catalog was restored from a backup that derives other names (one
    /// taken before names were derived from a key, or under another key): the catalog then
    /// records the secret's database. Refused when the secret names no tenant database and
    /// login role, or a database another tenant of the catalog has.
    async fn adopt_secret_database(
        &self,
        slug: &TenantSlug,
        names: &TenantNames,
        secret: &DbSecret,
    ) -> Result<TenantNames, ProvisionError> {
        if secret.dbname == names.database() {
            return Ok(names.clone());
        }
        let Some(theirs) = TenantNames::of_tenant_database(&secret.dbname)
            .filter(|theirs| theirs.login_roles().contains(&secret.username))
        else {
            return Err(ProvisionError::InvalidJob(format!(
                "the tenant's secret names database {:?} and login role {:?}, which silo does not make for a tenant",
                secret.dbname, secret.username
            )));
        };
        let adopted = sqlx::query(
            "UPDATE tenants SET database = $2, updated_at = now() WHERE slug = $1 AND NOT EXISTS \
             (SELECT 1 FROM tenants WHERE database = $2 AND slug <> $1 AND status <> 'deleted')",
        )
        .bind(slug.as_str())
        .bind(&secret.dbname)
        .execute(&self.catalog)
        .await
        .step("adopt the secret's database")?
        .rows_affected();
        if adopted == 0 {
            return Err(ProvisionError::InvalidJob(format!(
                "the tenant's secret names database {:?}, which is another tenant's",
                secret.dbname
            )));
        }
        info!(database = %secret.dbname, "the tenant's secret names its database: the catalog records it");
        Ok(theirs)
    }

    /// Audits that the tenant's provisioning adopted a database already on `server` (a
    /// tenant created again after the catalog was restored from an older backup), with its
    /// data and API keys.
    async fn record_adoption(
        &self,
        job: &Job,
        slug: &TenantSlug,
        server: &Server,
        names: &TenantNames,
        params: &ProvisionParams,
    ) -> Result<(), ProvisionError> {
        warn!(
            database = names.database(),
            "the tenant's database was already there: adopted with its data"
        );
        let mut tx = self.catalog.begin().await.step("audit the adopted database")?;
        audit::record(
            &mut tx,
            params.requested_by.as_deref().unwrap_or("unknown"),
            "tenant.database.adopt",
            Some(slug.as_str()),
            serde_json::json!({"server": server.config.name, "database": names.database(), "job": job.id}),
        )
        .await
        .step("audit the adopted database")?;
        tx.commit().await.step("audit the adopted database")
    }

    /// Step `roles`: the NOLOGIN owner role and the login role (member of the owner, with the
    /// stored password; re-set on a retry so role and secret always agree).
    async fn ensure_roles(
        &self,
        server: &Server,
        names: &TenantNames,
        secret_name: &str,
    ) -> Result<(), ProvisionError> {
        let version = self
            .store
            .get_secret_value(secret_name, AWSCURRENT)
            .await?
            .ok_or_else(|| secrets::SecretStoreError::NotFound(secret_name.to_owned()))?;
        let secret = DbSecret::from_secret(&version.value, secret_name)?;
        let mut conn = server.admin.acquire().await.step("connect to server")?;
        ensure_owner_role(&mut conn, names).await?;
        ensure_login_role(
            &mut conn,
            names,
            &secret.username,
            &secret.password,
            &server.config.tenant_roles,
        )
        .await?;
        Ok(())
    }

    /// Step `schema`: everything in the database (copied from a template, or not) belongs
    /// to the tenant's owner, PUBLIC may not create in `public`, pending migrations are
    /// applied as the owner, the version is checked and recorded, and the first API key's
    /// hash is stored — all on one connection (the first to a new database is the costly one).
    async fn ensure_schema(
        &self,
        server: &Server,
        slug: &TenantSlug,
        names: &TenantNames,
        secret_name: &str,
        migrations: &TenantMigrations,
        params: &ProvisionParams,
    ) -> Result<(), ProvisionError> {
        let key_hash: [u8; 32] = hex::decode(&params.api_key_hash)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| ProvisionError::InvalidJob("bad api key hash".into()))?;
        let owner = quote_ident(&names.owner_role());
        let mut conn = server
            .connect(names.database())
            .await
            .step("connect to tenant database")?;
        // What was copied from a template or a spare belongs to the template owner; without
        // that role (templates never built) there is nothing to hand over.
        let from = quote_ident(template::TEMPLATE_OWNER);
        match ddl(
            &mut conn,
            &format!("REASSIGN OWNED BY {from} TO {owner}"),
            "hand template objects to owner",
        )
        .await
        {
            Err(ProvisionError::Database {
                source: sqlx::Error::Database(e),
                ..
            }) if e.code().as_deref() == Some(UNDEFINED_OBJECT) => {}
            other => other?,
        }
        if let Some(name) = &params.restore_from {
            self.restore_into(server, slug, names, secret_name, name, &mut conn)
                .await?;
        }
        let version = own_schema_and_migrate(&mut conn, &names.owner_role(), migrations).await?;
        if version != migrations.latest_version() {
            return Err(ProvisionError::InvalidJob(format!(
                "tenant database is at schema version {version}, expected {}",
                migrations.latest_version()
            )));
        }
        insert_key_as_owner(&mut conn, names, &params.api_key_name, &key_hash).await?;
        let _ = conn.close().await;
        self.record_schema_version(slug, version).await
    }

    /// The catalog says `slug`'s database is at schema `version`.
    pub(crate) async fn record_schema_version(&self, slug: &TenantSlug, version: i64) -> Result<(), ProvisionError> {
        sqlx::query("UPDATE tenants SET schema_version = $2, updated_at = now() WHERE slug = $1")
            .bind(slug.as_str())
            .bind(version)
            .execute(&self.catalog)
            .await
            .step("record schema version")?;
        Ok(())
    }

    /// Records that `job` reached `step`, unless this run lost the job to another worker.
    pub(crate) async fn record_step(&self, job: &Job, step: &str) -> Result<(), ProvisionError> {
        if jobs::set_step(&self.catalog, job, step).await.step("record step")? {
            Ok(())
        } else {
            Err(ProvisionError::Superseded(job.id))
        }
    }

    /// Records `step` of `job` (a `kind` job), runs `work`, and times it; fail point
    /// `{kind}-after-step` may stop the job after it (tests).
    pub(crate) async fn job_step<T>(
        &self,
        job: &Job,
        kind: &'static str,
        step: &'static str,
        work: impl std::future::Future<Output = Result<T, ProvisionError>>,
    ) -> Result<T, ProvisionError> {
        self.record_step(job, step).await?;
        let started = std::time::Instant::now();
        let out = work.await?;
        jobs::observe_step(kind, step, started);
        fail_after(kind, step)?;
        stall_after(kind, step).await;
        Ok(out)
    }

    /// Part of step `schema` for a tenant created from a backup: the backup `name` of this
    /// tenant restored into its new, empty database (`conn`, an admin session there) as its
    /// owner role. `pg_restore` runs in one transaction, so a database that has silo's
    /// migration table was restored completely, and a resumed job leaves it as it is.
    async fn restore_into(
        &self,
        server: &Server,
        slug: &TenantSlug,
        names: &TenantNames,
        secret_name: &str,
        name: &str,
        conn: &mut PgConnection,
    ) -> Result<(), ProvisionError> {
        let restored: bool = sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL")
            .fetch_one(&mut *conn)
            .await
            .step("look for a restored schema")?;
        if restored {
            return Ok(());
        }
        let file = self
            .backups
            .fetch(slug, name)
            .await?
            .ok_or_else(|| ProvisionError::InvalidJob(format!("tenant {slug} has no backup named {name:?}")))?;
        let owner = names.owner_role();
        own_public_schema(conn, &owner).await?;
        let login = self.current_login(secret_name).await?;
        self.backups
            .restore(slug, &owner, &file, &login, &server.config.tls)
            .await?;
        info!(backup = %file.display(), "tenant database restored from a backup");
        Ok(())
    }

    /// Step `activate`: the tenant is served.
    async fn activate(&self, slug: &TenantSlug) -> Result<(), ProvisionError> {
        let mut tx = self.catalog.begin().await.step("activate")?;
        tenants::set_status(&mut tx, slug.as_str(), TenantStatus::Active, None)
            .await
            .step("activate")?;
        tx.commit().await.step("activate")
    }

    /// Runs (or resumes) a `backup` job: a backup of the tenant's database, taken while it
    /// keeps serving (`pg_dump` reads one consistent snapshot).
    #[instrument(skip_all, fields(tenant = job.tenant.as_deref().unwrap_or(""), job = job.id))]
    pub async fn back_up(&self, job: &Job) -> Result<(), ProvisionError> {
        let (slug, secret_name) = self.tenant_of(job)?;
        let at = self.placement(&slug).await?;
        self.record_step(job, "backup").await?;
        let started = std::time::Instant::now();
        self.backup_once(job, &slug, &secret_name, &at, None, None).await?;
        jobs::observe_step("backup", "backup", started);
        Ok(())
    }

    /// The backup of the tenant's database job `job` took in an earlier run, or one taken now,
    /// logged in with `login` (default: the tenant's current login); recorded in the job's
    /// progress as `backup`. `[backups] keep_last` leaves the backup `spare` alone.
    pub(crate) async fn backup_once(
        &self,
        job: &Job,
        slug: &TenantSlug,
        secret_name: &str,
        at: &Placement<'_>,
        login: Option<&DbSecret>,
        spare: Option<&std::path::Path>,
    ) -> Result<std::path::PathBuf, ProvisionError> {
        let file = match self.backups.taken(slug, job.id)? {
            Some(file) => file,
            None => {
                let current;
                let login = match login {
                    Some(login) => login,
                    None => {
                        current = self.current_login(secret_name).await?;
                        &current
                    }
                };
                let file = self
                    .backups
                    .take(slug, &at.names.owner_role(), job.id, login, &at.server.config.tls)
                    .await?;
                info!(file = %file.display(), "tenant database backed up");
                // The new backup is taken whatever happens to the old ones.
                if let Err(e) = retention::keep_last(&self.catalog, &self.backups, slug, spare).await {
                    warn!(error = %e, "backups beyond [backups] keep_last not erased; erased after the next backup");
                }
                file
            }
        };
        jobs::set_progress(&self.catalog, job, &serde_json::json!({ "backup": file }))
            .await
            .step("record the backup")?;
        Ok(file)
    }

    /// Runs (or resumes) a `delete` job: a backup of the database if the job asks for one,
    /// then the database (its sessions terminated), the roles and the secret are dropped;
    /// the catalog keeps a `deleted` tombstone.
    #[instrument(skip_all, fields(tenant = job.tenant.as_deref().unwrap_or(""), job = job.id))]
    pub async fn delete(&self, job: &Job, force_secret_delete: bool) -> Result<(), ProvisionError> {
        let params: DeleteParams = serde_json::from_value(job.params.clone())
            .map_err(|e| ProvisionError::InvalidJob(format!("delete params: {e}")))?;
        let (slug, secret_name) = self.tenant_of(job)?;
        let at = self.placement(&slug).await?;
        for step in DELETE_STEPS
            .into_iter()
            .filter(|step| params.backup || *step != "backup")
        {
            self.record_step(job, step).await?;
            let started = std::time::Instant::now();
            match step {
                // A resumed job finds its backup (the database and secret may be gone).
                "backup" => {
                    self.backup_once(job, &slug, &secret_name, &at, None, None).await?;
                }
                "database" => drop_database(at.server, &at.names).await?,
                "roles" => drop_roles(at.server, &at.names).await?,
                "secret" => self.store.delete_secret(&secret_name, force_secret_delete).await?,
                _ => {
                    let mut tx = self.catalog.begin().await.step("tombstone")?;
                    sqlx::query("DELETE FROM tenant_domains WHERE slug = $1")
                        .bind(slug.as_str())
                        .execute(&mut *tx)
                        .await
                        .step("tombstone")?;
                    tenants::set_status(&mut tx, slug.as_str(), TenantStatus::Deleted, None)
                        .await
                        .step("tombstone")?;
                    tx.commit().await.step("tombstone")?;
                }
            }
            jobs::observe_step("delete", step, started);
            fail_after("delete", step)?;
        }
        info!("tenant deleted");
        Ok(())
    }
}

/// Step `database`: the tenant's database exists, owned by its owner role, closed to
/// `PUBLIC`, open to its login role. Taken from the server's spares when there is one, else
/// copied from the template (or created empty when templates are off or not ready). True if
/// it was there already.
async fn ensure_database(
    server: &Server,
    names: &TenantNames,
    template_of: Option<&TenantMigrations>,
    spares_claimed: Option<&tokio::sync::Notify>,
) -> Result<bool, ProvisionError> {
    let name = names.database();
    let db = quote_ident(name);
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&server.admin)
        .await
        .step("look up database")?;
    if !exists {
        let source = match (template_of, spares_claimed) {
            (Some(migrations), Some(claimed)) if spares::claim(server, migrations, name).await? => {
                claimed.notify_one();
                "spare"
            }
            (Some(migrations), _) => match template::ensure(server, migrations).await {
                Ok(template) => {
                    create_database(server, &db, &template).await?;
                    "template"
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no tenant template; creating an empty database and migrating it");
                    create_database(server, &db, "template0").await?;
                    "empty"
                }
            },
            (None, _) => {
                create_database(server, &db, "template0").await?;
                "empty"
            }
        };
        metrics::counter!("silo_tenant_databases_created_total", "source" => source).increment(1);
    }
    hand_over_database(server, names, &names.login_role()).await?;
    Ok(exists)
}

/// The tenant's database on `server` belongs to its owner role, is closed to `PUBLIC` and
/// open to login role `login`.
pub(crate) async fn hand_over_database(
    server: &Server,
    names: &TenantNames,
    login: &str,
) -> Result<(), ProvisionError> {
    let db = quote_ident(names.database());
    let mut conn = server.admin.acquire().await.step("connect to server")?;
    ddl(
        &mut conn,
        &format!("ALTER DATABASE {db} OWNER TO {}", quote_ident(&names.owner_role())),
        "hand database to owner role",
    )
    .await?;
    ddl(
        &mut conn,
        &format!("REVOKE ALL ON DATABASE {db} FROM PUBLIC"),
        "revoke connect from public",
    )
    .await?;
    ddl(
        &mut conn,
        &format!("GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {}", quote_ident(login)),
        "grant connect to login role",
    )
    .await
}

/// The tenant's database is gone from `server` (its sessions terminated).
pub(crate) async fn drop_database(server: &Server, names: &TenantNames) -> Result<(), ProvisionError> {
    let mut conn = server.admin.acquire().await.step("connect to server")?;
    ddl(
        &mut conn,
        &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(names.database())),
        "drop database",
    )
    .await
}

/// The tenant's login roles and owner role are gone from `server` (its database must be).
pub(crate) async fn drop_roles(server: &Server, names: &TenantNames) -> Result<(), ProvisionError> {
    let mut conn = server.admin.acquire().await.step("connect to server")?;
    let [login, alternate] = names.login_roles();
    for role in [login, alternate, names.owner_role()] {
        ddl(
            &mut conn,
            &format!("DROP ROLE IF EXISTS {}", quote_ident(&role)),
            "drop role",
        )
        .await?;
    }
    Ok(())
}

pub(crate) async fn create_database(server: &Server, db: &str, template: &str) -> Result<(), ProvisionError> {
    let mut conn = server.admin.acquire().await.step("connect to server")?;
    ddl(
        &mut conn,
        &format!("CREATE DATABASE {db} TEMPLATE {}", quote_ident(template)),
        "create database",
    )
    .await
}

/// Inserts an API key hash into a tenant database as its owner role. Idempotent by name.
pub async fn insert_key_as_owner(
    conn: &mut PgConnection,
    names: &TenantNames,
    name: &str,
    hash: &[u8; 32],
) -> Result<(), ProvisionError> {
    ddl(
        conn,
        &format!("SET ROLE {}", quote_ident(&names.owner_role())),
        "assume owner role",
    )
    .await?;
    silo_tenant_app::api_keys::insert(&mut *conn, name, hash)
        .await
        .step("insert api key")?;
    ddl(conn, "RESET ROLE", "reset role").await
}

/// Gives the `public` schema to `owner_role`, closes it to PUBLIC and applies every pending
/// migration as `owner_role` (a tenant's owner, or the template owner).
pub(crate) async fn own_schema_and_migrate(
    conn: &mut PgConnection,
    owner_role: &str,
    migrations: &TenantMigrations,
) -> Result<i64, ProvisionError> {
    own_public_schema(conn, owner_role).await?;
    Ok(migrations.apply(conn, owner_role, None).await?)
}

/// The `public` schema of the database `conn` is in belongs to `owner_role`, and `PUBLIC`
/// may not use it.
pub(crate) async fn own_public_schema(conn: &mut PgConnection, owner_role: &str) -> Result<(), ProvisionError> {
    ddl(
        conn,
        &format!(
            "ALTER SCHEMA public OWNER TO {}; REVOKE ALL ON SCHEMA public FROM PUBLIC",
            quote_ident(owner_role)
        ),
        "own public schema",
    )
    .await
}

/// The tenant's NOLOGIN owner role exists.
pub(crate) async fn ensure_owner_role(conn: &mut PgConnection, names: &TenantNames) -> Result<(), ProvisionError> {
    let owner = names.owner_role();
    if role_exists(conn, &owner).await? {
        return Ok(());
    }
    ddl(
        conn,
        &create_role_sql(&owner, "NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"),
        "create owner role",
    )
    .await
}

/// `CREATE ROLE` for a role silo manages, with the admin role made a member of it. Managed
/// PostgreSQL services give silo a `CREATEDB CREATEROLE` role rather than a superuser, and
/// only a member of a role may give it a database, act as it or end its sessions.
pub(crate) fn create_role_sql(role: &str, attributes: &str) -> String {
    let role = quote_ident(role);
    format!("CREATE ROLE {role} {attributes};\nGRANT {role} TO CURRENT_USER")
}

/// Creates login role `role` of the tenant, or resets it: login allowed with `password`, no
/// privileges of its own, member of the tenant's owner role and acting as it (so it can use
/// every object the owner has, whichever login role is current), held to its server's
/// `limits`.
pub(crate) async fn ensure_login_role(
    conn: &mut PgConnection,
    names: &TenantNames,
    role: &str,
    password: &secrecy::SecretString,
    limits: &TenantRoleLimits,
) -> Result<(), ProvisionError> {
    if !names.login_roles().iter().any(|r| r == role) {
        return Err(ProvisionError::InvalidJob(format!(
            "{role:?} is not a login role of the tenant of database {}",
            names.database()
        )));
    }
    let login = quote_ident(role);
    // A verifier, never the password itself: PostgreSQL may log this statement.
    let password = quote_literal(&crate::scram::verifier(password));
    // Only a superuser may name SUPERUSER, REPLICATION or BYPASSRLS in an ALTER ROLE, even
    // to deny them, so an existing role is checked for them instead.
    let privileged: Option<bool> =
        sqlx::query_scalar("SELECT rolsuper OR rolreplication OR rolbypassrls FROM pg_roles WHERE rolname = $1")
            .bind(role)
            .fetch_optional(&mut *conn)
            .await
            .step("look up login role")?;
    let (verb, attrs) = match privileged {
        None => (
            "CREATE",
            "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT",
        ),
        Some(false) => ("ALTER", "LOGIN NOCREATEDB NOCREATEROLE INHERIT"),
        Some(true) => {
            return Err(ProvisionError::InvalidJob(format!(
                "login role {role} has SUPERUSER, REPLICATION or BYPASSRLS, which silo never grants; \
                 refusing to use it"
            )))
        }
    };
    let owner = names.owner_role();
    // One batch: the password, membership in the owner, and acting as the owner, so
    // whatever the app creates belongs to the owner and stays usable by both login roles
    // across alternating rotations; the admin role's membership lets it end the role's
    // sessions without being a superuser (see `create_role_sql`). The server's limits are
    // set (or lifted) every time: the role follows the config as it is now.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "{verb} ROLE {login} {attrs} PASSWORD {password};\n\
         GRANT {login} TO CURRENT_USER;\n\
         GRANT {} TO {login};\n\
         ALTER ROLE {login} SET role = {};\n\
         {}",
        quote_ident(&owner),
        quote_literal(&owner),
        role_limits_sql(role, limits)
    )))
    .execute(&mut *conn)
    .await
    .step("set up login role")?;
    Ok(())
}

/// A duration as a role setting's value, as PostgreSQL keeps it in `rolconfig` (`60000ms`).
pub(crate) fn setting_value(duration: std::time::Duration) -> String {
    format!("{}ms", duration.as_millis())
}

/// The statements that hold login role `role` to `limits`, or lift the limits unset.
pub(crate) fn role_limits_sql(role: &str, limits: &TenantRoleLimits) -> String {
    let role = quote_ident(role);
    let connection_limit = limits.connection_limit.map_or(-1, i64::from);
    let idle_in_transaction = match limits.idle_in_transaction_timeout {
        Some(timeout) => format!(
            "SET idle_in_transaction_session_timeout = {}",
            quote_literal(&setting_value(timeout))
        ),
        None => "RESET idle_in_transaction_session_timeout".to_owned(),
    };
    format!("ALTER ROLE {role} CONNECTION LIMIT {connection_limit};\nALTER ROLE {role} {idle_in_transaction}")
}

pub(crate) async fn role_exists(conn: &mut PgConnection, role: &str) -> Result<bool, ProvisionError> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(role)
        .fetch_one(conn)
        .await
        .step("look up role")
}

/// Runs one DDL statement built only from validated, quoted identifiers and silo-generated
/// literals, as a simple query: one round trip, and no prepared statement left behind for a
/// text that never comes again.
pub(crate) async fn ddl(conn: &mut PgConnection, sql: &str, step: &'static str) -> Result<(), ProvisionError> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
        .step(step)?;
    Ok(())
}

/// Tests interrupt a job after a given step with the fail point `{job}-after-step`, configured
/// as `return(STEP)`.
///
/// `{job}-unavailable-after-{step}` (e.g. `1*return`) fails the job after that step the way
/// an unreachable database does (a pool timeout), to exercise automatic retries.
pub(crate) fn fail_after(job: &str, step: &str) -> Result<(), ProvisionError> {
    #[cfg(feature = "failpoints")]
    {
        let name = format!("{job}-after-step");
        if fail::eval(&name, |arg| arg.as_deref() == Some(step)) == Some(true) {
            return Err(ProvisionError::Interrupted(step.to_owned()));
        }
        if fail::eval(&format!("{job}-unavailable-after-{step}"), |_| ()).is_some() {
            return Err(ProvisionError::Database {
                step: "fail point",
                source: sqlx::Error::PoolTimedOut,
            });
        }
    }
    let _ = (job, step);
    Ok(())
}

/// Tests hold a job after a step with the fail point `{job}-stall-after-{step}`, configured
/// as `return(MILLISECONDS)`: the job waits that long without blocking its thread, as a run
/// whose worker stalled does.
async fn stall_after(job: &str, step: &str) {
    #[cfg(feature = "failpoints")]
    {
        let stall = fail::eval(&format!("{job}-stall-after-{step}"), |arg| {
            arg.and_then(|ms| ms.parse().ok())
        });
        if let Some(Some(ms)) = stall {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    }
    let _ = (job, step);
}
