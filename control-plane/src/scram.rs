//! SCRAM-SHA-256 password verifiers (RFC 5802, RFC 7677) in PostgreSQL's stored format.
//!
//! silo sets the password of a login role as a verifier computed here, never as the clear
//! password: PostgreSQL stores a verifier it is given as it is, so the clear password never
//! travels in SQL text, where the server would print it in its log with the statement that
//! failed, or with every DDL statement under `log_statement = 'ddl'`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// PBKDF2 iterations: PostgreSQL's default (`scram_iterations`).
const ITERATIONS: u32 = 4096;
/// Salt length, as PostgreSQL generates it.
const SALT_LEN: usize = 16;

/// The SCRAM-SHA-256 verifier of `password` with a fresh random salt:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
///
/// `password` must need no SASLprep normalisation (silo's generated passwords are ASCII
/// letters and digits), or clients would derive a different key from it.
pub(crate) fn verifier(password: &SecretString) -> String {
    verifier_with_salt(password.expose_secret(), &rand::random::<[u8; SALT_LEN]>(), ITERATIONS)
}

fn verifier_with_salt(password: &str, salt: &[u8], iterations: u32) -> String {
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2::<Hmac<Sha256>>(password.as_bytes(), salt, iterations, &mut salted)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    let client_key = hmac(&salted, b"Client Key");
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key),
        STANDARD.encode(server_key)
    )
}

fn hmac(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The user and salt of RFC 7677's example exchange; the keys as Python's `hashlib`
    /// derives them.
    #[test]
    fn verifier_matches_an_independent_derivation() {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        assert_eq!(
            verifier_with_salt("pencil", &salt, 4096),
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
    }

    #[test]
    fn each_verifier_has_its_own_salt_and_no_password() {
        let password = SecretString::from("correcthorsebatterystaple");
        let (a, b) = (verifier(&password), verifier(&password));
        assert_ne!(a, b);
        assert!(a.starts_with("SCRAM-SHA-256$4096:"), "{a}");
        assert!(!a.contains("correcthorse"));
    }
}
