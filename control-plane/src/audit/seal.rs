//! Tamper evidence for the audit log.
//!
//! A sealer — one at a time across control planes (an advisory lock) — takes the entries in
//! the order [`super::follow`] hands them out (commit order, once final) and appends, for
//! each, a row to `audit_seals`: its place in the chain and `SHA-256(previous seal || entry)`,
//! the entry being its id, time (microseconds), actor, action, tenant and detail as PostgreSQL
//! renders them. [`verify`] walks the chain:
//!
//! - an entry changed after it was sealed no longer matches its seal;
//! - a removed entry leaves its seal without an entry;
//! - an entry slipped into the part of the log already sealed is never sealed;
//! - seals rewritten to hide a change are seen against a copy of the head kept elsewhere:
//!   the sealer logs it after every batch, and `siloctl audit verify` prints it.

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// The transaction-level advisory lock a sealing pass holds.
const SEAL_LOCK: i64 = 0x73696c6f_2d617564;
/// How often new entries are looked for.
const SEAL_EVERY: Duration = Duration::from_secs(2);
/// Entries sealed per transaction.
const BATCH: i64 = 1000;
/// Seals checked per query by [`verify`].
const VERIFY_PAGE: i64 = 10_000;
/// Problems [`verify`] reports at most.
const MAX_PROBLEMS: usize = 100;

/// What is hashed of an entry `e`: the same bytes in every session (no time zone, jsonb's
/// own rendering of the detail). NULL when there is no entry (`e` outer-joined).
const ENTRY_BYTES: &str = "CASE WHEN e.id IS NOT NULL THEN convert_to(jsonb_build_array(e.id, \
     (extract(epoch FROM e.at) * 1000000)::bigint, e.actor, e.action, e.tenant, e.detail)::text, 'UTF8') END";

/// The seal of an entry whose bytes are `entry`, after the seal `previous` (empty for the
/// first).
fn link(previous: &[u8], entry: &[u8]) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update(previous);
    hash.update(entry);
    hash.finalize().to_vec()
}

