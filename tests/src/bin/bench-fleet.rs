//! Fleet benchmark (issue: fast onboarding and fleet migrations). Run with `scripts/bench fleet`.
//!
//! Prints, from one run on this machine, against a throw-away PostgreSQL cluster:
//! - provisioning time per tenant (p50, p95) over `SILO_BENCH_TENANTS` (default 200) tenants
//!   created one after another, three ways: an empty database migrated (templates off), a
//!   copy of the template (no spares), and a spare database (the default); the time is the
//!   job's own (queued → finished): secret, roles, database, grants, schema, first key;
//! - rollout time of a new migration (an added column) across those tenants at concurrency 1
//!   and at the default concurrency, one tenant's median and mean time, and the ratios,
//!   next to the baseline of the same run: one bare connection to each tenant database at
//!   the same concurrency (a rollout cannot need less);
//! - the same rollout across 50 tenants, the fleet size of the django-tenants reference.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use reqwest::Method;
use serde_json::{json, Value};
use silo_control_plane::servers::ADMIN_CONNECT_TIMEOUT;
use silo_tests::bench::{load_average, percentile, wait_for_write_back};
use silo_tests::stack::{Stack, StackOptions};
use sqlx::Connection;
use tokio::task::JoinSet;

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

/// One rollout's figures.
struct Rollout {
    /// The job's own time, queued → finished.
    took: Duration,
    /// Per-tenant migration times (ms), sorted.
    tenants: Vec<f64>,
}

impl Rollout {
    fn ms(&self) -> f64 {
        self.took.as_secs_f64() * 1000.0
    }

    fn median(&self) -> f64 {
        percentile(&self.tenants, 0.5)
    }

    fn mean(&self) -> f64 {
        self.tenants.iter().sum::<f64>() / self.tenants.len().max(1) as f64
    }
}

async fn rollout(stack: &Stack, tenants: &[String], concurrency: usize) -> anyhow::Result<Rollout> {
    let body = json!({"tenants": tenants, "canary": 0, "concurrency": concurrency});
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if job["state"] != "succeeded" {
        bail!("rollout failed: {job}");
    }
    let took: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM (finished_at - created_at))::float8 FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(stack.catalog())
            .await?;
    let mut tenants: Vec<f64> = sqlx::query_scalar("SELECT duration_ms::float8 FROM migration_runs WHERE job_id = $1")
        .bind(id)
        .fetch_all(stack.catalog())
        .await?;
    tenants.sort_by(f64::total_cmp);
    Ok(Rollout {
        took: Duration::from_secs_f64(took),
        tenants,
    })
}

