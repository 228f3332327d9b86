//! `[backups] every`: each live tenant (active or suspended) is backed up that often, or as
//! often as its plan's `[backups.plans.NAME] every` says. A pass queues a `backup` job (actor
//! `scheduler` in the audit log) for every tenant whose last backup job was queued longer
//! ago than that, least recently backed up first, with at most `[backups] max_concurrent`
//! scheduled backups queued or running at once (`pg_dump` reads a whole database). A backup
//! that failed is tried again after an hour (or the period, if shorter), not at every pass.
//!
//! `[backups] verify_every` (or the plan's): the same for restore drills (`verify` jobs of
//! each live tenant's newest backup, see `crate::verify`), for tenants with a backup job that
//! succeeded; at most `max_concurrent` drills at once too, counted apart from the backups.
//!
//! Several control planes may run this at once: each pass holds a transaction-level advisory
//! lock and skips tenants that already have an unfinished job, so every due tenant is backed
//! up (or drilled) once.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{BackupPolicy, BackupsConfig};
use crate::{audit, jobs};

/// A job the schedule queues for every live tenant that is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduled {
    /// `backup` jobs, `[backups] every`.
    Backup,
    /// `verify` jobs (restore drills) of the newest backup, `[backups] verify_every`.
    Verify,
}

impl Scheduled {
    fn kind(self) -> &'static str {
        match self {
            Scheduled::Backup => "backup",
            Scheduled::Verify => "verify",
        }
    }

    /// Advisory lock key of the schedule ("silo-bks", "silo-bkv").
    fn lock(self) -> i64 {
        match self {
            Scheduled::Backup => 0x73696c6f_2d626b73,
            Scheduled::Verify => 0x73696c6f_2d626b76,
        }
    }

    fn audit_action(self) -> &'static str {
        match self {
            Scheduled::Backup => "tenant.backup",
            Scheduled::Verify => "tenant.backup.verify",
        }
    }

    /// What else a due tenant needs, as SQL on `tenants t`: a drill needs a backup to restore.
    fn also_needs(self) -> &'static str {
        match self {
            Scheduled::Backup => "true",
            Scheduled::Verify => {
                "EXISTS (SELECT 1 FROM jobs b WHERE b.tenant = t.slug AND b.kind = 'backup' AND b.state = 'succeeded')"
            }
        }
    }
}

/// A failed job is tried again after this long at most.
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(3600);

/// How often to look for due tenants: a tenth of `every`, between one second and a minute.
fn check_every(every: Duration) -> Duration {
    (every / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Queues `what` for due tenants every so often until `shutdown`; returns at once when no
/// policy (`[backups]` or a plan's) has a period for it.
pub async fn run(catalog: PgPool, what: Scheduled, config: BackupsConfig, shutdown: CancellationToken) {
    let periods = Periods::of(&config, what);
    let Some(shortest) = periods.shortest() else {
        return;
    };
    loop {
        match queue_due(&catalog, what, &periods, config.max_concurrent).await {
            Ok(0) => {}
            Ok(n) => info!(queued = n, kind = what.kind(), "scheduled jobs queued"),
            Err(e) => warn!(error = %e, kind = what.kind(), "backup schedule pass"),
        }
        tokio::select! {
            () = tokio::time::sleep(check_every(shortest)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// How often `what` is due: `[backups]`'s period, and each plan's.
#[derive(Debug, Clone, PartialEq)]
struct Periods {
    default: Option<Duration>,
    plans: Vec<(String, Option<Duration>)>,
}

impl Periods {
    /// `what`'s periods in `config`.
    fn of(config: &BackupsConfig, what: Scheduled) -> Self {
        let period = |policy: &BackupPolicy| match what {
            Scheduled::Backup => policy.every,
            Scheduled::Verify => policy.verify_every,
        };
        Periods {
            default: period(&config.policy),
            plans: config
                .plans
                .iter()
                .map(|(plan, policy)| (plan.clone(), period(policy)))
                .collect(),
        }
    }

    /// The shortest period, `[backups]`' or a plan's; None when nothing is scheduled.
    fn shortest(&self) -> Option<Duration> {
        std::iter::once(self.default)
            .chain(self.plans.iter().map(|(_, period)| *period))
            .flatten()
            .min()
    }
}

/// One pass: queues `what` for the live tenants whose last such job was queued longer ago
/// than their plan's period, least recently first, while fewer than `max_concurrent`
/// scheduled ones are unfinished; returns how many it queued.
async fn queue_due(
    catalog: &PgPool,
    what: Scheduled,
    periods: &Periods,
    max_concurrent: u32,
) -> Result<usize, sqlx::Error> {
    let mut tx = catalog.begin().await?;
    let room = jobs::scheduled_room(&mut tx, what.lock(), what.kind(), max_concurrent).await?;
    if room <= 0 {
        return Ok(0);
    }
    let (plans, plan_periods): (Vec<&str>, Vec<Option<f64>>) = periods
        .plans
        .iter()
        .map(|(plan, period)| (plan.as_str(), period.map(|p| p.as_secs_f64())))
        .unzip();
    // A plan's period, else `[backups]`'s: NULL for a tenant nothing schedules. A failed job
    // counts as the last one for at most RETRY_FAILED_AFTER.
    let due: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT t.slug FROM tenants t \
         LEFT JOIN unnest($5::text[], $6::float8[]) AS plan(name, secs) ON plan.name = t.plan \
         CROSS JOIN LATERAL (SELECT CASE WHEN plan.name IS NULL THEN $1::float8 ELSE plan.secs END AS secs) period \
         LEFT JOIN LATERAL (SELECT max(j.created_at) AS at FROM jobs j \
             WHERE j.tenant = t.slug AND j.kind = $4 \
               AND (j.state <> 'failed' \
                    OR j.created_at > now() - make_interval(secs => LEAST(period.secs, $2)))) last ON true \
         WHERE period.secs IS NOT NULL \
           AND t.status IN ('active', 'suspended') AND t.moving_to IS NULL AND t.restoring_from IS NULL \
           AND (last.at IS NULL OR last.at < now() - make_interval(secs => period.secs)) \
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.tenant = t.slug AND j.state IN ('queued','running')) \
           AND {} \
         ORDER BY last.at NULLS FIRST, t.slug LIMIT $3",
        what.also_needs()
    )))
    .bind(periods.default.map(|p| p.as_secs_f64()))
    .bind(RETRY_FAILED_AFTER.as_secs_f64())
    .bind(room)
    .bind(what.kind())
    .bind(&plans)
    .bind(&plan_periods)
    .fetch_all(&mut *tx)
    .await?;
    for slug in &due {
        let job = jobs::enqueue(&mut tx, what.kind(), Some(slug), json!({"scheduled": true})).await?;
        audit::record(
            &mut tx,
            "scheduler",
            what.audit_action(),
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
