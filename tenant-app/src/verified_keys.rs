//! [`VerifiedKeys`]: the API keys one tenant's database confirmed in the last few seconds.
//!
//! A request whose key hash was confirmed less than [`TTL`] ago skips the key lookup, which
//! halves the database round trips of a typical request. Only confirmations are kept (an
//! unknown key always costs a lookup, and the router's rate limit bounds those), and only by
//! SHA-256, never the key. Each tenant context owns its own set, so a key confirmed in
//! tenant A's database is never looked for in tenant B's. A key deleted from the database
//! stops working within [`TTL`]; a tenant that is suspended or deleted loses its pool and
//! with it this set at once.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a confirmation stands: the longest a deleted key keeps working.
pub const TTL: Duration = Duration::from_secs(5);

/// Most confirmations kept per tenant; when full, expired ones go, then all of them.
const CAPACITY: usize = 256;

/// Key hashes recently found in one tenant's `api_keys`, with the key's name. Clones share.
#[derive(Clone, Default)]
pub(crate) struct VerifiedKeys {
    confirmed: Arc<Mutex<HashMap<[u8; 32], Confirmation>>>,
}

struct Confirmation {
    key_name: String,
    at: Instant,
}

impl VerifiedKeys {
    /// The name of the key hashing to `hash`, if the database confirmed it less than
    /// [`TTL`] ago.
    pub(crate) fn get(&self, hash: &[u8; 32]) -> Option<String> {
        let confirmed = self.confirmed.lock().unwrap_or_else(PoisonError::into_inner);
        confirmed
            .get(hash)
            .filter(|confirmation| confirmation.at.elapsed() < TTL)
            .map(|confirmation| confirmation.key_name.clone())
    }

    /// Records that the database has a key hashing to `hash`, named `key_name`.
    pub(crate) fn confirm(&self, hash: [u8; 32], key_name: &str) {
        let mut confirmed = self.confirmed.lock().unwrap_or_else(PoisonError::into_inner);
        if confirmed.len() >= CAPACITY && !confirmed.contains_key(&hash) {
            confirmed.retain(|_, confirmation| confirmation.at.elapsed() < TTL);
            if confirmed.len() >= CAPACITY {
                confirmed.clear();
            }
        }
        confirmed.insert(
            hash,
            Confirmation {
                key_name: key_name.to_owned(),
                at: Instant::now(),
            },
        );
    }
}

// Hand-written: key hashes stay out of logs.
impl fmt::Debug for VerifiedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.confirmed.lock().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_struct("VerifiedKeys").field("count", &count).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmed_keys_are_found_by_hash() {
        let keys = VerifiedKeys::default();
        assert_eq!(keys.get(&[1; 32]), None);
        keys.confirm([1; 32], "default");
        assert_eq!(keys.get(&[1; 32]).as_deref(), Some("default"));
        assert_eq!(keys.get(&[2; 32]), None);
        assert_eq!(keys.clone().get(&[1; 32]).as_deref(), Some("default"), "clones share");
    }

    #[test]
    fn confirmations_expire() {
        let keys = VerifiedKeys::default();
        keys.confirm([1; 32], "old");
        keys.confirmed.lock().unwrap().get_mut(&[1; 32]).unwrap().at = Instant::now().checked_sub(TTL).unwrap();
        assert_eq!(keys.get(&[1; 32]), None);
    }

    #[test]
    fn the_set_stays_bounded() {
        let keys = VerifiedKeys::default();
        for i in 0..=CAPACITY {
            let mut hash = [0; 32];
            hash[..8].copy_from_slice(&(i as u64).to_be_bytes());
            keys.confirm(hash, "k");
        }
        assert!(keys.confirmed.lock().unwrap().len() <= CAPACITY);
        assert!(!format!("{keys:?}").contains("k\""), "{keys:?}");
    }
}
