//! The `memory` store: everything in process memory, nothing kept across
//! restarts. For tests and demos, and the reference for the other stores'
//! semantics.
//!
//! Each key has its own lock, so requests of different keys never wait for
//! each other; the ledger is an append-only list behind its own lock.
//!
//! The list keeps the last [`USAGE_ROWS`] requests: a demo left running
//! under load must not grow without end. Balances and each key's totals
//! are kept apart from it and stay exact.

use super::*;
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError, RwLock};

/// How many usage rows (the most recent) the memory store keeps: some
/// tens of MB at most.
pub const USAGE_ROWS: usize = 100_000;

pub struct MemoryStore {
    keys: RwLock<Keys>,
    ledger: Mutex<Ledger>,
    /// At most this many usage rows are kept.
    usage_rows: usize,
}

impl Default for MemoryStore {
    fn default() -> MemoryStore {
        MemoryStore::keeping(USAGE_ROWS)
    }
}

#[derive(Default)]
struct Keys {
    by_id: HashMap<KeyId, Arc<Mutex<KeyState>>>,
    by_hash: HashMap<KeyHash, KeyId>,
    next_id: KeyId,
}

struct KeyState {
    record: KeyRecord,
    reserved: Credits,
    /// What its ledger rows add up to, kept as they are written.
    totals: UsageTotals,
}

#[derive(Default)]
struct Ledger {
    /// The most recent usage rows, oldest first.
    usage: VecDeque<UsageEntry>,
    /// The id of the last usage row written.
    last_usage_id: i64,
    adjustments: Vec<AdjustmentEntry>,
}

impl MemoryStore {
    /// A store whose ledger keeps the last `usage_rows` requests.
    pub fn keeping(usage_rows: usize) -> MemoryStore {
        MemoryStore {
            keys: RwLock::default(),
            ledger: Mutex::default(),
            usage_rows: usage_rows.max(1),
        }
    }

