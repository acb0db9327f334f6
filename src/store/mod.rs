//! Where keys, balances and the usage ledger live.
//!
//! [`Store`] is the one interface; [`memory`], [`sqlite`] and [`postgres`]
//! implement it with the same semantics. A store knows nothing of HTTP: it
//! answers questions about keys and applies reservations, settlements and
//! adjustments atomically.
//!
//! Balances obey one invariant: for every key, the sum of its adjustments
//! (grants, top-ups, sets) minus the credits of its usage rows equals its
//! balance, exactly.

/// The columns of a key row, in the order the SQL stores read them.
macro_rules! key_columns {
    () => {
        "id, name, role, balance, models, rate_limit_rpm, max_concurrent, \
         created_at, revoked_at, expires_at, granted, disabled"
    };
}

/// The columns of a usage row, in the order the SQL stores read them.
macro_rules! usage_columns {
    () => {
        "id, time, key_id, endpoint, model, status, prompt_tokens, \
         completion_tokens, credits, duration_ms"
    };
}

#[cfg(test)]
mod conformance;
pub mod memory;
pub mod postgres;
pub mod sqlite;

use crate::config::DatabaseUrl;
use crate::credits::Credits;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Locks `m`. A poisoned lock only means that a task panicked while holding
/// it; every holder in the stores leaves its state consistent before it
/// can panic, so the state is used as it is.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The error of a store's backend (the database or its files).
fn backend(msg: impl Into<String>) -> StoreError {
    StoreError::Backend(msg.into())
}

/// Counts that do not fit a 64-bit SQL integer are stored as the largest one.
fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Allowed models as the SQL stores keep them: a JSON array, or NULL for all.
fn models_json(models: &Option<Vec<String>>) -> Result<Option<String>, StoreError> {
    models
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| backend(e.to_string()))
}

pub type KeyId = i64;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "user" => Some(Role::User),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The SHA-256 of a key, hex-encoded: the only form in which keys are kept.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyHash(pub String);

/// One API key as the store holds it. Never carries the secret.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyRecord {
    pub id: KeyId,
    pub name: String,
    pub role: Role,
    pub balance: Credits,
    /// Models this key may use; `None` for all.
    pub models: Option<Vec<String>>,
    pub rate_limit_rpm: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
    pub expires_at: Option<Millis>,
    /// Granted from the configuration (`API_KEY`, `API_KEYS`, `ADMIN_KEY`).
    pub granted: bool,
    /// A granted key that is no longer in the configuration.
    pub disabled: bool,
}

impl KeyRecord {
    /// Whether the key may be used at `now`.
    pub fn is_active(&self, now: Millis) -> bool {
        self.revoked_at.is_none() && !self.disabled && self.expires_at.is_none_or(|t| t > now)
    }
}

/// A key to create.
#[derive(Clone, Debug)]
pub struct NewKey {
    pub hash: KeyHash,
    pub name: String,
    pub role: Role,
    pub credits: Credits,
    pub models: Option<Vec<String>>,
    pub rate_limit_rpm: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub expires_at: Option<Millis>,
    pub granted: bool,
    /// Who creates it, for the grant's adjustment entry.
    pub actor: String,
}

/// Changes to a key's settings; `None` leaves a field alone, `Some(None)`
/// clears an optional one.
#[derive(Clone, Debug, Default)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub models: Option<Option<Vec<String>>>,
    pub rate_limit_rpm: Option<Option<u32>>,
    pub max_concurrent: Option<Option<u32>>,
    pub expires_at: Option<Option<Millis>>,
}

impl KeyPatch {
    /// Applies the patch to a key, as every store does.
    pub fn apply(self, r: &mut KeyRecord) {
        if let Some(name) = self.name {
            r.name = name;
        }
        if let Some(models) = self.models {
            r.models = models;
        }
        if let Some(rpm) = self.rate_limit_rpm {
            r.rate_limit_rpm = rpm;
        }
        if let Some(max) = self.max_concurrent {
            r.max_concurrent = max;
        }
        if let Some(expires) = self.expires_at {
            r.expires_at = expires;
        }
    }
}

/// A balance change that is not a request.
#[derive(Clone, Debug)]
pub enum BalanceChange {
    Add(Credits),
    Set(Credits),
}

#[derive(Clone, Debug)]
pub struct Adjustment {
    pub change: BalanceChange,
    pub actor: String,
    pub reason: String,
}

/// An adjustment as recorded in the ledger.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AdjustmentEntry {
    pub time: Millis,
    pub key_id: KeyId,
    /// The balance change this entry made.
    pub delta: Credits,
    pub actor: String,
    pub reason: String,
}

/// One admitted request, as settled.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UsageRecord {
    pub time: Millis,
    pub key_id: KeyId,
    pub endpoint: String,
    pub model: Option<String>,
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub credits: Credits,
    pub duration_ms: u64,
}

/// A usage row with its ledger id (for paging).
#[derive(Clone, Debug, PartialEq)]
pub struct UsageEntry {
    pub id: i64,
    pub record: UsageRecord,
}

/// A page request: newest first, `before` is an exclusive ledger id.
#[derive(Clone, Copy, Debug)]
pub struct PageRequest {
    pub limit: u32,
    pub before: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct UsageTotals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub credits_spent: Credits,
}

/// A key granted by the configuration.
#[derive(Clone, Debug)]
pub struct Grant {
    pub hash: KeyHash,
    pub name: String,
    pub role: Role,
    pub credits: Credits,
}

