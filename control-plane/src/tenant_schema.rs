//! The tenant app's schema (`migrations/tenant`), applied to a tenant database as its owner
//! role so every object belongs to that one role.

use std::path::Path;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::PgConnection;

use crate::names::quote_ident;

/// The tenant migrations: embedded, or read from `tenant_migrations_dir` at start.
#[derive(Debug)]
pub struct TenantMigrations {
    migrator: Migrator,
}

impl TenantMigrations {
    /// The migrations embedded in the binary, or those in `dir`.
    pub async fn load(dir: Option<&Path>) -> Result<Self, MigrateError> {
        let migrator = match dir {
            Some(dir) => Migrator::new(dir).await?,
            None => sqlx::migrate!("../migrations/tenant"),
        };
        Ok(Self { migrator })
    }

    /// The version a fully migrated tenant database has.
    pub fn latest_version(&self) -> i64 {
        self.migrator.iter().map(|m| m.version).max().unwrap_or(0)
    }

    /// Applies every pending migration (each in its own transaction) as `owner_role`, and
    /// returns the version the database is at.
    pub async fn apply(&self, conn: &mut PgConnection, owner_role: &str) -> Result<i64, MigrateError> {
        sqlx::query(sqlx::AssertSqlSafe(format!("SET ROLE {}", quote_ident(owner_role))))
            .execute(&mut *conn)
            .await?;
        // `run_direct` takes the connection itself; `run` goes through `Acquire`, whose
        // higher-ranked bound makes the calling future not `Send`.
        let result = self.migrator.run_direct(None, &mut *conn, false).await;
        sqlx::query("RESET ROLE").execute(&mut *conn).await?;
        result?;
        Ok(self.latest_version())
    }
}
