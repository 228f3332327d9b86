//! `/api/v1/tasks`: the tenant's tasks. Each operation is one SQL statement.
//!
//! Listing is keyset-paginated on the primary key: `cursor` is an opaque token (base64url of
//! the last id returned) and the next page is `id > cursor ORDER BY id`, which the primary-key
//! index serves without an offset scan. One extra row is fetched to know whether a next page
//! exists, so `next_cursor` is `null` exactly on the last page.
//!
//! PATCH semantics: absent fields are left alone, `null` is refused (422), and `updated_at`
//! moves to `now()` only when a value actually changes; `{}` (or the same values again)
//! returns the task unchanged.

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::json::ApiJson;

/// Longest title, in characters (Unicode scalar values, as PostgreSQL's `char_length`).
const MAX_TITLE_CHARS: usize = 500;
/// Page size when `limit` is not given.
const DEFAULT_LIMIT: u32 = 50;
/// Largest page size a client may ask for.
const MAX_LIMIT: u32 = 200;

/// A task as stored and as returned.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct Task {
    id: i64,
    title: String,
    done: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// Body of `POST /api/v1/tasks`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewTask {
    title: String,
    #[serde(default)]
    done: bool,
}

/// Body of `PATCH /api/v1/tasks/{id}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TaskPatch {
    #[serde(default, deserialize_with = "present")]
    title: Option<String>,
    #[serde(default, deserialize_with = "present")]
    done: Option<bool>,
}

/// Query of `GET /api/v1/tasks`.
#[derive(Deserialize, FromRequestParts)]
#[serde(deny_unknown_fields)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub(crate) struct ListParams {
    limit: Option<u32>,
    cursor: Option<String>,
}

/// The `{id}` path segment.
#[derive(Deserialize, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub(crate) struct TaskId(i64);

/// Body of `GET /api/v1/tasks`.
#[derive(Serialize)]
pub(crate) struct Page {
    items: Vec<Task>,
    next_cursor: Option<String>,
}

/// Deserializes a field that may be absent (`#[serde(default)]` gives `None`) but, when
/// present, must hold a value: `null` is a type error, not "leave unchanged".
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Checks the title rules the schema also enforces, so clients get 422 rather than 500.
fn validate_title(title: &str) -> Result<(), ApiError> {
    let chars = title.chars().count();
    if chars == 0 {
        return Err(ApiError::ValidationFailed("title must not be empty".into()));
    }
    if chars > MAX_TITLE_CHARS {
        return Err(ApiError::ValidationFailed(format!(
            "title must be at most {MAX_TITLE_CHARS} characters (got {chars})"
        )));
    }
    // PostgreSQL text cannot hold NUL; refusing it here keeps it a client error.
    if title.contains('\0') {
        return Err(ApiError::ValidationFailed(
            "title must not contain NUL characters".into(),
        ));
    }
    Ok(())
}

fn encode_cursor(last_id: i64) -> String {
    URL_SAFE_NO_PAD.encode(last_id.to_be_bytes())
}

fn decode_cursor(cursor: &str) -> Result<i64, ApiError> {
    let bad = || ApiError::InvalidRequest("invalid cursor".into());
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let bytes: [u8; 8] = bytes.try_into().map_err(|_| bad())?;
    Ok(i64::from_be_bytes(bytes))
}

/// `GET /api/v1/tasks?limit=&cursor=`: one page of tasks by ascending id.
pub(crate) async fn list(mut caller: Caller, params: ListParams) -> Result<Json<Page>, ApiError> {
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::InvalidRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let after = match params.cursor.as_deref() {
        Some(cursor) => decode_cursor(cursor)?,
        None => i64::MIN,
    };
    let mut items: Vec<Task> = sqlx::query_as(
        "SELECT id, title, done, created_at, updated_at FROM tasks \
         WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(after)
    .bind(i64::from(limit) + 1)
    .fetch_all(caller.db().await?)
    .await?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|task| encode_cursor(task.id))
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor }))
}

/// `POST /api/v1/tasks`: creates a task; 201 with the task.
pub(crate) async fn create(
    mut caller: Caller,
    ApiJson(new): ApiJson<NewTask>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    validate_title(&new.title)?;
    let task: Task = sqlx::query_as(
        "INSERT INTO tasks (title, done) VALUES ($1, $2) \
         RETURNING id, title, done, created_at, updated_at",
    )
    .bind(&new.title)
    .bind(new.done)
    .fetch_one(caller.db().await?)
    .await?;
    Ok((StatusCode::CREATED, Json(task)))
}

/// `GET /api/v1/tasks/{id}`.
pub(crate) async fn get(mut caller: Caller, TaskId(id): TaskId) -> Result<Json<Task>, ApiError> {
    fetch(&mut caller, id).await.map(Json)
}

async fn fetch(caller: &mut Caller, id: i64) -> Result<Task, ApiError> {
    sqlx::query_as("SELECT id, title, done, created_at, updated_at FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_optional(caller.db().await?)
        .await?
        .ok_or(ApiError::TaskNotFound)
}

/// `PATCH /api/v1/tasks/{id}`: changes the given fields (see the module docs).
pub(crate) async fn update(
    mut caller: Caller,
    TaskId(id): TaskId,
    ApiJson(patch): ApiJson<TaskPatch>,
) -> Result<Json<Task>, ApiError> {
    if let Some(title) = &patch.title {
        validate_title(title)?;
    }
    if patch.title.is_none() && patch.done.is_none() {
        // Nothing to change: read instead of writing a new row version.
        return fetch(&mut caller, id).await.map(Json);
    }
    // In SET, column names refer to the old row, so the CASE compares old and new values.
    let task: Option<Task> = sqlx::query_as(
        "UPDATE tasks SET \
             title = COALESCE($2, title), \
             done = COALESCE($3, done), \
             updated_at = CASE \
                 WHEN COALESCE($2, title) IS DISTINCT FROM title \
                   OR COALESCE($3, done) IS DISTINCT FROM done \
                 THEN now() ELSE updated_at END \
         WHERE id = $1 \
         RETURNING id, title, done, created_at, updated_at",
    )
    .bind(id)
    .bind(patch.title.as_deref())
    .bind(patch.done)
    .fetch_optional(caller.db().await?)
    .await?;
    task.map(Json).ok_or(ApiError::TaskNotFound)
}

/// `DELETE /api/v1/tasks/{id}`: 204, or 404 if there was no such task.
pub(crate) async fn delete(mut caller: Caller, TaskId(id): TaskId) -> Result<StatusCode, ApiError> {
    let deleted = sqlx::query("DELETE FROM tasks WHERE id = $1")
        .bind(id)
        .execute(caller.db().await?)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Err(ApiError::TaskNotFound);
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        for id in [1, 42, i64::MAX] {
            assert_eq!(decode_cursor(&encode_cursor(id)).ok(), Some(id));
        }
    }

    #[test]
    fn bad_cursors_are_refused() {
        for cursor in ["", "abc", "!!!!!!!!!!!", &URL_SAFE_NO_PAD.encode([0u8; 9])] {
            assert!(decode_cursor(cursor).is_err(), "{cursor}");
        }
    }

    #[test]
    fn titles_are_counted_in_characters() {
        assert!(validate_title(&"é".repeat(500)).is_ok());
        assert!(validate_title(&"é".repeat(501)).is_err());
        assert!(validate_title("").is_err());
        assert!(validate_title("a\0b").is_err());
    }
}
