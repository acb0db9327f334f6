//! Relaying a streamed reply chunk by chunk.
//!
//! [`Relay`] is the body of a streamed response. It forwards Ollama's bytes
//! as they arrive, cut only at line (NDJSON) or event (SSE) boundaries — and
//! since Ollama flushes whole lines, that holds nothing back. It never
//! re-encodes, adds keep-alive lines or buffers the reply; the only bytes it
//! leaves out are the usage that tollgate, not the client, asked for (the
//! usage event, and the zero usage of completions chunks). While relaying it
//! tells the settlement guard about each content chunk and the token counts
//! of the final chunk, and settles *before* it hands the final chunk on, so
//! a client that saw its reply complete was charged durably.
//!
//! When tollgate must end a stream itself (Ollama vanished, the stream went
//! idle too long, shutdown, a line longer than [`MAX_UNIT`]), it ends it
//! with one error line in the stream's own format, so SDKs raise an error
//! instead of hanging or silently truncating. So it does when Ollama closes an OpenAI chat or completions
//! stream without `data: [DONE]`: that is how Ollama's OpenAI layer ends a
//! stream that failed (an empty chunk, then nothing).
//!
//! If the client goes away, the body is dropped: so is the request to
//! Ollama (which stops generating) and the guard settles what was relayed.

use super::connection::ReplyBody;
use super::usage::{classify_ndjson, classify_sse, zero_usage_member, NdjsonLine, SseEvent};
use crate::credits::Settlement;
use crate::telemetry::{RequestLog, StreamGauge};
use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::json;
use std::convert::Infallible;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;
use tokio::sync::watch;

/// The longest line or event relayed. A longer one (Ollama's own Go client
/// refuses lines over 512 kB) ends the stream with an error unit, after
/// what was relayed is settled: a stream's pending bytes are bounded, not
/// whatever an upstream sends before its next line break.
pub const MAX_UNIT: usize = 4 * 1024 * 1024;

/// The framing of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// Ollama's native streams: one JSON object per line.
    Ndjson,
    /// OpenAI-style server-sent events: `data: ...` then a blank line.
    Sse,
}

impl Wire {
    /// The wire of a response with this content type, if it is a stream.
    pub fn of_content_type(content_type: &str) -> Option<Wire> {
        let ct = content_type.trim_start().to_ascii_lowercase();
        if ct.starts_with("application/x-ndjson") {
            Some(Wire::Ndjson)
        } else if ct.starts_with("text/event-stream") {
            Some(Wire::Sse)
        } else {
            None
        }
    }

    fn delimiter(self) -> &'static [u8] {
        match self {
            Wire::Ndjson => b"\n",
            Wire::Sse => b"\n\n",
        }
    }

    /// The error line tollgate ends a stream with.
    pub fn error_unit(self, message: &str) -> Bytes {
        let text = match self {
            Wire::Ndjson => format!("{}\n", json!({ "error": message })),
            Wire::Sse => format!(
                "data: {}\n\n",
                json!({"error": {"message": message, "type": "api_error", "param": null, "code": null}})
            ),
        };
        Bytes::from(text)
    }
}

/// What of one line or event goes on to the client.
enum Pass {
    Whole,
    Dropped,
    /// The unit without these bytes.
    Without(Range<usize>),
}

/// A stream being relayed from Ollama to a client.
pub struct Relay {
    upstream: ReplyBody,
    wire: Wire,
    /// Bytes received after the last complete line or event.
    pending: BytesMut,
    settlement: Settlement,
    idle: Duration,
    /// Usage was asked for by tollgate, not by the client: drop the usage
    /// event (and the zero usage of completions chunks).
    strip_usage: bool,
    /// Becomes true when in-flight streams must end (shutdown deadline).
    stop: watch::Receiver<bool>,
    /// The stream is complete only with its final unit: `data: [DONE]`
    /// (SSE), a `"done": true` line (NDJSON).
    needs_end: bool,
    /// Ollama ended its stream itself: with the final unit or an error.
    ended_by_ollama: bool,
    finished: bool,
    log: Option<Arc<RequestLog>>,
    /// Time spent waiting for Ollama, reported to `log` at the end.
    upstream_wait: Duration,
    /// When Ollama last sent something, and the timer that ends the stream
    /// `idle` after that.
    last_activity: tokio::time::Instant,
    idle_timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Whatever must live as long as the stream (a concurrency slot).
    _hold: Option<Box<dyn std::any::Any + Send>>,
    _gauge: StreamGauge,
}

