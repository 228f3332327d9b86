//! Backups of tenant databases: `backup` jobs, step `backup` of a `delete` job with
//! `backup=true`, and the copy a `move` job restores on the tenant's new server
//! (`crate::moves`); the listing of a tenant's backups and their retention
//! (`[backups] keep_last`).
//!
//! `pg_dump --format=custom` of the tenant's database, logged in as the tenant's own login
//! role acting as its owner role (`--role`), so the control plane's admin role needs no
//! right to read tenant data. The dump is written next to its final name and renamed once
//! `pg_dump` succeeded and the file is on disk: a file named `*.dump` is always complete.
//! The file name carries the job id, so a delete job resumed after a crash finds the backup
//! it already took instead of dumping a database it may already have dropped.
//!
//! With `[backups] encryption_key_file`, the dump is encrypted on its way to disk and
//! decrypted on its way into `pg_restore` ([`sealed`]); backups taken without a key (plain
//! `pg_dump` files) are still restored.
//!
//! With `[backups.s3]`, a backup is uploaded to the bucket before it gets its final name in
//! `[backups] dir`: a finished file there has its copy off the machine. Listing, restoring,
//! retention and erasure see both places: a backup only in the bucket (the machine and its
//! directory were lost) is downloaded when it is restored, and erasing one erases both
//! copies.
//!
//! The password reaches `pg_dump` (and `pg_restore`) in a password file (mode 0600, in a private directory
//! removed afterwards), never on its command line or in its environment; `pg_dump` runs
//! with an environment of its own (no inherited `PG*` variables).

pub mod freshness;
mod offline;
pub mod retention;
mod s3;
pub mod schedule;
pub mod sealed;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use secrecy::ExposeSecret;
use tokio::io::AsyncReadExt;

use crate::config::{BackupsConfig, ServerTls};
use crate::keyfile::{self, Key, KeyFileError};
use crate::names::TenantSlug;
use crate::secrets::DbSecret;

pub use self::offline::{Decrypted, RekeyReport};
pub use self::s3::NoRegion;
use self::sealed::{Format, Header, SealError};

/// Why a backup could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// `[backups] dir` is not set.
    #[error("backups are not configured: set [backups] dir in the config file")]
    NotConfigured,
    /// No `pg_dump` (or `pg_restore`) to run.
    #[error("{0} not found: install the PostgreSQL client (postgresql-client) or set [backups] pg_dump")]
    NoTool(String),
    /// A file or directory of the backup could not be written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// `pg_dump` or `pg_restore` failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// Which.
        tool: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The last lines it wrote to stderr.
        stderr: String,
    },
    /// An encrypted backup could not be written or read back.
    #[error("backup {}: {source}", path.display())]
    Sealed {
        /// The backup file.
        path: PathBuf,
        /// What went wrong.
        source: SealError,
    },
    /// Encrypting needs `[backups] encryption_key_file`.
    #[error("backups are not encrypted: set [backups] encryption_key_file in the config file")]
    NotEncrypting,
    /// Only an encrypted backup can be decrypted.
    #[error("backup {}: not encrypted (it is a pg_dump custom-format file already)", .0.display())]
    NotSealed(PathBuf),
    /// The backup is neither encrypted by silo nor a `pg_dump` file.
    #[error("backup {}: not a backup silo took (neither encrypted by silo nor a pg_dump custom-format file)", .0.display())]
    UnknownFormat(PathBuf),
    /// The backup is only in the bucket, in an archive storage class (a lifecycle rule moved
    /// it to Glacier Flexible Retrieval or Deep Archive): S3 hands it out only once a copy was
    /// restored, which no retry brings about.
    #[error(
        "s3://{bucket}/{key} is archived (an S3 lifecycle rule moved it to Glacier): restore a copy with \
         `aws s3api restore-object --bucket {bucket} --key {key} --restore-request Days=7`, \
         then run the job again once it is readable (minutes to hours)"
    )]
    Archived {
        /// The bucket.
        bucket: String,
        /// The object's key.
        key: String,
    },
    /// The `[backups.s3]` bucket failed or could not be reached.
    #[error("{what} {url}: {detail}")]
    S3 {
        /// What was being done.
        what: &'static str,
        /// The object or bucket, as `s3://bucket/key`.
        url: String,
        /// What S3 (or the connection to it) said.
        detail: String,
    },
}

impl BackupError {
    /// Whether the same operation may succeed later with nobody changing anything: only an
    /// S3 call is retried (the bucket unreachable, throttling, a server error).
    pub fn is_transient(&self) -> bool {
        matches!(self, BackupError::S3 { .. })
    }
}

/// Why backups could not be set up as the config says.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// An encryption key file is unusable.
    #[error("config key `backups.encryption_key_file`: {0}")]
    Key(KeyFileError),
    /// `[backups.s3]` has no region to sign its requests for.
    #[error("config key `backups.s3.region`: {0}")]
    Region(NoRegion),
}

