//! Backups encrypted at rest (`[backups] encryption_key_file`).
//!
//! A sealed backup is `pg_dump`'s output encrypted on its way to disk with AES-256-GCM in the
//! STREAM construction (RustCrypto's `aead::stream`, 32-bit big-endian chunk counter): 64 KiB
//! chunks, each authenticated, the last one flagged as last, so a file that was altered,
//! truncated, extended or had chunks reordered fails to open. The dump never touches the disk
//! in clear, and a restore decrypts it on its way into `pg_restore`.
//!
//! Layout: a header — [`MAGIC`], the file's random 7-byte nonce prefix, the length of the
//! tenant's slug and the slug — then the chunks, each its ciphertext and 16-byte tag. The
//! whole header is the associated data of every chunk, so the tenant a backup belongs to
//! cannot be changed without the key: a backup copied into another tenant's directory is
//! refused before any of it is restored.

use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::aead::stream::{NewStream, StreamBE32, StreamPrimitive};
use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use secrecy::ExposeSecret;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::keyfile::Key;

/// The first bytes of a sealed backup.
pub const MAGIC: &[u8; 8] = b"SILOBK\x00\x01";
/// The first bytes of a `pg_dump --format=custom` file (a backup taken without a key).
pub const PG_DUMP_MAGIC: &[u8; 5] = b"PGDMP";
/// Plaintext bytes per chunk.
const CHUNK: usize = 64 * 1024;
/// AES-GCM's tag, after each chunk's ciphertext.
const TAG: usize = 16;
/// AES-GCM's 12-byte nonce less STREAM's 4-byte counter and 1-byte last-chunk flag.
const NONCE_PREFIX: usize = 7;

/// Why a backup could not be sealed or opened. Never contains key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// Reading the input failed.
    #[error("read: {0}")]
    Read(std::io::Error),
    /// Writing the output failed.
    #[error("write: {0}")]
    Write(std::io::Error),
    /// The input does not start with a silo backup header.
    #[error("not an encrypted silo backup")]
    NotSealed,
    /// The header names another tenant.
    #[error("it is a backup of tenant {found}, not of {expected}")]
    WrongTenant {
        /// The tenant being restored.
        expected: String,
        /// The tenant the header names.
        found: String,
    },
    /// No key authenticates the first chunk.
    #[error(
        "it cannot be decrypted: it was encrypted under a key that is neither backups.encryption_key_file nor one of backups.previous_encryption_key_files, or it is corrupted"
    )]
    NoKey,
    /// A later chunk does not authenticate.
    #[error("it is corrupted, truncated or was tampered with (chunk {0} fails authentication)")]
    Corrupted(u32),
    /// More chunks than the counter can number (256 TiB).
    #[error("it is too large to encrypt")]
    TooLarge,
}

/// What a sealed backup's header says.
#[derive(Debug, Clone)]
pub struct Header {
    slug: String,
    nonce: [u8; NONCE_PREFIX],
    /// The header as written: every chunk's associated data.
    bytes: Vec<u8>,
}

impl Header {
    fn new(slug: &str) -> Result<Self, SealError> {
        let nonce: [u8; NONCE_PREFIX] = rand::random();
        let len = u8::try_from(slug.len()).map_err(|_| SealError::TooLarge)?;
        let bytes = [MAGIC.as_slice(), &nonce, &[len], slug.as_bytes()].concat();
        Ok(Self {
            slug: slug.to_owned(),
            nonce,
            bytes,
        })
    }

    /// Reads the header at the start of `input`.
    pub async fn read<R: AsyncRead + Unpin>(input: &mut R) -> Result<Self, SealError> {
        let mut fixed = [0u8; MAGIC.len() + NONCE_PREFIX + 1];
        match input.read_exact(&mut fixed).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(SealError::NotSealed),
            Err(e) => return Err(SealError::Read(e)),
        }
        if !fixed.starts_with(MAGIC) {
            return Err(SealError::NotSealed);
        }
        let mut slug = vec![0u8; usize::from(fixed[fixed.len() - 1])];
        input.read_exact(&mut slug).await.map_err(|_| SealError::NotSealed)?;
        let slug = String::from_utf8(slug).map_err(|_| SealError::NotSealed)?;
        let mut nonce = [0u8; NONCE_PREFIX];
        nonce.copy_from_slice(&fixed[MAGIC.len()..MAGIC.len() + NONCE_PREFIX]);
        Ok(Self {
            bytes: [fixed.as_slice(), slug.as_bytes()].concat(),
            slug,
            nonce,
        })
    }

    /// The tenant whose backup this is, as the header says (authenticated only once a chunk
    /// has been opened).
    pub fn slug(&self) -> &str {
        &self.slug
    }

    /// Refuses a backup of another tenant than `slug`.
    pub fn check_tenant(&self, slug: &str) -> Result<(), SealError> {
        if self.slug == slug {
            Ok(())
        } else {
            Err(SealError::WrongTenant {
                expected: slug.to_owned(),
                found: self.slug.clone(),
            })
        }
    }

    fn stream(&self, key: &Key) -> StreamBE32<Aes256Gcm> {
        let cipher = Aes256Gcm::new(GenericArray::from_slice(key.expose_secret()));
        StreamBE32::from_aead(cipher, GenericArray::from_slice(&self.nonce))
    }
}

