//! The caller's own account: `GET /me` and `GET /usage` (SPEC §5).

use crate::app::AppState;
use crate::auth::Caller;
use crate::credits::Credits;
use crate::error::ApiError;
use crate::store::{KeyId, Millis, PageRequest, Role, Store, UsageEntry, UsageTotals};
use axum::extract::{Query, State};
use axum::http::Uri;
use axum::Json;
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
pub struct Me {
    pub id: KeyId,
    pub name: String,
    pub role: Role,
    /// `null` for admin keys, which are never charged.
    pub credits: Option<Credits>,
    pub usage: UsageTotals,
}

pub async fn me(State(state): State<AppState>, caller: Caller) -> Result<Json<Me>, ApiError> {
    let usage = state.store.usage_totals(caller.key.id).await?;
    // The key as it is now: the caller's record may come from a cache, and
    // its balance is what /me is asked for.
    let key = state.store.key(caller.key.id).await?.unwrap_or(caller.key);
    Ok(Json(Me {
        id: key.id,
        name: key.name,
        role: key.role,
        credits: (key.role == Role::User).then_some(key.balance),
        usage,
    }))
}

#[derive(Deserialize)]
pub struct PageQuery {
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// One ledger row as the API shows it.
#[derive(Serialize)]
pub struct UsageItem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<KeyId>,
    pub time: String,
    pub endpoint: String,
    pub model: Option<String>,
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub credits: Credits,
    pub duration_ms: u64,
}

#[derive(Serialize)]
pub struct UsagePage {
    pub items: Vec<UsageItem>,
    /// The cursor of the next page; `null` on the last one.
    pub next: Option<String>,
}

pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 1000;

pub async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    uri: Uri,
) -> Result<Json<UsagePage>, ApiError> {
    let page = page_request(&uri)?;
    Ok(Json(
        usage_page(state.store.as_ref(), Some(caller.key.id), page, false).await?,
    ))
}

/// Reads `?limit=` and `?cursor=`.
pub fn page_request(uri: &Uri) -> Result<PageRequest, ApiError> {
    let query = Query::<PageQuery>::try_from_uri(uri)
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let before = query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| ApiError::BadRequest(format!("invalid cursor {c:?}")))
        })
        .transpose()?;
    Ok(PageRequest { limit, before })
}

/// One page of ledger rows, newest first.
pub async fn usage_page(
    store: &dyn Store,
    key: Option<KeyId>,
    page: PageRequest,
    with_key: bool,
) -> Result<UsagePage, ApiError> {
    let mut rows = store
        .usage(
            key,
            PageRequest {
                limit: page.limit + 1,
                ..page
            },
        )
        .await?;
    let more = rows.len() > page.limit as usize;
    rows.truncate(page.limit as usize);
    let next = more
        .then(|| rows.last().map(|r| r.id.to_string()))
        .flatten();
    Ok(UsagePage {
        items: rows.into_iter().map(|r| usage_item(r, with_key)).collect(),
        next,
    })
}

pub fn usage_item(entry: UsageEntry, with_key: bool) -> UsageItem {
    let r = entry.record;
    UsageItem {
        key_id: with_key.then_some(r.key_id),
        time: rfc3339(r.time),
        endpoint: r.endpoint,
        model: r.model,
        status: r.status,
        prompt_tokens: r.prompt_tokens,
        completion_tokens: r.completion_tokens,
        credits: r.credits,
        duration_ms: r.duration_ms,
    }
}

/// Milliseconds since the epoch as RFC 3339 (UTC), always with three
/// decimals (`2026-11-21T22:41:28.120Z`), as JavaScript's `toISOString`.
pub fn rfc3339(ms: Millis) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(format).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn times_have_three_decimals() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_418_088_200), "2026-12-04T21:01:28.200Z");
        assert_eq!(rfc3339(1_796_418_088_123), "2026-12-04T21:01:28.123Z");
    }
}
