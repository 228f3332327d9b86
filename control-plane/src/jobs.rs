//! Durable jobs: rows in the catalog that workers claim with a lease.
//!
//! A worker claims the oldest runnable job with `FOR UPDATE SKIP LOCKED` (so several control
//! planes share the queue), renews its lease while it works, and records the step it reached.
//! A job whose worker died is claimed again when its lease expires and resumes: every step is
//! idempotent. New jobs are announced with NOTIFY so idle workers start at once.
//!
//! Each claim is a run of the job, numbered by `attempts`. A worker that lost its lease (it
//! stalled past it and another worker claimed the job) may still be running: the writes of a
//! run that is no longer the job's latest ([`set_step`], [`set_progress`], [`finish`],
//! [`retry_later`]) change nothing and say so, so only the run that holds the job records its
//! steps and its outcome.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

/// Every kind of job.
pub const KINDS: [&str; 8] = [
    "provision",
    "delete",
    "rotate",
    "migrate",
    "move",
    "backup",
    "restore",
    "verify",
];

/// NOTIFY channel that wakes workers when a job is queued.
pub const JOBS_CHANNEL: &str = "silo_jobs";

/// A job as the admin API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Job {
    /// Id.
    pub id: i64,
    /// `provision`, `delete`, ...
    pub kind: String,
    /// The tenant it works on, if any.
    pub tenant: Option<String>,
    /// `queued`, `running`, `succeeded` or `failed`.
    pub state: String,
    /// The last step reached.
    pub step: Option<String>,
    /// Times it was claimed.
    pub attempts: i32,
    /// Every step a run of it had started when this run claimed it.
    #[serde(skip)]
    pub steps_started: Vec<String>,
    /// `attempts` when an operator last queued it again (0 if never).
    #[serde(skip)]
    pub attempts_before_requeue: i32,
    /// Why it failed.
    pub error: Option<String>,
    /// Kind-specific progress.
    pub progress: Value,
    /// Kind-specific parameters (never secrets).
    #[serde(skip)]
    pub params: Value,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str =
    "id, kind, tenant, state, step, attempts, steps_started, attempts_before_requeue, error, progress, params, created_at, updated_at";

/// The condition that a statement binding a job's id as `$1` and a run's `attempts` as `$2`
/// writes the job's running run.
const THIS_RUN: &str = "id = $1 AND attempts = $2 AND state = 'running'";

impl Job {
    /// Times it was claimed since it was last queued (by its creation or an operator's retry).
    pub fn attempts_since_queued(&self) -> i32 {
        self.attempts - self.attempts_before_requeue
    }
}

/// Queues a job and wakes the workers (on commit).
pub async fn enqueue(
    tx: &mut PgConnection,
    kind: &str,
    tenant: Option<&str>,
    params: Value,
) -> Result<Job, sqlx::Error> {
    enqueue_after(tx, kind, tenant, params, Duration::ZERO).await
}

/// Queues a job that no worker starts before `delay` has passed.
pub async fn enqueue_after(
    tx: &mut PgConnection,
    kind: &str,
    tenant: Option<&str>,
    params: Value,
    delay: Duration,
) -> Result<Job, sqlx::Error> {
    let job = sqlx::query_as::<_, Job>(sqlx::AssertSqlSafe(format!(
        "INSERT INTO jobs (kind, tenant, params, run_after) \
         VALUES ($1, $2, $3, now() + make_interval(secs => $4)) RETURNING {COLUMNS}"
    )))
    .bind(kind)
    .bind(tenant)
    .bind(params)
    .bind(delay.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(JOBS_CHANNEL)
        .bind(job.id.to_string())
        .execute(&mut *tx)
        .await?;
    Ok(job)
}

/// The job `id`.
pub async fn get(exec: &mut PgConnection, id: i64) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as::<_, Job>(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM jobs WHERE id = $1")))
        .bind(id)
        .fetch_optional(exec)
        .await
}

/// Which jobs [`list`] returns: all of them when every field is None.
#[derive(Debug, Default)]
pub struct Filter {
    /// Only in this state (`queued`, `running`, `succeeded`, `failed`).
    pub state: Option<String>,
    /// Only of this kind (`provision`, `rotate`, ...).
    pub kind: Option<String>,
    /// Only for this tenant.
    pub tenant: Option<String>,
    /// Only older than this id (the next page).
    pub before: Option<i64>,
}

/// The newest `limit` jobs matching `filter`.
pub async fn list(pool: &PgPool, filter: &Filter, limit: i64) -> Result<Vec<Job>, sqlx::Error> {
    sqlx::query_as::<_, Job>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM jobs \
         WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR kind = $2) \
           AND ($3::text IS NULL OR tenant = $3) AND ($4::bigint IS NULL OR id < $4) \
         ORDER BY id DESC LIMIT $5"
    )))
    .bind(&filter.state)
    .bind(&filter.kind)
    .bind(&filter.tenant)
    .bind(filter.before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Claims the oldest runnable job (queued, or running with an expired lease).
pub async fn claim(pool: &PgPool, worker: &str, lease: Duration) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as::<_, Job>(sqlx::AssertSqlSafe(format!(
        "UPDATE jobs SET state = 'running', locked_by = $1, \
           locked_until = now() + make_interval(secs => $2), attempts = attempts + 1, updated_at = now() \
         WHERE id = (SELECT id FROM jobs \
                     WHERE (state = 'queued' AND run_after <= now()) \
                        OR (state = 'running' AND locked_until < now()) \
                     ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1) \
         RETURNING {COLUMNS}"
    )))
    .bind(worker)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// Renews the lease of the job's run `run`; false if `run` is no longer the job's running run
/// (its lease expired and another worker claimed the job).
pub async fn renew(pool: &PgPool, run: &Job, lease: Duration) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE jobs SET locked_until = now() + make_interval(secs => $3) WHERE {THIS_RUN}"
    )))
    .bind(run.id)
    .bind(run.attempts)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Counts how long a job step took (`silo_job_step_seconds{kind,step}`: bounded labels).
