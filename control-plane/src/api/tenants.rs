//! `/v1/tenants`: create, list, show, update, suspend, resume, delete, break-glass
//! credentials.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Actor;
use super::backups::require_backups_dir;
use super::error::ApiError;
use super::extract::{Body, Path, Query};
use super::holds::refuse_if_held;
use super::ApiState;
use crate::catalog::routes::TenantStatus;
use crate::catalog::tenants::{self, InsertError, NewTenant, Tenant};
use crate::names::{TenantNames, TenantSlug};
use crate::provision::{DeleteParams, ProvisionParams};
use crate::{audit, jobs, secrets};

/// `POST /v1/tenants` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    slug: String,
    name: Option<String>,
    plan: Option<String>,
    #[serde(default)]
    domains: Vec<String>,
    server: Option<String>,
    /// Place it on a server in this region (`[[servers]] region`).
    region: Option<String>,
    /// File name of a backup of this slug (in `[backups] dir/{slug}/`) to restore the new
    /// database from: a deleted tenant created again with its data and API keys.
    restore_from: Option<String>,
}

pub(super) fn parse_slug(slug: &str) -> Result<TenantSlug, ApiError> {
    TenantSlug::parse(slug).map_err(|e| ApiError::BadRequest("invalid_slug", e.to_string()))
}

/// A custom domain: a lower-case DNS name of two or more labels, the last not all digits,
/// not under a base domain (those hosts belong to `{slug}.{base}` routing).
fn parse_domain(domain: &str, base_domains: &[String]) -> Result<String, ApiError> {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    let bad = |why: &str| ApiError::BadRequest("invalid_domain", format!("domain {domain:?} {why}"));
    let labels: Vec<&str> = d.split('.').collect();
    let label_ok = |l: &&str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if d.len() > 253 || labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err(bad("is not a valid domain name"));
    }
    // No top-level domain is all digits: this is an IPv4 address, which the router does not
    // route by.
    if labels.last().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return Err(bad("is an IP address, not a domain name"));
    }
    if base_domains.iter().any(|b| d == *b || d.ends_with(&format!(".{b}"))) {
        return Err(bad("is under a base domain of the router"));
    }
    Ok(d)
}

fn parse_plan(plan: Option<String>) -> Result<String, ApiError> {
    let plan = plan.unwrap_or_else(|| "standard".into());
    let ok = (1..=32).contains(&plan.len())
        && plan
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        return Err(ApiError::BadRequest(
            "invalid_plan",
            "plan must be 1-32 characters of a-z, 0-9, '-'".into(),
        ));
    }
    Ok(plan)
}

fn parse_name(name: Option<String>, slug: &TenantSlug) -> Result<String, ApiError> {
    let name = name.unwrap_or_else(|| slug.to_string());
    let len = name.chars().count();
    if len == 0 || len > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "invalid_name",
            "name must be 1-200 printable characters".into(),
        ));
    }
    Ok(name)
}

/// Locks tenant `slug`'s row for the transaction and checks it is active or suspended, the
/// states a rotation, a backup or a move starts from: 404 for an unknown or deleted tenant,
/// 409 `invalid_state` naming what was refused (`action`, e.g. "moved") otherwise.
pub(super) async fn lock_active_or_suspended(
    tx: &mut sqlx::PgConnection,
    slug: &TenantSlug,
    action: &str,
) -> Result<(), ApiError> {
    match tenants::lock_status(tx, slug.as_str()).await? {
        None | Some(TenantStatus::Deleted) => Err(ApiError::tenant_not_found(slug.as_str())),
        Some(TenantStatus::Active | TenantStatus::Suspended) => Ok(()),
        Some(other) => Err(ApiError::Conflict(
            "invalid_state",
            format!(
                "tenant {slug} is {}; only an active or suspended tenant can be {action}",
                other.as_str()
            ),
        )),
    }
}

/// A tenant created or restored from a backup needs backups configured and that backup of its
/// own slug (in `[backups] dir` or the `[backups.s3]` bucket): 422 `backup_not_found`.
pub(super) async fn check_backup(state: &ApiState, slug: &TenantSlug, name: &str) -> Result<(), ApiError> {
    require_backups_dir(state, "restoring a backup")?;
    if !state.backups.exists(slug, name).await? {
        return Err(ApiError::Unprocessable(
            "backup_not_found",
            format!("tenant {slug} has no backup named {name:?} (siloctl tenant backups {slug} lists them)"),
        ));
    }
    Ok(())
}

