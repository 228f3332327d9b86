//! `siloctl server drain NAME --to SERVER`: every active and suspended tenant on a server
//! moved to another, `concurrency` at a time, so that only those few answer 503 at once (a
//! move job marks its tenant unavailable as soon as it is queued). Each move is an ordinary
//! `move` job: one interrupted by Ctrl-C goes on in the control plane, and running the command
//! again picks up what is left (a tenant whose move is running is waited for, not moved twice).

use std::io::IsTerminal;

use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tokio::task::JoinSet;

use super::args::Output;
use super::client::{segment, ApiClient};
use super::output::{field, items, print_json};
use super::usage;
use super::wait::{self, wait_job_quietly};

/// What became of one tenant.
enum Outcome {
    /// Moved by this job.
    Moved(Value),
    /// Not moved: why.
    Failed(String),
}

/// How each tenant is moved.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MoveFlags {
    /// A `to` in another region than `from` is refused unless this is set.
    pub(crate) allow_region_change: bool,
    /// Each tenant is served while its database is copied.
    pub(crate) online: bool,
}

/// Moves every active and suspended tenant on server `from` to server `to`, `concurrency`
/// at a time, as `flags` say; fails (exit 1) unless none is left on `from`.
pub(crate) async fn drain(
    client: &ApiClient,
    out: Output,
    from: &str,
    to: &str,
    concurrency: usize,
    flags: MoveFlags,
) -> anyhow::Result<()> {
    let MoveFlags {
        allow_region_change,
        online,
    } = flags;
    if from == to {
        return Err(usage("--to must name another server than the one drained"));
    }
    let servers = client.get("/v1/servers").await?;
    let mut regions = Vec::new();
    for name in [from, to] {
        let Some(server) = items(&servers).iter().find(|s| s["name"] == name) else {
            return Err(usage(format!(
                "no server named {name:?} (siloctl server list shows them)"
            )));
        };
        regions.push(server["region"].as_str().unwrap_or("no region").to_owned());
    }
    if regions[0] != regions[1] && !allow_region_change {
        return Err(usage(format!(
            "{from} is in {}, {to} in {}: --allow-region-change moves the tenants' data there",
            regions[0], regions[1]
        )));
    }
    let tenants = client.get(&format!("/v1/tenants?server={}", segment(from))).await?;
    let (movable, stuck): (Vec<&Value>, Vec<&Value>) = items(&tenants)
        .iter()
        .partition(|t| matches!(t["status"].as_str(), Some("active" | "suspended")));
    let skipped: Vec<Value> = stuck
        .iter()
        .map(|t| json!({"slug": t["slug"], "status": t["status"]}))
        .collect();

    let bar = progress(movable.len());
    let mut queue = movable.iter().map(|t| field(t, "slug"));
    let mut lanes = JoinSet::new();
    let (mut moved, mut failed) = (Vec::new(), Vec::new());
    loop {
        while lanes.len() < concurrency {
            let Some(slug) = queue.next() else { break };
            let body = json!({ "server": to, "allow_region_change": allow_region_change, "online": online });
            lanes.spawn(move_one(client.clone(), slug, body));
        }
        let finished = tokio::select! {
            finished = lanes.join_next() => finished,
            _ = tokio::signal::ctrl_c() => {
                bar.finish_and_clear();
                bail!("interrupted: the moves already queued go on; run the same command again to finish");
            }
        };
        let Some(finished) = finished else { break };
        let (slug, outcome) = finished?;
        let line = match &outcome {
            Outcome::Moved(job) => format!("moved {slug} to {to} (job {})", field(job, "id")),
            Outcome::Failed(error) => format!("not moved: {slug}: {error}"),
        };
        if out == Output::Table {
            bar.suspend(|| say!("{line}"));
        }
        bar.inc(1);
        match outcome {
            Outcome::Moved(job) => moved.push(json!({"slug": slug, "job": job["id"]})),
            Outcome::Failed(error) => failed.push(json!({"slug": slug, "error": error})),
        }
    }
    bar.finish_and_clear();

    match out {
        Output::Json => print_json(&json!({"moved": moved, "failed": failed, "skipped": skipped})),
        Output::Table => {
            for tenant in &skipped {
                say!(
                    "skipped: {} is {} (only active and suspended tenants move)",
                    field(tenant, "slug"),
                    field(tenant, "status")
                );
            }
        }
    }
    let left = failed.len() + skipped.len();
    if left > 0 {
        bail!("{left} tenant(s) are still on {from}");
    }
    if out == Output::Table {
        say!("{from} drained: {} tenant(s) moved to {to}", moved.len());
    }
    Ok(())
}

/// Queues the move of `slug` asked for by `body` (or finds the one running) and waits for it.
async fn move_one(client: ApiClient, slug: String, body: Value) -> (String, Outcome) {
    let queued = client
        .post(&format!("/v1/tenants/{}/move", segment(&slug)), &body)
        .await;
    let outcome = match queued {
        Err(e) => Outcome::Failed(e.to_string()),
        Ok(resp) => match wait_job_quietly(&client, &resp["job"]).await {
            Err(e) => Outcome::Failed(e.to_string()),
            Ok(job) if wait::state(&job) == "succeeded" => Outcome::Moved(job),
            Ok(job) => Outcome::Failed(wait::failure(&job)),
        },
    };
    (slug, outcome)
}

/// A bar of `total` moves on stderr when it is a terminal; hidden otherwise.
fn progress(total: usize) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(u64::try_from(total).unwrap_or(u64::MAX));
    if let Ok(style) = ProgressStyle::with_template("[{bar:30}] {pos}/{len} moved {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
