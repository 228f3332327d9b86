//! The router's read model: what a router needs to serve a tenant, looked up by slug or by
//! custom domain.

use sqlx::PgPool;

/// Lifecycle status of a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantStatus {
    /// Its database is being created.
    Provisioning,
    /// Serving traffic.
    Active,
    /// Refused by the router with 403.
    Suspended,
    /// Being deleted.
    Deleting,
    /// Gone; the row is kept as a tombstone.
    Deleted,
    /// A job failed; see the job's error.
    Failed,
}

impl TenantStatus {
    /// The status as stored in the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
            Self::Failed => "failed",
        }
    }
}

impl std::str::FromStr for TenantStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "provisioning" => Self::Provisioning,
            "active" => Self::Active,
            "suspended" => Self::Suspended,
            "deleting" => Self::Deleting,
            "deleted" => Self::Deleted,
            "failed" => Self::Failed,
            other => return Err(format!("unknown tenant status {other:?}")),
        })
    }
}

/// Where a tenant lives and whether it may be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRoute {
    /// The tenant slug.
    pub slug: String,
    /// Its status.
    pub status: TenantStatus,
    /// The server name (see `[[servers]]`).
    pub server: String,
    /// The database name.
    pub database: String,
    /// The tenant's plan (the router's per-plan limits).
    pub plan: String,
    /// Its database is being moved to another server: not served until the move ends.
    pub moving: bool,
}

impl TenantRoute {
    /// Whether requests for this tenant go to its database.
    pub fn is_served(&self) -> bool {
        self.status == TenantStatus::Active && !self.moving
    }
}

#[derive(sqlx::FromRow)]
struct RouteRow {
    slug: String,
    status: String,
    server: String,
    database: String,
    plan: String,
    moving: bool,
}

#[derive(sqlx::FromRow)]
struct RouteWithDomains {
    #[sqlx(flatten)]
    route: RouteRow,
    domains: Vec<String>,
}

impl TryFrom<RouteRow> for TenantRoute {
    type Error = sqlx::Error;
    fn try_from(r: RouteRow) -> Result<Self, Self::Error> {
        Ok(Self {
            status: r.status.parse().map_err(|e: String| sqlx::Error::Decode(e.into()))?,
            slug: r.slug,
            server: r.server,
            database: r.database,
            plan: r.plan,
            moving: r.moving,
        })
    }
}

/// The route of tenant `slug`, if the catalog has one (deleted tenants included; the caller
/// treats `Deleted` like unknown).
pub async fn by_slug(pool: &PgPool, slug: &str) -> Result<Option<TenantRoute>, sqlx::Error> {
    sqlx::query_as::<_, RouteRow>(
        "SELECT slug, status, server, database, plan, ((moving_to IS NOT NULL AND NOT moving_online) OR restoring_from IS NOT NULL) AS moving FROM tenants WHERE slug = $1",
    )
    .bind(slug)
    .fetch_optional(pool)
    .await?
    .map(TenantRoute::try_from)
    .transpose()
}

/// Every tenant that is not deleted, with its custom domains: what a router loads so that
/// a tenant's first request does not wait for the catalog.
pub async fn all(pool: &PgPool) -> Result<Vec<(TenantRoute, Vec<String>)>, sqlx::Error> {
    sqlx::query_as::<_, RouteWithDomains>(
        "SELECT t.slug, t.status, t.server, t.database, t.plan, ((t.moving_to IS NOT NULL AND NOT t.moving_online) OR t.restoring_from IS NOT NULL) AS moving, \
                coalesce(array_agg(d.domain) FILTER (WHERE d.domain IS NOT NULL), '{}') AS domains \
         FROM tenants t LEFT JOIN tenant_domains d ON d.slug = t.slug \
         WHERE t.status <> 'deleted' GROUP BY t.slug",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|row| Ok((TenantRoute::try_from(row.route)?, row.domains)))
    .collect()
}

/// The route of the tenant that registered custom domain `domain` (lower case, no port).
pub async fn by_domain(pool: &PgPool, domain: &str) -> Result<Option<TenantRoute>, sqlx::Error> {
    sqlx::query_as::<_, RouteRow>(
        "SELECT t.slug, t.status, t.server, t.database, t.plan, ((t.moving_to IS NOT NULL AND NOT t.moving_online) OR t.restoring_from IS NOT NULL) AS moving \
         FROM tenant_domains d \
         JOIN tenants t ON t.slug = d.slug WHERE d.domain = $1",
    )
    .bind(domain)
    .fetch_optional(pool)
    .await?
    .map(TenantRoute::try_from)
    .transpose()
}
