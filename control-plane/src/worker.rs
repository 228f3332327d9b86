//! Job workers: claim a job, run its steps while renewing the lease, record the outcome.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn, Instrument};

use crate::catalog::routes::TenantStatus;
use crate::catalog::tenants;
use crate::jobs::{self, Job, JOBS_CHANNEL};
use crate::provision::{ProvisionError, Provisioner};

/// A job that failed transiently (see `ProvisionError::is_transient`) runs again until it
/// has been tried this many times since it was queued; then it fails for an operator to look
/// at, whose retry queues it with as many again.
const MAX_ATTEMPTS: i32 = 5;
/// Wait before the first automatic retry; doubled for each further one (1, 2, 4, 8 s).
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Runs jobs from the catalog queue.
pub struct Workers {
    catalog: PgPool,
    provisioner: Arc<Provisioner>,
    worker_id: String,
    lease: Duration,
    concurrency: usize,
    force_secret_delete: bool,
}

impl Workers {
    /// Workers over `catalog` running up to `concurrency` jobs at once.
    pub fn new(
        catalog: PgPool,
        provisioner: Arc<Provisioner>,
        lease: Duration,
        concurrency: usize,
        force_secret_delete: bool,
    ) -> Self {
        let worker_id = format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple());
        Self {
            catalog,
            provisioner,
            worker_id,
            lease,
            concurrency,
            force_secret_delete,
        }
    }

    /// Runs until `shutdown`; a job in progress at shutdown is left to its lease and resumed
    /// by the next claim.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let wake = Arc::new(Notify::new());
        let tracker = TaskTracker::new();
        tracker.spawn(listen_for_jobs(this.catalog.clone(), wake.clone(), shutdown.clone()));
        for n in 0..this.concurrency {
            let (this, wake, shutdown) = (this.clone(), wake.clone(), shutdown.clone());
            tracker.spawn(async move { this.work_loop(n, wake, shutdown).await });
        }
        tracker.close();
        tracker.wait().await;
    }

    async fn work_loop(&self, n: usize, wake: Arc<Notify>, shutdown: CancellationToken) {
        let worker = format!("{}/{n}", self.worker_id);
        while !shutdown.is_cancelled() {
            match jobs::claim(&self.catalog, &worker, self.lease).await {
                Ok(Some(job)) => {
                    let span = tracing::info_span!("job", id = job.id, kind = %job.kind, tenant = job.tenant.as_deref().unwrap_or(""));
                    tokio::select! {
                        () = self.execute(job).instrument(span) => {}
                        () = shutdown.cancelled() => return,
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "claim job"),
            }
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn execute(&self, job: Job) {
        info!(attempt = job.attempts, "job started");
        if job.attempts == 1 {
            let waited = (chrono::Utc::now() - job.created_at).to_std().unwrap_or_default();
            metrics::histogram!("silo_job_wait_seconds").record(waited.as_secs_f64());
        }
        let heartbeat = async {
            loop {
                tokio::time::sleep(self.lease / 3).await;
                // Tests cut the worker off from the catalog with this fail point.
                #[cfg(feature = "failpoints")]
                if fail::eval("renew-job-lease", |_| ()).is_some() {
                    continue;
                }
                match jobs::renew(&self.catalog, &job, self.lease).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => warn!(error = %e, "renew job lease"),
                }
            }
        };
        let work = async {
            let result = match job.kind.as_str() {
                "provision" => self.provisioner.provision(&job).await,
                "delete" => self.provisioner.delete(&job, self.force_secret_delete).await,
                "rotate" => self.provisioner.rotate(&job).await,
                "migrate" => self.provisioner.rollout(&job).await,
                "move" => self.provisioner.move_tenant(&job).await,
                "backup" => self.provisioner.back_up(&job).await,
                "restore" => self.provisioner.restore_tenant(&job).await,
                "verify" => self.provisioner.verify_backup(&job).await,
                other => Err(ProvisionError::InvalidJob(format!("unknown job kind {other:?}"))),
            };
            if result.as_ref().is_err_and(|e| !runs_again(&job, e)) {
                // Before the job is recorded as failed: whoever sees it failed finds the
                // tenant served again, and a crash before the record runs the job again.
                self.undo(&job).await;
            }
            result
        };
        let result = tokio::select! {
            r = work => Some(r),
            () = heartbeat => None,
        };
        let Some(result) = result else {
            warn!("lost the job's lease; another worker resumes it");
            return;
        };
        if result.as_ref().is_err_and(ProvisionError::is_login_refused) {
            // An admin password may have been rotated in the secret store since it was read.
            let provisioner = &self.provisioner;
            provisioner
                .servers
                .reload_admin_passwords(provisioner.store.as_ref())
                .await;
        }
        if let Err(e) = self.record(&job, result.as_ref().err()).await {
            error!(error = %e, "record job outcome; the job is retried when its lease expires");
        }
    }

    /// Undoes a move or a restore that failed for good, so the tenant is served as it was;
    /// only while the job is still this run's (renewing its lease says so): a worker that
    /// took it over after the lease ran out, a catalog outage say, may be running it again.
    async fn undo(&self, job: &Job) {
        if !matches!(job.kind.as_str(), "move" | "restore") {
            return;
        }
        match jobs::renew(&self.catalog, job, self.lease).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                error!(error = %e, "the failed {} is not undone: cannot tell whether the job is still this run's; retry the job", job.kind);
                return;
            }
        }
        let undone = match job.kind.as_str() {
            "move" => self.provisioner.abandon_move(job).await,
            _ => self.provisioner.abandon_restore(job).await,
        };
        if let Err(e) = undone {
            error!(error = %e, "undo the failed {}; the tenant stays unavailable until the job is retried", job.kind);
        }
    }

    /// Records the job's outcome. Nothing is recorded if this run lost the job to another.
    async fn record(&self, job: &Job, failure: Option<&ProvisionError>) -> Result<(), sqlx::Error> {
        let message = failure.map(ToString::to_string);
        let mut tx = self.catalog.begin().await?;
        if let (Some(failure), Some(message)) = (failure, &message) {
            let attempt = job.attempts_since_queued();
            if runs_again(job, failure) {
                // Every step checks what exists first, so running the job again resumes it.
                let delay = RETRY_DELAY * 2u32.pow(u32::try_from(attempt - 1).unwrap_or(0));
                warn!(error = %message, attempt = job.attempts, retry_in = ?delay, "job failed transiently; it runs again");
                if !jobs::retry_later(&mut tx, job, message, delay).await? {
                    superseded(job);
                    return Ok(());
                }
                tx.commit().await?;
                jobs::count_run(&job.kind, "retried");
                return Ok(());
            }
        }
        if !jobs::finish(&mut tx, job, message.as_deref()).await? {
            superseded(job);
            return Ok(());
        }
        if let Some(message) = &message {
            error!(error = %message, "job failed");
            // A failed provisioning or deletion leaves a tenant that cannot serve; a failed
            // rotation leaves the current credentials in place, so the tenant keeps serving.
            if let (Some(tenant), "provision" | "delete") = (&job.tenant, job.kind.as_str()) {
                tenants::set_status(&mut tx, tenant, TenantStatus::Failed, Some(message)).await?;
            }
        } else {
            info!("job succeeded");
        }
        tx.commit().await?;
        jobs::count_run(&job.kind, if message.is_some() { "failed" } else { "succeeded" });
        Ok(())
    }
}

/// Whether a run of `job` that failed with `failure` is retried on its own.
fn runs_again(job: &Job, failure: &ProvisionError) -> bool {
    failure.is_transient() && job.attempts_since_queued() < MAX_ATTEMPTS
}

/// Logs that the outcome of `run` was not recorded because another run holds the job.
fn superseded(run: &Job) {
    warn!(
        attempt = run.attempts,
        "another worker took the job over when this run's lease expired; its outcome is not recorded"
    );
}

/// Wakes a worker whenever a job is queued (NOTIFY on `silo_jobs`).
async fn listen_for_jobs(catalog: PgPool, wake: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        let mut listener = match PgListener::connect_with(&catalog).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "listen for jobs");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    () = shutdown.cancelled() => return,
                }
            }
        };
        if let Err(e) = listener.listen(JOBS_CHANNEL).await {
            warn!(error = %e, "listen for jobs");
            continue;
        }
        loop {
            tokio::select! {
                n = listener.recv() => match n {
                    Ok(_) => wake.notify_one(),
                    Err(e) => { warn!(error = %e, "job listener"); break; }
                },
                () = shutdown.cancelled() => return,
            }
        }
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "control-plane".into())
}