/// Up to `size` bytes from `input`; fewer only at its end.
async fn read_chunk<R: AsyncRead + Unpin>(input: &mut R, size: usize) -> Result<Vec<u8>, SealError> {
    let mut chunk = Vec::with_capacity(size + TAG);
    input
        .take(size as u64)
        .read_to_end(&mut chunk)
        .await
        .map_err(SealError::Read)?;
    Ok(chunk)
}

/// Encrypts all of `input` under `key` into `output` as a backup of tenant `slug`; returns
/// the number of plaintext bytes.
pub async fn seal<R, W>(key: &Key, slug: &str, input: &mut R, output: &mut W) -> Result<u64, SealError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let header = Header::new(slug)?;
    output.write_all(&header.bytes).await.map_err(SealError::Write)?;
    let stream = header.stream(key);
    let mut position = 0u32;
    let mut total = 0u64;
    let mut chunk = read_chunk(input, CHUNK).await?;
    loop {
        // A chunk is the last when nothing follows it; an empty input is one empty last chunk.
        let next = read_chunk(input, CHUNK).await?;
        let last = next.is_empty();
        total += chunk.len() as u64;
        stream
            .encrypt_in_place(position, last, &header.bytes, &mut chunk)
            .map_err(|_| SealError::TooLarge)?;
        output.write_all(&chunk).await.map_err(SealError::Write)?;
        if last {
            break;
        }
        position = position.checked_add(1).ok_or(SealError::TooLarge)?;
        chunk = next;
    }
    output.flush().await.map_err(SealError::Write)?;
    Ok(total)
}

/// What [`open`] decrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Plaintext bytes written.
    pub bytes: u64,
    /// Which of the keys opened it (0: the first, the current key).
    pub key: usize,
}

/// Decrypts the rest of `input`, whose `header` was read already, into `output`, with
/// whichever of `keys` it was sealed under. Each chunk is written only once it has been
/// authenticated; a corrupted chunk stops the copy with an error, so a reader of `output`
/// must treat what it received as void unless this returns `Ok`.
pub async fn open<R, W>(keys: &[Key], header: &Header, input: &mut R, output: &mut W) -> Result<Opened, SealError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut position = 0u32;
    let mut total = 0u64;
    let mut chunk = read_chunk(input, CHUNK + TAG).await?;
    let mut next = read_chunk(input, CHUNK + TAG).await?;
    // The key is the one that authenticates the first chunk.
    let (key, stream) = keys
        .iter()
        .enumerate()
        .find_map(|(index, key)| {
            let stream = header.stream(key);
            let mut attempt = chunk.clone();
            stream
                .decrypt_in_place(0, next.is_empty(), &header.bytes, &mut attempt)
                .ok()?;
            chunk = attempt;
            Some((index, stream))
        })
        .ok_or(SealError::NoKey)?;
    loop {
        output.write_all(&chunk).await.map_err(SealError::Write)?;
        total += chunk.len() as u64;
        if next.is_empty() {
            break;
        }
        position = position.checked_add(1).ok_or(SealError::Corrupted(u32::MAX))?;
        chunk = next;
        next = read_chunk(input, CHUNK + TAG).await?;
        stream
            .decrypt_in_place(position, next.is_empty(), &header.bytes, &mut chunk)
            .map_err(|_| SealError::Corrupted(position))?;
    }
    output.flush().await.map_err(SealError::Write)?;
    Ok(Opened { bytes: total, key })
}

/// How a backup file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Encrypted ([`seal`]).
    Sealed,
    /// A plain `pg_dump --format=custom` file (taken without a key).
    Plain,
    /// Neither.
    Unknown,
}

/// How the file starting with `start` (its first 8 bytes, or all of it if shorter) is stored.
pub fn format_of(start: &[u8]) -> Format {
    if start.starts_with(MAGIC) {
        Format::Sealed
    } else if start.starts_with(PG_DUMP_MAGIC) {
        Format::Plain
    } else {
        Format::Unknown
    }
}

