//! Where and how tollgate talks to Ollama, with the time limits of SPEC §6
//! on connecting and on waiting for the response head. The wait for the
//! head starts when the request has been sent. A body of unknown length or
//! over [`SENT_AT_ONCE`] (a blob upload, streamed through at the client's
//! pace) is watched: every piece of it that leaves starts the wait anew,
//! and its last one starts the wait for the head. So an upload is never
//! cut while it moves, and one that stalls (the client stops sending,
//! Ollama stops reading) ends like a late head.
//!
//! Forwarded requests go over the connections of [`super::connection`],
//! driven by the request's own task; so do tollgate's own calls (the
//! health probe, the model list), each bounded as a whole by the connect
//! limit.

use super::connection::{ExchangeError, Pool, ReplyBody};
use crate::config::Timeouts;
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Response, Uri};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http_body::{Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;

/// A request body of at most this many bytes, whose length is known, is
/// taken to leave at once: the wait for Ollama's head starts with the
/// request. A larger one, or one of unknown length, is watched.
const SENT_AT_ONCE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not reach Ollama at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("Ollama at {url} did not answer within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("the connection to Ollama at {url} broke: {reason}")]
    Broken { url: String, reason: String },
    /// The client's request body failed (it went away mid-upload).
    #[error("the request body broke off before it was sent whole: {reason}")]
    Upload { reason: String },
    /// Only at start-up: this URL cannot be used to reach Ollama.
    #[error("OLLAMA_URL {url} cannot be used: {reason}")]
    Unusable { url: String, reason: String },
}

/// The longest reply to one of tollgate's own requests that it reads.
const OWN_REPLY_LIMIT: usize = 16 << 20;

/// The user agent of tollgate's own requests to Ollama (health checks and
/// the model list), as opposed to the requests it forwards.
pub const OWN_USER_AGENT: &str = concat!("tollgate/", env!("CARGO_PKG_VERSION"));

/// Where and how tollgate talks to Ollama.
#[derive(Clone)]
pub struct Upstream {
    /// Connections to Ollama.
    pool: Arc<Pool>,
    base: String,
    /// The path every forwarded path goes under, without a trailing `/`
    /// (empty for most set-ups).
    prefix: String,
    /// `Host` of forwarded requests: the host and port of `base`.
    host: HeaderValue,
    pub timeouts: Timeouts,
}

/// A request on its way to Ollama.
pub struct Outbound {
    pub method: Method,
    /// Path and query, e.g. `/api/generate`.
    pub path_and_query: String,
    /// Headers to send: already filtered (see [`super::headers`]).
    pub headers: HeaderMap,
    pub body: Body,
}

/// How far a watched request body has gone.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Progress {
    /// A piece of it has just left (or none yet).
    Moving,
    /// All of it has left.
    Sent,
    /// Reading it from the client failed.
    Broke(String),
}

/// A request body that tells, through `progress`, of every piece taken
/// from it, of its end, and of its failure; dropped before its end, it
/// closes the channel.
struct Upload {
    body: Body,
    progress: watch::Sender<Progress>,
}

impl Upload {
    /// `body` as it is when it leaves at once (see [`SENT_AT_ONCE`]);
    /// otherwise wrapped, with the receiver that hears of its progress.
    fn watch(body: Body) -> (Body, Option<watch::Receiver<Progress>>) {
        let small = http_body::Body::size_hint(&body)
            .exact()
            .is_some_and(|n| n <= SENT_AT_ONCE);
        if small {
            return (body, None);
        }
        let (progress, heard) = watch::channel(Progress::Moving);
        (Body::new(Upload { body, progress }), Some(heard))
    }
}

