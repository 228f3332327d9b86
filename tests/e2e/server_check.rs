//! `siloctl server check`: what a server holds that the catalog does not account for, and what
//! it lacks, named after the catalog was restored from a backup older than the fleet; and the
//! README's steps that make the fleet whole again.

use std::path::Path;

use reqwest::Method;
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use silo_tests::pg::TestCluster;
use silo_tests::stack::{Secrets, Stack, StackOptions};
use silo_tests::unique_name;
use sqlx::{ConnectOptions, Connection};

/// A stack with a second server, `pg-2`, of its own, and `extra_toml`.
async fn stack_with_pg2(extra_toml: &str) -> (Stack, TestCluster) {
    let pg2 = TestCluster::start().await.unwrap();
    let stack = Stack::start(StackOptions {
        extra_toml: format!("{}{extra_toml}", pg2.server_toml("pg-2")),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    (stack, pg2)
}

#[tokio::test(flavor = "multi_thread")]
async fn server_check_names_databases_and_roles_the_catalog_does_not_account_for_and_those_it_lacks() {
    let (stack, pg2) = stack_with_pg2("").await;
    let (kept, gone, ghost) = (unique_name("kept"), unique_name("gone"), unique_name("ghost"));
    for slug in [&kept, &gone] {
        stack
            .create_tenant_with(json!({"slug": slug, "server": "pg-2"}))
            .await
            .unwrap();
    }
    let (code, stdout, stderr) = stack.siloctl(&["server", "check", "--logins"]).await.unwrap();
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("pg-2: as the catalog says"), "{stdout}");

    let gone_db = stack.database_of(&gone).await.unwrap();
    // What a catalog restored from an older backup does not know: a tenant created since (its
    // database and login role are on pg-2) and a tenant deleted since (it still lists it).
    let mut admin = pg2.admin_options("postgres").connect().await.unwrap();
    for sql in [
        format!("CREATE ROLE \"tenant_{ghost}_app\" LOGIN"),
        format!("CREATE DATABASE \"tenant_{ghost}\""),
        format!("DROP DATABASE \"{gone_db}\" WITH (FORCE)"),
    ] {
        // Names made by unique_name: lower-case letters and digits.
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    admin.close().await.unwrap();

    let (code, stdout, stderr) = stack.siloctl(&["server", "check"]).await.unwrap();
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    for line in [
        format!("pg-2: untracked database tenant_{ghost} (no tenant of the catalog is there)"),
        format!("pg-2: untracked role tenant_{ghost}_app"),
        format!("pg-2: missing database {gone_db} of tenant {gone}"),
    ] {
        assert!(stdout.lines().any(|l| l == line), "no line {line:?} in:\n{stdout}");
    }
    assert!(!stdout.contains(&kept), "{stdout}");
    assert!(stderr.contains("do not hold what the catalog says"), "{stderr}");

    let (code, stdout, _) = stack.siloctl(&["-o", "json", "server", "check"]).await.unwrap();
    assert_eq!(code, Some(1));
    let check: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(check["consistent"], false);
    let pg2_entry = check["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "pg-2")
        .unwrap();
    assert_eq!(pg2_entry["untracked_databases"], json!([format!("tenant_{ghost}")]));
    assert_eq!(pg2_entry["untracked_roles"], json!([format!("tenant_{ghost}_app")]));
    assert_eq!(
        pg2_entry["missing_databases"],
        json!([{"slug": gone, "database": gone_db}])
    );

    // A server that cannot be asked is named as not checked, and fails the check.
    pg2.stop();
    let (code, stdout, stderr) = stack.siloctl(&["server", "check"]).await.unwrap();
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.lines().any(|l| l.starts_with("pg-2: not checked: unreachable")),
        "{stdout}"
    );
    stack.stop().await.unwrap();
}

/// Runs the PostgreSQL client `tool` (`pg_dump`, `pg_restore`) against the stack's catalog
/// database as its superuser.
fn catalog_tool(stack: &Stack, tool: &str, args: &[&str]) {
    let url = &stack.config().catalog.url;
    let database = url.rsplit('/').next().unwrap();
    let bindir = silo_control_plane::localpg::find_bindir().unwrap();
    let out = std::process::Command::new(bindir.join(tool))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &stack.pg().port().to_string(),
            "-U",
            "postgres",
            "-d",
            database,
        ])
        .args(args)
        .env("PGPASSWORD", stack.pg().password().expose_secret())
        .output()
        .unwrap();
    assert!(out.status.success(), "{tool}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Whether the login in `tenant`'s secret (`siloctl tenant credentials`) gets into its database.
async fn secret_logs_in(stack: &Stack, tenant: &str) -> bool {
    let secret = stack.credentials(tenant).await.unwrap();
    sqlx::postgres::PgConnectOptions::new()
        .host("127.0.0.1")
        .port(u16::try_from(secret["port"].as_u64().unwrap()).unwrap())
        .username(secret["username"].as_str().unwrap())
        .password(secret["password"].as_str().unwrap())
        .database(secret["database"].as_str().or(secret["dbname"].as_str()).unwrap())
        .connect()
        .await
        .is_ok()
}

/// The README's "Restoring the catalog": a catalog restored from a backup older than the
/// fleet misses a tenant created since, still lists one deleted since and one on the server it
/// moved away from, and holds a password a rotation since replaced. `siloctl server check`
/// names all but the password; creating a tenant again on the server where its database is
/// adopts that database (data and API keys), deleting the deleted one again settles it, and
/// rotating every tenant gives each a password its secret holds.
#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_is_made_whole_after_the_catalog_is_restored_from_an_older_backup() {
    let (mut stack, _pg2) = stack_with_pg2("[backups]\ndir = \"backups\"\n").await;
    let (kept, doomed, later) = (unique_name("kept"), unique_name("doomed"), unique_name("later"));
    for slug in [&kept, &doomed] {
        stack
            .create_tenant_with(json!({"slug": slug, "server": "pg-2"}))
            .await
            .unwrap();
    }
    let moved = unique_name("moved");
    let moved_key = stack
        .create_tenant_with(json!({"slug": moved, "server": "pg-1"}))
        .await
        .unwrap();
    stack.add_tasks(&moved, &moved_key, &["moved along"]).await.unwrap();
    let backup = stack.dir().join("catalog.dump");
    catalog_tool(&stack, "pg_dump", &["--format=custom", "-f", backup.to_str().unwrap()]);

    // Since the backup: a tenant created, one deleted, one's password rotated.
    let later_key = stack
        .create_tenant_with(json!({"slug": later, "server": "pg-2"}))
        .await
        .unwrap();
    stack
        .add_tasks(&later, &later_key, &["made after the backup"])
        .await
        .unwrap();
    stack.delete_tenant(&doomed).await.unwrap();
    let rotated = stack.rotate(&kept, "single").await.unwrap();
    assert_eq!(rotated["state"], "succeeded", "{rotated}");
    let (code, stdout, stderr) = stack
        .siloctl(&["tenant", "move", &moved, "--to", "pg-2"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stdout}{stderr}");

    // Names the restored catalog derives again from the same slugs, or lacks.
    let later_db = stack.database_of(&later).await.unwrap();
    // Whose an untracked database is: the audit entry of its tenant's creation (shipped off
    // the catalog in production) names it.
    let (_, created) = stack
        .admin(
            Method::GET,
            &format!("/v1/audit?tenant={later}&action=tenant.create"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        created["items"][0]["detail"]["database"],
        later_db.as_str(),
        "{created}"
    );
    let doomed_db = stack.database_of(&doomed).await.unwrap();
    let moved_db = stack.database_of(&moved).await.unwrap();
    restore_catalog(&mut stack, &backup).await;
    assert!(
        !secret_logs_in(&stack, &kept).await,
        "the restored secret is the old password"
    );
    let (code, stdout, stderr) = stack.siloctl(&["server", "check", "--logins"]).await.unwrap();
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    for line in [
        format!("pg-2: tenant {kept} does not log in with its secret: "),
        format!("pg-2: untracked database {later_db} (no tenant of the catalog is there)"),
        format!("pg-2: untracked role {later_db}_app"),
        format!("pg-2: untracked role {later_db}_owner"),
        format!("pg-2: missing database {doomed_db} of tenant {doomed}"),
        format!("pg-1: missing database {moved_db} of tenant {moved}"),
        format!("pg-2: untracked database {moved_db} (no tenant of the catalog is there)"),
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(&line)),
            "no line {line:?} in:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("password authentication failed"),
        "the login's own error: {stdout}"
    );

    for args in [
        vec!["tenant", "create", later.as_str(), "--server", "pg-2"],
        vec!["tenant", "delete", doomed.as_str(), "--yes"],
        vec!["tenant", "delete", moved.as_str(), "--yes"],
        vec!["tenant", "create", moved.as_str(), "--server", "pg-2"],
        vec!["rotate", "--all", "--strategy", "single"],
    ] {
        let (code, stdout, stderr) = stack.siloctl(&args).await.unwrap();
        assert_eq!(code, Some(0), "siloctl {args:?}: {stdout}{stderr}");
    }
    assert_eq!(
        stack.served_titles(&later, &later_key).await.unwrap(),
        ["made after the backup"],
        "adopted with its data and its API key"
    );
    // The audit log says which databases were adopted, where, and at whose request.
    let (_, adopted) = stack
        .admin(Method::GET, "/v1/audit?action=tenant.database.adopt", None)
        .await
        .unwrap();
    let adopted: Vec<_> = adopted["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["tenant"].clone(),
                e["actor"].clone(),
                e["detail"]["database"].clone(),
                e["detail"]["server"].clone(),
            )
        })
        .collect();
    assert_eq!(
        adopted,
        [
            (json!(moved), json!("bootstrap"), json!(moved_db), json!("pg-2")),
            (json!(later), json!("bootstrap"), json!(later_db), json!("pg-2")),
        ],
        "newest first"
    );
    assert_eq!(stack.served_titles(&moved, &moved_key).await.unwrap(), ["moved along"]);
    assert!(secret_logs_in(&stack, &kept).await);
    let (code, stdout, stderr) = stack.siloctl(&["server", "check", "--logins"]).await.unwrap();
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    stack.stop().await.unwrap();
}

