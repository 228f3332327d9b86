//! The secret store: one suite of behaviour tests, written once against `&dyn SecretStore` and
//! run on both backends (the local store on a fresh catalog database, AWS on moto_server),
//! plus the local store's encryption at rest.

// Tests may unwrap (STYLE.md §2); clippy only knows that inside `#[test]` fns, not in the
// suite functions and fixtures shared by the tests below.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use silo_control_plane::config::{SecretsBackend, SecretsConfig};
use silo_control_plane::secrets::local::{create_master_key, LocalSecretStore};
use silo_control_plane::secrets::{
    self, DbSecret, SecretStore, SecretStoreError, VersionStages, AWSCURRENT, AWSPENDING, AWSPREVIOUS,
};
use silo_tests::moto::{MotoServer, REGION};
use silo_tests::pg::TestCluster;
use silo_tests::unique_name;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// A version id in the ClientRequestToken format both backends accept.
fn version_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn secret_name() -> String {
    format!("silo-test/tenants/{}", unique_name("t"))
}

/// A database secret with a fresh random password.
fn db_secret() -> DbSecret {
    DbSecret {
        engine: "postgres".into(),
        host: "127.0.0.1".into(),
        port: 5432,
        username: "tenant_acme_app".into(),
        password: secrets::generate_password(),
        dbname: "tenant_acme".into(),
    }
}

fn value() -> SecretString {
    db_secret().to_secret_string()
}

fn stages(list: &[(&str, &[&str])]) -> Vec<VersionStages> {
    let mut v: Vec<VersionStages> = list
        .iter()
        .map(|(id, s)| {
            let mut stages: Vec<String> = s.iter().map(|x| (*x).to_owned()).collect();
            stages.sort();
            VersionStages {
                version_id: (*id).to_owned(),
                stages,
            }
        })
        .collect();
    v.sort_by(|a, b| a.version_id.cmp(&b.version_id));
    v
}

/// `list_version_stages` with each version's stages sorted, for comparisons.
async fn listed(store: &dyn SecretStore, name: &str) -> Vec<VersionStages> {
    let mut v = store.list_version_stages(name).await.unwrap().expect("secret exists");
    for vs in &mut v {
        vs.stages.sort();
    }
    v
}

async fn current(store: &dyn SecretStore, name: &str, stage: &str) -> (String, String) {
    let v = store
        .get_secret_value(name, stage)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{stage} exists"));
    (v.version_id, v.value.expose_secret().to_owned())
}

// ---- the suite, run on both backends ----

async fn create_then_get_current(store: &dyn SecretStore) {
    let (name, v1, val) = (secret_name(), version_id(), value());
    store
        .create_secret(&name, &v1, &val, &[("silo:tenant", "acme")])
        .await
        .unwrap();
    let got = store.get_secret_value(&name, AWSCURRENT).await.unwrap().unwrap();
    assert_eq!(got.version_id, v1);
    assert_eq!(got.stages, vec![AWSCURRENT.to_owned()]);
    assert_eq!(got.value.expose_secret(), val.expose_secret());
    let parsed = DbSecret::from_secret(&got.value, &name).unwrap();
    assert_eq!(parsed.username, "tenant_acme_app");
    assert_eq!(listed(store, &name).await, stages(&[(&v1, &[AWSCURRENT])]));
}

async fn create_is_idempotent_by_version_id(store: &dyn SecretStore) {
    let (name, v1, val) = (secret_name(), version_id(), value());
    store.create_secret(&name, &v1, &val, &[]).await.unwrap();
    store.create_secret(&name, &v1, &val, &[]).await.unwrap();
    assert_eq!(listed(store, &name).await, stages(&[(&v1, &[AWSCURRENT])]));
    // Same version id, other value: versions are immutable.
    let err = store.create_secret(&name, &v1, &value(), &[]).await.unwrap_err();
    assert!(matches!(err, SecretStoreError::Backend(_)), "{err}");
    // Another version id: the name is taken.
    let err = store.create_secret(&name, &version_id(), &val, &[]).await.unwrap_err();
    assert!(matches!(err, SecretStoreError::Backend(_)), "{err}");
    assert_eq!(
        current(store, &name, AWSCURRENT).await,
        (v1, val.expose_secret().to_owned())
    );
}