impl http_body::Body for Upload {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let progress = match &polled {
            Poll::Ready(Some(Ok(_))) => Progress::Moving,
            Poll::Ready(None) => Progress::Sent,
            Poll::Ready(Some(Err(e))) => Progress::Broke(e.to_string()),
            Poll::Pending => return polled,
        };
        self.progress.send_replace(progress);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Resolves when Ollama has taken longer than `limit` to answer: `limit`
/// after the request was sent whole, or after the last progress of an
/// upload that stalled.
async fn too_late(upload: Option<&mut watch::Receiver<Progress>>, limit: Duration) {
    if let Some(upload) = upload {
        // Once sent (or broken: the exchange fails by itself), the wait
        // for the head.
        while *upload.borrow_and_update() == Progress::Moving {
            match tokio::time::timeout(limit, upload.changed()).await {
                // A piece left: wait anew.
                Ok(Ok(())) => {}
                // The body is gone; the exchange ends by itself.
                Ok(Err(_)) => break,
                // Stalled for the whole limit.
                Err(_) => return,
            }
        }
    }
    tokio::time::sleep(limit).await;
}

impl Upstream {
    pub fn new(base: &str, timeouts: Timeouts) -> Result<Upstream, UpstreamError> {
        let base = base.trim_end_matches('/').to_string();
        let invalid = |reason: String| UpstreamError::Unusable {
            url: base.clone(),
            reason,
        };
        let url = url::Url::parse(&base).map_err(|e| invalid(e.to_string()))?;
        if url.cannot_be_a_base() || url.query().is_some() {
            return Err(invalid("not a base URL".into()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                "credentials in the URL are not supported: Ollama takes none".into(),
            ));
        }
        if url.fragment().is_some() {
            return Err(invalid("not a base URL".into()));
        }
        if url.scheme() != "http" {
            return Err(invalid(
                "only http:// is supported: Ollama speaks plain HTTP".into(),
            ));
        }
        let (Some(name), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return Err(invalid("no host".into()));
        };
        let authority = match url.port() {
            Some(port) => format!("{name}:{port}"),
            None => name.to_string(),
        };
        // Connecting wants an IPv6 address without its brackets.
        let host = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let host_header = HeaderValue::from_str(&authority).map_err(|e| invalid(e.to_string()))?;
        Ok(Upstream {
            pool: Pool::new(host, port),
            prefix: url.path().trim_end_matches('/').to_string(),
            host: host_header,
            base,
            timeouts,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Sends a request; resolves when Ollama's response head has arrived.
    pub async fn send(&self, out: Outbound) -> Result<Response<ReplyBody>, UpstreamError> {
        let broken = |reason: String| UpstreamError::Broken {
            url: self.base.clone(),
            reason,
        };
        let (body, mut upload) = Upload::watch(out.body);
        let request = self
            .request(out.method, &out.path_and_query, out.headers, body)
            .map_err(broken)?;
        let exchange = self.pool.exchange(request, self.timeouts.connect);
        let answered = tokio::select! {
            biased;
            answered = exchange => Ok(answered),
            () = too_late(upload.as_mut(), self.timeouts.first_byte) => Err(()),
        };
        if let (Ok(Err(_)), Some(upload)) = (&answered, &upload) {
            // The exchange failed because the client's body did, not Ollama.
            if let Progress::Broke(reason) = &*upload.borrow() {
                return Err(UpstreamError::Upload {
                    reason: reason.clone(),
                });
            }
        }
        match answered {
            Err(()) => Err(UpstreamError::Timeout {
                url: self.base.clone(),
                secs: self.timeouts.first_byte.as_secs(),
            }),
            Ok(Err(ExchangeError::Connect(e))) => Err(UpstreamError::Unreachable {
                url: self.base.clone(),
                reason: error_chain(&e),
            }),
            Ok(Err(ExchangeError::Http(e))) => Err(broken(error_chain(&e))),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// Closes idle connections that Ollama closed or that waited too long.
    pub fn close_stale_connections(&self) {
        self.pool.close_stale();
    }

    /// A request for Ollama: `path_and_query` (which starts with `/`) under
    /// the base path, with `headers` and the `Host` of the base URL.
    fn request(
        &self,
        method: Method,
        path_and_query: &str,
        mut headers: HeaderMap,
        body: Body,
    ) -> Result<Request<Body>, String> {
        let target = if self.prefix.is_empty() {
            Uri::try_from(path_and_query)
        } else {
            Uri::try_from(format!("{}{path_and_query}", self.prefix))
        };
        let uri = target.map_err(|e| format!("cannot forward {path_and_query}: {e}"))?;
        headers.insert(header::HOST, self.host.clone());
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Ok(request)
    }

    /// The names of the models Ollama serves, if it answers.
    pub async fn list_models(&self) -> Option<Vec<String>> {
        let tags: serde_json::Value =
            serde_json::from_slice(&self.own_get("/api/tags").await?).ok()?;
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
        self.own_get("/api/version").await.is_some()
    }

    /// tollgate's own `GET` of `path`: the body of a success, or `None`
    /// when Ollama fails, answers otherwise or takes longer than the
    /// connect limit for the whole exchange.
    async fn own_get(&self, path: &str) -> Option<Bytes> {
        let mut headers = HeaderMap::new();
        headers.insert(header::USER_AGENT, HeaderValue::from_static(OWN_USER_AGENT));
        let request = self
            .request(Method::GET, path, headers, Body::empty())
            .ok()?;
        let exchange = async {
            let response = self
                .pool
                .exchange(request, self.timeouts.connect)
                .await
                .ok()?;
            if !response.status().is_success() {
                return None;
            }
            let mut body = response.into_body();
            let mut read = BytesMut::new();
            while let Some(piece) = body.next().await {
                read.extend_from_slice(&piece.ok()?);
                if read.len() > OWN_REPLY_LIMIT {
                    return None;
                }
            }
            Some(read.freeze())
        };
        tokio::time::timeout(self.timeouts.connect, exchange)
            .await
            .ok()
            .flatten()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn upstream(url: &str) -> Result<Upstream, UpstreamError> {
        let timeouts = Timeouts {
            connect: Duration::from_secs(1),
            first_byte: Duration::from_secs(1),
            stream_idle: Duration::from_secs(1),
        };
        Upstream::new(url, timeouts)
    }

    #[test]
    fn refuses_urls_it_cannot_forward_to() {
        for url in [
            "https://127.0.0.1:11434",
            "http://user:secret@127.0.0.1:11434",
            "http://user@127.0.0.1:11434",
            "http://127.0.0.1:11434/#part",
            "http://127.0.0.1:11434/?a=b",
            "mailto:ollama@example.com",
            "not a url",
        ] {
            assert!(
                matches!(upstream(url), Err(UpstreamError::Unusable { .. })),
                "{url} was accepted"
            );
        }
    }

    /// The target and `Host` of a request built for `path` by `upstream`.
    fn target_and_host(upstream: &Upstream, path: &str) -> (String, String) {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        let request = upstream
            .request(Method::POST, path, headers, Body::empty())
            .unwrap();
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.headers()[header::ACCEPT], "*/*");
        let host = request.headers()[header::HOST]
            .to_str()
            .unwrap()
            .to_string();
        (request.uri().to_string(), host)
    }

    #[test]
    fn forwards_under_the_base_path_with_the_base_host() {
        let plain = upstream("http://127.0.0.1:11434").unwrap();
        assert_eq!(
            target_and_host(&plain, "/api/chat?x=1"),
            ("/api/chat?x=1".into(), "127.0.0.1:11434".into())
        );
        let nested = upstream("http://ollama.internal/llm/").unwrap();
        assert_eq!(
            target_and_host(&nested, "/api/tags"),
            ("/llm/api/tags".into(), "ollama.internal".into())
        );
        let v6 = upstream("http://[::1]:11434").unwrap();
        assert_eq!(target_and_host(&v6, "/api/ps").1, "[::1]:11434");
        assert_eq!(v6.pool.host(), "::1");
        assert!(plain
            .request(Method::GET, "/a b", HeaderMap::new(), Body::empty())
            .is_err());
    }
}
