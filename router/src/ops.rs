//! The operations port: `/healthz` (the process answers), `/readyz` (it can route: the
//! catalog answered and tenant events are being received, and it is not shutting down), and
//! `/metrics` (Prometheus text).
//!
//! Each router has its own Prometheus registry ([`Metrics`]). Every router metric is named
//! `silo_router_*` and has bounded labels only: tenant ids only when the operator opts in
//! (`router.per_tenant_metrics`), for at most [`PER_TENANT_CAP`] tenants.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio_util::sync::CancellationToken;

const REQUEST_DURATION: &str = "silo_router_request_duration_seconds";
const POOL_BUILD_DURATION: &str = "silo_router_pool_build_seconds";
/// Histogram buckets of request latency and of pool builds, in seconds.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// How often histograms are drained even if nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// What `/readyz` reports; written by the directory and the server.
#[derive(Debug, Default)]
pub(crate) struct Health {
    catalog_answered: AtomicBool,
    listening: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    /// The catalog answered a query (once is enough: afterwards known routes are cached).
    pub(crate) fn catalog_answered(&self) {
        self.catalog_answered.store(true, Ordering::Release);
    }

    /// Whether the tenant-events listener is connected.
    pub(crate) fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Release);
    }

    /// Whether the tenant-events listener is connected (what is cached is kept up to date).
    pub(crate) fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// The router is shutting down: load balancers should stop sending traffic.
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    fn is_ready(&self) -> bool {
        self.catalog_answered.load(Ordering::Acquire) && self.is_listening() && !self.draining.load(Ordering::Acquire)
    }
}

/// The router's metrics: a Prometheus registry of its own (not the process-global recorder,
/// which an embedding process such as the in-process test stack may already own), so each
/// router's `/metrics` shows exactly its own traffic. Call sites go through the methods
/// below, which keep every label bounded.
pub(crate) struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// `router.per_tenant_metrics`: the tenants that have series of their own (at most
    /// [`PER_TENANT_CAP`]; later ones are counted as `tenant="other"`).
    per_tenant: Option<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// Tenants with series of their own when per-tenant metrics are on.
