//! The way every proxied request takes: check access and body, apply the
//! key's policy, reserve its cost, forward, relay, settle.

use super::catalog::{Access, Endpoint};
use super::inspect;
use crate::app::AppState;
use crate::auth::Caller;
use crate::credits::settlement::Charge;
use crate::credits::Settlement;
use crate::error::ApiError;
use crate::limits::{Entered, Refusal};
use crate::policy::{self, Caps, Dialect};
use crate::proxy::{self, headers, BodyEdit, Outbound, RelayOptions};
use crate::telemetry::RequestLog;
use axum::body::Body;
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// The longest request path passed on (and written to the ledger).
/// Ollama's own paths are far shorter: a blob's, the longest but a model's
/// under `/v1/models/`, is 82 bytes.
const MAX_PATH: usize = 2048;
/// The longest model name passed on (and written to the ledger and the
/// log): no name Ollama accepts comes near it.
const MAX_MODEL_NAME: usize = 1024;

/// Refuses a request path longer than [`MAX_PATH`]; the catch-all routes
/// of Ollama's surfaces check it before anything else.
pub fn check_path(path: &str) -> Result<(), ApiError> {
    within("the request path", path, MAX_PATH)
}

/// Refuses a client-chosen `value` longer than `limit` bytes: it would be
/// written to the ledger and the log as it is.
fn within(what: &str, value: &str, limit: usize) -> Result<(), ApiError> {
    if value.len() > limit {
        return Err(ApiError::BadRequest(format!(
            "{what} is longer than {limit} bytes"
        )));
    }
    Ok(())
}

/// A request on its way through the gateway.
pub struct Proxied {
    pub method: Method,
    /// The Ollama path and query to call.
    pub path_and_query: String,
    /// The path without query, as recorded in the ledger.
    pub path: String,
    pub headers: HeaderMap,
    /// The request's log record.
    pub log: Option<Arc<RequestLog>>,
}

/// Reads a request body, refusing one over `MAX_BODY_BYTES` with 413 and
/// one that pauses longer than `CLIENT_HEADER_TIMEOUT_SECS` with 408.
pub async fn read_body(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    read_limited(
        body,
        state.config.max_body_bytes,
        state.config.client_header_timeout,
    )
    .await
}