impl Relay {
    pub fn new(
        upstream: ReplyBody,
        wire: Wire,
        settlement: Settlement,
        idle: Duration,
        strip_usage: bool,
        stop: watch::Receiver<bool>,
    ) -> Relay {
        Relay {
            upstream,
            wire,
            pending: BytesMut::new(),
            settlement,
            idle,
            strip_usage,
            stop,
            needs_end: false,
            ended_by_ollama: false,
            finished: false,
            log: None,
            upstream_wait: Duration::ZERO,
            last_activity: tokio::time::Instant::now(),
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            _hold: None,
            _gauge: StreamGauge::open(),
        }
    }

    /// Requires the final unit at the end of the stream
    /// ([`RelayOptions::needs_end`](super::RelayOptions::needs_end)).
    pub fn needing_end(mut self, needs_end: bool) -> Relay {
        self.needs_end = needs_end;
        self
    }

    /// Reports upstream waits to `log` and keeps `hold` until the end.
    pub fn observed(
        mut self,
        log: Option<Arc<RequestLog>>,
        hold: Option<Box<dyn std::any::Any + Send>>,
    ) -> Relay {
        self.log = log;
        self._hold = hold;
        self
    }

    /// The response body that relays this stream.
    pub fn into_body(self) -> Body {
        Body::from_stream(futures_util::stream::unfold(self, |mut relay| async move {
            relay
                .next_piece()
                .await
                .map(|piece| (Ok::<_, Infallible>(piece), relay))
        }))
    }

