//! The operations port: `/healthz` (the process answers), `/readyz` (it can route: the
//! catalog answered and tenant events are being received, and it is not shutting down), and
//! `/metrics` (Prometheus text).
//!
//! Each router has its own Prometheus registry ([`Metrics`]). Every router metric is named `silo_router_*` and has bounded labels only: no tenant ids.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio_util::sync::CancellationToken;

const REQUEST_DURATION: &str = "silo_router_request_duration_seconds";
/// Histogram buckets of request latency, in seconds.
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

    /// The router is shutting down: load balancers should stop sending traffic.
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    fn is_ready(&self) -> bool {
        self.catalog_answered.load(Ordering::Acquire)
            && self.listening.load(Ordering::Acquire)
            && !self.draining.load(Ordering::Acquire)
    }
}

/// The router's metrics: a Prometheus registry of its own (not the process-global recorder,
/// which an embedding process such as the in-process test stack may already own), so each
/// router's `/metrics` shows exactly its own traffic. Call sites go through the methods
/// below, which keep every label bounded.
pub(crate) struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

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
            .build_recorder();
        let handle = recorder.handle();
        let metrics = Self { recorder, handle };
        metrics.with(describe);
        Ok(metrics)
    }

    /// Runs `f` with this registry as the `metrics` recorder (synchronously, this thread).
    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// One request answered: `outcome` is "forwarded" or a router error code.
    pub(crate) fn request(&self, outcome: &'static str, status: u16, elapsed: Duration) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
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

    /// A tenant pool left the map; `cause` is one of idle, capacity, explicit, replaced.
    pub(crate) fn pool_evicted(&self, cause: &'static str) {
        self.with(|| {
            metrics::counter!("silo_router_pool_evictions_total", "cause" => cause).increment(1);
            metrics::gauge!("silo_router_pools_open").decrement(1.0);
        });
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
    describe_counter!("silo_router_pool_evictions_total", "Tenant pools evicted, by cause.");
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
}
