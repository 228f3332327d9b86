//! `[backups] keep_last` (or the tenant's plan's, `[backups.plans.NAME] keep_last`): taking a
//! backup erases the tenant's oldest beyond that many, each audited first
//! (`tenant.backup.prune`, actor `scheduler`).
//!
//! `[backups] keep_for` (or the plan's): backups older than that are erased, deleted
//! tenants' included (data a regulated company may not keep once its retention period is
//! over), except the newest backup of a tenant that still exists. Each erasure is audited
//! (`tenant.backup.expire`, actor `scheduler`) before the file is removed, so no backup
//! disappears unrecorded; a removal that fails (or a control plane stopped in between) is
//! retried on the next pass, which finds the entry already recorded and does not record it
//! twice.
//!
//! A tenant with a job queued or running (a restore may be reading one of its backups) is
//! left for a later pass; one under legal hold (`tenants.legal_hold`) keeps every backup, for
//! `keep_last` too, until the hold is released. Several control planes may sweep at once: a pass holds a
//! transaction-level advisory lock while it decides and records what expires.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{BackupFile, Backups};
use crate::audit;
use crate::catalog::tenants;
use crate::names::TenantSlug;

/// Advisory lock key of the sweep ("silo-bkx").
const RETENTION_LOCK: i64 = 0x73696c6f_2d626b78;
/// The most often a sweep runs (for short `keep_for`s, as in tests) and the least often.
const SWEEP_BOUNDS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));

/// How often to sweep for `keep_for`: a tenth of it, between one second and an hour.
fn sweep_every(keep_for: Duration) -> Duration {
    (keep_for / 10).clamp(SWEEP_BOUNDS.0, SWEEP_BOUNDS.1)
}

/// Erases expired backups until `shutdown`; returns at once when no policy (`[backups]` or a
/// plan's) has a `keep_for`.
pub async fn run(catalog: PgPool, backups: Backups, shutdown: CancellationToken) {
    let Some(shortest) = backups.config().policies().filter_map(|policy| policy.keep_for).min() else {
        return;
    };
    loop {
        match expire(&catalog, &backups).await {
            Ok(0) => {}
            Ok(n) => info!(erased = n, "expired backups erased (keep_for)"),
            Err(e) => warn!(error = %e, "backup retention pass"),
        }
        tokio::select! {
            () = tokio::time::sleep(sweep_every(shortest)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// One pass: records and erases every backup older than its tenant's `keep_for` (its plan's,
/// else `[backups]`') that is not the newest of an existing tenant; returns how many were
/// erased.
pub async fn expire(catalog: &PgPool, backups: &Backups) -> anyhow::Result<usize> {
    let now = chrono::Utc::now();
    let slugs = backups.tenants().await?;
    if slugs.is_empty() {
        return Ok(0);
    }
    let mut tx = catalog.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(RETENTION_LOCK)
        .execute(&mut *tx)
        .await?;
    let names: Vec<&str> = slugs.iter().map(TenantSlug::as_str).collect();
    // Each tenant's plan, and whether it still exists; a tenant the catalog no longer knows
    // has `[backups]`' policy.
    let known: HashMap<String, (String, bool)> =
        sqlx::query_as("SELECT slug, plan, status <> 'deleted' FROM tenants WHERE slug = ANY($1)")
            .bind(&names)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|(slug, plan, exists)| (slug, (plan, exists)))
            .collect();
    // A tenant with a job running (a restore may be reading one of its backups), or whose data
    // is under legal hold, keeps every backup.
    let busy: HashSet<String> = sqlx::query_scalar(
        "SELECT DISTINCT tenant FROM jobs WHERE tenant = ANY($1) AND state IN ('queued','running') \
         UNION SELECT slug FROM tenants WHERE slug = ANY($1) AND legal_hold IS NOT NULL",
    )
    .bind(&names)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let recorded: HashSet<(String, String)> = sqlx::query_as(
        "SELECT tenant, detail->>'file' FROM audit_log \
         WHERE action = 'tenant.backup.expire' AND tenant = ANY($1) AND detail ? 'file'",
    )
    .bind(&names)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let mut doomed: Vec<(TenantSlug, BackupFile)> = Vec::new();
    for slug in slugs.iter().filter(|slug| !busy.contains(slug.as_str())) {
        let (policy, exists) = match known.get(slug.as_str()) {
            Some((plan, exists)) => (backups.config().policy_of(plan), *exists),
            None => (&backups.config().policy, false),
        };
        let Some(keep_for) = policy.keep_for else { continue };
        for backup in backups.expired(slug, now - keep_for, exists).await? {
            if recorded.contains(&(slug.as_str().to_owned(), backup.file.clone())) {
                doomed.push((slug.clone(), backup));
                continue;
            }
            audit::record(
                &mut tx,
                "scheduler",
                "tenant.backup.expire",
                Some(slug.as_str()),
                json!({"file": backup.file, "created_at": backup.created_at, "keep_for": humantime::format_duration(keep_for).to_string()}),
            )
            .await?;
            doomed.push((slug.clone(), backup));
        }
    }
    tx.commit().await?;
    let mut erased = 0;
    for (slug, backup) in doomed {
        match backups.remove(&slug, &backup.file).await {
            Ok(true) => erased += 1,
            Ok(false) => {}
            Err(e) => {
                warn!(tenant = %slug, file = %backup.file, error = %e, "expired backup not erased; retried on the next pass")
            }
        }
    }
    Ok(erased)
}

/// Erases `slug`'s backups beyond its `keep_last` (its plan's, else `[backups]`'), but not
/// `spare` (one being restored) and none while its data is under legal hold: each is audited
/// before it is erased, and one that cannot be erased is erased after the tenant's next
/// backup (recorded again then).
pub async fn keep_last(
    catalog: &PgPool,
    backups: &Backups,
    slug: &TenantSlug,
    spare: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let Some(tenant) = tenants::get(&mut *catalog.acquire().await?, slug.as_str()).await? else {
        return Ok(());
    };
    let Some(keep) = backups.config().policy_of(&tenant.plan).keep_last else {
        return Ok(());
    };
    if tenant.legal_hold.is_some() {
        return Ok(());
    }
    let doomed = backups.beyond_keep_last(slug, keep, spare).await?;
    if doomed.is_empty() {
        return Ok(());
    }
    let mut tx = catalog.begin().await?;
    for backup in &doomed {
        audit::record(
            &mut tx,
            "scheduler",
            "tenant.backup.prune",
            Some(slug.as_str()),
            json!({"file": backup.file, "created_at": backup.created_at, "keep_last": keep}),
        )
        .await?;
    }
    tx.commit().await?;
    for backup in doomed {
        backups.remove(slug, &backup.file).await?;
        info!(tenant = %slug, file = %backup.file, keep, "old backup erased (keep_last)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_run_a_tenth_of_the_retention_apart_within_bounds() {
        assert_eq!(sweep_every(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(sweep_every(Duration::from_secs(600)), Duration::from_secs(60));
        assert_eq!(sweep_every(Duration::from_secs(30 * 86_400)), Duration::from_secs(3600));
    }
}