fn io<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> BackupError + 'p {
    move |source| BackupError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A finished backup of a tenant, as `GET /v1/tenants/{slug}/backups` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackupFile {
    /// The file name, as `siloctl tenant create --restore-from` takes it.
    pub file: String,
    /// Its size.
    pub bytes: u64,
    /// When it was finished (the file's modification time).
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The job that took it.
    pub job: Option<i64>,
    /// Whether it is encrypted (taken with `[backups] encryption_key_file`); None when only
    /// an archived copy in the bucket holds it, which cannot be read to tell.
    pub encrypted: Option<bool>,
    /// Whether it is in `[backups] dir`.
    pub local: bool,
    /// Whether it is in the `[backups.s3]` bucket.
    pub s3: bool,
    /// Whether the bucket's copy is archived (Glacier, Deep Archive): a restore from it
    /// needs `aws s3api restore-object` first.
    pub archived: bool,
}

/// Takes tenant backups into the configured directory.
#[derive(Clone)]
pub struct Backups {
    config: BackupsConfig,
    /// The current encryption key, then the previous ones; none: backups are not encrypted.
    keys: Arc<Vec<Key>>,
    /// `[backups.s3]`.
    s3: Option<s3::Bucket>,
}

impl std::fmt::Debug for Backups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backups")
            .field("config", &self.config)
            .field("keys", &self.keys.len())
            .field("s3", &self.s3)
            .finish()
    }
}

impl Backups {
    /// Backups as `config` says, with its encryption keys read and its bucket's client made
    /// (taking one fails with [`BackupError::NotConfigured`] when it sets no directory).
    pub async fn open(config: BackupsConfig) -> Result<Self, OpenError> {
        let keys = match &config.encryption_key_file {
            Some(current) => {
                keyfile::load_all(current, &config.previous_encryption_key_files).map_err(OpenError::Key)?
            }
            None => Vec::new(),
        };
        let s3 = match &config.s3 {
            Some(bucket) => Some(s3::Bucket::new(bucket).await.map_err(OpenError::Region)?),
            None => None,
        };
        Ok(Self {
            config,
            keys: Arc::new(keys),
            s3,
        })
    }

    /// No backups: every operation fails with [`BackupError::NotConfigured`].
    pub fn off() -> Self {
        Self {
            config: BackupsConfig::default(),
            keys: Arc::new(Vec::new()),
            s3: None,
        }
    }

    /// Whether the `[backups.s3]` bucket (if any) answers: checked at start, so that a wrong
    /// bucket or missing permission is seen before the first backup.
    pub async fn check_s3(&self) -> Result<(), BackupError> {
        match &self.s3 {
            Some(bucket) => bucket.check().await,
            None => Ok(()),
        }
    }

