//! Moving a tenant to another PostgreSQL server: the steps of the `move` job.
//!
//! The tenant is unavailable while its database is copied (routers answer 503 with
//! Retry-After); nothing written before the move is lost and nothing is written during it:
//!
//! 1. `fence`: the catalog marks the tenant as moving (routers close its pools and stop
//!    serving it), its login roles on the old server get a password only this job knows, and
//!    the sessions still open on its database are ended. A router that missed the event can
//!    no longer log in, so nothing writes to the database after the copy starts.
//! 2. `backup`: `pg_dump` of the database, logged in with that password, into the backup
//!    directory (the same file a `delete` with backup would write; it is kept).
//! 3. `restore`: on the new server, the owner and login roles (with the tenant's current
//!    password), an empty database, and `pg_restore` of the dump as the owner role. A database
//!    left there by an interrupted attempt is dropped first. The schema version is checked.
//! 4. `switch`: the secret gets a new current version naming the new server, tested by
//!    logging in with it; then the catalog points the tenant at the new server and routers
//!    serve it from there.
//! 5. `cleanup`: the old database and roles are dropped.
//!
//! An online move (`online` in its params) copies the database while the tenant is served,
//! by logical replication ([`crate::replication`]), and the tenant is unavailable only for
//! the cutover:
//!
//! 1. `copy`: the catalog marks the tenant as moving online (its room on the new server is
//!    taken; routers go on serving it); on the new server, the roles, an empty database, the
//!    schema (`pg_dump --schema-only`), and a subscription to the old database, which copies
//!    every table and then follows every change.
//! 2. `cutover`: routers stop serving the tenant, the old database is fenced as above (its
//!    replication session excepted), and once the new server has applied the last change,
//!    the sequences are copied and replication is taken down. The schema version is checked.
//! 3. `switch` and `cleanup` as above.
//!
//! Every step is idempotent, so a job resumed after a crash converges; a resumed job runs
//! `fence` (or `cutover`) again (the password it set was never stored). A move that fails for
//! good before `switch` is undone by [`Provisioner::abandon_move`]: the tenant is served from
//! the old server again, with its own password, and the new server keeps nothing of it.

use serde::{Deserialize, Serialize};
use sqlx::Connection;
use tracing::{info, instrument, warn};

use crate::catalog::tenants::{self, StartMoveError};
use crate::jobs::{self, Job};
use crate::names::{quote_ident, TenantNames, TenantSlug};
use crate::provision::{
    create_database, drop_database, drop_roles, ensure_login_role, ensure_owner_role, hand_over_database,
    own_public_schema, role_exists, Placement, ProvisionError, Provisioner, StepContext,
};
use crate::replication::{self, Replication};
use crate::rotation::test_login;
use crate::secrets::{self, DbSecret};
use crate::servers::Server;
use crate::tenant_schema::applied_version;

/// Parameters of a `move` job, fixed when it is requested.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveParams {
    /// The server the tenant lived on.
    pub from: String,
    /// The server it moves to.
    pub to: String,
    /// Version id of the secret version naming the new server, so a retried switch does not
    /// add another.
    pub secret_version: String,
    /// Copy the database by logical replication while the tenant is served (see
    /// [`crate::replication`]), instead of through a backup while it is not.
    #[serde(default)]
    pub online: bool,
}

/// The steps of a `move` job, in order.
pub const MOVE_STEPS: [&str; 5] = ["fence", "backup", "restore", "switch", "cleanup"];