impl Grant {
    /// The key this grant creates the first time it is seen.
    pub fn new_key(&self) -> NewKey {
        NewKey {
            hash: self.hash.clone(),
            name: self.name.clone(),
            role: self.role,
            credits: self.credits,
            models: None,
            rate_limit_rpm: None,
            max_concurrent: None,
            expires_at: None,
            granted: true,
            actor: "config".into(),
        }
    }
}

/// What [`Store::sync_grants`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GrantReport {
    pub created: Vec<KeyId>,
    pub reenabled: Vec<KeyId>,
    pub disabled: Vec<KeyId>,
    /// Keys given the role their grant now names (a secret moved between
    /// `ADMIN_KEY` and `API_KEY`/`API_KEYS`).
    pub role_changed: Vec<KeyId>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not enough credits (available: {available})")]
    InsufficientCredits { available: Credits },
    #[error("no key with id {0}")]
    NoSuchKey(KeyId),
    #[error("that key already exists")]
    DuplicateKey,
    #[error("a balance must stay within ±{} credits", Credits::MAX)]
    BalanceOutOfRange,
    #[error("storage failure: {0}")]
    Backend(String),
    /// A write the database did not confirm, and which it may have applied
    /// (its connection broke after it was sent, and it could not be asked
    /// again in time).
    #[error(
        "the database did not confirm the change ({0}); it may have been applied: \
         look at the key (its balance, or the key list for a new key) \
         before making it again"
    )]
    Unconfirmed(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The key with this hash, whatever its state. A store may answer from
    /// a short-lived cache (PostgreSQL: up to 1 s old, writes made through
    /// the same store excepted), so its balance may lag: read it with
    /// [`Store::key`].
    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError>;
    /// The key with this id, as stored now (never cached).
    async fn key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError>;
    /// Every key, oldest first.
    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError>;
    /// Creates a key and records its initial credits as a grant adjustment.
    async fn create_key(&self, new: NewKey) -> Result<KeyRecord, StoreError>;
    async fn update_key(&self, id: KeyId, patch: KeyPatch) -> Result<KeyRecord, StoreError>;
    async fn revoke_key(&self, id: KeyId, at: Millis) -> Result<KeyRecord, StoreError>;
    /// Applies a top-up or a set, recorded with who and why; returns the new
    /// balance.
    async fn adjust(&self, id: KeyId, adjustment: Adjustment) -> Result<Credits, StoreError>;
    /// Brings the granted keys in line with the configuration: creates keys
    /// seen for the first time, re-enables returning ones (with their old
    /// balance), disables granted keys no longer configured.
    async fn sync_grants(&self, grants: &[Grant]) -> Result<GrantReport, StoreError>;
    /// Reserves `amount` if the balance minus open reservations covers it
    /// (and the balance is positive); returns what remains available.
    async fn reserve(&self, id: KeyId, amount: Credits) -> Result<Credits, StoreError>;
    /// Releases a reservation of `reserved`, charges `usage.credits` and
    /// records the usage row, atomically; returns the new balance.
    async fn settle(&self, usage: UsageRecord, reserved: Credits) -> Result<Credits, StoreError>;
    /// Usage rows, newest first, of one key or of all.
    async fn usage(
        &self,
        key: Option<KeyId>,
        page: PageRequest,
    ) -> Result<Vec<UsageEntry>, StoreError>;
    async fn usage_totals(&self, id: KeyId) -> Result<UsageTotals, StoreError>;
    /// Every adjustment of a key, oldest first.
    async fn adjustments(&self, id: KeyId) -> Result<Vec<AdjustmentEntry>, StoreError>;
    /// Drops reservations left by a gateway that stopped without settling
    /// them. Called by a gateway at start.
    async fn release_stale_reservations(&self) -> Result<(), StoreError>;
    /// Gives back what the store holds in advance for requests to come
    /// (PostgreSQL's credit leases). Called by a gateway once it has
    /// drained, before it exits; the store stays usable.
    async fn close(&self) {}
}

pub type SharedStore = Arc<dyn Store>;

/// Opens the store that `url` names for a gateway, applying migrations.
pub async fn open(url: &DatabaseUrl) -> Result<SharedStore, StoreError> {
    Ok(match url {
        DatabaseUrl::Sqlite(path) => Arc::new(sqlite::SqliteStore::open(path).await?),
        _ => open_beside(url).await?,
    })
}

/// Opens the store that `url` names beside the gateways that may be serving
/// it (the CLI): the same, but a SQLite file is not taken from its gateway
/// (see [`sqlite::SqliteStore::open_beside`]).
pub async fn open_beside(url: &DatabaseUrl) -> Result<SharedStore, StoreError> {
    Ok(match url {
        DatabaseUrl::Memory => Arc::new(memory::MemoryStore::default()),
        DatabaseUrl::Sqlite(path) => Arc::new(sqlite::SqliteStore::open_beside(path).await?),
        DatabaseUrl::Postgres(url) => Arc::new(postgres::PostgresStore::connect(url).await?),
    })
}

/// The change in balance that `change` makes to `current`; refused when
/// the balance would leave ±[`Credits::MAX`].
pub fn delta_of(change: &BalanceChange, current: Credits) -> Result<Credits, StoreError> {
    let (current, max) = (current.millis(), Credits::MAX.millis());
    let delta = match change {
        BalanceChange::Add(n) => Some(n.millis()),
        BalanceChange::Set(n) => n.millis().checked_sub(current),
    };
    delta
        .filter(|d| current.checked_add(*d).is_some_and(|b| b.abs() <= max))
        .map(Credits::from_millis)
        .ok_or(StoreError::BalanceOutOfRange)
}