    /// Whether new backups are encrypted.
    pub fn encrypted(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The backup job `job_id` already took of `slug`'s database, if it took one.
    pub fn taken(&self, slug: &TenantSlug, job_id: i64) -> Result<Option<PathBuf>, BackupError> {
        let dir = self.tenant_dir(slug)?;
        if !dir.is_dir() {
            return Ok(None);
        }
        find_file_ending(&dir, &job_suffix(job_id))
    }

    /// The local copy of the backup of `slug` named `name` (a file name as `take` makes them,
    /// e.g. from a job's progress), if `[backups] dir` has it. Only `slug`'s own backups are
    /// found: a tenant is never restored from another tenant's data.
    fn local(&self, slug: &TenantSlug, name: &str) -> Result<Option<PathBuf>, BackupError> {
        if !is_file_name(name) {
            return Ok(None);
        }
        let path = self.tenant_dir(slug)?.join(name);
        Ok(path.is_file().then_some(path))
    }

    /// Whether `slug` has a backup named `name`, in `[backups] dir` or in the bucket.
    pub async fn exists(&self, slug: &TenantSlug, name: &str) -> Result<bool, BackupError> {
        if self.local(slug, name)?.is_some() {
            return Ok(true);
        }
        match &self.s3 {
            Some(bucket) if is_file_name(name) => Ok(bucket.uploaded_at(slug, name).await?.is_some()),
            _ => Ok(false),
        }
    }

    /// The backup of `slug` named `name`, on disk: the copy in `[backups] dir`, else the
    /// bucket's, downloaded there first (with the time it was uploaded, which orders
    /// backups). None when neither has it.
    pub async fn fetch(&self, slug: &TenantSlug, name: &str) -> Result<Option<PathBuf>, BackupError> {
        if let Some(path) = self.local(slug, name)? {
            return Ok(Some(path));
        }
        let Some(bucket) = self.s3.as_ref().filter(|_| is_file_name(name)) else {
            return Ok(None);
        };
        let Some(uploaded_at) = bucket.uploaded_at(slug, name).await? else {
            return Ok(None);
        };
        let dir = self.tenant_dir(slug)?;
        create_private_dir(&dir)?;
        // A name of its own: two downloads of the same backup never write into one file.
        let partial = dir.join(format!(".{name}.{}.partial", uuid::Uuid::new_v4().simple()));
        let path = dir.join(name);
        let downloaded = async {
            bucket.download(slug, name, &partial).await?;
            std::fs::File::options()
                .write(true)
                .open(&partial)
                .and_then(|file| file.set_modified(uploaded_at.into()))
                .map_err(io("write", &partial))?;
            std::fs::rename(&partial, &path).map_err(io("rename the downloaded backup to", &path))?;
            sync_file(&dir)
        }
        .await;
        if let Err(e) = downloaded {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        tracing::info!(tenant = %slug, file = name, "backup downloaded from [backups.s3]");
        Ok(Some(path))
    }

    /// Erases the backup of `slug` named `name`: its copy in the bucket first, then the one in
    /// `[backups] dir`. False when there is none.
    pub async fn remove(&self, slug: &TenantSlug, name: &str) -> Result<bool, BackupError> {
        if !self.exists(slug, name).await? {
            return Ok(false);
        }
        if let Some(bucket) = &self.s3 {
            bucket.remove(slug, name).await?;
        }
        if let Some(path) = self.local(slug, name)? {
            std::fs::remove_file(&path).map_err(io("remove", &path))?;
            sync_file(&self.tenant_dir(slug)?)?;
        }
        Ok(true)
    }

    /// Whether `[backups] dir` is set.
    pub fn configured(&self) -> bool {
        self.config.dir.is_some()
    }

    /// When `slug`'s newest finished backup in `[backups] dir` was finished; None when it has
    /// none. (With `[backups.s3]`, a file there has its copy in the bucket.)
    pub fn newest(&self, slug: &TenantSlug) -> Result<Option<std::time::SystemTime>, BackupError> {
        let dir = self.tenant_dir(slug)?;
        if !dir.is_dir() {
            return Ok(None);
        }
        let mut newest = None;
        for entry in std::fs::read_dir(&dir).map_err(io("list", &dir))? {
            let entry = entry.map_err(io("list", &dir))?;
            if !entry.file_name().to_str().is_some_and(is_backup_name) {
                continue;
            }
            let path = entry.path();
            let modified = entry
                .metadata()
                .and_then(|meta| meta.modified())
                .map_err(io("read", &path))?;
            newest = newest.max(Some(modified));
        }
        Ok(newest)
    }

    /// `slug`'s finished backups, in `[backups] dir` and in the bucket, newest first; none
    /// when it never had one.
    pub async fn list(&self, slug: &TenantSlug) -> Result<Vec<BackupFile>, BackupError> {
        let mut files = self.list_local(slug)?;
        if let Some(bucket) = &self.s3 {
            for object in bucket.list(slug).await? {
                if let Some(local) = files.iter_mut().find(|file| file.file == object.file) {
                    local.s3 = true;
                    local.archived = object.archived;
                    continue;
                }
                let encrypted = if object.archived {
                    None
                } else {
                    Some(bucket.format_of(slug, &object.file).await? == Format::Sealed)
                };
                files.push(BackupFile {
                    job: job_of(&object.file),
                    file: object.file,
                    bytes: object.bytes,
                    created_at: object.uploaded_at,
                    encrypted,
                    local: false,
                    s3: true,
                    archived: object.archived,
                });
            }
        }
        files.sort_by_key(|b| std::cmp::Reverse((b.created_at, b.job)));
        Ok(files)
    }

    /// `slug`'s newest finished backup, in `[backups] dir` or in the bucket.
    pub async fn latest(&self, slug: &TenantSlug) -> Result<Option<BackupFile>, BackupError> {
        Ok(self.list(slug).await?.into_iter().next())
    }

    /// `slug`'s finished backups in `[backups] dir`, in no order.
    fn list_local(&self, slug: &TenantSlug) -> Result<Vec<BackupFile>, BackupError> {
        let dir = self.tenant_dir(slug)?;
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io("list", &dir))? {
            let entry = entry.map_err(io("list", &dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !is_backup_name(&name) {
                continue;
            }
            let path = entry.path();
            let meta = entry.metadata().map_err(io("read", &path))?;
            let modified = meta.modified().map_err(io("read", &path))?;
            let format = sealed::format_of_file(&path).map_err(io("read", &path))?;
            files.push(BackupFile {
                job: job_of(&name),
                file: name,
                bytes: meta.len(),
                created_at: modified.into(),
                encrypted: Some(format == Format::Sealed),
                local: true,
                s3: false,
                archived: false,
            });
        }
        Ok(files)
    }

    /// The tenants with backups in `[backups] dir` or in the bucket, deleted ones included,
    /// in slug order.
    pub async fn tenants(&self) -> Result<Vec<TenantSlug>, BackupError> {
        let mut slugs = self.local_tenants()?;
        if let Some(bucket) = &self.s3 {
            slugs.extend(bucket.tenants().await?);
        }
        slugs.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        slugs.dedup();
        Ok(slugs)
    }

    /// The tenants with a directory in `[backups] dir`, in slug order. Directories whose names
    /// are not slugs are not silo's and are left out.
    fn local_tenants(&self) -> Result<Vec<TenantSlug>, BackupError> {
        let root = self.config.dir.as_deref().ok_or(BackupError::NotConfigured)?;
        if !root.is_dir() {
            return Ok(Vec::new());
        }
        let mut slugs = Vec::new();
        for entry in std::fs::read_dir(root).map_err(io("list", root))? {
            let path = entry.map_err(io("list", root))?.path();
            let slug = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| TenantSlug::parse(name).ok());
            if let Some(slug) = slug.filter(|_| path.is_dir()) {
                slugs.push(slug);
            }
        }
        slugs.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(slugs)
    }

    /// The `[backups]` section.
    pub fn config(&self) -> &BackupsConfig {
        &self.config
    }

    /// `slug`'s backups finished before `cutoff`, oldest first, except its newest backup when
    /// the tenant still `exists`: a tenant whose backups stopped keeps its last one.
    pub async fn expired(
        &self,
        slug: &TenantSlug,
        cutoff: chrono::DateTime<chrono::Utc>,
        exists: bool,
    ) -> Result<Vec<BackupFile>, BackupError> {
        let newest_first = self.list(slug).await?;
        let keep = usize::from(exists);
        let mut expired: Vec<BackupFile> = newest_first
            .into_iter()
            .skip(keep)
            .filter(|backup| backup.created_at < cutoff)
            .collect();
        expired.reverse();
        Ok(expired)
    }

    /// `slug`'s backups beyond its newest `keep`, newest first, except `spare` (one being
    /// restored).
    pub async fn beyond_keep_last(
        &self,
        slug: &TenantSlug,
        keep: usize,
        spare: Option<&Path>,
    ) -> Result<Vec<BackupFile>, BackupError> {
        let spared = spare.and_then(Path::file_name);
        let mut beyond: Vec<BackupFile> = self.list(slug).await?.into_iter().skip(keep).collect();
        beyond.retain(|old| spared.is_none_or(|name| name != old.file.as_str()));
        Ok(beyond)
    }

    /// Removes the backup job `job_id` took of `slug`, if it took one: a move that was undone
    /// must not restore it later, the tenant having been written to since.
    pub async fn discard(&self, slug: &TenantSlug, job_id: i64) -> Result<(), BackupError> {
        if let Some(file) = self.taken(slug, job_id)? {
            let name = file.file_name().and_then(|name| name.to_str()).unwrap_or_default();
            self.remove(slug, name).await?;
        }
        Ok(())
    }

    /// A new backup of `slug`'s database for job `job_id`, logged in with `secret` (the
    /// tenant's current login) over `tls`, acting as the tenant's owner role `owner_role`.
    pub async fn take(
        &self,
        slug: &TenantSlug,
        owner_role: &str,
        job_id: i64,
        secret: &DbSecret,
        tls: &ServerTls,
    ) -> Result<PathBuf, BackupError> {
        let dir = self.tenant_dir(slug)?;
        create_private_dir(&dir)?;
        remove_leftovers(&dir)?;
        let suffix = job_suffix(job_id);
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
        let file = dir.join(format!("{slug}-{stamp}{suffix}"));
        let partial = dir.join(format!(".{slug}-{stamp}{suffix}.partial"));
        let mut args = vec!["--format=custom".to_owned(), format!("--role={owner_role}")];
        let pipe = match self.keys.first() {
            Some(key) => Pipe::Seal {
                key,
                slug,
                to: &partial,
            },
            None => {
                args.push(format!("--file={}", partial.display()));
                Pipe::None
            }
        };
        let dumped = self.run_client("pg_dump", &dir, secret, tls, &args, pipe).await;
        if let Err(e) = dumped {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        sync_file(&partial)?;
        if let Some(bucket) = &self.s3 {
            // Named as finished only once its copy is off the machine; a failed upload leaves
            // a partial file, removed when the job runs again.
            let name = file.file_name().and_then(|name| name.to_str()).unwrap_or_default();
            bucket.upload(slug, name, &partial).await?;
        }
        std::fs::rename(&partial, &file).map_err(io("rename the finished backup to", &file))?;
        sync_file(&dir)?;
        Ok(file)
    }

    /// Restores backup `file` of `slug` into the empty database `secret` names, logged in with
    /// `secret` over `tls` and acting as the tenant's owner role `owner_role`, so that what it
    /// creates belongs to that role whatever owned it where the backup was taken. One
    /// transaction: the database gets all of the backup or, on any error, none of it.
    pub async fn restore(
        &self,
        slug: &TenantSlug,
        owner_role: &str,
        file: &Path,
        secret: &DbSecret,
        tls: &ServerTls,
    ) -> Result<(), BackupError> {
        let dir = self.tenant_dir(slug)?;
        remove_leftovers(&dir)?;
        let mut args = vec![
            "--exit-on-error".to_owned(),
            "--single-transaction".to_owned(),
            "--no-owner".to_owned(),
            format!("--role={owner_role}"),
        ];
        let pipe = match sealed::format_of_file(file).map_err(io("read", file))? {
            Format::Sealed => {
                let mut input = tokio::fs::File::open(file).await.map_err(io("read", file))?;
                let header = Header::read(&mut input).await.map_err(sealed_error(file))?;
                header.check_tenant(slug.as_str()).map_err(sealed_error(file))?;
                Pipe::Open {
                    keys: &self.keys,
                    header,
                    from: input,
                    path: file,
                }
            }
            Format::Plain => {
                args.push(file.display().to_string());
                Pipe::None
            }
            Format::Unknown => return Err(BackupError::UnknownFormat(file.to_owned())),
        };
        self.run_client("pg_restore", &dir, secret, tls, &args, pipe).await
    }

    /// Copies the schema of the database `from` logs in to, without its rows, into the empty
    /// database `to` logs in to (an online move's target), acting as the tenant's owner role
    /// `owner_role` on both; one transaction on `to`. The dump lives in a work directory of
    /// the tenant's backup directory until the copy is done.
    pub async fn copy_schema(
        &self,
        slug: &TenantSlug,
        owner_role: &str,
        (from, from_tls): (&DbSecret, &ServerTls),
        (to, to_tls): (&DbSecret, &ServerTls),
    ) -> Result<(), BackupError> {
        let dir = self.tenant_dir(slug)?;
        create_private_dir(&dir)?;
        remove_leftovers(&dir)?;
        let work = tempfile::Builder::new()
            .prefix(".work-")
            .tempdir_in(&dir)
            .map_err(io("create a work directory in", &dir))?;
        let file = work.path().join("schema.dump").display().to_string();
        let role = format!("--role={owner_role}");
        let dump = [
            "--format=custom".to_owned(),
            "--schema-only".to_owned(),
            "--no-publications".to_owned(),
            "--no-subscriptions".to_owned(),
            role.clone(),
            format!("--file={file}"),
        ];
        self.run_client("pg_dump", &dir, from, from_tls, &dump, Pipe::None)
            .await?;
        let restore = [
            "--exit-on-error".to_owned(),
            "--single-transaction".to_owned(),
            "--no-owner".to_owned(),
            role,
            file,
        ];
        self.run_client("pg_restore", &dir, to, to_tls, &restore, Pipe::None)
            .await
    }

    /// Runs PostgreSQL client `name` with `args`, logged in with `secret` over `tls`, its
    /// standard output or input connected as `pipe` says. The password and CA go in files of
    /// a private work directory made in `work_parent` (removed afterwards); the tool gets an
    /// environment of its own.
    async fn run_client(
        &self,
        name: &str,
        work_parent: &Path,
        secret: &DbSecret,
        tls: &ServerTls,
        args: &[String],
        pipe: Pipe<'_>,
    ) -> Result<(), BackupError> {
        let tool = self.tool(name)?;
        let work = tempfile::Builder::new()
            .prefix(".work-")
            .tempdir_in(work_parent)
            .map_err(io("create a work directory in", work_parent))?;
        let mut command = tokio::process::Command::new(&tool);
        command
            .env_clear()
            .env(
                "PGPASSFILE",
                write_private(work.path(), "pgpass", pgpass_line(secret).as_bytes())?,
            )
            .env("PGSSLMODE", tls.mode_name())
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGAPPNAME", "silo-backup");
        if let Some(pem) = tls.root_cert_pem() {
            command.env("PGSSLROOTCERT", write_private(work.path(), "root.crt", pem)?);
        }
        let (stdin, stdout) = match pipe {
            Pipe::None => (Stdio::null(), Stdio::null()),
            Pipe::Seal { .. } => (Stdio::null(), Stdio::piped()),
            Pipe::Open { .. } => (Stdio::piped(), Stdio::null()),
        };
        let mut child = command
            .arg("--no-password")
            .arg(format!("--host={}", secret.host))
            .arg(format!("--port={}", secret.port))
            .arg(format!("--username={}", secret.username))
            .arg(format!("--dbname={}", secret.dbname))
            .args(args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(io("run", &tool))?;
        let stderr = child.stderr.take();
        let stderr = tokio::spawn(async move {
            let mut text = Vec::new();
            if let Some(mut stderr) = stderr {
                // What the tool managed to write is reported whatever the rest was.
                let _ = stderr.read_to_end(&mut text).await;
            }
            text
        });
        let pumped = pump(&mut child, pipe).await;
        if pumped.is_err() {
            // A restore fed a corrupted chunk must not commit what it was given before it:
            // it is killed before `wait` closes its input.
            let _ = child.start_kill();
        }
        let status = child.wait().await.map_err(io("run", &tool))?;
        let stderr = stderr.await.unwrap_or_default();
        drop(work);
        match pumped {
            // The tool's own failure (it stopped reading or writing) explains a broken pipe.
            Err(Pumped::ToolSide(_)) if !status.success() => {}
            Err(Pumped::ToolSide(e) | Pumped::OurSide(e)) => return Err(e),
            Ok(()) => {}
        }
        if status.success() {
            Ok(())
        } else {
            Err(BackupError::Tool {
                tool: name.to_owned(),
                status,
                stderr: tool_message(&stderr),
            })
        }
    }

    /// The directory of `slug`'s backups.
    fn tenant_dir(&self, slug: &TenantSlug) -> Result<PathBuf, BackupError> {
        let root = self.config.dir.as_deref().ok_or(BackupError::NotConfigured)?;
        Ok(root.join(slug.as_str()))
    }

    /// PostgreSQL client `name` (`pg_dump`, `pg_restore`): the configured `pg_dump` (and the
    /// `pg_restore` next to it), else next to the PostgreSQL server binaries, else the first
    /// on `PATH`.
    fn tool(&self, name: &str) -> Result<PathBuf, BackupError> {
        if let Some(pg_dump) = &self.config.pg_dump {
            return Ok(if name == "pg_dump" {
                pg_dump.clone()
            } else {
                pg_dump.with_file_name(name)
            });
        }
        if let Ok(bindir) = crate::localpg::find_bindir() {
            let path = bindir.join(name);
            if path.is_file() {
                return Ok(path);
            }
        }
        let on_path = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|path| path.is_file())
        });
        on_path.ok_or_else(|| BackupError::NoTool(name.to_owned()))
    }
}

/// How a client tool's standard output or input is connected.
enum Pipe<'a> {
    /// Not at all: the tool reads or writes the backup file itself.
    None,
    /// Its output (a dump) is encrypted under `key` into `to`, a backup of `slug`.
    Seal {
        key: &'a Key,
        slug: &'a TenantSlug,
        to: &'a Path,
    },
    /// Its input is the encrypted backup `path`, whose `header` was read from `from`,
    /// decrypted with one of `keys`.
    Open {
        keys: &'a [Key],
        header: Header,
        from: tokio::fs::File,
        path: &'a Path,
    },
}

