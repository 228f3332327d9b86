//! Tenant rows as the control plane sees them: the tenant JSON of the admin API, placement
//! on a server, and status changes (each announced to routers with NOTIFY).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use super::routes::TenantStatus;
use crate::names::NamingKey;

/// A tenant as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Tenant {
    /// The slug.
    pub slug: String,
    /// Display name.
    pub name: String,
    /// Lifecycle status.
    pub status: TenantStatus,
    /// Plan name.
    pub plan: String,
    /// Server holding its database.
    pub server: String,
    /// Its database.
    pub database: String,
    /// Custom domains.
    pub domains: Vec<String>,
    /// Highest tenant migration applied.
    pub schema_version: i64,
    /// When credentials were last rotated (or first created).
    pub credentials_rotated_at: Option<DateTime<Utc>>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// The last job error while `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The server its database is being moved to (a `move` job runs; not served meanwhile,
    /// unless `moving_online`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moving_to: Option<String>,
    /// An online move is copying its database while it is served (until the cutover).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub moving_online: bool,
    /// The backup a `restore` job is putting back into its database (not served meanwhile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restoring_from: Option<String>,
    /// Why its data is under legal hold: it cannot be deleted, nor its backups erased.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub legal_hold: Option<String>,
    /// The region of its server (`[[servers]] region`), where its data lives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

#[derive(sqlx::FromRow)]
struct TenantRow {
    slug: String,
    name: String,
    status: String,
    plan: String,
    server: String,
    database: String,
    domains: Vec<String>,
    schema_version: i64,
    credentials_rotated_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    error: Option<String>,
    moving_to: Option<String>,
    moving_online: bool,
    restoring_from: Option<String>,
    legal_hold: Option<String>,
    region: Option<String>,
}

impl TryFrom<TenantRow> for Tenant {
    type Error = sqlx::Error;
    fn try_from(r: TenantRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            status: r.status.parse().map_err(|e: String| sqlx::Error::Decode(e.into()))?,
            slug: r.slug,
            name: r.name,
            plan: r.plan,
            server: r.server,
            database: r.database,
            domains: r.domains,
            schema_version: r.schema_version,
            credentials_rotated_at: r.credentials_rotated_at,
            created_at: r.created_at,
            error: r.error,
            moving_to: r.moving_to,
            moving_online: r.moving_online,
            restoring_from: r.restoring_from,
            legal_hold: r.legal_hold,
            region: r.region,
        })
    }
}

const SELECT: &str = "SELECT t.slug, t.name, t.status, t.plan, t.server, t.database, \
     COALESCE(ARRAY(SELECT d.domain FROM tenant_domains d WHERE d.slug = t.slug ORDER BY d.domain), '{}') AS domains, \
     t.schema_version, t.credentials_rotated_at, t.created_at, t.error, t.moving_to, t.moving_online, t.restoring_from, t.legal_hold, \
     (SELECT s.region FROM servers s WHERE s.name = t.server) AS region FROM tenants t";

/// The tenant `slug`, deleted tombstones included.
pub async fn get(exec: &mut PgConnection, slug: &str) -> Result<Option<Tenant>, sqlx::Error> {
    sqlx::query_as::<_, TenantRow>(sqlx::AssertSqlSafe(format!("{SELECT} WHERE t.slug = $1")))
        .bind(slug)
        .fetch_optional(exec)
        .await?
        .map(Tenant::try_from)
        .transpose()
}

/// Which tenants [`list`] returns: every one that is not deleted when all are None.
#[derive(Debug, Default)]
pub struct TenantFilter {
    /// Only in this status.
    pub status: Option<TenantStatus>,
    /// Only on this server.
    pub server: Option<String>,
    /// Only on this plan.
    pub plan: Option<String>,
    /// Only on servers in this region.
    pub region: Option<String>,
}

