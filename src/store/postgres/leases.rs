//! Leases: credits of a key that this instance reserved at the server in
//! advance, in one statement, and hands out to its own requests without a
//! round trip.
//!
//! A reservation that the server admitted and that left the key at least
//! [`LEASE_HEADROOM`] blocks available starts a *fill*: one more
//! reservation, of a block of [`LEASE_REQUESTS`] times its size, made by a
//! task of its own. The block is an ordinary reservation of this instance
//! (it raises `api_keys.reserved` and this instance's share), so the
//! server's rule that reservations never exceed the balance holds for it,
//! other gateways see it as reserved, and a gateway killed while holding
//! one has it released with its other reservations. Each request served
//! from the lease is settled (or given back) like any other reservation of
//! its size, which moves that part of the block from reserved to charged.
//! A lease handed down to less than half its block asks for the next fill
//! (if the key still has the headroom), so that a steadily used key's
//! requests never find it empty.
//!
//! What is left of a lease is given back [`LEASE_FOR`] after its last fill,
//! at once when a key is written through the store (a top-up, a set, a
//! revocation...), so that the write governs the next request, when a
//! settlement leaves the key less than the lease holds (a charge can
//! exceed its reservation), and when the store is closed (the gateway has
//! drained and stops). Keys with
//! less than the headroom available are never leased: every reservation on
//! them goes to the server, exactly as without leases, so a nearly spent
//! key is shared between gateways to the last thousandth of a credit. A
//! reservation the server refuses while a fill of the key is in flight or
//! its lease holds enough (the fill raced it to the last credits) is
//! served from the lease: a burst on one gateway gets exactly the key's
//! credits.

use super::{lock, KeyId};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a lease hands out credits after its last fill; what is left
/// then is given back. As long as the key cache, so that other gateways'
/// and the CLI's writes govern this instance within the same second.
pub(super) const LEASE_FOR: Duration = Duration::from_secs(1);
/// A lease is this many reservations of the size that asked for it.
pub(super) const LEASE_REQUESTS: i64 = 64;
/// A lease is taken only while the key has this many such blocks
/// available after the reservation that asks for it.
pub(super) const LEASE_HEADROOM: i64 = 16;

/// The leases, and who waits for a fill to end
/// ([`Leases::take_after_refusal`]).
#[derive(Default)]
pub(super) struct Leases(Mutex<State>, tokio::sync::Notify);

#[derive(Default)]
struct State {
    /// Raised when every lease is ended: a fill that started before does
    /// not install its block (it is given back instead).
    epoch: u64,
    /// Numbers the fills; an expiry ends only the lease of its own fill.
    fills: u64,
    by_key: HashMap<KeyId, Lease>,
    /// Keys with a fill in flight (at most one each).
    filling: HashSet<KeyId>,
}

struct Lease {
    /// Thousandths of a credit reserved at the server, not yet handed out.
    left: i64,
    /// What the server reported available (net of every reservation, this
    /// lease's included) at the last fill.
    available: i64,
    /// Until when `left` is handed out.
    until: Instant,
    /// The size of its last fill's block.
    block: i64,
    /// The number of its last fill.
    fill: u64,
}

/// A fill to make: reserve `block` on key `id` for the lease.
#[derive(Debug, PartialEq)]
pub(super) struct Fill {
    pub id: KeyId,
    pub block: i64,
    epoch: u64,
}

/// What [`Leases::take`] handed out.
#[derive(Debug, PartialEq)]
pub(super) struct Taken {
    /// What the key has available now, as far as this instance knows.
    pub available: i64,
    /// The fill to make now: the lease is down to less than half a block
    /// (refilled before it runs out, so that no request waits for it).
    pub refill: Option<Fill>,
}

/// When to look at key `id`'s lease again, and which fill it must still
/// belong to for that look to end it.
#[derive(Debug, PartialEq)]
pub(super) struct Expiry {
    pub id: KeyId,
    pub at: Instant,
    fill: u64,
}