/// Why a pipe between a client tool and a backup file failed: on the tool's side (it stopped
/// writing or reading, which its exit status explains better) or on the file's.
enum Pumped {
    ToolSide(BackupError),
    OurSide(BackupError),
}

/// Moves the bytes `pipe` says between `child` and the backup file, until the end of the
/// dump or of the backup.
async fn pump(child: &mut tokio::process::Child, pipe: Pipe<'_>) -> Result<(), Pumped> {
    match pipe {
        Pipe::None => Ok(()),
        Pipe::Seal { key, slug, to } => {
            let Some(dump) = child.stdout.as_mut() else {
                return Ok(());
            };
            let mut file = tokio::fs::File::create(to)
                .await
                .map_err(|e| Pumped::OurSide(io("write", to)(e)))?;
            match sealed::seal(key, slug.as_str(), dump, &mut file).await {
                Ok(_) => file.sync_all().await.map_err(|e| Pumped::OurSide(io("write", to)(e))),
                Err(e @ SealError::Read(_)) => Err(Pumped::ToolSide(sealed_error(to)(e))),
                Err(e) => Err(Pumped::OurSide(sealed_error(to)(e))),
            }
        }
        Pipe::Open {
            keys,
            header,
            mut from,
            path,
        } => {
            // The input stays open until the caller has killed a tool fed a corrupted chunk:
            // `wait` closes it, and only then does the tool see the end of the backup.
            let Some(restore) = child.stdin.as_mut() else {
                return Ok(());
            };
            match sealed::open(keys, &header, &mut from, restore).await {
                Ok(_) => Ok(()),
                Err(e @ SealError::Write(_)) => Err(Pumped::ToolSide(sealed_error(path)(e))),
                Err(e) => Err(Pumped::OurSide(sealed_error(path)(e))),
            }
        }
    }
}