/// Puts the catalog back as `backup` holds it, the control plane stopped meanwhile (the router
/// goes on, and reconnects).
async fn restore_catalog(stack: &mut Stack, backup: &Path) {
    stack.stop_control_plane().await.unwrap();
    catalog_tool(
        stack,
        "pg_restore",
        &[
            "--clean",
            "--if-exists",
            "--single-transaction",
            backup.to_str().unwrap(),
        ],
    );
    stack.start_control_plane().await.unwrap();
}

/// A catalog restored from a backup taken before it had its naming key (or from another
/// catalog's) derives other database names than its tenants were created with. With the
/// secrets kept outside the catalog (AWS), creating a tenant made since over its own database
/// adopts the database its secret logs in to, with its data and API key. (The local store's
/// secrets are restored with the catalog: see the README's "Restoring the catalog".)
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_the_restored_catalog_would_name_otherwise_is_adopted_by_its_aws_secret() {
    let mut stack = Stack::start(StackOptions {
        secrets: Secrets::Aws,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let backup = stack.dir().join("catalog.dump");
    catalog_tool(&stack, "pg_dump", &["--format=custom", "-f", backup.to_str().unwrap()]);
    let slug = unique_name("adopted");
    let key = stack.create_tenant(&slug).await.unwrap();
    stack
        .add_tasks(&slug, &key, &["made before the restore"])
        .await
        .unwrap();
    let database = stack.database_of(&slug).await.unwrap();

    restore_catalog(&mut stack, &backup).await;
    sqlx::query("UPDATE naming_key SET key = decode(md5(random()::text) || md5(random()::text), 'hex')")
        .execute(stack.catalog())
        .await
        .unwrap();
    let (code, stdout, stderr) = stack
        .siloctl(&["tenant", "create", &slug, "--server", "pg-1"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(stack.database_of(&slug).await.unwrap(), database);
    assert_eq!(
        stack.served_titles(&slug, &key).await.unwrap(),
        ["made before the restore"]
    );
    let (code, stdout, stderr) = stack.siloctl(&["server", "check", "--logins"]).await.unwrap();
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    stack.stop().await.unwrap();
}