async fn put_pending_adds_a_staged_version(store: &dyn SecretStore) {
    let (name, v1, v2, v3) = (secret_name(), version_id(), version_id(), version_id());
    let (val1, val2, val3) = (value(), value(), value());
    store.create_secret(&name, &v1, &val1, &[]).await.unwrap();
    store.put_secret_value(&name, &v2, &val2, &[AWSPENDING]).await.unwrap();
    assert_eq!(
        current(store, &name, AWSPENDING).await,
        (v2.clone(), val2.expose_secret().to_owned())
    );
    assert_eq!(
        current(store, &name, AWSCURRENT).await,
        (v1.clone(), val1.expose_secret().to_owned())
    );
    assert_eq!(
        listed(store, &name).await,
        stages(&[(&v1, &[AWSCURRENT]), (&v2, &[AWSPENDING])])
    );

    // A retried put is a no-op; the same version id with another value is refused. (Not
    // checked on the AWSPENDING version: moto overwrites a pending version's value, AWS
    // refuses it.)
    store.put_secret_value(&name, &v2, &val2, &[AWSPENDING]).await.unwrap();
    let err = store
        .put_secret_value(&name, &v1, &val3, &[AWSCURRENT])
        .await
        .unwrap_err();
    assert!(matches!(err, SecretStoreError::Backend(_)), "{err}");
    assert!(!err.to_string().contains(val3.expose_secret()), "{err}");

    // A newer pending version takes the stage: a stage is on one version only.
    store.put_secret_value(&name, &v3, &val3, &[AWSPENDING]).await.unwrap();
    assert_eq!(
        listed(store, &name).await,
        stages(&[(&v1, &[AWSCURRENT]), (&v3, &[AWSPENDING])])
    );
}

async fn put_current_makes_the_old_version_previous(store: &dyn SecretStore) {
    let (name, v1, v2) = (secret_name(), version_id(), version_id());
    let (val1, val2) = (value(), value());
    store.create_secret(&name, &v1, &val1, &[]).await.unwrap();
    store.put_secret_value(&name, &v2, &val2, &[AWSCURRENT]).await.unwrap();
    assert_eq!(
        listed(store, &name).await,
        stages(&[(&v1, &[AWSPREVIOUS]), (&v2, &[AWSCURRENT])])
    );
    assert_eq!(
        current(store, &name, AWSCURRENT).await,
        (v2, val2.expose_secret().to_owned())
    );
    assert_eq!(
        current(store, &name, AWSPREVIOUS).await,
        (v1, val1.expose_secret().to_owned())
    );
}

async fn rotation_moves_stages_like_aws(store: &dyn SecretStore) {
    let name = secret_name();
    let (v1, val1) = (version_id(), value());
    store.create_secret(&name, &v1, &val1, &[]).await.unwrap();
    let mut old = (v1, val1);
    for _ in 0..2 {
        let (new_id, new_val) = (version_id(), value());
        store
            .put_secret_value(&name, &new_id, &new_val, &[AWSPENDING])
            .await
            .unwrap();
        store
            .update_version_stage(&name, AWSCURRENT, Some(&new_id), Some(&old.0))
            .await
            .unwrap();
        assert_eq!(
            listed(store, &name).await,
            stages(&[(&old.0, &[AWSPREVIOUS]), (&new_id, &[AWSCURRENT, AWSPENDING])])
        );
        store
            .update_version_stage(&name, AWSPENDING, None, Some(&new_id))
            .await
            .unwrap();
        // Exactly these two versions carry stages: the one before `old` lost AWSPREVIOUS.
        assert_eq!(
            listed(store, &name).await,
            stages(&[(&old.0, &[AWSPREVIOUS]), (&new_id, &[AWSCURRENT])])
        );
        assert_eq!(
            current(store, &name, AWSCURRENT).await,
            (new_id.clone(), new_val.expose_secret().to_owned())
        );
        assert_eq!(
            current(store, &name, AWSPREVIOUS).await,
            (old.0.clone(), old.1.expose_secret().to_owned())
        );
        assert!(store.get_secret_value(&name, AWSPENDING).await.unwrap().is_none());
        old = (new_id, new_val);
    }
}

