//! `DELETE /v1/tenants/{slug}?backup=true` (`siloctl tenant delete SLUG --yes --backup`): the
//! tenant's database is dumped before anything is dropped, the dump restores, and a backup
//! that fails drops nothing; backup jobs, the listing of a tenant's backups and their
//! retention.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde_json::Value;
use silo_tests::pg::TestCluster;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use sqlx::{ConnectOptions, Connection};

/// A stack whose control plane writes backups to `backups/` in its directory.
async fn stack_with_backups(extra: &str) -> Stack {
    Stack::start(StackOptions {
        extra_toml: format!("[backups]\ndir = \"backups\"\n{extra}"),
        ..StackOptions::default()
    })
    .await
    .unwrap()
}

/// Creates a tenant holding tasks with these titles; returns its API key.
async fn tenant_with_tasks(stack: &Stack, slug: &str, titles: &[&str]) -> String {
    let key = stack.create_tenant(slug).await.unwrap();
    stack.add_tasks(slug, &key, titles).await.unwrap();
    key
}

pub(crate) async fn delete(stack: &Stack, slug: &str, query: &str) -> (StatusCode, Value) {
    stack
        .admin(Method::DELETE, &format!("/v1/tenants/{slug}{query}"), None)
        .await
        .unwrap()
}

async fn database_exists(stack: &Stack, database: &str) -> bool {
    let mut admin = stack.pg().admin_options("postgres").connect().await.unwrap();
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(database)
        .fetch_one(&mut admin)
        .await
        .unwrap()
}

