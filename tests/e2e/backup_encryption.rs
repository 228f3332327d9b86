//! Backups encrypted at rest (`[backups] encryption_key_file`): what reaches the disk holds
//! nothing of the tenant in clear, restores through silo, decrypts by hand for a restore
//! outside silo (`silo-control-plane decrypt-backup`), refuses to restore into another tenant
//! or after tampering (restoring nothing), and moves to a new key with
//! `silo-control-plane rekey-backups`.

use std::path::{Path, PathBuf};

use reqwest::{Method, StatusCode};
use serde_json::Value;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use sqlx::{ConnectOptions, Connection};

use crate::backups::{delete, restore, titles_in};

/// A stack whose control plane encrypts backups under `backup.key` in its directory.
async fn stack_with_encrypted_backups() -> Stack {
    Stack::start(StackOptions {
        extra_toml: "[backups]\ndir = \"backups\"\nencryption_key_file = \"backup.key\"\n".into(),
        backup_key: true,
        ..StackOptions::default()
    })
    .await
    .unwrap()
}

/// Runs `silo-control-plane --config CONFIG ARGS...`; exit code, stdout, stderr.
fn control_plane(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    silo_tests::run_control_plane(config, args, &[])
}

/// The stack's config with its `[backups]` keys replaced by `keys`, written to `name`.
fn config_with_keys(stack: &Stack, name: &str, keys: &str) -> PathBuf {
    let config = std::fs::read_to_string(stack.dir().join("silo.toml")).unwrap();
    let line = "encryption_key_file = \"backup.key\"\n";
    assert!(config.contains(line), "{config}");
    let path = stack.dir().join(name);
    std::fs::write(&path, config.replace(line, keys)).unwrap();
    path
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Takes a backup of `slug` with `siloctl tenant backup`; returns its path.
async fn backup(stack: &Stack, slug: &str) -> PathBuf {
    let (code, stdout, stderr) = stack.siloctl(&["-o", "json", "tenant", "backup", slug]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let job: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(job["job"]["state"], "succeeded", "{job}");
    PathBuf::from(job["job"]["progress"]["backup"].as_str().expect("backup path"))
}

async fn wait_succeeded(stack: &Stack, body: &Value) -> Value {
    let job = stack.wait_job(body["job"]["id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    job
}

/// Whether the tenant database `database` has a `tasks` table (false when it does not exist).
async fn has_tasks_table(stack: &Stack, database: &str) -> bool {
    let Ok(mut conn) = stack.pg().admin_options(database).connect().await else {
        return false;
    };
    let exists = sqlx::query_scalar("SELECT to_regclass('public.tasks') IS NOT NULL")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    exists
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_backup_holds_nothing_in_clear_and_restores_through_silo_and_by_hand() {
    let stack = stack_with_encrypted_backups().await;
    let slug = unique_name("enc");
    let key = stack.create_tenant(&slug).await.unwrap();
    stack
        .add_tasks(&slug, &key, &["ledger entry ZX-4411", "payroll run ZX-9902"])
        .await
        .unwrap();

    let dump = backup(&stack, &slug).await;
    let bytes = std::fs::read(&dump).unwrap();
    assert!(bytes.starts_with(b"SILOBK"), "a silo encrypted backup");
    for clear in ["ZX-4411", "ZX-9902", "PGDMP", "CREATE TABLE", "api_keys"] {
        assert!(!contains(&bytes, clear), "{clear:?} is in the backup in clear");
    }
    let bindir = silo_control_plane::localpg::find_bindir().unwrap();
    let listed = std::process::Command::new(bindir.join("pg_restore"))
        .arg("--list")
        .arg(&dump)
        .output()
        .unwrap();
    assert!(!listed.status.success(), "pg_restore cannot read it");

    // The listing says so.
    let (code, stdout, stderr) = stack
        .siloctl(&["-o", "json", "tenant", "backups", &slug])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed["items"][0]["encrypted"], true, "{listed}");
    let (code, table, stderr) = stack.siloctl(&["tenant", "backups", &slug]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(table.lines().next().unwrap().contains(" ENCRYPTED "), "{table}");
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[4..], ["yes", "local", "-"], "{table}");

    // By hand: decrypt-backup writes the pg_dump file it was, for pg_restore outside silo.
    let config = stack.dir().join("silo.toml");
    let plain = stack.dir().join("plain.dump");
    let dump_arg = dump.to_str().unwrap();
    let plain_arg = plain.to_str().unwrap();
    let (code, stdout, stderr) = control_plane(&config, &["decrypt-backup", dump_arg, "--output", plain_arg]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(&format!("backup of tenant {slug}")), "{stdout}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777, 0o600);
    let restored = restore(&stack, &plain).await;
    assert_eq!(
        titles_in(stack.pg(), &restored).await,
        ["ledger entry ZX-4411", "payroll run ZX-9902"]
    );
    let (code, _, stderr) = control_plane(&config, &["decrypt-backup", dump_arg, "--output", plain_arg]);
    assert_eq!(code, Some(1), "an existing file is not overwritten: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let (code, _, stderr) = control_plane(&config, &["decrypt-backup", plain_arg, "--output", "/dev/null/x"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("not encrypted"), "{stderr}");

    // Through silo: the tenant deleted with a backup comes back from it.
    let (status, body) = delete(&stack, &slug, "?backup=true").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job = wait_succeeded(&stack, &body).await;
    let last = PathBuf::from(job["progress"]["backup"].as_str().unwrap());
    assert!(std::fs::read(&last).unwrap().starts_with(b"SILOBK"));
    let name = last.file_name().unwrap().to_str().unwrap();
    let (code, stdout, stderr) = stack
        .siloctl(&["-o", "json", "tenant", "create", &slug, "--restore-from", name])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let created: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(created["tenant"]["status"], "active", "{created}");
    assert_eq!(
        stack.served_titles(&slug, &key).await.unwrap(),
        ["ledger entry ZX-4411", "payroll run ZX-9902"],
        "the old key and the data came back"
    );
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn another_tenants_or_a_tampered_encrypted_backup_restores_nothing() {
    let stack = stack_with_encrypted_backups().await;
    let (owner, other) = (unique_name("own"), unique_name("oth"));
    let key = stack.create_tenant(&owner).await.unwrap();
    stack.create_tenant(&other).await.unwrap();
    // Enough incompressible rows for a backup of several 64 KiB chunks.
    let mut conn = stack
        .pg()
        .admin_options(&stack.database_of(&owner).await.unwrap())
        .connect()
        .await
        .unwrap();
    sqlx::query("INSERT INTO tasks (title) SELECT md5(i::text) || md5((i * 7)::text) FROM generate_series(1, 6000) i")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let mut dumps = Vec::new();
    for slug in [&owner, &other] {
        let (status, body) = delete(&stack, slug, "?backup=true").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let job = wait_succeeded(&stack, &body).await;
        dumps.push(PathBuf::from(job["progress"]["backup"].as_str().unwrap()));
    }
    let original = std::fs::read(&dumps[0]).unwrap();
    assert!(original.len() > 3 * 64 * 1024, "{} bytes", original.len());
    let owner_dir = dumps[0].parent().unwrap().to_owned();

    // The other tenant's backup, renamed into this tenant's directory.
    let foreign = "copied-20990101T000000Z-job999998.dump";
    std::fs::copy(&dumps[1], owner_dir.join(foreign)).unwrap();
    // This tenant's backup with one byte changed near its end: the first chunks (the
    // archive's header and schema) reach pg_restore before the change is found.
    let tampered = "tampered-20990101T000000Z-job999999.dump";
    let mut bytes = original.clone();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x20;
    std::fs::write(owner_dir.join(tampered), &bytes).unwrap();

    let database = stack.database_of(&owner).await.unwrap();
    for (file, expected) in [
        (foreign, format!("it is a backup of tenant {other}, not of {owner}")),
        (tampered, "corrupted, truncated or was tampered with".to_owned()),
    ] {
        let (status, body) = stack
            .admin(
                Method::POST,
                "/v1/tenants",
                Some(serde_json::json!({"slug": owner, "restore_from": file})),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let job = stack.wait_job(body["job"]["id"].as_i64().unwrap()).await.unwrap();
        assert_eq!(job["state"], "failed", "{job}");
        let error = job["error"].as_str().unwrap();
        assert!(error.contains(&expected), "{error}");
        assert!(!contains(error.as_bytes(), "md5"), "{error}");
        assert!(
            !has_tasks_table(&stack, &database).await,
            "nothing of {file} was restored"
        );
        let (code, _, stderr) = stack.siloctl(&["tenant", "delete", &owner, "--yes"]).await.unwrap();
        assert_eq!(code, Some(0), "{stderr}");
    }

    // The intact backup still restores, all of it.
    let name = dumps[0].file_name().unwrap().to_str().unwrap();
    let (code, _, stderr) = stack
        .siloctl(&["tenant", "create", &owner, "--restore-from", name])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let mut conn = stack.pg().admin_options(&database).connect().await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    assert_eq!(rows, 6000);
    let resp = stack.tenant_get(&owner, &key, "/api/v1/tasks?limit=1").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn rekey_backups_moves_plain_and_old_key_backups_to_the_new_key() {
    let stack = stack_with_encrypted_backups().await;
    let slug = unique_name("rk");
    let key = stack.create_tenant(&slug).await.unwrap();
    stack.add_tasks(&slug, &key, &["before rotation"]).await.unwrap();
    let under_old_key = backup(&stack, &slug).await;
    let config = stack.dir().join("silo.toml");
    // A plain pg_dump file, as backups taken before a key was set are.
    let plain = under_old_key.with_file_name(format!("{slug}-20250101T000000Z-job900001.dump"));
    let (code, _, stderr) = control_plane(
        &config,
        &[
            "decrypt-backup",
            under_old_key.to_str().unwrap(),
            "--output",
            plain.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let taken_in_2025 = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_735_689_600);
    std::fs::File::options()
        .write(true)
        .open(&plain)
        .unwrap()
        .set_modified(taken_in_2025)
        .unwrap();
    let mtime = |path: &Path| std::fs::metadata(path).unwrap().modified().unwrap();
    let old_times = (mtime(&under_old_key), mtime(&plain));
    let (code, stdout, _) = stack
        .siloctl(&["-o", "json", "tenant", "backups", &slug])
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    let encrypted: Vec<bool> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["encrypted"].as_bool().unwrap())
        .collect();
    assert_eq!(encrypted, [true, false], "{listed}");

    silo_control_plane::keyfile::create(&stack.dir().join("new.key")).unwrap();
    let rotated = config_with_keys(
        &stack,
        "rotated.toml",
        "encryption_key_file = \"new.key\"\nprevious_encryption_key_files = [\"backup.key\"]\n",
    );
    let (code, stdout, stderr) = control_plane(&rotated, &["rekey-backups"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.starts_with(
            "backups: 1 encrypted, 1 re-encrypted from a previous key, 0 already under the current key, 0 failed"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("can now be removed"), "{stdout}");
    let (code, stdout, stderr) = control_plane(&rotated, &["rekey-backups"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.starts_with("backups: 0 encrypted, 0 re-encrypted from a previous key, 2 already"),
        "{stdout}"
    );
    assert_eq!(
        (mtime(&under_old_key), mtime(&plain)),
        old_times,
        "backups keep their times, which order them"
    );
    assert!(std::fs::read(&plain).unwrap().starts_with(b"SILOBK"));

    // The new key alone opens both; the old one opens neither.
    let only_new = config_with_keys(&stack, "new.toml", "encryption_key_file = \"new.key\"\n");
    for (i, file) in [&under_old_key, &plain].into_iter().enumerate() {
        let out = stack.dir().join(format!("out{i}.dump"));
        let args = [
            "decrypt-backup",
            file.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ];
        let (code, _, stderr) = control_plane(&config, &args);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("cannot be decrypted"), "{stderr}");
        assert!(!out.exists(), "nothing is left of a failed decryption");
        let (code, _, stderr) = control_plane(&only_new, &args);
        assert_eq!(code, Some(0), "{stderr}");
        let restored = restore(&stack, &out).await;
        assert_eq!(titles_in(stack.pg(), &restored).await, ["before rotation"]);
    }

    // A corrupted backup is reported and left as it is; the others are still counted.
    let corrupted_path = plain.with_file_name(format!("{slug}-20250102T000000Z-job900002.dump"));
    let mut corrupted = std::fs::read(&plain).unwrap();
    let at = corrupted.len() - 3;
    corrupted[at] ^= 1;
    std::fs::write(&corrupted_path, &corrupted).unwrap();
    let (code, stdout, stderr) = control_plane(&only_new, &["rekey-backups"]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stderr.contains(corrupted_path.to_str().unwrap()) && stderr.contains("corrupted"),
        "{stderr}"
    );
    assert!(stdout.contains("2 already under the current key, 1 failed"), "{stdout}");
    assert_eq!(std::fs::read(&corrupted_path).unwrap(), corrupted);
    let left: Vec<String> = std::fs::read_dir(plain.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "no partial files: {left:?}");

    // Usage problems exit 2 with one line.
    let keyless = config_with_keys(&stack, "keyless.toml", "");
    let missing = config_with_keys(&stack, "missing.toml", "encryption_key_file = \"gone.key\"\n");
    for (config, expected) in [(&keyless, "encryption_key_file"), (&missing, "gone.key")] {
        let (code, _, stderr) = control_plane(config, &["rekey-backups"]);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains(expected) && stderr.lines().count() == 1, "{stderr}");
    }
    let dir = tempfile::tempdir().unwrap();
    let toml = std::fs::read_to_string(&missing).unwrap();
    let refused = silo_tests::refused_config("silo-control-plane", dir.path(), &toml);
    assert!(
        refused.contains("backups.encryption_key_file") && refused.contains("gone.key"),
        "{refused}"
    );
    stack.stop().await.unwrap();
}

/// `siloctl tenant backups SLUG --download FILE --to OUT`
/// (`GET /v1/tenants/{slug}/backups/{file}/content`): a tenant's data handed back as the
/// `pg_dump` file it was, decrypted by the control plane; audited, not for viewers, and
/// nothing left behind when the backup does not decrypt whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_is_downloaded_decrypted_for_operators_only_and_never_half() {
    let stack = stack_with_encrypted_backups().await;
    let slug = unique_name("dl");
    stack.create_tenant(&slug).await.unwrap();
    let database = stack.database_of(&slug).await.unwrap();
    // Enough incompressible rows for a backup of several 64 KiB chunks.
    let mut conn = stack.pg().admin_options(&database).connect().await.unwrap();
    sqlx::query("INSERT INTO tasks (title) SELECT md5(i::text) || md5((i * 7)::text) FROM generate_series(1, 6000) i")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let titles = titles_in(stack.pg(), &database).await;
    let backup = backup(&stack, &slug).await;
    let file = backup.file_name().unwrap().to_str().unwrap().to_owned();
    let content = format!("/v1/tenants/{slug}/backups/{file}/content");

    let viewer = crate::audit::token_of_role(&stack, "auditor", "viewer").await;
    assert_eq!(
        crate::audit::status_with(stack.control_plane_addr(), &viewer, &content).await,
        StatusCode::FORBIDDEN
    );

    let out = stack.dir().join("export.dump");
    let out_arg = out.to_str().unwrap();
    let (code, stdout, stderr) = stack
        .siloctl(&["tenant", "backups", &slug, "--download", &file, "--to", out_arg])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("pg_restore"), "{stdout}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&out).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert!(std::fs::read(&out).unwrap().starts_with(b"PGDMP"));
    let restored = restore(&stack, &out).await;
    assert_eq!(titles_in(stack.pg(), &restored).await, titles);
    let (code, _, stderr) = stack
        .siloctl(&["tenant", "backups", &slug, "--download", &file, "--to", out_arg])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "an existing file is not overwritten: {stderr}");
    let (code, _, stderr) = stack
        .siloctl(&["tenant", "backups", &slug, "--download", &file])
        .await
        .unwrap();
    assert_eq!(code, Some(2), "--to is needed: {stderr}");

    // A copy with one byte flipped near its end: the download fails part way, and leaves nothing.
    let mut bytes = std::fs::read(&backup).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    let tampered = format!("{slug}-20250101T000000Z-job999999.dump");
    std::fs::write(backup.with_file_name(&tampered), &bytes).unwrap();
    let half = stack.dir().join("half.dump");
    let (code, _, stderr) = stack
        .siloctl(&[
            "tenant",
            "backups",
            &slug,
            "--download",
            &tampered,
            "--to",
            half.to_str().unwrap(),
        ])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!half.exists(), "nothing is left of a download cut short");
    assert!(stderr.contains("the download broke off"), "{stderr}");

    // A file that is no backup silo took is refused before anything is sent or audited.
    let junk = format!("{slug}-20250102T000000Z-job999998.dump");
    std::fs::write(backup.with_file_name(&junk), b"not a dump").unwrap();
    let (status, body) = stack
        .admin(Method::GET, &format!("/v1/tenants/{slug}/backups/{junk}/content"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "backup_unreadable", "{body}");

    let (status, audit) = stack
        .admin(
            Method::GET,
            &format!("/v1/audit?tenant={slug}&action=tenant.backup.download"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        audit["items"].as_array().unwrap().len(),
        2,
        "the refused overwrite sent nothing: {audit}"
    );
    stack.stop().await.unwrap();
}
