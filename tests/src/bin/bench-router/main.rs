//! Router benchmark (issue: router for production, item 8). Run with `scripts/bench router`.
//!
//! Prints, from one run on loopback against a throw-away PostgreSQL cluster, requests/s and
//! p50/p99 of the authenticated `GET /api/v1/tasks?limit=1` for
//! - (a) the baseline: the `silo-tenant-app` binary serving one tenant on one pool;
//! - (b) the `silo-router` binary with one tenant;
//! - (c) the router with `SILO_BENCH_TENANTS` (default 1000) tenants, Zipf-distributed
//!   traffic (s = 1), every tenant touched once first (warm), under a connection budget
//!   that holds every tenant's pool (tenants × pool size; the cluster is started with that
//!   many `max_connections` plus headroom);
//! - (d) the same tenants through a router restarted with a tight budget (300 connections),
//!   so the Zipf tail keeps evicting and rebuilding pools: what too small a budget costs,
//!   measured after a minute of the same traffic (which pools stay open takes that long to
//!   settle), with the pools the router built and closed;
//!
//! then the added p99 of the router at half of (a)'s saturation rate (open loop), the cold
//! first request against one raw PostgreSQL connect to a tenant database in the same state
//! (nobody has served it yet), and the peak router connections seen in
//! `pg_stat_activity` during (c) and (d) against their budgets.
//!
//! Both servers run as their release binaries, each in a process of its own (built first if
//! needed), so neither shares a tokio runtime with the load generator; all of them and
//! PostgreSQL still share the machine's cores. `SILO_BENCH_SECONDS` (default 10) sets the
//! measured time of each phase, `SILO_BENCH_POOL_SIZE` (default 2) the pool size.

mod counters;
mod load;
mod servers;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hyper::header::HeaderValue;
use hyper::StatusCode;
use secrecy::ExposeSecret;
use silo_control_plane::secrets::DbSecret;
use silo_tests::bench::{load_average, percentile, wait_for_write_back};
use silo_tests::pg::TestCluster;
use silo_tests::stack::{Stack, StackOptions};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::process::Command;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use counters::RouterCounters;
use load::{
    closed_loop, connect, create_task, list_tasks, ms, open_loop, touch_all, Summary, Tenant, Traffic, CONNECTIONS,
    PATH, WARMUP, ZIPF_S,
};
use servers::{build_servers, start_router, Server};

/// `router.max_connections_per_tenant`, and the baseline's pool size, unless
/// `SILO_BENCH_POOL_SIZE` says otherwise.
const POOL_SIZE: u32 = 2;

/// `router.connection_budget_per_server` of the tight-budget phase (d): fewer connections
/// than tenants, so pools are evicted and rebuilt under traffic.
const TIGHT_BUDGET: u32 = 300;

/// Zipf traffic through the tight-budget router before (d) is measured: which pools stay
/// open settles only after minutes (a tail tenant is seen a few times a minute), and a
/// router in service has long settled.
const TIGHT_SETTLE: Duration = Duration::from_secs(60);

/// Connections of the cluster beyond the router's budget: control plane, catalog pools, this
/// program.
const CLUSTER_HEADROOM: u32 = 150;

/// Tenants created at once through the admin API.
const CREATE_CONCURRENCY: usize = 8;

/// Tasks the measured tenant holds (the others get two when they are touched).
const TASKS: usize = 5;

/// Cold requests and raw connects timed (each to a different untouched tenant).
const SAMPLES: usize = 20;

/// Pause between a raw connect and a cold request, so neither shares the machine with the
/// other's backend starting or exiting.
const SAMPLE_GAP: Duration = Duration::from_millis(50);

/// `pg_stat_activity` sampling period during (c) and (d), and the most samples taken. Not
/// more often: PostgreSQL builds `pg_stat_activity` in time quadratic in the number of
/// backends, and sampling 1,500 backends every 50 ms took a tenth of this 2-core machine.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

const MAX_SAMPLES: u32 = 600;

