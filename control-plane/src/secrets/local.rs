//! The embedded secret store: every version encrypted with AES-256-GCM under a local master key
//! file, kept in the catalog tables `secrets` / `secret_versions`, with the same version/stage
//! model as AWS Secrets Manager.
//!
//! Each version has its own random 96-bit nonce, and the associated data is
//! `name || 0x00 || version_id`, so a ciphertext copied onto another secret or version fails to
//! decrypt instead of yielding the wrong credentials. Writers lock the secret's `secrets` row
//! (`SELECT ... FOR UPDATE`) so concurrent control planes cannot interleave stage moves.
//!
//! Master key rotation: new versions are always encrypted under the current key
//! (`local_master_key_file`); the keys in `local_previous_master_key_files` still decrypt what
//! they encrypted (AES-GCM tells which key fits), until [`LocalSecretStore::rekey`]
//! (`silo-control-plane rekey-secrets`) has re-encrypted every version under the current key.

use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use async_trait::async_trait;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use sqlx::{PgPool, Postgres, Transaction};
use subtle::ConstantTimeEq;

use crate::keyfile::{self, KeyFileError};

use super::{check_version_id, SecretStore, SecretStoreError, SecretVersion, VersionStages, AWSCURRENT, AWSPREVIOUS};

/// Versions without stages kept per secret (older ones are deleted, as AWS deprecates them).
const KEEP_UNSTAGED_VERSIONS: usize = 10;
const NONCE_LEN: usize = 12;

/// Secrets encrypted at rest in the catalog under a local master key.
pub struct LocalSecretStore {
    pool: PgPool,
    /// The current key first (it encrypts), then the previous ones (they only decrypt).
    keys: Vec<keyfile::Key>,
    key_file: PathBuf,
}

impl std::fmt::Debug for LocalSecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSecretStore")
            .field("key_file", &self.key_file)
            .field("previous_keys", &(self.keys.len() - 1))
            .field("keys", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// What [`LocalSecretStore::rekey`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RekeyReport {
    /// Secrets looked at.
    pub secrets: usize,
    /// Versions re-encrypted under the current key.
    pub reencrypted: usize,
    /// Versions already under the current key.
    pub current: usize,
}

fn key_error(e: KeyFileError) -> SecretStoreError {
    SecretStoreError::MasterKey {
        path: e.path.display().to_string(),
        problem: e.problem,
    }
}

fn db_error(e: sqlx::Error) -> SecretStoreError {
    SecretStoreError::Backend(format!("catalog: {e}"))
}

/// Writes a new random master key (32 bytes, base64, mode 0600) to `path` unless a file is
/// already there; an existing file is left alone (and checked when the store opens it).
pub fn create_master_key(path: &Path) -> Result<(), SecretStoreError> {
    keyfile::create(path).map_err(key_error)
}

/// `name || 0x00 || version_id`: binds a ciphertext to its secret and version. Injective
/// because neither part can contain NUL (PostgreSQL text cannot; version ids are checked).
fn associated_data(name: &str, version_id: &str) -> Vec<u8> {
    [name.as_bytes(), &[0], version_id.as_bytes()].concat()
}

impl LocalSecretStore {
    /// Opens the store on the catalog `pool` with the master key in `key_file`, which must
    /// exist, hold 32 bytes in base64, and be readable by its owner only (mode 0600), and the
    /// `previous` key files (same rules), which only decrypt.
    pub fn open(key_file: &Path, previous: &[PathBuf], pool: PgPool) -> Result<Self, SecretStoreError> {
        Ok(Self {
            pool,
            keys: keyfile::load_all(key_file, previous).map_err(key_error)?,
            key_file: key_file.to_owned(),
        })
    }

