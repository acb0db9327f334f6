//! Authentication: who is calling.
//!
//! [`Caller`] is an axum extractor: a handler that takes one only runs for a
//! request that carried a valid, active key. [`AdminCaller`] additionally
//! requires the admin role.

pub mod keys;
pub mod throttle;

use throttle::Standing;

use crate::app::AppState;
use crate::error::ApiError;
use crate::store::{now_millis, KeyHash, KeyRecord, Role};
use crate::telemetry::RequestLog;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use std::net::SocketAddr;
use std::sync::Arc;

fn nonblank(key: &[u8]) -> Option<&[u8]> {
    Some(key.trim_ascii()).filter(|k| !k.is_empty())
}

/// The key a request presents, as the header's bytes: `x-api-key` wins
/// over `Authorization: Bearer` whenever it is present, even when it is
/// wrong and the Bearer key is right (SDKs add a Bearer header of their
/// own). A blank header presents no key. A configured key may be any
/// string: one with characters beyond ASCII arrives as its UTF-8 bytes.
pub fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(key) = headers
        .get("x-api-key")
        .and_then(|v| nonblank(v.as_bytes()))
    {
        return Some(key);
    }
    let auth = headers.get(header::AUTHORIZATION)?.as_bytes().trim_ascii();
    let split = auth.iter().position(|b| *b == b' ')?;
    let (scheme, token) = auth.split_at(split);
    if scheme.eq_ignore_ascii_case(b"bearer") {
        nonblank(token)
    } else {
        None
    }
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key: KeyRecord,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.key.role == Role::Admin
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let client = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        let Some(presented) = presented_key(&parts.headers) else {
            return Err(ApiError::Unauthorized(
                "missing API key: send it in the x-api-key header or as Authorization: Bearer"
                    .into(),
            ));
        };
        let hash = keys::hash(presented);
        let standing = client.map_or(Standing::Clear, |ip| {
            state.auth_failures.standing(ip, &hash)
        });
        if let Standing::Blocked { retry_after, known } = standing {
            // Over the limit of wrong keys: only a key that has
            // authenticated from here since the first wrong one gets in; a
            // guess, right or wrong, gets the same 429, and is not looked
            // up (a store that caches the keys it found would answer a
            // right guess the second time sooner).
            let key = match known {
                true => lookup(state, &hash).await?,
                false => None,
            };
            return match key {
                Some(key) => Ok(remember(parts, key)),
                None => Err(too_many_failures(retry_after)),
            };
        }
        // The address may go over the limit while the key is looked up
        // (many guesses sent at once): decided again once it is found.
        match lookup(state, &hash).await? {
            Some(key) => {
                if let Some(ip) = client {
                    state
                        .auth_failures
                        .admitted(ip, &hash)
                        .map_err(too_many_failures)?;
                }
                Ok(remember(parts, key))
            }
            None => match client.and_then(|ip| state.auth_failures.record(ip)) {
                Some(retry_after) => Err(too_many_failures(retry_after)),
                None => Err(ApiError::Unauthorized("invalid API key".into())),
            },
        }
    }
}

fn too_many_failures(retry_after: u64) -> ApiError {
    ApiError::TooManyRequests {
        retry_after,
        message: "too many failed authentication attempts from this address".into(),
    }
}

/// The active key behind a presented secret's hash, if any.
async fn lookup(state: &AppState, hash: &KeyHash) -> Result<Option<KeyRecord>, ApiError> {
    let record = state.store.key_by_hash(hash).await?;
    Ok(record.filter(|k| k.is_active(now_millis())))
}

fn remember(parts: &Parts, key: KeyRecord) -> Caller {
    if let Some(log) = parts.extensions.get::<Arc<RequestLog>>() {
        log.set_key(key.id);
    }
    Caller { key }
}

/// A caller with the admin role.
#[derive(Clone, Debug)]
pub struct AdminCaller(pub Caller);

impl FromRequestParts<AppState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if caller.is_admin() {
            Ok(AdminCaller(caller))
        } else {
            Err(ApiError::Forbidden(
                "this endpoint needs the admin key".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn x_api_key_wins_over_bearer() {
        let h = headers(&[("x-api-key", "wrong"), ("authorization", "Bearer right")]);
        assert_eq!(presented_key(&h), Some(&b"wrong"[..]));
        // A blank one presents no key: the Bearer key is read.
        let h = headers(&[("x-api-key", "  "), ("authorization", "Bearer right")]);
        assert_eq!(presented_key(&h), Some(&b"right"[..]));
        assert_eq!(presented_key(&headers(&[("x-api-key", "")])), None);
    }

    #[test]
    fn bearer_is_read_case_insensitively() {
        assert_eq!(
            presented_key(&headers(&[("authorization", "bearer k1")])),
            Some(&b"k1"[..])
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "Basic k1")])),
            None
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "Bearer ")])),
            None
        );
        assert_eq!(presented_key(&headers(&[])), None);
    }

    #[test]
    fn a_key_beyond_ascii_is_read_as_its_utf8_bytes() {
        let mut h = HeaderMap::new();
        let value = header::HeaderValue::from_bytes("clé-secrète".as_bytes()).unwrap();
        h.insert("x-api-key", value.clone());
        assert_eq!(presented_key(&h), Some("clé-secrète".as_bytes()));
        assert_eq!(
            keys::hash(presented_key(&h).unwrap()),
            keys::hash("clé-secrète")
        );
        let mut h = HeaderMap::new();
        let bearer = header::HeaderValue::from_bytes("Bearer clé".as_bytes()).unwrap();
        h.insert(header::AUTHORIZATION, bearer);
        assert_eq!(presented_key(&h), Some("clé".as_bytes()));
    }
}
