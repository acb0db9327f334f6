//! Key management shared by the admin API and the CLI: both call these
//! functions, which work on the store alone.

use crate::auth::keys;
use crate::credits::Credits;
use crate::store::{
    now_millis, Adjustment, BalanceChange, KeyId, KeyRecord, Millis, NewKey, Role, Store,
    StoreError,
};
use serde::Serialize;

/// What a new key should be.
#[derive(Clone, Debug)]
pub struct KeySpec {
    pub name: String,
    pub credits: Credits,
    pub role: Role,
    pub models: Option<Vec<String>>,
    pub rate_limit_rpm: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub expires_at: Option<Millis>,
}

/// Why a key cannot be created as asked.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a key's name must not be empty")]
    EmptyName,
    #[error("a new key's credits cannot be negative")]
    NegativeCredits,
    #[error("model names must not be empty")]
    EmptyModel,
    #[error("{0} must be at least 1 (null or unset: the default)")]
    ZeroLimit(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates a key with a fresh secret; the secret is returned this once and
/// never stored.
pub async fn create(
    store: &dyn Store,
    spec: KeySpec,
    actor: &str,
) -> Result<(KeyRecord, String), KeyError> {
    if spec.name.trim().is_empty() {
        return Err(KeyError::EmptyName);
    }
    if spec.credits < Credits::ZERO {
        return Err(KeyError::NegativeCredits);
    }
    check_models(spec.models.as_deref())?;
    check_limits(spec.rate_limit_rpm, spec.max_concurrent)?;
    let secret = keys::generate();
    let record = store
        .create_key(NewKey {
            hash: keys::hash(&secret),
            name: spec.name,
            role: spec.role,
            credits: spec.credits,
            models: spec.models,
            rate_limit_rpm: spec.rate_limit_rpm,
            max_concurrent: spec.max_concurrent,
            expires_at: spec.expires_at,
            granted: false,
            actor: actor.to_string(),
        })
        .await?;
    Ok((record, secret))
}

/// A key's models, when limited, are named.
pub fn check_models(models: Option<&[String]>) -> Result<(), KeyError> {
    if models.into_iter().flatten().any(|m| m.trim().is_empty()) {
        return Err(KeyError::EmptyModel);
    }
    Ok(())
}

/// A key's own limits are at least 1: no limit, or the default, is `None`.
pub fn check_limits(rpm: Option<u32>, concurrent: Option<u32>) -> Result<(), KeyError> {
    if rpm == Some(0) {
        return Err(KeyError::ZeroLimit("rate_limit_rpm"));
    }
    if concurrent == Some(0) {
        return Err(KeyError::ZeroLimit("max_concurrent"));
    }
    Ok(())
}

/// Adds to or sets a balance, recorded with who and why.
pub async fn change_credits(
    store: &dyn Store,
    id: KeyId,
    change: BalanceChange,
    actor: &str,
    reason: Option<String>,
) -> Result<Credits, StoreError> {
    let reason = reason.unwrap_or_else(|| match change {
        BalanceChange::Add(_) => "top-up".into(),
        BalanceChange::Set(_) => "set".into(),
    });
    store
        .adjust(
            id,
            Adjustment {
                change,
                actor: actor.to_string(),
                reason,
            },
        )
        .await
}

pub async fn revoke(store: &dyn Store, id: KeyId) -> Result<KeyRecord, StoreError> {
    store.revoke_key(id, now_millis()).await
}

/// A key as the admin API and the CLI show it: never its secret or hash.
#[derive(Clone, Debug, Serialize)]
pub struct KeyView {
    pub id: KeyId,
    pub name: String,
    pub role: Role,
    /// `null` for admin keys, which are never charged.
    pub credits: Option<Credits>,
    pub models: Option<Vec<String>>,
    pub rate_limit_rpm: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub created_at: String,
    pub revoked_at: Option<String>,
    pub expires_at: Option<String>,
    pub disabled: bool,
}

impl From<&KeyRecord> for KeyView {
    fn from(k: &KeyRecord) -> Self {
        use crate::routes::account::rfc3339;
        KeyView {
            id: k.id,
            name: k.name.clone(),
            role: k.role,
            credits: (k.role == Role::User).then_some(k.balance),
            models: k.models.clone(),
            rate_limit_rpm: k.rate_limit_rpm,
            max_concurrent: k.max_concurrent,
            created_at: rfc3339(k.created_at),
            revoked_at: k.revoked_at.map(rfc3339),
            expires_at: k.expires_at.map(rfc3339),
            disabled: k.disabled,
        }
    }
}

/// Parses an RFC 3339 time into milliseconds since the epoch.
pub fn parse_time(text: &str) -> Option<Millis> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as Millis)
}