    fn cipher(key: &keyfile::Key) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key.expose_secret()))
    }

    fn encrypt(
        &self,
        name: &str,
        version_id: &str,
        value: &SecretString,
    ) -> Result<(Vec<u8>, Vec<u8>), SecretStoreError> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let aad = associated_data(name, version_id);
        let payload = Payload {
            msg: value.expose_secret().as_bytes(),
            aad: &aad,
        };
        let ciphertext = Self::cipher(&self.keys[0])
            .encrypt(Nonce::from_slice(&nonce), payload)
            .map_err(|_| SecretStoreError::Backend(format!("secret {name:?}: encryption failed")))?;
        Ok((nonce.to_vec(), ciphertext))
    }

    fn decrypt(
        &self,
        name: &str,
        version_id: &str,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<SecretString, SecretStoreError> {
        self.decrypt_with_key(name, version_id, nonce, ciphertext)
            .map(|(value, _)| value)
    }

    /// The value, and which key decrypted it (0: the current one). AES-GCM authenticates:
    /// only the key a version was encrypted under opens it.
    fn decrypt_with_key(
        &self,
        name: &str,
        version_id: &str,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<(SecretString, usize), SecretStoreError> {
        if nonce.len() != NONCE_LEN {
            return Err(SecretStoreError::Decrypt(name.to_owned()));
        }
        let aad = associated_data(name, version_id);
        let payload = || Payload {
            msg: ciphertext,
            aad: &aad,
        };
        let (plain, index) = self
            .keys
            .iter()
            .enumerate()
            .find_map(|(index, key)| {
                let plain = Self::cipher(key).decrypt(Nonce::from_slice(nonce), payload()).ok()?;
                Some((Zeroizing::new(plain), index))
            })
            .ok_or_else(|| SecretStoreError::Decrypt(name.to_owned()))?;
        // An exact-size copy: converting the buffer itself could reallocate and leave a copy
        // that is never zeroed.
        let text = std::str::from_utf8(&plain).map_err(|_| SecretStoreError::Decrypt(name.to_owned()))?;
        Ok((SecretString::from(text.to_owned()), index))
    }

    /// Re-encrypts under the current master key every version a previous key encrypted, one
    /// secret at a time under its row lock (so it may run next to working control planes).
    /// Once it reports nothing left, the previous key files can be dropped from the config.
    pub async fn rekey(&self) -> Result<RekeyReport, SecretStoreError> {
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM secrets ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        let mut report = RekeyReport::default();
        for name in names {
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            if !Self::lock(&mut tx, &name).await? {
                continue;
            }
            report.secrets += 1;
            let versions: Vec<(String, Vec<u8>, Vec<u8>)> =
                sqlx::query_as("SELECT version_id, nonce, ciphertext FROM secret_versions WHERE name = $1")
                    .bind(&name)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db_error)?;
            for (version_id, nonce, ciphertext) in versions {
                let (value, key) = self.decrypt_with_key(&name, &version_id, &nonce, &ciphertext)?;
                if key == 0 {
                    report.current += 1;
                    continue;
                }
                let (nonce, ciphertext) = self.encrypt(&name, &version_id, &value)?;
                sqlx::query(
                    "UPDATE secret_versions SET nonce = $3, ciphertext = $4 WHERE name = $1 AND version_id = $2",
                )
                .bind(&name)
                .bind(&version_id)
                .bind(nonce)
                .bind(ciphertext)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
                report.reencrypted += 1;
            }
            tx.commit().await.map_err(db_error)?;
        }
        Ok(report)
    }

    /// Locks the secret's row for the rest of `tx`; false if there is no such secret.
    async fn lock(tx: &mut Transaction<'_, Postgres>, name: &str) -> Result<bool, SecretStoreError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT name FROM secrets WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut **tx)
            .await
            .map_err(db_error)?;
        Ok(row.is_some())
    }

    /// Checks an existing version against a repeated write: the same value is a no-op, a
    /// different one is refused (versions are immutable, as on AWS).
    async fn check_existing_version(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        name: &str,
        version_id: &str,
        value: &SecretString,
    ) -> Result<bool, SecretStoreError> {
        let row: Option<(Vec<u8>, Vec<u8>)> =
            sqlx::query_as("SELECT nonce, ciphertext FROM secret_versions WHERE name = $1 AND version_id = $2")
                .bind(name)
                .bind(version_id)
                .fetch_optional(&mut **tx)
                .await
                .map_err(db_error)?;
        let Some((nonce, ciphertext)) = row else {
            return Ok(false);
        };
        let stored = self.decrypt(name, version_id, &nonce, &ciphertext)?;
        if bool::from(
            stored
                .expose_secret()
                .as_bytes()
                .ct_eq(value.expose_secret().as_bytes()),
        ) {
            Ok(true)
        } else {
            Err(SecretStoreError::Backend(format!(
                "secret {name:?} already has a version {version_id:?} with a different value; versions cannot be modified"
            )))
        }
    }

    async fn insert_version(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        name: &str,
        version_id: &str,
        value: &SecretString,
        stages: &[String],
    ) -> Result<(), SecretStoreError> {
        let (nonce, ciphertext) = self.encrypt(name, version_id, value)?;
        sqlx::query(
            "INSERT INTO secret_versions (name, version_id, stages, nonce, ciphertext, created_at) \
             VALUES ($1, $2, $3, $4, $5, clock_timestamp())",
        )
        .bind(name)
        .bind(version_id)
        .bind(stages)
        .bind(nonce)
        .bind(ciphertext)
        .execute(&mut **tx)
        .await
        .map_err(db_error)?;
        Ok(())
    }
}

