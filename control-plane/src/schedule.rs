//! The rotation schedule: every `rotation.check_every`, queue a `rotate` job for each active
//! tenant whose credentials are older than `rotation.interval`, each delayed by a random
//! jitter, keeping at most `rotation.max_concurrent` scheduled rotations outstanding.
//!
//! Several control planes may run this at once: each pass holds a transaction-level advisory
//! lock and skips tenants that already have an unfinished job, so every due tenant is
//! rotated exactly once.

use std::time::Duration;

use rand::Rng;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::RotationConfig;
use crate::rotation::RotateParams;
use crate::{audit, jobs};

/// Advisory lock key of the scheduler ("silo-rot").
const SCHEDULER_LOCK: i64 = 0x73696c6f_2d726f74;

/// Queues rotations for due tenants until `shutdown`.
pub async fn run(catalog: PgPool, cfg: RotationConfig, shutdown: CancellationToken) {
    loop {
        match queue_due(&catalog, &cfg).await {
            Ok(0) => {}
            Ok(n) => info!(queued = n, "scheduled credential rotations"),
            Err(e) => warn!(error = %e, "rotation schedule pass"),
        }
        tokio::select! {
            () = tokio::time::sleep(cfg.check_every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// One pass: queues rotations for due tenants; returns how many.
pub async fn queue_due(catalog: &PgPool, cfg: &RotationConfig) -> Result<usize, sqlx::Error> {
    let mut tx = catalog.begin().await?;
    let room = jobs::scheduled_room(&mut tx, SCHEDULER_LOCK, "rotate", cfg.max_concurrent).await?;
    if room <= 0 {
        return Ok(0);
    }
    let due = due_tenants(&mut tx, cfg.interval, room).await?;
    for slug in &due {
        let mut params = serde_json::to_value(RotateParams::new(cfg.strategy)).unwrap_or_default();
        params["scheduled"] = json!(true);
        let jitter = if cfg.jitter.is_zero() {
            Duration::ZERO
        } else {
            rand::rng().random_range(Duration::ZERO..cfg.jitter)
        };
        let job = jobs::enqueue_after(&mut tx, "rotate", Some(slug), params, jitter).await?;
        audit::record(
            &mut tx,
            "scheduler",
            "tenant.rotate",
            Some(slug),
            json!({"job": job.id}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(due.len())
}

/// Active tenants with credentials older than `interval` and no unfinished job, oldest first.
pub async fn due_tenants(
    exec: &mut sqlx::PgConnection,
    interval: Duration,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT t.slug FROM tenants t WHERE t.status = 'active' \
         AND (t.credentials_rotated_at IS NULL OR t.credentials_rotated_at < now() - make_interval(secs => $1)) \
         AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.tenant = t.slug AND j.state IN ('queued','running')) \
         ORDER BY t.credentials_rotated_at NULLS FIRST LIMIT $2",
    )
    .bind(interval.as_secs_f64())
    .bind(limit)
    .fetch_all(exec)
    .await
}