/// A tenant asked for in `region` needs a server there (422 `unknown_region`), and the
/// `server` asked for with it must be one (422 `region_mismatch`).
fn check_region(state: &ApiState, region: Option<&str>, server: Option<&str>) -> Result<(), ApiError> {
    let Some(region) = region else { return Ok(()) };
    let in_region = |name: &str| {
        state
            .servers
            .get(name)
            .is_some_and(|s| s.config.region.as_deref() == Some(region))
    };
    match server {
        Some(server) if !in_region(server) => Err(ApiError::Unprocessable(
            "region_mismatch",
            format!("server {server:?} is not in region {region:?}"),
        )),
        Some(_) => Ok(()),
        None if state.servers.iter().any(|s| s.config.region.as_deref() == Some(region)) => Ok(()),
        None => Err(ApiError::Unprocessable(
            "unknown_region",
            format!("no server is in region {region:?} (siloctl server list shows the regions)"),
        )),
    }
}

/// `POST /v1/tenants` → 202 `{"tenant","job","api_key"}`.
pub async fn create(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Body(req): Body<CreateTenant>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let slug = parse_slug(&req.slug)?;
    let name = parse_name(req.name, &slug)?;
    let plan = parse_plan(req.plan)?;
    let mut domains = Vec::with_capacity(req.domains.len());
    for d in &req.domains {
        let d = parse_domain(d, &state.config.router.base_domains)?;
        if !domains.contains(&d) {
            domains.push(d);
        }
    }
    if let Some(server) = &req.server {
        if state.servers.get(server).is_none() {
            return Err(ApiError::BadRequest(
                "unknown_server",
                format!("server {server:?} is not configured"),
            ));
        }
    }
    check_region(&state, req.region.as_deref(), req.server.as_deref())?;

    if let Some(backup) = &req.restore_from {
        check_backup(&state, &slug, backup).await?;
    }

    let (api_key, key_hash) = silo_tenant_app::api_keys::generate();
    let secret_version = uuid::Uuid::new_v4().to_string();
    // A restored database has the old keys, likely a `default` among them.
    let api_key_name = match &req.restore_from {
        Some(_) => format!("restored-{}", &secret_version[..8]),
        None => "default".into(),
    };
    let params = ProvisionParams {
        api_key_name,
        api_key_hash: hex::encode(key_hash),
        secret_version,
        restore_from: req.restore_from,
        requested_by: Some(actor.clone()),
    };
    let mut tx = state.catalog.begin().await?;
    let server = tenants::place(&mut tx, req.server.as_deref(), req.region.as_deref())
        .await?
        .ok_or_else(|| {
            let full = match &req.region {
                Some(region) => format!("every server in region {region:?} is at max_tenants"),
                None => "every server is at max_tenants".into(),
            };
            ApiError::Unavailable("no_capacity", full)
        })?;
    let names = TenantNames::derive(&tenants::naming_key(&mut tx).await?, &slug);
    let tenant = tenants::insert(
        &mut tx,
        &NewTenant {
            slug: slug.as_str(),
            name: &name,
            plan: &plan,
            server: &server,
            database: names.database(),
            domains: &domains,
        },
    )
    .await
    .map_err(|e| match e {
        InsertError::SlugTaken(_) => ApiError::Conflict("tenant_exists", e.to_string()),
        InsertError::DomainTaken(_) => ApiError::Conflict("domain_taken", e.to_string()),
        InsertError::Database(e) => e.into(),
    })?;
    let params = serde_json::to_value(&params).map_err(|e| ApiError::Internal(e.into()))?;
    let job = jobs::enqueue(&mut tx, "provision", Some(slug.as_str()), params).await?;
    audit::record(
        &mut tx,
        &actor,
        "tenant.create",
        Some(slug.as_str()),
        json!({"server": server, "database": names.database(), "plan": plan, "domains": domains, "job": job.id}),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"tenant": tenant, "job": job, "api_key": api_key})),
    ))
}

/// `PATCH /v1/tenants/{slug}` body: what to change.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateTenant {
    name: Option<String>,
    plan: Option<String>,
    #[serde(default)]
    add_domains: Vec<String>,
    #[serde(default)]
    remove_domains: Vec<String>,
}