async fn missing_secrets_and_stages_are_none(store: &dyn SecretStore) {
    let name = secret_name();
    assert!(store.get_secret_value(&name, AWSCURRENT).await.unwrap().is_none());
    assert!(store.list_version_stages(&name).await.unwrap().is_none());
    let err = store
        .put_secret_value(&name, &version_id(), &value(), &[AWSPENDING])
        .await
        .unwrap_err();
    assert!(matches!(err, SecretStoreError::NotFound(_)), "{err}");
    let err = store
        .update_version_stage(&name, AWSCURRENT, Some(&version_id()), None)
        .await
        .unwrap_err();
    assert!(matches!(err, SecretStoreError::NotFound(_)), "{err}");

    store.create_secret(&name, &version_id(), &value(), &[]).await.unwrap();
    assert!(store.get_secret_value(&name, AWSPENDING).await.unwrap().is_none());
    assert!(store.get_secret_value(&name, AWSPREVIOUS).await.unwrap().is_none());
}

async fn deleted_secrets_are_gone(store: &dyn SecretStore) {
    for force in [false, true] {
        let name = secret_name();
        store.create_secret(&name, &version_id(), &value(), &[]).await.unwrap();
        store.delete_secret(&name, force).await.unwrap();
        assert!(
            store.get_secret_value(&name, AWSCURRENT).await.unwrap().is_none(),
            "force={force}"
        );
        assert!(
            store.list_version_stages(&name).await.unwrap().is_none(),
            "force={force}"
        );
        // Deleting again, and deleting what never existed, are fine.
        store.delete_secret(&name, force).await.unwrap();
        store.delete_secret(&secret_name(), force).await.unwrap();
    }
}

/// A tenant deleted and created again under the same slug gets its secret again, though AWS
/// keeps a deleted secret's name for its recovery window.
async fn a_deleted_secret_is_created_again(store: &dyn SecretStore) {
    let name = secret_name();
    store.create_secret(&name, &version_id(), &value(), &[]).await.unwrap();
    store.delete_secret(&name, false).await.unwrap();
    let (again, again_version) = (value(), version_id());
    store
        .create_secret(&name, &again_version, &again, &[("silo:tenant", "again")])
        .await
        .unwrap();
    let current = store.get_secret_value(&name, AWSCURRENT).await.unwrap().unwrap();
    assert_eq!(current.value.expose_secret(), again.expose_secret());
    assert_eq!(current.version_id, again_version);
    // Creating it again is as idempotent as creating it.
    store.create_secret(&name, &again_version, &again, &[]).await.unwrap();
}

async fn malformed_version_ids_are_refused(store: &dyn SecretStore) {
    let name = secret_name();
    let err = store.create_secret(&name, "v1", &value(), &[]).await.unwrap_err();
    assert!(err.to_string().contains("32 to 64"), "{err}");
    assert!(store.list_version_stages(&name).await.unwrap().is_none());
}

/// Each suite function, as one test per backend: `secrets::local::NAME` and `secrets::aws::NAME`.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    let fixture = super::LocalFixture::new().await;
                    super::$test(fixture.store.as_ref()).await;
                }
            )*
        }
        mod aws {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    let store = super::aws_store().await;
                    super::$test(store.as_ref()).await;
                }
            )*
        }
    };
}

on_both_backends!(
    create_then_get_current,
    create_is_idempotent_by_version_id,
    put_pending_adds_a_staged_version,
    put_current_makes_the_old_version_previous,
    rotation_moves_stages_like_aws,
    missing_secrets_and_stages_are_none,
    deleted_secrets_are_gone,
    a_deleted_secret_is_created_again,
    malformed_version_ids_are_refused,
);

