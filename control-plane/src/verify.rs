//! Restore drills: the steps of a `verify` job, which proves that one of a tenant's backups
//! restores — the evidence an auditor asks for, and the only way to know a backup is good
//! before it is needed. The tenant keeps serving throughout; nothing of it is touched.
//!
//! 1. `restore`: a scratch database `silo_verify_job{id}` on the tenant's server, owned by
//!    the tenant's owner role and open only to its current login (like the tenant's own
//!    database), into which the backup is restored exactly as a real restore does: logged in
//!    as the tenant, decrypted on its way in, in one transaction that fails on any error.
//!    A backup only in the `[backups.s3]` bucket is downloaded first.
//! 2. `check`: logged in as the tenant, the restored database must hold silo's migration
//!    table; its schema version, tables and rows are counted into the job's progress.
//! 3. `cleanup`: the scratch database is dropped — also when a step before failed (the job
//!    then keeps that step as the one it failed at).
//!
//! A resumed job drops a scratch database its earlier run left and starts over.

use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{ConnectOptions, Connection};
use tracing::{info, instrument, warn};

use crate::jobs::{self, Job};
use crate::names::{quote_ident, TenantSlug};
use crate::provision::{ddl, own_public_schema, Placement, ProvisionError, Provisioner, StepContext};
use crate::secrets::DbSecret;
use crate::servers::Server;
use crate::tenant_schema::applied_version;

/// Parameters of a `verify` job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyParams {
    /// The backup's file name, among the tenant's own; None (a scheduled drill): the newest
    /// when the job runs.
    #[serde(default)]
    pub backup: Option<String>,
}

/// The steps of a `verify` job, in order.
pub const VERIFY_STEPS: [&str; 3] = ["restore", "check", "cleanup"];

/// What the restored backup holds, as the job's progress records it.
#[derive(Debug, Serialize)]
struct Restored {
    schema_version: i64,
    tables: usize,
    rows: i64,
}

/// The scratch database of job `job_id`.
fn scratch_database(job_id: i64) -> String {
    format!("silo_verify_job{job_id}")
}

impl Provisioner {
    /// Runs (or resumes) a `verify` job to completion.
    #[instrument(skip_all, fields(tenant = job.tenant.as_deref().unwrap_or(""), job = job.id))]
    pub async fn verify_backup(&self, job: &Job) -> Result<(), ProvisionError> {
        let params: VerifyParams = serde_json::from_value(job.params.clone())
            .map_err(|e| ProvisionError::InvalidJob(format!("verify params: {e}")))?;
        let (slug, secret_name) = self.tenant_of(job)?;
        let Placement { server, names } = self.placement(&slug).await?;
        let owner = names.owner_role();
        let backup = match params.backup {
            Some(backup) => backup,
            None => self
                .backups
                .latest(&slug)
                .await?
                .map(|newest| newest.file)
                .ok_or_else(|| ProvisionError::InvalidJob(format!("tenant {slug} has no backups to verify")))?,
        };
        let scratch = scratch_database(job.id);
        let drill = async {
            let login = self
                .job_step(
                    job,
                    "verify",
                    "restore",
                    self.restore_scratch(server, &slug, &owner, &secret_name, &backup, &scratch),
                )
                .await?;
            self.job_step(
                job,
                "verify",
                "check",
                check_restored(server, &login, owner.clone(), &scratch),
            )
            .await
        };
        let restored = match drill.await {
            Ok(restored) => restored,
            Err(e) => {
                // The job keeps the step it failed at; the scratch database goes all the same.
                if let Err(cleanup) = drop_scratch(server, &scratch).await {
                    warn!(error = %cleanup, database = %scratch, "scratch database not dropped; the job's retry drops it");
                }
                return Err(e);
            }
        };
        self.job_step(job, "verify", "cleanup", drop_scratch(server, &scratch))
            .await?;
        info!(%backup, ?restored, "backup verified: it restores");
        jobs::set_progress(&self.catalog, job, &json!({"backup": backup, "restored": restored}))
            .await
            .step("record the result")
    }

    /// Step `restore`: the backup restored into a new scratch database as the tenant's
    /// current login (acting as its owner role `owner`), which is returned (pointing at the
    /// scratch database).
    async fn restore_scratch(
        &self,
        server: &Server,
        slug: &TenantSlug,
        owner: &str,
        secret_name: &str,
        backup: &str,
        scratch: &str,
    ) -> Result<DbSecret, ProvisionError> {
        let file = self
            .backups
            .fetch(slug, backup)
            .await?
            .ok_or_else(|| ProvisionError::InvalidJob(format!("tenant {slug} has no backup named {backup:?}")))?;
        let mut login = self.current_login(secret_name).await?;
        login.dbname = scratch.to_owned();
        drop_scratch(server, scratch).await?;
        let db = quote_ident(scratch);
        let mut conn = server.admin.acquire().await.step("connect to server")?;
        for (sql, step) in [
            (
                format!("CREATE DATABASE {db} TEMPLATE template0"),
                "create scratch database",
            ),
            (
                format!("ALTER DATABASE {db} OWNER TO {}", quote_ident(owner)),
                "hand scratch database to owner role",
            ),
            (
                format!("REVOKE ALL ON DATABASE {db} FROM PUBLIC"),
                "revoke connect from public",
            ),
            (
                format!(
                    "GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {}",
                    quote_ident(&login.username)
                ),
                "grant connect to login role",
            ),
        ] {
            ddl(&mut conn, &sql, step).await?;
        }
        drop(conn);
        let mut conn = server.connect(scratch).await.step("connect to scratch database")?;
        own_public_schema(&mut conn, owner).await?;
        let _ = conn.close().await;
        self.backups
            .restore(slug, owner, &file, &login, &server.config.tls)
            .await?;
        Ok(login)
    }
}

/// Step `check`: what the restored database holds, read as the tenant (`login`, acting as
/// `owner_role`).
async fn check_restored(
    server: &Server,
    login: &DbSecret,
    owner_role: String,
    scratch: &str,
) -> Result<Restored, ProvisionError> {
    let mut conn = login
        .connect_options(&server.config.tls)
        .connect()
        .await
        .step("connect to scratch database as the tenant")?;
    ddl(
        &mut conn,
        &format!("SET ROLE {}", quote_ident(&owner_role)),
        "assume owner role",
    )
    .await?;
    let schema_version = applied_version(&mut conn).await?;
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
           AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2",
    )
    .fetch_all(&mut conn)
    .await
    .step("list restored tables")?;
    if !tables
        .iter()
        .any(|(schema, table)| schema == "public" && table == "_sqlx_migrations")
    {
        return Err(ProvisionError::InvalidJob(format!(
            "the backup restored into {scratch}, but holds no tenant schema (no _sqlx_migrations table)"
        )));
    }
    let mut rows = 0;
    for (schema, table) in &tables {
        let sql = format!("SELECT count(*) FROM {}.{}", quote_ident(schema), quote_ident(table));
        let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut conn)
            .await
            .step("count restored rows")?;
        rows += count;
    }
    let _ = conn.close().await;
    Ok(Restored {
        schema_version,
        tables: tables.len(),
        rows,
    })
}

/// The scratch database is gone (sessions on it ended).
async fn drop_scratch(server: &Server, scratch: &str) -> Result<(), ProvisionError> {
    let mut conn = server.admin.acquire().await.step("connect to server")?;
    ddl(
        &mut conn,
        &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(scratch)),
        "drop scratch database",
    )
    .await
}
