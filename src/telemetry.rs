//! Logs and metrics.
//!
//! Every request gets an id (the client's `x-request-id` when it is sane,
//! otherwise a generated one), carried by a tracing span so every log line
//! of the request names it, and echoed in the response. A [`RequestLog`]
//! travels with the request: the handler, the settlement guard and the
//! proxy fill it in, and when the last of them lets go of it — after the
//! response body has been sent and the charge settled — it writes the one
//! log line of the request and updates the metrics. Keys, prompts and
//! completions are never logged; metric labels take no unbounded
//! client-chosen value (a model Ollama does not list is `other`).

use crate::config::LogFormat;
use crate::credits::Credits;
use crate::store::KeyId;
use metrics::{counter, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tracing_subscriber::EnvFilter;

pub fn init_logging(format: LogFormat, filter: &str) {
    // Checked by the configuration already.
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second initialisation (tests) is harmless: the first one stays.
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}

/// The process-wide Prometheus recorder (metrics are per process).
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 120.0, 300.0,
            ])
            .map(PrometheusBuilder::build_recorder);
        match recorder {
            Ok(recorder) => {
                let handle = recorder.handle();
                // Histogram samples pile up until drained: drain them every
                // few seconds whether or not anyone scrapes /metrics.
                let upkeep = handle.clone();
                let _ = std::thread::Builder::new()
                    .name("metrics-upkeep".into())
                    .spawn(move || loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    });
                // Fails only if another recorder is installed: then ours
                // records nothing, and /metrics shows an empty page.
                let _ = metrics::set_global_recorder(recorder);
                handle
            }
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        }
    })
}

/// The models Ollama lists, for bounding the `model` label.
fn known_models() -> &'static RwLock<HashSet<String>> {
    static MODELS: OnceLock<RwLock<HashSet<String>>> = OnceLock::new();
    MODELS.get_or_init(|| RwLock::new(HashSet::new()))
}

/// Replaces the list of models Ollama serves.
pub fn set_known_models(models: impl IntoIterator<Item = String>) {
    let set = models
        .into_iter()
        .map(|m| crate::policy::canonical_model(&m))
        .collect();
    *known_models()
        .write()
        .unwrap_or_else(PoisonError::into_inner) = set;
}

fn model_label(model: Option<&str>) -> String {
    let Some(model) = model else {
        return "none".into();
    };
    let canonical = crate::policy::canonical_model(model);
    let known = known_models()
        .read()
        .unwrap_or_else(PoisonError::into_inner);
    if known.contains(&canonical) {
        canonical
    } else {
        "other".into()
    }
}

/// A request id as a client may send it: at most 64 letters, digits,
/// `-`, `_`, `.`.
pub fn sane_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A new request id: 16 random hex digits.
pub fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A request's id: the client's `x-request-id` when sane, else a new one.
pub fn request_id_of(headers: &axum::http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| sane_request_id(id))
        .map_or_else(new_request_id, str::to_string)
}

#[derive(Default)]
struct Fields {
    status: Option<u16>,
    key_id: Option<KeyId>,
    model: Option<String>,
    tokens: Option<(u64, u64)>,
    credits: Option<Credits>,
    upstream_first_byte: Option<Duration>,
    upstream_wait: Duration,
}

/// The status of a request that ended before it had one, neither Ollama's
/// nor tollgate's answer: its client went away (nginx's "client closed
/// request"). The ledger records it so too.
pub const CLIENT_CLOSED: u16 = 499;

/// What is known about one request, logged once when it is all over.
pub struct RequestLog {
    pub request_id: String,
    method: axum::http::Method,
    route: &'static str,
    started: Instant,
    fields: Mutex<Fields>,
}

impl RequestLog {
    pub fn new(request_id: String, method: axum::http::Method, route: &'static str) -> RequestLog {
        RequestLog {
            request_id,
            method,
            route,
            started: Instant::now(),
            fields: Mutex::new(Fields::default()),
        }
    }