/// With `aws_kms_key_id`, every secret silo creates in Secrets Manager is encrypted under
/// that key, not the account's default one.
#[tokio::test(flavor = "multi_thread")]
async fn aws_secrets_are_created_under_the_configured_kms_key() {
    let key = "alias/silo-secrets";
    let store = aws_store_with_key(Some(key)).await;
    let (name, val) = (secret_name(), value());
    store.create_secret(&name, &version_id(), &val, &[]).await.unwrap();
    let described = MotoServer::shared()
        .await
        .secrets_manager()
        .await
        .describe_secret()
        .secret_id(&name)
        .send()
        .await
        .unwrap();
    assert_eq!(described.kms_key_id(), Some(key));
    assert_eq!(current(store.as_ref(), &name, AWSCURRENT).await.1, val.expose_secret());
}

// ---- fixtures ----

/// A local store (through `secrets::open`, as the control plane opens it) on a fresh catalog.
struct LocalFixture {
    store: Arc<dyn SecretStore>,
    pool: PgPool,
    key_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl LocalFixture {
    async fn new() -> Self {
        let pool = fresh_catalog().await;
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("master.key");
        create_master_key(&key_file).unwrap();
        let cfg = SecretsConfig {
            backend: SecretsBackend::Local {
                master_key_file: key_file.clone(),
                previous_master_key_files: Vec::new(),
            },
            name_prefix: "silo-test/".into(),
        };
        let store = secrets::open(&cfg, pool.clone()).await.unwrap();
        Self {
            store,
            pool,
            key_file,
            _dir: dir,
        }
    }
}

async fn fresh_catalog() -> PgPool {
    let pg = TestCluster::shared().await;
    let db = unique_name("cat");
    pg.create_database(&db).await.unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(pg.admin_options(&db))
        .await
        .unwrap();
    silo_control_plane::catalog::migrate(&pool).await.unwrap();
    pool
}

/// An AWS store on moto, opened through `secrets::open` with the default credential chain
/// (the environment `MotoServer` sets).
async fn aws_store() -> Arc<dyn SecretStore> {
    aws_store_with_key(None).await
}

/// An AWS store (through `secrets::open`) whose new secrets are encrypted under `kms_key_id`.
async fn aws_store_with_key(kms_key_id: Option<&str>) -> Arc<dyn SecretStore> {
    let moto = MotoServer::shared().await;
    let cfg = SecretsConfig {
        backend: SecretsBackend::Aws {
            region: REGION.into(),
            endpoint_url: Some(moto.endpoint_url()),
            recovery_window_days: 7,
            kms_key_id: kms_key_id.map(str::to_owned),
        },
        name_prefix: "silo-test/".into(),
    };
    secrets::open(
        &cfg,
        PgPoolOptions::new()
            .connect_lazy("postgres://unused@127.0.0.1:1/none")
            .unwrap(),
    )
    .await
    .unwrap()
}

fn write_key(dir: &Path, text: &str, mode: u32) -> PathBuf {
    let path = dir.join(format!("{}.key", unique_name("k")));
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

// ---- the local store's encryption at rest ----

#[tokio::test(flavor = "multi_thread")]
async fn local_ciphertext_does_not_contain_the_value() {
    let f = LocalFixture::new().await;
    let (name, secret) = (secret_name(), db_secret());
    f.store
        .create_secret(
            &name,
            &version_id(),
            &secret.to_secret_string(),
            &[("silo:tenant", "acme")],
        )
        .await
        .unwrap();
    let rows: Vec<(Vec<u8>, Vec<u8>)> = sqlx::query_as("SELECT nonce, ciphertext FROM secret_versions WHERE name = $1")
        .bind(&name)
        .fetch_all(&f.pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let (nonce, ciphertext) = &rows[0];
    assert_eq!(nonce.len(), 12);
    let password = secret.password.expose_secret().as_bytes();
    assert!(!ciphertext.windows(password.len()).any(|w| w == password));
    assert!(
        !ciphertext.windows(8).any(|w| w == b"postgres"),
        "the JSON is not in clear either"
    );
    // Nothing else in the catalog has it: dump both tables as text.
    let dump: String = sqlx::query_scalar(
        "SELECT string_agg(t::text, ' ') FROM (SELECT s::text AS t FROM secrets s \
         UNION ALL SELECT v::text FROM secret_versions v) x",
    )
    .fetch_one(&f.pool)
    .await
    .unwrap();
    assert!(!dump.contains(secret.password.expose_secret()));
}

#[tokio::test(flavor = "multi_thread")]
async fn local_wrong_master_key_cannot_decrypt() {
    let f = LocalFixture::new().await;
    let name = secret_name();
    f.store
        .create_secret(&name, &version_id(), &value(), &[])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let other_key = dir.path().join("other.key");
    create_master_key(&other_key).unwrap();
    let other = LocalSecretStore::open(&other_key, &[], f.pool.clone()).unwrap();
    let err = other.get_secret_value(&name, AWSCURRENT).await.unwrap_err();
    assert!(matches!(err, SecretStoreError::Decrypt(ref n) if *n == name), "{err}");
    // The right key still works.
    assert!(f.store.get_secret_value(&name, AWSCURRENT).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn local_master_key_file_is_checked() {
    let pool = PgPoolOptions::new()
        .connect_lazy("postgres://unused@127.0.0.1:1/none")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=\n";

    let path = write_key(dir.path(), good, 0o644);
    let err = LocalSecretStore::open(&path, &[], pool.clone())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("0644"),
        "{err}"
    );
    assert!(!err.contains(good.trim()), "{err}");

    let path = write_key(dir.path(), "c2hvcnQ=\n", 0o600);
    let err = LocalSecretStore::open(&path, &[], pool.clone())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("expected 32"),
        "{err}"
    );

    let path = write_key(dir.path(), "not base64 at all!\n", 0o600);
    let err = LocalSecretStore::open(&path, &[], pool.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not base64") && !err.contains("at all"), "{err}");

    let missing = dir.path().join("missing.key");
    let err = LocalSecretStore::open(&missing, &[], pool.clone())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("does not exist"),
        "{err}"
    );

    // `openssl rand -base64 32` output with mode 0600 is accepted; create_master_key writes
    // that format and never overwrites a key.
    LocalSecretStore::open(&write_key(dir.path(), good, 0o600), &[], pool.clone()).unwrap();
    create_master_key(&missing).unwrap();
    let mode = std::fs::metadata(&missing).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let first = std::fs::read(&missing).unwrap();
    create_master_key(&missing).unwrap();
    assert_eq!(std::fs::read(&missing).unwrap(), first);
    LocalSecretStore::open(&missing, &[], pool).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn local_ciphertexts_are_bound_to_their_secret_and_version() {
    let f = LocalFixture::new().await;
    let (a, b) = (secret_name(), secret_name());
    let (va, vb) = (version_id(), version_id());
    f.store.create_secret(&a, &va, &value(), &[]).await.unwrap();
    f.store.create_secret(&b, &vb, &value(), &[]).await.unwrap();
    // Copy b's ciphertext (and nonce) onto a: the AEAD refuses it.
    sqlx::query(
        "UPDATE secret_versions SET nonce = o.nonce, ciphertext = o.ciphertext \
         FROM secret_versions o WHERE secret_versions.name = $1 AND o.name = $2",
    )
    .bind(&a)
    .bind(&b)
    .execute(&f.pool)
    .await
    .unwrap();
    let err = f.store.get_secret_value(&a, AWSCURRENT).await.unwrap_err();
    assert!(matches!(err, SecretStoreError::Decrypt(_)), "{err}");
    assert!(f.store.get_secret_value(&b, AWSCURRENT).await.unwrap().is_some());

    // Same secret, another version: a rotation rolled back by copying rows fails too.
    let v2 = version_id();
    f.store
        .put_secret_value(&b, &v2, &value(), &[AWSPENDING])
        .await
        .unwrap();
    sqlx::query(
        "UPDATE secret_versions SET nonce = o.nonce, ciphertext = o.ciphertext FROM secret_versions o \
         WHERE secret_versions.name = $1 AND secret_versions.version_id = $2 AND o.name = $1 AND o.version_id = $3",
    )
    .bind(&b)
    .bind(&v2)
    .bind(&vb)
    .execute(&f.pool)
    .await
    .unwrap();
    let err = f.store.get_secret_value(&b, AWSPENDING).await.unwrap_err();
    assert!(matches!(err, SecretStoreError::Decrypt(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn local_debug_output_has_no_secrets() {
    let f = LocalFixture::new().await;
    let secret = db_secret();
    let password = secret.password.expose_secret().to_owned();
    assert!(!format!("{secret:?}").contains(&password));
    let name = secret_name();
    f.store
        .create_secret(&name, &version_id(), &secret.to_secret_string(), &[])
        .await
        .unwrap();
    let version = f.store.get_secret_value(&name, AWSCURRENT).await.unwrap().unwrap();
    assert!(!format!("{version:?}").contains(&password));

    let store = LocalSecretStore::open(&f.key_file, &[], f.pool.clone()).unwrap();
    let key = std::fs::read_to_string(&f.key_file).unwrap();
    let debug = format!("{store:?}");
    assert!(!debug.contains(key.trim()) && debug.contains("redacted"), "{debug}");
}

#[tokio::test(flavor = "multi_thread")]
async fn local_stage_moves_follow_aws_rules() {
    let f = LocalFixture::new().await;
    let (name, v1, v2, v3) = (secret_name(), version_id(), version_id(), version_id());
    f.store.create_secret(&name, &v1, &value(), &[]).await.unwrap();
    f.store
        .put_secret_value(&name, &v2, &value(), &[AWSPENDING])
        .await
        .unwrap();
    f.store.put_secret_value(&name, &v3, &value(), &[]).await.unwrap();
    // No stages means AWSCURRENT.
    assert_eq!(
        listed(f.store.as_ref(), &name).await,
        stages(&[(&v1, &[AWSPREVIOUS]), (&v2, &[AWSPENDING]), (&v3, &[AWSCURRENT])])
    );
    // A pending version cannot be overwritten either (AWS refuses it; moto does not).
    let err = f
        .store
        .put_secret_value(&name, &v2, &value(), &[AWSPENDING])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("different value"), "{err}");
    // A stage on another version must be removed from it explicitly, as on AWS.
    let err = f
        .store
        .update_version_stage(&name, AWSCURRENT, Some(&v2), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&v3), "{err}");
    let err = f
        .store
        .update_version_stage(&name, AWSCURRENT, Some(&v2), Some(&v1))
        .await
        .unwrap_err();
    assert!(matches!(err, SecretStoreError::Backend(_)), "{err}");
    // Rolling back: AWSCURRENT back onto the AWSPREVIOUS version.
    f.store
        .update_version_stage(&name, AWSCURRENT, Some(&v1), Some(&v3))
        .await
        .unwrap();
    assert_eq!(
        listed(f.store.as_ref(), &name).await,
        stages(&[(&v1, &[AWSCURRENT]), (&v2, &[AWSPENDING]), (&v3, &[AWSPREVIOUS])])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn local_concurrent_writers_keep_one_current() {
    let f = LocalFixture::new().await;
    let name = secret_name();
    f.store
        .create_secret(&name, &version_id(), &value(), &[])
        .await
        .unwrap();
    // Two "control planes" on the same catalog, each putting new current versions.
    let other: Arc<dyn SecretStore> = Arc::new(LocalSecretStore::open(&f.key_file, &[], f.pool.clone()).unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let store = if i % 2 == 0 { f.store.clone() } else { other.clone() };
        let name = name.clone();
        tasks.spawn(async move {
            store
                .put_secret_value(&name, &version_id(), &value(), &[AWSCURRENT])
                .await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let list = listed(f.store.as_ref(), &name).await;
    let count = |stage: &str| list.iter().filter(|v| v.stages.iter().any(|s| s == stage)).count();
    assert_eq!((count(AWSCURRENT), count(AWSPREVIOUS)), (1, 1), "{list:?}");
    assert_eq!(list.len(), 2, "{list:?}");
    // Unstaged versions are pruned to the newest ten.
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM secret_versions WHERE name = $1")
        .bind(&name)
        .fetch_one(&f.pool)
        .await
        .unwrap();
    assert_eq!(versions, 12);
}

/// Runs `silo-control-plane --config CONFIG rekey-secrets`: exit code, stdout, stderr.
fn rekey_secrets(config: &Path, catalog_password: &str) -> (Option<i32>, String, String) {
    silo_tests::run_control_plane(
        config,
        &["rekey-secrets"],
        &[("SILO_CATALOG_PASSWORD", catalog_password)],
    )
}

/// Master key rotation: with a new key current and the old one previous, every secret still
/// reads; `silo-control-plane rekey-secrets` re-encrypts them all under the new key, after
/// which the new key alone reads them and the old one opens none.
#[tokio::test(flavor = "multi_thread")]
async fn the_local_master_key_is_rotated_with_rekey_secrets() {
    let stack = silo_tests::stack::Stack::start(silo_tests::stack::StackOptions::default())
        .await
        .unwrap();
    let slug = unique_name("mk");
    stack.create_tenant(&slug).await.unwrap();
    let before = stack.credentials(&slug).await.unwrap();
    let dir = stack.dir();
    let (old_key, new_key) = (dir.join("master.key"), dir.join("new.key"));
    create_master_key(&new_key).unwrap();
    let config = std::fs::read_to_string(dir.join("silo.toml")).unwrap();
    assert!(config.contains("local_master_key_file = \"master.key\""), "{config}");
    let with_keys = |file: &str, previous: &str| {
        let path = dir.join(file);
        let keys = format!("local_master_key_file = \"new.key\"\nlocal_previous_master_key_files = [\"{previous}\"]");
        std::fs::write(&path, config.replace("local_master_key_file = \"master.key\"", &keys)).unwrap();
        path
    };
    let rotated = with_keys("rotated.toml", "master.key");
    let name = stack.secret_name(&slug);
    let read = |store: LocalSecretStore| {
        let name = name.clone();
        async move {
            let version = store.get_secret_value(&name, AWSCURRENT).await?;
            let value = version.expect("a current version").value;
            Ok::<_, SecretStoreError>(serde_json::from_str::<serde_json::Value>(value.expose_secret()).unwrap())
        }
    };
    let both = LocalSecretStore::open(&new_key, std::slice::from_ref(&old_key), stack.catalog().clone()).unwrap();
    assert_eq!(
        read(both).await.unwrap(),
        before,
        "the old key still decrypts in the meantime"
    );

    let password = stack.pg().password().expose_secret().to_owned();
    let (code, stdout, stderr) = rekey_secrets(&rotated, &password);
    assert_eq!(code, Some(0), "{stderr}");
    let reencrypted: usize = stdout.split_whitespace().next().unwrap().parse().unwrap();
    assert!(reencrypted >= 1, "{stdout}");
    assert!(stdout.contains("can now be removed"), "{stdout}");
    let (code, stdout, stderr) = rekey_secrets(&rotated, &password);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("0 secret versions re-encrypted"), "{stdout}");

    let only_new = LocalSecretStore::open(&new_key, &[], stack.catalog().clone()).unwrap();
    assert_eq!(read(only_new).await.unwrap(), before);
    let only_old = LocalSecretStore::open(&old_key, &[], stack.catalog().clone()).unwrap();
    assert!(matches!(read(only_old).await, Err(SecretStoreError::Decrypt(_))));

    // Usage problems: a missing previous key file, and a config without a local store.
    let missing = with_keys("missing.toml", "gone.key");
    let (code, _, stderr) = rekey_secrets(&missing, &password);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("gone.key") && stderr.lines().count() == 1, "{stderr}");
    let aws = dir.join("aws.toml");
    std::fs::write(
        &aws,
        "catalog_url = \"postgres://postgres@127.0.0.1:1/c\"\n[secrets]\nbackend = \"aws\"\naws_region = \"us-east-1\"\n",
    )
    .unwrap();
    let (code, _, stderr) = rekey_secrets(&aws, &password);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("secrets.backend"), "{stderr}");
    stack.stop().await.unwrap();
}
