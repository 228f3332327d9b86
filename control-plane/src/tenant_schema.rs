//! The tenant app's schema (`migrations/tenant`), applied to a tenant database as its owner
//! role so every object belongs to that one role.
//!
//! Migrations are embedded in the binary, or read from `tenant_migrations_dir` each time a
//! job needs them, so a new migration file is picked up by the next rollout without a
//! restart.

use std::path::{Path, PathBuf};

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use sqlx::migrate::{MigrateError, Migration, Migrator};
use sqlx::PgConnection;

use crate::names::{quote_ident, quote_literal};

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

    /// Applies every pending migration up to `target` (all when None) as `owner_role`, each
    /// with its bookkeeping row in one transaction (unless it is marked `-- no-transaction`),
    /// and returns the version the database is at.
    ///
    /// Same rules and bookkeeping table as sqlx's migrator (`_sqlx_migrations`: a dirty or
    /// changed applied migration is an error), in fewer round trips, since a rollout pays
    /// them once per tenant: one to read what is applied, then one per pending migration
    /// (statements sent as one batch). Nothing pending: no lock, no role change. Otherwise
    /// the database is locked for migrators (an advisory lock) and read again first.
    pub async fn apply(
        &self,
        conn: &mut PgConnection,
        owner_role: &str,
        target: Option<i64>,
    ) -> Result<i64, MigrateError> {
        let applied = read_applied(conn).await?;
        if self.pending(&applied, target)?.is_empty() {
            return Ok(version_of(&applied));
        }
        let setup = format!(
            "SELECT pg_advisory_lock({LOCK_KEY});\nSET ROLE {};\n{CREATE_TABLE}",
            quote_ident(owner_role)
        );
        let result = match sqlx::raw_sql(sqlx::AssertSqlSafe(setup)).execute(&mut *conn).await {
            Ok(_) => self.apply_pending(conn, target).await,
            Err(e) => Err(e.into()),
        };
        let release = sqlx::raw_sql(sqlx::AssertSqlSafe(RELEASE)).execute(&mut *conn).await;
        let version = result?;
        release?;
        Ok(version)
    }

    /// The migrations up to `target` that `applied` lacks, after checking `applied` against
    /// these migrations.
    fn pending(&self, applied: &[Applied], target: Option<i64>) -> Result<Vec<&Migration>, MigrateError> {
        if let Some(dirty) = applied.iter().find(|a| !a.success) {
            return Err(MigrateError::Dirty(dirty.version));
        }
        let known: HashMap<i64, &Migration> = self
            .migrator
            .iter()
            .filter(|m| !m.migration_type.is_down_migration())
            .map(|m| (m.version, m))
            .collect();
        for a in applied {
            match known.get(&a.version) {
                None => return Err(MigrateError::VersionMissing(a.version)),
                Some(m) if *m.checksum != *a.checksum => return Err(MigrateError::VersionMismatch(a.version)),
                Some(_) => {}
            }
        }
        Ok(self
            .migrator
            .iter()
            .filter(|m| !m.migration_type.is_down_migration())
            .filter(|m| target.is_none_or(|t| m.version <= t))
            .filter(|m| !applied.iter().any(|a| a.version == m.version))
            .collect())
    }

    /// Under the lock, as the owner: reads what is applied again and applies the rest.
    async fn apply_pending(&self, conn: &mut PgConnection, target: Option<i64>) -> Result<i64, MigrateError> {
        let mut applied = read_applied(conn).await?;
        let pending = self.pending(&applied, target)?;
        for m in pending {
            let record = format!(
                "INSERT INTO {TABLE} (version, description, success, checksum, execution_time) \
                 VALUES ({}, {}, TRUE, '\\x{}'::bytea, -1);",
                m.version,
                quote_literal(&m.description),
                hex::encode(&*m.checksum)
            );
            let sql = m.sql.as_str();
            let outcome = if m.no_tx {
                match sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                    .execute(&mut *conn)
                    .await
                {
                    Ok(_) => sqlx::raw_sql(sqlx::AssertSqlSafe(record)).execute(&mut *conn).await,
                    Err(e) => Err(e),
                }
            } else {
                let batch = format!("BEGIN;\n{sql}\n;\n{record}\nCOMMIT;");
                sqlx::raw_sql(sqlx::AssertSqlSafe(batch)).execute(&mut *conn).await
            };
            if let Err(e) = outcome {
                // A failed statement leaves the batch's transaction aborted: end it.
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                return Err(MigrateError::ExecuteMigration(e, m.version));
            }
            applied.push(Applied {
                version: m.version,
                checksum: m.checksum.to_vec(),
                success: true,
            });
        }
        Ok(version_of(&applied))
    }
}

/// The bookkeeping table, as sqlx's migrator names and shapes it.
const TABLE: &str = "public._sqlx_migrations";
const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS public._sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
    success BOOLEAN NOT NULL,
    checksum BYTEA NOT NULL,
    execution_time BIGINT NOT NULL
);";
/// Session advisory lock taken by whoever applies migrations to a database.
const LOCK_KEY: &str = "hashtext('silo-migrate:' || current_database())";
const RELEASE: &str = "SELECT pg_advisory_unlock(hashtext('silo-migrate:' || current_database())); RESET ROLE;";
/// SQLSTATE `undefined_table`.
const UNDEFINED_TABLE: &str = "42P01";

/// A row of the bookkeeping table.
struct Applied {
    version: i64,
    checksum: Vec<u8>,
    success: bool,
}

/// What the bookkeeping table says is applied (nothing when there is no table yet).
async fn read_applied(conn: &mut PgConnection) -> Result<Vec<Applied>, MigrateError> {
    let rows: Result<Vec<(i64, Vec<u8>, bool)>, sqlx::Error> =
        sqlx::query_as("SELECT version, checksum, success FROM public._sqlx_migrations ORDER BY version")
            .fetch_all(&mut *conn)
            .await;
    match rows {
        Ok(rows) => Ok(rows
            .into_iter()
            .map(|(version, checksum, success)| Applied {
                version,
                checksum,
                success,
            })
            .collect()),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNDEFINED_TABLE) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// The highest successfully applied version (0 for none).
fn version_of(applied: &[Applied]) -> i64 {
    applied
        .iter()
        .filter(|a| a.success)
        .map(|a| a.version)
        .max()
        .unwrap_or(0)
}

/// The version a tenant database is at: the highest successfully applied migration.
pub async fn applied_version(conn: &mut PgConnection) -> Result<i64, MigrateError> {
    Ok(version_of(&read_applied(conn).await?))
}
