//! `[backups] every`: each live tenant (active or suspended) is backed up that often. A
//! pass queues a `backup` job (actor `scheduler` in the audit log) for every tenant whose
//! last backup job was queued longer ago than `every`, least recently backed up first, with
//! at most `[backups] max_concurrent` scheduled backups queued or running at once (`pg_dump`
//! reads a whole database). A backup that failed is tried again after an hour (or `every`,
//! if shorter), not at every pass.
//!
//! Several control planes may run this at once: each pass holds a transaction-level advisory
//! lock and skips tenants that already have an unfinished job, so every due tenant is backed
//! up once.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::BackupsConfig;
use crate::{audit, jobs};

/// Advisory lock key of the backup schedule ("silo-bks").
const SCHEDULE_LOCK: i64 = 0x73696c6f_2d626b73;
/// A failed backup is tried again after this long at most.
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(3600);

/// How often to look for due tenants: a tenth of `every`, between one second and a minute.
fn check_every(every: Duration) -> Duration {
    (every / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Queues backups of due tenants every so often until `shutdown`; returns at once without
/// `[backups] every`.
pub async fn run(catalog: PgPool, config: BackupsConfig, shutdown: CancellationToken) {
    let Some(every) = config.every else {
        return;
    };
    loop {
        match queue_due(&catalog, every, config.max_concurrent).await {
            Ok(0) => {}
            Ok(n) => info!(queued = n, "scheduled backups"),
            Err(e) => warn!(error = %e, "backup schedule pass"),
        }
        tokio::select! {
            () = tokio::time::sleep(check_every(every)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// One pass: queues backups of due tenants; returns how many.
pub async fn queue_due(catalog: &PgPool, every: Duration, max_concurrent: u32) -> Result<usize, sqlx::Error> {
    let mut tx = catalog.begin().await?;
    let room = jobs::scheduled_room(&mut tx, SCHEDULE_LOCK, "backup", max_concurrent).await?;
    if room <= 0 {
        return Ok(0);
    }
    let due: Vec<String> = sqlx::query_scalar(
        "SELECT t.slug FROM tenants t \
         LEFT JOIN LATERAL (SELECT max(j.created_at) AS at FROM jobs j \
             WHERE j.tenant = t.slug AND j.kind = 'backup' \
               AND (j.state <> 'failed' OR j.created_at > now() - make_interval(secs => $2))) last ON true \
         WHERE t.status IN ('active', 'suspended') AND t.moving_to IS NULL \
           AND (last.at IS NULL OR last.at < now() - make_interval(secs => $1)) \
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.tenant = t.slug AND j.state IN ('queued','running')) \
         ORDER BY last.at NULLS FIRST, t.slug LIMIT $3",
    )
    .bind(every.as_secs_f64())
    .bind(every.min(RETRY_FAILED_AFTER).as_secs_f64())
    .bind(room)
    .fetch_all(&mut *tx)
    .await?;
    for slug in &due {
        let job = jobs::enqueue(&mut tx, "backup", Some(slug), json!({"scheduled": true})).await?;
        audit::record(
            &mut tx,
            "scheduler",
            "tenant.backup",
            Some(slug),
            json!({"job": job.id}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(due.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_tenants_are_looked_for_a_tenth_of_the_period_apart_within_bounds() {
        assert_eq!(check_every(Duration::from_secs(3)), Duration::from_secs(1));
        assert_eq!(check_every(Duration::from_secs(300)), Duration::from_secs(30));
        assert_eq!(check_every(Duration::from_secs(86_400)), Duration::from_secs(60));
    }
}