/// The tenants `filter` selects, deleted ones only when asked for by status, by slug.
pub async fn list(pool: &PgPool, filter: &TenantFilter) -> Result<Vec<Tenant>, sqlx::Error> {
    sqlx::query_as::<_, TenantRow>(sqlx::AssertSqlSafe(format!(
        "{SELECT} WHERE ($1::text IS NULL AND t.status <> 'deleted' OR t.status = $1) \
           AND ($2::text IS NULL OR t.server = $2) AND ($3::text IS NULL OR t.plan = $3) \
           AND ($4::text IS NULL OR t.server IN (SELECT s.name FROM servers s WHERE s.region = $4)) \
         ORDER BY t.slug"
    )))
    .bind(filter.status.map(TenantStatus::as_str))
    .bind(&filter.server)
    .bind(&filter.plan)
    .bind(&filter.region)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(Tenant::try_from)
    .collect()
}

/// Locks the tenant row for the rest of the transaction and returns its status.
pub async fn lock_status(tx: &mut PgConnection, slug: &str) -> Result<Option<TenantStatus>, sqlx::Error> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM tenants WHERE slug = $1 FOR UPDATE")
        .bind(slug)
        .fetch_optional(tx)
        .await?;
    status
        .map(|s| s.parse().map_err(|e: String| sqlx::Error::Decode(e.into())))
        .transpose()
}

/// The key new tenants' database names are derived from ([`TenantNames::derive`]).
pub async fn naming_key(exec: &mut PgConnection) -> Result<NamingKey, sqlx::Error> {
    let key: Vec<u8> = sqlx::query_scalar("SELECT key FROM naming_key").fetch_one(exec).await?;
    NamingKey::from_bytes(&key).ok_or_else(|| sqlx::Error::Decode("naming_key.key is not 32 bytes".into()))
}

/// Why `slug`'s data is under legal hold, if it is (deleted tenants included).
pub async fn legal_hold(exec: &mut PgConnection, slug: &str) -> Result<Option<String>, sqlx::Error> {
    Ok(sqlx::query_scalar("SELECT legal_hold FROM tenants WHERE slug = $1")
        .bind(slug)
        .fetch_optional(exec)
        .await?
        .flatten())
}

/// Puts `slug` under legal hold for `reason`, or releases it (None). False when no tenant,
/// not even a deleted one, has that slug.
pub async fn set_legal_hold(tx: &mut PgConnection, slug: &str, reason: Option<&str>) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query("UPDATE tenants SET legal_hold = $2, updated_at = now() WHERE slug = $1")
        .bind(slug)
        .bind(reason)
        .execute(tx)
        .await?;
    Ok(updated.rows_affected() == 1)
}

/// Sets the status (and error) of `slug` and tells the routers.
pub async fn set_status(
    tx: &mut PgConnection,
    slug: &str,
    status: TenantStatus,
    error: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE tenants SET status = $2, error = $3, updated_at = now(), \
         deleted_at = CASE WHEN $2 = 'deleted' THEN now() ELSE deleted_at END WHERE slug = $1",
    )
    .bind(slug)
    .bind(status.as_str())
    .bind(error)
    .execute(&mut *tx)
    .await?;
    super::notify_tenant_changed(&mut *tx, slug).await
}

/// Chooses the server for a new tenant (or a tenant moving in): the configured one with the
/// fewest live tenants and room under its `max_tenants`, counting tenants moving to it, among
/// those named `only` and in `region` when given. Locks the server rows so concurrent
/// creations and moves count right.
pub async fn place(
    tx: &mut PgConnection,
    only: Option<&str>,
    region: Option<&str>,
) -> Result<Option<String>, sqlx::Error> {
    const CANDIDATES: &str = "($1::text IS NULL OR s.name = $1) AND ($2::text IS NULL OR s.region = $2)";
    // Lock first, count in a statement of its own: a statement that waited for the locks still
    // reads the tenants as of its start, without the one the creation holding them inserted.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT s.name FROM servers s WHERE {CANDIDATES} ORDER BY s.name FOR UPDATE"
    )))
    .bind(only)
    .bind(region)
    .execute(&mut *tx)
    .await?;
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT s.name FROM servers s \
         LEFT JOIN tenants t ON (t.server = s.name OR t.moving_to = s.name) AND t.status <> 'deleted' \
         WHERE {CANDIDATES} \
         GROUP BY s.name, s.max_tenants HAVING count(t.slug) < s.max_tenants \
         ORDER BY count(t.slug), s.name LIMIT 1"
    )))
    .bind(only)
    .bind(region)
    .fetch_optional(tx)
    .await
}

