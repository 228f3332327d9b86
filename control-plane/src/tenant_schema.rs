//! The tenant app's schema (`migrations/tenant`), applied to a tenant database as its owner
//! role so every object belongs to that one role.
//!
//! Migrations are embedded in the binary, or read from `tenant_migrations_dir` each time a
//! job needs them, so a new migration file is picked up by the next rollout without a
//! restart.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::PgConnection;

use crate::names::quote_ident;

/// Where tenant migrations come from.
#[derive(Debug, Clone)]
pub struct MigrationSource {
    dir: Option<PathBuf>,
}

impl MigrationSource {
    /// The embedded migrations, or those in `dir`.
    pub fn new(dir: Option<&Path>) -> Self {
        Self {
            dir: dir.map(Path::to_owned),
        }
    }

    /// The migrations as they are now.
    pub async fn load(&self) -> Result<TenantMigrations, MigrateError> {
        let migrator = match &self.dir {
            Some(dir) => Migrator::new(dir.as_path()).await?,
            None => sqlx::migrate!("../migrations/tenant"),
        };
        Ok(TenantMigrations { migrator })
    }
}

/// A set of tenant migrations.
#[derive(Debug)]
pub struct TenantMigrations {
    migrator: Migrator,
}

impl TenantMigrations {
    /// The version a fully migrated tenant database has.
    pub fn latest_version(&self) -> i64 {
        self.migrator.iter().map(|m| m.version).max().unwrap_or(0)
    }

    /// A short fingerprint of every migration's version and checksum: templates built from
    /// other migrations have another fingerprint.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for m in self.migrator.iter() {
            h.update(m.version.to_be_bytes());
            h.update(&m.checksum);
        }
        hex::encode(&h.finalize()[..4])
    }

    /// Applies every pending migration up to `target` (all when None), each in its own
    /// transaction, as `owner_role`.
    pub async fn apply(
        &self,
        conn: &mut PgConnection,
        owner_role: &str,
        target: Option<i64>,
    ) -> Result<(), MigrateError> {
        sqlx::query(sqlx::AssertSqlSafe(format!("SET ROLE {}", quote_ident(owner_role))))
            .execute(&mut *conn)
            .await?;
        // `run_direct` takes the connection itself; `run` goes through `Acquire`, whose
        // higher-ranked bound makes the calling future not `Send`.
        let result = self.migrator.run_direct(target, &mut *conn, false).await;
        sqlx::query("RESET ROLE").execute(&mut *conn).await?;
        result
    }
}

/// The version a tenant database is at: the highest successfully applied migration.
pub async fn applied_version(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(0);
    }
    sqlx::query_scalar("SELECT COALESCE(max(version), 0) FROM public._sqlx_migrations WHERE success")
        .fetch_one(conn)
        .await
}
