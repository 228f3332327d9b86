//! API keys: their format, their hash, and how they are stored in a tenant database.
//!
//! A key is `silo_` followed by 32 random bytes in base64url without padding (43 characters).
//! Only its SHA-256 is stored (`api_keys.key_hash`): keys are 256-bit random tokens, so a fast
//! unsalted hash is enough and lets a request find its key with one indexed lookup. The
//! control plane uses this module to mint keys; the app uses it to check them.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Prefix of every API key; makes keys recognisable to people and secret scanners.
pub const PREFIX: &str = "silo_";

/// Random bytes in a key.
const SECRET_BYTES: usize = 32;

/// Length of the base64url (no padding) encoding of [`SECRET_BYTES`].
const ENCODED_LEN: usize = 43;

/// Generates a new API key and its SHA-256 hash (what [`insert`] stores).
///
/// The key is shown to its owner once; only the hash is kept.
pub fn generate() -> (String, [u8; 32]) {
    // `rand::random` draws from the thread-local CSPRNG, seeded from the OS.
    let secret: [u8; SECRET_BYTES] = rand::random();
    let key = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let hash = hash(&key);
    (key, hash)
}

/// SHA-256 of a key, as stored in `api_keys.key_hash`.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Whether `key` has the shape [`generate`] produces; anything else cannot be a valid key,
/// so it is refused without a database round trip.
pub(crate) fn is_well_formed(key: &str) -> bool {
    key.strip_prefix(PREFIX).is_some_and(|secret| {
        secret.len() == ENCODED_LEN
            && secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// Stores a key hash under `name` in the tenant database `exec` points at.
///
/// Idempotent on `name`: if a key with that name exists, nothing changes (and the existing
/// key stays valid), so a retried provisioning step converges.
pub async fn insert<'e, E: sqlx::PgExecutor<'e>>(exec: E, name: &str, hash: &[u8; 32]) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO api_keys (name, key_hash) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
        .bind(name)
        .bind(&hash[..])
        .execute(exec)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_format() {
        let (key, key_hash) = generate();
        assert!(key.starts_with("silo_"), "{key}");
        assert_eq!(key.len(), PREFIX.len() + ENCODED_LEN);
        assert!(is_well_formed(&key));
        assert_eq!(key_hash, hash(&key));
        let secret = URL_SAFE_NO_PAD.decode(&key[PREFIX.len()..]).expect("base64url");
        assert_eq!(secret.len(), SECRET_BYTES);
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(generate().0, generate().0);
    }

    #[test]
    fn hash_is_sha256_of_the_whole_key() {
        assert_eq!(
            hex::encode(hash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn malformed_keys_are_recognised() {
        let (key, _) = generate();
        assert!(!is_well_formed(""));
        assert!(!is_well_formed(&key[PREFIX.len()..]));
        assert!(!is_well_formed(&format!("{key}A")));
        assert!(!is_well_formed(&key[..key.len() - 1]));
        assert!(!is_well_formed(&format!("silo_{}", "+".repeat(ENCODED_LEN))));
        assert!(!is_well_formed(&key.replace("silo_", "SILO_")));
    }
}
