//! One request's way through the router: resolve → directory → pools → forward, inside a
//! `request` span that gets the tenant once it is known, and measured once at the end.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::response::Response;
use hyper::body::Incoming;
use hyper::Request;
use silo_control_plane::catalog::routes::TenantStatus;
use silo_tenant_app::TenantContext;
use tracing::field::Empty;
use tracing::Instrument;

use crate::directory::Directory;
use crate::errors::RouterError;
use crate::forward::forward;
use crate::ops::Metrics;
use crate::pools::Pools;
use crate::resolve::{Resolution, Resolver};

/// Everything a tenant request needs; shared by all connections.
pub(crate) struct RouterState {
    pub(crate) resolver: Resolver,
    pub(crate) directory: Arc<Directory>,
    pub(crate) pools: Pools,
    /// The tenant app, built once.
    pub(crate) app: axum::Router,
    pub(crate) metrics: Arc<Metrics>,
}

/// Serves one tenant request. Never fails: every error is a response.
pub(crate) async fn handle(state: Arc<RouterState>, request: Request<Incoming>) -> Response {
    let started = Instant::now();
    let request_id = uuid::Uuid::new_v4();
    let span = tracing::info_span!("request", %request_id, tenant = Empty, status = Empty);
    let (response, outcome) = match route(&state, request.map(Body::new)).instrument(span.clone()).await {
        Ok(response) => (response, "forwarded"),
        Err(error) => (error.into_response(), error.code()),
    };
    let status = response.status();
    span.record("status", status.as_u16());
    state.metrics.request(outcome, status.as_u16(), started.elapsed());
    span.in_scope(|| tracing::debug!(outcome, elapsed = ?started.elapsed(), "request done"));
    response
}

async fn route(state: &RouterState, request: Request<Body>) -> Result<Response, RouterError> {
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
    match route.status {
        TenantStatus::Active => {}
        TenantStatus::Suspended => return Err(RouterError::TenantSuspended),
        TenantStatus::Provisioning | TenantStatus::Failed => return Err(RouterError::TenantUnavailable),
        // Answered exactly like an unknown host.
        TenantStatus::Deleting | TenantStatus::Deleted => return Err(RouterError::TenantNotFound),
    }
    let pool = state.pools.get(&route.slug).await.map_err(|error| {
        tracing::warn!(%error, "cannot open the tenant's pool");
        RouterError::TenantUnavailable
    })?;
    let tenant = TenantContext { slug: route.slug, pool };
    Ok(forward(&state.app, request, tenant, path).await)
}
