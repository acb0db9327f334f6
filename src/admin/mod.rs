//! The admin API under `/admin/` (SPEC §5): key management and the whole
//! ledger, for the admin key only.

pub mod export;
pub mod keys;

use crate::app::AppState;
use crate::auth::AdminCaller;
use crate::credits::Credits;
use crate::error::ApiError;
use crate::routes::account::{page_request, usage_page, MAX_PAGE};
use crate::routes::forward::read_limited;
use crate::store::{
    BalanceChange, KeyId, KeyPatch, PageRequest, Role, SharedStore, StoreError, UsageEntry,
};
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use export::Format;
use keys::{KeySpec, KeyView};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/keys", post(create_key).get(list_keys))
        .route(
            "/admin/keys/{id}",
            get(get_key).patch(update_key).delete(revoke_key),
        )
        .route("/admin/keys/{id}/credits", post(change_credits))
        .route("/admin/usage", get(usage))
}

/// The largest body the admin API reads (a key's fields, a balance change).
const BODY_LIMIT: usize = 1024 * 1024;

/// A JSON request body of at most [`BODY_LIMIT`] bytes, parsed into `T`.
/// Every refusal is one of tollgate's JSON errors (axum's own extractors
/// answer in plain text).
struct JsonBody<T>(T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let idle = state.config.client_header_timeout;
        let body = read_limited(request.into_body(), BODY_LIMIT, idle).await?;
        parse(&body).map(JsonBody)
    }
}

/// Parses a JSON body into `T`, with a 400 that says what is wrong.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))
}

fn parse_id(id: &str) -> Result<KeyId, ApiError> {
    id.parse()
        .map_err(|_| ApiError::NotFound(format!("no key with id {id:?}")))
}

fn actor(admin: &AdminCaller) -> String {
    format!("admin key {}", admin.0.key.id)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    #[serde(default)]
    credits: Option<Credits>,
    #[serde(default)]
    role: Option<Role>,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    rate_limit_rpm: Option<u32>,
    #[serde(default)]
    max_concurrent: Option<u32>,
    #[serde(default)]
    expires_at: Option<String>,
}