/// Django + django-tenants + DRF on the same request, same machine (NOTES.md).
const DJANGO_RPS: f64 = 1_100.0;

/// Creates tenants `bench-0000`… through the admin API, `CREATE_CONCURRENCY` at a time.
async fn create_tenants(stack: &Arc<Stack>, n: usize) -> anyhow::Result<Vec<Tenant>> {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..CREATE_CONCURRENCY {
        let (stack, next) = (stack.clone(), next.clone());
        workers.spawn(async move {
            let mut created = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let slug = format!("bench-{i:04}");
                let key = stack
                    .create_tenant(&slug)
                    .await
                    .with_context(|| format!("create tenant {slug}"))?;
                if (i + 1) % 100 == 0 {
                    eprintln!("  {} tenants created ({:.0} s)", i + 1, started.elapsed().as_secs_f64());
                }
                created.push((i, slug, key));
            }
            Ok::<_, anyhow::Error>(created)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(created) = workers.join_next().await {
        all.extend(created??);
    }
    all.sort_by_key(|(i, _, _)| *i);
    all.into_iter()
        .map(|(_, slug, key)| {
            Ok::<_, anyhow::Error>(Tenant {
                host: HeaderValue::from_str(&format!("{slug}.localhost"))?,
                auth: HeaderValue::from_str(&format!("Bearer {key}"))?,
                slug,
            })
        })
        .collect()
}

/// Samples router connections to tenant databases (and all connections) every
/// `SAMPLE_EVERY` until `stop`; returns both peaks.
fn sample_connections(
    options: PgConnectOptions,
    catalog_db: String,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<(i64, i64)>> {
    tokio::spawn(async move {
        let mut conn = PgConnection::connect_with(&options).await?;
        let mut ticks = tokio::time::interval(SAMPLE_EVERY);
        let mut peak = (0, 0);
        for _ in 0..MAX_SAMPLES {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            let (router, all): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE application_name = 'silo-router' AND datname <> $1), \
                 count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
            )
            .bind(&catalog_db)
            .fetch_one(&mut conn)
            .await?;
            peak = (peak.0.max(router), peak.1.max(all));
        }
        Ok(peak)
    })
}

/// How touching every tenant before a Zipf phase went, and the peak connections during it.
struct Touch {
    took: Duration,
    errors: u64,
    /// Peak router connections to tenant databases, and peak client connections in all.
    peak: (i64, i64),
    /// The router's counters before and after the measured window.
    counters: (RouterCounters, RouterCounters),
}

/// Touches every tenant once, runs Zipf-distributed traffic over all of them for `settle`
/// unmeasured, then a measured closed loop of it, sampling `pg_stat_activity` throughout.
async fn zipf_phase(
    router: &Server,
    stack: &Stack,
    tenants: &Arc<Vec<Tenant>>,
    settle: Duration,
    measured: Duration,
) -> anyhow::Result<(Summary, Touch)> {
    let catalog_db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(stack.catalog())
        .await?;
    let stop_sampling = CancellationToken::new();
    let sampler = sample_connections(stack.pg().admin_options("postgres"), catalog_db, stop_sampling.clone());
    let started = Instant::now();
    let errors = touch_all(router.addr, tenants, tenants.len()).await?;
    let took = started.elapsed();
    let traffic = Traffic::new(router.addr, tenants, tenants.len());
    if !settle.is_zero() {
        closed_loop(&traffic, settle).await?;
    }
    let ops = router.ops.context("the router's ops address")?;
    let before = RouterCounters::read(ops).await?;
    let summary = closed_loop(&traffic, measured).await?;
    let counters = (before, RouterCounters::read(ops).await?);
    stop_sampling.cancel();
    let peak = sampler.await??;
    Ok((
        summary,
        Touch {
            took,
            errors,
            peak,
            counters,
        },
    ))
}

/// The credentials of `tenant`, read through the admin API.
async fn credentials(stack: &Stack, tenant: &Tenant) -> anyhow::Result<DbSecret> {
    let (status, credentials) = stack
        .admin(
            reqwest::Method::GET,
            &format!("/v1/tenants/{}/credentials", tenant.slug),
            None,
        )
        .await?;
    if !status.is_success() {
        bail!("read the credentials of {}: {status}", tenant.slug);
    }
    serde_json::from_value(credentials).context("parse the tenant's credentials")
}

/// Milliseconds one SCRAM connect (and close) takes.
async fn time_connect(options: &PgConnectOptions) -> anyhow::Result<f64> {
    let started = Instant::now();
    let conn = PgConnection::connect_with(options).await?;
    let took = ms(started.elapsed());
    conn.close().await?;
    Ok(took)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = env_or("SILO_BENCH_TENANTS", 1000).max(2);
    let measured = Duration::from_secs(env_or("SILO_BENCH_SECONDS", 10).max(1));
    let pool_size: u32 = env_or("SILO_BENCH_POOL_SIZE", POOL_SIZE).clamp(1, 8);
    let budget = u32::try_from(n)?.saturating_mul(pool_size);
    let bin_dir = build_servers().await?;
    let run = Instant::now();
    let logs = std::env::temp_dir();
    println!("silo router benchmark: {n} tenants, PostgreSQL on 127.0.0.1, local secret store");
    println!(
        "machine: {} cores, shared by PostgreSQL, the server under test (its own process) and the load generator; load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    println!(
        "load: GET {PATH} with a bearer key, {CONNECTIONS} keep-alive HTTP/1.1 connections, {} s warm-up + {} s per phase",
        WARMUP.as_secs(),
        measured.as_secs()
    );
    println!(
        "pools: {pool_size} connections per tenant (baseline: one pool of {pool_size}); budget {budget} per server \
         ({TIGHT_BUDGET} in (d)); max_connections {};\n       per-tenant limits 10^6 req/s (checked on every request, never tripped)\n",
        budget + CLUSTER_HEADROOM
    );

    TestCluster::set_shared_max_connections(budget + CLUSTER_HEADROOM);
    let stack =
        Arc::new(
            Stack::start(StackOptions {
                router_toml: format!(
                    "max_connections_per_tenant = {pool_size}\nconnection_budget_per_server = {budget}\n"
                ),
                // Limits are checked on every request but never trip: this measures throughput.
                extra_toml:
                    "[router.plans.standard]\nrequests_per_second = 1000000\nburst = 1000000\nmax_in_flight = 1000\n"
                        .into(),
                ..StackOptions::default()
            })
            .await?,
        );
    let started = Instant::now();
    let tenants = Arc::new(create_tenants(&stack, n).await?);
    println!(
        "{n} tenants created in {:.0} s ({CREATE_CONCURRENCY} at a time)",
        started.elapsed().as_secs_f64()
    );
    wait_for_write_back().await?;

    let measured_tenant = &tenants[0];
    let secret = credentials(&stack, measured_tenant).await?;
    let mut app = Command::new(bin_dir.join("silo-tenant-app"));
    app.args(["--listen", "127.0.0.1:0", "--tenant", &measured_tenant.slug])
        .args(["--max-connections", &pool_size.to_string()])
        .env(
            "DATABASE_URL",
            format!(
                "postgres://{}@{}:{}/{}",
                secret.username, secret.host, secret.port, secret.dbname
            ),
        )
        .env("PGPASSWORD", secret.password.expose_secret());
    let baseline = Server::start(
        app,
        "listening on http://",
        None,
        &logs.join("silo-bench-tenant-app.log"),
    )
    .await?;
    let router_log = logs.join("silo-bench-router.log");
    let router = start_router(&bin_dir, &stack, &stack.dir().join("silo.toml"), &router_log).await?;

    let mut sender = connect(router.addr).await?;
    for _ in 0..TASKS {
        let status = create_task(&mut sender, measured_tenant).await?;
        if status != StatusCode::CREATED {
            bail!("create a task through the router: {status}");
        }
    }

    println!("\nclosed loop                                      req/s   p50 ms   p99 ms  errors");
    let a = closed_loop(&Traffic::new(baseline.addr, &tenants, 1), measured).await?;
    a.row("(a) baseline: silo-tenant-app, one pool");
    let b = closed_loop(&Traffic::new(router.addr, &tenants, 1), measured).await?;
    b.row("(b) router, 1 tenant");

    let rate = a.rps / 2.0;
    println!("\nopen loop at {rate:.0} req/s (50 % of (a))            req/s   p50 ms   p99 ms  errors");
    let half_a = open_loop(&Traffic::new(baseline.addr, &tenants, 1), rate, measured).await?;
    half_a.row("(a) baseline");
    let half_b = open_loop(&Traffic::new(router.addr, &tenants, 1), rate, measured).await?;
    half_b.row("(b) router, 1 tenant");
    baseline.stop().await?;

    // Tenants nobody has served yet, least popular first, in two disjoint groups of the same
    // size: one for raw connects, one for cold requests, so the connect a cold request makes
    // is compared with connects to databases in the same state, made alternately with the
    // cold requests (the machine is still settling after the phases before). The measured
    // tenant's warm database is connected to as well, for comparison.
    let untouched: Vec<&Tenant> = tenants.iter().skip(1).rev().collect();
    let samples = SAMPLES.min(untouched.len() / 2);
    let (cold_tenants, connect_tenants) = untouched.split_at(samples);
    let tls = &stack.config().servers[0].tls;
    let options = secret.connect_options(tls);
    let mut warm_connects = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        warm_connects.push(time_connect(&options).await?);
    }
    warm_connects.sort_by(f64::total_cmp);
    // A cold request: directory lookup + secret + connect + isolation check + the app's
    // queries. Each tenant's second request (pool open, backend warm) is timed too, for
    // comparison.
    let ops = router.ops.context("the router's ops address")?;
    let before_colds = RouterCounters::read(ops).await?;
    let mut sender = connect(router.addr).await?;
    let mut connects = Vec::with_capacity(samples);
    let (mut colds, mut seconds) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    for (cold, raw) in cold_tenants.iter().zip(connect_tenants) {
        let options = credentials(&stack, raw).await?.connect_options(tls);
        connects.push(time_connect(&options).await?);
        // The closed connection's backend exits (mostly kernel time) before the next sample.
        tokio::time::sleep(SAMPLE_GAP).await;
        for times in [&mut colds, &mut seconds] {
            let started = Instant::now();
            let status = list_tasks(&mut sender, cold).await?;
            times.push(ms(started.elapsed()));
            if status != StatusCode::OK {
                bail!("request for {}: {status}", cold.slug);
            }
        }
        tokio::time::sleep(SAMPLE_GAP).await;
    }
    connects.sort_by(f64::total_cmp);
    colds.sort_by(f64::total_cmp);
    seconds.sort_by(f64::total_cmp);
    let after_colds = RouterCounters::read(ops).await?;
    let cold_build_ms = |step| after_colds.mean_build_ms(&before_colds, step).unwrap_or(f64::NAN);
    let (cold_secret_ms, cold_connect_ms) = (cold_build_ms("secret"), cold_build_ms("connect"));

    println!("\nclosed loop, Zipf s = {ZIPF_S}, tenants touched first      req/s   p50 ms   p99 ms  errors");
    let (c, c_touch) = zipf_phase(&router, &stack, &tenants, Duration::ZERO, measured).await?;
    c.row(&format!("(c) router, {n} tenants, budget {budget}"));
    router.stop().await?;

    // (d) The same tenants through a router whose budget cannot hold every pool.
    let tight_config = stack.dir().join("silo-tight.toml");
    let config = std::fs::read_to_string(stack.dir().join("silo.toml"))?;
    std::fs::write(
        &tight_config,
        config.replace(
            &format!("connection_budget_per_server = {budget}\n"),
            &format!("connection_budget_per_server = {TIGHT_BUDGET}\n"),
        ),
    )?;
    let tight_router_log = logs.join("silo-bench-router-tight.log");
    let router = start_router(&bin_dir, &stack, &tight_config, &tight_router_log).await?;
    let (d, d_touch) = zipf_phase(&router, &stack, &tenants, TIGHT_SETTLE, measured).await?;
    d.row(&format!(
        "(d) router, {n} tenants, budget {TIGHT_BUDGET}, after {} s",
        TIGHT_SETTLE.as_secs()
    ));
    for (label, touch) in [("(c)", &c_touch), ("(d)", &d_touch)] {
        println!(
            "  {label}: touching all {n} tenants took {:.1} s, {} errors",
            touch.took.as_secs_f64(),
            touch.errors
        );
    }
    println!("\nthe router's counters over the measured (warm-up included) window of (c) and (d)");
    for (label, touch) in [("(c)", &c_touch), ("(d)", &d_touch)] {
        let (before, after) = &touch.counters;
        after.print_since(before, label);
    }
    router.stop().await?;

    println!("\nresults against targets");
    println!("  b/a                     {:>7.2}", b.rps / a.rps);
    println!("  c/a                     {:>7.2}   target >= 0.90", c.rps / a.rps);
    println!(
        "  d/a                     {:>7.2}   (budget {TIGHT_BUDGET} for {n} tenants: pools evicted and rebuilt)",
        d.rps / a.rps
    );
    println!(
        "  added p99 at 50 % load  {:>+7.2} ms   target <= 1 ms   (p99 {:.2} ms router vs {:.2} ms baseline)",
        half_b.p99_ms - half_a.p99_ms,
        half_b.p99_ms,
        half_a.p99_ms
    );
    let (cold, connect_ms) = (percentile(&colds, 0.5), percentile(&connects, 0.5));
    println!(
        "  cold first request      {cold:>7.2} ms   target <= connect + 5 = {:.2} ms   (median of {}, max {:.2} ms; one PostgreSQL connect to an untouched tenant database: median {connect_ms:.2} ms of {}; to the measured tenant's warm one: {:.2} ms)",
        connect_ms + 5.0,
        colds.len(),
        colds.last().copied().unwrap_or(f64::NAN),
        connects.len(),
        percentile(&warm_connects, 0.5)
    );
    println!(
        "  (the same tenants' second request: median {:.2} ms; the cold requests' pool builds spent on average {cold_secret_ms:.2} ms reading the secret and {cold_connect_ms:.2} ms connecting, isolation check included)",
        percentile(&seconds, 0.5)
    );
    for (label, peak, limit) in [("(c)", c_touch.peak, budget), ("(d)", d_touch.peak, TIGHT_BUDGET)] {
        println!(
            "  peak router connections {:>7}      target <= budget {limit}   (to tenant databases, pg_stat_activity every {} ms during {label}; all client connections: {} of {})",
            peak.0,
            SAMPLE_EVERY.as_millis(),
            peak.1,
            budget + CLUSTER_HEADROOM
        );
    }
    println!(
        "  vs Django + django-tenants + DRF (~{DJANGO_RPS:.0} req/s): (a) {:.1}x  (b) {:.1}x  (c) {:.1}x   target >= 10x",
        a.rps / DJANGO_RPS,
        b.rps / DJANGO_RPS,
        c.rps / DJANGO_RPS
    );
    println!(
        "\nrun time {:.0} s (after the build); load average at the end: {}",
        run.elapsed().as_secs_f64(),
        load_average()
    );
    println!(
        "server logs: {} (router), {} (router of (d)), {} (tenant app)",
        router_log.display(),
        tight_router_log.display(),
        logs.join("silo-bench-tenant-app.log").display()
    );
    drop(sender);
    Arc::into_inner(stack)
        .context("the stack is still shared")?
        .stop()
        .await?;
    Ok(())
}