/// The stages of every version of one secret, oldest first, as read under the row lock.
/// Stage moves are computed here, then written back with [`StageMap::save`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct StageMap {
    versions: Vec<(String, Vec<String>)>,
}

impl StageMap {
    async fn load(tx: &mut Transaction<'_, Postgres>, name: &str) -> Result<Self, SecretStoreError> {
        let versions = sqlx::query_as(
            "SELECT version_id, stages FROM secret_versions WHERE name = $1 ORDER BY created_at, version_id",
        )
        .bind(name)
        .fetch_all(&mut **tx)
        .await
        .map_err(db_error)?;
        Ok(Self { versions })
    }

    fn index(&self, version_id: &str) -> Option<usize> {
        self.versions.iter().position(|(v, _)| v == version_id)
    }

    fn holder(&self, stage: &str) -> Option<usize> {
        self.versions.iter().position(|(_, s)| s.iter().any(|x| x == stage))
    }

    fn remove(&mut self, i: usize, stage: &str) {
        self.versions[i].1.retain(|s| s != stage);
    }

    fn add(&mut self, i: usize, stage: &str) {
        if !self.versions[i].1.iter().any(|s| s == stage) {
            self.versions[i].1.push(stage.to_owned());
        }
    }

    /// `stage` left version `from` for another one: if it is `AWSCURRENT`, `from` becomes
    /// the (only) `AWSPREVIOUS`.
    fn after_move(&mut self, stage: &str, from: Option<usize>) {
        if let (AWSCURRENT, Some(f)) = (stage, from) {
            for i in 0..self.versions.len() {
                self.remove(i, AWSPREVIOUS);
            }
            self.add(f, AWSPREVIOUS);
        }
    }

    /// Appends a new version carrying `stages`, taking each of them off the version that had it.
    fn push_version(&mut self, version_id: &str, stages: &[String]) {
        self.versions.push((version_id.to_owned(), Vec::new()));
        let new = self.versions.len() - 1;
        for stage in stages {
            let holder = self.holder(stage);
            if let Some(h) = holder {
                self.remove(h, stage);
            }
            self.add(new, stage);
            self.after_move(stage, holder);
        }
    }

    /// UpdateSecretVersionStage: like AWS, a stage attached to another version can only be
    /// moved when that version is named as `from`.
    fn move_stage(&mut self, stage: &str, to: Option<&str>, from: Option<&str>) -> Result<(), String> {
        let find = |v: &str| self.index(v).ok_or_else(|| format!("no version {v:?}"));
        let to = to.map(find).transpose()?;
        let from = from.map(find).transpose()?;
        let holder = self.holder(stage);
        if let Some(f) = from {
            if holder != Some(f) {
                return Err(format!("stage {stage} is not on version {:?}", self.versions[f].0));
            }
        }
        if to.is_some() && holder == to {
            return Ok(());
        }
        if let (Some(_), Some(h)) = (to, holder) {
            if from != Some(h) {
                return Err(format!(
                    "stage {stage} is on version {:?}: name it as the version to remove the stage from",
                    self.versions[h].0
                ));
            }
        }
        if let Some(f) = from {
            self.remove(f, stage);
        }
        if let Some(t) = to {
            self.add(t, stage);
            self.after_move(stage, from);
        }
        Ok(())
    }

    /// Unstaged versions beyond the newest [`KEEP_UNSTAGED_VERSIONS`].
    fn prunable(&self) -> Vec<String> {
        let unstaged: Vec<&String> = self
            .versions
            .iter()
            .filter(|(_, s)| s.is_empty())
            .map(|(v, _)| v)
            .collect();
        let excess = unstaged.len().saturating_sub(KEEP_UNSTAGED_VERSIONS);
        unstaged.into_iter().take(excess).cloned().collect()
    }