pub fn observe_step(kind: &'static str, step: &'static str, started: std::time::Instant) {
    metrics::histogram!("silo_job_step_seconds", "kind" => kind, "step" => step)
        .record(started.elapsed().as_secs_f64());
}

/// Counts how a run of a job ended (`silo_job_runs_total{kind,outcome}`): `succeeded`,
/// `failed`, or `retried` (a transient failure; the job runs again).
pub fn count_run(kind: &str, outcome: &'static str) {
    let kind = match kind {
        "provision" => "provision",
        "delete" => "delete",
        "rotate" => "rotate",
        "migrate" => "migrate",
        "move" => "move",
        "backup" => "backup",
        _ => "other",
    };
    metrics::counter!("silo_job_runs_total", "kind" => kind, "outcome" => outcome).increment(1);
}

/// Records the step the job's run `run` reached (and that a run started it); false (nothing
/// recorded) if `run` is no longer the job's running run.
pub async fn set_step(pool: &PgPool, run: &Job, step: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE jobs SET step = $3, updated_at = now(), steps_started = CASE WHEN $3 = ANY (steps_started) \
           THEN steps_started ELSE array_append(steps_started, $3) END WHERE {THIS_RUN}"
    )))
    .bind(run.id)
    .bind(run.attempts)
    .bind(step)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Replaces the job's progress object, unless `run` is no longer the job's running run.
pub async fn set_progress(pool: &PgPool, run: &Job, progress: &Value) -> Result<(), sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE jobs SET progress = $3, updated_at = now() WHERE {THIS_RUN}"
    )))
    .bind(run.id)
    .bind(run.attempts)
    .bind(progress)
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks the job's run `run` finished: `succeeded` when `error` is None, else `failed` with
/// the error. False (nothing recorded) if `run` is no longer the job's running run.
pub async fn finish(tx: &mut PgConnection, run: &Job, error: Option<&str>) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE jobs SET state = CASE WHEN $3::text IS NULL THEN 'succeeded' ELSE 'failed' END, \
           error = $3, locked_by = NULL, locked_until = NULL, updated_at = now(), finished_at = now() \
         WHERE {THIS_RUN}"
    )))
    .bind(run.id)
    .bind(run.attempts)
    .bind(error)
    .execute(tx)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Queues a job whose run `run` failed transiently to run again after `delay`, keeping
/// `error` as the reason it is waiting. False (nothing changed) if `run` is no longer the
/// job's running run.
pub async fn retry_later(
    tx: &mut PgConnection,
    run: &Job,
    error: &str,
    delay: std::time::Duration,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE jobs SET state = 'queued', error = $3, locked_by = NULL, locked_until = NULL, \
           run_after = now() + make_interval(secs => $4), updated_at = now() \
         WHERE {THIS_RUN}"
    )))
    .bind(run.id)
    .bind(run.attempts)
    .bind(error)
    .bind(delay.as_secs_f64())
    .execute(tx)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Queues a failed job again. Returns None if there is no such job; Err(state) if it is not