impl Provisioner {
    /// Runs (or resumes) a `move` job to completion.
    #[instrument(skip_all, fields(tenant = job.tenant.as_deref().unwrap_or(""), job = job.id))]
    pub async fn move_tenant(&self, job: &Job) -> Result<(), ProvisionError> {
        let params = move_params(job)?;
        let (slug, secret_name) = self.tenant_of(job)?;
        let from = self.server_named(&params.from)?;
        let to = self.server_named(&params.to)?;
        let tenant = self.catalog_tenant(&slug).await?;
        let at = self.placement_of(&tenant)?;
        let names = &at.names;
        // A job resumed after the switch has only the old database left to drop.
        if at.server.config.name != params.to {
            if !params.online {
                let dump_login = self
                    .job_step(job, "move", "fence", self.fence(&slug, names, &secret_name, from, to))
                    .await?;
                let backup = self.backup_once(job, &slug, &secret_name, &at, Some(&dump_login), None);
                let backup = self.job_step(job, "move", "backup", backup).await?;
                let restore = self.restore_on(to, &slug, names, &secret_name, &backup);
                self.job_step(job, "move", "restore", restore).await?;
            } else {
                let replication = Replication::new(from, to, names, job.id);
                // Copied while served, unless a run reached the cutover: the old server's
                // logins are fenced since, and the copy is being finished.
                if tenant.moving_to.is_none() || tenant.moving_online {
                    let copy = self.copy_online(job, &slug, names, &secret_name, &replication);
                    self.job_step(job, "move", "copy", copy).await?;
                }
                let cutover = self.cut_over(&slug, names, &secret_name, &replication);
                self.job_step(job, "move", "cutover", cutover).await?;
            }
            let switch = self.switch(to, &slug, names, &secret_name, &params);
            self.job_step(job, "move", "switch", switch).await?;
        }
        self.job_step(job, "move", "cleanup", async {
            drop_database(from, names).await?;
            drop_roles(from, names).await
        })
        .await?;
        info!(from = %params.from, to = %params.to, "tenant moved");
        Ok(())
    }

    /// Undoes a `move` job that failed for good before its switch: the tenant is served from
    /// its old server again, with the password of its secret, and the new server keeps none of
    /// its objects. After the switch there is nothing to undo (the old database is left for a
    /// retry of the job to drop).
    #[instrument(skip_all, fields(tenant = job.tenant.as_deref().unwrap_or(""), job = job.id))]
    pub async fn abandon_move(&self, job: &Job) -> Result<(), ProvisionError> {
        let params = move_params(job)?;
        let (slug, secret_name) = self.tenant_of(job)?;
        let Placement { server, names } = self.placement(&slug).await?;
        if server.config.name == params.to {
            return Ok(());
        }
        let from = self.server_named(&params.from)?;
        let to = self.server_named(&params.to)?;
        if params.online {
            Replication::new(from, to, &names, job.id).stop().await?;
        }
        // The tenant is written to again once served: a retry must take a new copy.
        self.backups.discard(&slug, job.id).await?;
        let current = self.current_login(&secret_name).await?;
        let mut conn = from.admin.acquire().await.step("connect to server")?;
        ensure_login_role(
            &mut conn,
            &names,
            &current.username,
            &current.password,
            &from.config.tenant_roles,
        )
        .await?;
        drop(conn);
        drop_database(to, &names).await?;
        drop_roles(to, &names).await?;
        let mut tx = self.catalog.begin().await.step("end the move")?;
        tenants::cancel_move(&mut tx, slug.as_str())
            .await
            .step("end the move")?;
        tx.commit().await.step("end the move")?;
        warn!(from = %params.from, to = %params.to, "move abandoned; the tenant is served from its old server");
        Ok(())
    }

    fn server_named(&self, name: &str) -> Result<&Server, ProvisionError> {
        self.servers
            .get(name)
            .ok_or_else(|| ProvisionError::UnknownServer(name.to_owned()))
    }

    /// Step `fence`: nobody but this job uses the tenant's database on `from` any more.
    /// Returns the login this job dumps it with.
    async fn fence(
        &self,
        slug: &TenantSlug,
        names: &TenantNames,
        secret_name: &str,
        from: &Server,
        to: &Server,
    ) -> Result<DbSecret, ProvisionError> {
        // Again on every run: a retried job was undone, and must find room and no rollout.
        self.mark_moving(slug, to, false).await?;
        let current = self.current_login(secret_name).await?;
        fence_database(from, names, current).await
    }