/// The floor under any rollout: one SCRAM login (as the server's admin) to each tenant
/// database and a `SELECT 1`, `concurrency` at a time, connecting the way the control plane
/// does (off the runtime's workers).
async fn connect_each(stack: &Stack, tenants: &[String], concurrency: usize) -> anyhow::Result<Duration> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut databases = Vec::with_capacity(tenants.len());
    for slug in tenants {
        databases.push(stack.database_of(slug).await?);
    }
    let databases = Arc::new(databases);
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (next, databases, pg) = (next.clone(), databases.clone(), stack.pg());
        workers.spawn(async move {
            while let Some(db) = databases.get(next.fetch_add(1, Ordering::Relaxed)) {
                let mut conn = silo_tenant_app::connect(&pg.admin_options(db), ADMIN_CONNECT_TIMEOUT).await?;
                sqlx::query("SELECT 1").execute(&mut conn).await?;
                conn.close().await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok(started.elapsed())
}

/// Where provisioning time goes: the control plane's own step timings (median), and how many
/// databases were spares.
async fn print_step_medians(stack: &Stack) -> anyhow::Result<()> {
    let text = reqwest::get(format!("http://{}/metrics", stack.control_plane_addr()))
        .await?
        .text()
        .await?;
    println!("\ncontrol plane timings with spare databases, median ms:");
    for line in text.lines() {
        let wanted = (line.starts_with("silo_job_step_seconds{") && line.contains("kind=\"provision\""))
            || line.starts_with("silo_job_wait_seconds{");
        if wanted && line.contains("quantile=\"0.5\"") {
            let (labels, value) = line.rsplit_once(' ').context("metric line")?;
            let ms = value.parse::<f64>().unwrap_or(f64::NAN) * 1000.0;
            println!("    {labels:<70} {ms:>7.1}");
        }
    }
    println!("  where the databases came from (a spare, or a copy of the template when none was left):");
    for line in text.lines() {
        if line.starts_with("silo_tenant_databases_created_total{") {
            let (labels, count) = line.rsplit_once(' ').context("metric line")?;
            println!("    {labels:<70} {count:>7}");
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
        .unwrap_or(200)
        .max(2);
    let dir = tempfile::tempdir()?;
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/tenant/0001_init.sql");
    std::fs::copy(shipped, dir.path().join("0001_init.sql"))?;
    let options = |migrations: &str| StackOptions {
        tenant_migrations_dir: Some(dir.path().to_owned()),
        extra_toml: format!("[migrations]\n{migrations}\n"),
        ..StackOptions::default()
    };
    println!(
        "silo fleet benchmark: {n} tenants, PostgreSQL on 127.0.0.1, local secret store; load average {}",
        load_average()
    );

    // Spares (the default) first, so the control plane's step timings printed below are
    // theirs alone. This stack is the one the rollouts run on.
    let stack = Stack::start(options("")).await?;
    let (slugs, spare) = provision_times(&stack, "spare", n).await?;
    print_step_medians(&stack).await?;
    let copy = Stack::start(options("spare_databases = 0")).await?;
    let (_, template) = provision_times(&copy, "tmpl", n).await?;
    copy.stop().await?;
    let plain = Stack::start(options("templates = false")).await?;
    let (_, empty) = provision_times(&plain, "plain", n).await?;
    plain.stop().await?;
    println!("\nprovisioning, ms per tenant                    p50      p95   target p50 <= 60 ms");
    for (label, times) in [
        ("empty database + migrations", &empty),
        ("copy of the template", &template),
        ("spare database (default)", &spare),
    ] {
        println!(
            "  {label:<40} {:>8.1} {:>8.1}",
            percentile(times, 0.5),
            percentile(times, 0.95)
        );
    }

    // After 600 new databases, as a fleet between sign-up bursts would be.
    println!();
    wait_for_write_back().await?;

    let m = &stack.config().migrations;
    let servers = stack.config().servers.len();
    let lanes = m.concurrency.min(m.per_server_concurrency * servers);
    add_migration(dir.path(), 2)?;
    let serial = rollout(&stack, &slugs, 1).await?;
    add_migration(dir.path(), 3)?;
    let parallel = rollout(&stack, &slugs, m.concurrency).await?;
    let floor_serial = connect_each(&stack, &slugs, 1).await?;
    let floor_parallel = connect_each(&stack, &slugs, lanes).await?;
    println!(
        "\nrollout of an added column across {n} tenants   total ms   tenant p50   tenant mean   connect-only baseline"
    );
    for (label, r, floor) in [
        ("concurrency 1".to_owned(), &serial, floor_serial),
        (
            format!("concurrency {} ({lanes} per server, default)", m.concurrency),
            &parallel,
            floor_parallel,
        ),
    ] {
        println!(
            "  {label:<42} {:>8.0} {:>12.1} {:>13.1} {:>14.0} ms",
            r.ms(),
            r.median(),
            r.mean(),
            floor.as_secs_f64() * 1000.0
        );
    }
    let bound = 1.2 * (n as f64 / lanes as f64) * parallel.mean();
    println!(
        "  speed-up                                   {:>8.2}x",
        serial.ms() / parallel.ms()
    );
    println!(
        "  vs 1.2 x (N/P) x one tenant (mean)         {bound:>8.0} ms   -> ratio {:.2}   target <= 1",
        parallel.ms() / bound
    );

    add_migration(dir.path(), 4)?;
    let fifty = &slugs[..50.min(slugs.len())];
    let small = rollout(&stack, fifty, m.concurrency).await?;
    let small_floor = connect_each(&stack, fifty, lanes).await?;
    println!(
        "\nrollout across {} tenants (django-tenants reference: 810 ms)",
        fifty.len()
    );
    println!(
        "  default concurrency                        {:>8.0} ms   -> {:.1}x faster than the reference (target >= 3x); connect-only baseline {:.0} ms",
        small.ms(),
        810.0 / small.ms(),
        small_floor.as_secs_f64() * 1000.0
    );
    println!("\nload average at the end: {}", load_average());
    stack.stop().await?;
    Ok(())
}