/// Seals new entries every [`SEAL_EVERY`] until `shutdown`.
pub async fn run(catalog: PgPool, shutdown: CancellationToken) {
    loop {
        loop {
            match seal(&catalog).await {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    error!(error = %e, "audit log not sealed");
                    break;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(SEAL_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Seals up to [`BATCH`] final entries after the last sealed one; true when it sealed a whole
/// batch (more may be waiting).
async fn seal(catalog: &PgPool) -> anyhow::Result<bool> {
    let mut tx = catalog.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SEAL_LOCK)
        .execute(&mut *tx)
        .await?;
    let last: Option<(i64, i64, Vec<u8>, Option<String>)> = sqlx::query_as(
        "SELECT s.seq, s.entry, s.hash, e.txid::text FROM audit_seals s \
         LEFT JOIN audit_log e ON e.id = s.entry ORDER BY s.seq DESC LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let (seq, previous, after_txid, after_id) = match last {
        None => (0, Vec::new(), "0".to_owned(), 0),
        Some((seq, entry, hash, Some(txid))) => (seq, hash, txid, entry),
        Some((_, entry, _, None)) => {
            anyhow::bail!("the last sealed entry, {entry}, is gone from the audit log (siloctl audit verify)")
        }
    };
    let entries: Vec<(i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT e.id, {ENTRY_BYTES} FROM audit_log e \
         WHERE (e.txid, e.id) > ($1::text::xid8, $2) AND e.txid < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY e.txid, e.id LIMIT $3"
    )))
    .bind(after_txid)
    .bind(after_id)
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    if entries.is_empty() {
        return Ok(false);
    }
    let mut ids = Vec::with_capacity(entries.len());
    let mut seqs = Vec::with_capacity(entries.len());
    let mut hashes = Vec::with_capacity(entries.len());
    let mut head = previous;
    for (n, (id, bytes)) in (seq + 1..).zip(&entries) {
        head = link(&head, bytes);
        ids.push(*id);
        seqs.push(n);
        hashes.push(head.clone());
    }
    sqlx::query(
        "INSERT INTO audit_seals (entry, seq, hash) SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bytea[])",
    )
    .bind(&ids)
    .bind(&seqs)
    .bind(&hashes)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    info!(
        through_entry = ids.last(),
        seq = seqs.last(),
        head = %hex::encode(&head),
        "audit log sealed"
    );
    Ok(i64::try_from(entries.len()).is_ok_and(|n| n == BATCH))
}

/// What [`verify`] found.
#[derive(Debug, serde::Serialize)]
pub struct Verification {
    /// No problem was found in the sealed part of the log.
    pub intact: bool,
    /// Entries sealed.
    pub sealed: i64,
    /// Entries not sealed yet (the newest, sealed within seconds).
    pub unsealed: i64,
    /// The last seal: compare it with a copy kept elsewhere.
    pub head: Option<Head>,
    /// What is wrong, in chain order (the first [`MAX_PROBLEMS`]).
    pub problems: Vec<Problem>,
}

/// The last seal of the chain.
#[derive(Debug, serde::Serialize)]
pub struct Head {
    /// Its place in the chain (1 for the first entry sealed).
    pub seq: i64,
    /// The entry it seals.
    pub entry: i64,
    /// The seal, in hex.
    pub hash: String,
    /// When it was made.
    pub sealed_at: chrono::DateTime<chrono::Utc>,
}

/// One entry that is not as it was sealed.
#[derive(Debug, serde::Serialize)]
pub struct Problem {
    /// The entry's id.
    pub entry: i64,
    /// What is wrong with it.
    pub problem: String,
}

/// A seal as [`verify`] reads it: seq, entry, hash, sealed_at, and the entry's bytes (None
/// when the entry is gone).
type SealRow = (i64, i64, Vec<u8>, chrono::DateTime<chrono::Utc>, Option<Vec<u8>>);

/// Checks every seal against its entry and the seal before it, and that no entry was slipped
/// into the sealed part of the log.
pub async fn verify(catalog: &PgPool) -> Result<Verification, sqlx::Error> {
    let mut problems = Vec::new();
    let (mut previous_seq, mut previous_hash) = (0, Vec::new());
    let mut last: Option<(i64, chrono::DateTime<chrono::Utc>)> = None;
    let mut sealed = 0;
    loop {
        let page: Vec<SealRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT s.seq, s.entry, s.hash, s.sealed_at, {ENTRY_BYTES} FROM audit_seals s \
                 LEFT JOIN audit_log e ON e.id = s.entry WHERE s.seq > $1 ORDER BY s.seq LIMIT $2"
        )))
        .bind(previous_seq)
        .bind(VERIFY_PAGE)
        .fetch_all(catalog)
        .await?;
        if page.is_empty() {
            break;
        }
        for (seq, entry, hash, sealed_at, bytes) in page {
            sealed += 1;
            if seq != previous_seq + 1 {
                problems.push(Problem {
                    entry,
                    problem: format!("the seals {} to {} before it are gone", previous_seq + 1, seq - 1),
                });
            }
            match bytes {
                None => problems.push(Problem {
                    entry,
                    problem: "the entry is gone; its seal is left".into(),
                }),
                Some(bytes) if link(&previous_hash, &bytes) != hash => problems.push(Problem {
                    entry,
                    problem: "the entry does not match its seal: it, or the seal before it, was changed".into(),
                }),
                Some(_) => {}
            }
            (previous_seq, previous_hash) = (seq, hash);
            last = Some((entry, sealed_at));
        }
    }
    let unsealed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log e WHERE NOT EXISTS (SELECT 1 FROM audit_seals s WHERE s.entry = e.id)",
    )
    .fetch_one(catalog)
    .await?;
    if let Some((entry, _)) = last {
        // Entries the sealer will never reach: before the last sealed one in commit order.
        let behind: Vec<i64> = sqlx::query_scalar(
            "SELECT e.id FROM audit_log e, audit_log head WHERE head.id = $1 \
               AND (e.txid, e.id) < (head.txid, head.id) \
               AND NOT EXISTS (SELECT 1 FROM audit_seals s WHERE s.entry = e.id) \
             ORDER BY e.txid, e.id LIMIT $2",
        )
        .bind(entry)
        .bind(i64::try_from(MAX_PROBLEMS).unwrap_or(i64::MAX))
        .fetch_all(catalog)
        .await?;
        problems.extend(behind.into_iter().map(|entry| Problem {
            entry,
            problem: "the entry was added to the part of the log already sealed".into(),
        }));
    }
    problems.truncate(MAX_PROBLEMS);
    Ok(Verification {
        intact: problems.is_empty(),
        sealed,
        unsealed,
        head: last.map(|(entry, sealed_at)| Head {
            seq: previous_seq,
            entry,
            hash: hex::encode(&previous_hash),
            sealed_at,
        }),
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_seal_chains_the_one_before() {
        let first = link(b"", b"entry 1");
        let second = link(&first, b"entry 2");
        assert_eq!(first.len(), 32);
        assert_ne!(second, link(b"", b"entry 2"), "a seal depends on the one before it");
        assert_ne!(second, link(&first, b"entry 2 changed"));
        assert_eq!(second, link(&first, b"entry 2"));
    }
}
