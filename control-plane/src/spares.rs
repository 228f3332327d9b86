//! Spare tenant databases: copies of the current template, made ahead of time, so
//! onboarding renames a database instead of copying one (`CREATE DATABASE` is most of a
//! provisioning's time).
//!
//! Per server, [`keep_filled`] holds `migrations.spare_databases` spares named
//! `silo_spare_v{version}_{fingerprint}_{random}` (the template's version and fingerprint).
//! A spare is built under a `silo_sparebuild_` name, closed to `PUBLIC`, connected to once
//! (so the first connection of its tenant finds PostgreSQL's relation cache file there), and
//! only then renamed to its claimable name. [`claim`] renames a spare of the current
//! migrations to the tenant's database name: the rename is atomic, so two provisionings
//! never get the same spare, and a spare someone is connected to is skipped. Spares of
//! other migrations are dropped, never claimed. With several control planes, one fills a
//! server at a time (an advisory lock).

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::names::quote_ident;
use crate::provision::{ddl, ProvisionError, StepContext};
use crate::servers::{Server, Servers};
use crate::template;
use crate::tenant_schema::{MigrationSource, TenantMigrations};

/// Prefix of every claimable spare.
const PREFIX: &str = "silo_spare_";
/// Prefix of spares being built (never claimed; leftovers of a crash are dropped).
const BUILD_PREFIX: &str = "silo_sparebuild_";
/// Advisory lock key serialising spare builds on one server ("silo-spr").
const FILL_LOCK: i64 = 0x73696c6f_2d737072;
/// How often the spares of every server are counted when no claim says so sooner.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// SQLSTATEs of a rename that lost a race: the spare is gone (claimed by another
/// provisioning) or someone is connected to it.
const UNDEFINED_DATABASE: &str = "3D000";
const OBJECT_IN_USE: &str = "55006";

/// The name prefix of spares for `migrations`.
fn prefix_for(migrations: &TenantMigrations) -> String {
    format!("{PREFIX}v{}_{}_", migrations.latest_version(), migrations.fingerprint())
}

/// Renames a spare of `migrations` on `server` to `database`. False when there is none to
/// take (the caller creates the database itself).
pub async fn claim(server: &Server, migrations: &TenantMigrations, database: &str) -> Result<bool, ProvisionError> {
    let candidates: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE starts_with(datname::text, $1) ORDER BY datname LIMIT 8",
    )
    .bind(prefix_for(migrations))
    .fetch_all(&server.admin)
    .await
    .step("list spare databases")?;
    if candidates.is_empty() {
        return Ok(false);
    }
    let mut admin = server.admin.acquire().await.step("connect to server")?;
    for spare in candidates {
        let rename = format!(
            "ALTER DATABASE {} RENAME TO {}",
            quote_ident(&spare),
            quote_ident(database)
        );
        match sqlx::raw_sql(sqlx::AssertSqlSafe(rename)).execute(&mut *admin).await {
            Ok(_) => {
                metrics::counter!("silo_spare_claims_total", "outcome" => "claimed").increment(1);
                debug!(spare, database, "claimed a spare database");
                return Ok(true);
            }
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some(UNDEFINED_DATABASE | OBJECT_IN_USE)) =>
            {
                continue
            }
            Err(e) => return Err(e).step("claim spare database"),
        }
    }
    metrics::counter!("silo_spare_claims_total", "outcome" => "none_left").increment(1);
    Ok(false)
}