/// Reads a request body, refusing one over `limit` bytes with 413 and,
/// with an `idle` limit, one that sends nothing for that long with 408: a
/// client cannot hold a request (and what it has sent so far) open by
/// sending its body slowly or not at all.
pub async fn read_limited(
    body: Body,
    limit: usize,
    idle: Option<Duration>,
) -> Result<Bytes, ApiError> {
    let mut body = Limited::new(body, limit);
    // One chunk (the usual case) is kept as it came; more are joined.
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    loop {
        // The gap is timed afresh for each frame; a frame that is there
        // already (a small body arrives with its head) is taken without
        // arming a timer.
        let next = body.frame();
        let frame = match idle {
            None => next.await,
            Some(idle) => match tokio::time::timeout(idle, next).await {
                Ok(frame) => frame,
                Err(_) => {
                    return Err(ApiError::RequestTimeout(format!(
                        "the request body sent nothing for {} s",
                        idle.as_secs()
                    )));
                }
            },
        };
        let data = match frame {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Some(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return Err(ApiError::PayloadTooLarge { limit });
            }
            Some(Err(e)) => {
                return Err(ApiError::BadRequest(format!(
                    "could not read the request body: {e}"
                )));
            }
        };
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            None => joined.extend_from_slice(&data),
            Some(earlier) => {
                joined.extend_from_slice(&earlier);
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(match first {
        Some(only) => only,
        None => joined.freeze(),
    })
}

/// Forwards a request whose body is streamed through unread (admin keys on
/// admin-only paths: model management, blob uploads of any size).
///
/// Handlers await this and [`forward`] boxed (`Box::pin`): a future is
/// copied whole wherever it moves (awaited, into its caller's state; with
/// the handler's, into the router's box), and forwarding's is several KB,
/// most of a handler's size.
pub async fn forward_streamed(
    state: &AppState,
    caller: &Caller,
    request: Proxied,
    body: Body,
) -> Result<Response, ApiError> {
    let settlement = begin(state, caller, &request, None, None).await?;
    let options = options(state, &request.log, None);
    let out = Outbound {
        method: request.method,
        path_and_query: request.path_and_query,
        headers: headers::to_upstream(request.headers),
        body,
    };
    proxy::relay(&state.upstream, out, settlement, options).await
}

/// Takes one of the caller's concurrent slots for a request whose body is
/// to be read ([`Limits::enter`](crate::limits::Limits::enter)): a key at
/// its limit gets 429 before any of its body is read.
pub fn enter(state: &AppState, caller: &Caller) -> Result<Entered, ApiError> {
    state.limits.enter(&caller.key).map_err(refused)
}

fn refused(refusal: Refusal) -> ApiError {
    match refusal {
        Refusal::Rate { retry_after } => ApiError::TooManyRequests {
            retry_after,
            message: "rate limit reached: too many requests per minute for this key".into(),
        },
        Refusal::Concurrency => ApiError::TooManyRequests {
            retry_after: 1,
            message: "too many concurrent requests for this key".into(),
        },
    }
}

/// Forwards a request whose body has been read (holding the slot `entered`
/// took before): inspected, checked against the key's policy, rewritten
/// only where the policy says so. Admin-only paths never come here (they
/// are streamed through for the admin key, refused for others).
pub async fn forward(
    state: &AppState,
    caller: &Caller,
    endpoint: Endpoint,
    request: Proxied,
    entered: Entered,
    body: Bytes,
) -> Result<Response, ApiError> {
    let inspect = endpoint.access != Access::Admin
        && !(request.method == Method::GET || request.method == Method::HEAD);
    let Prepared {
        model,
        body,
        strip_usage_event,
        estimate_tokens,
        debug_render,
    } = if inspect {
        prepare(state, caller, endpoint, &request.path, body)?
    } else {
        Prepared {
            model: request.path.strip_prefix("/v1/models/").map(str::to_string),
            body,
            strip_usage_event: false,
            estimate_tokens: None,
            debug_render: false,
        }
    };
    if let Some(model) = &model {
        within("the model name", model, MAX_MODEL_NAME)?;
    }
    let limited_to = caller.key.models.as_deref().filter(|_| !caller.is_admin());
    if let (Some(allowed), Some(model)) = (limited_to, &model) {
        if !policy::model_allowed(allowed, model) {
            return Err(ApiError::Forbidden(format!(
                "model '{model}' is not allowed for this key"
            )));
        }
    }

    if let Some(log) = &request.log {
        log.set_model(model.as_deref());
    }
    let permit = entered.pace().map_err(refused)?;
    let estimate = (endpoint.access == Access::Metered && !caller.is_admin())
        .then(|| state.config.pricing.estimate(estimate_tokens));
    let settlement = begin(state, caller, &request, model, estimate).await?;
    if let Some(hook) = &state.hooks.before_forward {
        hook(&request.path);
    }

    let edit = match (limited_to, endpoint.lists_models) {
        (Some(allowed), true) => Some(model_list_filter(&request.path, allowed.to_vec())),
        _ => None,
    };
    // A generation's stream ends with its final unit, but for the prompt
    // that Ollama renders without generating: one chunk, no end. (Embedding
    // replies are never streamed.)
    let needs_end = endpoint.access == Access::Metered && !debug_render;
    let options = RelayOptions {
        strip_usage_event,
        needs_end,
        edit_body: edit,
        ..options(state, &request.log, Some(Box::new(permit)))
    };
    let out = Outbound {
        method: request.method,
        path_and_query: request.path_and_query,
        headers: headers::to_upstream(request.headers),
        body: body.into(),
    };
    proxy::relay(&state.upstream, out, settlement, options).await
}

/// A body ready to forward, with what the request's charge needs of it.
struct Prepared {
    model: Option<String>,
    body: Bytes,
    /// tollgate asked for the usage event; the client did not.
    strip_usage_event: bool,
    /// The completion tokens the estimate reserves for, if the body says.
    estimate_tokens: Option<u64>,
    /// The body asks Ollama to render the prompt only
    /// ([`inspect::Glance::debug_render`]).
    debug_render: bool,
}

/// Checks a body that tollgate inspects and applies the key's policy. A
/// body that nothing changes is forwarded as received, read by a glance
/// ([`inspect::glance`]); any other is parsed whole and written anew.
fn prepare(
    state: &AppState,
    caller: &Caller,
    endpoint: Endpoint,
    path: &str,
    body: Bytes,
) -> Result<Prepared, ApiError> {
    let embeds = path.contains("embed");
    let policed = !caller.is_admin();
    // The token cap concerns generations; the context cap also the
    // embeddings, which load their model with the `num_ctx` they ask for
    // (SPEC §4a: no key may reload a model others use with a huge
    // context). In another body (`/api/show` reads `options` into the
    // Modelfile it shows) they would change what the request means.
    let metered = endpoint.access == Access::Metered;
    let generates = metered && !embeds;
    let caps = if generates {
        state.caps()
    } else if metered {
        Caps {
            max_num_ctx: state.config.max_num_ctx,
            ..Caps::default()
        }
    } else {
        Caps::default()
    };
    // Ollama reports usage on an OpenAI stream only when asked.
    let asks_usage = endpoint.dialect == Dialect::OpenAi && state.config.pricing.prices_tokens();
    // With caps, an ordinary key's body is parsed whole (the caps may
    // rewrite it) without a glance first.
    let capped = policed && caps.any();
    // `/api/show` still takes the model as `name` (when `model` is empty),
    // which only the whole parse reads.
    let show = path == "/api/show";
    let untouched = || {
        if capped || show {
            return None;
        }
        let glance = inspect::glance(&body, endpoint.dialect)?;
        let rewrite = (policed && glance.keep_alive) || (asks_usage && glance.stream == Some(true));
        (!rewrite).then_some(glance)
    };
    if let Some(glance) = untouched() {
        return Ok(Prepared {
            model: glance.model,
            estimate_tokens: if embeds {
                Some(0)
            } else {
                glance.completion_tokens
            },
            body,
            strip_usage_event: false,
            debug_render: glance.debug_render,
        });
    }

    let Some(mut map) = inspect::parse_body(&body, endpoint)? else {
        // No body, where none is needed.
        return Ok(Prepared {
            model: None,
            body,
            strip_usage_event: false,
            estimate_tokens: None,
            debug_render: false,
        });
    };
    let named = |field: &str| map.get(field).and_then(Value::as_str);
    let model = match named("model") {
        Some("") | None if show => named("name"),
        model => model,
    }
    .map(str::to_string);
    let mut changed = false;
    if policed {
        let input = if path.ends_with("chat") {
            "messages"
        } else {
            "prompt"
        };
        let native = endpoint.dialect == Dialect::Native;
        if native && generates && policy::manages_a_model(&map, input) {
            return Err(ApiError::Forbidden(
                "loading, pinning or unloading a model (keep_alive with an empty prompt) \
                 needs the admin key"
                    .into(),
            ));
        }
        changed |= policy::apply(&mut map, endpoint.dialect, caps);
    }
    let mut strip_usage_event = false;
    if asks_usage && map.get("stream") == Some(&Value::Bool(true)) {
        if let Some(options) = policy::object_field(&mut map, "stream_options") {
            if options.get("include_usage") != Some(&Value::Bool(true)) {
                options.insert("include_usage".into(), Value::Bool(true));
                strip_usage_event = true;
                changed = true;
            }
        }
    }
    let estimate_tokens = if embeds {
        Some(0)
    } else {
        policy::requested_completion_tokens(&map, endpoint.dialect)
    };
    let body = if changed {
        serde_json::to_vec(&map)
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .into()
    } else {
        body
    };
    Ok(Prepared {
        model,
        body,
        strip_usage_event,
        estimate_tokens,
        debug_render: inspect::debug_render(&map),
    })
}

async fn begin(
    state: &AppState,
    caller: &Caller,
    request: &Proxied,
    model: Option<String>,
    estimate: Option<crate::credits::Credits>,
) -> Result<Settlement, ApiError> {
    let charge = Charge {
        key_id: caller.key.id,
        estimate,
        pricing: state.config.pricing,
        endpoint: request.path.clone(),
        model,
        log: request.log.clone(),
        unsettled: state.unsettled.clone(),
    };
    Ok(Settlement::begin(state.store.clone(), charge).await?)
}

/// Relaying as it comes ([`RelayOptions::plain`]), told how long Ollama
/// took and holding `hold` until the reply is relayed.
fn options(
    state: &AppState,
    log: &Option<Arc<RequestLog>>,
    hold: Option<Box<dyn std::any::Any + Send>>,
) -> RelayOptions {
    RelayOptions {
        log: log.clone(),
        hold,
        ..RelayOptions::plain(state.stop_streams.clone())
    }
}

fn model_list_filter(path: &str, allowed: Vec<String>) -> BodyEdit {
    let openai = path.starts_with("/v1/");
    Box::new(move |body: Bytes| {
        let filtered = if openai {
            policy::filter_openai_models(&body, &allowed)
        } else {
            policy::filter_tags(&body, &allowed)
        };
        filtered.map(Bytes::from).unwrap_or(body)
    })
}