/// How the file at `path` is stored.
pub fn format_of_file(path: &std::path::Path) -> std::io::Result<Format> {
    use std::io::Read;
    let mut start = Vec::with_capacity(MAGIC.len());
    std::fs::File::open(path)?
        .take(MAGIC.len() as u64)
        .read_to_end(&mut start)?;
    Ok(format_of(&start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretBox;

    fn key(byte: u8) -> Key {
        SecretBox::new(Box::new([byte; crate::keyfile::KEY_LEN]))
    }

    async fn sealed(key: &Key, slug: &str, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let bytes = seal(key, slug, &mut &plain[..], &mut out).await.expect("seal");
        assert_eq!(bytes, plain.len() as u64);
        out
    }

    async fn opened(keys: &[Key], slug: &str, file: &[u8]) -> Result<(Vec<u8>, usize), SealError> {
        let mut input = file;
        let header = Header::read(&mut input).await?;
        header.check_tenant(slug)?;
        let mut out = Vec::new();
        let opened = open(keys, &header, &mut input, &mut out).await?;
        assert_eq!(opened.bytes, out.len() as u64);
        Ok((out, opened.key))
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[tokio::test]
    async fn what_is_sealed_opens_with_its_key_whatever_its_length() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17] {
            let plain = sample(len);
            let file = sealed(&key(1), "acme", &plain).await;
            assert_eq!(format_of(&file), Format::Sealed);
            let chunks = len.div_ceil(CHUNK).max(1);
            assert_eq!(
                file.len(),
                MAGIC.len() + NONCE_PREFIX + 1 + 4 + len + chunks * TAG,
                "{len}"
            );
            let (out, key_index) = opened(&[key(1)], "acme", &file).await.expect("open");
            assert!(out == plain, "{len} bytes come back as they went in");
            assert_eq!(key_index, 0);
        }
    }

    #[tokio::test]
    async fn the_plaintext_does_not_appear_in_the_file_and_two_files_differ() {
        let plain = b"PGDMP tasks: invoice for ACME Corp, card 4242 4242 4242 4242".repeat(100);
        let a = sealed(&key(1), "acme", &plain).await;
        let b = sealed(&key(1), "acme", &plain).await;
        assert!(!a.windows(9).any(|w| w == b"ACME Corp"));
        assert_eq!(format_of(&a), Format::Sealed, "not PGDMP");
        assert_ne!(a, b, "each file has its own nonce");
    }

    #[tokio::test]
    async fn a_previous_key_still_opens_and_says_which_it_was() {
        let file = sealed(&key(2), "acme", &sample(CHUNK * 2)).await;
        let (_, index) = opened(&[key(1), key(2)], "acme", &file).await.expect("open");
        assert_eq!(index, 1);
        assert!(matches!(opened(&[key(1)], "acme", &file).await, Err(SealError::NoKey)));
        assert!(matches!(opened(&[], "acme", &file).await, Err(SealError::NoKey)));
    }

    #[tokio::test]
    async fn altered_truncated_extended_or_relabelled_files_do_not_open() {
        let plain = sample(CHUNK * 3 + 5);
        let file = sealed(&key(1), "acme", &plain).await;
        let header_len = MAGIC.len() + NONCE_PREFIX + 1 + 4;
        let chunk = CHUNK + TAG;

        let mut flipped = file.clone();
        flipped[header_len + chunk + 10] ^= 1;
        assert!(matches!(
            opened(&[key(1)], "acme", &flipped).await,
            Err(SealError::Corrupted(1))
        ));

        // Cut at a chunk boundary: the chunk now at the end was not sealed as the last.
        let cut = &file[..header_len + 2 * chunk];
        assert!(matches!(
            opened(&[key(1)], "acme", cut).await,
            Err(SealError::Corrupted(1))
        ));
        let mut longer = file.clone();
        longer.extend_from_slice(&[0; TAG]);
        assert!(opened(&[key(1)], "acme", &longer).await.is_err());

        let mut swapped = file.clone();
        swapped[header_len..header_len + chunk].copy_from_slice(&file[header_len + chunk..header_len + 2 * chunk]);
        swapped[header_len + chunk..header_len + 2 * chunk].copy_from_slice(&file[header_len..header_len + chunk]);
        assert!(matches!(
            opened(&[key(1)], "acme", &swapped).await,
            Err(SealError::NoKey)
        ));

        // Another tenant's name in the header: refused by name, and unauthenticated anyway.
        let other = sealed(&key(1), "acme", &plain).await;
        let mut relabelled = other.clone();
        relabelled[header_len - 4..header_len].copy_from_slice(b"evil");
        assert!(matches!(
            opened(&[key(1)], "acme", &relabelled).await,
            Err(SealError::WrongTenant { ref found, .. }) if found == "evil"
        ));
        assert!(matches!(
            opened(&[key(1)], "evil", &relabelled).await,
            Err(SealError::NoKey)
        ));
    }

    #[tokio::test]
    async fn plain_dumps_and_other_files_are_told_apart() {
        assert_eq!(format_of(b"PGDMP\x01\x0e\x00"), Format::Plain);
        assert_eq!(format_of(b"hello"), Format::Unknown);
        assert_eq!(format_of(b""), Format::Unknown);
        assert!(matches!(
            Header::read(&mut &b"PGDMP\x01\x0e\x00rest of a dump"[..]).await,
            Err(SealError::NotSealed)
        ));
        assert!(matches!(
            Header::read(&mut &b"SILO"[..]).await,
            Err(SealError::NotSealed)
        ));
    }
}
