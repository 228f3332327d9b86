//! The load generator: keep-alive HTTP/1.1 connections sending the measured request for
//! tenants drawn by Zipf rank, in a closed loop (each connection sends its next request when
//! the last is answered) or an open loop (requests due at a fixed rate, wrk2-style).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use silo_tests::bench::percentile;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// The measured request.
pub(crate) const PATH: &str = "/api/v1/tasks?limit=1";

/// Keep-alive connections of the load generator (like `wrk -c32`).
pub(crate) const CONNECTIONS: usize = 32;

/// Unmeasured time at the start of each phase.
pub(crate) const WARMUP: Duration = Duration::from_secs(2);

/// A request that takes longer fails the phase's worker.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Zipf exponent of (c)'s traffic.
pub(crate) const ZIPF_S: f64 = 1.0;

/// A tenant as the load generator addresses it.
pub(crate) struct Tenant {
    pub(crate) slug: String,
    pub(crate) host: HeaderValue,
    pub(crate) auth: HeaderValue,
}

/// Where one phase's load goes: a server and tenants drawn by Zipf rank (tenant 0 first).
pub(crate) struct Traffic {
    pub(crate) addr: SocketAddr,
    pub(crate) tenants: Arc<Vec<Tenant>>,
    /// Cumulative Zipf weights over `tenants`; one entry means "always tenant 0".
    pub(crate) cdf: Vec<f64>,
}

impl Traffic {
    pub(crate) fn new(addr: SocketAddr, tenants: &Arc<Vec<Tenant>>, count: usize) -> Arc<Self> {
        let cdf = (1..=count.min(tenants.len()))
            .scan(0.0, |sum, rank| {
                *sum += 1.0 / (rank as f64).powf(ZIPF_S);
                Some(*sum)
            })
            .collect();
        Arc::new(Traffic {
            addr,
            tenants: tenants.clone(),
            cdf,
        })
    }

    pub(crate) fn pick(&self, rng: &mut StdRng) -> &Tenant {
        let total = self.cdf.last().copied().unwrap_or(0.0);
        let u = rng.random::<f64>() * total;
        let rank = self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1);
        &self.tenants[rank]
    }
}

pub(crate) type Sender = SendRequest<Full<Bytes>>;

/// One keep-alive HTTP/1.1 connection.
pub(crate) async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
        .await
        .context("connect: timed out")??;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one request and reads the whole response; returns its status.
pub(crate) async fn send(sender: &mut Sender, req: Request<Full<Bytes>>) -> anyhow::Result<StatusCode> {
    let exchange = async {
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        Ok::<_, anyhow::Error>(status)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .context("request timed out")?
}

/// The measured request for `tenant`.
pub(crate) async fn list_tasks(sender: &mut Sender, tenant: &Tenant) -> anyhow::Result<StatusCode> {
    let req = Request::get(PATH)
        .header(HOST, &tenant.host)
        .header(AUTHORIZATION, &tenant.auth)
        .body(Full::default())?;
    send(sender, req).await
}

pub(crate) async fn create_task(sender: &mut Sender, tenant: &Tenant) -> anyhow::Result<StatusCode> {
    let req = Request::post("/api/v1/tasks")
        .header(HOST, &tenant.host)
        .header(AUTHORIZATION, &tenant.auth)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(br#"{"title":"benchmark task"}"#)))?;
    send(sender, req).await
}

/// Latencies of successful requests (µs) and the count of failed ones.
#[derive(Default)]
pub(crate) struct Record {
    pub(crate) micros: Vec<u32>,
    pub(crate) errors: u64,
}

impl Record {
    pub(crate) fn add(&mut self, outcome: &anyhow::Result<StatusCode>, took: Duration) {
        match outcome {
            Ok(StatusCode::OK) => self.micros.push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX)),
            _ => self.errors += 1,
        }
    }
}

/// A phase's result.
pub(crate) struct Summary {
    pub(crate) rps: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) errors: u64,
}

impl Summary {
    pub(crate) fn row(&self, label: &str) {
        println!(
            "  {label:<44} {:>8.0} {:>8.2} {:>8.2} {:>7}",
            self.rps, self.p50_ms, self.p99_ms, self.errors
        );
    }
}

