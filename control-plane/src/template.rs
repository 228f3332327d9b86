//! Template databases for fast onboarding: per server, one database at the current tenant
//! schema, named after the migrations' version and fingerprint. New tenant databases are
//! copied from it with `CREATE DATABASE ... TEMPLATE`, then handed to the tenant's owner role.
//!
//! The template's objects belong to the NOLOGIN role `silo_template_owner` (which owns
//! nothing else, so `REASSIGN OWNED` in a new tenant database touches only that database).
//! Nobody stays connected to a template: it is built under a temporary name, then renamed
//! and closed to connections (`ALLOW_CONNECTIONS false`), since `CREATE DATABASE ...
//! TEMPLATE` fails while any session is open on it.

use sqlx::Connection;
use tracing::{info, warn};

use crate::names::quote_ident;
use crate::provision::{create_role_sql, ddl, own_schema_and_migrate, ProvisionError, StepContext};
use crate::servers::Server;
use crate::tenant_schema::TenantMigrations;

/// The role that owns the objects inside template databases.
pub const TEMPLATE_OWNER: &str = "silo_template_owner";

/// Prefix of template database names.
const PREFIX: &str = "silo_template_";

/// Advisory lock key serialising template builds on one server ("silo-tpl").
const BUILD_LOCK: i64 = 0x73696c6f_2d74706c;

/// The template database name for `migrations`.
pub fn template_name(migrations: &TenantMigrations) -> String {
    format!("{PREFIX}v{}_{}", migrations.latest_version(), migrations.fingerprint())
}

/// The name of a ready template for `migrations` on `server`, building it (and dropping
/// outdated ones) if needed.
pub async fn ensure(server: &Server, migrations: &TenantMigrations) -> Result<String, ProvisionError> {
    let name = template_name(migrations);
    if is_ready(server, &name).await? {
        return Ok(name);
    }
    let mut lock_conn = server.connect("postgres").await.step("connect to server")?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(BUILD_LOCK)
        .execute(&mut lock_conn)
        .await
        .step("lock template build")?;
    let built = async {
        if !is_ready(server, &name).await? {
            build(server, migrations, &name).await?;
            drop_outdated(server, &name).await;
        }
        Ok(())
    }
    .await;
    let _ = lock_conn.close().await;
    built.map(|()| name)
}

async fn is_ready(server: &Server, name: &str) -> Result<bool, ProvisionError> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1 AND datistemplate)")
        .bind(name)
        .fetch_one(&server.admin)
        .await
        .step("look up template")
}

async fn build(server: &Server, migrations: &TenantMigrations, name: &str) -> Result<(), ProvisionError> {
    let building = format!("{name}_building");
    let mut admin = server.admin.acquire().await.step("connect to server")?;
    let role_exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(TEMPLATE_OWNER)
        .fetch_one(&mut *admin)
        .await
        .step("look up template owner")?;
    if !role_exists {
        ddl(
            &mut admin,
            &create_role_sql(TEMPLATE_OWNER, "NOLOGIN"),
            "create template owner",
        )
        .await?;
    }
    ddl(
        &mut admin,
        &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(&building)),
        "drop stale template build",
    )
    .await?;
    ddl(
        &mut admin,
        &format!("CREATE DATABASE {} TEMPLATE template0", quote_ident(&building)),
        "create template",
    )
    .await?;
    {
        let mut conn = server.connect(&building).await.step("connect to template")?;
        own_schema_and_migrate(&mut conn, TEMPLATE_OWNER, migrations).await?;
        conn.close().await.step("disconnect from template")?;
    }
    ddl(
        &mut admin,
        &format!(
            "ALTER DATABASE {} RENAME TO {}",
            quote_ident(&building),
            quote_ident(name)
        ),
        "name template",
    )
    .await?;
    ddl(
        &mut admin,
        &format!(
            "ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false",
            quote_ident(name)
        ),
        "close template",
    )
    .await?;
    info!(server = %server.config.name, template = name, "tenant template built");
    Ok(())
}

/// Drops templates of other migration sets (best effort: an old template only costs disk).
async fn drop_outdated(server: &Server, keep: &str) {
    let old: Vec<String> = match sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'silo\\_template\\_%' AND datname <> $1",
    )
    .bind(keep)
    .fetch_all(&server.admin)
    .await
    {
        Ok(old) => old,
        Err(e) => return warn!(error = %e, "list outdated templates"),
    };
    for name in old {
        let Ok(mut admin) = server.admin.acquire().await else {
            return;
        };
        let db = quote_ident(&name);
        let dropped = async {
            ddl(
                &mut admin,
                &format!("ALTER DATABASE {db} WITH IS_TEMPLATE false"),
                "unmark template",
            )
            .await?;
            ddl(
                &mut admin,
                &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
                "drop template",
            )
            .await
        }
        .await;
        if let Err(e) = dropped {
            warn!(error = %e, template = %name, "drop outdated template");
        }
    }
}
