//! The gauges `/metrics` shows from the catalog and the backups, measured when it is read, at
//! most every [`MIN_INTERVAL`] however many scrapers read it:
//!
//! - `silo_tenants{status}`: tenants by status (a `failed` one waits for an operator);
//! - `silo_jobs{state}`: jobs `queued` and `running`;
//! - `silo_job_queue_delay_seconds_max`: the longest any job has been due with no worker on
//!   it (queued past its start time, or running with an expired lease), 0 when none is: it
//!   grows when every worker is busy, or when the workers are stuck;
//! - `silo_audit_unsealed_seconds_max`: how long the oldest audit entry after the last sealed
//!   one has waited for its seal (see `crate::audit::seal`), 0 when none waits: seconds
//!   normally; it grows when the sealer is stopped, e.g. by a sealed entry gone missing;
//! - the backup freshness gauges of [`crate::backup::freshness`].

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Mutex;

use crate::backup::freshness::Freshness;
use crate::backup::Backups;
use crate::catalog::routes::TenantStatus;

/// Measurements closer together than this reuse the last one.
const MIN_INTERVAL: Duration = Duration::from_secs(10);

/// Every tenant status, so that each has a series (0 when no tenant has it).
const STATUSES: [TenantStatus; 6] = [
    TenantStatus::Provisioning,
    TenantStatus::Active,
    TenantStatus::Suspended,
    TenantStatus::Deleting,
    TenantStatus::Deleted,
    TenantStatus::Failed,
];

/// Measures the gauges for `/metrics`.
pub struct Gauges {
    catalog: PgPool,
    freshness: Freshness,
    measured: Mutex<Option<Instant>>,
}

impl Gauges {
    /// Gauges of the tenants and jobs in `catalog` and of the backups `backups` takes.
    pub fn new(catalog: PgPool, backups: Backups) -> Self {
        Self {
            freshness: Freshness::new(catalog.clone(), backups),
            catalog,
            measured: Mutex::new(None),
        }
    }

    /// Sets the gauges, unless they were set less than [`MIN_INTERVAL`] ago. A failure is
    /// logged; the gauges keep their last values.
    pub async fn update(&self) {
        let mut measured = self.measured.lock().await;
        if measured.is_some_and(|at| at.elapsed() < MIN_INTERVAL) {
            return;
        }
        *measured = Some(Instant::now());
        if let Err(e) = self.catalog_gauges().await {
            tracing::warn!(error = %e, "catalog gauges (tenants, jobs, audit seals) not measured");
        }
        self.freshness.update().await;
    }

    async fn catalog_gauges(&self) -> Result<(), sqlx::Error> {
        let counts: Vec<(String, i64)> = sqlx::query_as("SELECT status, count(*) FROM tenants GROUP BY status")
            .fetch_all(&self.catalog)
            .await?;
        let (queued, running, delay): (i64, i64, f64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'queued'), count(*) FILTER (WHERE state = 'running'), \
               coalesce(extract(epoch FROM max(now() - CASE WHEN state = 'queued' \
                   THEN greatest(created_at, run_after) ELSE locked_until END) \
                 FILTER (WHERE (state = 'queued' AND run_after <= now()) \
                            OR (state = 'running' AND locked_until < now())))::float8, 0) \
             FROM jobs WHERE state IN ('queued', 'running')",
        )
        .fetch_one(&self.catalog)
        .await?;
        for status in STATUSES {
            let count = counts
                .iter()
                .find(|(name, _)| name == status.as_str())
                .map_or(0, |(_, count)| *count);
            metrics::gauge!("silo_tenants", "status" => status.as_str()).set(count as f64);
        }
        metrics::gauge!("silo_jobs", "state" => "queued").set(queued as f64);
        metrics::gauge!("silo_jobs", "state" => "running").set(running as f64);
        metrics::gauge!("silo_job_queue_delay_seconds_max").set(delay);
        let unsealed: f64 = sqlx::query_scalar(
            "WITH head AS (SELECT l.txid, l.id FROM audit_seals s JOIN audit_log l ON l.id = s.entry \
                           ORDER BY s.seq DESC LIMIT 1) \
             SELECT coalesce(extract(epoch FROM now() - min(e.at))::float8, 0) FROM audit_log e \
             WHERE NOT EXISTS (SELECT 1 FROM head) OR (e.txid, e.id) > (SELECT txid, id FROM head)",
        )
        .fetch_one(&self.catalog)
        .await?;
        metrics::gauge!("silo_audit_unsealed_seconds_max").set(unsealed);
        Ok(())
    }
}