/// The task titles in `database` on `pg`, in id order, read directly.
pub(crate) async fn titles_in(pg: &TestCluster, database: &str) -> Vec<String> {
    let mut conn = pg.admin_options(database).connect().await.unwrap();
    let titles = sqlx::query_scalar("SELECT title FROM tasks ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    titles
}

/// Deletes `slug` with a backup first (`?backup=true`) and waits for the job to succeed; the
/// job.
pub(crate) async fn delete_with_backup(stack: &Stack, slug: &str) -> Value {
    let (status, body) = delete(stack, slug, "?backup=true").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job = stack.wait_job(body["job"]["id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    job
}

/// Restores `dump` into a new database on the stack's cluster, as its superuser.
pub(crate) async fn restore(stack: &Stack, dump: &Path) -> String {
    let database = unique_name("restored").replace('-', "_");
    stack.pg().create_database(&database).await.unwrap();
    let bindir = silo_control_plane::localpg::find_bindir().unwrap();
    let out = tokio::process::Command::new(bindir.join("pg_restore"))
        .args(["--no-owner", "--no-privileges", "--exit-on-error", "--host=127.0.0.1"])
        .arg(format!("--port={}", stack.pg().port()))
        .arg("--username=postgres")
        .arg(format!("--dbname={database}"))
        .arg(dump)
        .env("PGPASSWORD", stack.pg().password().expose_secret())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "pg_restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    database
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_with_backup_dumps_the_database_before_dropping_it() {
    let stack = stack_with_backups("").await;
    let slug = unique_name("bk");
    tenant_with_tasks(&stack, &slug, &["invoice 1", "invoice 2", "invoice 3"]).await;

    let (status, body) = delete(&stack, &slug, "?backup=true").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["job"]["id"].as_i64().unwrap();
    let job = stack.wait_job(id).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(!database_exists(&stack, &stack.database_of(&slug).await.unwrap()).await);

    // The job says where the backup is: in the tenant's own directory, named by the job.
    let dump = PathBuf::from(job["progress"]["backup"].as_str().expect("backup path in progress"));
    let tenant_dir = stack.dir().join("backups").join(&slug);
    assert_eq!(dump.parent(), Some(tenant_dir.as_path()), "{job}");
    let name = dump.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("{slug}-")) && name.ends_with(&format!("-job{id}.dump")),
        "{name}"
    );
    let mode = std::fs::metadata(&tenant_dir).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o700,
        "backups are readable by the control plane's user only"
    );
    let left: Vec<String> = std::fs::read_dir(&tenant_dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        vec![name],
        "no partial file, password file or work directory left"
    );

    // The dump holds the tenant's data.
    let restored = restore(&stack, &dump).await;
    assert_eq!(
        titles_in(stack.pg(), &restored).await,
        ["invoice 1", "invoice 2", "invoice 3"]
    );
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn siloctl_tenant_backup_dumps_a_tenant_that_keeps_serving() {
    let stack = stack_with_backups("").await;
    let slug = unique_name("bj");
    let key = tenant_with_tasks(&stack, &slug, &["ledger 1", "ledger 2"]).await;

    let (code, stdout, stderr) = stack.siloctl(&["-o", "json", "tenant", "backup", &slug]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let job: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(job["job"]["kind"], "backup", "{job}");
    assert_eq!(job["job"]["state"], "succeeded", "{job}");
    let dump = PathBuf::from(job["job"]["progress"]["backup"].as_str().expect("backup path"));
    assert_eq!(dump.parent(), Some(stack.dir().join("backups").join(&slug).as_path()));

    // The tenant is served as before, and the dump holds its data.
    let resp = stack.tenant_get(&slug, &key, "/api/v1/tasks").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let restored = restore(&stack, &dump).await;
    assert_eq!(titles_in(stack.pg(), &restored).await, ["ledger 1", "ledger 2"]);

    // One line and exit 1 for a tenant that does not exist.
    let (code, _, stderr) = stack.siloctl(&["tenant", "backup", "nobody-here"]).await.unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    stack.stop().await.unwrap();
}

/// Backs `slug` up through the API (a `backup` job) and waits for it; the job's id.
async fn back_up(stack: &Stack, slug: &str) -> i64 {
    let (status, body) = stack
        .admin(Method::POST, &format!("/v1/tenants/{slug}/backup"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job = stack.wait_job(body["job"]["id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    job["id"].as_i64().unwrap()
}

/// `slug`'s backups as the admin API lists them, newest first.
pub(crate) async fn listed_backups(stack: &Stack, slug: &str) -> Vec<Value> {
    let (status, body) = stack
        .admin(Method::GET, &format!("/v1/tenants/{slug}/backups"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    body["items"].as_array().unwrap().clone()
}

/// The job ids of `slug`'s backups as the API lists them, newest first.
async fn listed_jobs(stack: &Stack, slug: &str) -> Vec<i64> {
    listed_backups(stack, slug)
        .await
        .iter()
        .map(|item| {
            assert!(item["bytes"].as_u64().unwrap() > 0, "{item}");
            assert!(item["created_at"].is_string(), "{item}");
            item["job"].as_i64().unwrap()
        })
        .collect()
}

/// `siloctl tenant backups SLUG` lists a tenant's backups newest first, a deleted tenant's
/// too, and `[backups] keep_last` erases all but the newest ones, audited.
#[tokio::test(flavor = "multi_thread")]
async fn backups_are_listed_newest_first_and_only_the_last_ones_are_kept() {
    let stack = stack_with_backups("keep_last = 2\n").await;
    let slug = unique_name("bl");
    let key = tenant_with_tasks(&stack, &slug, &["listed"]).await;
    assert_eq!(listed_jobs(&stack, &slug).await, Vec::<i64>::new());

    let mut jobs = Vec::new();
    for _ in 0..3 {
        jobs.push(back_up(&stack, &slug).await);
    }
    assert_eq!(listed_jobs(&stack, &slug).await, [jobs[2], jobs[1]]);
    let on_disk = std::fs::read_dir(stack.dir().join("backups").join(&slug))
        .unwrap()
        .count();
    assert_eq!(on_disk, 2, "the oldest backup was removed");
    let (status, audit) = stack
        .admin(
            Method::GET,
            &format!("/v1/audit?tenant={slug}&action=tenant.backup.prune"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let pruned = audit["items"].as_array().unwrap();
    assert_eq!(pruned.len(), 1, "{audit}");
    assert_eq!(pruned[0]["actor"], "scheduler", "{audit}");
    assert_eq!(pruned[0]["detail"]["keep_last"], 2, "{audit}");
    let file = pruned[0]["detail"]["file"].as_str().unwrap();
    assert!(file.ends_with(&format!("-job{}.dump", jobs[0])), "{audit}");

    // A deleted tenant's backups are still listed, and restore it.
    let deleted = delete_with_backup(&stack, &slug).await;
    let last = deleted["id"].as_i64().unwrap();
    assert_eq!(listed_jobs(&stack, &slug).await, [last, jobs[2]]);

    let (code, stdout, stderr) = stack.siloctl(&["tenant", "backups", &slug]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("FILE") && lines[0].contains("CREATED"), "{stdout}");
    let newest = lines[1].split_whitespace().next().unwrap();
    assert!(newest.ends_with(&format!("-job{last}.dump")), "{stdout}");
    let (code, _, stderr) = stack
        .siloctl(&["tenant", "create", &slug, "--restore-from", newest])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let resp = stack.tenant_get(&slug, &key, "/api/v1/tasks").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // Erasing a backup: confirmed with --yes, audited, gone from the list and the disk.
    let older = lines[2].split_whitespace().next().unwrap().to_owned();
    let (code, _, stderr) = stack
        .siloctl(&["tenant", "backups", &slug, "--delete", &older])
        .await
        .unwrap();
    assert_eq!(code, Some(2), "without --yes: {stderr}");
    let (code, stdout, stderr) = stack
        .siloctl(&["tenant", "backups", &slug, "--delete", &older, "--yes"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("deleted"), "{stdout}");
    assert_eq!(listed_jobs(&stack, &slug).await, [last]);
    assert!(!stack.dir().join("backups").join(&slug).join(&older).exists());
    let (code, _, stderr) = stack
        .siloctl(&["tenant", "backups", &slug, "--delete", &older, "--yes"])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "twice: {stderr}");
    assert!(stderr.contains("backup_not_found"), "{stderr}");
    let (status, audit) = stack
        .admin(
            Method::GET,
            &format!("/v1/audit?tenant={slug}&action=tenant.backup.delete"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(audit["items"][0]["detail"]["file"], older.as_str(), "{audit}");
    // Only a tenant's own backups: another slug, or a path out of its directory, is 404.
    let newest_path = format!("/v1/tenants/nobody-here/backups/{newest}");
    let escaping = format!("/v1/tenants/nobody-here/backups/..%2F{slug}%2F{newest}");
    for path in [newest_path, escaping] {
        let (status, body) = stack.admin(Method::DELETE, &path, None).await.unwrap();
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::NOT_FOUND, Some("backup_not_found")),
            "{path}"
        );
    }
    assert_eq!(
        listed_jobs(&stack, &slug).await,
        [last],
        "the newest backup is still there"
    );

    // A slug with neither a tenant nor backups is 404: one line and exit 1 from siloctl.
    let (status, body) = stack
        .admin(Method::GET, "/v1/tenants/nobody-here/backups", None)
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("tenant_not_found"))
    );
    let (code, _, stderr) = stack.siloctl(&["tenant", "backups", "nobody-here"]).await.unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let (code, _, stderr) = stack.siloctl(&["tenant", "backups", "Not_A_Slug"]).await.unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_tenant_is_created_again_from_its_backup_with_its_data_keys_and_new_migrations() {
    let migrations = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/tenant/0001_init.sql");
    std::fs::copy(shipped, migrations.path().join("0001_init.sql")).unwrap();
    let stack = Stack::start(StackOptions {
        extra_toml: "[backups]\ndir = \"backups\"\n".into(),
        tenant_migrations_dir: Some(migrations.path().to_owned()),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let slug = unique_name("rs");
    let old_key = tenant_with_tasks(&stack, &slug, &["kept 1", "kept 2"]).await;
    let job = delete_with_backup(&stack, &slug).await;
    let dump = job["progress"]["backup"].as_str().unwrap().to_owned();
    // A migration written after the backup: the restored tenant gets it too.
    std::fs::write(
        migrations.path().join("0002_notes.sql"),
        "ALTER TABLE tasks ADD COLUMN note text;\n",
    )
    .unwrap();

    // Only this slug's own backups, by name: another tenant's dump is never restored.
    let other = unique_name("rso");
    for (who, name) in [(other.as_str(), dump.as_str()), (slug.as_str(), "nope.dump")] {
        let name = std::path::Path::new(name).file_name().unwrap().to_str().unwrap();
        let (status, body) = stack
            .admin(
                Method::POST,
                "/v1/tenants",
                Some(serde_json::json!({"slug": who, "restore_from": name})),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["error"], "backup_not_found", "{body}");
    }

    let (code, stdout, stderr) = stack
        .siloctl(&["-o", "json", "tenant", "create", &slug, "--restore-from", &dump])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let created: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(created["tenant"]["status"], "active", "{created}");
    assert_eq!(created["tenant"]["schema_version"], 2, "{created}");
    let new_key = created["api_key"].as_str().unwrap();
    for key in [old_key.as_str(), new_key] {
        let resp = stack.tenant_get(&slug, key, "/api/v1/tasks").await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.unwrap();
        let titles: Vec<&str> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["title"].as_str().unwrap())
            .collect();
        assert_eq!(titles, ["kept 1", "kept 2"]);
    }
    let database = stack.database_of(&slug).await.unwrap();
    let mut conn = stack.pg().admin_options(&database).connect().await.unwrap();
    let notes: i64 = sqlx::query_scalar("SELECT count(note) FROM tasks")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(notes, 0, "the new column exists on the restored rows");
    conn.close().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_that_fails_drops_nothing_and_the_delete_can_be_retried() {
    // A pg_dump that always fails.
    let stack = stack_with_backups("pg_dump = \"/bin/false\"\n").await;
    let slug = unique_name("bf");
    tenant_with_tasks(&stack, &slug, &["keep me"]).await;

    let (status, body) = delete(&stack, &slug, "?backup=true").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job = stack.wait_job(body["job"]["id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["step"], "backup", "{job}");
    assert!(job["error"].as_str().unwrap().contains("pg_dump failed"), "{job}");
    let database = stack.database_of(&slug).await.unwrap();
    assert!(
        database_exists(&stack, &database).await,
        "nothing is dropped without its backup"
    );
    assert_eq!(titles_in(stack.pg(), &database).await, ["keep me"]);

    // The operator may then delete without a backup.
    let (status, body) = delete(&stack, &slug, "").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job = stack.wait_job(body["job"]["id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(!database_exists(&stack, &database).await);
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_without_a_backup_directory_is_refused_and_the_tenant_stays() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("nb");
    let key = tenant_with_tasks(&stack, &slug, &["still here"]).await;

    let (status, body) = delete(&stack, &slug, "?backup=true").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "backup_unavailable", "{body}");
    let (status, body) = stack
        .admin(Method::POST, &format!("/v1/tenants/{slug}/backup"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "backup_unavailable", "{body}");
    assert!(body["message"].as_str().unwrap().contains("[backups] dir"), "{body}");
    let (status, body) = stack
        .admin(Method::GET, &format!("/v1/tenants/{slug}/backups"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "backup_unavailable", "{body}");
    let served = stack.tenant_get(&slug, &key, "/api/v1/tasks").await.unwrap();
    assert_eq!(served.status(), StatusCode::OK, "the tenant is untouched");
    stack.stop().await.unwrap();
}

/// The `.dump` files in `slug`'s backup directory.
fn dumps_on_disk(stack: &Stack, slug: &str) -> usize {
    std::fs::read_dir(stack.dir().join("backups").join(slug))
        .unwrap()
        .filter(|entry| entry.as_ref().unwrap().file_name().to_string_lossy().ends_with(".dump"))
        .count()
}

/// `[backups] keep_for`: backups older than that are erased, each recorded once in the audit
/// log; a deleted tenant keeps none, an existing tenant keeps its newest.
#[tokio::test(flavor = "multi_thread")]
async fn backups_older_than_keep_for_are_erased_and_audited_but_a_tenant_keeps_its_newest() {
    let stack = stack_with_backups("keep_for = \"4s\"\n").await;
    let (kept, gone) = (unique_name("kf"), unique_name("kg"));
    tenant_with_tasks(&stack, &kept, &["still a customer"]).await;
    tenant_with_tasks(&stack, &gone, &["left us"]).await;
    let mut jobs = Vec::new();
    for _ in 0..2 {
        jobs.push(back_up(&stack, &kept).await);
    }
    let deleted = delete_with_backup(&stack, &gone).await;
    assert_eq!(
        listed_jobs(&stack, &kept).await,
        [jobs[1], jobs[0]],
        "young backups stay"
    );
    assert_eq!(dumps_on_disk(&stack, &gone), 1);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while dumps_on_disk(&stack, &kept) > 1 || dumps_on_disk(&stack, &gone) > 0 {
        assert!(std::time::Instant::now() < deadline, "backups still there after 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert_eq!(listed_jobs(&stack, &kept).await, [jobs[1]], "the newest is kept");
    // A few more sweeps: nothing is erased or recorded twice.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(listed_jobs(&stack, &kept).await, [jobs[1]]);
    let (status, audit) = stack
        .admin(
            Method::GET,
            "/v1/audit?action=tenant.backup.expire&actor=scheduler",
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{audit}");
    let mut erased: Vec<(String, String)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["tenant"].as_str().unwrap().to_owned(),
                e["detail"]["file"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    erased.sort();
    let mut expected = vec![
        (gone.clone(), format!("-job{}.dump", deleted["id"])),
        (kept.clone(), format!("-job{}.dump", jobs[0])),
    ];
    expected.sort();
    assert_eq!(erased.len(), 2, "{audit}");
    for ((tenant, file), (expected_tenant, ending)) in erased.iter().zip(&expected) {
        assert_eq!(tenant, expected_tenant, "{audit}");
        assert!(file.ends_with(ending.as_str()), "{file} {ending}");
    }
    stack.stop().await.unwrap();
}

/// `[backups] every`: the control plane backs up each live tenant that often by itself,
/// recorded as the scheduler's, and not more often.
#[tokio::test(flavor = "multi_thread")]
async fn every_live_tenant_is_backed_up_on_schedule_and_not_more_often() {
    let stack = stack_with_backups("every = \"4s\"\nmax_concurrent = 1\n").await;
    let tenants = [unique_name("sa"), unique_name("sb")];
    for slug in &tenants {
        tenant_with_tasks(&stack, slug, &["backed up by the schedule"]).await;
    }
    // Backup jobs of `slug` (all queued by the schedule), oldest first: (created_at, state).
    let scheduled = |slug: String| {
        let stack = &stack;
        async move {
            let (status, page) = stack
                .admin(Method::GET, &format!("/v1/jobs?kind=backup&tenant={slug}"), None)
                .await
                .unwrap();
            assert_eq!(status, StatusCode::OK, "{page}");
            let mut jobs: Vec<(chrono::DateTime<chrono::Utc>, String)> = page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|job| {
                    (
                        job["created_at"].as_str().unwrap().parse().unwrap(),
                        job["state"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            jobs.sort();
            jobs
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        let mut done = true;
        for slug in &tenants {
            let jobs = scheduled(slug.clone()).await;
            let succeeded = jobs.iter().filter(|(_, state)| state == "succeeded").count();
            done &= succeeded >= 2 && dumps_on_disk(&stack, slug) >= 2;
        }
        if done {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "two scheduled backups each within 40 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    for slug in &tenants {
        let jobs = scheduled(slug.clone()).await;
        for pair in jobs.windows(2) {
            let apart = pair[1].0 - pair[0].0;
            assert!(
                apart >= chrono::Duration::milliseconds(3900),
                "{slug}: backups {apart} apart: {jobs:?}"
            );
        }
    }
    let (status, audit) = stack
        .admin(
            Method::GET,
            &format!("/v1/audit?tenant={}&action=tenant.backup", tenants[0]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let actors: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert!(actors.len() >= 2 && actors.iter().all(|a| *a == "scheduler"), "{audit}");
    stack.stop().await.unwrap();
}

/// `/metrics` says how long the live tenant least recently backed up has gone without a
/// backup, and how many live tenants have none: what an SRE alerts on.
#[tokio::test(flavor = "multi_thread")]
async fn backup_freshness_is_in_the_control_planes_metrics() {
    let stack = stack_with_backups("").await;
    let (fresh, never) = (unique_name("fr"), unique_name("nv"));
    tenant_with_tasks(&stack, &never, &["never backed up"]).await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    tenant_with_tasks(&stack, &fresh, &["backed up"]).await;
    back_up(&stack, &fresh).await;

    assert_eq!(
        stack.control_plane_gauge("silo_tenants_without_backup").await.unwrap(),
        1.0
    );
    let oldest = stack.control_plane_gauge("silo_backup_age_seconds_max").await.unwrap();
    assert!(
        (2.0..120.0).contains(&oldest),
        "since the unbacked tenant was created: {oldest}"
    );

    back_up(&stack, &never).await;
    // Measured at most every 10 s.
    tokio::time::sleep(std::time::Duration::from_millis(10_500)).await;
    assert_eq!(
        stack.control_plane_gauge("silo_tenants_without_backup").await.unwrap(),
        0.0
    );
    let oldest = stack.control_plane_gauge("silo_backup_age_seconds_max").await.unwrap();
    assert!(oldest < 20.0, "both were just backed up: {oldest}");
    stack.stop().await.unwrap();
}

/// `[backups.plans.NAME]`: tenants on a plan follow its schedule and retention; tenants on
/// other plans follow `[backups]` (here: backups on request only, every one kept).
#[tokio::test(flavor = "multi_thread")]
async fn a_plans_backup_policy_applies_to_its_tenants_and_no_others() {
    let stack = stack_with_backups(
        "max_concurrent = 1\n\
         [backups.plans.gold]\nevery = \"2s\"\nkeep_last = 2\n\
         [backups.plans.brief]\nkeep_for = \"4s\"\n",
    )
    .await;
    let (gold, brief, standard) = (unique_name("pg"), unique_name("pb"), unique_name("ps"));
    for (slug, plan) in [(&gold, "gold"), (&brief, "brief"), (&standard, "standard")] {
        stack
            .create_tenant_with(serde_json::json!({ "slug": slug, "plan": plan }))
            .await
            .unwrap();
    }
    let brief_jobs = [back_up(&stack, &brief).await, back_up(&stack, &brief).await];
    let standard_jobs = [back_up(&stack, &standard).await, back_up(&stack, &standard).await];

    // gold: backed up every 2 s by the schedule, its backups beyond the newest two erased.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        let (status, page) = stack
            .admin(
                Method::GET,
                &format!("/v1/jobs?kind=backup&tenant={gold}&state=succeeded"),
                None,
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{page}");
        if page["items"].as_array().unwrap().len() >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "three scheduled backups of {gold} in 40 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let (status, pruned) = stack
        .admin(
            Method::GET,
            &format!("/v1/audit?tenant={gold}&action=tenant.backup.prune"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{pruned}");
    let pruned = pruned["items"].as_array().unwrap();
    assert!(
        !pruned.is_empty() && pruned.iter().all(|e| e["detail"]["keep_last"] == 2),
        "{pruned:?}"
    );

    // brief: its older backup expires; its newest stays, the tenant being alive.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while listed_jobs(&stack, &brief).await != [brief_jobs[1]] {
        assert!(
            std::time::Instant::now() < deadline,
            "{brief}'s older backup still there after 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }

    // standard: [backups] schedules nothing and keeps everything.
    assert_eq!(
        listed_jobs(&stack, &standard).await,
        [standard_jobs[1], standard_jobs[0]]
    );
    let (status, page) = stack
        .admin(Method::GET, &format!("/v1/jobs?kind=backup&tenant={standard}"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(
        page["items"].as_array().unwrap().len(),
        2,
        "only the two asked for: {page}"
    );
    stack.stop().await.unwrap();
}