    /// Marks `slug` as moving to `to` (served meanwhile if `online`), taking its room there.
    async fn mark_moving(&self, slug: &TenantSlug, to: &Server, online: bool) -> Result<(), ProvisionError> {
        let mut tx = self.catalog.begin().await.step("mark moving")?;
        tenants::lock_status(&mut tx, slug.as_str()).await.step("mark moving")?;
        tenants::start_move(&mut tx, slug.as_str(), &to.config.name, online)
            .await
            .map_err(|e| match e {
                StartMoveError::Database(source) => ProvisionError::Database {
                    step: "mark moving",
                    source,
                },
                refused => ProvisionError::InvalidJob(refused.to_string()),
            })?;
        tx.commit().await.step("mark moving")
    }

    /// Step `copy` of an online move: the tenant marked as moving while served, its roles and
    /// an empty database of the same schema on the new server, subscribed to the old one; done
    /// once every table is copied and followed.
    async fn copy_online(
        &self,
        job: &Job,
        slug: &TenantSlug,
        names: &TenantNames,
        secret_name: &str,
        replication: &Replication<'_>,
    ) -> Result<(), ProvisionError> {
        let (from, to) = (replication.from(), replication.to());
        // Again on every run: a retried job was undone, and must find room and no rollout.
        self.mark_moving(slug, to, true).await?;
        if let Some(why) = replication::unavailable(from, to, names.database()).await? {
            return Err(ProvisionError::InvalidJob(format!(
                "the tenant cannot move online: {why}"
            )));
        }
        if !replication.subscribed().await? {
            // Whatever an interrupted attempt left, before a fresh start.
            replication.stop().await?;
            let current = self.current_login(secret_name).await?;
            prepare_copy_on(to, names, &current).await?;
            let moved = moved_login(&current, to);
            self.backups
                .copy_schema(
                    slug,
                    &names.owner_role(),
                    (&current, &from.config.tls),
                    (&moved, &to.config.tls),
                )
                .await?;
            replication.start().await?;
        }
        replication
            .wait_copied(|copied, tables| async move {
                let progress = serde_json::json!({"tables_copied": copied, "tables": tables});
                if let Err(e) = jobs::set_progress(&self.catalog, job, &progress).await {
                    warn!(error = %e, "could not record the copy's progress");
                }
            })
            .await
    }

    /// Step `cutover` of an online move: routers stop serving the tenant, nobody but this
    /// job uses its old database any more, and once the new server has every change and the
    /// sequences, replication is taken down; the copy's schema version is checked.
    async fn cut_over(
        &self,
        slug: &TenantSlug,
        names: &TenantNames,
        secret_name: &str,
        replication: &Replication<'_>,
    ) -> Result<(), ProvisionError> {
        let mut tx = self.catalog.begin().await.step("stop serving the tenant")?;
        tenants::cut_over(&mut tx, slug.as_str())
            .await
            .step("stop serving the tenant")?;
        tx.commit().await.step("stop serving the tenant")?;
        let current = self.current_login(secret_name).await?;
        fence_database(replication.from(), names, current).await?;
        // Gone only once a run caught up and copied the sequences.
        if replication.subscribed().await? {
            replication.catch_up().await?;
        }
        replication.stop().await?;
        self.check_copied_version(replication.to(), slug, names).await
    }

    /// Step `restore`: the tenant's roles and a copy of its database from `backup` on `to`.
    async fn restore_on(
        &self,
        to: &Server,
        slug: &TenantSlug,
        names: &TenantNames,
        secret_name: &str,
        backup: &std::path::Path,
    ) -> Result<(), ProvisionError> {
        let current = self.current_login(secret_name).await?;
        prepare_copy_on(to, names, &current).await?;
        let moved = moved_login(&current, to);
        self.backups
            .restore(slug, &names.owner_role(), backup, &moved, &to.config.tls)
            .await?;
        self.check_copied_version(to, slug, names).await
    }