fn sealed_error(path: &Path) -> impl FnOnce(SealError) -> BackupError + '_ {
    move |source| BackupError::Sealed {
        path: path.to_owned(),
        source,
    }
}

/// Whether `name` is a finished backup's (not a partial dump or a work directory).
fn is_backup_name(name: &str) -> bool {
    !name.starts_with('.') && name.ends_with(".dump")
}

/// Whether `name` can only be a finished backup's file name in a tenant's directory (no
/// path, nothing hidden).
fn is_file_name(name: &str) -> bool {
    is_backup_name(name) && !name.contains(['/', '\\', '\0'])
}

/// The end of the name of job `job_id`'s backup file.
fn job_suffix(job_id: i64) -> String {
    format!("-job{job_id}.dump")
}

/// The id of the job that took backup `name`, from its `-job{id}.dump` ending.
fn job_of(name: &str) -> Option<i64> {
    let rest = name.strip_suffix(".dump")?;
    let (_, id) = rest.rsplit_once("-job")?;
    id.parse().ok()
}

/// Creates `dir` (and its parents) if missing; a new directory is readable by its owner only.
fn create_private_dir(dir: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("create the backup directory", dir))
}

/// Removes what an interrupted backup of the tenant left in `dir`: partial dumps and work
/// directories (which hold a password file). One job at a time works on a tenant.
fn remove_leftovers(dir: &Path) -> Result<(), BackupError> {
    for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
        let path = entry.map_err(io("list", dir))?.path();
        let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
        if name.starts_with(".work-") {
            std::fs::remove_dir_all(&path).map_err(io("remove", &path))?;
        } else if name.starts_with('.') && name.ends_with(".partial") {
            std::fs::remove_file(&path).map_err(io("remove", &path))?;
        }
    }
    Ok(())
}

