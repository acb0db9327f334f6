//! The connection to Ollama: one pooled HTTP client, with the time limits of
//! SPEC §6 on connecting and on waiting for the response head.

use crate::config::Timeouts;
use axum::http::{HeaderMap, Method};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not reach Ollama at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("Ollama at {url} did not answer within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("the connection to Ollama at {url} broke: {reason}")]
    Broken { url: String, reason: String },
    /// Only at start-up: the HTTP client cannot be set up for this URL.
    #[error("OLLAMA_URL {url} cannot be used: {reason}")]
    Unusable { url: String, reason: String },
}

/// The user agent of tollgate's own requests to Ollama (health checks and
/// the model list), as opposed to the requests it forwards.
pub const OWN_USER_AGENT: &str = concat!("tollgate/", env!("CARGO_PKG_VERSION"));

/// Where and how tollgate talks to Ollama.
#[derive(Clone)]
pub struct Upstream {
    client: reqwest::Client,
    base: String,
    /// `base` parsed once; each request's URL is a copy with its path and
    /// query set, which skips parsing the scheme and host again.
    base_url: reqwest::Url,
    pub timeouts: Timeouts,
}

/// A request on its way to Ollama.
pub struct Outbound {
    pub method: Method,
    /// Path and query, e.g. `/api/generate`.
    pub path_and_query: String,
    /// Headers to send: already filtered (see [`super::headers`]).
    pub headers: HeaderMap,
    pub body: reqwest::Body,
}

impl Upstream {
    pub fn new(base: &str, timeouts: Timeouts) -> Result<Upstream, UpstreamError> {
        let base = base.trim_end_matches('/').to_string();
        let invalid = |reason: String| UpstreamError::Unusable {
            url: base.clone(),
            reason,
        };
        let base_url = reqwest::Url::parse(&base).map_err(|e| invalid(e.to_string()))?;
        if base_url.cannot_be_a_base() || base_url.query().is_some() {
            return Err(invalid("not a base URL".into()));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| invalid(error_chain(&e)))?;
        Ok(Upstream {
            client,
            base,
            base_url,
            timeouts,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Sends a request; resolves when Ollama's response head has arrived.
    pub async fn send(&self, out: Outbound) -> Result<reqwest::Response, UpstreamError> {
        let request = self
            .client
            .request(out.method, self.url_of(&out.path_and_query))
            .headers(out.headers)
            .body(out.body);
        match tokio::time::timeout(self.timeouts.first_byte, request.send()).await {
            Err(_) => Err(UpstreamError::Timeout {
                url: self.base.clone(),
                secs: self.timeouts.first_byte.as_secs(),
            }),
            Ok(Err(e)) if e.is_connect() || e.is_timeout() => Err(UpstreamError::Unreachable {
                url: self.base.clone(),
                reason: error_chain(&e),
            }),
            Ok(Err(e)) => Err(UpstreamError::Broken {
                url: self.base.clone(),
                reason: error_chain(&e),
            }),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// The URL of `path_and_query` (which starts with `/`) under the base.
    fn url_of(&self, path_and_query: &str) -> reqwest::Url {
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        };
        let mut url = self.base_url.clone();
        let prefix = url.path().trim_end_matches('/');
        if prefix.is_empty() {
            url.set_path(path);
        } else {
            url.set_path(&format!("{prefix}{path}"));
        }
        url.set_query(query);
        url
    }

    /// The names of the models Ollama serves, if it answers.
    pub async fn list_models(&self) -> Option<Vec<String>> {
        let response = self
            .client
            .get(format!("{}/api/tags", self.base))
            .header(reqwest::header::USER_AGENT, OWN_USER_AGENT)
            .timeout(self.timeouts.connect)
            .send()
            .await
            .ok()?;
        let tags: serde_json::Value = serde_json::from_slice(&response.bytes().await.ok()?).ok()?;
        Some(
            tags.get("models")?
                .as_array()?
                .iter()
                .filter_map(|m| m.get("name").and_then(|n| n.as_str()).map(str::to_string))
                .collect(),
        )
    }

    /// Whether Ollama answers its version endpoint.
    pub async fn is_reachable(&self) -> bool {
        let probe = self
            .client
            .get(format!("{}/api/version", self.base))
            .header(reqwest::header::USER_AGENT, OWN_USER_AGENT)
            .timeout(self.timeouts.connect)
            .send()
            .await;
        probe.is_ok_and(|r| r.status().is_success())
    }
}

/// An error with its causes, for messages that say what actually failed.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    // Bounded: some error types report themselves as their own source.
    for _ in 0..8 {
        let Some(cause) = source else { break };
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