/// failed.
pub async fn requeue(tx: &mut PgConnection, id: i64) -> Result<Option<Result<Job, String>>, sqlx::Error> {
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    match state.as_deref() {
        None => Ok(None),
        Some("failed") => {
            let job = sqlx::query_as::<_, Job>(sqlx::AssertSqlSafe(format!(
                "UPDATE jobs SET state = 'queued', error = NULL, attempts_before_requeue = attempts, \
                   cancel_requested_by = NULL, updated_at = now(), finished_at = NULL \
                 WHERE id = $1 RETURNING {COLUMNS}"
            )))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(JOBS_CHANNEL)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
            Ok(Some(Ok(job)))
        }
        Some(other) => Ok(Some(Err(other.to_owned()))),
    }
}

/// Kinds of job a queued one of which has changed nothing yet (the others mark their tenant
/// when they are queued), so that cancelling it is only not running it.
const CANCELLED_UNSTARTED: [&str; 4] = ["backup", "verify", "rotate", "migrate"];

/// What [`cancel`] did.
#[derive(Debug)]
pub enum Cancel {
    /// The job was waiting to run (first or again): it is failed now, as cancelled.
    Unstarted(Job),
    /// The job is a running rollout: it migrates no further tenant and then ends failed.
    Stopping(Job),
    /// The job cannot be stopped halfway, or has changed things already when queued.
    Refused(Job),
    /// The job had ended.
    Ended(Job),
}

/// Cancels job `id` for `actor`, as far as it can be: see [`Cancel`]. None if there is no
/// such job.
pub async fn cancel(tx: &mut PgConnection, id: i64, actor: &str) -> Result<Option<Cancel>, sqlx::Error> {
    let Some(job) = sqlx::query_as::<_, Job>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(None);
    };
    let cancelled = match (job.state.as_str(), job.kind.as_str()) {
        ("queued", kind) if CANCELLED_UNSTARTED.contains(&kind) => Cancel::Unstarted(
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "UPDATE jobs SET state = 'failed', error = $2, updated_at = now(), finished_at = now() \
                 WHERE id = $1 RETURNING {COLUMNS}"
            )))
            .bind(id)
            .bind(if job.attempts == 0 {
                format!("cancelled by {actor} before it started")
            } else {
                format!("cancelled by {actor} while it waited to run again")
            })
            .fetch_one(&mut *tx)
            .await?,
        ),
        ("running", "migrate") => {
            sqlx::query("UPDATE jobs SET cancel_requested_by = $2, updated_at = now() WHERE id = $1")
                .bind(id)
                .bind(actor)
                .execute(&mut *tx)
                .await?;
            Cancel::Stopping(job)
        }
        ("queued" | "running", _) => Cancel::Refused(job),
        _ => Cancel::Ended(job),
    };
    Ok(Some(cancelled))
}

/// Who asked job `id` to stop, if anyone did since it was last queued.
pub async fn cancel_requested(pool: &PgPool, id: i64) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT cancel_requested_by FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .map(Option::flatten)
}

/// Locks the jobs table against new jobs until the transaction ends (so a rollout and a move
/// never start at once) and returns the unfinished migration rollout, if any.
pub async fn lock_for_rollout(tx: &mut PgConnection) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    sqlx::query_scalar("SELECT id FROM jobs WHERE kind = 'migrate' AND state IN ('queued','running') LIMIT 1")
        .fetch_optional(tx)
        .await
}

/// How many more scheduled `kind` jobs (params `"scheduled": true`) may be queued without
/// more than `max` queued or running at once. Takes the schedule's transaction-level advisory
/// lock `lock` first, so that control planes scheduling at the same time count right.
pub async fn scheduled_room(tx: &mut PgConnection, lock: i64, kind: &str, max: u32) -> Result<i64, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock)
        .execute(&mut *tx)
        .await?;
    let outstanding: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE kind = $1 AND state IN ('queued','running') \
         AND params->>'scheduled' = 'true'",
    )
    .bind(kind)
    .fetch_one(&mut *tx)
    .await?;
    Ok(i64::from(max) - outstanding)
}

/// The unfinished job of `kind` for `tenant`, if any.
pub async fn active_for_tenant(exec: &mut PgConnection, tenant: &str) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as::<_, Job>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM jobs WHERE tenant = $1 AND state IN ('queued','running') ORDER BY id LIMIT 1"
    )))
    .bind(tenant)
    .fetch_optional(exec)
    .await
}