/// The file in `dir` whose name ends with `suffix`, if any.
fn find_file_ending(dir: &Path, suffix: &str) -> Result<Option<PathBuf>, BackupError> {
    for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
        let entry = entry.map_err(io("list", dir))?;
        let name = entry.file_name();
        if name
            .to_str()
            .is_some_and(|name| name.ends_with(suffix) && !name.starts_with('.'))
        {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

/// Writes `contents` to `dir/name`, readable by its owner only; returns the path.
fn write_private(dir: &Path, name: &str, contents: &[u8]) -> Result<PathBuf, BackupError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut file| file.write_all(contents))
        .map_err(io("write", &path))?;
    Ok(path)
}

/// The password-file line for `secret`: `host:port:database:user:password`, with `:` and
/// `\` escaped.
fn pgpass_line(secret: &DbSecret) -> String {
    let escape = |field: &str| field.replace('\\', "\\\\").replace(':', "\\:");
    format!(
        "{}:{}:{}:{}:{}\n",
        escape(&secret.host),
        secret.port,
        escape(&secret.dbname),
        escape(&secret.username),
        escape(secret.password.expose_secret())
    )
}

/// Flushes a file or a directory (a rename) to disk.
fn sync_file(path: &Path) -> Result<(), BackupError> {
    std::fs::File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(io("flush to disk", path))
}

