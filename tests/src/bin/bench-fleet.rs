//! Fleet benchmark (issue: fast onboarding and fleet migrations). Run with `scripts/bench fleet`.
//!
//! Prints, from one run on this machine, against a throw-away PostgreSQL cluster:
//! - provisioning time per tenant (p50, p95) without and with the template database, over
//!   `SILO_BENCH_TENANTS` (default 200) tenants created one after another; the time is the
//!   job's own (queued → finished), i.e. role, database, grants, schema, secret, first key;
//! - rollout time of a new migration (an added column) across those tenants at concurrency 1
//!   and at the default concurrency, one tenant's median time, and the ratios;
//! - the same rollout across 50 tenants, the fleet size of the django-tenants reference.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use reqwest::Method;
use serde_json::{json, Value};
use silo_tests::stack::{Stack, StackOptions};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn provision_times(stack: &Stack, prefix: &str, n: usize) -> anyhow::Result<(Vec<String>, Vec<f64>)> {
    let mut slugs = Vec::with_capacity(n);
    for i in 0..n {
        let slug = format!("{prefix}{i:04}");
        stack.create_tenant(&slug).await?;
        slugs.push(slug);
    }
    let mut ms: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM (finished_at - created_at))::float8 * 1000 FROM jobs \
         WHERE kind = 'provision' AND tenant = ANY($1) AND state = 'succeeded'",
    )
    .bind(&slugs)
    .fetch_all(stack.catalog())
    .await?;
    ms.sort_by(f64::total_cmp);
    Ok((slugs, ms))
}

async fn rollout(stack: &Stack, tenants: &[String], concurrency: Option<usize>) -> anyhow::Result<(Duration, f64)> {
    let mut body = json!({"tenants": tenants, "canary": 0});
    if let Some(c) = concurrency {
        body["concurrency"] = json!(c);
    }
    let started = Instant::now();
    let (status, resp) = stack.admin(Method::POST, "/v1/migrations", Some(body)).await?;
    if !status.is_success() {
        bail!("start rollout: {status} {resp}");
    }
    let id = resp["job"]["id"].as_i64().context("job id")?;
    let job: Value = loop {
        let (_, job) = stack.admin(Method::GET, &format!("/v1/jobs/{id}"), None).await?;
        if matches!(job["state"].as_str(), Some("succeeded" | "failed")) {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let elapsed = started.elapsed();
    if job["state"] != "succeeded" {
        bail!("rollout failed: {job}");
    }
    let mut per_tenant: Vec<f64> =
        sqlx::query_scalar("SELECT duration_ms::float8 FROM migration_runs WHERE job_id = $1")
            .bind(id)
            .fetch_all(stack.catalog())
            .await?;
    per_tenant.sort_by(f64::total_cmp);
    Ok((elapsed, percentile(&per_tenant, 0.5)))
}

/// Where provisioning time goes: the control plane's own step timings (median).
async fn print_step_medians(stack: &Stack) -> anyhow::Result<()> {
    let text = reqwest::get(format!("http://{}/metrics", stack.control_plane_addr()))
        .await?
        .text()
        .await?;
    println!("\ncontrol plane timings with the template, median ms:");
    for line in text.lines() {
        let wanted = (line.starts_with("silo_job_step_seconds{") && line.contains("kind=\"provision\""))
            || line.starts_with("silo_job_wait_seconds{");
        if wanted && line.contains("quantile=\"0.5\"") {
            let (labels, value) = line.rsplit_once(' ').context("metric line")?;
            let ms = value.parse::<f64>().unwrap_or(f64::NAN) * 1000.0;
            println!("    {labels:<70} {ms:>7.1}");
        }
    }
    Ok(())
}

fn add_migration(dir: &std::path::Path, version: u32) -> anyhow::Result<()> {
    std::fs::write(
        dir.join(format!("{version:04}_bench_column_{version}.sql")),
        format!("ALTER TABLE tasks ADD COLUMN bench_{version} text;\n"),
    )?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("SILO_BENCH_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir()?;
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/tenant/0001_init.sql");
    std::fs::copy(shipped, dir.path().join("0001_init.sql"))?;
    let options = |templates: bool| StackOptions {
        tenant_migrations_dir: Some(dir.path().to_owned()),
        extra_toml: format!("[migrations]\ntemplates = {templates}\n"),
        ..StackOptions::default()
    };
    println!("silo fleet benchmark: {n} tenants, PostgreSQL on 127.0.0.1, local secret store");

    // Templates first, so the control plane's step timings printed below are theirs alone.
    let stack = Stack::start(options(true)).await?;
    let (slugs, with) = provision_times(&stack, "tmpl", n).await?;
    print_step_medians(&stack).await?;
    let plain = Stack::start(options(false)).await?;
    let (_, without) = provision_times(&plain, "plain", n).await?;
    plain.stop().await?;
    println!("\nprovisioning, ms per tenant        p50      p95");
    println!(
        "  empty database + migrations  {:>8.1} {:>8.1}",
        percentile(&without, 0.5),
        percentile(&without, 0.95)
    );
    println!(
        "  from the template            {:>8.1} {:>8.1}",
        percentile(&with, 0.5),
        percentile(&with, 0.95)
    );
    println!(
        "  ratio (template / empty)     {:>8.2} {:>8.2}",
        percentile(&with, 0.5) / percentile(&without, 0.5),
        percentile(&with, 0.95) / percentile(&without, 0.95)
    );

    add_migration(dir.path(), 2)?;
    let (serial, one) = rollout(&stack, &slugs, Some(1)).await?;
    add_migration(dir.path(), 3)?;
    let (parallel, one_p) = rollout(&stack, &slugs, None).await?;
    let concurrency = stack.config().migrations.concurrency;
    let bound = 1.2 * (n as f64 / concurrency as f64) * one_p;
    println!("\nrollout of an added column across {n} tenants");
    println!(
        "  concurrency 1                {:>8.0} ms  (one tenant: {one:.1} ms median)",
        serial.as_secs_f64() * 1000.0
    );
    println!(
        "  concurrency {concurrency:<2} (default)     {:>8.0} ms  (one tenant: {one_p:.1} ms median)",
        parallel.as_secs_f64() * 1000.0
    );
    println!(
        "  speed-up                     {:>8.2}x",
        serial.as_secs_f64() / parallel.as_secs_f64()
    );
    println!(
        "  vs 1.2 x (N/P) x one tenant  {:>8.0} ms  -> ratio {:.2}",
        bound,
        parallel.as_secs_f64() * 1000.0 / bound
    );

    add_migration(dir.path(), 4)?;
    let fifty = &slugs[..50.min(slugs.len())];
    let (fifty_time, _) = rollout(&stack, fifty, None).await?;
    println!("\nrollout across 50 tenants (django-tenants reference: 810 ms)");
    println!(
        "  default concurrency          {:>8.0} ms  -> {:.1}x faster than the reference",
        fifty_time.as_secs_f64() * 1000.0,
        810.0 / (fifty_time.as_secs_f64() * 1000.0)
    );
    stack.stop().await?;
    Ok(())
}
