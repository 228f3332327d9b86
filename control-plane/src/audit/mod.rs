//! The append-only audit log: who changed what, when, for which tenant. Written in the same
//! transaction as the change it records.
//!
//! Read newest first a page at a time ([`list`]), or followed oldest first from a [`Cursor`]
//! ([`follow`]), which is how a SIEM collector or `siloctl audit --follow` reads it. Ids are
//! taken when an entry is written, not when its transaction commits, so a follower that went
//! by id alone would skip an entry whose transaction committed after a later one's. Entries
//! are followed in the order of the transactions that wrote them (`txid`, then `id`) and only
//! once no transaction that could still add an entry before them is running. [`seal`] chains
//! the entries in that order so that a change to the log shows.

pub mod seal;

use std::fmt;
use std::str::FromStr;

use serde_json::Value;
use sqlx::{Connection, PgConnection};

/// Appends one entry.
pub async fn record(
    tx: &mut PgConnection,
    actor: &str,
    action: &str,
    tenant: Option<&str>,
    detail: Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO audit_log (actor, action, tenant, detail) VALUES ($1, $2, $3, $4)")
        .bind(actor)
        .bind(action)
        .bind(tenant)
        .bind(detail)
        .execute(tx)
        .await?;
    Ok(())
}

/// One audit log entry, as `GET /v1/audit` shows it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Entry {
    /// Increasing with time: pages are asked for with `before`.
    pub id: i64,
    /// When.
    pub at: chrono::DateTime<chrono::Utc>,
    /// The admin token's name (`scheduler` for the control plane's own schedule).
    pub actor: String,
    /// What, e.g. `tenant.create`.
    pub action: String,
    /// For which tenant, if any.
    pub tenant: Option<String>,
    /// The request's details (never a secret).
    pub detail: Value,
    /// Where [`follow`] goes on after this entry (`GET /v1/audit?after=`).
    #[sqlx(try_from = "String")]
    pub cursor: Cursor,
}

/// A position in the audit log's commit order, written `TXID-ID`: the entries after it are
/// those [`follow`] has not handed out yet. `0-0` is the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(into = "String")]
pub struct Cursor {
    txid: i64,
    id: i64,
}

impl Cursor {
    /// Before the first entry.
    pub const START: Cursor = Cursor { txid: 0, id: 0 };
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.txid, self.id)
    }
}

impl From<Cursor> for String {
    fn from(cursor: Cursor) -> Self {
        cursor.to_string()
    }
}

/// A cursor that is not `TXID-ID` with both non-negative integers.
#[derive(Debug, thiserror::Error)]
#[error("a cursor is TXID-ID as the API returns it (\"next\", or an entry's \"cursor\"), e.g. 0-0 for the start")]
pub struct BadCursor;

impl FromStr for Cursor {
    type Err = BadCursor;
    fn from_str(s: &str) -> Result<Self, BadCursor> {
        let (txid, id) = s.split_once('-').ok_or(BadCursor)?;
        let number = |part: &str| {
            part.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0 && part.bytes().all(|b| b.is_ascii_digit()))
                .ok_or(BadCursor)
        };
        Ok(Self {
            txid: number(txid)?,
            id: number(id)?,
        })
    }
}

impl TryFrom<String> for Cursor {
    type Error = BadCursor;
    fn try_from(s: String) -> Result<Self, BadCursor> {
        s.parse()
    }
}

/// Where [`follow`] starts.
#[derive(Debug, Clone, Copy)]
pub enum After {
    /// After this cursor.
    Cursor(Cursor),
    /// After every entry committed so far: no entries, only the cursor to follow from.
    End,
}

/// What [`follow`] returns.
#[derive(Debug, serde::Serialize)]
pub struct Page {
    /// Entries in commit order, oldest first.
    pub items: Vec<Entry>,
    /// Where to go on from: the cursor of the next call.
    pub next: Cursor,
}