impl Leases {
    /// Hands out `millis` from key `id`'s lease, if it is running and holds
    /// that much.
    pub(super) fn take(&self, id: KeyId, millis: i64, now: Instant) -> Option<Taken> {
        let mut guard = lock(&self.0);
        let state = &mut *guard;
        let lease = state.by_key.get_mut(&id)?;
        if now >= lease.until || lease.left < millis {
            return None;
        }
        lease.left -= millis;
        let available = lease.available.saturating_add(lease.left);
        let headroom = lease.block.saturating_mul(LEASE_HEADROOM);
        let low = lease.left < lease.block / 2 && lease.available >= headroom;
        let refill = (low && state.filling.insert(id)).then_some(Fill {
            id,
            block: lease.block,
            epoch: state.epoch,
        });
        Some(Taken { available, refill })
    }

    /// After the server admitted a reservation of `millis` on key `id` and
    /// left `available`: the fill to make, if the key has the headroom and
    /// neither a fill in flight nor a running lease that covers `millis`.
    pub(super) fn fill_for(
        &self,
        id: KeyId,
        millis: i64,
        available: i64,
        now: Instant,
    ) -> Option<Fill> {
        if millis <= 0 {
            return None;
        }
        let block = millis.checked_mul(LEASE_REQUESTS)?;
        if available < block.checked_mul(LEASE_HEADROOM)? {
            return None;
        }
        let mut state = lock(&self.0);
        if state.filling.contains(&id) {
            return None;
        }
        if let Some(lease) = state.by_key.get(&id) {
            if now < lease.until && lease.left >= millis {
                return None;
            }
        }
        state.filling.insert(id);
        Some(Fill {
            id,
            block,
            epoch: state.epoch,
        })
    }

    /// After the server refused a reservation of `millis` on key `id`:
    /// what this instance's lease holds may be what the server no longer
    /// had (a fill that raced the request took it). Waits for a fill of
    /// the key in flight, then hands out from the lease as [`Leases::take`]
    /// does; `None` when it holds too little.
    pub(super) async fn take_after_refusal(&self, id: KeyId, millis: i64) -> Option<Taken> {
        loop {
            let filled = self.1.notified();
            tokio::pin!(filled);
            filled.as_mut().enable();
            if let Some(taken) = self.take(id, millis, Instant::now()) {
                return Some(taken);
            }
            if !lock(&self.0).filling.contains(&id) {
                return None;
            }
            filled.await;
        }
    }

    /// The server admitted `fill`'s block and left `available`: the block
    /// joins the key's lease, whose expiry is returned. `Err` with the
    /// block when the leases were ended meanwhile: it is to be given back.
    pub(super) fn filled(&self, fill: Fill, available: i64, now: Instant) -> Result<Expiry, i64> {
        let expiry = self.install(fill, available, now);
        self.1.notify_waiters();
        expiry
    }

    fn install(&self, fill: Fill, available: i64, now: Instant) -> Result<Expiry, i64> {
        let mut state = lock(&self.0);
        state.filling.remove(&fill.id);
        if state.epoch != fill.epoch {
            return Err(fill.block);
        }
        state.fills += 1;
        let number = state.fills;
        let until = now + LEASE_FOR;
        let lease = state.by_key.entry(fill.id).or_insert(Lease {
            left: 0,
            available,
            until,
            block: fill.block,
            fill: number,
        });
        // What an expired lease still holds stays reserved at the server
        // until its expiry gives it back, so it is carried over instead.
        lease.left = lease.left.saturating_add(fill.block);
        lease.available = available;
        lease.until = until;
        lease.block = fill.block;
        lease.fill = number;
        Ok(Expiry {
            id: fill.id,
            at: until,
            fill: number,
        })
    }

    /// The server refused `fill`'s block (or could not be asked).
    pub(super) fn fill_failed(&self, fill: Fill) {
        lock(&self.0).filling.remove(&fill.id);
        self.1.notify_waiters();
    }

    /// `expiry` is due: what to give back, if its fill is still the lease's
    /// last (a later fill has an expiry of its own); the lease ends.
    pub(super) fn expire(&self, expiry: &Expiry) -> i64 {
        let mut state = lock(&self.0);
        match state.by_key.get(&expiry.id) {
            Some(lease) if lease.fill == expiry.fill => {
                let left = lease.left;
                state.by_key.remove(&expiry.id);
                left
            }
            _ => 0,
        }
    }