    fn state(&self, id: KeyId) -> Result<Arc<Mutex<KeyState>>, StoreError> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .get(&id)
            .cloned()
            .ok_or(StoreError::NoSuchKey(id))
    }

    fn record_adjustment(&self, key_id: KeyId, delta: Credits, actor: &str, reason: &str) {
        lock(&self.ledger).adjustments.push(AdjustmentEntry {
            time: now_millis(),
            key_id,
            delta,
            actor: actor.to_string(),
            reason: reason.to_string(),
        });
    }

    fn modify(&self, id: KeyId, f: impl FnOnce(&mut KeyRecord)) -> Result<KeyRecord, StoreError> {
        let state = self.state(id)?;
        let mut state = lock(&state);
        f(&mut state.record);
        Ok(state.record.clone())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let id = {
            let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
            match keys.by_hash.get(hash) {
                Some(id) => *id,
                None => return Ok(None),
            }
        };
        self.key(id).await
    }

    async fn key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        match self.state(id) {
            Ok(state) => Ok(Some(lock(&state).record.clone())),
            Err(StoreError::NoSuchKey(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<KeyRecord> = keys
            .by_id
            .values()
            .map(|s| lock(s).record.clone())
            .collect();
        all.sort_by_key(|k| k.id);
        Ok(all)
    }

    async fn create_key(&self, new: NewKey) -> Result<KeyRecord, StoreError> {
        let record = {
            let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
            if keys.by_hash.contains_key(&new.hash) {
                return Err(StoreError::DuplicateKey);
            }
            keys.next_id += 1;
            let record = KeyRecord {
                id: keys.next_id,
                name: new.name,
                role: new.role,
                balance: new.credits,
                models: new.models,
                rate_limit_rpm: new.rate_limit_rpm,
                max_concurrent: new.max_concurrent,
                created_at: now_millis(),
                revoked_at: None,
                expires_at: new.expires_at,
                granted: new.granted,
                disabled: false,
            };
            keys.by_hash.insert(new.hash, record.id);
            keys.by_id.insert(
                record.id,
                Arc::new(Mutex::new(KeyState {
                    record: record.clone(),
                    reserved: Credits::ZERO,
                    totals: UsageTotals::default(),
                })),
            );
            record
        };
        self.record_adjustment(record.id, new.credits, &new.actor, "grant");
        Ok(record)
    }

    async fn update_key(&self, id: KeyId, patch: KeyPatch) -> Result<KeyRecord, StoreError> {
        self.modify(id, |r| patch.apply(r))
    }

    async fn revoke_key(&self, id: KeyId, at: Millis) -> Result<KeyRecord, StoreError> {
        self.modify(id, |r| {
            r.revoked_at.get_or_insert(at);
        })
    }

    async fn adjust(&self, id: KeyId, adjustment: Adjustment) -> Result<Credits, StoreError> {
        let state = self.state(id)?;
        let mut state = lock(&state);
        let delta = delta_of(&adjustment.change, state.record.balance)?;
        state.record.balance += delta;
        // Recorded while the key is locked, so the ledger order matches the
        // order in which the balance changed.
        self.record_adjustment(id, delta, &adjustment.actor, &adjustment.reason);
        Ok(state.record.balance)
    }

    async fn sync_grants(&self, grants: &[Grant]) -> Result<GrantReport, StoreError> {
        let mut report = GrantReport::default();
        for grant in grants {
            match self.key_by_hash(&grant.hash).await? {
                None => {
                    let record = self.create_key(grant.new_key()).await?;
                    report.created.push(record.id);
                }
                Some(existing) => {
                    if existing.disabled {
                        self.modify(existing.id, |r| r.disabled = false)?;
                        report.reenabled.push(existing.id);
                    }
                    if existing.role != grant.role {
                        self.modify(existing.id, |r| r.role = grant.role)?;
                        report.role_changed.push(existing.id);
                    }
                }
            }
        }
        let configured: Vec<KeyId> = {
            let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
            grants
                .iter()
                .filter_map(|g| keys.by_hash.get(&g.hash).copied())
                .collect()
        };
        for key in self.keys().await? {
            if key.granted && !key.disabled && !configured.contains(&key.id) {
                self.modify(key.id, |r| r.disabled = true)?;
                report.disabled.push(key.id);
            }
        }
        Ok(report)
    }

    async fn reserve(&self, id: KeyId, amount: Credits) -> Result<Credits, StoreError> {
        let state = self.state(id)?;
        let mut state = lock(&state);
        let available = state.record.balance - state.reserved;
        if !state.record.balance.is_positive() || available < amount {
            return Err(StoreError::InsufficientCredits { available });
        }
        state.reserved += amount;
        Ok(available - amount)
    }

    async fn settle(&self, usage: UsageRecord, reserved: Credits) -> Result<Credits, StoreError> {
        let state = self.state(usage.key_id)?;
        let mut state = lock(&state);
        state.reserved -= reserved;
        state.record.balance -= usage.credits;
        let totals = &mut state.totals;
        totals.requests += 1;
        totals.prompt_tokens = totals.prompt_tokens.saturating_add(usage.prompt_tokens);
        totals.completion_tokens = totals
            .completion_tokens
            .saturating_add(usage.completion_tokens);
        totals.credits_spent += usage.credits;
        let balance = state.record.balance;
        let mut ledger = lock(&self.ledger);
        ledger.last_usage_id += 1;
        let id = ledger.last_usage_id;
        if ledger.usage.len() >= self.usage_rows {
            ledger.usage.pop_front();
        }
        ledger.usage.push_back(UsageEntry { id, record: usage });
        Ok(balance)
    }

    async fn usage(
        &self,
        key: Option<KeyId>,
        page: PageRequest,
    ) -> Result<Vec<UsageEntry>, StoreError> {
        let ledger = lock(&self.ledger);
        Ok(ledger
            .usage
            .iter()
            .rev()
            .filter(|e| page.before.is_none_or(|b| e.id < b))
            .filter(|e| key.is_none_or(|k| e.record.key_id == k))
            .take(page.limit as usize)
            .cloned()
            .collect())
    }

    async fn usage_totals(&self, id: KeyId) -> Result<UsageTotals, StoreError> {
        Ok(match self.state(id) {
            Ok(state) => lock(&state).totals.clone(),
            Err(_) => UsageTotals::default(),
        })
    }

    async fn adjustments(&self, id: KeyId) -> Result<Vec<AdjustmentEntry>, StoreError> {
        let ledger = lock(&self.ledger);
        Ok(ledger
            .adjustments
            .iter()
            .filter(|a| a.key_id == id)
            .cloned()
            .collect())
    }

    async fn release_stale_reservations(&self) -> Result<(), StoreError> {
        // A fresh process has none.
        Ok(())
    }
}