const PER_TENANT_CAP: usize = 100;

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// An empty registry with the router's metrics described.
    pub(crate) fn new() -> anyhow::Result<Self> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), DURATION_BUCKETS)?
            .set_buckets_for_metric(Matcher::Full(POOL_BUILD_DURATION.into()), DURATION_BUCKETS)?
            .build_recorder();
        let handle = recorder.handle();
        let metrics = Self {
            recorder,
            handle,
            per_tenant: None,
        };
        metrics.with(describe);
        Ok(metrics)
    }

    /// Turns per-tenant series on (`router.per_tenant_metrics`), capped at
    /// [`PER_TENANT_CAP`] tenants.
    pub(crate) fn with_per_tenant(mut self, enabled: bool) -> Self {
        self.per_tenant = enabled.then(Default::default);
        self
    }

    /// One request of `tenant` answered (only with per-tenant metrics on).
    pub(crate) fn tenant_request(&self, tenant: &str, status: u16) {
        let Some(known) = &self.per_tenant else {
            return;
        };
        let label = {
            let mut known = known.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if known.contains(tenant) || (known.len() < PER_TENANT_CAP && known.insert(tenant.to_owned())) {
                tenant.to_owned()
            } else {
                "other".to_owned()
            }
        };
        let class = status_class(status);
        self.with(|| {
            metrics::counter!("silo_router_tenant_requests_total", "tenant" => label, "status_class" => class)
                .increment(1);
        });
    }

    /// Runs `f` with this registry as the `metrics` recorder (synchronously, this thread).
    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// One request answered: `outcome` is "forwarded" or a router error code.
    pub(crate) fn request(&self, outcome: &'static str, status: u16, elapsed: Duration) {
        let class = status_class(status);
        self.with(|| {
            metrics::counter!("silo_router_requests_total", "outcome" => outcome, "status_class" => class).increment(1);
            metrics::histogram!(REQUEST_DURATION).record(elapsed.as_secs_f64());
        });
    }

    /// A tenant pool was built.
    pub(crate) fn pool_opened(&self) {
        self.with(|| {
            metrics::counter!("silo_router_pool_creations_total").increment(1);
            metrics::gauge!("silo_router_pools_open").increment(1.0);
        });
    }

    /// How long a pool build spent on `step`: `budget` (room in the server's connection
    /// budget), `secret` (the tenant's current secret), `connect` (the first connection and
    /// its isolation check).
    pub(crate) fn pool_build_step(&self, step: &'static str, elapsed: Duration) {
        self.with(|| metrics::histogram!(POOL_BUILD_DURATION, "step" => step).record(elapsed.as_secs_f64()));
    }

    /// A tenant pool left the map (for whatever cause).
    pub(crate) fn pool_closed(&self) {
        self.with(|| metrics::gauge!("silo_router_pools_open").decrement(1.0));
    }

    /// A tenant pool was evicted; `cause` is one of idle, capacity, budget, explicit, moved,
    /// credentials, replaced.
    pub(crate) fn pool_evicted(&self, cause: &'static str) {
        self.with(|| metrics::counter!("silo_router_pool_evictions_total", "cause" => cause).increment(1));
    }

    /// A pool-map lookup: hit or miss.
    pub(crate) fn pool_lookup(&self, result: &'static str) {
        self.with(|| metrics::counter!("silo_router_pool_lookups_total", "result" => result).increment(1));
    }

    /// Connections currently open to `server` (sampled).
    pub(crate) fn server_connections(&self, server: &str, connections: f64) {
        self.with(|| metrics::gauge!("silo_router_server_connections", "server" => server.to_owned()).set(connections));
    }

    /// Budget permits held on `server` changed by `delta`.
    pub(crate) fn budget_taken(&self, server: &str, delta: f64) {
        self.with(|| {
            metrics::gauge!("silo_router_server_budget_reserved", "server" => server.to_owned()).increment(delta);
        });
    }

    /// A request gave up waiting for room in `server`'s connection budget.
    pub(crate) fn budget_exhausted(&self, server: &str) {
        self.with(|| {
            metrics::counter!("silo_router_budget_exhausted_total", "server" => server.to_owned()).increment(1);
        });
    }

    /// A pool switched credentials after PostgreSQL refused its password; `stage` is the
    /// secret stage switched to.
    /// A pool's idle spare connection closed to make room in the connection budget.
    pub(crate) fn spare_connection_closed(&self) {
        self.with(|| metrics::counter!("silo_router_spare_connections_closed_total").increment(1));
    }

    /// A tenant's secret read for a pool: from the secret store, or kept from an earlier read.
    pub(crate) fn secret_read(&self, source: &'static str) {
        self.with(|| metrics::counter!("silo_router_secret_reads_total", "source" => source).increment(1));
    }

    pub(crate) fn credential_switch(&self, stage: &'static str) {
        self.with(|| metrics::counter!("silo_router_credential_switches_total", "stage" => stage).increment(1));
    }

    /// A directory lookup: hit, miss, negative, stale or error.
    pub(crate) fn directory_lookup(&self, result: &'static str) {
        self.with(|| metrics::counter!("silo_router_directory_lookups_total", "result" => result).increment(1));
    }

    /// The Prometheus text exposition.
    fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histograms every few seconds until `shutdown`, so memory stays flat between
    /// scrapes.
    pub(crate) async fn upkeep(&self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => self.handle.run_upkeep(),
            }
        }
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("silo_router_requests_total", "Requests by outcome and status class.");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from request head to response head."
    );
    describe_gauge!("silo_router_pools_open", "Tenant pools currently open.");
    describe_counter!("silo_router_pool_creations_total", "Tenant pools built.");
    describe_histogram!(
        POOL_BUILD_DURATION,
        Unit::Seconds,
        "Time a pool build spent waiting for room in the connection budget (step=budget), reading the tenant's secret (step=secret) and connecting (step=connect)."
    );
    describe_counter!("silo_router_pool_evictions_total", "Tenant pools evicted, by cause.");
    describe_counter!("silo_router_pool_lookups_total", "Pool-map lookups: hit or miss.");
    describe_counter!(
        "silo_router_spare_connections_closed_total",
        "Idle connections of pools that had more than one, closed to make room in the connection budget."
    );
    describe_counter!(
        "silo_router_secret_reads_total",
        "Tenant secrets read for pools: from the secret store, or kept from an earlier read."
    );
    describe_counter!(
        "silo_router_tenant_requests_total",
        "Requests per tenant (router.per_tenant_metrics; capped, the rest as tenant=\"other\")."
    );
    describe_gauge!(
        "silo_router_server_connections",
        "Connections open to each PostgreSQL server (sampled every second)."
    );
    describe_gauge!(
        "silo_router_server_budget_reserved",
        "Connection-budget permits held by open tenant connections, per server."
    );
    describe_counter!(
        "silo_router_budget_exhausted_total",
        "Requests refused because a server's connection budget stayed spent."
    );
    describe_counter!(
        "silo_router_credential_switches_total",
        "Pools that switched credentials after a refused password, by secret stage."
    );
    describe_counter!(
        "silo_router_directory_lookups_total",
        "Tenant directory lookups: hit, miss (catalog query), negative (cached unknown), stale, error."
    );
}

