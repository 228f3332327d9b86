//! `siloctl server check`: what a server holds that the catalog does not account for, and what
//! it lacks, named after the catalog was restored from a backup older than the fleet.

use secrecy::ExposeSecret;
use serde_json::{json, Value};
use silo_tests::pg::TestCluster;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use sqlx::{ConnectOptions, Connection};

const PG2_PASSWORD_ENV: &str = "SILO_TEST_PG2_PASSWORD";

#[tokio::test(flavor = "multi_thread")]
async fn server_check_names_databases_and_roles_the_catalog_does_not_account_for_and_those_it_lacks() {
    let pg2 = TestCluster::start().await.unwrap();
    std::env::set_var(PG2_PASSWORD_ENV, pg2.password().expose_secret());
    let stack = Stack::start(StackOptions {
        extra_toml: format!(
            "[[servers]]\nname = \"pg-2\"\nhost = \"127.0.0.1\"\nport = {}\nadmin_user = \"postgres\"\n\
             admin_password_env = \"{PG2_PASSWORD_ENV}\"\n",
            pg2.port()
        ),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let (kept, gone, ghost) = (unique_name("kept"), unique_name("gone"), unique_name("ghost"));
    for slug in [&kept, &gone] {
        stack
            .create_tenant_with(json!({"slug": slug, "server": "pg-2"}))
            .await
            .unwrap();
    }
    let (code, stdout, stderr) = stack.siloctl(&["server", "check"]).await.unwrap();
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("pg-2: as the catalog says"), "{stdout}");

    // What a catalog restored from an older backup does not know: a tenant created since (its
    // database and login role are on pg-2) and a tenant deleted since (it still lists it).
    let mut admin = pg2.admin_options("postgres").connect().await.unwrap();
    for sql in [
        format!("CREATE ROLE \"tenant_{ghost}_app\" LOGIN"),
        format!("CREATE DATABASE \"tenant_{ghost}\""),
        format!("DROP DATABASE \"tenant_{gone}\" WITH (FORCE)"),
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
        format!("pg-2: missing database tenant_{gone} of tenant {gone}"),
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
        json!([{"slug": gone, "database": format!("tenant_{gone}")}])
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