/// Ends the move of `slug` without moving it (an abandoned move): routers serve it where it
/// lives again.
pub async fn cancel_move(tx: &mut PgConnection, slug: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE tenants SET moving_to = NULL, moving_online = false, updated_at = now() WHERE slug = $1")
        .bind(slug)
        .execute(&mut *tx)
        .await?;
    super::notify_tenant_changed(&mut *tx, slug).await
}

/// Marks `slug` as being restored from backup `file` (or clears the mark with None) and tells
/// the routers, which stop serving the tenant until it is cleared.
pub async fn set_restoring_from(tx: &mut PgConnection, slug: &str, file: Option<&str>) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE tenants SET restoring_from = $2, updated_at = now() WHERE slug = $1")
        .bind(slug)
        .bind(file)
        .execute(&mut *tx)
        .await?;
    super::notify_tenant_changed(&mut *tx, slug).await
}

/// Why a tenant cannot start moving now.
#[derive(Debug, thiserror::Error)]
pub enum StartMoveError {
    /// A migration rollout is queued or running: it would migrate the database being copied.
    #[error("migration rollout job {0} is running; move the tenant once it is done")]
    RolloutRunning(i64),
    /// The target server is at its `max_tenants`.
    #[error("server {0:?} is at max_tenants")]
    NoCapacity(String),
    /// The catalog failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Marks `slug` (whose row the caller locked) as moving to server `to`, taking room there,
/// unless a migration rollout is queued or running; routers stop serving it, unless `online`
/// (until [`cut_over`]). A tenant already moving to `to` keeps its room.
pub async fn start_move(tx: &mut PgConnection, slug: &str, to: &str, online: bool) -> Result<(), StartMoveError> {
    let moving_to: Option<String> = sqlx::query_scalar("SELECT moving_to FROM tenants WHERE slug = $1")
        .bind(slug)
        .fetch_one(&mut *tx)
        .await?;
    // Servers before jobs, the order tenant creation takes them in.
    if moving_to.as_deref() != Some(to) && place(tx, Some(to), None).await?.is_none() {
        return Err(StartMoveError::NoCapacity(to.to_owned()));
    }
    if let Some(id) = crate::jobs::lock_for_rollout(tx).await? {
        return Err(StartMoveError::RolloutRunning(id));
    }
    sqlx::query("UPDATE tenants SET moving_to = $2, moving_online = $3, updated_at = now() WHERE slug = $1")
        .bind(slug)
        .bind(to)
        .bind(online)
        .execute(&mut *tx)
        .await?;
    super::notify_tenant_changed(&mut *tx, slug).await?;
    Ok(())
}

/// The cutover of the online move of `slug`: routers stop serving it until the move ends.
pub async fn cut_over(tx: &mut PgConnection, slug: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE tenants SET moving_online = false, updated_at = now() WHERE slug = $1")
        .bind(slug)
        .execute(&mut *tx)
        .await?;
    super::notify_tenant_changed(&mut *tx, slug).await
}

/// Ends the move of `slug`: it now lives on server `to`, and routers serve it from there.
pub async fn finish_move(tx: &mut PgConnection, slug: &str, to: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE tenants SET server = $2, moving_to = NULL, moving_online = false, updated_at = now() WHERE slug = $1",
    )
    .bind(slug)
    .bind(to)
    .execute(&mut *tx)
    .await?;
    super::notify_tenant_changed(&mut *tx, slug).await
}

