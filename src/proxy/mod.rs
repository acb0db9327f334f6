//! The proxy: forwards a request to Ollama and relays its reply.
//!
//! It knows nothing of storage. It reports what happened to the request's
//! [`Settlement`] guard — status, output, chunks, token counts — and lets the
//! guard settle: before the reply is handed over for a non-streamed reply,
//! before the final chunk for a streamed one.

pub mod connection;
pub mod headers;
pub mod streaming;
pub mod upstream;
pub mod usage;

use crate::credits::{Credits, Settlement};
use crate::error::ApiError;
use crate::telemetry::RequestLog;
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use connection::ReplyBody;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;
use streaming::{Relay, Wire};
use tokio::sync::watch;
pub use upstream::{Outbound, Upstream, UpstreamError};

/// The header that tells a client its remaining credits.
pub const CREDITS_HEADER: &str = "x-credits-remaining";

/// Rewrites a successful non-streamed reply body (e.g. to filter the model
/// list for a key limited to some models).
pub type BodyEdit = Box<dyn FnOnce(Bytes) -> Bytes + Send>;

/// How to relay one request.
pub struct RelayOptions {
    /// Remove the OpenAI usage event from a stream (tollgate asked for it,
    /// the client did not).
    pub strip_usage_event: bool,
    /// A stream is complete only with its final unit (`data: [DONE]` on
    /// OpenAI's chat and completions streams, a `"done": true` line on
    /// native generations): when Ollama ends one without it, tollgate adds
    /// an error unit, so that the client learns the reply is cut.
    pub needs_end: bool,
    pub edit_body: Option<BodyEdit>,
    /// Ends in-flight streams when it turns true.
    pub stop: watch::Receiver<bool>,
    /// Told how long Ollama took.
    pub log: Option<Arc<RequestLog>>,
    /// Kept until the reply has been relayed (e.g. a concurrency slot).
    pub hold: Option<Box<dyn std::any::Any + Send>>,
}

impl RelayOptions {
    /// Relaying as it comes: no usage event removed, no `[DONE]` required,
    /// no body edited, no log, nothing held.
    pub fn plain(stop: watch::Receiver<bool>) -> RelayOptions {
        RelayOptions {
            strip_usage_event: false,
            needs_end: false,
            edit_body: None,
            stop,
            log: None,
            hold: None,
        }
    }
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Timeout { .. } => ApiError::GatewayTimeout(e.to_string()),
            UpstreamError::Upload { .. } => ApiError::BadRequest(e.to_string()),
            UpstreamError::Unreachable { .. }
            | UpstreamError::Broken { .. }
            | UpstreamError::Unusable { .. } => ApiError::BadGateway(e.to_string()),
        }
    }
}

