//! One request's way through the router: resolve → directory → pools → forward, inside a
//! `request` span that gets the tenant once it is known, bounded by `router.request_timeout`,
//! and measured once at the end.
//!
//! A request whose answer says PostgreSQL refused the pool's password (the app's
//! [`DatabaseAuthFailed`] marker: a credential rotation is half done) is not answered yet:
//! the pool switches credentials and the request is handed to the app again (a few times at
//! most). No statement ran on a connection that never logged in, so a retry is safe.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use hyper::body::Incoming;
use hyper::Request;
use silo_control_plane::catalog::routes::TenantStatus;
use silo_tenant_app::DatabaseAuthFailed;
use tracing::field::Empty;
use tracing::Instrument;

use crate::directory::Directory;
use crate::errors::RouterError;
use crate::forward::{forward, BufferedRequest};
use crate::limits::Limits;
use crate::ops::Metrics;
use crate::pools::Pools;
use crate::resolve::{Resolution, Resolver};

/// How often a request refused by PostgreSQL's password check is retried, each time after
/// the pool's credentials were checked: more than once, because under back-to-back `single`
/// rotations a retry that waited for a connection can meet the next password change.
const AUTH_RETRIES: usize = 3;

/// Everything a tenant request needs; shared by all connections.
pub(crate) struct RouterState {
    pub(crate) resolver: Resolver,
    pub(crate) directory: Arc<Directory>,
    pub(crate) pools: Pools,
    /// The tenant app, built once.
    pub(crate) app: axum::Router,
    pub(crate) metrics: Arc<Metrics>,
    /// Per-tenant rate and in-flight limits.
    pub(crate) limits: Arc<Limits>,
    /// `router.max_body_bytes`.
    pub(crate) max_body_bytes: usize,
    /// `router.request_timeout`.
    pub(crate) request_timeout: Duration,
}

/// Serves one tenant request. Never fails: every error is a response.
pub(crate) async fn handle(state: Arc<RouterState>, request: Request<Incoming>) -> Response {
    let started = Instant::now();
    let request_id = uuid::Uuid::new_v4();
    let span = tracing::info_span!("request", %request_id, tenant = Empty, status = Empty);
    // The tenant once resolved, for per-tenant metrics.
    let tenant = std::sync::OnceLock::new();
    let routed = tokio::time::timeout(state.request_timeout, route(&state, request.map(Body::new), &tenant));
    let (response, outcome) = match routed.instrument(span.clone()).await {
        Ok(Ok(response)) => (response, "forwarded"),
        Ok(Err(error)) => (error.into_response(), error.code()),
        Err(_) => {
            span.in_scope(|| tracing::warn!(timeout = ?state.request_timeout, "request timed out"));
            let error = RouterError::RequestTimeout;
            (error.into_response(), error.code())
        }
    };
    let status = response.status();
    span.record("status", status.as_u16());
    state.metrics.request(outcome, status.as_u16(), started.elapsed());
    if let Some(tenant) = tenant.get() {
        state.metrics.tenant_request(tenant, status.as_u16());
    }
    span.in_scope(|| tracing::debug!(outcome, elapsed = ?started.elapsed(), "request done"));
    response
}

async fn route(
    state: &RouterState,
    request: Request<Body>,
    tenant: &std::sync::OnceLock<String>,
) -> Result<Response, RouterError> {
    let (key, path) = match state.resolver.resolve(request.uri(), request.headers())? {
        Resolution::Tenant { key, path } => (key, path),
        Resolution::NoTenant => return Err(RouterError::TenantNotFound),
    };
    let route = state
        .directory
        .lookup(&key)
        .await
        .map_err(|_| RouterError::TenantUnavailable)?
        .ok_or(RouterError::TenantNotFound)?;
    tracing::Span::current().record("tenant", route.slug.as_str());
    let _ = tenant.set(route.slug.clone());
    match route.status {
        // Its database is being copied to another server.
        TenantStatus::Active if route.moving => return Err(RouterError::TenantUnavailable),
        TenantStatus::Active => {}
        TenantStatus::Suspended => return Err(RouterError::TenantSuspended),
        TenantStatus::Provisioning | TenantStatus::Failed => return Err(RouterError::TenantUnavailable),
        // Answered exactly like an unknown host.
        TenantStatus::Deleting | TenantStatus::Deleted => return Err(RouterError::TenantNotFound),
    }
    state.limits.check_rate(&route.slug, &route.plan)?;
    let request = BufferedRequest::read(request, state.max_body_bytes).await?;
    let _in_flight = state.limits.enter(&route.slug, &route.plan)?;
    let lease = state.pools.get(&route).await.map_err(|error| {
        tracing::warn!(%error, "cannot open the tenant's pool");
        RouterError::TenantUnavailable
    })?;
    let tenant = lease.context().clone();
    let mut attempted_at = Instant::now();
    let mut response = forward(&state.app, &request, tenant.clone(), path.as_ref()).await;
    for _ in 0..AUTH_RETRIES {
        if response.extensions().get::<DatabaseAuthFailed>().is_none() {
            break;
        }
        state.pools.recover_from_auth_failure(&lease, attempted_at).await;
        tracing::debug!("retrying after a refused password");
        attempted_at = Instant::now();
        response = forward(&state.app, &request, tenant.clone(), path.as_ref()).await;
    }
    Ok(response)
}