    fn with(&self, f: impl FnOnce(&mut Fields)) {
        f(&mut self.fields.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// The id of the request that `log` records, for log lines written
    /// outside the request's span (while its body streams): `-` without.
    pub fn id_of(log: &Option<Arc<RequestLog>>) -> &str {
        log.as_deref().map_or("-", |log| log.request_id.as_str())
    }

    pub fn set_status(&self, status: u16) {
        self.with(|f| f.status = Some(status));
    }

    /// The status the client got, once known.
    pub fn status(&self) -> Option<u16> {
        let mut status = None;
        self.with(|f| status = f.status);
        status
    }

    pub fn set_key(&self, key_id: KeyId) {
        self.with(|f| f.key_id = Some(key_id));
    }

    pub fn set_model(&self, model: Option<&str>) {
        self.with(|f| f.model = model.map(str::to_string));
    }

    /// The settled outcome of a metered request.
    pub fn set_usage(&self, prompt: u64, completion: u64, credits: Credits) {
        self.with(|f| {
            f.tokens = Some((prompt, completion));
            f.credits = Some(credits);
        });
    }

    /// Time from sending to Ollama until its response head arrived.
    pub fn set_upstream_first_byte(&self, took: Duration) {
        self.with(|f| {
            f.upstream_first_byte = Some(took);
            f.upstream_wait += took;
        });
    }

    /// Whether Ollama's response head has arrived.
    pub fn answered_by_ollama(&self) -> bool {
        let mut answered = false;
        self.with(|f| answered = f.upstream_first_byte.is_some());
        answered
    }

    /// Time spent waiting for Ollama's body.
    pub fn add_upstream_wait(&self, took: Duration) {
        self.with(|f| f.upstream_wait += took);
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let total = self.started.elapsed();
        let f = std::mem::take(
            self.fields
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let status = f.status.unwrap_or(CLIENT_CLOSED);
        let (prompt_tokens, completion_tokens) = f.tokens.unwrap_or((0, 0));
        tracing::info!(
            request_id = %self.request_id,
            method = %self.method,
            route = %self.route,
            status,
            key_id = f.key_id,
            model = f.model.as_deref(),
            prompt_tokens,
            completion_tokens,
            credits = f.credits.map(|c| c.as_f64()),
            duration_ms = total.as_secs_f64() * 1000.0,
            upstream_first_byte_ms = f.upstream_first_byte.map(|d| d.as_secs_f64() * 1000.0),
            "request"
        );

        let model = model_label(f.model.as_deref());
        let metrics = RequestMetrics::of(self.route, status, model);
        metrics.requests.increment(1);
        if matches!(status, 401 | 402 | 403 | 429) {
            counter!("tollgate_rejections_total", "reason" => status.to_string()).increment(1);
        }
        if let Some(key_id) = f.key_id {
            if let Some(credits) = f.credits.filter(|c| c.is_positive()) {
                charged_to(key_id).increment(credits.millis() as u64);
            }
        }
        if f.tokens.is_some() {
            let (prompt, completion) = metrics.tokens();
            prompt.increment(prompt_tokens);
            completion.increment(completion_tokens);
        }
        metrics.duration.record(total.as_secs_f64());
        if let Some(first) = f.upstream_first_byte {
            let (first_byte, overhead) = metrics.upstream();
            first_byte.record(first.as_secs_f64());
            let overhead_took = total.saturating_sub(f.upstream_wait);
            overhead.record(overhead_took.as_secs_f64());
        }
    }
}

/// Handles registered once per label set and kept, in `cache`: the
/// `counter!`/`histogram!` macros build, hash and look up their labels in
/// the registry at every call, which was most of what a request's
/// record cost. Every label set is bounded (routes, statuses, the models
/// Ollama lists, key ids), and so is the cache.
fn registered<K: Hash + Eq, V: Clone>(
    cache: &RwLock<HashMap<K, V>>,
    key: K,
    register: impl FnOnce(&K) -> V,
) -> V {
    if let Some(found) = cache
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&key)
    {
        return found.clone();
    }
    // Registered with the recorder in place, never with the no-op one
    // that a handle taken before it would keep.
    metrics_handle();
    let mut cache = cache.write().unwrap_or_else(PoisonError::into_inner);
    cache.entry(key).or_insert_with_key(register).clone()
}

/// The metrics a finished request updates, for one route, status and
/// model label. The token counters and the upstream histograms are
/// registered the first time a request has something to put in them, as
/// the macros did, so that no empty series appears for routes that never
/// reach Ollama.
struct RequestMetrics {
    route: &'static str,
    model: String,
    requests: Counter,
    duration: Histogram,
    tokens: OnceLock<(Counter, Counter)>,
    upstream: OnceLock<(Histogram, Histogram)>,
}

type RequestLabels = (&'static str, u16, String);

impl RequestMetrics {
    fn of(route: &'static str, status: u16, model: String) -> Arc<RequestMetrics> {
        static CACHE: OnceLock<RwLock<HashMap<RequestLabels, Arc<RequestMetrics>>>> =
            OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        registered(cache, (route, status, model), |(route, status, model)| {
            let (route, status) = (*route, status.to_string());
            Arc::new(RequestMetrics {
                route,
                model: model.clone(),
                requests: counter!("tollgate_requests_total", "route" => route, "status" => status, "model" => model.clone()),
                duration: histogram!("tollgate_request_duration_seconds", "route" => route),
                tokens: OnceLock::new(),
                upstream: OnceLock::new(),
            })
        })
    }

    /// The prompt and completion token counters of the model.
    fn tokens(&self) -> &(Counter, Counter) {
        self.tokens.get_or_init(|| {
            let model = self.model.clone();
            (
                counter!("tollgate_tokens_total", "kind" => "prompt", "model" => model.clone()),
                counter!("tollgate_tokens_total", "kind" => "completion", "model" => model),
            )
        })
    }

    /// The histograms of Ollama's time to first byte and of tollgate's
    /// overhead on the route.
    fn upstream(&self) -> &(Histogram, Histogram) {
        self.upstream.get_or_init(|| {
            let route = self.route;
            (
                histogram!("tollgate_upstream_first_byte_seconds", "route" => route),
                histogram!("tollgate_overhead_seconds", "route" => route),
            )
        })
    }
}

/// The counter of credits charged to `key_id`.
fn charged_to(key_id: KeyId) -> Counter {
    static CACHE: OnceLock<RwLock<HashMap<KeyId, Counter>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    registered(
        cache,
        key_id,
        |id| counter!("tollgate_credits_charged_millis_total", "key_id" => id.to_string()),
    )
}

/// Counts streams being relayed.
pub struct StreamGauge;

impl StreamGauge {
    pub fn open() -> StreamGauge {
        gauge!("tollgate_streams_in_flight").increment(1.0);
        StreamGauge
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        gauge!("tollgate_streams_in_flight").decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_accepted_only_when_sane() {
        assert!(sane_request_id("abc-123_x.y"));
        assert!(!sane_request_id(""));
        assert!(!sane_request_id(&"a".repeat(65)));
        assert!(!sane_request_id("has space"));
        assert!(!sane_request_id("new\nline"));
        assert_eq!(new_request_id().len(), 16);
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("x-request-id", "page-7".parse().unwrap());
        assert_eq!(request_id_of(&headers), "page-7");
        headers.insert("x-request-id", "has space".parse().unwrap());
        assert_eq!(request_id_of(&headers).len(), 16);
    }

    /// The value of the one sample of `name` whose line holds `labels`.
    fn sample(name: &str, labels: &str) -> Option<f64> {
        let text = metrics_handle().render();
        let line = text
            .lines()
            .find(|l| l.starts_with(name) && l.contains(labels))?;
        line.rsplit(' ').next()?.parse().ok()
    }

    #[test]
    fn every_request_counts_through_the_kept_handles() {
        let finished = |credits: &str| {
            let log = RequestLog::new("r".into(), axum::http::Method::POST, "/unit/kept");
            log.set_status(299);
            log.set_key(987_654);
            log.set_usage(3, 4, credits.parse().unwrap());
            log.set_upstream_first_byte(Duration::from_millis(1));
        };
        for credits in ["1", "0.5", "2"] {
            finished(credits);
        }
        let route = r#"route="/unit/kept""#;
        assert_eq!(sample("tollgate_requests_total", route), Some(3.0));
        assert_eq!(
            sample("tollgate_request_duration_seconds_count", route),
            Some(3.0)
        );
        assert_eq!(sample("tollgate_overhead_seconds_count", route), Some(3.0));
        assert_eq!(
            sample(
                "tollgate_credits_charged_millis_total",
                r#"key_id="987654""#
            ),
            Some(3500.0)
        );
    }

    #[test]
    fn a_request_that_never_reached_ollama_adds_no_empty_series() {
        let log = RequestLog::new("r".into(), axum::http::Method::GET, "/unit/local");
        log.set_status(298);
        drop(log);
        let route = r#"route="/unit/local""#;
        assert_eq!(sample("tollgate_requests_total", route), Some(1.0));
        let text = metrics_handle().render();
        let series: Vec<&str> = text.lines().filter(|l| l.contains(route)).collect();
        assert!(
            series
                .iter()
                .all(|l| !l.starts_with("tollgate_upstream_first_byte")
                    && !l.starts_with("tollgate_overhead")),
            "{series:?}"
        );
    }

    #[test]
    fn unknown_models_are_labelled_other() {
        set_known_models(["mistral:latest".to_string()]);
        assert_eq!(model_label(Some("mistral")), "mistral:latest");
        assert_eq!(model_label(Some("attacker-chosen-1234")), "other");
        assert_eq!(model_label(None), "none");
    }
}
