//! Migration rollouts across the fleet, as a durable `migrate` job.
//!
//! Canary tenants are migrated first; if any of them fails, the rollout stops. The rest run
//! with bounded concurrency (overall and per PostgreSQL server), and the rollout halts once
//! failures cross `migrations.max_failure_percent`. Each tenant's migrations run in their own
//! transactions, so a tenant that fails keeps its previous version and the others are not
//! affected. Every tenant touched gets a `migration_runs` row (from, to, outcome, error,
//! duration). Tenants already at the target are skipped, so re-running — or a restarted
//! control plane re-claiming the job — resumes where the rollout stopped. An operator can stop
//! a running rollout (`POST /v1/jobs/{id}/cancel`): the tenants being migrated finish, no
//! other starts, and the job ends failed, to be retried later.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{Connection, PgPool};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{info, instrument, warn};

use crate::jobs::{self, Job};
use crate::names::TenantNames;
use crate::provision::{ProvisionError, Provisioner, StepContext};
use crate::servers::Servers;
use crate::tenant_schema::{self, TenantMigrations};

/// Parameters of a `migrate` job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutParams {
    /// Only these tenants (all active and suspended tenants when None).
    pub tenants: Option<Vec<String>>,
    /// Tenants migrated at once.
    pub concurrency: usize,
    /// Tenants migrated at once per server.
    pub per_server_concurrency: usize,
    /// Canary tenants.
    pub canary: usize,
    /// Halt once more than this percentage of the tenants failed.
    pub max_failure_percent: u32,
}

/// How often a running rollout writes its progress.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

struct Target {
    slug: String,
    server: String,
    names: TenantNames,
    version: i64,
}

/// How the rollout is going: tenants done and failed, and whether an operator asked it to
/// stop. Shared with the tasks migrating each tenant.
#[derive(Default)]
struct Tally {
    done: AtomicUsize,
    failed: AtomicUsize,
    stop: StopRequest,
}

impl Provisioner {
    /// Runs (or resumes) a `migrate` job.
    #[instrument(skip_all, fields(job = job.id))]
    pub async fn rollout(&self, job: &Job) -> Result<(), ProvisionError> {
        let params: RolloutParams = serde_json::from_value(job.params.clone())
            .map_err(|e| ProvisionError::InvalidJob(format!("bad params: {e}")))?;
        let migrations = Arc::new(self.migrations.load().await?);
        let target = migrations.latest_version();
        let all = self.rollout_tenants(params.tenants.as_deref()).await?;
        let total = all.len();
        let pending: Vec<Target> = all.into_iter().filter(|t| t.version < target).collect();
        let skipped = total - pending.len();
        let max_failures = total * params.max_failure_percent as usize / 100;
        let tally = Arc::new(Tally::default());
        let progress = |phase: &str| {
            json!({
                "target": target, "total": total, "skipped": skipped, "phase": phase,
                "done": skipped + tally.done.load(Ordering::Relaxed),
                "failed": tally.failed.load(Ordering::Relaxed),
            })
        };
        info!(total, pending = pending.len(), target, "rollout started");

        let canary_count = params.canary.min(pending.len());
        let mut pending = pending.into_iter();
        let canaries: Vec<Target> = pending.by_ref().take(canary_count).collect();
        self.record_step(job, "canary").await?;
        jobs::set_progress(&self.catalog, job, &progress("canary"))
            .await
            .step("record progress")?;
        let lanes = Lanes::new(params.canary.max(1), params.per_server_concurrency);
        let canary_failures = self
            .reporting_progress(
                job,
                &tally.stop,
                || progress("canary"),
                self.migrate_all(job.id, canaries, &migrations, &lanes, &tally, usize::MAX),
            )
            .await;
        self.stop_if_requested(job, &tally.stop, &progress("canary"), total)
            .await?;
        if let Some((slug, error)) = canary_failures.first() {
            jobs::set_progress(&self.catalog, job, &progress("canary"))
                .await
                .step("record progress")?;
            return Err(ProvisionError::Rollout(format!(
                "canary {slug} failed, rollout stopped: {error}"
            )));
        }

        self.record_step(job, "rollout").await?;
        jobs::set_progress(&self.catalog, job, &progress("rollout"))
            .await
            .step("record progress")?;
        let lanes = Lanes::new(params.concurrency, params.per_server_concurrency);
        let rest: Vec<Target> = pending.collect();
        let failures = self
            .reporting_progress(
                job,
                &tally.stop,
                || progress("rollout"),
                self.migrate_all(job.id, rest, &migrations, &lanes, &tally, max_failures),
            )
            .await;
        self.stop_if_requested(job, &tally.stop, &progress("rollout"), total)
            .await?;
        jobs::set_progress(&self.catalog, job, &progress("finished"))
            .await
            .step("record progress")?;
        let failed = tally.failed.load(Ordering::Relaxed);
        if failed > max_failures {
            return Err(ProvisionError::Rollout(format!(
                "halted: {failed} tenants failed (more than {}% of {total}); first: {}",
                params.max_failure_percent,
                failures.first().map(|(s, e)| format!("{s}: {e}")).unwrap_or_default()
            )));
        }
        if failed > 0 {
            let list: Vec<&str> = failures.iter().map(|(s, _)| s.as_str()).collect();
            return Err(ProvisionError::Rollout(format!(
                "{failed} of {total} tenants failed and kept their previous version: {}",
                list.join(", ")
            )));
        }
        info!(total, "rollout finished");
        Ok(())
    }