/// Keeps `count` spares of the current migrations on every server until `shutdown`; wakes
/// every few seconds, or at once when `claimed` is notified.
pub async fn keep_filled(
    servers: Arc<Servers>,
    source: MigrationSource,
    count: usize,
    claimed: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    if count == 0 {
        return;
    }
    loop {
        match source.load().await {
            Ok(migrations) => {
                for server in servers.iter() {
                    let filled = tokio::select! {
                        () = shutdown.cancelled() => return,
                        filled = fill(server, &migrations, count, &shutdown) => filled,
                    };
                    if let Err(e) = filled {
                        warn!(server = %server.config.name, error = %e, "cannot make spare tenant databases");
                    }
                }
            }
            Err(e) => warn!(error = %e, "load tenant migrations for spare databases"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = claimed.notified() => {}
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

/// Spares of any migrations on `server`: (current ones, others).
async fn spares_on(server: &Server, prefix: &str) -> Result<(usize, Vec<String>), ProvisionError> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database \
         WHERE starts_with(datname::text, $1) OR starts_with(datname::text, $2)",
    )
    .bind(PREFIX)
    .bind(BUILD_PREFIX)
    .fetch_all(&server.admin)
    .await
    .step("list spare databases")?;
    let current = names.iter().filter(|n| n.starts_with(prefix)).count();
    let others = names.into_iter().filter(|n| !n.starts_with(prefix)).collect();
    Ok((current, others))
}

/// Tops `server` up to `count` spares of `migrations` and drops everything else spare-like.
async fn fill(
    server: &Server,
    migrations: &TenantMigrations,
    count: usize,
    shutdown: &CancellationToken,
) -> Result<(), ProvisionError> {
    let prefix = prefix_for(migrations);
    let (current, others) = spares_on(server, &prefix).await?;
    metrics::gauge!("silo_spare_databases", "server" => server.config.name.clone()).set(current as f64);
    if current >= count && others.is_empty() {
        return Ok(());
    }
    // Held by a transaction on a pooled connection: released with it, however this ends.
    let mut lock = server.admin.begin().await.step("lock spare databases")?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(FILL_LOCK)
        .fetch_one(&mut *lock)
        .await
        .step("lock spare databases")?;
    let filled = async {
        if !locked {
            return Ok(());
        }
        // Counted again under the lock: another control plane may have filled meanwhile.
        let (mut current, others) = spares_on(server, &prefix).await?;
        for name in others {
            drop_database(server, &name).await?;
        }
        let template = template::ensure(server, migrations).await?;
        while current < count && !shutdown.is_cancelled() {
            build(server, &template, &prefix).await?;
            current += 1;
        }
        metrics::gauge!("silo_spare_databases", "server" => server.config.name.clone()).set(current as f64);
        Ok(())
    }
    .await;
    let _ = lock.rollback().await;
    filled
}

/// Builds one spare from `template` and makes it claimable.
async fn build(server: &Server, template: &str, prefix: &str) -> Result<(), ProvisionError> {
    let suffix = hex::encode(rand::random::<[u8; 4]>());
    let (building, name) = (format!("{BUILD_PREFIX}{suffix}"), format!("{prefix}{suffix}"));
    let mut admin = server.admin.acquire().await.step("connect to server")?;
    ddl(
        &mut admin,
        &format!(
            "CREATE DATABASE {} TEMPLATE {}",
            quote_ident(&building),
            quote_ident(template)
        ),
        "create spare database",
    )
    .await?;
    ddl(
        &mut admin,
        &format!("REVOKE ALL ON DATABASE {} FROM PUBLIC", quote_ident(&building)),
        "close spare database",
    )
    .await?;
    // The first connection to a database writes its relation cache file; let it be ours.
    server
        .connect(&building)
        .await
        .step("connect to spare database")?
        .close()
        .await
        .step("disconnect from spare database")?;
    ddl(
        &mut admin,
        &format!(
            "ALTER DATABASE {} RENAME TO {}",
            quote_ident(&building),
            quote_ident(&name)
        ),
        "name spare database",
    )
    .await?;
    info!(server = %server.config.name, spare = name, "spare tenant database ready");
    Ok(())
}

async fn drop_database(server: &Server, name: &str) -> Result<(), ProvisionError> {
    let mut admin = server.admin.acquire().await.step("connect to server")?;
    ddl(
        &mut admin,
        &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name)),
        "drop outdated spare database",
    )
    .await?;
    info!(server = %server.config.name, spare = name, "outdated spare database dropped");
    Ok(())
}