/// The columns of an [`Entry`], with its cursor as text.
macro_rules! entry_columns {
    () => {
        "id, at, actor, action, tenant, detail, txid::text || '-' || id AS cursor"
    };
}

/// Which entries [`list`] returns: all of them when every field is None.
#[derive(Debug, Default)]
pub struct Filter {
    /// Only this tenant's.
    pub tenant: Option<String>,
    /// Only this actor's.
    pub actor: Option<String>,
    /// Only this action.
    pub action: Option<String>,
    /// Only entries older than this id (the next page).
    pub before: Option<i64>,
}

/// Up to `limit` entries matching `filter`, newest first.
pub async fn list(exec: &mut PgConnection, filter: &Filter, limit: i64) -> Result<Vec<Entry>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        entry_columns!(),
        " FROM audit_log \
         WHERE ($1::text IS NULL OR tenant = $1) AND ($2::text IS NULL OR actor = $2) \
           AND ($3::text IS NULL OR action = $3) AND ($4::bigint IS NULL OR id < $4) \
         ORDER BY id DESC LIMIT $5"
    ))
    .bind(&filter.tenant)
    .bind(&filter.actor)
    .bind(&filter.action)
    .bind(filter.before)
    .bind(limit)
    .fetch_all(exec)
    .await
}

/// Up to `limit` entries matching `filter` after `after`, in commit order, and the cursor to
/// go on from. Only entries no running transaction can still precede are returned: one whose
/// transaction has not ended yet holds back the entries after it, never lets them skip it.
pub async fn follow(conn: &mut PgConnection, filter: &Filter, after: After, limit: i64) -> Result<Page, sqlx::Error> {
    // One snapshot for the entries and the end, so `next` never passes an entry unseen.
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    // Entries of transactions older than the snapshot's xmin are final: no running
    // transaction can add one before them.
    let end: Option<String> = sqlx::query_scalar(
        "SELECT txid::text || '-' || id FROM audit_log \
         WHERE txid < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY txid DESC, id DESC LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let end = end
        .map(Cursor::try_from)
        .transpose()
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?
        .unwrap_or(Cursor::START);
    let start = match after {
        After::End => {
            return Ok(Page {
                items: Vec::new(),
                next: end,
            })
        }
        After::Cursor(cursor) => cursor,
    };
    let items: Vec<Entry> = sqlx::query_as(concat!(
        "SELECT ",
        entry_columns!(),
        " FROM audit_log \
         WHERE (txid, id) > ($1::text::xid8, $2) AND txid < pg_snapshot_xmin(pg_current_snapshot()) \
           AND ($3::text IS NULL OR tenant = $3) AND ($4::text IS NULL OR actor = $4) \
           AND ($5::text IS NULL OR action = $5) \
         ORDER BY txid, id LIMIT $6"
    ))
    .bind(start.txid.to_string())
    .bind(start.id)
    .bind(&filter.tenant)
    .bind(&filter.actor)
    .bind(&filter.action)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let full = i64::try_from(items.len()).is_ok_and(|len| len == limit);
    let next = match items.last() {
        // More may match: go on right after the last one handed out.
        Some(last) if full => last.cursor,
        // Every final entry after `start` was seen (the filter skipped the others).
        _ => end.max(start),
    };
    Ok(Page { items, next })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_read_back_as_written_and_order_by_transaction_first() {
        let cursor: Cursor = "812-40".parse().expect("cursor");
        assert_eq!(cursor.to_string(), "812-40");
        assert_eq!("0-0".parse::<Cursor>().expect("start"), Cursor::START);
        assert!("812-40".parse::<Cursor>().unwrap() < "813-2".parse::<Cursor>().unwrap());
        for bad in [
            "",
            "812",
            "812-",
            "-40",
            "812--40",
            "+1-2",
            "a-b",
            "1-2-3",
            "99999999999999999999-1",
        ] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad:?}");
        }
    }
}