/// Forwards `out` and relays the reply, settling through `settlement`.
pub async fn relay(
    upstream: &Upstream,
    out: Outbound,
    mut settlement: Settlement,
    options: RelayOptions,
) -> Result<Response, ApiError> {
    let is_head = out.method == Method::HEAD;
    let mut out = out;
    if is_head && options.edit_body.is_some() {
        // A model list filtered for a key (`HEAD /api/tags`: Ollama serves
        // no other list with HEAD): asked for whole, as GET, so that the
        // reply to HEAD announces the length of what GET gives this key.
        out.method = Method::GET;
    }
    let sent = Instant::now();
    let mut response = match upstream.send(out).await {
        Ok(response) => response,
        Err(e) => return refunded(&mut settlement, ApiError::from(e)).await,
    };
    if let Some(log) = &options.log {
        log.set_upstream_first_byte(sent.elapsed());
    }
    let status = response.status();
    settlement.record_status(status.as_u16());
    // A reply to HEAD has no body: its length is the one Ollama announced
    // for GET, which only Ollama knows, or, for a model list that tollgate
    // edits, the length of the edited list (below).
    let mut head_length = (is_head && options.edit_body.is_none())
        .then(|| response.headers().get(header::CONTENT_LENGTH).cloned())
        .flatten();
    let headers = headers::to_client(std::mem::take(response.headers_mut()));
    let wire = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(Wire::of_content_type);

    if let (Some(wire), true) = (wire, status.is_success()) {
        let available = settlement.available();
        let body = Relay::new(
            response.into_body(),
            wire,
            settlement,
            upstream.timeouts.stream_idle,
            options.strip_usage_event,
            options.stop,
        )
        .needing_end(options.needs_end)
        .observed(options.log, options.hold)
        .into_body();
        return Ok(build(status, headers, body, available));
    }

    // A whole reply: Ollama's error (charged nothing) or a non-streamed
    // result (charged before it is handed over).
    let reading = Instant::now();
    let body = read_whole(response.into_body(), upstream.timeouts.stream_idle).await;
    if let Some(log) = &options.log {
        log.add_upstream_wait(reading.elapsed());
    }
    let body = match body {
        Ok(body) => body,
        Err(message) => {
            let error = ApiError::BadGateway(format!(
                "Ollama at {} broke off its reply: {message}",
                upstream.base_url()
            ));
            return refunded(&mut settlement, error).await;
        }
    };
    let mut body = body;
    if status.is_success() {
        let reply = usage::read_whole_reply(&body);
        // A model loaded (an empty prompt) is no output: not charged.
        if !reply.model_only {
            settlement.record_output();
        }
        if let Some((prompt, completion)) = reply.tokens {
            settlement.record_tokens(prompt, completion);
        }
        if let Some(edit) = options.edit_body {
            body = edit(body);
            if is_head {
                head_length = Some(HeaderValue::from(body.len()));
            }
        }
    }
    let charged = settlement.is_charged();
    let balance = settlement.finish().await?;
    let mut response = build(
        status,
        headers,
        Body::from(body),
        balance.filter(|_| charged),
    );
    if is_head {
        *response.body_mut() = Body::empty();
        if let Some(length) = head_length {
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, length);
        }
    }
    Ok(response)
}

/// Answers `error` for a request that failed before any output reached
/// its client, settled (refunded) first. A metered request's answer tells
/// the balance after the refund, as Ollama's own errors do (SPEC §4:
/// `X-Credits-Remaining` on every metered response). A store failure while
/// settling is logged, not allowed to mask the original error.
async fn refunded(settlement: &mut Settlement, error: ApiError) -> Result<Response, ApiError> {
    settlement.record_status(error.status().as_u16());
    let charged = settlement.is_charged();
    match settlement.finish().await {
        Ok(balance) => {
            let mut response = error.into_response();
            if let Some(balance) = balance.filter(|_| charged) {
                set_credits_header(&mut response, balance);
            }
            Ok(response)
        }
        Err(e) => {
            tracing::error!(error = %e, "settling a failed request failed");
            Err(error)
        }
    }
}

async fn read_whole(mut reply: ReplyBody, idle: Duration) -> Result<Bytes, String> {
    let mut body = Vec::new();
    loop {
        match tokio::time::timeout(idle, reply.next()).await {
            Ok(Some(Ok(chunk))) => body.extend_from_slice(&chunk),
            Ok(Some(Err(e))) => return Err(upstream::error_chain(&e)),
            Ok(None) => return Ok(Bytes::from(body)),
            Err(_) => return Err(format!("nothing for {} s", idle.as_secs())),
        }
    }
}

fn build(status: StatusCode, headers: HeaderMap, body: Body, credits: Option<Credits>) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    if let Some(credits) = credits {
        set_credits_header(&mut response, credits);
    }
    response
}

/// Sets `X-Credits-Remaining`.
pub fn set_credits_header(response: &mut Response, credits: Credits) {
    if let Ok(value) = HeaderValue::from_str(&credits.to_string()) {
        response.headers_mut().insert(CREDITS_HEADER, value);
    }
}