/// `PATCH /v1/tenants/{slug}` `{"name"?, "plan"?, "add_domains"?, "remove_domains"?}` → 200
/// tenant: routers pick the change up with the tenant's event (its new plan's limits, its
/// domains). 404, 409 `domain_taken` or `invalid_state` (being deleted).
pub async fn update(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(slug): Path<String>,
    Body(req): Body<UpdateTenant>,
) -> Result<Json<Tenant>, ApiError> {
    let slug = parse_slug(&slug)?;
    let name = req.name.map(|name| parse_name(Some(name), &slug)).transpose()?;
    let plan = req.plan.map(|plan| parse_plan(Some(plan))).transpose()?;
    let base_domains = &state.config.router.base_domains;
    let parse_all = |domains: &[String]| -> Result<Vec<String>, ApiError> {
        domains.iter().map(|d| parse_domain(d, base_domains)).collect()
    };
    let (add_domains, remove_domains) = (parse_all(&req.add_domains)?, parse_all(&req.remove_domains)?);
    let mut tx = state.catalog.begin().await?;
    match tenants::lock_status(&mut tx, slug.as_str()).await? {
        None | Some(TenantStatus::Deleted) => return Err(ApiError::tenant_not_found(slug.as_str())),
        Some(TenantStatus::Deleting) => {
            return Err(ApiError::Conflict(
                "invalid_state",
                format!("tenant {slug} is being deleted"),
            ))
        }
        Some(_) => {}
    }
    let changes = tenants::TenantChanges {
        name: name.as_deref(),
        plan: plan.as_deref(),
        add_domains: &add_domains,
        remove_domains: &remove_domains,
    };
    let tenant = tenants::update(&mut tx, slug.as_str(), &changes)
        .await
        .map_err(|e| match e {
            InsertError::DomainTaken(_) => ApiError::Conflict("domain_taken", e.to_string()),
            InsertError::SlugTaken(_) => ApiError::Internal(e.into()),
            InsertError::Database(e) => e.into(),
        })?;
    let detail = json!({
        "name": name,
        "plan": plan,
        "add_domains": add_domains,
        "remove_domains": remove_domains,
    });
    audit::record(&mut tx, &actor, "tenant.update", Some(slug.as_str()), detail).await?;
    tx.commit().await?;
    Ok(Json(tenant))
}

/// `GET /v1/tenants` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    server: Option<String>,
    plan: Option<String>,
    region: Option<String>,
}

/// `GET /v1/tenants?status=&server=&plan=&region=` → 200 `{"items":[tenant...]}` by slug (deleted
/// tenants only with `status=deleted`).
pub async fn list(State(state): State<ApiState>, Query(q): Query<ListQuery>) -> Result<Json<Value>, ApiError> {
    let status = q
        .status
        .map(|s| s.parse::<TenantStatus>())
        .transpose()
        .map_err(|e| ApiError::BadRequest("invalid_query", e))?;
    if let Some(server) = q.server.as_deref().filter(|s| state.servers.get(s).is_none()) {
        return Err(ApiError::BadRequest(
            "invalid_query",
            format!("server {server:?} is not configured"),
        ));
    }
    let filter = tenants::TenantFilter {
        status,
        server: q.server,
        plan: q.plan,
        region: q.region,
    };
    Ok(Json(json!({"items": tenants::list(&state.catalog, &filter).await?})))
}

pub(super) async fn live_tenant(state: &ApiState, slug: &str) -> Result<Tenant, ApiError> {
    let slug = parse_slug(slug)?;
    let mut conn = state.catalog.acquire().await?;
    match tenants::get(&mut conn, slug.as_str()).await? {
        Some(t) if t.status != TenantStatus::Deleted => Ok(t),
        _ => Err(ApiError::tenant_not_found(slug.as_str())),
    }
}

/// `GET /v1/tenants/{slug}`.
pub async fn show(State(state): State<ApiState>, Path(slug): Path<String>) -> Result<Json<Tenant>, ApiError> {
    Ok(Json(live_tenant(&state, &slug).await?))
}

/// `DELETE /v1/tenants/{slug}` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    #[serde(default)]
    backup: bool,
}

/// Whether a `delete` job takes a backup first.
fn backs_up(job: &jobs::Job) -> bool {
    serde_json::from_value::<DeleteParams>(job.params.clone()).is_ok_and(|params| params.backup)
}

/// `DELETE /v1/tenants/{slug}` → 202 `{"job"}`; with `backup=true` the job dumps the
/// database (into `[backups] dir`) before it drops anything.
pub async fn delete(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(slug): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let slug = parse_slug(&slug)?;
    if q.backup {
        require_backups_dir(&state, "a delete with backup=true")?;
    }
    let params = json!(DeleteParams { backup: q.backup });
    let mut tx = state.catalog.begin().await?;
    let status = tenants::lock_status(&mut tx, slug.as_str()).await?;
    if !matches!(status, None | Some(TenantStatus::Deleted)) {
        refuse_if_held(&mut tx, slug.as_str(), "deleting it").await?;
    }
    let job = match status {
        None | Some(TenantStatus::Deleted) => return Err(ApiError::tenant_not_found(slug.as_str())),
        Some(TenantStatus::Deleting) => match jobs::active_for_tenant(&mut tx, slug.as_str()).await? {
            Some(job) if q.backup && !backs_up(&job) => {
                return Err(ApiError::Conflict(
                    "tenant_busy",
                    format!("job {} is deleting this tenant without a backup", job.id),
                ))
            }
            Some(job) => job,
            None => jobs::enqueue(&mut tx, "delete", Some(slug.as_str()), params).await?,
        },
        Some(_) => {
            if let Some(job) = jobs::active_for_tenant(&mut tx, slug.as_str()).await? {
                return Err(ApiError::tenant_busy(&job));
            }
            tenants::set_status(&mut tx, slug.as_str(), TenantStatus::Deleting, None).await?;
            jobs::enqueue(&mut tx, "delete", Some(slug.as_str()), params).await?
        }
    };
    audit::record(
        &mut tx,
        &actor,
        "tenant.delete",
        Some(slug.as_str()),
        json!({"job": job.id}),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"job": job}))))
}