/// What a client tool's stderr says went wrong, on one line: from its first error (`pg_dump:
/// error: ...`, what the details after it explain) four lines at most, else its last three;
/// each line cut at [`TOOL_LINE_CHARS`] characters (a `Command was:` can be long).
fn tool_message(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let shown = match lines.iter().position(|l| l.contains(": error: ")) {
        Some(first_error) => &lines[first_error..lines.len().min(first_error + 4)],
        None => &lines[lines.len().saturating_sub(3)..],
    };
    if shown.is_empty() {
        return "no message".to_owned();
    }
    let cut = |line: &&str| match line.char_indices().nth(TOOL_LINE_CHARS) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => (*line).to_owned(),
    };
    shown.iter().map(cut).collect::<Vec<_>>().join(" / ")
}

/// The longest line of a client tool's stderr an error repeats.
const TOOL_LINE_CHARS: usize = 300;

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    #[test]
    fn password_file_fields_are_escaped() {
        let secret = DbSecret {
            engine: "postgres".into(),
            host: "db:1".into(),
            port: 5432,
            username: "tenant_acme_app".into(),
            password: SecretString::from(r"p:a\ss"),
            dbname: "tenant_acme".into(),
        };
        assert_eq!(
            pgpass_line(&secret),
            "db\\:1:5432:tenant_acme:tenant_acme_app:p\\:a\\\\ss\n"
        );
    }

    #[test]
    fn a_finished_backup_is_found_by_its_job_and_a_partial_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(".acme-20261127T000000Z-job7.dump.partial"), b"x").expect("write");
        assert_eq!(find_file_ending(dir.path(), "-job7.dump").expect("list"), None);
        let done = dir.path().join("acme-20261127T000000Z-job7.dump");
        std::fs::write(&done, b"x").expect("write");
        assert_eq!(find_file_ending(dir.path(), "-job7.dump").expect("list"), Some(done));
        assert_eq!(find_file_ending(dir.path(), "-job17.dump").expect("list"), None);
    }

    #[test]
    fn leftovers_of_an_interrupted_backup_are_removed_and_finished_backups_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let work = dir.path().join(".work-abc");
        std::fs::create_dir(&work).expect("mkdir");
        std::fs::write(work.join("pgpass"), b"secret").expect("write");
        std::fs::write(dir.path().join(".acme-20261127T000000Z-job7.dump.partial"), b"x").expect("write");
        std::fs::write(dir.path().join("acme-20261126T000000Z-job3.dump"), b"x").expect("write");
        remove_leftovers(dir.path()).expect("clean");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(left, ["acme-20261126T000000Z-job3.dump"]);
    }

    #[tokio::test]
    async fn a_configured_pg_dump_is_run_as_given_and_pg_restore_is_taken_next_to_it() {
        let backups = Backups::open(BackupsConfig {
            pg_dump: Some(PathBuf::from("/opt/pg/bin/pg_dump-15")),
            ..BackupsConfig::default()
        })
        .await
        .expect("no key files");
        assert_eq!(
            backups.tool("pg_dump").expect("tool"),
            Path::new("/opt/pg/bin/pg_dump-15")
        );
        assert_eq!(
            backups.tool("pg_restore").expect("tool"),
            Path::new("/opt/pg/bin/pg_restore")
        );
    }

    #[tokio::test]
    async fn only_a_tenants_own_finished_backups_are_found_by_name() {
        let root = tempfile::tempdir().expect("tempdir");
        let backups = backups_in(root.path()).await;
        let acme = TenantSlug::parse("acme").expect("slug");
        std::fs::create_dir_all(root.path().join("acme")).expect("mkdir");
        std::fs::create_dir_all(root.path().join("other")).expect("mkdir");
        std::fs::write(root.path().join("acme/acme-1-job1.dump"), b"x").expect("write");
        std::fs::write(root.path().join("acme/.acme-2-job2.dump.partial"), b"x").expect("write");
        std::fs::write(root.path().join("other/other-1-job3.dump"), b"x").expect("write");
        let found = |name: &str| backups.local(&acme, name).expect("find");
        assert_eq!(
            found("acme-1-job1.dump"),
            Some(root.path().join("acme/acme-1-job1.dump"))
        );
        for name in [
            "../other/other-1-job3.dump",
            "other-1-job3.dump",
            ".acme-2-job2.dump.partial",
            "acme-9-job9.dump",
            "",
        ] {
            assert_eq!(found(name), None, "{name:?}");
        }
    }

    /// Unencrypted backups in `root`, kept until deleted.
    async fn backups_in(root: &Path) -> Backups {
        Backups::open(BackupsConfig {
            dir: Some(root.to_owned()),
            ..BackupsConfig::default()
        })
        .await
        .expect("no key files")
    }

    /// Backups of jobs 1, 2 and 3 in `dir`, finished 30, 20 and 10 s before the time returned.
    fn three_backups_of_acme(dir: &Path) -> std::time::SystemTime {
        let now = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        for (job, age) in [(1, 30), (3, 10), (2, 20)] {
            let file = std::fs::File::create(dir.join(format!("acme-{job}-job{job}.dump"))).expect("create");
            file.set_modified(now - std::time::Duration::from_secs(age))
                .expect("mtime");
        }
        now
    }

    #[tokio::test]
    async fn backups_are_listed_newest_first_and_those_beyond_keep_last_found() {
        let root = tempfile::tempdir().expect("tempdir");
        let backups = backups_in(root.path()).await;
        let acme = TenantSlug::parse("acme").expect("slug");
        assert_eq!(backups.list(&acme).await.expect("list"), [], "no directory yet");
        let dir = root.path().join("acme");
        std::fs::create_dir_all(dir.join(".work-1")).expect("mkdir");
        std::fs::write(dir.join(".acme-4-job4.dump.partial"), b"x").expect("write");
        three_backups_of_acme(&dir);
        let jobs = |backups: Vec<BackupFile>| -> Vec<Option<i64>> { backups.into_iter().map(|b| b.job).collect() };
        assert_eq!(
            jobs(backups.list(&acme).await.expect("list")),
            [Some(3), Some(2), Some(1)]
        );

        let beyond = backups
            .beyond_keep_last(&acme, 2, Some(&dir.join("acme-1-job1.dump")))
            .await
            .expect("beyond");
        assert_eq!(jobs(beyond), [], "the spared one stays");
        let beyond = backups.beyond_keep_last(&acme, 2, None).await.expect("beyond");
        assert_eq!(jobs(beyond), [Some(1)]);
        assert!(dir.join(".acme-4-job4.dump.partial").exists(), "not a finished backup");
        assert_eq!(job_of("acme-20261127T000000Z-job42.dump"), Some(42));
        assert_eq!(job_of("copied-by-hand.dump"), None);
    }

    #[tokio::test]
    async fn backups_expire_by_age_but_an_existing_tenant_keeps_its_newest() {
        let root = tempfile::tempdir().expect("tempdir");
        let backups = backups_in(root.path()).await;
        let acme = TenantSlug::parse("acme").expect("slug");
        let dir = root.path().join("acme");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::create_dir_all(root.path().join("Not A Slug")).expect("mkdir");
        let now = three_backups_of_acme(&dir);
        let expired = async |seconds_ago: u64, exists: bool| -> Vec<Option<i64>> {
            let cutoff = now - std::time::Duration::from_secs(seconds_ago);
            backups
                .expired(&acme, cutoff.into(), exists)
                .await
                .expect("expired")
                .into_iter()
                .map(|b| b.job)
                .collect()
        };
        assert_eq!(expired(15, true).await, [Some(1), Some(2)], "oldest first");
        assert_eq!(expired(25, true).await, [Some(1)]);
        assert_eq!(expired(5, true).await, [Some(1), Some(2)], "the newest is kept");
        assert_eq!(
            expired(5, false).await,
            [Some(1), Some(2), Some(3)],
            "a deleted tenant keeps none"
        );
        assert_eq!(expired(40, false).await, Vec::<Option<i64>>::new());
        assert_eq!(backups.tenants().await.expect("tenants"), [acme]);
    }

    #[test]
    fn tool_errors_keep_their_last_lines() {
        assert_eq!(tool_message(b"a\n\nb\nc\nd\n"), "b / c / d");
        assert_eq!(tool_message(b""), "no message");
    }

    #[test]
    fn tool_errors_start_at_the_first_error() {
        let dump_failed = b"pg_dump: error: Dumping the contents of table \"tasks\" failed: PQgetResult() failed.\n\
pg_dump: detail: Error message from server: server closed the connection unexpectedly\n\
\tThis probably means the server terminated abnormally\n\
\tbefore or while processing the request.\n\
pg_dump: detail: Command was: COPY public.tasks (id, title) TO stdout;\n";
        assert_eq!(
            tool_message(dump_failed),
            "pg_dump: error: Dumping the contents of table \"tasks\" failed: PQgetResult() failed. / \
             pg_dump: detail: Error message from server: server closed the connection unexpectedly / \
             This probably means the server terminated abnormally / \
             before or while processing the request."
        );
        let long = format!("pg_restore: error: could not execute query: {}\n", "é".repeat(400));
        let message = tool_message(long.as_bytes());
        assert_eq!(message.chars().count(), TOOL_LINE_CHARS + 1, "{message}");
        assert!(message.ends_with('…'), "{message}");
    }
}
