//! `[backups.s3]`: every backup is uploaded to an S3 bucket (moto's, through the real AWS SDK)
//! before it counts as taken; a backup only the bucket still has (the machine and its backups
//! directory lost) is listed and restored from there; erasing a backup, by hand or by
//! `keep_for`, erases its copy in the bucket; an unreachable bucket fails the backup, loudly.
//! Every upload asks for the configured server-side encryption (SSE-KMS here).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use aws_sdk_s3::types::ServerSideEncryption;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use silo_tests::moto::MotoServer;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use sqlx::{ConnectOptions, Connection};

/// A stack whose backups go to `backups/` and to `bucket` on `moto`, with `extra` lines in
/// `[backups]` and `s3` lines in `[backups.s3]`.
async fn stack_with_s3(moto: &MotoServer, bucket: &str, s3: &str, extra: &str, encrypted: bool) -> Stack {
    let key = if encrypted {
        "encryption_key_file = \"backup.key\"\n"
    } else {
        ""
    };
    Stack::start(StackOptions {
        extra_toml: format!(
            "[backups]\ndir = \"backups\"\n{key}{extra}\n[backups.s3]\nbucket = \"{bucket}\"\n{s3}\n\
             endpoint_url = \"{}\"\npath_style = true\npart_size_mib = 5\n",
            moto.endpoint_url()
        ),
        backup_key: encrypted,
        ..StackOptions::default()
    })
    .await
    .unwrap()
}

/// The KMS key the bucket is asked to encrypt backups with.
const KMS_KEY: &str = "arn:aws:kms:us-east-1:123456789012:key/silo-backups";

/// A new bucket on `moto`.
async fn new_bucket(moto: &MotoServer) -> String {
    let bucket = unique_name("silo-backups-");
    moto.create_bucket(&bucket).await.unwrap();
    bucket
}

/// The keys in `bucket`, in order.
async fn keys_in(moto: &MotoServer, bucket: &str) -> Vec<String> {
    let listed = moto.s3().await.list_objects_v2().bucket(bucket).send().await.unwrap();
    listed
        .contents()
        .iter()
        .filter_map(|object| object.key().map(str::to_owned))
        .collect()
}

async fn object(moto: &MotoServer, bucket: &str, key: &str) -> Vec<u8> {
    let object = moto
        .s3()
        .await
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    object.body.collect().await.unwrap().into_bytes().to_vec()
}

