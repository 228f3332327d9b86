//! What the control plane's maintenance commands do with backup files, without the catalog:
//! `silo-control-plane rekey-backups` encrypts every backup under the current key (plain
//! ones taken before a key was set, and those under a previous key), and
//! `silo-control-plane decrypt-backup` turns one back into a `pg_dump` file for a restore
//! outside silo.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use super::sealed::{self, Format, Header, SealError};
use super::{io, sealed_error, sync_file, BackupError, Backups};
use crate::names::TenantSlug;

/// What [`Backups::rekey`] did.
#[derive(Debug, Default)]
pub struct RekeyReport {
    /// Plain backups now encrypted.
    pub encrypted: usize,
    /// Backups re-encrypted from a previous key.
    pub reencrypted: usize,
    /// Backups already under the current key (each read through and authenticated).
    pub current: usize,
    /// Backups that could not be rekeyed, and why; they are left as they were.
    pub failed: Vec<BackupError>,
}

/// What [`Backups::rekey_file`] did to one file.
enum Rekeyed {
    Encrypted,
    Reencrypted,
    Current,
}

/// What [`Backups::decrypt`] wrote.
#[derive(Debug)]
pub struct Decrypted {
    /// The tenant the backup is of.
    pub slug: String,
    /// Bytes of `pg_dump` output written.
    pub bytes: u64,
}

impl Backups {
    /// Encrypts under the current key every backup in `[backups] dir` that is not under it
    /// already, one file at a time, each replaced by a rename once its new copy is on disk
    /// (with the old file's modification time, which orders backups). Every backup is read
    /// through, so a corrupted one is reported. Files a running job removes meanwhile are
    /// reported too, and nothing else is lost. With `[backups.s3]`, backups only in the bucket
    /// are downloaded first, and each one rekeyed replaces its copy in the bucket.
    pub async fn rekey(&self) -> Result<RekeyReport, BackupError> {
        if self.config.dir.is_none() {
            return Err(BackupError::NotConfigured);
        }
        if self.keys.is_empty() {
            return Err(BackupError::NotEncrypting);
        }
        let mut report = RekeyReport::default();
        for (slug, name) in self.every_backup().await? {
            match self.rekey_backup(&slug, &name).await {
                Ok(Rekeyed::Encrypted) => report.encrypted += 1,
                Ok(Rekeyed::Reencrypted) => report.reencrypted += 1,
                Ok(Rekeyed::Current) => report.current += 1,
                Err(e) => report.failed.push(e),
            }
        }
        Ok(report)
    }

    /// Every finished backup (its tenant and file name), in a stable order.
    async fn every_backup(&self) -> Result<Vec<(TenantSlug, String)>, BackupError> {
        let mut every = Vec::new();
        for slug in self.tenants().await? {
            for backup in self.list(&slug).await? {
                every.push((slug.clone(), backup.file));
            }
        }
        every.sort();
        Ok(every)
    }