    /// The next bytes for the client, or `None` when the stream is over.
    async fn next_piece(&mut self) -> Option<Bytes> {
        while !self.finished {
            if self.pending.len() > MAX_UNIT {
                if self.ended_by_ollama {
                    // The reply was complete: what Ollama sends after it
                    // is not relayed (nor an error line after a whole reply).
                    self.pending.clear();
                    self.finish().await;
                    return None;
                }
                let message = format!(
                    "Ollama sent a line longer than {} MiB; the stream was ended",
                    MAX_UNIT >> 20
                );
                return self.end_early(&message).await;
            }
            let (stop, upstream) = (&mut self.stop, &mut self.upstream);
            let waiting = Instant::now();
            let stopping = async {
                // A dropped sender means no shutdown will ever be signalled.
                if stop.wait_for(|stop| *stop).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            // The idle timer is re-armed only when it fires early (once per
            // idle period), not for every chunk: timer operations are the
            // dearest part of relaying a small chunk.
            let next = tokio::select! {
                biased;
                _ = stopping => None,
                next = upstream.next() => Some(Ok(next)),
                _ = self.idle_timer.as_mut() => {
                    let deadline = self.last_activity + self.idle;
                    if tokio::time::Instant::now() < deadline {
                        self.idle_timer.as_mut().reset(deadline);
                        continue;
                    }
                    Some(Err(()))
                }
            };
            self.upstream_wait += waiting.elapsed();
            self.last_activity = tokio::time::Instant::now();
            // Ollama's reply is complete (its final unit or an error came):
            // a shutdown, an idle wait or a broken connection before Ollama
            // closes the stream cuts nothing, and gets no error unit.
            let complete =
                self.ended_by_ollama && !matches!(next, Some(Ok(Some(Ok(_)))) | Some(Ok(None)));
            if complete {
                self.finish().await;
                return None;
            }
            let Some(next) = next else {
                return self
                    .end_early("tollgate is shutting down; the stream was cut")
                    .await;
            };
            match next {
                Ok(Some(Ok(bytes))) => {
                    if let Some(complete) = self.complete_units(bytes) {
                        if let Some(piece) = self.relay_units(complete).await {
                            return Some(piece);
                        }
                    }
                }
                Ok(Some(Err(e))) => {
                    let message = format!(
                        "the connection to Ollama broke mid-stream: {}",
                        super::upstream::error_chain(&e)
                    );
                    return self.end_early(&message).await;
                }
                Ok(None) => {
                    // Ollama ended the stream. A last unit without its
                    // terminator is relayed like any other.
                    let rest = self.pending.split().freeze();
                    // The last unit is classified here only when it alone
                    // could still end the stream (it is inspected again
                    // below, with the others).
                    let ends = |rest: &[u8]| match self.wire {
                        Wire::Sse => {
                            matches!(classify_sse(rest), SseEvent::Done | SseEvent::Error)
                        }
                        Wire::Ndjson => matches!(
                            classify_ndjson(rest),
                            NdjsonLine::Final(_) | NdjsonLine::Error
                        ),
                    };
                    if self.needs_end && !self.ended_by_ollama && !ends(&rest) {
                        // Ollama's OpenAI writer turns an error after the
                        // first chunk into an empty chunk and stops, without
                        // `[DONE]`; a native stream cut short has no `done`
                        // line: said so, the client does not take a cut
                        // reply for a whole one. A unit left without its
                        // terminator goes unsent (and uncounted): a client
                        // drops it at the end of a stream anyway, and the
                        // error unit after it would merge with it.
                        let message = match self.wire {
                            Wire::Sse => {
                                "Ollama ended the stream without finishing it \
                                 (no [DONE]): the reply is incomplete"
                            }
                            Wire::Ndjson => {
                                "Ollama ended the stream without finishing it \
                                 (no \"done\": true line): the reply is incomplete"
                            }
                        };
                        return self.end_early(message).await;
                    }
                    let (_, out) = self.pass_units(rest);
                    self.finish().await;
                    return out;
                }
                Err(_) => {
                    let message = format!(
                        "Ollama sent nothing for {} s; the stream was ended",
                        self.idle.as_secs()
                    );
                    return self.end_early(&message).await;
                }
            }
        }
        None
    }

    /// Adds received bytes to what is pending and takes out every complete
    /// line or event. Ollama flushes whole lines, so usually the bytes are
    /// exactly that and pass through without a copy.
    fn complete_units(&mut self, bytes: Bytes) -> Option<Bytes> {
        take_complete(&mut self.pending, bytes, self.wire.delimiter())
    }

    /// Records complete units with the guard and returns what goes to the
    /// client; settles first when the final unit is among them.
    async fn relay_units(&mut self, complete: Bytes) -> Option<Bytes> {
        let (is_final, out) = self.pass_units(complete);
        if is_final {
            // The client must not see its reply complete before the charge
            // is durable.
            self.settle().await;
        }
        out
    }

    /// Records units with the guard; returns whether the final unit is
    /// among them, and what of them goes to the client (the bytes as they
    /// came unless a unit is dropped or cut).
    fn pass_units(&mut self, complete: Bytes) -> (bool, Option<Bytes>) {
        let delimiter = self.wire.delimiter();
        let mut is_final = false;
        let mut kept: Option<BytesMut> = None;
        let mut start = 0;
        while start < complete.len() {
            let unit_end = memchr::memmem::find(&complete[start..], delimiter)
                .map_or(complete.len(), |p| start + p + delimiter.len());
            let unit = &complete[start..unit_end];
            let (last, pass) = self.inspect(unit);
            is_final |= last;
            // Once a unit is dropped or cut, copy out what precedes it, once,
            // and what follows it unit by unit.
            let copy_out = || BytesMut::from(&complete[..start]);
            match pass {
                Pass::Whole => {
                    if let Some(kept) = kept.as_mut() {
                        kept.extend_from_slice(unit);
                    }
                }
                Pass::Dropped => {
                    kept.get_or_insert_with(copy_out);
                }
                Pass::Without(cut) => {
                    let kept = kept.get_or_insert_with(copy_out);
                    kept.extend_from_slice(&unit[..cut.start]);
                    kept.extend_from_slice(&unit[cut.end..]);
                }
            }
            start = unit_end;
        }
        let out = kept.map_or(complete, BytesMut::freeze);
        (is_final, (!out.is_empty()).then_some(out))
    }

    /// Records one unit with the guard; returns whether it is the final
    /// unit, and what of it goes to the client.
    fn inspect(&mut self, unit: &[u8]) -> (bool, Pass) {
        let s = &mut self.settlement;
        match self.wire {
            Wire::Ndjson => match classify_ndjson(unit) {
                NdjsonLine::Chunk => {
                    s.record_chunk();
                    (false, Pass::Whole)
                }
                NdjsonLine::Final(tokens) => {
                    self.ended_by_ollama = true;
                    s.record_output();
                    if let Some((prompt, completion)) = tokens {
                        s.record_tokens(prompt, completion);
                    }
                    (true, Pass::Whole)
                }
                NdjsonLine::Error => {
                    self.ended_by_ollama = true;
                    (false, Pass::Whole)
                }
                NdjsonLine::Other => (false, Pass::Whole),
            },
            Wire::Sse => match classify_sse(unit) {
                SseEvent::Chunk { has_content } => {
                    if has_content {
                        s.record_chunk();
                    }
                    // Usage tollgate asked for leaves no trace: not the zero
                    // usage the completions writer adds to every chunk either.
                    match self.strip_usage.then(|| zero_usage_member(unit)).flatten() {
                        Some(cut) => (false, Pass::Without(cut)),
                        None => (false, Pass::Whole),
                    }
                }
                SseEvent::Usage(tokens) => {
                    if let Some((prompt, completion)) = tokens {
                        s.record_output();
                        s.record_tokens(prompt, completion);
                    }
                    let pass = if self.strip_usage {
                        Pass::Dropped
                    } else {
                        Pass::Whole
                    };
                    (false, pass)
                }
                SseEvent::Done => {
                    // A whole reply, as a native final chunk: charged even
                    // when its only output was a role or an empty text.
                    s.record_output();
                    self.ended_by_ollama = true;
                    (true, Pass::Whole)
                }
                SseEvent::Error => {
                    self.ended_by_ollama = true;
                    (false, Pass::Whole)
                }
                SseEvent::Other => (false, Pass::Whole),
            },
        }
    }

    async fn settle(&mut self) {
        // Boxed: a stream settles once, and the store's future inline would
        // more than double what every open stream keeps allocated.
        if let Err(e) = Box::pin(self.settlement.finish()).await {
            let request_id = RequestLog::id_of(&self.log);
            tracing::error!(request_id, error = %e, "settling a stream failed");
        }
    }

    /// Settles what was relayed; the stream is over.
    async fn finish(&mut self) {
        self.settle().await;
        self.finished = true;
    }

    /// Ends the stream with an error line, after settling what was relayed.
    async fn end_early(&mut self, message: &str) -> Option<Bytes> {
        let request_id = RequestLog::id_of(&self.log);
        tracing::warn!(request_id, reason = message, "stream ended by tollgate");
        self.pending.clear();
        self.finish().await;
        Some(self.wire.error_unit(message))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(log) = &self.log {
            log.add_upstream_wait(self.upstream_wait);
        }
    }
}

/// Adds `bytes` to `pending` and takes out everything up to the last
/// `delimiter` in it, if any. Only the new bytes (and the delimiter's
/// length less one before them, where a delimiter split between two reads
/// may begin) are searched: a long line arriving in many reads (a final
/// line with its `context`) costs its length once, not once per read.
fn take_complete(pending: &mut BytesMut, bytes: Bytes, delimiter: &[u8]) -> Option<Bytes> {
    if pending.is_empty() && bytes.ends_with(delimiter) {
        return Some(bytes);
    }
    let from = pending.len().saturating_sub(delimiter.len() - 1);
    pending.extend_from_slice(&bytes);
    let end = from + memchr::memmem::rfind(&pending[from..], delimiter)? + delimiter.len();
    Some(pending.split_to(end).freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `reads` one by one; returns what came out of each.
    fn feed(reads: &[&str], delimiter: &str) -> Vec<Option<String>> {
        let mut pending = BytesMut::new();
        reads
            .iter()
            .map(|read| {
                take_complete(
                    &mut pending,
                    Bytes::copy_from_slice(read.as_bytes()),
                    delimiter.as_bytes(),
                )
                .map(|out| String::from_utf8(out.to_vec()).unwrap())
            })
            .collect()
    }

    #[test]
    fn complete_units_come_out_whole_however_the_reads_split_them() {
        assert_eq!(
            feed(&["{\"a\":1}\n", "{\"b\"", ":2}\n{\"c\"", ":3}\n"], "\n"),
            [
                Some("{\"a\":1}\n".into()),
                None,
                Some("{\"b\":2}\n".into()),
                Some("{\"c\":3}\n".into()),
            ]
        );
        // SSE's two-byte delimiter split between two reads.
        assert_eq!(
            feed(&["data: 1\n", "\ndata: 2\n", "\n"], "\n\n"),
            [None, Some("data: 1\n\n".into()), Some("data: 2\n\n".into()),]
        );
        // A long line in many reads comes out once, whole.
        let long: Vec<String> = (0..500).map(|i| format!("{i},")).collect();
        let mut reads: Vec<&str> = long.iter().map(String::as_str).collect();
        reads.push("]}\n");
        let out = feed(&reads, "\n");
        assert!(out[..500].iter().all(Option::is_none));
        assert_eq!(
            out[500].as_deref(),
            Some(format!("{}]}}\n", long.concat()).as_str())
        );
    }
}
