//! Validated names: the tenant slug and the PostgreSQL identifiers of its database and roles.
//!
//! Identifiers cannot be bound as parameters in DDL, so every identifier silo puts in SQL is
//! one silo made ([`TenantNames`], from a [`TenantSlug`] validated once at the edge) and is
//! quoted with [`quote_ident`].

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Words that cannot be tenant slugs: they collide with infrastructure host names or
/// PostgreSQL's own databases and roles.
const RESERVED: &[&str] = &[
    "www",
    "api",
    "admin",
    "silo",
    "postgres",
    "template0",
    "template1",
    "root",
    "public",
    "pg-catalog",
    "information-schema",
    "localhost",
    "mail",
    "status",
    "metrics",
    "health",
    "static",
    "assets",
    "app",
    "dashboard",
    "internal",
    "system",
    "default",
    "test",
];

/// Why a slug was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlugError {
    /// The slug does not match `^[a-z][a-z0-9-]{1,30}[a-z0-9]$`.
    #[error("slug must be 3-32 characters of a-z, 0-9 and '-', start with a letter and not end with '-'")]
    Invalid,
    /// The slug is a reserved word.
    #[error("slug {0:?} is reserved")]
    Reserved(String),
}

/// A tenant's slug: `^[a-z][a-z0-9-]{1,30}[a-z0-9]$`, not reserved.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantSlug(String);

