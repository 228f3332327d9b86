//! Newest-first pages of the catalog's append-only lists (`/v1/jobs`, `/v1/audit`): at most
//! `limit` items older than `before`, and the `before` of the next page.

use super::error::ApiError;

/// The most items one page may ask for.
pub(super) const MAX_LIMIT: i64 = 1000;

/// `limit` checked (1..=`MAX_LIMIT`), or `default` when not given.
pub(super) fn limit(limit: Option<i64>, default: i64) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(default);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(
            "invalid_query",
            format!("limit must be between 1 and {MAX_LIMIT}"),
        ));
    }
    Ok(limit)
}

/// The `before` of the page after `ids` (the ids of a full page, newest first); None on the
/// last page.
pub(super) fn next_before(ids: impl DoubleEndedIterator<Item = i64> + ExactSizeIterator, limit: i64) -> Option<i64> {
    let full = i64::try_from(ids.len()).is_ok_and(|len| len == limit);
    if full {
        ids.last()
    } else {
        None
    }
}