/// Takes a backup of `slug` with siloctl; the backup's path.
async fn back_up(stack: &Stack, slug: &str) -> PathBuf {
    let (code, stdout, stderr) = stack.siloctl(&["-o", "json", "tenant", "backup", slug]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let job: Value = serde_json::from_str(&stdout).unwrap();
    PathBuf::from(job["job"]["progress"]["backup"].as_str().unwrap())
}

fn file_name(path: &std::path::Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// `slug`'s backups as `siloctl tenant backups -o json` lists them.
async fn listed(stack: &Stack, slug: &str) -> Vec<Value> {
    let (code, stdout, stderr) = stack.siloctl(&["-o", "json", "tenant", "backups", slug]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let body: Value = serde_json::from_str(&stdout).unwrap();
    body["items"].as_array().unwrap().clone()
}

/// Adds `rows` tasks of 88 random-looking characters to `database`, as the superuser.
async fn fill(stack: &Stack, database: &str, rows: i32) {
    let mut conn = stack.pg().admin_options(database).connect().await.unwrap();
    sqlx::query(
        "INSERT INTO tasks (title) \
         SELECT translate(encode(sha512(i::text::bytea), 'base64'), E'\\n', '') FROM generate_series(1, $1) i",
    )
    .bind(rows)
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
}

async fn count_tasks(stack: &Stack, database: &str, title: Option<&str>) -> i64 {
    let mut conn = stack.pg().admin_options(database).connect().await.unwrap();
    let count = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE $1::text IS NULL OR title = $1")
        .bind(title)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    count
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_reaches_s3_and_is_restored_from_there_once_the_machine_lost_it() {
    let moto = MotoServer::shared().await;
    let bucket = new_bucket(moto).await;
    let s3 = format!("prefix = \"silo/\"\nserver_side_encryption = \"aws:kms\"\nkms_key_id = \"{KMS_KEY}\"");
    let stack = stack_with_s3(moto, &bucket, &s3, "", true).await;
    let slug = unique_name("s3");
    let key = stack.create_tenant(&slug).await.unwrap();
    let database = stack.database_of(&slug).await.unwrap();
    // Large enough to be uploaded and downloaded in parts of 5 MiB.
    fill(&stack, &database, 120_000).await;

    let backup = back_up(&stack, &slug).await;
    let file = file_name(&backup);
    let on_disk = std::fs::read(&backup).unwrap();
    assert!(on_disk.len() > 5 * 1024 * 1024, "{} bytes", on_disk.len());
    let object_key = format!("silo/{slug}/{file}");
    assert_eq!(keys_in(moto, &bucket).await, std::slice::from_ref(&object_key));
    assert!(
        object(moto, &bucket, &object_key).await == on_disk,
        "the bucket holds the backup file as it is on disk (encrypted)"
    );
    let items = listed(&stack, &slug).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(
        (
            &items[0]["file"],
            &items[0]["local"],
            &items[0]["s3"],
            &items[0]["encrypted"]
        ),
        (
            &Value::from(file.as_str()),
            &Value::Bool(true),
            &Value::Bool(true),
            &Value::Bool(true)
        ),
    );

    // The machine is lost with its backups directory; the tenant is written to since.
    std::fs::remove_dir_all(stack.dir().join("backups")).unwrap();
    stack
        .add_tasks(&slug, &key, &["written after the backup"])
        .await
        .unwrap();
    let items = listed(&stack, &slug).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(
        (
            &items[0]["local"],
            &items[0]["s3"],
            &items[0]["encrypted"],
            &items[0]["bytes"]
        ),
        (
            &Value::Bool(false),
            &Value::Bool(true),
            &Value::Bool(true),
            &Value::from(on_disk.len())
        ),
        "the bucket's copy is listed"
    );
    let (code, table, stderr) = stack.siloctl(&["tenant", "backups", &slug]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(table.contains("s3") && table.contains(&file), "{table}");

    let (code, stdout, stderr) = stack
        .siloctl(&["-o", "json", "tenant", "restore", &slug, "--from", &file, "--yes"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let job: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(job["job"]["state"], "succeeded", "{job}");
    assert_eq!(count_tasks(&stack, &database, None).await, 120_000);
    assert_eq!(
        count_tasks(&stack, &database, Some("written after the backup")).await,
        0
    );
    let served = stack.tenant_get(&slug, &key, "/api/v1/tasks?limit=1").await.unwrap();
    assert_eq!(served.status(), StatusCode::OK);

    // The download is the backup, byte for byte, back in its directory; the restore's own
    // backup of the data it replaced went to the bucket too.
    let downloaded = stack.dir().join("backups").join(&slug).join(&file);
    assert!(std::fs::read(&downloaded).unwrap() == on_disk);
    let keys = keys_in(moto, &bucket).await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    // Both the backup uploaded in parts and the small one in one request were stored
    // encrypted with the KMS key asked for.
    for key in &keys {
        let head = moto
            .s3()
            .await
            .head_object()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            (head.server_side_encryption(), head.ssekms_key_id()),
            (Some(&ServerSideEncryption::AwsKms), Some(KMS_KEY)),
            "{key}"
        );
    }
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn erasing_a_backup_erases_its_copy_in_s3_and_keep_for_sweeps_the_bucket() {
    let moto = MotoServer::shared().await;
    let bucket = new_bucket(moto).await;
    let stack = stack_with_s3(moto, &bucket, "", "keep_for = \"4s\"", false).await;
    let kept = unique_name("s3k");
    stack.create_tenant(&kept).await.unwrap();
    let first = file_name(&back_up(&stack, &kept).await);
    let second = file_name(&back_up(&stack, &kept).await);
    assert_eq!(
        keys_in(moto, &bucket).await,
        [format!("{kept}/{first}"), format!("{kept}/{second}")]
    );

    let (status, body) = stack
        .admin(Method::DELETE, &format!("/v1/tenants/{kept}/backups/{first}"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(keys_in(moto, &bucket).await, [format!("{kept}/{second}")]);
    assert!(!stack.dir().join("backups").join(&kept).join(&first).exists());

    // A deleted tenant's backup, only in the bucket: keep_for erases it there.
    let gone = unique_name("s3g");
    stack.create_tenant(&gone).await.unwrap();
    crate::backups::delete_with_backup(&stack, &gone).await;
    std::fs::remove_dir_all(stack.dir().join("backups").join(&gone)).unwrap();
    assert_eq!(keys_in(moto, &bucket).await.len(), 2);

    let deadline = Instant::now() + Duration::from_secs(30);
    while keys_in(moto, &bucket).await.len() > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        keys_in(moto, &bucket).await,
        [format!("{kept}/{second}")],
        "the tenant that exists keeps its newest backup"
    );
    let expired: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'tenant.backup.expire' AND tenant = $1")
            .bind(&gone)
            .fetch_one(stack.catalog())
            .await
            .unwrap();
    assert_eq!(expired, 1);
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_whose_upload_fails_is_not_taken_and_says_why() {
    let moto = MotoServer::start().await.unwrap();
    let bucket = new_bucket(&moto).await;
    let stack = stack_with_s3(&moto, &bucket, "prefix = \"silo/\"", "", false).await;
    let slug = unique_name("s3f");
    stack.create_tenant(&slug).await.unwrap();
    drop(moto);

    let (code, stdout, stderr) = stack.siloctl(&["-o", "json", "tenant", "backup", &slug]).await.unwrap();
    assert_eq!(code, Some(1), "{stdout} {stderr}");
    let (status, job) = stack.admin(Method::GET, "/v1/jobs", None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let job = job["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|job| job["kind"] == "backup" && job["tenant"] == slug.as_str())
        .cloned()
        .unwrap();
    assert_eq!(job["state"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains(&format!("s3://{bucket}/silo/{slug}/")), "{error}");
    assert_eq!(job["attempts"], 5, "an unreachable bucket is retried: {job}");

    let finished: Vec<String> = std::fs::read_dir(stack.dir().join("backups").join(&slug))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.'))
        .collect();
    assert_eq!(finished, Vec::<String>::new(), "no backup counts as taken");
    let (status, body) = stack
        .admin(Method::GET, &format!("/v1/tenants/{slug}/backups"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "backup_store_unavailable", "{body}");
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn rekey_backups_downloads_a_backup_only_in_s3_and_replaces_its_copy_there() {
    let moto = MotoServer::shared().await;
    let bucket = new_bucket(moto).await;
    let stack = stack_with_s3(moto, &bucket, "prefix = \"silo/\"", "", true).await;
    let slug = unique_name("s3r");
    let key = stack.create_tenant(&slug).await.unwrap();
    stack.add_tasks(&slug, &key, &["under the old key"]).await.unwrap();
    let file = file_name(&back_up(&stack, &slug).await);
    let object_key = format!("silo/{slug}/{file}");
    let under_old_key = object(moto, &bucket, &object_key).await;
    std::fs::remove_dir_all(stack.dir().join("backups")).unwrap();

    silo_control_plane::keyfile::create(&stack.dir().join("new.key")).unwrap();
    let config = std::fs::read_to_string(stack.dir().join("silo.toml")).unwrap();
    let with_keys = |name: &str, keys: &str| {
        let path = stack.dir().join(name);
        std::fs::write(&path, config.replace("encryption_key_file = \"backup.key\"\n", keys)).unwrap();
        path
    };
    let rotated = with_keys(
        "rotated.toml",
        "encryption_key_file = \"new.key\"\nprevious_encryption_key_files = [\"backup.key\"]\n",
    );
    let (code, stdout, stderr) = silo_tests::run_control_plane(&rotated, &["rekey-backups"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.starts_with("backups: 0 encrypted, 1 re-encrypted from a previous key"),
        "{stdout}"
    );

    let local = stack.dir().join("backups").join(&slug).join(&file);
    let rekeyed = object(moto, &bucket, &object_key).await;
    assert!(rekeyed != under_old_key, "the bucket's copy was replaced");
    assert!(std::fs::read(&local).unwrap() == rekeyed, "by the rekeyed file");
    let new_key_only = with_keys("new-only.toml", "encryption_key_file = \"new.key\"\n");
    let plain = stack.dir().join("plain.dump");
    let (code, _, stderr) = silo_tests::run_control_plane(
        &new_key_only,
        &[
            "decrypt-backup",
            local.to_str().unwrap(),
            "--output",
            plain.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, Some(0), "the new key alone opens it: {stderr}");
    stack.stop().await.unwrap();
}

/// A backup only the bucket holds, which a lifecycle rule moved to Glacier, is listed as
/// archived; a restore from it fails at once saying how to bring it back, and leaves the
/// tenant as it was; once S3 restored a readable copy, the same restore works.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_archived_in_glacier_is_named_and_restored_from_only_once_readable() {
    use aws_sdk_s3::types::{GlacierJobParameters, RestoreRequest, StorageClass, Tier};

    let moto = MotoServer::shared().await;
    let bucket = new_bucket(moto).await;
    let stack = stack_with_s3(moto, &bucket, "", "", false).await;
    let slug = unique_name("glacier");
    let key = stack.create_tenant(&slug).await.unwrap();
    stack.add_tasks(&slug, &key, &["in the backup"]).await.unwrap();
    let file = file_name(&back_up(&stack, &slug).await);
    let object_key = format!("{slug}/{file}");
    // What a lifecycle rule does: the object moves to the GLACIER storage class.
    let s3 = moto.s3().await;
    s3.copy_object()
        .bucket(&bucket)
        .key(&object_key)
        .copy_source(format!("{bucket}/{object_key}"))
        .storage_class(StorageClass::Glacier)
        .send()
        .await
        .unwrap();
    std::fs::remove_dir_all(stack.dir().join("backups")).unwrap();
    stack.add_tasks(&slug, &key, &["written since"]).await.unwrap();

    let items = listed(&stack, &slug).await;
    assert_eq!(
        (&items[0]["archived"], &items[0]["encrypted"], &items[0]["s3"]),
        (&Value::Bool(true), &Value::Null, &Value::Bool(true)),
        "{items:?}"
    );
    let (code, table, stderr) = stack.siloctl(&["tenant", "backups", &slug]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(table.contains("s3 (archived)"), "{table}");

    let restore = ["tenant", "restore", &slug, "--from", &file, "--yes"];
    let (code, _, stderr) = stack.siloctl(&restore).await.unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("archived") && stderr.contains("aws s3api restore-object"),
        "{stderr}"
    );
    let (status, jobs) = stack
        .admin(Method::GET, &format!("/v1/jobs?kind=restore&tenant={slug}"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{jobs}");
    assert_eq!(jobs["items"][0]["attempts"], 1, "failed at once, not retried: {jobs}");
    // The failed job's undo serves the tenant again, as it was.
    let deadline = Instant::now() + Duration::from_secs(10);
    let titles = loop {
        match stack.served_titles(&slug, &key).await {
            Ok(titles) => break titles,
            Err(e) => assert!(Instant::now() < deadline, "not served again within 10 s: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(titles, ["in the backup", "written since"]);

    s3.restore_object()
        .bucket(&bucket)
        .key(&object_key)
        .restore_request(
            RestoreRequest::builder()
                .days(1)
                .glacier_job_parameters(GlacierJobParameters::builder().tier(Tier::Expedited).build().unwrap())
                .build(),
        )
        .send()
        .await
        .unwrap();
    let (code, _, stderr) = stack.siloctl(&restore).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stack.served_titles(&slug, &key).await.unwrap(), ["in the backup"]);
    stack.stop().await.unwrap();
}