/// Waits for every worker and merges their records over `measured`.
pub(crate) async fn summarize(
    mut workers: JoinSet<anyhow::Result<Record>>,
    measured: Duration,
) -> anyhow::Result<Summary> {
    let mut all = Record::default();
    while let Some(record) = workers.join_next().await {
        let record = record??;
        all.micros.extend(record.micros);
        all.errors += record.errors;
    }
    let mut ms: Vec<f64> = all.micros.iter().map(|&us| f64::from(us) / 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    Ok(Summary {
        rps: ms.len() as f64 / measured.as_secs_f64(),
        p50_ms: percentile(&ms, 0.50),
        p99_ms: percentile(&ms, 0.99),
        errors: all.errors,
    })
}

/// Closed loop: each connection sends its next request as soon as the previous one is
/// answered, for `WARMUP` + `measured`; latencies of requests sent after the warm-up count.
pub(crate) async fn closed_loop(traffic: &Arc<Traffic>, measured: Duration) -> anyhow::Result<Summary> {
    let start = Instant::now();
    let (from, until) = (start + WARMUP, start + WARMUP + measured);
    let mut workers = JoinSet::new();
    for seed in 0..CONNECTIONS as u64 {
        let traffic = traffic.clone();
        workers.spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut sender = connect(traffic.addr).await?;
            let mut record = Record::default();
            loop {
                let sent = Instant::now();
                if sent >= until {
                    break;
                }
                let outcome = list_tasks(&mut sender, traffic.pick(&mut rng)).await;
                if sent >= from {
                    record.add(&outcome, sent.elapsed());
                }
                if outcome.is_err() {
                    sender = connect(traffic.addr).await?;
                }
            }
            Ok::<_, anyhow::Error>(record)
        });
    }
    summarize(workers, measured).await
}

/// Open loop at `rate` req/s over up to `CONNECTIONS` connections (wrk2-style): request i is
/// due at start + i/rate, and its latency runs from when it was due if every connection was
/// busy then (queueing counts), else from when it was sent (timer slack does not).
pub(crate) async fn open_loop(traffic: &Arc<Traffic>, rate: f64, measured: Duration) -> anyhow::Result<Summary> {
    let start = Instant::now();
    let total = ((WARMUP + measured).as_secs_f64() * rate) as u64;
    let warm = (WARMUP.as_secs_f64() * rate) as u64;
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..CONNECTIONS {
        let (traffic, next) = (traffic.clone(), next.clone());
        workers.spawn(async move {
            let mut sender = connect(traffic.addr).await?;
            let mut record = Record::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                let begin = if Instant::now() < due {
                    tokio::time::sleep_until(due.into()).await;
                    Instant::now()
                } else {
                    due
                };
                let outcome = list_tasks(&mut sender, &traffic.tenants[0]).await;
                if i >= warm {
                    record.add(&outcome, begin.elapsed());
                }
                if outcome.is_err() {
                    sender = connect(traffic.addr).await?;
                }
            }
            Ok::<_, anyhow::Error>(record)
        });
    }
    summarize(workers, measured).await
}

/// Touches the first `count` tenants once (two task creations each) over `CONNECTIONS` connections;
/// returns the number of failed requests.
pub(crate) async fn touch_all(addr: SocketAddr, tenants: &Arc<Vec<Tenant>>, count: usize) -> anyhow::Result<u64> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..CONNECTIONS {
        let (tenants, next) = (tenants.clone(), next.clone());
        workers.spawn(async move {
            let mut sender = connect(addr).await?;
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(tenant) = tenants.get(i).filter(|_| i < count) else {
                    break;
                };
                for _ in 0..2 {
                    let outcome = create_task(&mut sender, tenant).await;
                    if !matches!(outcome, Ok(StatusCode::CREATED)) {
                        errors += 1;
                    }
                    if outcome.is_err() {
                        sender = connect(addr).await?;
                    }
                }
            }
            Ok::<u64, anyhow::Error>(errors)
        });
    }
    let mut errors = 0;
    while let Some(n) = workers.join_next().await {
        errors += n??;
    }
    Ok(errors)
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
