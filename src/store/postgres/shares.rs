//! This instance's own account of what it holds reserved, and the repair
//! of its share rows when a statement's outcome could not be known.
//!
//! Every statement that changes this instance's shares (a reservation, a
//! release, a settlement batch) runs while holding [`Shares::enter`], and
//! notes its effect here once the server answered. When the connection
//! broke before the answer came, the statement may or may not have been
//! applied: the statement's caller marks the shares unsure (a reservation
//! then counts as not made, a release as made). Later, once the server
//! answers again, [`Shares::reconcile`] waits until no such statement is
//! running and, in one transaction, sets this instance's share rows to
//! what is noted here, moving `api_keys.reserved` by the same amounts.
//! Credits are thus never held for good because of a broken connection,
//! nor released while a request of this instance still holds them (as
//! after another gateway took this one for dead).

use super::{lock, KeyId, StoreError};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{RwLock, RwLockReadGuard};

/// How long a reconciliation waits for the statements in flight; it gives
/// up (and tries at the next heartbeat) rather than hold up new requests,
/// which queue behind a waiting reconciliation.
const RECONCILE_WAIT: Duration = Duration::from_millis(250);

#[derive(Default)]
pub(super) struct Shares {
    /// Per key, thousandths of a credit held by this instance's open
    /// reservations. Keys holding nothing are absent.
    held: Mutex<HashMap<KeyId, i64>>,
    /// Held for reading by each statement that changes the shares, for
    /// writing by a reconciliation.
    gate: RwLock<()>,
    /// Some statement's outcome is unknown: the share rows may differ from
    /// `held`.
    unsure: AtomicBool,
    /// The keys of the statements whose outcome is unknown. Their rows are
    /// locked by the reconciliation even when this instance holds nothing
    /// of them, so that it waits for such a statement still queued for
    /// the key's lock at the server (the server does not notice that its
    /// client is gone while the statement waits).
    suspects: Mutex<std::collections::HashSet<KeyId>>,
}

impl Shares {
    /// To be held while a statement that changes the shares runs and its
    /// effect is noted.
    pub(super) async fn enter(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// A reservation of `millis` on key `id` was applied.
    pub(super) fn reserved(&self, id: KeyId, millis: i64) {
        *lock(&self.held).entry(id).or_insert(0) += millis;
    }

    /// `millis` of key `id` were released (settled or given back), or are
    /// to be, whatever the server holds.
    pub(super) fn released(&self, id: KeyId, millis: i64) {
        let mut held = lock(&self.held);
        if let Some(amount) = held.get_mut(&id) {
            *amount -= millis;
            if *amount <= 0 {
                held.remove(&id);
            }
        }
    }

    /// The share rows may no longer match: reconcile at the next chance.
    pub(super) fn unsure(&self) {
        self.unsure.store(true, Ordering::SeqCst);
    }

    /// A statement on key `id` may or may not have been applied.
    pub(super) fn unsure_of(&self, id: KeyId) {
        lock(&self.suspects).insert(id);
        self.unsure();
    }

    pub(super) fn is_unsure(&self) -> bool {
        self.unsure.load(Ordering::SeqCst)
    }

    /// Sets this instance's share rows (and `api_keys.reserved` with them)
    /// to what is noted here, if they may differ. Returns whether it did.
    pub(super) async fn reconcile(
        &self,
        pool: &PgPool,
        instance: &str,
    ) -> Result<bool, StoreError> {
        if !self.is_unsure() {
            return Ok(false);
        }
        let Ok(_alone) = tokio::time::timeout(RECONCILE_WAIT, self.gate.write()).await else {
            return Ok(false);
        };
        // No statement runs now: clear first, so that a failure below (or
        // a later unknown outcome) leaves it set.
        self.unsure.store(false, Ordering::SeqCst);
        let suspects = std::mem::take(&mut *lock(&self.suspects));
        let (mut ids, mut amounts): (Vec<KeyId>, Vec<i64>) = lock(&self.held)
            .iter()
            .map(|(id, amount)| (*id, *amount))
            .unzip();
        for id in &suspects {
            if !ids.contains(id) {
                ids.push(*id);
                amounts.push(0);
            }
        }
        let result = set_shares(pool, instance, &ids, &amounts).await;
        if result.is_err() {
            // Tried again, suspects and all, at the next heartbeat.
            lock(&self.suspects).extend(suspects);
            self.unsure();
        }
        result.map(|()| true)
    }
}

/// In one transaction: locks, in id order, every key this instance holds a
/// share of (by its rows or by `ids`), then sets its share of each key in
/// `ids` to the matching `amounts` and of every other key to nothing,
/// moving each key's `reserved` by the difference.
async fn set_shares(
    pool: &PgPool,
    instance: &str,
    ids: &[KeyId],
    amounts: &[i64],
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    // Every statement of this instance that changes its shares waits for
    // this one: it waits briefly for other gateways' locks, or gives up and
    // is tried again at the next heartbeat.
    sqlx::query("SET LOCAL lock_timeout = '200ms'")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "SELECT id FROM api_keys WHERE id = ANY($2) OR id IN \
         (SELECT key_id FROM instance_reservations WHERE instance_id = $1) \
         ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(instance)
    .bind(ids)
    .execute(&mut *tx)
    .await?;
    // The key rows are locked, so no other statement changes these share
    // rows until the commit; this statement's snapshot, taken after the
    // locks, sees them as they are.
    sqlx::query(
        "WITH wanted AS ( \
             SELECT * FROM unnest($2::BIGINT[], $3::BIGINT[]) AS w(key_id, reserved) \
         ), diff AS ( \
             SELECT COALESCE(w.key_id, r.key_id) AS key_id, \
                    COALESCE(w.reserved, 0) AS reserved, \
                    COALESCE(w.reserved, 0) - COALESCE(r.reserved, 0) AS delta \
             FROM wanted w FULL JOIN \
                  (SELECT key_id, reserved FROM instance_reservations \
                   WHERE instance_id = $1) r ON r.key_id = w.key_id \
         ), share AS ( \
             INSERT INTO instance_reservations (instance_id, key_id, reserved) \
             SELECT $1, key_id, reserved FROM diff WHERE delta <> 0 \
             ON CONFLICT (instance_id, key_id) DO UPDATE SET reserved = EXCLUDED.reserved \
         ) UPDATE api_keys a SET reserved = a.reserved + diff.delta \
           FROM diff WHERE a.id = diff.key_id AND diff.delta <> 0",
    )
    .bind(instance)
    .bind(ids)
    .bind(amounts)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Whether the statement that failed with `e` may have been applied: it
/// may have reached the server, and the server did not say that it failed.
/// Known not applied: never sent (no connection from the pool, a value
/// that could not be encoded), or refused by the server; but a server that
/// ends the session (classes 08, 57, 58, XX) may do so after the commit.
pub(super) fn outcome_unknown(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Configuration(_)
        | sqlx::Error::Encode(_) => false,
        sqlx::Error::Database(d) => d.code().is_some_and(|code| {
            ["08", "57", "58", "XX"]
                .iter()
                .any(|class| code.starts_with(class))
        }),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::outcome_unknown;

    #[test]
    fn only_errors_before_sending_are_known_not_applied() {
        let broken = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(outcome_unknown(&sqlx::Error::Io(broken)));
        assert!(outcome_unknown(&sqlx::Error::Protocol("cut".into())));
        assert!(outcome_unknown(&sqlx::Error::WorkerCrashed));
        assert!(!outcome_unknown(&sqlx::Error::PoolTimedOut));
        assert!(!outcome_unknown(&sqlx::Error::PoolClosed));
    }
}