async fn change_status(
    state: &ApiState,
    actor: &str,
    slug: &str,
    from: TenantStatus,
    to: TenantStatus,
    action: &str,
) -> Result<Json<Tenant>, ApiError> {
    let slug = parse_slug(slug)?;
    let mut tx = state.catalog.begin().await?;
    match tenants::lock_status(&mut tx, slug.as_str()).await? {
        None | Some(TenantStatus::Deleted) => return Err(ApiError::tenant_not_found(slug.as_str())),
        Some(s) if s == to => {}
        Some(s) if s == from => {
            tenants::set_status(&mut tx, slug.as_str(), to, None).await?;
            audit::record(&mut tx, actor, action, Some(slug.as_str()), json!({})).await?;
        }
        Some(s) => {
            return Err(ApiError::Conflict(
                "invalid_state",
                format!(
                    "tenant is {}; it can be made {} only when {}",
                    s.as_str(),
                    to.as_str(),
                    from.as_str()
                ),
            ))
        }
    }
    let tenant = tenants::get(&mut tx, slug.as_str())
        .await?
        .ok_or_else(|| ApiError::tenant_not_found(slug.as_str()))?;
    tx.commit().await?;
    Ok(Json(tenant))
}

/// `POST /v1/tenants/{slug}/suspend`.
pub async fn suspend(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(slug): Path<String>,
) -> Result<Json<Tenant>, ApiError> {
    change_status(
        &state,
        &actor,
        &slug,
        TenantStatus::Active,
        TenantStatus::Suspended,
        "tenant.suspend",
    )
    .await
}

/// `POST /v1/tenants/{slug}/resume`.
pub async fn resume(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(slug): Path<String>,
) -> Result<Json<Tenant>, ApiError> {
    change_status(
        &state,
        &actor,
        &slug,
        TenantStatus::Suspended,
        TenantStatus::Active,
        "tenant.resume",
    )
    .await
}

/// Tenant `slug` and its parsed slug, if its database serves: active or suspended (404
/// `tenant_not_found` for none or a deleted one, 409 `invalid_state` otherwise).
pub(super) async fn tenant_with_database(state: &ApiState, slug: &str) -> Result<(Tenant, TenantSlug), ApiError> {
    let tenant = live_tenant(state, slug).await?;
    match tenant.status {
        TenantStatus::Active | TenantStatus::Suspended => {
            let slug = parse_slug(&tenant.slug)?;
            Ok((tenant, slug))
        }
        other => Err(ApiError::Conflict(
            "invalid_state",
            format!("tenant is {}; its database is not ready", other.as_str()),
        )),
    }
}

/// `GET /v1/tenants/{slug}/credentials`: break-glass read of the current secret; audited
/// before it is returned.
pub async fn credentials(
    State(state): State<ApiState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(slug): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (_, slug) = tenant_with_database(&state, &slug).await?;
    let mut tx = state.catalog.begin().await?;
    audit::record(
        &mut tx,
        &actor,
        "tenant.credentials.read",
        Some(slug.as_str()),
        json!({}),
    )
    .await?;
    tx.commit().await?;
    let name = secrets::tenant_secret_name(&state.config.secrets.name_prefix, &slug);
    let version = state
        .store
        .get_secret_value(&name, secrets::AWSCURRENT)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .ok_or_else(|| ApiError::NotFound("secret_not_found", "the tenant has no current secret".into()))?;
    let value: Value = serde_json::from_str(version.value.expose_secret())
        .map_err(|_| ApiError::Internal(anyhow::anyhow!("secret {name} is not JSON")))?;
    Ok(Json(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_validated() {
        let base = vec!["localhost".to_string()];
        assert_eq!(parse_domain("Acme.Example.COM.", &base).unwrap(), "acme.example.com");
        assert_eq!(parse_domain("1.2.3.com", &base).unwrap(), "1.2.3.com");
        for bad in [
            "localhost",
            "x.localhost",
            "example",
            "a..b",
            "-a.com",
            "a_b.com",
            "a b.com",
            "",
            "127.0.0.1",
            "10.0.0.1.",
            "host.123",
        ] {
            assert!(parse_domain(bad, &base).is_err(), "{bad}");
        }
    }
}
