//! The control plane's tenant migration runner on a real database: sqlx's rules and
//! bookkeeping table (so a database migrated by either is understood by the other), each
//! migration with its record in one transaction, `-- no-transaction` migrations, the owner
//! role owning what migrations create, and the migrators' lock released after a failure.

use std::path::Path;

use silo_control_plane::tenant_schema::{applied_version, MigrationSource, TenantMigrations};
use silo_tests::pg::TestCluster;
use silo_tests::unique_name;
use sqlx::migrate::MigrateError;
use sqlx::{ConnectOptions, Connection, PgConnection};

const INIT: &str = "CREATE TABLE things (id bigserial PRIMARY KEY, name text NOT NULL);\n";

async fn load(dir: &Path) -> TenantMigrations {
    MigrationSource::new(Some(dir)).load().await.unwrap()
}

/// A fresh database with an owner role that may create in `public`, and a superuser
/// connection to it.
async fn database() -> (PgConnection, String) {
    let pg = TestCluster::shared().await;
    let db = unique_name("mig_");
    pg.create_database(&db).await.unwrap();
    let owner = format!("{db}_owner");
    let mut conn = pg.admin_options(&db).connect().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE \"{owner}\" NOLOGIN; ALTER SCHEMA public OWNER TO \"{owner}\""
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    (conn, owner)
}

async fn scalar<T>(conn: &mut PgConnection, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn migrations_apply_once_as_the_owner_and_a_failure_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("0001_init.sql"), INIT).unwrap();
    let (mut conn, owner) = database().await;

    let migrations = load(dir.path()).await;
    assert_eq!(migrations.apply(&mut conn, &owner, None).await.unwrap(), 1);
    assert_eq!(
        migrations.apply(&mut conn, &owner, None).await.unwrap(),
        1,
        "idempotent"
    );
    let table_owner: String = scalar(
        &mut conn,
        "SELECT tableowner::text FROM pg_tables WHERE tablename = 'things'",
    )
    .await;
    assert_eq!(table_owner, owner);
    let role: String = scalar(&mut conn, "SELECT current_user::text").await;
    assert_eq!(role, "postgres", "the session's role is restored");

    // Migration 2 fails halfway: its first statement is rolled back with it, no record.
    std::fs::write(
        dir.path().join("0002_broken.sql"),
        "ALTER TABLE things ADD COLUMN color text;\nSELECT 1/0;\n",
    )
    .unwrap();
    let migrations = load(dir.path()).await;
    let err = migrations.apply(&mut conn, &owner, None).await.unwrap_err();
    assert!(matches!(err, MigrateError::ExecuteMigration(_, 2)), "{err}");
    assert_eq!(applied_version(&mut conn).await.unwrap(), 1);
    let columns: i64 = scalar(
        &mut conn,
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'things' AND column_name = 'color'",
    )
    .await;
    assert_eq!(columns, 0);

    // Fixed, it applies; the lock of the failed attempt was released (this would block).
    std::fs::write(
        dir.path().join("0002_broken.sql"),
        "ALTER TABLE things ADD COLUMN color text;\n",
    )
    .unwrap();
    let apply = load(dir.path()).await;
    let version = tokio::time::timeout(std::time::Duration::from_secs(10), apply.apply(&mut conn, &owner, None))
        .await
        .expect("the migrators' lock is free")
        .unwrap();
    assert_eq!(version, 2);

    // A changed applied migration is refused, like sqlx does.
    std::fs::write(dir.path().join("0001_init.sql"), format!("{INIT}-- edited\n")).unwrap();
    let err = load(dir.path()).await.apply(&mut conn, &owner, None).await.unwrap_err();
    assert!(matches!(err, MigrateError::VersionMismatch(1)), "{err}");
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn no_transaction_migrations_and_databases_migrated_by_sqlx() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("0001_init.sql"), INIT).unwrap();
    let (mut conn, owner) = database().await;

    // Migrated by sqlx's own migrator first (as the owner, as silo did before it had its
    // own runner): the runner sees it as up to date.
    let sqlx_migrator = sqlx::migrate::Migrator::new(dir.path()).await.unwrap();
    let set_role = format!("SET ROLE \"{owner}\"");
    sqlx::raw_sql(sqlx::AssertSqlSafe(set_role.clone()))
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx_migrator.run_direct(None, &mut conn, false).await.unwrap();
    sqlx::raw_sql("RESET ROLE").execute(&mut conn).await.unwrap();
    assert_eq!(load(dir.path()).await.apply(&mut conn, &owner, None).await.unwrap(), 1);

    // CREATE INDEX CONCURRENTLY cannot run in a transaction: `-- no-transaction` says so.
    std::fs::write(
        dir.path().join("0002_index.sql"),
        "-- no-transaction\nCREATE INDEX CONCURRENTLY things_name ON things (name);\n",
    )
    .unwrap();
    assert_eq!(load(dir.path()).await.apply(&mut conn, &owner, None).await.unwrap(), 2);
    let indexes: i64 = scalar(
        &mut conn,
        "SELECT count(*) FROM pg_indexes WHERE indexname = 'things_name'",
    )
    .await;
    assert_eq!(indexes, 1);
    // And sqlx's migrator agrees with what the runner recorded: nothing left to do.
    let sqlx_migrator = sqlx::migrate::Migrator::new(dir.path()).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(set_role))
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx_migrator.run_direct(None, &mut conn, false).await.unwrap();
    conn.close().await.unwrap();
}
