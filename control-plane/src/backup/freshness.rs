//! How fresh the live tenants' backups are, for alerting, as the control plane's `/metrics`
//! shows them: `silo_backup_age_seconds_max`, the longest any live tenant has gone without a
//! backup (since its newest one, or since it was created when it has none), and
//! `silo_tenants_without_backup`; and `silo_backup_unverified_seconds_max`, the longest any
//! live tenant with a backup has gone without a restore drill that succeeded (since its last
//! one, or since its first backup when it never had one). Measured when `/metrics` is read (see
//! `crate::gauges`): a directory listing per live tenant and two catalog queries.

use std::time::{Duration, SystemTime};

use sqlx::PgPool;

use super::Backups;
use crate::names::TenantSlug;

/// Measures backup freshness for `/metrics`.
pub struct Freshness {
    catalog: PgPool,
    backups: Backups,
}

/// One measurement.
struct Measured {
    oldest: Duration,
    without_backup: usize,
    unverified: f64,
}

impl Freshness {
    /// Freshness of the backups `backups` takes of the tenants in `catalog`.
    pub fn new(catalog: PgPool, backups: Backups) -> Self {
        Self { catalog, backups }
    }

    /// Sets the gauges, unless backups are not configured. A failure is logged; the gauges
    /// keep their last values.
    pub async fn update(&self) {
        if !self.backups.configured() {
            return;
        }
        match self.measure().await {
            Ok(m) => {
                metrics::gauge!("silo_backup_age_seconds_max").set(m.oldest.as_secs_f64());
                metrics::gauge!("silo_tenants_without_backup").set(m.without_backup as f64);
                metrics::gauge!("silo_backup_unverified_seconds_max").set(m.unverified);
            }
            Err(e) => tracing::warn!(error = %e, "backup freshness not measured"),
        }
    }

    async fn measure(&self) -> anyhow::Result<Measured> {
        let tenants: Vec<(String, chrono::DateTime<chrono::Utc>)> =
            sqlx::query_as("SELECT slug, created_at FROM tenants WHERE status IN ('active', 'suspended')")
                .fetch_all(&self.catalog)
                .await?;
        let unverified: f64 = sqlx::query_scalar(
            "SELECT coalesce(max(extract(epoch FROM now() - coalesce(drilled.at, backed_up.first)))::float8, 0) \
             FROM tenants t \
             JOIN LATERAL (SELECT min(updated_at) AS first FROM jobs \
                 WHERE tenant = t.slug AND kind = 'backup' AND state = 'succeeded') backed_up ON backed_up.first IS NOT NULL \
             LEFT JOIN LATERAL (SELECT max(updated_at) AS at FROM jobs \
                 WHERE tenant = t.slug AND kind = 'verify' AND state = 'succeeded') drilled ON true \
             WHERE t.status IN ('active', 'suspended')",
        )
        .fetch_one(&self.catalog)
        .await?;
        let now = SystemTime::now();
        let mut measured = Measured {
            oldest: Duration::ZERO,
            without_backup: 0,
            unverified,
        };
        for (slug, created_at) in tenants {
            let Ok(slug) = TenantSlug::parse(&slug) else {
                continue;
            };
            let since = match self.backups.newest(&slug)? {
                Some(newest) => newest,
                None => {
                    measured.without_backup += 1;
                    created_at.into()
                }
            };
            measured.oldest = measured.oldest.max(now.duration_since(since).unwrap_or_default());
        }
        Ok(measured)
    }
}