    /// A settlement left key `id` with `balance`. A lease that holds as
    /// much or more (or any lease of a key at or below zero) ends, and
    /// what it holds is returned, to give back: its requests would be
    /// admitted against credits the key no longer has, since a settlement
    /// may charge more than it reserved (token pricing: a long prompt).
    /// The key's next reservations go to the server, which refuses them
    /// once the balance is spent.
    pub(super) fn settled(&self, id: KeyId, balance: i64) -> Option<i64> {
        let mut state = lock(&self.0);
        let lease = state.by_key.get(&id)?;
        if balance > lease.left && balance > 0 {
            return None;
        }
        let left = lease.left;
        state.by_key.remove(&id);
        Some(left).filter(|left| *left > 0)
    }

    /// What key `id`'s lease holds now.
    #[cfg(test)]
    pub(super) fn left(&self, id: KeyId) -> i64 {
        lock(&self.0).by_key.get(&id).map_or(0, |lease| lease.left)
    }

    /// Ends every lease (a key was written): what each held, to give back.
    pub(super) fn end_all(&self) -> Vec<(KeyId, i64)> {
        let mut state = lock(&self.0);
        state.epoch += 1;
        state
            .by_key
            .drain()
            .map(|(id, lease)| (id, lease.left))
            .filter(|(_, left)| *left > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The headroom that lets a reservation of `millis` start a fill.
    fn enough(millis: i64) -> i64 {
        millis * LEASE_REQUESTS * LEASE_HEADROOM
    }

    /// What `take` reports available, refill or not.
    fn available(leases: &Leases, id: KeyId, millis: i64, now: Instant) -> Option<i64> {
        leases.take(id, millis, now).map(|taken| taken.available)
    }

    #[test]
    fn a_settlement_that_leaves_the_key_less_than_its_lease_ends_it() {
        let leases = Leases::default();
        let now = Instant::now();
        let fill = leases.fill_for(1, 1_000, enough(1_000), now).unwrap();
        leases.filled(fill, enough(1_000), now).unwrap();
        assert!(leases.take(1, 1_000, now).is_some());
        // Plenty left: the lease goes on.
        assert_eq!(leases.settled(1, enough(1_000)), None);
        assert!(leases.take(1, 1_000, now).is_some());
        // A charge far above its reservation left the key less than the
        // lease holds: it ends, and hands out nothing more.
        assert_eq!(leases.settled(1, 62_000), Some(62_000));
        assert_eq!(leases.take(1, 1_000, now), None);
        // A key without a lease has nothing to give back.
        assert_eq!(leases.settled(2, -5), None);
    }

    #[test]
    fn a_lease_is_filled_only_with_headroom_and_one_at_a_time() {
        let leases = Leases::default();
        let now = Instant::now();
        assert_eq!(leases.fill_for(1, 1_000, enough(1_000) - 1, now), None);
        assert_eq!(leases.fill_for(1, 0, i64::MAX, now), None);
        assert_eq!(leases.fill_for(1, i64::MAX / 2, i64::MAX, now), None);
        let fill = leases.fill_for(1, 1_000, enough(1_000), now).unwrap();
        assert_eq!(fill.block, 64_000);
        // One fill in flight per key; other keys are independent.
        assert_eq!(leases.fill_for(1, 1_000, enough(1_000), now), None);
        assert!(leases.fill_for(2, 1_000, enough(1_000), now).is_some());
        // Nothing is handed out before the server admitted the block.
        assert_eq!(leases.take(1, 1_000, now), None);
        leases.filled(fill, enough(1_000), now).unwrap();
        // A running lease that covers the size asks for no other fill.
        assert_eq!(leases.fill_for(1, 1_000, enough(1_000), now), None);
    }

    #[test]
    fn a_lease_hands_out_what_it_holds_until_it_expires() {
        let leases = Leases::default();
        let now = Instant::now();
        // Too little headroom left for a refill: the block runs out.
        let fill = leases.fill_for(7, 1_000, enough(1_000), now).unwrap();
        let expiry = leases.filled(fill, 900_000, now).unwrap();
        assert_eq!(expiry.at, now + LEASE_FOR);
        for n in 1..=64 {
            // Available: what the server reported plus what is left.
            let taken = leases.take(7, 1_000, now).unwrap();
            assert_eq!(taken.available, 900_000 + 64_000 - n * 1_000);
            assert_eq!(taken.refill, None);
        }
        assert_eq!(leases.take(7, 1, now), None, "the block is spent");
        assert_eq!(leases.take(8, 1, now), None, "another key has none");
        assert_eq!(leases.expire(&expiry), 0);

        let fill = leases.fill_for(7, 1_000, enough(1_000), now).unwrap();
        let expiry = leases.filled(fill, 900_000, now).unwrap();
        leases.take(7, 3_000, now).unwrap();
        assert_eq!(leases.take(7, 1_000, now + LEASE_FOR), None, "expired");
        assert_eq!(leases.expire(&expiry), 61_000);
        assert_eq!(leases.take(7, 1_000, now), None, "ended");
    }

    #[test]
    fn a_lease_down_to_half_a_block_asks_for_one_refill() {
        let leases = Leases::default();
        let now = Instant::now();
        let fill = leases.fill_for(4, 1_000, enough(1_000), now).unwrap();
        let first = leases.filled(fill, enough(1_000), now).unwrap();
        for _ in 0..32 {
            assert_eq!(leases.take(4, 1_000, now).unwrap().refill, None);
        }
        // 31 left of 64: refill, once while it is in flight.
        let refill = leases.take(4, 1_000, now).unwrap().refill.unwrap();
        assert_eq!(refill.block, 64_000);
        assert_eq!(leases.take(4, 1_000, now).unwrap().refill, None);
        let later = now + Duration::from_millis(300);
        let second = leases
            .filled(refill, enough(1_000) - 64_000, later)
            .unwrap();
        assert_eq!(
            available(&leases, 4, 1_000, later),
            Some(enough(1_000) - 64_000 + 30_000 + 64_000 - 1_000)
        );
        // The first fill's expiry no longer ends it; the second's does.
        assert_eq!(leases.expire(&first), 0);
        assert_eq!(leases.expire(&second), 93_000);
    }

    #[test]
    fn a_later_fill_keeps_the_lease_past_an_earlier_expiry() {
        let leases = Leases::default();
        let now = Instant::now();
        let fill = leases.fill_for(3, 1_000, enough(1_000), now).unwrap();
        let first = leases.filled(fill, 900_000, now).unwrap();
        leases.take(3, 63_500, now).unwrap();
        // 500 left, not enough for 1_000: a second fill joins it.
        let later = now + Duration::from_millis(500);
        let fill = leases.fill_for(3, 1_000, enough(1_000), later).unwrap();
        let second = leases.filled(fill, 800_000, later).unwrap();
        assert_eq!(leases.expire(&first), 0, "the second fill's expiry ends it");
        assert_eq!(available(&leases, 3, 1_000, later), Some(800_000 + 63_500));
        assert_eq!(leases.expire(&second), 63_500);
    }

    #[test]
    fn ending_the_leases_gives_back_what_they_hold_and_refuses_late_fills() {
        let leases = Leases::default();
        let now = Instant::now();
        let fill = leases.fill_for(1, 1_000, enough(1_000), now).unwrap();
        let expiry = leases.filled(fill, 900_000, now).unwrap();
        leases.take(1, 4_000, now).unwrap();
        let spent = leases.fill_for(2, 1_000, enough(1_000), now).unwrap();
        leases.filled(spent, 900_000, now).unwrap();
        leases.take(2, 64_000, now).unwrap();
        let in_flight = leases.fill_for(5, 1_000, enough(1_000), now).unwrap();

        assert_eq!(leases.end_all(), vec![(1, 60_000)]);
        assert_eq!(leases.take(1, 1_000, now), None);
        assert_eq!(leases.expire(&expiry), 0, "given back once");
        // The fill that was in flight gives its block back.
        assert_eq!(leases.filled(in_flight, 900_000, now), Err(64_000));
        // A failed fill lets the next reservation try again.
        let fill = leases.fill_for(9, 1_000, enough(1_000), now).unwrap();
        leases.fill_failed(fill);
        assert!(leases.fill_for(9, 1_000, enough(1_000), now).is_some());
    }
}