/// A tenant to insert.
pub struct NewTenant<'a> {
    /// Slug.
    pub slug: &'a str,
    /// Display name.
    pub name: &'a str,
    /// Plan.
    pub plan: &'a str,
    /// Server.
    pub server: &'a str,
    /// Database name.
    pub database: &'a str,
    /// Custom domains.
    pub domains: &'a [String],
}

/// Why a tenant could not be inserted or changed.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    /// A live tenant has the slug.
    #[error("tenant {0:?} already exists")]
    SlugTaken(String),
    /// Another tenant registered the domain.
    #[error("domain {0:?} belongs to another tenant")]
    DomainTaken(String),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Inserts a `provisioning` tenant. A `deleted` tombstone with the same slug is replaced
/// (its history stays in the audit log).
pub async fn insert(tx: &mut PgConnection, t: &NewTenant<'_>) -> Result<Tenant, InsertError> {
    let inserted = sqlx::query(
        "INSERT INTO tenants (slug, name, plan, status, server, database) \
         VALUES ($1, $2, $3, 'provisioning', $4, $5) \
         ON CONFLICT (slug) DO UPDATE SET name = EXCLUDED.name, plan = EXCLUDED.plan, \
           status = 'provisioning', server = EXCLUDED.server, database = EXCLUDED.database, \
           schema_version = 0, credentials_rotated_at = NULL, error = NULL, \
           created_at = now(), updated_at = now(), deleted_at = NULL \
         WHERE tenants.status = 'deleted'",
    )
    .bind(t.slug)
    .bind(t.name)
    .bind(t.plan)
    .bind(t.server)
    .bind(t.database)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(InsertError::SlugTaken(t.slug.to_owned()));
    }
    for domain in t.domains {
        let added = sqlx::query("INSERT INTO tenant_domains (domain, slug) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(domain)
            .bind(t.slug)
            .execute(&mut *tx)
            .await?;
        if added.rows_affected() == 0 {
            return Err(InsertError::DomainTaken(domain.clone()));
        }
    }
    super::notify_tenant_changed(&mut *tx, t.slug).await?;
    get(tx, t.slug)
        .await?
        .ok_or(InsertError::Database(sqlx::Error::RowNotFound))
}

/// What [`update`] changes; `None` and empty lists leave things as they are.
#[derive(Debug, Default)]
pub struct TenantChanges<'a> {
    /// A new display name.
    pub name: Option<&'a str>,
    /// A new plan.
    pub plan: Option<&'a str>,
    /// Custom domains to add (one the tenant has already is fine).
    pub add_domains: &'a [String],
    /// Custom domains to remove (one it does not have is ignored).
    pub remove_domains: &'a [String],
}

/// Changes tenant `slug`'s name, plan and custom domains, and tells the routers.
pub async fn update(tx: &mut PgConnection, slug: &str, changes: &TenantChanges<'_>) -> Result<Tenant, InsertError> {
    sqlx::query(
        "UPDATE tenants SET name = COALESCE($2, name), plan = COALESCE($3, plan), updated_at = now() \
         WHERE slug = $1",
    )
    .bind(slug)
    .bind(changes.name)
    .bind(changes.plan)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM tenant_domains WHERE slug = $1 AND domain = ANY($2)")
        .bind(slug)
        .bind(changes.remove_domains)
        .execute(&mut *tx)
        .await?;
    for domain in changes.add_domains {
        let owner: String = sqlx::query_scalar(
            "WITH added AS (INSERT INTO tenant_domains (domain, slug) VALUES ($1, $2) \
             ON CONFLICT (domain) DO NOTHING RETURNING slug) \
             SELECT slug FROM added UNION ALL SELECT slug FROM tenant_domains WHERE domain = $1",
        )
        .bind(domain)
        .bind(slug)
        .fetch_one(&mut *tx)
        .await?;
        if owner != slug {
            return Err(InsertError::DomainTaken(domain.clone()));
        }
    }
    super::notify_tenant_changed(&mut *tx, slug).await?;
    get(tx, slug)
        .await?
        .ok_or(InsertError::Database(sqlx::Error::RowNotFound))
}
