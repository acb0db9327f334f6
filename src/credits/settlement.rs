//! The settlement guard: reserve before forwarding, settle exactly once.
//!
//! [`Settlement::begin`] reserves a request's estimated cost in the store
//! (or refuses it with 402). The proxy then reports what happened — whether
//! output reached the client, how many content chunks it relayed, the token
//! counts Ollama reported — and calls [`Settlement::finish`] when the
//! response is complete. Whatever path a request takes (success, upstream
//! error, client disconnect, a panic in a handler), the guard settles once:
//! if it is dropped unsettled, its `Drop` settles in a background task with
//! what it knew by then.
//!
//! The charge follows SPEC §4: nothing when no output reached the client;
//! otherwise the request price plus its tokens, taken from Ollama's counts
//! or, when the stream ended without them, from the chunks relayed.

use crate::config::Pricing;
use crate::credits::Credits;
use crate::store::{now_millis, KeyId, Millis, SharedStore, StoreError, UsageRecord};
use crate::tally::Tally;
use crate::telemetry::{RequestLog, CLIENT_CLOSED};
use std::sync::Arc;
use std::time::Instant;

/// What a settlement knows about its request.
#[derive(Clone, Debug, Default)]
struct Progress {
    status: u16,
    /// Some of the response reached the client.
    output: bool,
    /// Content chunks relayed (used when no token counts arrive).
    chunks: u64,
    /// Token counts reported by Ollama: (prompt, completion).
    tokens: Option<(u64, u64)>,
}

struct Open {
    store: SharedStore,
    key_id: KeyId,
    reserved: Credits,
    /// False for admin keys: recorded with 0 credits.
    charged: bool,
    pricing: Pricing,
    endpoint: String,
    model: Option<String>,
    started: Instant,
    started_at: Millis,
    progress: Progress,
    log: Option<Arc<RequestLog>>,
    unsettled: Tally,
}

impl Open {
    fn usage(&self) -> UsageRecord {
        let p = &self.progress;
        let (prompt_tokens, completion_tokens) = p.tokens.unwrap_or((0, p.chunks));
        let credits = if self.charged && p.output {
            self.pricing.cost(prompt_tokens, completion_tokens)
        } else {
            Credits::ZERO
        };
        UsageRecord {
            time: self.started_at,
            key_id: self.key_id,
            endpoint: self.endpoint.clone(),
            model: self.model.clone(),
            status: p.status,
            prompt_tokens: if p.output { prompt_tokens } else { 0 },
            completion_tokens: if p.output { completion_tokens } else { 0 },
            credits,
            duration_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    async fn settle(self) -> Result<Credits, StoreError> {
        let usage = self.usage();
        if let Some(log) = &self.log {
            log.set_usage(usage.prompt_tokens, usage.completion_tokens, usage.credits);
        }
        self.store.settle(usage, self.reserved).await
    }
}

/// Who pays and how much is held for a request.
pub struct Charge {
    pub key_id: KeyId,
    /// What to reserve; `None` for keys that are never charged (admin).
    pub estimate: Option<Credits>,
    pub pricing: Pricing,
    pub endpoint: String,
    pub model: Option<String>,
    /// The request's log record, told the outcome.
    pub log: Option<Arc<RequestLog>>,
    /// Counts this request's settlement while it runs apart, if the
    /// request is dropped unsettled (shutdown waits for them before the
    /// store closes).
    pub unsettled: Tally,
}

/// A reserved request, to be settled once.
pub struct Settlement {
    open: Option<Open>,
    /// What the key has available net of this request's reservation.
    available: Option<Credits>,
}

impl Settlement {
    /// Reserves the request's estimated cost; `StoreError::InsufficientCredits`
    /// when the key cannot cover it.
    pub async fn begin(store: SharedStore, charge: Charge) -> Result<Settlement, StoreError> {
        let (reserved, available) = match charge.estimate {
            Some(estimate) => {
                let available = store.reserve(charge.key_id, estimate).await?;
                (estimate, Some(available))
            }
            None => (Credits::ZERO, None),
        };
        Ok(Settlement {
            open: Some(Open {
                store,
                key_id: charge.key_id,
                reserved,
                charged: charge.estimate.is_some(),
                pricing: charge.pricing,
                endpoint: charge.endpoint,
                model: charge.model,
                started: Instant::now(),
                started_at: now_millis(),
                progress: Progress::default(),
                log: charge.log,
                unsettled: charge.unsettled,
            }),
            available,
        })
    }

    /// A request that is neither charged nor recorded (the `/` probe).
    pub fn detached() -> Settlement {
        Settlement {
            open: None,
            available: None,
        }
    }

    /// The key's available credits net of this reservation (`None` for keys
    /// that are not charged).
    pub fn available(&self) -> Option<Credits> {
        self.available
    }

    /// Whether this request is charged at all.
    pub fn is_charged(&self) -> bool {
        self.open.as_ref().is_some_and(|o| o.charged)
    }

    fn progress(&mut self) -> Option<&mut Progress> {
        self.open.as_mut().map(|o| &mut o.progress)
    }

    /// The response status (Ollama's, or tollgate's own).
    pub fn record_status(&mut self, status: u16) {
        if let Some(p) = self.progress() {
            p.status = status;
        }
    }

    /// Output is reaching the client: from now on the request is charged.
    pub fn record_output(&mut self) {
        if let Some(p) = self.progress() {
            p.output = true;
        }
    }

    /// One content chunk was relayed to the client.
    pub fn record_chunk(&mut self) {
        if let Some(p) = self.progress() {
            p.output = true;
            p.chunks += 1;
        }
    }

    /// Ollama's token counts for the request.
    pub fn record_tokens(&mut self, prompt: u64, completion: u64) {
        if let Some(p) = self.progress() {
            p.tokens = Some((prompt, completion));
        }
    }

    /// Settles now; returns the key's balance afterwards. Later calls (and
    /// the drop) do nothing.
    pub async fn finish(&mut self) -> Result<Option<Credits>, StoreError> {
        match self.open.take() {
            Some(open) => open.settle().await.map(Some),
            None => Ok(None),
        }
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        let Some(mut open) = self.open.take() else {
            return;
        };
        // Dropped unsettled: the client went away, the handler failed or
        // panicked, or shutdown cut the request. Before Ollama answered,
        // the status is the one the client got: 500 for a panic, the
        // answer tollgate gave (in the log: 503 at the shutdown cut), or,
        // with neither, none, as the client went away.
        if open.progress.status == 0 {
            open.progress.status = if std::thread::panicking() {
                500
            } else {
                open.log
                    .as_deref()
                    .and_then(RequestLog::status)
                    .unwrap_or(CLIENT_CLOSED)
            };
        }
        // Settle with what is known, off this (possibly unwinding) stack.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let running = open.unsettled.enter();
                handle.spawn(async move {
                    let _running = running;
                    let key_id = open.key_id;
                    let request_id = RequestLog::id_of(&open.log).to_string();
                    if let Err(e) = open.settle().await {
                        tracing::error!(
                            request_id,
                            key_id,
                            error = %e,
                            "settling a dropped request failed"
                        );
                    }
                });
            }
            Err(_) => tracing::error!(
                key_id = open.key_id,
                "request dropped outside a runtime; its reservation stays open"
            ),
        }
    }
}