    /// The tenant's database on `to` is at the schema version the catalog has for it.
    async fn check_copied_version(
        &self,
        to: &Server,
        slug: &TenantSlug,
        names: &TenantNames,
    ) -> Result<(), ProvisionError> {
        let mut conn = to.connect(names.database()).await.step("connect to tenant database")?;
        let restored = applied_version(&mut conn).await?;
        let _ = conn.close().await;
        let expected: i64 = sqlx::query_scalar("SELECT schema_version FROM tenants WHERE slug = $1")
            .bind(slug.as_str())
            .fetch_one(&self.catalog)
            .await
            .step("read schema version")?;
        if restored != expected {
            return Err(ProvisionError::InvalidJob(format!(
                "the copy on {} is at schema version {restored}, the catalog says {expected}",
                to.config.name
            )));
        }
        Ok(())
    }

    /// Step `switch`: the secret and the catalog name the new server.
    async fn switch(
        &self,
        to: &Server,
        slug: &TenantSlug,
        names: &TenantNames,
        secret_name: &str,
        params: &MoveParams,
    ) -> Result<(), ProvisionError> {
        let current = self.current_login(secret_name).await?;
        if (current.host.as_str(), current.port) != (to.config.host.as_str(), to.config.port) {
            let moved = moved_login(&current, to);
            test_login(to, names, &moved).await?;
            self.store
                .put_secret_value(secret_name, &params.secret_version, &moved.to_secret_string(), &[])
                .await?;
        }
        let mut tx = self.catalog.begin().await.step("point the tenant at its new server")?;
        tenants::finish_move(&mut tx, slug.as_str(), &to.config.name)
            .await
            .step("point the tenant at its new server")?;
        tx.commit().await.step("point the tenant at its new server")
    }
}

/// The tenant's roles, logging in as `current` does, and an empty database of its own on `to`,
/// in place of what an interrupted attempt left there.
async fn prepare_copy_on(to: &Server, names: &TenantNames, current: &DbSecret) -> Result<(), ProvisionError> {
    drop_database(to, names).await?;
    {
        let mut conn = to.admin.acquire().await.step("connect to server")?;
        ensure_owner_role(&mut conn, names).await?;
        ensure_login_role(
            &mut conn,
            names,
            &current.username,
            &current.password,
            &to.config.tenant_roles,
        )
        .await?;
    }
    create_database(to, &quote_ident(names.database()), "template0").await?;
    hand_over_database(to, names, &current.username).await?;
    let mut conn = to.connect(names.database()).await.step("connect to tenant database")?;
    own_public_schema(&mut conn, &names.owner_role()).await?;
    let _ = conn.close().await;
    Ok(())
}

/// Nobody but the caller uses the tenant's database on `server` any more: its login roles get
/// a password only the caller knows, and the sessions open on it end. Returns `current` (the
/// tenant's login) with that password.
pub(crate) async fn fence_database(
    server: &Server,
    names: &TenantNames,
    current: DbSecret,
) -> Result<DbSecret, ProvisionError> {
    let password = secrets::generate_password();
    let mut conn = server.admin.acquire().await.step("connect to server")?;
    for role in names.login_roles() {
        if role_exists(&mut conn, &role).await? {
            ensure_login_role(&mut conn, names, &role, &password, &server.config.tenant_roles).await?;
        }
    }
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type <> 'walsender'",
    )
    .bind(names.database())
    .fetch_one(&mut *conn)
    .await
    .step("end the tenant's sessions")?;
    info!(sessions = ended, "tenant database fenced");
    Ok(DbSecret { password, ..current })
}

fn move_params(job: &Job) -> Result<MoveParams, ProvisionError> {
    serde_json::from_value(job.params.clone()).map_err(|e| ProvisionError::InvalidJob(format!("move params: {e}")))
}

/// `login` on server `to`.
fn moved_login(login: &DbSecret, to: &Server) -> DbSecret {
    DbSecret {
        host: to.config.host.clone(),
        port: to.config.port,
        ..login.clone()
    }
}
