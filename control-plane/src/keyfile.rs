//! Files holding one 256-bit key in base64, readable by their owner only: the local secret
//! store's master key (`secrets.local_master_key_file`) and the backup key
//! (`backups.encryption_key_file`), and the previous keys of either.
//!
//! Problems are reported without any key material: a decoder's own error would quote the
//! offending byte, so only the kind of problem is named.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use secrecy::zeroize::Zeroizing;
use secrecy::SecretBox;

/// Length of a key, in bytes (AES-256).
pub const KEY_LEN: usize = 32;

/// A key read from a key file.
pub type Key = SecretBox<[u8; KEY_LEN]>;

/// A key file that is missing, unreadable, malformed or readable by others.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct KeyFileError {
    /// The key file.
    pub path: PathBuf,
    /// What is wrong.
    pub problem: String,
}

fn error(path: &Path, problem: impl Into<String>) -> KeyFileError {
    KeyFileError {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// Writes a new random key (32 bytes, base64, mode 0600) to `path` unless a file is already
/// there; an existing file is left alone (and checked when it is loaded).
pub fn create(path: &Path) -> Result<(), KeyFileError> {
    let key = Zeroizing::new(rand::random::<[u8; KEY_LEN]>());
    let text = Zeroizing::new(format!("{}\n", base64::engine::general_purpose::STANDARD.encode(*key)));
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(error(path, format!("cannot create: {e}"))),
    };
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| error(path, format!("cannot write: {e}")))
}

/// Reads and checks the key in `path`: it must exist, hold 32 bytes in base64 and be
/// readable by its owner only (mode 0600).
pub fn load(path: &Path) -> Result<Key, KeyFileError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => error(
            path,
            "does not exist (create one with `openssl rand -base64 32 > FILE && chmod 600 FILE`)",
        ),
        _ => error(path, format!("cannot read: {e}")),
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(error(
            path,
            format!("mode is {mode:04o}, must be 0600 (readable by its owner only)"),
        ));
    }
    let text = Zeroizing::new(std::fs::read(path).map_err(|e| error(path, format!("cannot read: {e}")))?);
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim_ascii())
            .map_err(|_| error(path, "is not base64 (expected `openssl rand -base64 32` output)"))?,
    );
    let key: [u8; KEY_LEN] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| error(path, format!("decodes to {} bytes, expected {KEY_LEN}", bytes.len())))?;
    Ok(SecretBox::new(Box::new(key)))
}

/// The key in `current` followed by those in `previous`, in that order.
pub fn load_all(current: &Path, previous: &[PathBuf]) -> Result<Vec<Key>, KeyFileError> {
    std::iter::once(current)
        .chain(previous.iter().map(PathBuf::as_path))
        .map(load)
        .collect()
}
