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
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

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
    /// them once per tenant: one to read what is applied (a simple query: no statement to
    /// prepare on a connection used once), and when something is pending, what
    /// [`TenantMigrations::apply_behind`] sends. Nothing pending: no lock, no role change.
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
        self.apply_behind(conn, owner_role, target).await
    }

    /// [`TenantMigrations::apply`] for a database believed to be behind (a rollout's
    /// tenants), without the unlocked look first: one round trip locks the database for
    /// migrators (an advisory lock), becomes `owner_role` and reads what is applied, then one
    /// per pending migration (its statements and bookkeeping row as one batch; the last one
    /// also unlocks and resets the role).
    pub async fn apply_behind(
        &self,
        conn: &mut PgConnection,
        owner_role: &str,
        target: Option<i64>,
    ) -> Result<i64, MigrateError> {
        let setup = format!(
            "SELECT pg_advisory_lock({LOCK_KEY});\nSET ROLE {};\n{CREATE_TABLE}\n{READ_APPLIED}",
            quote_ident(owner_role)
        );
        let result = match applied_rows(sqlx::raw_sql(sqlx::AssertSqlSafe(setup)).fetch_all(&mut *conn).await) {
            Ok(applied) => self.apply_pending(conn, applied, target).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(Applying {
                version,
                released: true,
            }) => Ok(version),
            Ok(Applying {
                version,
                released: false,
            }) => {
                sqlx::raw_sql(RELEASE).execute(&mut *conn).await?;
                Ok(version)
            }
            Err(e) => {
                let _ = sqlx::raw_sql(RELEASE).execute(&mut *conn).await;
                Err(e)
            }
        }
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

    /// Under the lock, as the owner: applies what `applied` lacks. The last transactional
    /// batch releases the lock when it commits.
    async fn apply_pending(
        &self,
        conn: &mut PgConnection,
        mut applied: Vec<Applied>,
        target: Option<i64>,
    ) -> Result<Applying, MigrateError> {
        let pending = self.pending(&applied, target)?;
        let last = pending.len().saturating_sub(1);
        let mut released = false;
        for (i, m) in pending.into_iter().enumerate() {
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
                released = i == last;
                let release = if released { RELEASE } else { "" };
                let batch = format!("BEGIN;\n{sql}\n;\n{record}\nCOMMIT;\n{release}");
                sqlx::raw_sql(sqlx::AssertSqlSafe(batch)).execute(&mut *conn).await
            };
            if let Err(e) = outcome {
                // A failed statement leaves the batch's transaction aborted (and the rest of
                // the batch, its release included, unsent): end it.
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                return Err(MigrateError::ExecuteMigration(e, m.version));
            }
            applied.push(Applied {
                version: m.version,
                checksum: m.checksum.to_vec(),
                success: true,
            });
        }
        Ok(Applying {
            version: version_of(&applied),
            released,
        })
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

/// What the bookkeeping table holds, oldest first.
const READ_APPLIED: &str = "SELECT version, checksum, success FROM public._sqlx_migrations ORDER BY version";

/// Where [`TenantMigrations::apply_pending`] left the database.
struct Applying {
    /// The version it is at.
    version: i64,
    /// Whether the last batch released the migrators' lock and reset the role.
    released: bool,
}

/// A row of the bookkeeping table.
struct Applied {
    version: i64,
    checksum: Vec<u8>,
    success: bool,
}

/// What the bookkeeping table says is applied (nothing when there is no table yet).
async fn read_applied(conn: &mut PgConnection) -> Result<Vec<Applied>, MigrateError> {
    match sqlx::raw_sql(READ_APPLIED).fetch_all(&mut *conn).await {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNDEFINED_TABLE) => Ok(Vec::new()),
        rows => applied_rows(rows),
    }
}

/// The bookkeeping rows among the result rows of a batch ending in [`READ_APPLIED`] (the
/// only statement of the batch that returns three columns).
fn applied_rows(rows: Result<Vec<PgRow>, sqlx::Error>) -> Result<Vec<Applied>, MigrateError> {
    let mut applied = Vec::new();
    for row in rows?.iter().filter(|row| row.len() == 3) {
        applied.push(Applied {
            version: row.try_get(0)?,
            checksum: row.try_get(1)?,
            success: row.try_get(2)?,
        });
    }
    Ok(applied)
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