    /// Rekeys `slug`'s backup `name`, downloaded first when only the bucket has it, and
    /// uploaded over its copy there when it changed.
    async fn rekey_backup(&self, slug: &TenantSlug, name: &str) -> Result<Rekeyed, BackupError> {
        let file = self.fetch(slug, name).await?.ok_or_else(|| BackupError::Io {
            what: "read",
            path: self.tenant_dir(slug).map(|dir| dir.join(name)).unwrap_or_default(),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        let rekeyed = self.rekey_file(slug, &file).await?;
        if let (Some(bucket), Rekeyed::Encrypted | Rekeyed::Reencrypted) = (&self.s3, &rekeyed) {
            bucket.upload(slug, name, &file).await?;
        }
        Ok(rekeyed)
    }

    async fn rekey_file(&self, slug: &TenantSlug, file: &Path) -> Result<Rekeyed, BackupError> {
        let format = sealed::format_of_file(file).map_err(io("read", file))?;
        let rekeyed = match format {
            Format::Unknown => return Err(BackupError::UnknownFormat(file.to_owned())),
            Format::Plain => Rekeyed::Encrypted,
            Format::Sealed => {
                let (header, mut input) = read_header(file).await?;
                header.check_tenant(slug.as_str()).map_err(sealed_error(file))?;
                let opened = sealed::open(&self.keys, &header, &mut input, &mut tokio::io::sink())
                    .await
                    .map_err(sealed_error(file))?;
                if opened.key == 0 {
                    return Ok(Rekeyed::Current);
                }
                Rekeyed::Reencrypted
            }
        };
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let partial = file.with_file_name(format!(".{name}.partial"));
        let written = self
            .reseal(slug, file, matches!(rekeyed, Rekeyed::Encrypted), &partial)
            .await;
        if let Err(e) = written {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, file).map_err(io("replace", file))?;
        if let Some(dir) = file.parent() {
            sync_file(dir)?;
        }
        Ok(rekeyed)
    }

    /// Writes `file` (a plain dump if `plain`, else encrypted under a previous key) encrypted
    /// under the current key to `partial`, with `file`'s modification time.
    async fn reseal(&self, slug: &TenantSlug, file: &Path, plain: bool, partial: &Path) -> Result<(), BackupError> {
        let key = self.keys.first().ok_or(BackupError::NotEncrypting)?;
        let modified = std::fs::metadata(file)
            .and_then(|meta| meta.modified())
            .map_err(io("read", file))?;
        let mut output = tokio::fs::File::create(partial).await.map_err(io("write", partial))?;
        if plain {
            let mut input = tokio::fs::File::open(file).await.map_err(io("read", file))?;
            sealed::seal(key, slug.as_str(), &mut input, &mut output)
                .await
                .map_err(sealed_error(partial))?;
        } else {
            let (header, mut input) = read_header(file).await?;
            let (mut plain_in, mut plain_out) = tokio::io::duplex(256 * 1024);
            let opening = async {
                let opened = sealed::open(&self.keys, &header, &mut input, &mut plain_in).await;
                // The end of the plaintext: the sealing side ends its stream here.
                drop(plain_in);
                opened.map_err(sealed_error(file))
            };
            let sealing = async {
                sealed::seal(key, slug.as_str(), &mut plain_out, &mut output)
                    .await
                    .map_err(sealed_error(partial))
            };
            let (opened, sealed) = tokio::join!(opening, sealing);
            // A corrupted chunk ends the plaintext early: the copy is void.
            opened?;
            sealed?;
        }
        output.sync_all().await.map_err(io("write", partial))?;
        let output = output.into_std().await;
        output.set_modified(modified).map_err(io("write", partial))?;
        Ok(())
    }

    /// `slug`'s backup `file` as the `pg_dump` output it was taken from: the file itself when
    /// it is a plain one, else its decryption as it is read (see [`Checked`]).
    pub async fn pg_dump_reader(
        &self,
        slug: &TenantSlug,
        file: &Path,
    ) -> Result<Pin<Box<dyn AsyncRead + Send>>, BackupError> {
        match sealed::format_of_file(file).map_err(io("read", file))? {
            Format::Plain => {
                let plain = tokio::fs::File::open(file).await.map_err(io("read", file))?;
                return Ok(Box::pin(plain));
            }
            Format::Unknown => return Err(BackupError::UnknownFormat(file.to_owned())),
            Format::Sealed => {}
        }
        if self.keys.is_empty() {
            return Err(BackupError::NotEncrypting);
        }
        let (header, mut input) = read_header(file).await?;
        header.check_tenant(slug.as_str()).map_err(sealed_error(file))?;
        let (mut writer, plain) = tokio::io::duplex(256 * 1024);
        let (done, outcome) = tokio::sync::oneshot::channel();
        let keys = self.keys.clone();
        let path = file.to_owned();
        tokio::spawn(async move {
            let opened = sealed::open(&keys, &header, &mut input, &mut writer).await;
            let outcome = opened.map(drop).map_err(|e| sealed_error(&path)(e).to_string());
            if let Err(e) = &outcome {
                tracing::warn!(error = %e, "backup download cut short");
            }
            let _ = done.send(outcome);
        });
        Ok(Box::pin(Checked { plain, outcome }))
    }

    /// Decrypts the backup `file` into a new file `output` (mode 0600): the `pg_dump
    /// --format=custom` output it was taken from, for `pg_restore` outside silo. Nothing is
    /// left at `output` unless all of it decrypted.
    pub async fn decrypt(&self, file: &Path, output: &Path) -> Result<Decrypted, BackupError> {
        match sealed::format_of_file(file).map_err(io("read", file))? {
            Format::Sealed => {}
            Format::Plain => return Err(BackupError::NotSealed(file.to_owned())),
            Format::Unknown => return Err(BackupError::UnknownFormat(file.to_owned())),
        }
        if self.keys.is_empty() {
            return Err(BackupError::NotEncrypting);
        }
        let (header, mut input) = read_header(file).await?;
        let mut out = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(output)
            .await
            .map_err(io("create", output))?;
        let opened = async {
            let opened = sealed::open(&self.keys, &header, &mut input, &mut out)
                .await
                .map_err(|e| match e {
                    SealError::Write(e) => io("write", output)(e),
                    e => sealed_error(file)(e),
                })?;
            out.sync_all().await.map_err(io("write", output))?;
            Ok(opened)
        }
        .await;
        match opened {
            Ok(opened) => Ok(Decrypted {
                slug: header.slug().to_owned(),
                bytes: opened.bytes,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(output);
                Err(e)
            }
        }
    }
}

/// A reader of a decrypted backup: the decrypted bytes, then, at their end, an error instead
/// of the end of the stream if they are not all of the backup (a chunk failed to
/// authenticate, or the file could not be read).
struct Checked {
    plain: tokio::io::DuplexStream,
    outcome: tokio::sync::oneshot::Receiver<Result<(), String>>,
}

impl AsyncRead for Checked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.plain).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            return Poll::Ready(Ok(()));
        }
        match ready!(Pin::new(&mut self.outcome).poll(cx)) {
            Ok(Ok(())) => Poll::Ready(Ok(())),
            Ok(Err(e)) => Poll::Ready(Err(std::io::Error::other(e))),
            Err(_) => Poll::Ready(Err(std::io::Error::other("the backup's decryption stopped"))),
        }
    }
}

/// Opens the encrypted backup `file` and reads its header.
async fn read_header(file: &Path) -> Result<(Header, tokio::fs::File), BackupError> {
    let mut input = tokio::fs::File::open(file).await.map_err(io("read", file))?;
    let header = Header::read(&mut input).await.map_err(sealed_error(file))?;
    Ok((header, input))
}