    /// Writes the stages that differ from `before` and prunes old unstaged versions.
    /// Versions not in `before` must already be inserted.
    async fn save(
        &self,
        before: &StageMap,
        tx: &mut Transaction<'_, Postgres>,
        name: &str,
    ) -> Result<(), SecretStoreError> {
        for (version_id, stages) in &self.versions {
            let old = before.versions.iter().find(|(v, _)| v == version_id).map(|(_, s)| s);
            if old.is_some_and(|old| old != stages) {
                sqlx::query("UPDATE secret_versions SET stages = $3 WHERE name = $1 AND version_id = $2")
                    .bind(name)
                    .bind(version_id)
                    .bind(stages)
                    .execute(&mut **tx)
                    .await
                    .map_err(db_error)?;
            }
        }
        let prune = self.prunable();
        if !prune.is_empty() {
            sqlx::query("DELETE FROM secret_versions WHERE name = $1 AND version_id = ANY($2)")
                .bind(name)
                .bind(&prune)
                .execute(&mut **tx)
                .await
                .map_err(db_error)?;
        }
        Ok(())
    }
}

#[async_trait]
impl SecretStore for LocalSecretStore {
    async fn create_secret(
        &self,
        name: &str,
        version_id: &str,
        value: &SecretString,
        tags: &[(&str, &str)],
    ) -> Result<(), SecretStoreError> {
        check_version_id(version_id)?;
        let tags: serde_json::Map<String, serde_json::Value> = tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
            .collect();
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let created = sqlx::query("INSERT INTO secrets (name, tags) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(sqlx::types::Json(&tags))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
            .rows_affected()
            == 1;
        Self::lock(&mut tx, name).await?;
        if !created {
            if self.check_existing_version(&mut tx, name, version_id, value).await? {
                return Ok(());
            }
            return Err(SecretStoreError::Backend(format!(
                "secret {name:?} already exists (without version {version_id:?})"
            )));
        }
        self.insert_version(&mut tx, name, version_id, value, &[AWSCURRENT.to_owned()])
            .await?;
        tx.commit().await.map_err(db_error)
    }

    async fn put_secret_value(
        &self,
        name: &str,
        version_id: &str,
        value: &SecretString,
        stages: &[&str],
    ) -> Result<(), SecretStoreError> {
        check_version_id(version_id)?;
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        if !Self::lock(&mut tx, name).await? {
            return Err(SecretStoreError::NotFound(name.to_owned()));
        }
        if self.check_existing_version(&mut tx, name, version_id, value).await? {
            return Ok(());
        }
        // As on AWS, a new version without explicit stages becomes AWSCURRENT.
        let mut wanted: Vec<String> = if stages.is_empty() {
            vec![AWSCURRENT.to_owned()]
        } else {
            Vec::new()
        };
        for s in stages {
            if !wanted.iter().any(|w| w == s) {
                wanted.push((*s).to_owned());
            }
        }
        let before = StageMap::load(&mut tx, name).await?;
        let mut after = before.clone();
        after.push_version(version_id, &wanted);
        let staged = after.versions.last().map(|(_, s)| s.clone()).unwrap_or_default();
        self.insert_version(&mut tx, name, version_id, value, &staged).await?;
        after.save(&before, &mut tx, name).await?;
        tx.commit().await.map_err(db_error)
    }

    async fn get_secret_value(&self, name: &str, stage: &str) -> Result<Option<SecretVersion>, SecretStoreError> {
        let row: Option<(String, Vec<String>, Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT version_id, stages, nonce, ciphertext FROM secret_versions \
             WHERE name = $1 AND $2 = ANY (stages)",
        )
        .bind(name)
        .bind(stage)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        let Some((version_id, stages, nonce, ciphertext)) = row else {
            return Ok(None);
        };
        let value = self.decrypt(name, &version_id, &nonce, &ciphertext)?;
        Ok(Some(SecretVersion {
            version_id,
            stages,
            value,
        }))
    }

    async fn list_version_stages(&self, name: &str) -> Result<Option<Vec<VersionStages>>, SecretStoreError> {
        let rows: Vec<(Option<String>, Option<Vec<String>>)> = sqlx::query_as(
            "SELECT v.version_id, v.stages FROM secrets s \
             LEFT JOIN secret_versions v ON v.name = s.name AND cardinality(v.stages) > 0 \
             WHERE s.name = $1 ORDER BY v.version_id",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            rows.into_iter()
                .filter_map(|(v, s)| {
                    Some(VersionStages {
                        version_id: v?,
                        stages: s?,
                    })
                })
                .collect(),
        ))
    }

