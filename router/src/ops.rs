//! The operations port: `/healthz` (the process answers), `/readyz` (it can route: the
//! catalog answered and tenant events are being received, and it is not shutting down), and
//! `/metrics` (Prometheus text).
//!
//! The Prometheus recorder is process-global (the `metrics` facade has one recorder per
//! process), installed once; several routers in one process (tests) share it.
//! Every router metric is named `silo_router_*` and has bounded labels only: no tenant ids.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Histogram buckets of request latency, in seconds.
const DURATION_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
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

/// The process's Prometheus handle, installing the recorder on first call. `None` if another
/// recorder was installed first (then `/metrics` reports that instead of empty text).
pub(crate) fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE.get_or_init(install).clone()
}

fn install() -> Option<PrometheusHandle> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("silo_router_request_duration_seconds".into()), DURATION_BUCKETS);
    // Only fails for an empty bucket list, which the constant is not.
    let recorder = match builder {
        Ok(builder) => builder.build_recorder(),
        Err(error) => {
            tracing::error!(%error, "cannot configure the metrics recorder");
            return None;
        }
    };
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("another metrics recorder is already installed; the router's /metrics stays empty");
        return None;
    }
    describe();
    Some(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("silo_router_requests_total", "Requests by outcome and status class.");
    describe_histogram!(
        "silo_router_request_duration_seconds",
        Unit::Seconds,
        "Time from request head to response head."
    );
    describe_gauge!("silo_router_pools_open", "Tenant pools currently open.");
    describe_counter!("silo_router_pool_creations_total", "Tenant pools built.");
    describe_counter!("silo_router_pool_evictions_total", "Tenant pools evicted, by cause.");
    describe_counter!(
        "silo_router_directory_lookups_total",
        "Tenant directory lookups: cache hit, miss (catalog query), negative (cached unknown), stale, error."
    );
}

/// Drains histograms every few seconds until `shutdown`, so memory stays flat between scrapes.
pub(crate) async fn upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => handle.run_upkeep(),
        }
    }
}

/// One request on the operations port.
pub(crate) fn respond<B>(health: &Health, metrics: Option<&PrometheusHandle>, request: &Request<B>) -> Response {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if health.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => match metrics {
            Some(handle) => {
                let mut response = Response::new(Body::from(handle.render()));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
                response
            }
            None => text(StatusCode::SERVICE_UNAVAILABLE, "metrics recorder not installed\n"),
        },
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
    use super::*;

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[test]
    fn readiness_needs_catalog_and_listener_and_no_drain() {
        let health = Health::default();
        let status = |h: &Health| respond(h, None, &get("/readyz")).status();
        assert_eq!(respond(&health, None, &get("/healthz")).status(), StatusCode::OK);
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
        assert_eq!(respond(&health, None, &get("/nope")).status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn metrics_render_prometheus_text() {
        let handle = prometheus().expect("the recorder installs in this test process");
        metrics::counter!("silo_router_requests_total", "outcome" => "forwarded", "status_class" => "2xx")
            .increment(1);
        let response = respond(&Health::default(), Some(&handle), &get("/metrics"));
        assert_eq!(response.status(), StatusCode::OK);
        let text = handle.render();
        assert!(text.contains("silo_router_requests_total{"), "{text}");
    }
}