/// One request on the operations port.
pub(crate) fn respond<B>(health: &Health, metrics: &Metrics, request: &Request<B>) -> Response {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if health.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => {
            let mut response = Response::new(Body::from(metrics.render()));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[test]
    fn readiness_needs_catalog_and_listener_and_no_drain() {
        let (health, metrics) = (Health::default(), Metrics::new().unwrap());
        let status = |h: &Health| respond(h, &metrics, &get("/readyz")).status();
        assert_eq!(respond(&health, &metrics, &get("/healthz")).status(), StatusCode::OK);
        assert_eq!(status(&health), StatusCode::SERVICE_UNAVAILABLE);
        health.catalog_answered();
        assert_eq!(status(&health), StatusCode::SERVICE_UNAVAILABLE);
        health.set_listening(true);
        assert_eq!(status(&health), StatusCode::OK);
        health.set_listening(false);
        assert_eq!(status(&health), StatusCode::SERVICE_UNAVAILABLE);
        health.set_listening(true);
        health.set_draining();
        assert_eq!(status(&health), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            respond(&health, &metrics, &get("/nope")).status(),
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn each_router_renders_its_own_metrics() {
        let (one, two) = (Metrics::new().unwrap(), Metrics::new().unwrap());
        one.request("forwarded", 200, Duration::from_millis(3));
        one.pool_opened();
        let response = respond(&Health::default(), &one, &get("/metrics"));
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            text.contains(r#"silo_router_requests_total{outcome="forwarded",status_class="2xx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("silo_router_request_duration_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(text.contains("silo_router_pools_open 1"), "{text}");
        assert!(
            !two.render().contains("silo_router_requests_total{"),
            "registries are separate"
        );
    }

    #[test]
    fn per_tenant_series_are_opt_in_and_capped() {
        let off = Metrics::new().unwrap();
        off.tenant_request("acme", 200);
        assert!(!off.render().contains("silo_router_tenant_requests_total{"));

        let on = Metrics::new().unwrap().with_per_tenant(true);
        for i in 0..PER_TENANT_CAP + 5 {
            on.tenant_request(&format!("t{i}"), 200);
        }
        on.tenant_request("t0", 503);
        let text = on.render();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("silo_router_tenant_requests_total{"))
            .collect();
        assert_eq!(series.len(), PER_TENANT_CAP + 2, "{text}");
        assert!(
            text.contains(r#"silo_router_tenant_requests_total{tenant="other",status_class="2xx"} 5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"silo_router_tenant_requests_total{tenant="t0",status_class="5xx"} 1"#),
            "{text}"
        );
    }
}