    async fn rollout_tenants(&self, only: Option<&[String]>) -> Result<Vec<Target>, ProvisionError> {
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT slug, server, database, schema_version FROM tenants \
             WHERE status IN ('active','suspended') AND ($1::text[] IS NULL OR slug = ANY($1)) ORDER BY slug",
        )
        .bind(only)
        .fetch_all(&self.catalog)
        .await
        .step("list tenants")?;
        let mut targets: Vec<Target> = rows
            .into_iter()
            .map(|(slug, server, database, version)| Target {
                slug,
                server,
                names: TenantNames::of_database(database),
                version,
            })
            .collect();
        if let Some(only) = only {
            // Canaries are the first tenants the operator named.
            targets.sort_by_key(|t| only.iter().position(|s| *s == t.slug));
        }
        Ok(targets)
    }

    /// Runs `phase`, writing the job's `progress()` every [`PROGRESS_EVERY`] meanwhile when
    /// it changed, so `GET /v1/jobs/{id}` and `siloctl migrate`'s progress bar follow the
    /// tenants as they finish. A failed write is logged: the rollout goes on.
    async fn reporting_progress<T>(
        &self,
        job: &Job,
        stop: &StopRequest,
        progress: impl Fn() -> serde_json::Value,
        phase: impl std::future::Future<Output = T>,
    ) -> T {
        tokio::pin!(phase);
        let mut ticks = tokio::time::interval(PROGRESS_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        let mut written = progress();
        loop {
            tokio::select! {
                done = &mut phase => return done,
                _ = ticks.tick() => {
                    stop.look(&self.catalog, job.id).await;
                    let now = progress();
                    if now != written {
                        if let Err(e) = jobs::set_progress(&self.catalog, job, &now).await {
                            warn!(error = %e, "record rollout progress");
                        }
                        written = now;
                    }
                }
            }
        }
    }

    /// Ends the rollout, failed, if an operator asked it to stop and tenants are left (read
    /// once more: the phase may have ended between a request and the next progress tick).
    async fn stop_if_requested(
        &self,
        job: &Job,
        stop: &StopRequest,
        progress: &serde_json::Value,
        total: usize,
    ) -> Result<(), ProvisionError> {
        let count = |key: &str| progress[key].as_u64().unwrap_or(0);
        let (done, failed) = (count("done"), count("failed"));
        if usize::try_from(done + failed).is_ok_and(|reached| reached >= total) {
            return Ok(());
        }
        stop.look(&self.catalog, job.id).await;
        let Some(by) = stop.by() else { return Ok(()) };
        jobs::set_progress(&self.catalog, job, progress)
            .await
            .step("record progress")?;
        warn!(by, done, total, "rollout stopped by an operator");
        Err(ProvisionError::Rollout(format!(
            "cancelled by {by}: {done} of {total} tenants at the target version; the others keep \
             theirs (`siloctl jobs retry {}` resumes)",
            job.id
        )))
    }

    /// Migrates `targets` through `lanes`, stopping to launch new ones once more than
    /// `max_failures` failed or an operator asked the rollout to stop. Returns the failures.
    async fn migrate_all(
        &self,
        job_id: i64,
        targets: Vec<Target>,
        migrations: &Arc<TenantMigrations>,
        lanes: &Lanes,
        tally: &Arc<Tally>,
        max_failures: usize,
    ) -> Vec<(String, String)> {
        let mut running = JoinSet::new();
        let mut failures = Vec::new();
        for t in targets {
            if tally.failed.load(Ordering::Relaxed) > max_failures || tally.stop.by().is_some() {
                break;
            }
            let (global, per_server) = lanes.acquire(&t.server).await;
            if tally.stop.by().is_some() {
                break;
            }
            let ctx = TenantRun {
                catalog: self.catalog.clone(),
                servers: self.servers.clone(),
                migrations: migrations.clone(),
                tally: tally.clone(),
                job_id,
            };
            running.spawn(async move {
                let result = ctx.run(&t).await;
                drop((global, per_server));
                (t.slug, result)
            });
            while let Some(done) = running.try_join_next() {
                collect(done, &mut failures);
            }
        }
        while let Some(done) = running.join_next().await {
            collect(done, &mut failures);
        }
        failures
    }
}