    async fn update_version_stage(
        &self,
        name: &str,
        stage: &str,
        to_version: Option<&str>,
        from_version: Option<&str>,
    ) -> Result<(), SecretStoreError> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        if !Self::lock(&mut tx, name).await? {
            return Err(SecretStoreError::NotFound(name.to_owned()));
        }
        let before = StageMap::load(&mut tx, name).await?;
        let mut after = before.clone();
        after
            .move_stage(stage, to_version, from_version)
            .map_err(|problem| SecretStoreError::Backend(format!("secret {name:?}: {problem}")))?;
        after.save(&before, &mut tx, name).await?;
        tx.commit().await.map_err(db_error)
    }

    /// The local store has no recovery window: the secret and its versions are deleted now.
    async fn delete_secret(&self, name: &str, _force: bool) -> Result<(), SecretStoreError> {
        sqlx::query("DELETE FROM secrets WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(versions: &[(&str, &[&str])]) -> StageMap {
        StageMap {
            versions: versions
                .iter()
                .map(|(v, s)| ((*v).to_owned(), s.iter().map(|x| (*x).to_owned()).collect()))
                .collect(),
        }
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn putting_a_current_version_makes_the_old_one_previous() {
        let mut m = map(&[("a", &["AWSPREVIOUS"]), ("b", &["AWSCURRENT", "custom"])]);
        m.push_version("c", &strings(&["AWSCURRENT"]));
        assert_eq!(
            m,
            map(&[("a", &[]), ("b", &["custom", "AWSPREVIOUS"]), ("c", &["AWSCURRENT"])])
        );
    }

    #[test]
    fn putting_a_pending_version_takes_the_stage_from_the_old_pending() {
        let mut m = map(&[("a", &["AWSCURRENT"]), ("b", &["AWSPENDING"])]);
        m.push_version("c", &strings(&["AWSPENDING"]));
        assert_eq!(m, map(&[("a", &["AWSCURRENT"]), ("b", &[]), ("c", &["AWSPENDING"])]));
    }

    #[test]
    fn moving_current_needs_the_old_version_named() {
        let mut m = map(&[("a", &["AWSCURRENT"]), ("b", &["AWSPENDING"])]);
        assert!(m.move_stage("AWSCURRENT", Some("b"), None).is_err());
        assert!(m.move_stage("AWSCURRENT", Some("b"), Some("b")).is_err());
        assert!(m.move_stage("AWSCURRENT", Some("zz"), Some("a")).is_err());
        m.move_stage("AWSCURRENT", Some("b"), Some("a")).unwrap();
        assert_eq!(m, map(&[("a", &["AWSPREVIOUS"]), ("b", &["AWSPENDING", "AWSCURRENT"])]));
        m.move_stage("AWSPENDING", None, Some("b")).unwrap();
        assert_eq!(m, map(&[("a", &["AWSPREVIOUS"]), ("b", &["AWSCURRENT"])]));
        // Already there: nothing to do.
        m.move_stage("AWSCURRENT", Some("b"), None).unwrap();
        assert_eq!(m, map(&[("a", &["AWSPREVIOUS"]), ("b", &["AWSCURRENT"])]));
    }

    #[test]
    fn rolling_back_swaps_current_and_previous() {
        let mut m = map(&[("a", &["AWSPREVIOUS"]), ("b", &["AWSCURRENT"])]);
        m.move_stage("AWSCURRENT", Some("a"), Some("b")).unwrap();
        assert_eq!(m, map(&[("a", &["AWSCURRENT"]), ("b", &["AWSPREVIOUS"])]));
    }

    #[test]
    fn only_old_unstaged_versions_are_pruned() {
        let mut versions: Vec<(String, Vec<String>)> = (0..15).map(|i| (format!("v{i:02}"), Vec::new())).collect();
        versions[3].1.push("AWSPREVIOUS".into());
        let m = StageMap { versions };
        assert_eq!(m.prunable(), strings(&["v00", "v01", "v02", "v04"]));
    }

    #[test]
    fn associated_data_separates_name_and_version() {
        assert_ne!(associated_data("ab", "c"), associated_data("a", "bc"));
    }
}