impl TenantSlug {
    /// Validates `s` as a tenant slug.
    pub fn parse(s: &str) -> Result<Self, SlugError> {
        let bytes = s.as_bytes();
        let valid_len = (3..=32).contains(&bytes.len());
        let first_ok = bytes.first().is_some_and(u8::is_ascii_lowercase);
        let last_ok = bytes
            .last()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let body_ok = bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
        if !(valid_len && first_ok && last_ok && body_ok) {
            return Err(SlugError::Invalid);
        }
        if RESERVED.contains(&s) {
            return Err(SlugError::Reserved(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// The slug as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The secret key a new tenant's database name is derived from (see [`TenantNames`]): made
/// once per catalog, kept in it, never shown.
#[derive(Clone)]
pub struct NamingKey([u8; 32]);

impl NamingKey {
    /// The key made of `bytes`; None unless they are 32.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl fmt::Debug for NamingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NamingKey(..)")
    }
}

/// A tenant's PostgreSQL names: its database, and the roles named after it.
///
/// Every role on a server can list its databases and roles (`pg_database`, `pg_roles`,
/// `pg_stat_activity`), so these names must not say whose they are: a new tenant's database
/// is `tenant_` and 20 hex digits of an HMAC-SHA-256 of its slug under the catalog's
/// [`NamingKey`]. The catalog records each tenant's database, and that record is what the
/// names are read from (tenants created before pseudonyms keep `tenant_<slug>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantNames {
    database: String,
}

impl TenantNames {
    /// The names a new tenant `slug` gets under `key`: the same slug under the same key gets
    /// the same names, so a catalog restored from a backup finds what was made since.
    pub fn derive(key: &NamingKey, slug: &TenantSlug) -> Self {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key.0).expect("HMAC takes any key length");
        mac.update(slug.as_str().as_bytes());
        let digest = hex::encode(mac.finalize().into_bytes());
        Self {
            database: format!("tenant_{}", &digest[..20]),
        }
    }

    /// The names of the tenant whose database is `database` (as the catalog records it).
    pub fn of_database(database: impl Into<String>) -> Self {
        Self {
            database: database.into(),
        }
    }

    /// The names of `database` if silo could have made it for a tenant: `tenant_` and
    /// lower-case letters, digits and `_`, short enough for its roles' names to fit
    /// PostgreSQL's 63 bytes (it would cut them, and they would no longer match).
    pub fn of_tenant_database(database: &str) -> Option<Self> {
        let shaped = database.strip_prefix("tenant_").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
        let names = Self::of_database(database);
        (shaped && names.alternate_login_role().len() <= 63).then_some(names)
    }

    /// The tenant's database.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The NOLOGIN role that owns the tenant's database and every object in it.
    pub fn owner_role(&self) -> String {
        format!("{}_owner", self.database)
    }

    /// The login role the tenant app uses.
    pub fn login_role(&self) -> String {
        format!("{}_app", self.database)
    }

    /// The second login role of the `alternating` rotation strategy: the two take turns.
    pub fn alternate_login_role(&self) -> String {
        format!("{}_app_b", self.database)
    }

    /// Both login roles, in the order they are first used.
    pub fn login_roles(&self) -> [String; 2] {
        [self.login_role(), self.alternate_login_role()]
    }
}

impl TryFrom<String> for TenantSlug {
    type Error = SlugError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<TenantSlug> for String {
    fn from(s: TenantSlug) -> Self {
        s.0
    }
}

impl fmt::Display for TenantSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantSlug({})", self.0)
    }
}

impl std::str::FromStr for TenantSlug {
    type Err = SlugError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Quotes a PostgreSQL identifier: wraps it in double quotes and doubles any inner quote.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quotes a PostgreSQL string literal (for the few DDL statements that cannot bind, such as
/// `ALTER ROLE ... PASSWORD`): wraps it in single quotes and doubles inner quotes.
/// Callers must only pass values silo generated itself.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// What an admin token name may be: 1-64 of letters, digits, `.`, `_`, `@` and `-`,
/// starting with a letter or a digit (e.g. `alice@example.com`, `ci-deploy`).
pub const ADMIN_TOKEN_NAME_RULE: &str =
    "a token name is 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or a digit";

/// Whether `name` follows [`ADMIN_TOKEN_NAME_RULE`].
pub fn is_admin_token_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_names_are_people_and_automations_not_text() {
        for name in ["alice@example.com", "ci-deploy", "Bob_2", "x", &"a".repeat(64)] {
            assert!(is_admin_token_name(name), "{name}");
        }
        for name in ["", "-ci", ".x", "with space", "a/b", "é", &"a".repeat(65)] {
            assert!(!is_admin_token_name(name), "{name:?}");
        }
    }

    #[test]
    fn accepts_valid_slugs() {
        for s in ["acme", "a1b", "acme-corp", "x-1-2", &"a".repeat(32)] {
            assert!(TenantSlug::parse(s).is_ok(), "{s}");
        }
    }

    #[test]
    fn refuses_invalid_slugs() {
        for s in [
            "",
            "ab",
            "1abc",
            "-abc",
            "abc-",
            "Acme",
            "ac_me",
            "ac.me",
            "acme\0",
            "acme ",
            "a\"b",
            &"a".repeat(33),
            "ümlaut",
        ] {
            assert_eq!(TenantSlug::parse(s), Err(SlugError::Invalid), "{s:?}");
        }
    }

    #[test]
    fn refuses_reserved_slugs() {
        for s in ["www", "api", "admin", "silo", "postgres", "template0", "template1"] {
            assert!(matches!(TenantSlug::parse(s), Err(SlugError::Reserved(_))), "{s}");
        }
    }

    #[test]
    fn names_say_nothing_of_the_slug_without_the_key() {
        let key = NamingKey::from_bytes(&[7; 32]).unwrap();
        let slug = TenantSlug::parse("acme-corp").unwrap();
        let names = TenantNames::derive(&key, &slug);
        let db = names.database();
        assert!(db.starts_with("tenant_") && db.len() == 27, "{db}");
        assert!(
            db[7..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{db}"
        );
        assert!(!db.contains("acme"), "{db}");
        assert_eq!(
            TenantNames::derive(&key, &slug),
            names,
            "the same slug and key, the same names"
        );
        let other_key = NamingKey::from_bytes(&[8; 32]).unwrap();
        assert_ne!(TenantNames::derive(&other_key, &slug), names);
        let other_slug = TenantSlug::parse("acme-corq").unwrap();
        assert_ne!(TenantNames::derive(&key, &other_slug), names);
        assert_eq!(format!("{key:?}"), "NamingKey(..)");
    }

    #[test]
    fn only_names_silo_makes_are_tenant_databases() {
        let derived = TenantNames::derive(
            &NamingKey::from_bytes(&[1; 32]).unwrap(),
            &TenantSlug::parse("acme").unwrap(),
        );
        let longest_legacy = format!("tenant_{}", "a".repeat(32));
        for ok in [
            derived.database(),
            "tenant_acme_corp",
            &longest_legacy,
            &format!("tenant_{}", "a".repeat(50)),
        ] {
            assert_eq!(
                TenantNames::of_tenant_database(ok)
                    .map(|n| n.database().to_owned())
                    .as_deref(),
                Some(ok)
            );
        }
        for bad in [
            "tenant_",
            "acme",
            "postgres",
            "Tenant_acme",
            "tenant_Acme",
            "tenant_ac-me",
            "tenant_a\"b",
            "tenant_acme; DROP",
            &format!("tenant_{}", "a".repeat(51)),
        ] {
            assert!(TenantNames::of_tenant_database(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn roles_are_named_after_the_database() {
        let names = TenantNames::of_database("tenant_acme_corp");
        assert_eq!(names.database(), "tenant_acme_corp");
        assert_eq!(names.owner_role(), "tenant_acme_corp_owner");
        assert_eq!(names.login_role(), "tenant_acme_corp_app");
        assert_eq!(names.alternate_login_role(), "tenant_acme_corp_app_b");
        assert_eq!(names.login_roles(), ["tenant_acme_corp_app", "tenant_acme_corp_app_b"]);
    }

    #[test]
    fn quotes_identifiers_and_literals() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