fn collect(done: Result<(String, Result<(), String>), tokio::task::JoinError>, failures: &mut Vec<(String, String)>) {
    match done {
        Ok((_, Ok(()))) => {}
        Ok((slug, Err(e))) => failures.push((slug, e)),
        Err(e) => failures.push(("?".into(), format!("migration task panicked: {e}"))),
    }
}

/// An operator's request that the rollout stop (`POST /v1/jobs/{id}/cancel`), as last read
/// from the job's row.
#[derive(Default)]
struct StopRequest(std::sync::OnceLock<String>);

impl StopRequest {
    /// Who asked, once someone did.
    fn by(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }

    /// Reads the job's row; a failed read is logged and tried again at the next tick.
    async fn look(&self, catalog: &PgPool, job_id: i64) {
        if self.by().is_some() {
            return;
        }
        match jobs::cancel_requested(catalog, job_id).await {
            Ok(Some(by)) => {
                let _ = self.0.set(by);
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "read whether the rollout was cancelled"),
        }
    }
}

/// Concurrency limits: overall and per server.
struct Lanes {
    global: Arc<Semaphore>,
    per_server_limit: usize,
    per_server: std::sync::Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Lanes {
    fn new(global: usize, per_server: usize) -> Self {
        Self {
            global: Arc::new(Semaphore::new(global.max(1))),
            per_server_limit: per_server.max(1),
            per_server: std::sync::Mutex::new(HashMap::new()),
        }
    }

    async fn acquire(&self, server: &str) -> (tokio::sync::OwnedSemaphorePermit, tokio::sync::OwnedSemaphorePermit) {
        let lane = {
            let mut map = self
                .per_server
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            map.entry(server.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_server_limit)))
                .clone()
        };
        // The semaphores are never closed, so acquiring cannot fail.
        let per_server = lane
            .acquire_owned()
            .await
            .unwrap_or_else(|_| unreachable!("semaphore closed"));
        let global = self
            .global
            .clone()
            .acquire_owned()
            .await
            .unwrap_or_else(|_| unreachable!("semaphore closed"));
        (global, per_server)
    }
}

/// What one tenant's migration needs, owned so it can run on its own task.
struct TenantRun {
    catalog: PgPool,
    servers: Arc<Servers>,
    migrations: Arc<TenantMigrations>,
    tally: Arc<Tally>,
    job_id: i64,
}

impl TenantRun {
    /// Migrates one tenant, then records in one catalog statement the version it is at and
    /// its `migration_runs` row.
    async fn run(&self, t: &Target) -> Result<(), String> {
        let started = Instant::now();
        let target = self.migrations.latest_version();
        let (to, migrated) = match self.migrate(t).await {
            Ok(to) => (to, Ok(())),
            Err((to, e)) => (to, Err(e)),
        };
        let elapsed = started.elapsed().as_millis() as i64;
        let recorded = sqlx::query(
            "WITH version AS (UPDATE tenants SET schema_version = $4, updated_at = now() WHERE slug = $2) \
             INSERT INTO migration_runs (job_id, slug, from_version, to_version, target_version, outcome, error, duration_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (job_id, slug) DO UPDATE SET \
             from_version = EXCLUDED.from_version, to_version = EXCLUDED.to_version, outcome = EXCLUDED.outcome, \
             error = EXCLUDED.error, duration_ms = EXCLUDED.duration_ms, finished_at = now()",
        )
        .bind(self.job_id)
        .bind(&t.slug)
        .bind(t.version)
        .bind(to)
        .bind(target)
        .bind(if migrated.is_ok() { "succeeded" } else { "failed" })
        .bind(migrated.as_ref().err())
        .bind(elapsed)
        .execute(&self.catalog)
        .await;
        let result = match (migrated, recorded) {
            (Err(e), recorded) => {
                if let Err(record) = recorded {
                    warn!(error = %record, tenant = %t.slug, "record migration run");
                }
                Err(e)
            }
            (Ok(()), Err(e)) => Err(format!("record schema version: {e}")),
            (Ok(()), Ok(_)) => Ok(()),
        };
        match &result {
            Ok(()) => self.tally.done.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                warn!(tenant = %t.slug, error = %e, "tenant migration failed");
                self.tally.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        result
    }

    /// Migrates one tenant; returns the version it is at, also on failure.
    async fn migrate(&self, t: &Target) -> Result<i64, (i64, String)> {
        let fail = |e: String| (t.version, e);
        let server = self
            .servers
            .get(&t.server)
            .ok_or_else(|| fail(format!("server {} is not configured", t.server)))?;
        let mut conn = server
            .connect(t.names.database())
            .await
            .map_err(|e| fail(format!("connect: {e}")))?;
        let applied = self
            .migrations
            .apply_behind(&mut conn, &t.names.owner_role(), None)
            .await;
        let version = match &applied {
            Ok(version) => *version,
            Err(_) => tenant_schema::applied_version(&mut conn).await.unwrap_or(t.version),
        };
        let _ = conn.close().await;
        applied.map_err(|e| (version, e.to_string()))
    }
}
