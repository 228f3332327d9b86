//! Move benchmark: how long a tenant is unavailable while it moves to another server. Run
//! with `scripts/bench move`.
//!
//! Prints, from one run on this machine, for tenants of `SILO_BENCH_ROWS` task rows (default
//! 10,000 and 1,000,000), the offline move (the tenant fenced while `pg_dump` and `pg_restore`
//! copy it: the baseline) next to the online move (logical replication while it is served,
//! fenced only for the cutover): the longest time a client polling the tenant through the
//! router every 5 ms got no answer but 503, how many of its requests were refused, and how
//! long the move took, with the ratio of the unavailable times.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use silo_tests::bench::load_average;
use silo_tests::pg::TestCluster;
use silo_tests::stack::{Stack, StackOptions};
use sqlx::{ConnectOptions, Connection};

/// How often the client asks.
const POLL: Duration = Duration::from_millis(5);

/// What a client of a moving tenant saw.
struct Seen {
    /// The longest stretch from a refused request to the next answered one.
    unavailable: Duration,
    /// Requests refused (503) in all.
    refused: usize,
    /// Requests answered.
    answered: usize,
    /// From asking for the move to its job's end.
    took: Duration,
}

/// A tenant on pg-1 with `rows` tasks; returns its API key.
async fn tenant_with_rows(stack: &Stack, slug: &str, rows: i64) -> anyhow::Result<String> {
    let key = stack
        .create_tenant_with(json!({"slug": slug, "server": "pg-1"}))
        .await?;
    let database = stack.database_of(slug).await?;
    let mut conn = stack.pg().admin_options(&database).connect().await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE \"{database}_owner\"; \
         INSERT INTO tasks (title) SELECT 'task number ' || g FROM generate_series(1, {rows}) g; \
         RESET ROLE; ANALYZE tasks"
    )))
    .execute(&mut conn)
    .await?;
    conn.close().await?;
    Ok(key)
}

/// Moves `slug` to pg-2 (`online` or not) while a client polls it every `POLL`.
async fn move_polled(stack: &Stack, slug: &str, key: &str, online: bool) -> anyhow::Result<Seen> {
    let done = AtomicBool::new(false);
    let client = async {
        let mut seen = Seen {
            unavailable: Duration::ZERO,
            refused: 0,
            answered: 0,
            took: Duration::ZERO,
        };
        let mut refused_since: Option<Instant> = None;
        while !done.load(Ordering::Relaxed) {
            let asked = Instant::now();
            let status = stack.tenant_get(slug, key, "/api/v1/tasks?limit=1").await?.status();
            match status {
                StatusCode::OK => {
                    seen.answered += 1;
                    if let Some(since) = refused_since.take() {
                        seen.unavailable = seen.unavailable.max(asked - since);
                    }
                }
                StatusCode::SERVICE_UNAVAILABLE => {
                    seen.refused += 1;
                    refused_since.get_or_insert(asked);
                }
                other => bail!("{slug} answered {other} while it moved"),
            }
            tokio::time::sleep(POLL).await;
        }
        anyhow::Ok(seen)
    };
    let mover = async {
        let started = Instant::now();
        let (status, body) = stack
            .admin(
                Method::POST,
                &format!("/v1/tenants/{slug}/move"),
                Some(json!({"server": "pg-2", "online": online})),
            )
            .await?;
        if status != StatusCode::ACCEPTED {
            bail!("move {slug}: {status} {body}");
        }
        let id = body["job"]["id"].as_i64().context("no job id")?;
        let job = wait_job(stack, id).await?;
        let took = started.elapsed();
        // The client gets a moment to see the tenant served from the new server.
        tokio::time::sleep(Duration::from_millis(200)).await;
        done.store(true, Ordering::Relaxed);
        if job["state"] != "succeeded" {
            bail!("move {slug}: {job}");
        }
        anyhow::Ok(took)
    };
    let (seen, took) = tokio::join!(client, mover);
    let (mut seen, took) = (seen?, took?);
    seen.took = took;
    Ok(seen)
}

/// Polls job `id` until it ends (10 minutes at most).
async fn wait_job(stack: &Stack, id: i64) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (_, job) = stack.admin(Method::GET, &format!("/v1/jobs/{id}"), None).await?;
        if matches!(job["state"].as_str(), Some("succeeded" | "failed")) {
            return Ok(job);
        }
        if Instant::now() > deadline {
            bail!("job {id} still runs after 10 minutes: {job}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let sizes: Vec<i64> = match std::env::var("SILO_BENCH_ROWS") {
        Ok(rows) => vec![rows.parse().context("SILO_BENCH_ROWS must be a number of rows")?],
        Err(_) => vec![10_000, 1_000_000],
    };
    let pg2 = TestCluster::start().await?;
    let stack = Stack::start(StackOptions {
        extra_toml: format!(
            "[backups]\ndir = \"backups\"\nencryption_key_file = \"backup.key\"\n{}",
            pg2.server_toml("pg-2")
        ),
        backup_key: true,
        ..StackOptions::default()
    })
    .await?;
    println!(
        "silo move benchmark: PostgreSQL 15 on 127.0.0.1 (two clusters), encrypted backups, a client \
         polling the tenant every {} ms through the router; load average {}",
        POLL.as_millis(),
        load_average()
    );
    println!(
        "\n{:<54} {:>14} {:>8} {:>8} {:>12}",
        "move to another server", "unavailable ms", "refused", "answered", "move took ms"
    );
    for rows in sizes {
        let mut unavailable = Vec::new();
        for (label, online) in [
            ("offline (pg_dump/pg_restore, fenced)", false),
            ("online (logical replication)", true),
        ] {
            let slug = format!("mv{}{rows}", if online { "on" } else { "off" });
            let key = tenant_with_rows(&stack, &slug, rows).await?;
            let seen = move_polled(&stack, &slug, &key, online).await?;
            println!(
                "  {rows:>9} rows, {label:<37} {:>14.1} {:>8} {:>8} {:>12.1}",
                ms(seen.unavailable),
                seen.refused,
                seen.answered,
                ms(seen.took)
            );
            unavailable.push(ms(seen.unavailable));
        }
        println!(
            "  {rows:>9} rows: unavailable offline / online = {:.1}x",
            unavailable[0] / unavailable[1].max(0.1)
        );
    }
    stack.stop().await?;
    pg2.stop();
    Ok(())
}
