//! A tenant server whose admin role is not a superuser, as managed PostgreSQL services
//! (Amazon RDS, Cloud SQL, Azure Database) hand out: a login role with `CREATEDB` and
//! `CREATEROLE` and nothing else. Every job silo runs works on it: provisioning from its
//! template, rotations, a migration rollout and the template rebuilt after it, backups,
//! moves in and out, delete and restore. The catalog, too, belongs to a role that is not a
//! superuser.

use std::path::Path;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use silo_tests::pg::TestCluster;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use sqlx::{ConnectOptions, Connection};

/// The managed server's admin password, for `admin_password_env`.
const MANAGED_PASSWORD_ENV: &str = "SILO_TEST_MANAGED_ADMIN_PASSWORD";
const MANAGED_ADMIN: &str = "silo_admin";

/// A cluster of its own where `silo_admin` has `CREATEDB CREATEROLE` only.
async fn managed_cluster() -> TestCluster {
    let pg = TestCluster::start().await.unwrap();
    let password = unique_name("pw");
    let mut conn = pg.admin_options("postgres").connect().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {MANAGED_ADMIN} LOGIN CREATEDB CREATEROLE PASSWORD '{password}'"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    std::env::set_var(MANAGED_PASSWORD_ENV, password);
    pg
}

/// Runs `sql` on `pg` as its superuser, in `database`, and returns the first column of every
/// row as text.
async fn superuser_query(pg: &TestCluster, database: &str, sql: &str) -> Vec<String> {
    let mut conn = pg.admin_options(database).connect().await.unwrap();
    let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_all(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    rows
}

async fn accepted_job(stack: &Stack, method: Method, path: &str, body: Option<Value>) -> Value {
    let (status, accepted) = stack.admin(method, path, body).await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{path}: {accepted}");
    let job = stack.wait_job(accepted["job"]["id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{path}: {job}");
    job
}

#[tokio::test(flavor = "multi_thread")]
async fn every_job_works_on_a_server_whose_admin_role_is_not_a_superuser() {
    let managed = managed_cluster().await;
    let migrations = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/tenant/0001_init.sql");
    std::fs::copy(shipped, migrations.path().join("0001_init.sql")).unwrap();
    let stack = Stack::start(StackOptions {
        extra_toml: format!(
            "[backups]\ndir = \"backups\"\n\
             [[servers]]\nname = \"managed\"\nhost = \"127.0.0.1\"\nport = {}\n\
             admin_user = \"{MANAGED_ADMIN}\"\nadmin_password_env = \"{MANAGED_PASSWORD_ENV}\"\n",
            managed.port()
        ),
        tenant_migrations_dir: Some(migrations.path().to_owned()),
        catalog_not_superuser: true,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let superusers = superuser_query(
        &managed,
        "postgres",
        "SELECT rolname::text FROM pg_roles WHERE rolsuper",
    )
    .await;
    assert_eq!(superusers, ["postgres"], "silo_admin is not a superuser");

    // Provisioning, and the router serving the tenant.
    let slug = unique_name("mg");
    let key = stack
        .create_tenant_with(json!({"slug": slug, "server": "managed"}))
        .await
        .unwrap();
    stack.add_tasks(&slug, &key, &["first"]).await.unwrap();
    assert_eq!(stack.served_titles(&slug, &key).await.unwrap(), ["first"]);

    // Rotations, both strategies; the router keeps serving.
    for strategy in ["single", "alternating"] {
        let job = stack.rotate(&slug, strategy).await.unwrap();
        assert_eq!(job["state"], "succeeded", "{strategy}: {job}");
        assert_eq!(stack.served_titles(&slug, &key).await.unwrap(), ["first"]);
    }

    // A rollout, then a tenant created from the rebuilt template.
    std::fs::write(
        migrations.path().join("0002_notes.sql"),
        "ALTER TABLE tasks ADD COLUMN note text;\n",
    )
    .unwrap();
    accepted_job(&stack, Method::POST, "/v1/migrations", Some(json!({"tenants": [slug]}))).await;
    assert_eq!(stack.tenant(&slug).await.unwrap()["schema_version"], 2);
    let second = unique_name("mg");
    let second_key = stack
        .create_tenant_with(json!({"slug": second, "server": "managed"}))
        .await
        .unwrap();
    assert_eq!(stack.tenant(&second).await.unwrap()["schema_version"], 2);
    let notes = superuser_query(
        &managed,
        &stack.database_of(&second).await.unwrap(),
        "SELECT column_name::text FROM information_schema.columns WHERE table_name = 'tasks' AND column_name = 'note'",
    )
    .await;
    assert_eq!(notes, ["note"], "the second tenant has migration 2");

    // A backup, and a move out of the managed server and back into it.
    accepted_job(&stack, Method::POST, &format!("/v1/tenants/{slug}/backup"), None).await;
    for to in ["pg-1", "managed"] {
        let path = format!("/v1/tenants/{slug}/move");
        accepted_job(&stack, Method::POST, &path, Some(json!({"server": to}))).await;
        assert_eq!(stack.tenant(&slug).await.unwrap()["server"], to);
        assert_eq!(
            stack.served_titles(&slug, &key).await.unwrap(),
            ["first"],
            "after moving to {to}"
        );
    }

    // Delete with a backup drops the database and the roles, even with a session open.
    let secret = stack.credentials(&second).await.unwrap();
    let mut open = silo_tests::secret_connect_options(&secret).connect().await.unwrap();
    let job = accepted_job(
        &stack,
        Method::DELETE,
        &format!("/v1/tenants/{second}?backup=true"),
        None,
    )
    .await;
    assert!(open.ping().await.is_err(), "the tenant's session was ended");
    let left = superuser_query(
        &managed,
        "postgres",
        &format!(
            "SELECT datname::text FROM pg_database WHERE datname = '{db}' \
             UNION ALL SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, '{db}')",
            db = stack.database_of(&second).await.unwrap(),
        ),
    )
    .await;
    assert!(left.is_empty(), "left behind: {left:?}");

    // The deleted tenant restored from its backup, with its key.
    let dump = job["progress"]["backup"].as_str().unwrap();
    let file = Path::new(dump).file_name().unwrap().to_str().unwrap();
    let body = json!({"slug": second, "server": "managed", "restore_from": file});
    stack.create_tenant_with(body).await.unwrap();
    assert!(stack.served_titles(&second, &second_key).await.unwrap().is_empty());

    stack.stop().await.unwrap();
}
