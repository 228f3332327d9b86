//! Waiting for jobs: poll `GET /v1/jobs/{id}` until the job succeeds or fails, with a spinner
//! (or a progress bar for rollouts) when stderr is a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use super::client::{segment, ApiClient};
use super::output::text;

/// Time before the first poll; each next wait is a quarter longer, up to [`MAX_POLL_INTERVAL`]:
/// short jobs are seen done at once, and a long rollout asks (and adds to the admin API's
/// access log) about once a second.
const FIRST_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// The longest wait between polls.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Consecutive transient errors (server restarting) tolerated while waiting.
const MAX_TRANSIENT_ERRORS: u32 = 25;

/// A job's id as text (ids may be numbers or strings).
pub(crate) fn job_id(job: &Value) -> anyhow::Result<String> {
    match job.get("id") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => bail!("the API returned a job without an id"),
    }
}

/// The job's state.
pub(crate) fn state(job: &Value) -> &str {
    job.get("state").and_then(Value::as_str).unwrap_or("")
}

/// True once the job will not change any more.
pub(crate) fn is_terminal(job: &Value) -> bool {
    matches!(state(job), "succeeded" | "failed")
}

/// The one-line description of a failed job.
pub(crate) fn failure(job: &Value) -> String {
    let id = text(job.get("id").unwrap_or(&Value::Null));
    let kind = text(job.get("kind").unwrap_or(&Value::Null));
    let step = text(job.get("step").unwrap_or(&Value::Null));
    let error = text(job.get("error").unwrap_or(&Value::Null));
    let at = if step == "-" {
        String::new()
    } else {
        format!(" at step {step}")
    };
    format!("job {id} ({kind}) failed{at}: {error} (retry with `siloctl jobs retry {id}`)")
}

/// Polls `job` until it is terminal and returns its final state. `label` prefixes the
/// spinner message (e.g. "rotating acme (2/5)").
pub(crate) async fn wait_job(client: &ApiClient, job: &Value, label: &str) -> anyhow::Result<Value> {
    poll(client, job, label, Progress::new()).await
}

/// [`wait_job`] without a spinner: for a caller that shows progress its own way.
pub(crate) async fn wait_job_quietly(client: &ApiClient, job: &Value) -> anyhow::Result<Value> {
    poll(client, job, "", Progress(None)).await
}

async fn poll(client: &ApiClient, job: &Value, label: &str, bar: Progress) -> anyhow::Result<Value> {
    let id = job_id(job)?;
    let path = format!("/v1/jobs/{}", segment(&id));
    let mut job = job.clone();
    let mut transient = 0;
    let mut interval = FIRST_POLL_INTERVAL;
    loop {
        bar.show(label, &job);
        if is_terminal(&job) {
            bar.finish();
            return Ok(job);
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 5 / 4).min(MAX_POLL_INTERVAL);
        match client.get(&path).await {
            Ok(next) => {
                transient = 0;
                job = next;
            }
            Err(e) if e.is_transient() && transient < MAX_TRANSIENT_ERRORS => transient += 1,
            Err(e) => {
                bar.finish();
                return Err(anyhow!("waiting for job {id}: {e}"));
            }
        }
    }
}

/// The spinner or bar on stderr; nothing at all when stderr is not a terminal.
struct Progress(Option<ProgressBar>);

impl Progress {
    fn new() -> Self {
        if !std::io::stderr().is_terminal() {
            return Self(None);
        }
        let bar = ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(100));
        Self(Some(bar))
    }

    fn show(&self, label: &str, job: &Value) {
        let Some(bar) = &self.0 else { return };
        let step = text(job.get("step").unwrap_or(&Value::Null));
        let message = format!("{label}: {} {}", state(job), if step == "-" { "" } else { &step });
        let progress = job.get("progress");
        let count = |k: &str| progress.and_then(|p| p.get(k)).and_then(Value::as_u64);
        if let Some(total) = count("total").filter(|t| *t > 0) {
            if bar.length() != Some(total) {
                bar.set_length(total);
                if let Ok(style) = ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}")
                    .map(|s| s.progress_chars("=> "))
                {
                    bar.set_style(style);
                }
            }
            bar.set_position(count("done").unwrap_or(0) + count("failed").unwrap_or(0));
            let failed = count("failed").unwrap_or(0);
            let suffix = if failed > 0 {
                format!(" ({failed} failed)")
            } else {
                String::new()
            };
            bar.set_message(format!("{}{suffix}", message.trim_end()));
        } else {
            bar.set_message(message.trim_end().to_owned());
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