async fn create_key(
    State(state): State<AppState>,
    admin: AdminCaller,
    JsonBody(req): JsonBody<CreateKey>,
) -> Result<Response, ApiError> {
    let expires_at = req
        .expires_at
        .as_deref()
        .map(|t| {
            keys::parse_time(t).ok_or_else(|| {
                ApiError::BadRequest(format!("expires_at {t:?} is not an RFC 3339 time"))
            })
        })
        .transpose()?;
    let spec = KeySpec {
        name: req.name,
        credits: req.credits.unwrap_or(Credits::ZERO),
        role: req.role.unwrap_or(Role::User),
        models: req.models,
        rate_limit_rpm: req.rate_limit_rpm,
        max_concurrent: req.max_concurrent,
        expires_at,
    };
    let (record, secret) = keys::create(state.store.as_ref(), spec, &actor(&admin)).await?;
    let mut view = serde_json::to_value(KeyView::from(&record))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    view["key"] = Value::String(secret);
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn list_keys(
    State(state): State<AppState>,
    _admin: AdminCaller,
) -> Result<Json<Vec<KeyView>>, ApiError> {
    let keys = state.store.keys().await?;
    Ok(Json(keys.iter().map(KeyView::from).collect()))
}

async fn get_key(
    State(state): State<AppState>,
    _admin: AdminCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let key = state
        .store
        .key(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no key with id {id}")))?;
    let usage = state.store.usage_totals(id).await?;
    let mut view =
        serde_json::to_value(KeyView::from(&key)).map_err(|e| ApiError::Internal(e.to_string()))?;
    view["usage"] = json!(usage);
    Ok(Json(view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreditsChange {
    add: Option<Credits>,
    set: Option<Credits>,
    reason: Option<String>,
}

async fn change_credits(
    State(state): State<AppState>,
    admin: AdminCaller,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<CreditsChange>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let change = match (req.add, req.set) {
        (Some(n), None) => BalanceChange::Add(n),
        (None, Some(n)) => BalanceChange::Set(n),
        _ => {
            return Err(ApiError::BadRequest(
                "send exactly one of {\"add\": n} or {\"set\": n}".into(),
            ))
        }
    };
    let balance =
        keys::change_credits(state.store.as_ref(), id, change, &actor(&admin), req.reason).await?;
    Ok(Json(json!({ "id": id, "credits": balance })))
}

/// A PATCH body: absent fields stay, `null` clears an optional one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateKey {
    #[serde(default, deserialize_with = "present")]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    models: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "present")]
    rate_limit_rpm: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    max_concurrent: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    expires_at: Option<Option<String>>,
}

/// Distinguishes a field given as `null` from a missing one.
fn present<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

async fn update_key(
    State(state): State<AppState>,
    _admin: AdminCaller,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<UpdateKey>,
) -> Result<Json<KeyView>, ApiError> {
    let id = parse_id(&id)?;
    let name = match req.name {
        Some(None) => return Err(ApiError::BadRequest("a key's name cannot be null".into())),
        Some(Some(name)) if name.trim().is_empty() => {
            return Err(ApiError::BadRequest("name must not be empty".into()))
        }
        name => name.flatten(),
    };
    keys::check_models(req.models.as_ref().and_then(|m| m.as_deref()))?;
    keys::check_limits(req.rate_limit_rpm.flatten(), req.max_concurrent.flatten())?;
    let expires_at = match req.expires_at {
        Some(Some(t)) => Some(Some(keys::parse_time(&t).ok_or_else(|| {
            ApiError::BadRequest(format!("expires_at {t:?} is not an RFC 3339 time"))
        })?)),
        Some(None) => Some(None),
        None => None,
    };
    let patch = KeyPatch {
        name,
        models: req.models,
        rate_limit_rpm: req.rate_limit_rpm,
        max_concurrent: req.max_concurrent,
        expires_at,
    };
    let key = state.store.update_key(id, patch).await?;
    Ok(Json(KeyView::from(&key)))
}

async fn revoke_key(
    State(state): State<AppState>,
    _admin: AdminCaller,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    let id = parse_id(&id)?;
    let key = keys::revoke(state.store.as_ref(), id).await?;
    Ok(Json(KeyView::from(&key)))
}

#[derive(Deserialize)]
struct UsageFilter {
    key: Option<KeyId>,
    format: Option<String>,
}

/// `GET /admin/usage`: paged JSON like `/usage`, or the whole ledger as
/// `?format=csv` / `?format=ndjson` for export.
async fn usage(
    State(state): State<AppState>,
    _admin: AdminCaller,
    uri: Uri,
) -> Result<Response, ApiError> {
    let filter = Query::<UsageFilter>::try_from_uri(&uri)
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    match filter.format.as_deref() {
        None | Some("json") => {
            let page = page_request(&uri)?;
            let page = usage_page(state.store.as_ref(), filter.key, page, true).await?;
            Ok(Json(page).into_response())
        }
        Some(format @ ("csv" | "ndjson")) => {
            let csv = format == "csv";
            let body = export(
                state.store.clone(),
                filter.key,
                if csv { Format::Csv } else { Format::Ndjson },
            )
            .await?;
            let content_type = if csv {
                "text/csv; charset=utf-8"
            } else {
                "application/x-ndjson"
            };
            Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
        }
        Some(other) => Err(ApiError::BadRequest(format!(
            "format {other:?}: expected json, csv or ndjson"
        ))),
    }
}

/// The whole ledger (of one key, or all), newest first, as a body that
/// reads it a page at a time as the client takes it: an export of any
/// size holds one page in memory. The first page is read before the
/// response starts, so that a store that fails at once gets its error
/// status; a failure after that cuts the body short, which the client sees
/// as an incomplete reply.
async fn export(store: SharedStore, key: Option<KeyId>, format: Format) -> Result<Body, ApiError> {
    /// Where the export goes on from.
    enum Next {
        Page(Vec<UsageEntry>),
        Before(i64),
        Done,
    }
    let page = |before| PageRequest {
        limit: MAX_PAGE,
        before,
    };
    let first = store.usage(key, page(None)).await?;
    let header = match format {
        Format::Csv => format!("{}\n", export::CSV_HEADER),
        Format::Ndjson => String::new(),
    };
    let pages = futures_util::stream::try_unfold(Next::Page(first), move |next| {
        let store = store.clone();
        async move {
            let rows = match next {
                Next::Done => return Ok::<_, StoreError>(None),
                Next::Page(rows) => rows,
                Next::Before(id) => store.usage(key, page(Some(id))).await?,
            };
            let Some(last) = rows.last().map(|row| row.id) else {
                return Ok(None);
            };
            // Rows added meanwhile are newer than the first page: a short
            // page is the last.
            let next = if rows.len() < MAX_PAGE as usize {
                Next::Done
            } else {
                Next::Before(last)
            };
            let mut text = String::new();
            for row in rows {
                text.push_str(&export::line(row, format));
                text.push('\n');
            }
            Ok(Some((Bytes::from(text), next)))
        }
    });
    let header = futures_util::stream::once(async move { Ok(Bytes::from(header)) });
    Ok(Body::from_stream(futures_util::StreamExt::chain(
        header, pages,
    )))
}
