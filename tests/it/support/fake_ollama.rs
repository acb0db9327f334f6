//! An in-process fake of the Ollama HTTP server, for tollgate's integration
//! tests.
//!
//! # What it fakes
//!
//! [`FakeOllama::start`] binds `127.0.0.1:0` (a real TCP socket, so the
//! gateway talks to it exactly as it would to `ollama serve`) and answers
//! Ollama's native API and its OpenAI-compatible `/v1` API with Ollama's own
//! wire format (see `shared/OLLAMA-WIRE.md`): status codes, error bodies,
//! content types, NDJSON and SSE framing, the field order and the omission
//! of zero metrics, the `Host`/`Origin` check (403 with an empty body), and
//! gin's plain-text `404 page not found` / `405 method not allowed`.
//!
//! Generation is scripted, not modelled: a reply is `Behavior::chunks`
//! content chunks with the words `"w0 "`, `"w1 "`, ... followed by the final
//! `"done": true` chunk whose `eval_count` is the number of content chunks
//! and whose `prompt_eval_count` is `Behavior::prompt_eval_count`.
//! `options.num_predict` (native) or `max_tokens` (OpenAI), when positive and
//! smaller than `chunks`, cuts the reply to that many chunks with
//! `done_reason` / `finish_reason` `"length"`. Model management (`pull`,
//! `create`, `copy`, `delete`) really adds and removes names in
//! `Behavior::models`, so `/api/tags` reflects it.
//!
//! # How tests control it
//!
//! * [`FakeOllama::set`] replaces the [`Behavior`] for the requests that
//!   follow (a request held by `hold` reads it again when released).
//! * Everything received is recorded ([`FakeOllama::requests`]), so tests can
//!   check what the gateway forwarded (headers, body bytes, path and query).
//! * The *generation* endpoints (`/api/generate`, `/api/chat`, `/api/embed`,
//!   `/api/embeddings`, `/v1/chat/completions`, `/v1/completions`,
//!   `/v1/embeddings`) are counted ([`FakeOllama::generation_count`],
//!   [`FakeOllama::wait_for_requests`]) as soon as they arrive, errors
//!   included, and then go through, in this order: `hold` (wait for
//!   [`FakeOllama::release`]), `head_delay`, request validation (400/404 as
//!   Ollama), `fail`, and finally the reply.
//! * Pacing of streamed replies: every item after the first (each content
//!   chunk, the final chunk, an error line, a connection abort, and on SSE
//!   the usage chunk and `data: [DONE]`) waits for one
//!   [`FakeOllama::step`] when `lockstep` is set, then sleeps `chunk_delay`.
//! * `die_after: Some(k)` aborts the connection after `k` content chunks (no
//!   final chunk, no chunked-encoding terminator); `stream_error_after:
//!   Some(k)` ends the stream after `k` content chunks as Ollama ends a
//!   stream that failed: with an `{"error": ...}` line (status 200) on the
//!   native API, with an empty chunk and no `[DONE]` on `/v1`; with `k` = 0
//!   nothing was written yet and the error keeps its status (500). On a
//!   non-streamed reply these become a dropped connection and a 500 error
//!   respectively, as with the real server.
//! * Streamed bodies are wrapped in a guard: [`FakeOllama::in_flight`] counts
//!   the open ones, and a body dropped before its last item was handed to
//!   hyper (the client went away) counts as a disconnect
//!   ([`FakeOllama::wait_disconnect`], [`FakeOllama::disconnects`]).
//! * [`FakeOllama::shutdown`] (also run on drop) closes the listener and
//!   every open connection: "Ollama went away".

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------

/// The version `/api/version` reports.
pub const OLLAMA_VERSION: &str = "0.12.6";

/// Ollama's message for a full request queue (use with `Behavior::fail`).
pub const BUSY_MESSAGE: &str = "server busy, please try again.  maximum pending requests exceeded";

/// The message of the error line sent by `Behavior::stream_error_after`
/// (and of the 500 answer to a non-streamed request in that case).
pub const STREAM_ERROR_MESSAGE: &str =
    "an error was encountered while running the model: unexpected EOF";

/// The models a fresh [`Behavior`] lists.
pub const DEFAULT_MODELS: [&str; 3] = [
    "mistral:latest",
    "llama3.2:latest",
    "nomic-embed-text:latest",
];

/// Length of the vectors `/api/embed` and friends return (unless the
/// request's `dimensions` asks for fewer).
pub const EMBEDDING_DIM: usize = 8;

/// `modified_at` of every listed model.
const MODIFIED_AT: &str = "2025-06-01T12:00:00.123456789Z";
/// When a loaded model is let go (`/api/ps`), as Go writes a time in UTC.
const EXPIRES_AT: &str = "2025-06-01T12:05:00.123456789Z";
/// Unix time of [`MODIFIED_AT`], the `created` of `/v1/models` entries.
const MODIFIED_AT_UNIX: i64 = 1_748_779_200;

const CT_JSON_UTF8: &str = "application/json; charset=utf-8";
const CT_JSON: &str = "application/json";
const CT_NDJSON: &str = "application/x-ndjson";
const CT_SSE: &str = "text/event-stream";
const CT_TEXT_UTF8: &str = "text/plain; charset=utf-8";
const CT_TEXT: &str = "text/plain";

// Fake timings reported in final chunks (nanoseconds).
const LOAD_NS: u64 = 1_000_000;
const PROMPT_EVAL_NS: u64 = 2_000_000;
const EVAL_NS_PER_TOKEN: u64 = 1_000_000;

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// How the fake answers; replace it with [`FakeOllama::set`].
#[derive(Clone, Debug)]
pub struct Behavior {
    /// Installed models. `"mistral"` matches `"mistral:latest"` (names
    /// without a tag get `:latest`; matching ignores case, as Ollama's).
    pub models: Vec<String>,
    /// Content chunks per reply (`"w0 "`, `"w1 "`, ...); `eval_count` is
    /// the number actually produced.
    pub chunks: usize,
    /// `prompt_eval_count` of generations (`prompt_tokens` on `/v1`); also
    /// the token count of an embedding request, whatever its inputs.
    pub prompt_eval_count: u64,
    /// Pause before every streamed item after the first.
    pub chunk_delay: Duration,
    /// Pause before a generation request or a blob upload is answered at
    /// all (after the whole body was read).
    pub head_delay: Duration,
    /// Generation requests wait, after being counted, for
    /// [`FakeOllama::release`].
    pub hold: bool,
    /// Every streamed item after the first waits for one
    /// [`FakeOllama::step`].
    pub lockstep: bool,
    /// Abort the connection after this many content chunks.
    pub die_after: Option<usize>,
    /// Fail the stream after this many content chunks: an `{"error": ...}`
    /// line (status 200) on the native API, an empty chunk and no `[DONE]`
    /// on `/v1`; at 0, a 500 error reply.
    pub stream_error_after: Option<usize>,
    /// Answer every (valid) generation request with this status and
    /// `{"error": msg}` (OpenAI's error shape on `/v1`), before any chunk.
    pub fail: Option<(u16, String)>,
    /// Refuse (403, empty body) a `Host` that is not a loopback address or
    /// `localhost` (any port), and an `Origin` whose host is not.
    pub check_host: bool,
    /// On `/v1/chat/completions` streams, every content chunk is a tool
    /// call with empty `content`, and the finish reason `tool_calls`
    /// (Ollama's ToChunk for a model that calls tools).
    pub tool_calls: bool,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            models: DEFAULT_MODELS.iter().map(|m| m.to_string()).collect(),
            chunks: 3,
            prompt_eval_count: 7,
            chunk_delay: Duration::ZERO,
            head_delay: Duration::ZERO,
            hold: false,
            lockstep: false,
            die_after: None,
            stream_error_after: None,
            fail: None,
            check_host: true,
            tool_calls: false,
        }
    }
}

impl Behavior {
    /// The installed model `name` refers to, as listed, if any.
    pub fn find_model(&self, name: &str) -> Option<&str> {
        let wanted = canonical_name(name);
        self.models
            .iter()
            .find(|m| canonical_name(m) == wanted)
            .map(String::as_str)
    }
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path with the query string, if any (`/api/tags?x=1`).
    pub path: String,
    /// Header names are lowercase; values decoded lossily as UTF-8.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Recorded {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; `Value::Null` when it is empty or not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A running fake Ollama server; see the module documentation.
pub struct FakeOllama {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
    kill: Arc<watch::Sender<bool>>,
}

impl FakeOllama {
    /// Binds `127.0.0.1:0` and serves in a tokio task, with
    /// `Behavior::default()`.
    pub async fn start() -> FakeOllama {
        Self::start_with(Behavior::default()).await
    }

    /// Like [`FakeOllama::start`], with an initial behaviour.
    pub async fn start_with(behavior: Behavior) -> FakeOllama {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake ollama: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("fake ollama: local addr");
        let shared = Arc::new(Shared::new(behavior));
        let kill = Arc::new(watch::channel(false).0);
        let listener = KillableListener {
            inner: listener,
            kill: kill.clone(),
        };
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeOllama {
            addr,
            shared,
            server,
            kill,
        }
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the behaviour for the requests that follow.
    pub fn set(&self, b: Behavior) {
        *lock(&self.shared.behavior) = b;
    }

    /// The current behaviour (including models added or removed through
    /// the model-management endpoints).
    pub fn behavior(&self) -> Behavior {
        self.shared.behavior()
    }

    /// Every request received, in order (refused ones included).
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    /// The most recent request, if any.
    pub fn last_request(&self) -> Option<Recorded> {
        lock(&self.shared.requests).last().cloned()
    }

    /// Requests that reached a generation handler, errors included.
    pub fn generation_count(&self) -> usize {
        *self.shared.generations.borrow()
    }

    /// Waits until at least `n` generation requests have arrived; false on
    /// timeout.
    pub async fn wait_for_requests(&self, n: usize, within: Duration) -> bool {
        wait_count(&self.shared.generations, n, within).await
    }

    /// Lets `n` requests held by `Behavior::hold` go (permits accumulate:
    /// releasing before requests arrive lets later ones through at once).
    pub fn release(&self, n: usize) {
        self.shared.hold.add_permits(n);
    }

    /// Lockstep: lets one more streamed item go (permits accumulate).
    pub fn step(&self) {
        self.shared.steps.add_permits(1);
    }

    /// Lockstep: lets `n` more streamed items go.
    pub fn step_many(&self, n: usize) {
        self.shared.steps.add_permits(n);
    }

    /// True once a streamed body has been dropped before it was fully sent
    /// (the client went away); false on timeout.
    pub async fn wait_disconnect(&self, within: Duration) -> bool {
        self.wait_disconnects(1, within).await
    }

    /// Waits until at least `n` streamed bodies were dropped unfinished.
    pub async fn wait_disconnects(&self, n: usize, within: Duration) -> bool {
        wait_count(&self.shared.disconnects, n, within).await
    }

    /// Streamed bodies dropped before they were fully sent.
    pub fn disconnects(&self) -> usize {
        *self.shared.disconnects.borrow()
    }

    /// Streamed response bodies currently open.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Stops accepting connections and closes every open one (keep-alive
    /// connections in a client's pool included): Ollama went away. Also
    /// done on drop.
    pub fn shutdown(&self) {
        self.server.abort();
        self.kill.send_replace(true);
    }
}

impl Drop for FakeOllama {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---------------------------------------------------------------------------
// Shared state and the listener
// ---------------------------------------------------------------------------

struct Shared {
    behavior: Mutex<Behavior>,
    requests: Mutex<Vec<Recorded>>,
    /// Generation requests received (a watch channel, so waiters wake up).
    generations: watch::Sender<usize>,
    /// Streamed bodies dropped unfinished.
    disconnects: watch::Sender<usize>,
    in_flight: AtomicUsize,
    /// Permits for requests held by `Behavior::hold`.
    hold: Semaphore,
    /// Permits for lockstep items.
    steps: Semaphore,
    /// Digests posted to `/api/blobs/:digest`.
    blobs: Mutex<HashSet<String>>,
    /// Source of the numbers in OpenAI ids.
    seq: AtomicUsize,
    /// Installed models a request has used, as listed: what `/api/ps`
    /// shows (this Ollama never unloads one).
    loaded: Mutex<Vec<String>>,
}

impl Shared {
    fn new(behavior: Behavior) -> Shared {
        Shared {
            behavior: Mutex::new(behavior),
            requests: Mutex::new(Vec::new()),
            generations: watch::channel(0).0,
            disconnects: watch::channel(0).0,
            in_flight: AtomicUsize::new(0),
            hold: Semaphore::new(0),
            steps: Semaphore::new(0),
            blobs: Mutex::new(HashSet::new()),
            seq: AtomicUsize::new(0),
            loaded: Mutex::new(Vec::new()),
        }
    }

    fn behavior(&self) -> Behavior {
        lock(&self.behavior).clone()
    }

    /// An id number in 0..999, like Ollama's `rand.Intn(999)`.
    fn id_number(&self) -> usize {
        (self.seq.fetch_add(1, Ordering::SeqCst) * 389 + 123) % 999
    }
}

/// Locks a mutex, ignoring poisoning (a panicking test must not cascade).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn wait_count(counter: &watch::Sender<usize>, n: usize, within: Duration) -> bool {
    let mut rx = counter.subscribe();
    let reached = tokio::time::timeout(within, rx.wait_for(|c| *c >= n)).await;
    matches!(reached, Ok(Ok(_)))
}

/// The TCP listener axum serves: it hands out [`KillableIo`] connections
/// that all fail once `kill` is set, so that [`FakeOllama::shutdown`] can
/// close the connections axum is serving.
struct KillableListener {
    inner: TcpListener,
    kill: Arc<watch::Sender<bool>>,
}

impl axum::serve::Listener for KillableListener {
    type Io = KillableIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (KillableIo, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    // Small chunks go out at once rather than after an ACK.
                    let _ = stream.set_nodelay(true);
                    let mut kill = self.kill.subscribe();
                    let killed = Box::pin(async move {
                        // Also fires if the sender is gone.
                        let _ = kill.wait_for(|k| *k).await;
                    });
                    let io = KillableIo {
                        inner: stream,
                        killed,
                        dead: false,
                    };
                    return (io, addr);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A TCP stream whose reads and writes fail once the fake is shut down;
/// hyper then drops it, which closes the socket.
struct KillableIo {
    inner: TcpStream,
    killed: Pin<Box<dyn Future<Output = ()> + Send>>,
    dead: bool,
}

impl KillableIo {
    /// Err once killed; otherwise registers for the kill wake-up.
    fn alive(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.dead && self.killed.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        if self.dead {
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "fake ollama shut down",
            ))
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for KillableIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.alive(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.alive(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.alive(cx)?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.alive(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------

/// The routes Ollama registers (gin), with the methods each accepts.
enum Route {
    Root,
    Version,
    Tags,
    Ps,
    Show,
    Pull,
    Push,
    Create,
    Copy,
    Delete,
    Blob(String),
    Gen(Gen),
    V1Models,
    V1Model(String),
}

/// The generation endpoints.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gen {
    Generate,
    Chat,
    Embed,
    Embeddings,
    V1Chat,
    V1Completions,
    V1Embeddings,
}

fn route_of(path: &str) -> Option<(Route, &'static [Method])> {
    const GET_HEAD: &[Method] = &[Method::GET, Method::HEAD];
    const GET: &[Method] = &[Method::GET];
    const POST: &[Method] = &[Method::POST];
    const DELETE: &[Method] = &[Method::DELETE];
    const HEAD_POST: &[Method] = &[Method::HEAD, Method::POST];
    let route = match path {
        "/" => (Route::Root, GET_HEAD),
        "/api/version" => (Route::Version, GET_HEAD),
        "/api/tags" => (Route::Tags, GET_HEAD),
        "/api/ps" => (Route::Ps, GET),
        "/api/show" => (Route::Show, POST),
        "/api/pull" => (Route::Pull, POST),
        "/api/push" => (Route::Push, POST),
        "/api/create" => (Route::Create, POST),
        "/api/copy" => (Route::Copy, POST),
        "/api/delete" => (Route::Delete, DELETE),
        "/api/generate" => (Route::Gen(Gen::Generate), POST),
        "/api/chat" => (Route::Gen(Gen::Chat), POST),
        "/api/embed" => (Route::Gen(Gen::Embed), POST),
        "/api/embeddings" => (Route::Gen(Gen::Embeddings), POST),
        "/v1/chat/completions" => (Route::Gen(Gen::V1Chat), POST),
        "/v1/completions" => (Route::Gen(Gen::V1Completions), POST),
        "/v1/embeddings" => (Route::Gen(Gen::V1Embeddings), POST),
        "/v1/models" => (Route::V1Models, GET),
        _ => {
            if let Some(digest) = single_segment(path, "/api/blobs/") {
                (Route::Blob(digest), HEAD_POST)
            } else if let Some(model) = single_segment(path, "/v1/models/") {
                (Route::V1Model(model), GET)
            } else {
                return None;
            }
        }
    };
    Some(route)
}

/// The percent-decoded `:param` of `prefix:param`, when it is one non-empty
/// path segment (gin's `:name` matches neither `/` nor nothing).
fn single_segment(path: &str, prefix: &str) -> Option<String> {
    let rest = path.strip_prefix(prefix)?;
    (!rest.is_empty() && !rest.contains('/')).then(|| percent_decode(rest))
}

/// The one axum handler: records the request, applies the Host/Origin
/// check, then dispatches like gin.
async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    lock(&shared.requests).push(Recorded {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| path.clone()),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (n.as_str().to_string(), v)
            })
            .collect(),
        body: body.clone(),
    });

    if shared.behavior().check_host && !host_allowed(&parts) {
        return respond(StatusCode::FORBIDDEN, None, Body::empty());
    }

    let Some((route, methods)) = route_of(&path) else {
        return plain(StatusCode::NOT_FOUND, "404 page not found");
    };
    if !methods.contains(&parts.method) {
        let allow: Vec<&str> = methods.iter().map(Method::as_str).collect();
        let mut resp = plain(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed");
        let allow = HeaderValue::from_str(&allow.join(", ")).expect("allow header");
        resp.headers_mut().insert(header::ALLOW, allow);
        return resp;
    }

    let head = parts.method == Method::HEAD;
    let resp = match route {
        Route::Root => text(StatusCode::OK, "Ollama is running"),
        Route::Version => json_ok(&json!({ "version": OLLAMA_VERSION })),
        Route::Tags => tags(&shared),
        Route::Ps => ps(&shared),
        Route::Show => show(&shared, &body),
        Route::Pull => pull(&shared, &body),
        Route::Push => push(&shared, &body),
        Route::Create => create(&shared, &body),
        Route::Copy => copy(&shared, &body),
        Route::Delete => delete(&shared, &body),
        Route::Blob(digest) => {
            // Ollama answers once the whole blob is written to disk.
            let delay = shared.behavior().head_delay;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            blob(&shared, &digest, head)
        }
        Route::V1Models => v1_models(&shared),
        Route::V1Model(model) => v1_model(&shared, &model),
        Route::Gen(g) => generation(&shared, g, &body).await,
    };
    if head {
        strip_body(resp).await
    } else {
        resp
    }
}

/// Ollama's `allowedHostsMiddleware` and CORS origin check, reduced to
/// loopback: `Host` must be a loopback IP or `localhost` (any port, or
/// absent); `Origin`, when sent, must name such a host.
fn host_allowed(parts: &axum::http::request::Parts) -> bool {
    let host = match parts.headers.get(header::HOST) {
        Some(h) => String::from_utf8_lossy(h.as_bytes()).into_owned(),
        None => parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default(),
    };
    if !host.is_empty() && !is_loopback_host(strip_port(&host)) {
        return false;
    }
    match parts.headers.get(header::ORIGIN) {
        None => true,
        Some(origin) => {
            let origin = String::from_utf8_lossy(origin.as_bytes());
            let Some((scheme, rest)) = origin.split_once("://") else {
                return false;
            };
            let authority = rest.split('/').next().unwrap_or_default();
            matches!(scheme, "http" | "https") && is_loopback_host(strip_port(authority))
        }
    }
}

/// `host[:port]` or `[v6][:port]` -> host (brackets removed).
fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => authority,
    }
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

// ---------------------------------------------------------------------------
// Generation endpoints
// ---------------------------------------------------------------------------

/// Count, hold, delay, then answer.
async fn generation(shared: &Arc<Shared>, g: Gen, body: &Bytes) -> Response {
    shared.generations.send_modify(|n| *n += 1);
    load(shared, body);
    if shared.behavior().hold {
        shared
            .hold
            .acquire()
            .await
            .expect("hold semaphore is never closed")
            .forget();
    }
    // Read again: a held request follows the behaviour of its release.
    let b = shared.behavior();
    if !b.head_delay.is_zero() {
        tokio::time::sleep(b.head_delay).await;
    }
    match g {
        Gen::Generate => native_generate(shared, &b, body, false).await,
        Gen::Chat => native_generate(shared, &b, body, true).await,
        Gen::Embed => native_embed(&b, body),
        Gen::Embeddings => native_embeddings(&b, body),
        Gen::V1Chat => v1_generate(shared, &b, body, true).await,
        Gen::V1Completions => v1_generate(shared, &b, body, false).await,
        Gen::V1Embeddings => v1_embeddings(&b, body),
    }
}

/// `/api/generate` (`chat == false`) and `/api/chat`.
async fn native_generate(shared: &Arc<Shared>, b: &Behavior, body: &Bytes, chat: bool) -> Response {
    let (go_type, fields) = if chat {
        ("ChatRequest", CHAT_FIELDS)
    } else {
        ("GenerateRequest", GENERATE_FIELDS)
    };
    let req = match decode(body, go_type, fields) {
        Ok(req) => req,
        Err(msg) => return native_error(StatusCode::BAD_REQUEST, &msg),
    };
    let model = str_field(&req, "model");
    if model.is_empty() {
        return if chat {
            native_error(StatusCode::BAD_REQUEST, "model is required")
        } else {
            native_error(StatusCode::NOT_FOUND, "model '' not found")
        };
    }
    if b.find_model(model).is_none() {
        return model_not_found(model);
    }
    let empty = if chat {
        req.get("messages")
            .and_then(Value::as_array)
            .is_none_or(|m| m.is_empty())
    } else {
        str_field(&req, "prompt").is_empty()
    };
    // Empty input with keep_alive 0 unloads; without, it loads (both are a
    // single JSON object, even when streaming was asked for).
    if empty && is_zero_duration(req.get("keep_alive")) {
        return json_ok(&load_reply(chat, model, "unload"));
    }
    if let Some(resp) = failure(b, false) {
        return resp;
    }
    if empty {
        return json_ok(&load_reply(chat, model, "load"));
    }

    let limit = req
        .get("options")
        .and_then(|o| o.get("num_predict"))
        // Options.FromMap: a float for an integer option is cut to one.
        .and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)));
    let plan = Plan::new(b, model, limit, b.prompt_eval_count);
    let stream = req.get("stream").and_then(Value::as_bool) != Some(false);
    if !stream {
        return match plan.finish_unstreamed(b).await {
            Some(Cut::Die) => dying_response(CT_JSON_UTF8),
            Some(Cut::Error) => {
                native_error(StatusCode::INTERNAL_SERVER_ERROR, STREAM_ERROR_MESSAGE)
            }
            None => json_ok(&native_final(&plan, chat, plan.text())),
        };
    }

    if plan.cut_at(0) == Some(Cut::Error) {
        // Nothing written yet: streamResponse answers with the error's
        // status (gin's c.JSON after setting a bare application/json).
        return respond_json(
            StatusCode::INTERNAL_SERVER_ERROR,
            CT_JSON,
            &json!({ "error": STREAM_ERROR_MESSAGE }),
            false,
        );
    }
    let content = |i: usize| {
        let mut chunk = Map::new();
        chunk.insert("model".into(), json!(plan.model));
        chunk.insert("created_at".into(), json!(now_rfc3339()));
        if chat {
            chunk.insert(
                "message".into(),
                json!({ "role": "assistant", "content": word(i) }),
            );
        } else {
            chunk.insert("response".into(), json!(word(i)));
        }
        chunk.insert("done".into(), json!(false));
        ndjson_line(&Value::Object(chunk))
    };
    let error = ndjson_line(&json!({ "error": STREAM_ERROR_MESSAGE }));
    let tail = vec![ndjson_line(&native_final(&plan, chat, String::new()))];
    let items = plan.script(content, error, tail);
    streaming_response(shared, Pace::of(b), CT_NDJSON, items)
}

/// The final (`done: true`) object of a native reply, holding `text`.
fn native_final(plan: &Plan, chat: bool, text: String) -> Value {
    let mut obj = Map::new();
    obj.insert("model".into(), json!(plan.model));
    obj.insert("created_at".into(), json!(now_rfc3339()));
    if chat {
        obj.insert(
            "message".into(),
            json!({ "role": "assistant", "content": text }),
        );
        obj.insert("done".into(), json!(true));
        obj.insert("done_reason".into(), json!(plan.reason));
    } else {
        obj.insert("response".into(), json!(text));
        obj.insert("done".into(), json!(true));
        obj.insert("done_reason".into(), json!(plan.reason));
        obj.insert("context".into(), json!([1, 2, 3]));
    }
    let eval_ns = EVAL_NS_PER_TOKEN * plan.n.max(1) as u64;
    let mut put = |k: &str, v: u64| {
        // Go's `omitempty`: zero metrics are left out.
        if v != 0 {
            obj.insert(k.into(), json!(v));
        }
    };
    put(
        "total_duration",
        LOAD_NS + PROMPT_EVAL_NS + eval_ns + 500_000,
    );
    put("load_duration", LOAD_NS);
    put("prompt_eval_count", plan.prompt_tokens);
    put("prompt_eval_duration", PROMPT_EVAL_NS);
    put("eval_count", plan.n as u64);
    put("eval_duration", eval_ns);
    Value::Object(obj)
}

/// Ollama's answer to a load (empty input) or unload (plus keep_alive 0).
fn load_reply(chat: bool, model: &str, reason: &str) -> Value {
    if chat {
        json!({
            "model": model,
            "created_at": now_rfc3339(),
            "message": { "role": "assistant", "content": "" },
            "done": true,
            "done_reason": reason,
        })
    } else {
        json!({
            "model": model,
            "created_at": now_rfc3339(),
            "response": "",
            "done": true,
            "done_reason": reason,
        })
    }
}

/// `/api/embed`.
fn native_embed(b: &Behavior, body: &Bytes) -> Response {
    let req = match decode(body, "EmbedRequest", EMBED_FIELDS) {
        Ok(req) => req,
        Err(msg) => return native_error(StatusCode::BAD_REQUEST, &msg),
    };
    let model = str_field(&req, "model");
    if model.is_empty() {
        return model_not_found(model);
    }
    let inputs = match embed_inputs(req.get("input")) {
        Ok(inputs) => inputs,
        Err(msg) => return native_error(StatusCode::BAD_REQUEST, msg),
    };
    if b.find_model(model).is_none() {
        return native_error(StatusCode::NOT_FOUND, &not_pulled(model));
    }
    if let Some(resp) = failure(b, false) {
        return resp;
    }
    json_ok(&embed_reply(b, model, &inputs, dimensions(&req)))
}

/// The native `/api/embed` reply for `inputs`.
fn embed_reply(b: &Behavior, model: &str, inputs: &[String], dims: Option<usize>) -> Value {
    if inputs.is_empty() {
        return json!({ "model": model, "embeddings": [] });
    }
    let embeddings: Vec<Vec<f32>> = inputs.iter().map(|t| embedding(t, dims)).collect();
    let mut obj = Map::new();
    obj.insert("model".into(), json!(model));
    obj.insert("embeddings".into(), json!(embeddings));
    obj.insert("total_duration".into(), json!(LOAD_NS + PROMPT_EVAL_NS));
    obj.insert("load_duration".into(), json!(LOAD_NS));
    if b.prompt_eval_count != 0 {
        obj.insert("prompt_eval_count".into(), json!(b.prompt_eval_count));
    }
    Value::Object(obj)
}

/// `input` of an embed request: a string (empty = none) or strings.
fn embed_inputs(input: Option<&Value>) -> Result<Vec<String>, &'static str> {
    match input {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or("invalid input type"))
            .collect(),
        Some(_) => Err("invalid input type"),
    }
}

fn dimensions(req: &Map<String, Value>) -> Option<usize> {
    req.get("dimensions")
        .and_then(Value::as_u64)
        .filter(|d| *d > 0)
        .map(|d| d as usize)
}

/// `/api/embeddings` (legacy).
fn native_embeddings(b: &Behavior, body: &Bytes) -> Response {
    let req = match decode(body, "EmbeddingRequest", EMBEDDINGS_FIELDS) {
        Ok(req) => req,
        Err(msg) => return native_error(StatusCode::BAD_REQUEST, &msg),
    };
    let model = str_field(&req, "model");
    if model.is_empty() {
        return native_error(StatusCode::BAD_REQUEST, "model is required");
    }
    if b.find_model(model).is_none() {
        return native_error(StatusCode::NOT_FOUND, &not_pulled(model));
    }
    if let Some(resp) = failure(b, false) {
        return resp;
    }
    let prompt = str_field(&req, "prompt");
    if prompt.is_empty() {
        return json_ok(&json!({ "embedding": [] }));
    }
    let vector: Vec<f64> = embedding(prompt, None).into_iter().map(f64::from).collect();
    json_ok(&json!({ "embedding": vector }))
}

/// `/v1/chat/completions` (`chat == true`) and `/v1/completions`.
async fn v1_generate(shared: &Arc<Shared>, b: &Behavior, body: &Bytes, chat: bool) -> Response {
    let (go_type, fields) = if chat {
        ("ChatCompletionRequest", V1_CHAT_FIELDS)
    } else {
        ("CompletionRequest", V1_COMPLETION_FIELDS)
    };
    let req = match decode_v1(body, go_type, fields) {
        Ok(req) => req,
        Err(msg) => return openai_error(StatusCode::BAD_REQUEST, &msg, false),
    };
    if chat
        && req
            .get("messages")
            .and_then(Value::as_array)
            .is_none_or(|m| m.is_empty())
    {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "[] is too short - 'messages'",
            false,
        );
    }
    let model = str_field(&req, "model");
    if model.is_empty() {
        return if chat {
            openai_error(StatusCode::BAD_REQUEST, "model is required", true)
        } else {
            openai_error(StatusCode::NOT_FOUND, "model '' not found", true)
        };
    }
    if b.find_model(model).is_none() {
        let msg = format!("model '{model}' not found");
        return openai_error(StatusCode::NOT_FOUND, &msg, true);
    }
    if let Some(resp) = failure(b, true) {
        return resp;
    }

    let limit = req.get("max_tokens").and_then(Value::as_i64);
    let mut plan = Plan::new(b, model, limit, b.prompt_eval_count);
    if !chat && str_field(&req, "prompt").is_empty() {
        // An empty prompt is a model load for the generate handler.
        plan = Plan {
            n: 0,
            reason: "load",
            prompt_tokens: 0,
            ..plan
        };
    }
    let id = if chat {
        format!("chatcmpl-{}", shared.id_number())
    } else {
        format!("cmpl-{}", shared.id_number())
    };
    let created = now_unix();
    let usage = json!({
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.n,
        "total_tokens": plan.prompt_tokens + plan.n as u64,
    });

    if req.get("stream").and_then(Value::as_bool) != Some(true) {
        return match plan.finish_unstreamed(b).await {
            Some(Cut::Die) => dying_response(CT_JSON),
            Some(Cut::Error) => openai_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                STREAM_ERROR_MESSAGE,
                true,
            ),
            None => {
                let choice = if chat {
                    json!({
                        "index": 0,
                        "message": { "role": "assistant", "content": plan.text() },
                        "finish_reason": plan.reason,
                    })
                } else {
                    json!({ "text": plan.text(), "index": 0, "finish_reason": plan.reason })
                };
                let object = if chat {
                    "chat.completion"
                } else {
                    "text_completion"
                };
                let reply = json!({
                    "id": id,
                    "object": object,
                    "created": created,
                    "model": plan.model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [choice],
                    "usage": usage,
                });
                respond_json(StatusCode::OK, CT_JSON, &reply, true)
            }
        };
    }

    let include_usage = req
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    // One SSE chunk; `choice` None makes the `"choices": []` usage chunk.
    let chunk = |choice: Option<Value>, usage: Option<&Value>| {
        let mut obj = Map::new();
        obj.insert("id".into(), json!(id));
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        obj.insert("object".into(), json!(object));
        obj.insert("created".into(), json!(created));
        let choices = json!(choice.into_iter().collect::<Vec<_>>());
        if chat {
            obj.insert("model".into(), json!(plan.model));
            obj.insert("system_fingerprint".into(), json!("fp_ollama"));
            obj.insert("choices".into(), choices);
        } else {
            // CompletionChunk puts choices before model.
            obj.insert("choices".into(), choices);
            obj.insert("model".into(), json!(plan.model));
            obj.insert("system_fingerprint".into(), json!("fp_ollama"));
        }
        if let Some(usage) = usage {
            obj.insert("usage".into(), usage.clone());
        }
        sse_event(&Value::Object(obj))
    };
    let choice = |content: String, finish: Option<&str>| {
        if chat {
            json!({
                "index": 0,
                "delta": { "role": "assistant", "content": content },
                "finish_reason": finish,
            })
        } else {
            json!({ "text": content, "index": 0, "finish_reason": finish })
        }
    };
    // Ollama's completions writer puts a zero usage in every chunk when
    // include_usage is set (the chat writer does not).
    let zero_usage = json!({ "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0 });
    let per_chunk_usage = (!chat && include_usage).then_some(&zero_usage);

    if plan.cut_at(0) == Some(Cut::Error) {
        // Nothing written yet: the error keeps its status, rewritten by
        // the OpenAI writer.
        return openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            STREAM_ERROR_MESSAGE,
            true,
        );
    }
    let tool_calls = chat && b.tool_calls;
    let content = |i: usize| {
        let choice = if tool_calls {
            let call = json!({
                "id": format!("call_{i}"),
                "index": 0,
                "type": "function",
                "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris\"}" },
            });
            json!({
                "index": 0,
                "delta": { "role": "assistant", "content": "", "tool_calls": [call] },
                "finish_reason": null,
            })
        } else {
            choice(word(i), None)
        };
        chunk(Some(choice), per_chunk_usage)
    };
    // After the first chunk, the native handler's `{"error": ...}` line goes
    // through the OpenAI writer as if it were a reply: Go unmarshals it
    // into an empty ChatResponse / GenerateResponse, so the client gets an
    // empty chunk (no model, no text, no finish reason) and then the end
    // of the stream, without `[DONE]` and without the message.
    let error = {
        let mut empty = Map::new();
        empty.insert("id".into(), json!(id));
        if chat {
            empty.insert("object".into(), json!("chat.completion.chunk"));
            empty.insert("created".into(), json!(now_unix()));
            empty.insert("model".into(), json!(""));
            empty.insert("system_fingerprint".into(), json!("fp_ollama"));
            empty.insert(
                "choices".into(),
                json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": null }]),
            );
        } else {
            empty.insert("object".into(), json!("text_completion"));
            empty.insert("created".into(), json!(now_unix()));
            empty.insert(
                "choices".into(),
                json!([{ "text": "", "index": 0, "finish_reason": null }]),
            );
            empty.insert("model".into(), json!(""));
            empty.insert("system_fingerprint".into(), json!("fp_ollama"));
        }
        if let Some(usage) = per_chunk_usage {
            empty.insert("usage".into(), usage.clone());
        }
        sse_event(&Value::Object(empty))
    };
    let reason = if tool_calls {
        "tool_calls"
    } else {
        plan.reason
    };
    let mut tail = vec![chunk(
        Some(choice(String::new(), Some(reason))),
        per_chunk_usage,
    )];
    if include_usage {
        tail.push(chunk(None, Some(&usage)));
    }
    tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let items = plan.script(content, error, tail);
    streaming_response(shared, Pace::of(b), CT_SSE, items)
}

/// `/v1/embeddings`.
fn v1_embeddings(b: &Behavior, body: &Bytes) -> Response {
    let req = match decode_v1(body, "EmbedRequest", V1_EMBED_FIELDS) {
        Ok(req) => req,
        Err(msg) => return openai_error(StatusCode::BAD_REQUEST, &msg, false),
    };
    let format = str_field(&req, "encoding_format");
    if !format.is_empty()
        && !format.eq_ignore_ascii_case("float")
        && !format.eq_ignore_ascii_case("base64")
    {
        let msg = format!(
            "Invalid value for 'encoding_format' = {format}. Supported values: ['float', 'base64']."
        );
        return openai_error(StatusCode::BAD_REQUEST, &msg, false);
    }
    let input = match req.get("input") {
        Some(Value::String(s)) if s.is_empty() => json!([""]),
        None | Some(Value::Null) => {
            return openai_error(StatusCode::BAD_REQUEST, "invalid input", false)
        }
        Some(Value::Array(a)) if a.is_empty() => {
            return openai_error(StatusCode::BAD_REQUEST, "invalid input", false)
        }
        Some(other) => other.clone(),
    };
    let model = str_field(&req, "model");
    if model.is_empty() {
        return openai_error(StatusCode::NOT_FOUND, "model '' not found", true);
    }
    let inputs = match embed_inputs(Some(&input)) {
        Ok(inputs) => inputs,
        Err(msg) => return openai_error(StatusCode::BAD_REQUEST, msg, true),
    };
    if b.find_model(model).is_none() {
        return openai_error(StatusCode::NOT_FOUND, &not_pulled(model), true);
    }
    if let Some(resp) = failure(b, true) {
        return resp;
    }
    let base64 = format.eq_ignore_ascii_case("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let vector = embedding(text, dimensions(&req));
            let embedding = if base64 {
                json!(floats_to_base64(&vector))
            } else {
                json!(vector)
            };
            json!({ "object": "embedding", "embedding": embedding, "index": index })
        })
        .collect();
    let tokens = b.prompt_eval_count;
    let reply = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    });
    respond_json(StatusCode::OK, CT_JSON, &reply, true)
}

/// `Behavior::fail` as a response in the native or OpenAI shape.
fn failure(b: &Behavior, openai: bool) -> Option<Response> {
    let (status, msg) = b.fail.as_ref()?;
    let status = StatusCode::from_u16(*status).expect("Behavior::fail status is a valid code");
    Some(if openai {
        openai_error(status, msg, true)
    } else {
        native_error(status, msg)
    })
}

// ---------------------------------------------------------------------------
// Scripted replies and the streaming body
// ---------------------------------------------------------------------------

/// What one generation produces.
struct Plan {
    model: String,
    /// Content chunks.
    n: usize,
    reason: &'static str,
    prompt_tokens: u64,
    die_after: Option<usize>,
    error_after: Option<usize>,
}

/// How a reply is cut short.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cut {
    Die,
    Error,
}

impl Plan {
    fn new(b: &Behavior, model: &str, limit: Option<i64>, prompt_tokens: u64) -> Plan {
        let (n, reason) = match limit {
            Some(l) if l > 0 && (l as u64) < b.chunks as u64 => (l as usize, "length"),
            _ => (b.chunks, "stop"),
        };
        Plan {
            model: model.to_string(),
            n,
            reason,
            prompt_tokens,
            die_after: b.die_after,
            error_after: b.stream_error_after,
        }
    }

    /// The whole generated text.
    fn text(&self) -> String {
        (0..self.n).map(word).collect()
    }

    /// Whether the reply is cut after `i` content chunks (die wins a tie).
    fn cut_at(&self, i: usize) -> Option<Cut> {
        if self.die_after == Some(i) {
            Some(Cut::Die)
        } else if self.error_after == Some(i) {
            Some(Cut::Error)
        } else {
            None
        }
    }

    /// The cut of a reply, with the number of chunks produced before it.
    fn cut(&self) -> Option<(usize, Cut)> {
        (0..=self.n).find_map(|i| self.cut_at(i).map(|c| (i, c)))
    }

    /// For a non-streamed reply: spends the time generating would take and
    /// says how it ends.
    async fn finish_unstreamed(&self, b: &Behavior) -> Option<Cut> {
        let cut = self.cut();
        let produced = cut.map_or(self.n, |(i, _)| i) as u32;
        if !b.chunk_delay.is_zero() && produced > 0 {
            tokio::time::sleep(b.chunk_delay * produced).await;
        }
        cut.map(|(_, c)| c)
    }

    /// The streamed items: content chunks, then `tail`, unless cut short
    /// by an abort or by `error`.
    fn script(
        &self,
        content: impl Fn(usize) -> Bytes,
        error: Bytes,
        tail: Vec<Bytes>,
    ) -> VecDeque<Item> {
        let mut items = VecDeque::new();
        for i in 0..=self.n {
            match self.cut_at(i) {
                Some(Cut::Die) => {
                    items.push_back(Item::Die);
                    return items;
                }
                Some(Cut::Error) => {
                    items.push_back(Item::Data(error));
                    return items;
                }
                None if i < self.n => items.push_back(Item::Data(content(i))),
                None => {}
            }
        }
        items.extend(tail.into_iter().map(Item::Data));
        items
    }
}

/// The `i`th content chunk's text.
fn word(i: usize) -> String {
    format!("w{i} ")
}

/// One element of a streamed body.
enum Item {
    /// Bytes sent as one HTTP chunk (one NDJSON line or one SSE event).
    Data(Bytes),
    /// Abort the connection (the body stream fails).
    Die,
}

/// Counts an open streamed body; when dropped before its last item was
/// handed out, records a disconnect.
struct OpenStream {
    shared: Arc<Shared>,
    finished: bool,
}

impl OpenStream {
    fn new(shared: Arc<Shared>) -> OpenStream {
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        OpenStream {
            shared,
            finished: false,
        }
    }

    /// The body was (or is about to be) sent completely.
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.finished {
            self.shared.disconnects.send_modify(|n| *n += 1);
        }
    }
}

/// How the items of a streamed body are spaced.
#[derive(Clone, Copy)]
struct Pace {
    delay: Duration,
    lockstep: bool,
}

impl Pace {
    const NONE: Pace = Pace {
        delay: Duration::ZERO,
        lockstep: false,
    };

    fn of(b: &Behavior) -> Pace {
        Pace {
            delay: b.chunk_delay,
            lockstep: b.lockstep,
        }
    }
}

struct StreamState {
    items: VecDeque<Item>,
    sent: usize,
    delay: Duration,
    lockstep: bool,
    guard: OpenStream,
}

/// A 200 response whose body yields `items` one HTTP chunk each, paced by
/// `lockstep` and `chunk_delay`, and guarded by [`OpenStream`].
fn streaming_response(
    shared: &Arc<Shared>,
    pace: Pace,
    content_type: &'static str,
    items: VecDeque<Item>,
) -> Response {
    let state = StreamState {
        items,
        sent: 0,
        delay: pace.delay,
        lockstep: pace.lockstep,
        guard: OpenStream::new(shared.clone()),
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        if st.items.is_empty() {
            st.guard.finish();
            return None;
        }
        if st.sent > 0 {
            if st.lockstep {
                st.guard
                    .shared
                    .steps
                    .acquire()
                    .await
                    .expect("step semaphore is never closed")
                    .forget();
            }
            if !st.delay.is_zero() {
                tokio::time::sleep(st.delay).await;
            }
        }
        let item = st.items.pop_front()?;
        st.sent += 1;
        if st.items.is_empty() {
            st.guard.finish();
        }
        match item {
            Item::Data(bytes) => Some((Ok(bytes), st)),
            Item::Die => {
                // Let hyper flush the chunks before, then fail the body:
                // hyper drops the connection without a chunked terminator.
                tokio::task::yield_now().await;
                Some((Err(io::Error::other("fake ollama died mid-stream")), st))
            }
        }
    });
    respond(
        StatusCode::OK,
        Some(content_type),
        Body::from_stream(stream),
    )
}

/// A 200 head whose body fails at once: the connection is dropped before
/// any reply (a non-streamed request to an Ollama that dies).
fn dying_response(content_type: &'static str) -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, io::Error>(io::Error::other("fake ollama died"))
    });
    respond(
        StatusCode::OK,
        Some(content_type),
        Body::from_stream(stream),
    )
}

fn ndjson_line(v: &Value) -> Bytes {
    let mut out = go_json(v);
    out.push(b'\n');
    Bytes::from(out)
}

fn sse_event(v: &Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    out.extend(go_json(v));
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

// ---------------------------------------------------------------------------
// Model management and metadata endpoints
// ---------------------------------------------------------------------------

/// `/api/tags`.
fn tags(shared: &Shared) -> Response {
    let models: Vec<Value> = shared
        .behavior()
        .models
        .iter()
        .map(|m| {
            let name = canonical_display(m);
            let mut entry = listed_model(&name);
            // Where Ollama's `ListModelResponse` has it, after `model`.
            entry.shift_insert(2, "modified_at".into(), MODIFIED_AT.into());
            Value::Object(entry)
        })
        .collect();
    json_ok(&json!({ "models": models }))
}

/// What `/api/tags` and `/api/ps` both say of a model.
fn listed_model(name: &str) -> Map<String, Value> {
    let mut entry = Map::new();
    entry.insert("name".into(), name.into());
    entry.insert("model".into(), name.into());
    entry.insert("size".into(), model_size(name).into());
    entry.insert("digest".into(), digest_hex(name).into());
    entry.insert("details".into(), model_details(name));
    entry
}

/// Marks the installed model that a generation or embedding body names as
/// loaded, as Ollama loads it to answer (whatever the request's fate).
fn load(shared: &Shared, body: &Bytes) {
    let named = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("model")?.as_str().map(str::to_string));
    let Some(model) = named else {
        return;
    };
    let Some(name) = shared.behavior().find_model(&model).map(canonical_display) else {
        return;
    };
    let mut loaded = lock(&shared.loaded);
    if !loaded.contains(&name) {
        loaded.push(name);
    }
}

/// `/api/ps`: the loaded models, with the fields of Ollama's
/// `ProcessModelResponse` (all in VRAM, kept for five minutes).
fn ps(shared: &Shared) -> Response {
    let models: Vec<Value> = lock(&shared.loaded)
        .iter()
        .map(|name| {
            let mut entry = listed_model(name);
            entry.insert("expires_at".into(), EXPIRES_AT.into());
            entry.insert("size_vram".into(), model_size(name).into());
            Value::Object(entry)
        })
        .collect();
    json_ok(&json!({ "models": models }))
}

/// `/api/show`.
fn show(shared: &Shared, body: &Bytes) -> Response {
    let req = match decode(body, "ShowRequest", SHOW_FIELDS) {
        Ok(req) => req,
        Err(msg) => return native_error(StatusCode::BAD_REQUEST, &msg),
    };
    let model = model_or_name(&req);
    if model.is_empty() {
        return native_error(StatusCode::BAD_REQUEST, "model is required");
    }
    let Some(name) = shared.behavior().find_model(model).map(canonical_display) else {
        return model_not_found(model);
    };
    let family = model_family(&name);
    let modelfile = format!(
        "# Modelfile generated by \"ollama show\"\n\
         # To build a new Modelfile based on this, replace FROM with:\n\
         # FROM {name}\n\n\
         FROM /root/.ollama/models/blobs/sha256-{}\n\
         TEMPLATE \"{{{{ .Prompt }}}}\"\n",
        digest_hex(&format!("blob:{name}"))
    );
    let mut info = Map::new();
    info.insert("general.architecture".into(), json!(family));
    info.insert(
        "general.parameter_count".into(),
        json!(model_size(&name) * 2),
    );
    info.insert(format!("{family}.context_length"), json!(32768));
    info.insert(format!("{family}.embedding_length"), json!(4096));
    let capabilities = if is_embedding_model(&name) {
        json!(["embedding"])
    } else {
        json!(["completion"])
    };
    json_ok(&json!({
        "license": "Apache License\nVersion 2.0, January 2004",
        "modelfile": modelfile,
        "template": "{{ .Prompt }}",
        "details": model_details(&name),
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": MODIFIED_AT,
    }))
}

/// `/api/pull`: streams progress and installs the model.
fn pull(shared: &Arc<Shared>, body: &Bytes) -> Response {
    let req = match decode(body, "PullRequest", PULL_FIELDS) {
        Ok(req) => req,
        Err(msg) => return native_error(StatusCode::BAD_REQUEST, &msg),
    };
    let model = model_or_name(&req);
    if model.is_empty() {
        return native_error(StatusCode::BAD_REQUEST, "invalid model name");
    }
    add_model(shared, model);
    let name = canonical_display(model);
    let digest = digest_hex(&name);
    let total = model_size(&name);
    let layer = json!(format!("pulling {}", &digest[..12]));
    let progress = vec![
        json!({ "status": "pulling manifest" }),
        json!({ "status": layer, "digest": format!("sha256:{digest}"), "total": total }),
        json!({ "status": layer, "digest": format!("sha256:{digest}"), "total": total, "completed": total / 2 }),
        json!({ "status": layer, "digest": format!("sha256:{digest}"), "total": total, "completed": total }),
        json!({ "status": "verifying sha256 digest" }),
        json!({ "status": "writing manifest" }),
        json!({ "status": "success" }),
    ];
    progress_response(shared, &req, progress)
}

/// `/api/push`: streams progress for an installed model.
fn push(shared: &Arc<Shared>, body: &Bytes) -> Response {
    let req = match decode(body, "PushRequest", PULL_FIELDS) {
        Ok(req) => req,
        Err(msg) => return native_error(StatusCode::BAD_REQUEST, &msg),
    };
    let model = model_or_name(&req);
    if model.is_empty() {
        return native_error(StatusCode::BAD_REQUEST, "model is required");
    }
    if shared.behavior().find_model(model).is_none() {
        return model_not_found(model);
    }
    let name = canonical_display(model);
    let digest = digest_hex(&name);
    let total = model_size(&name);
    let layer = json!(format!("pushing {}", &digest[..12]));
    let progress = vec![
        json!({ "status": "retrieving manifest" }),
        json!({ "status": layer, "digest": format!("sha256:{digest}"), "total": total }),
        json!({ "status": layer, "digest": format!("sha256:{digest}"), "total": total, "completed": total }),
        json!({ "status": "pushing manifest" }),
        json!({ "status": "success" }),
    ];
    progress_response(shared, &req, progress)
}

/// `/api/create`: streams statuses and installs the model.
fn create(shared: &Arc<Shared>, body: &Bytes) -> Response {
    let req = match decode(body, "CreateRequest", CREATE_FIELDS) {
        Ok(req) => req,
        Err(msg) => return native_error(StatusCode::BAD_REQUEST, &msg),
    };
    let model = model_or_name(&req);
    if model.is_empty() {
        return native_error(StatusCode::BAD_REQUEST, "invalid model name");
    }
    add_model(shared, model);
    let name = canonical_display(model);
    let progress = vec![
        json!({ "status": format!("using existing layer sha256:{}", digest_hex(&format!("blob:{name}"))) }),
        json!({ "status": "writing manifest" }),
        json!({ "status": "success" }),
    ];
    progress_response(shared, &req, progress)
}

/// Progress objects streamed as NDJSON, or only the last one as JSON when
/// the request has `"stream": false`.
fn progress_response(
    shared: &Arc<Shared>,
    req: &Map<String, Value>,
    mut progress: Vec<Value>,
) -> Response {
    if req.get("stream").and_then(Value::as_bool) == Some(false) {
        let last = progress.pop().unwrap_or(Value::Null);
        return respond_json(StatusCode::OK, CT_JSON, &last, false);
    }
    let items = progress
        .iter()
        .map(|p| Item::Data(ndjson_line(p)))
        .collect();
    // Management streams are not paced by lockstep/chunk_delay.
    streaming_response(shared, Pace::NONE, CT_NDJSON, items)
}

/// `/api/copy`.
fn copy(shared: &Shared, body: &Bytes) -> Response {
    let req = match decode(body, "CopyRequest", COPY_FIELDS) {
        Ok(req) => req,
        Err(msg) => return native_error(StatusCode::BAD_REQUEST, &msg),
    };
    let source = str_field(&req, "source");
    let destination = str_field(&req, "destination");
    if source.is_empty() {
        return native_error(
            StatusCode::BAD_REQUEST,
            &format!("source {source:?} is invalid"),
        );
    }
    if destination.is_empty() {
        let msg = format!("destination {destination:?} is invalid");
        return native_error(StatusCode::BAD_REQUEST, &msg);
    }
    if shared.behavior().find_model(source).is_none() {
        // Go's %q: double quotes.
        return native_error(
            StatusCode::NOT_FOUND,
            &format!("model {source:?} not found"),
        );
    }
    add_model(shared, destination);
    respond(StatusCode::OK, None, Body::empty())
}

/// `/api/delete`.
fn delete(shared: &Shared, body: &Bytes) -> Response {
    let req = match decode(body, "DeleteRequest", DELETE_FIELDS) {
        Ok(req) => req,
        Err(msg) => return native_error(StatusCode::BAD_REQUEST, &msg),
    };
    let model = model_or_name(&req);
    if model.is_empty() {
        return native_error(
            StatusCode::BAD_REQUEST,
            &format!("name {model:?} is invalid"),
        );
    }
    let wanted = canonical_name(model);
    let mut behavior = lock(&shared.behavior);
    let before = behavior.models.len();
    behavior.models.retain(|m| canonical_name(m) != wanted);
    if behavior.models.len() == before {
        return model_not_found(model);
    }
    respond(StatusCode::OK, None, Body::empty())
}

/// `HEAD`/`POST /api/blobs/:digest` (the body's digest is not verified).
fn blob(shared: &Shared, digest: &str, head: bool) -> Response {
    let valid = digest
        .strip_prefix("sha256:")
        .or_else(|| digest.strip_prefix("sha256-"))
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if !valid {
        return native_error(StatusCode::BAD_REQUEST, "invalid digest format");
    }
    let key = digest.replacen("sha256-", "sha256:", 1);
    let mut blobs = lock(&shared.blobs);
    if head {
        if blobs.contains(&key) {
            respond(StatusCode::OK, None, Body::empty())
        } else {
            native_error(StatusCode::NOT_FOUND, &format!("blob {digest:?} not found"))
        }
    } else if blobs.insert(key) {
        respond(StatusCode::CREATED, None, Body::empty())
    } else {
        respond(StatusCode::OK, None, Body::empty())
    }
}

/// `/v1/models`.
fn v1_models(shared: &Shared) -> Response {
    let data: Vec<Value> = shared
        .behavior()
        .models
        .iter()
        .map(|m| v1_model_object(&canonical_display(m)))
        .collect();
    // ToListCompletion appends to a nil slice: with no model, Go writes null.
    let data = if data.is_empty() {
        Value::Null
    } else {
        Value::Array(data)
    };
    respond_json(
        StatusCode::OK,
        CT_JSON,
        &json!({ "object": "list", "data": data }),
        true,
    )
}

/// `/v1/models/:model` (the id is echoed as asked).
fn v1_model(shared: &Shared, model: &str) -> Response {
    if shared.behavior().find_model(model).is_none() {
        let msg = format!("model '{model}' not found");
        return openai_error(StatusCode::NOT_FOUND, &msg, true);
    }
    respond_json(StatusCode::OK, CT_JSON, &v1_model_object(model), true)
}

fn v1_model_object(name: &str) -> Value {
    // Ollama's owned_by is the name's namespace ("library" by default).
    let path = name.split(':').next().unwrap_or(name);
    let segments: Vec<&str> = path.split('/').collect();
    let owner = if segments.len() >= 2 {
        segments[segments.len() - 2]
    } else {
        "library"
    };
    json!({ "id": name, "object": "model", "created": MODIFIED_AT_UNIX, "owned_by": owner })
}

fn add_model(shared: &Shared, name: &str) {
    let mut behavior = lock(&shared.behavior);
    if behavior.find_model(name).is_none() {
        behavior.models.push(canonical_display(name));
    }
}

/// `model`, or the deprecated `name`.
fn model_or_name(req: &Map<String, Value>) -> &str {
    let model = str_field(req, "model");
    if model.is_empty() {
        str_field(req, "name")
    } else {
        model
    }
}

/// `name` with `:latest` when it has no tag.
fn canonical_display(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

/// The key names are compared by: tagged and lowercased.
fn canonical_name(name: &str) -> String {
    canonical_display(name).to_lowercase()
}

fn is_embedding_model(name: &str) -> bool {
    name.contains("embed")
}

fn model_family(name: &str) -> &'static str {
    if is_embedding_model(name) {
        "nomic-bert"
    } else {
        "llama"
    }
}

fn model_details(name: &str) -> Value {
    let family = model_family(name);
    let (params, quant) = if is_embedding_model(name) {
        ("137M", "F16")
    } else {
        ("7.2B", "Q4_K_M")
    };
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": params,
        "quantization_level": quant,
    })
}

/// A stable, plausible size in bytes.
fn model_size(name: &str) -> u64 {
    let base = if is_embedding_model(name) {
        274_302_450
    } else {
        4_113_301_824
    };
    base + fnv1a(name.as_bytes(), 0) % 100_000_000
}

/// 64 stable hex digits derived from `s`.
fn digest_hex(s: &str) -> String {
    (0..4u64)
        .map(|seed| format!("{:016x}", fnv1a(s.as_bytes(), seed)))
        .collect()
}

fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A unit-length vector derived from `text`.
fn embedding(text: &str, dims: Option<usize>) -> Vec<f32> {
    let dim = dims.map_or(EMBEDDING_DIM, |d| d.min(EMBEDDING_DIM));
    let raw: Vec<f32> = (0..dim as u64)
        .map(|i| (fnv1a(text.as_bytes(), i + 1) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let norm = raw.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    raw.iter().map(|v| v / norm).collect()
}

/// Little-endian f32s in standard base64, as Ollama's `floatsToBase64`.
fn floats_to_base64(values: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Request decoding, with Go's encoding/json error messages
// ---------------------------------------------------------------------------

/// Go type of a request field, for "cannot unmarshal" messages.
type Fields = &'static [(&'static str, &'static str)];

const GENERATE_FIELDS: Fields = &[
    ("model", "string"),
    ("prompt", "string"),
    ("suffix", "string"),
    ("system", "string"),
    ("template", "string"),
    ("context", "[]int"),
    ("stream", "bool"),
    ("raw", "bool"),
    ("images", "[]api.ImageData"),
    ("keep_alive", "*api.Duration"),
    ("options", "map[string]interface {}"),
];
const CHAT_FIELDS: Fields = &[
    ("model", "string"),
    ("messages", "[]api.Message"),
    ("stream", "bool"),
    ("tools", "api.Tools"),
    ("keep_alive", "*api.Duration"),
    ("options", "map[string]interface {}"),
];
const EMBED_FIELDS: Fields = &[
    ("model", "string"),
    ("truncate", "bool"),
    ("dimensions", "int"),
    ("options", "map[string]interface {}"),
];
const EMBEDDINGS_FIELDS: Fields = &[
    ("model", "string"),
    ("prompt", "string"),
    ("options", "map[string]interface {}"),
];
const SHOW_FIELDS: Fields = &[
    ("model", "string"),
    ("name", "string"),
    ("system", "string"),
    ("verbose", "bool"),
    ("options", "map[string]interface {}"),
];
const PULL_FIELDS: Fields = &[
    ("model", "string"),
    ("name", "string"),
    ("insecure", "bool"),
    ("stream", "bool"),
];
const CREATE_FIELDS: Fields = &[
    ("model", "string"),
    ("name", "string"),
    ("from", "string"),
    ("stream", "bool"),
    ("quantize", "string"),
];
const COPY_FIELDS: Fields = &[("source", "string"), ("destination", "string")];
const DELETE_FIELDS: Fields = &[("model", "string"), ("name", "string")];
const V1_CHAT_FIELDS: Fields = &[
    ("model", "string"),
    ("messages", "[]openai.Message"),
    ("stream", "bool"),
    ("stream_options", "openai.StreamOptions"),
    ("max_tokens", "int"),
];
const V1_COMPLETION_FIELDS: Fields = &[
    ("model", "string"),
    ("prompt", "string"),
    ("stream", "bool"),
    ("stream_options", "openai.StreamOptions"),
    ("max_tokens", "int"),
    ("suffix", "string"),
];
const V1_EMBED_FIELDS: Fields = &[
    ("model", "string"),
    ("dimensions", "int"),
    ("encoding_format", "string"),
];

/// Decodes a request body as gin's `ShouldBindJSON` into `api.<go_type>`
/// would: the first JSON value only (trailing bytes are ignored), `null` is
/// an empty request, and the error text is Go's. An empty body is `"EOF"`.
fn decode_go(body: &[u8], go_type: &str, fields: Fields) -> Result<Map<String, Value>, String> {
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<Value>();
    let value = match values.next() {
        None => return Err("EOF".into()),
        Some(Err(e)) => return Err(go_syntax_error(body, &e)),
        Some(Ok(v)) => v,
    };
    let obj = match value {
        Value::Object(obj) => obj,
        Value::Null => Map::new(),
        other => {
            let kind = json_kind(&other);
            return Err(format!(
                "json: cannot unmarshal {kind} into Go value of type {go_type}"
            ));
        }
    };
    // Go matches field names without regard to case (Unicode's simple
    // folding), and of the fields matching one name the last wins.
    let mut named = Map::new();
    for (key, value) in obj {
        let field = fields
            .iter()
            .map(|(f, _)| *f)
            .find(|f| *f == key)
            .or_else(|| fields.iter().map(|(f, _)| *f).find(|f| go_fold_eq(&key, f)));
        named.insert(field.map_or(key, str::to_string), value);
    }
    let obj = named;
    for (key, value) in &obj {
        let Some((_, go_field_type)) = fields.iter().find(|(f, _)| f == key) else {
            continue;
        };
        if !fits(value, go_field_type) {
            let struct_name = go_type.rsplit('.').next().unwrap_or(go_type);
            return Err(format!(
                "json: cannot unmarshal {} into Go struct field {struct_name}.{key} of type {go_field_type}",
                json_kind(value)
            ));
        }
    }
    Ok(obj)
}

/// Whether Go's `encoding/json` takes `key` for the (ASCII) field name
/// `field`: `bytes.EqualFold`, under which the Kelvin sign is a `k` and
/// the long s an `s`.
fn go_fold_eq(key: &str, field: &str) -> bool {
    let fold = |c: char| match c {
        '\u{212A}' => 'k',
        '\u{17F}' => 's',
        c => c.to_ascii_lowercase(),
    };
    key.chars().map(fold).eq(field.chars().map(fold))
}

/// Native decoding: an empty body is `missing request body`.
fn decode(body: &[u8], go_type: &str, fields: Fields) -> Result<Map<String, Value>, String> {
    match decode_go(body, &format!("api.{go_type}"), fields) {
        Err(e) if e == "EOF" => Err("missing request body".into()),
        other => other,
    }
}

/// OpenAI decoding: Go's messages as they are (an empty body is `EOF`);
/// they become 400 `invalid_request_error`.
fn decode_v1(body: &[u8], go_type: &str, fields: Fields) -> Result<Map<String, Value>, String> {
    decode_go(body, &format!("openai.{go_type}"), fields)
}

/// Whether a JSON value decodes into a Go field of this type (`null`
/// always does).
fn fits(value: &Value, go_type: &str) -> bool {
    match value {
        Value::Null => true,
        // api.Duration's own decoder takes seconds or a Go duration string.
        Value::String(_) | Value::Number(_) if go_type == "*api.Duration" => true,
        Value::String(_) => go_type == "string",
        Value::Bool(_) => go_type == "bool",
        Value::Number(n) => go_type == "int" && (n.is_i64() || n.is_u64()),
        Value::Array(_) => go_type.starts_with("[]") || go_type == "api.Tools",
        Value::Object(_) => go_type.starts_with("map[") || go_type == "openai.StreamOptions",
    }
}

fn json_kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => "bool".into(),
        Value::Number(n) if n.is_i64() || n.is_u64() => "number".into(),
        Value::Number(n) => format!("number {n}"),
        Value::String(_) => "string".into(),
        Value::Array(_) => "array".into(),
        Value::Object(_) => "object".into(),
    }
}

/// Go's `encoding/json` wording for a syntax error serde_json reported.
fn go_syntax_error(body: &[u8], err: &serde_json::Error) -> String {
    use serde_json::error::Category;
    if err.classify() == Category::Eof {
        return "unexpected EOF".into();
    }
    // serde_json's line and column (1-based) point at the offending byte.
    let line_start: usize = body
        .split(|b| *b == b'\n')
        .take(err.line().saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum();
    let offset = (line_start + err.column()).saturating_sub(1);
    let Some(&byte) = body.get(offset) else {
        return "unexpected EOF".into();
    };
    let msg = err.to_string();
    if msg.starts_with("expected ident") {
        // A broken `true` / `false` / `null`: Go names the literal and the
        // character it expected.
        let start = body[..offset]
            .iter()
            .rposition(|b| !b.is_ascii_alphabetic())
            .map_or(0, |p| p + 1);
        let literal = match body.get(start) {
            Some(b't') => "true",
            Some(b'f') => "false",
            _ => "null",
        };
        if let Some(expected) = literal.as_bytes().get(offset - start) {
            return format!(
                "invalid character {} in literal {literal} (expecting {})",
                go_quote_char(byte),
                go_quote_char(*expected)
            );
        }
    }
    let context = if msg.starts_with("expected `:`") {
        "after object key"
    } else if msg.starts_with("expected `,` or `}`") {
        "after object key:value pair"
    } else if msg.starts_with("expected `,` or `]`") {
        "after array element"
    } else if msg.starts_with("key must be a string")
        || (msg.starts_with("trailing comma") && byte == b'}')
    {
        "looking for beginning of object key string"
    } else if msg.starts_with("control character") {
        "in string literal"
    } else if msg.starts_with("invalid escape") {
        "in string escape code"
    } else {
        "looking for beginning of value"
    };
    format!("invalid character {} {context}", go_quote_char(byte))
}

/// Go's `quoteChar`.
fn go_quote_char(b: u8) -> String {
    match b {
        b'\'' => r"'\''".into(),
        b'"' => "'\"'".into(),
        b'\n' => r"'\n'".into(),
        b'\r' => r"'\r'".into(),
        b'\t' => r"'\t'".into(),
        0x20..=0x7e => format!("'{}'", b as char),
        _ => format!("'\\x{b:02x}'"),
    }
}

fn str_field<'a>(req: &'a Map<String, Value>, key: &str) -> &'a str {
    req.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// `keep_alive` of 0: a number, or a Go duration string such as "0"/"0s".
fn is_zero_duration(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
        Some(Value::String(s)) => {
            let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
            !digits.is_empty() && digits.parse::<f64>() == Ok(0.0)
        }
        _ => false,
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------
// Response helpers
// ---------------------------------------------------------------------------

fn respond(status: StatusCode, content_type: Option<&'static str>, body: Body) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Some(ct) = content_type {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    resp
}

/// JSON as Go's encoder writes it (`<`, `>`, `&` escaped), with a trailing
/// newline when it came from a `json.Encoder` (OpenAI writers).
fn respond_json(
    status: StatusCode,
    content_type: &'static str,
    v: &Value,
    newline: bool,
) -> Response {
    let mut body = go_json(v);
    if newline {
        body.push(b'\n');
    }
    respond(status, Some(content_type), Body::from(body))
}

/// gin's `c.JSON(200, ...)`.
fn json_ok(v: &Value) -> Response {
    respond_json(StatusCode::OK, CT_JSON_UTF8, v, false)
}

/// `{"error": msg}` as gin's `c.JSON`.
fn native_error(status: StatusCode, msg: &str) -> Response {
    respond_json(status, CT_JSON_UTF8, &json!({ "error": msg }), false)
}

/// The embedding handlers do not look the model up by name first: the
/// scheduler fails to load it (`handleScheduleError`), hence the wording.
fn not_pulled(model: &str) -> String {
    format!("model \"{model}\" not found, try pulling it first")
}

fn model_not_found(model: &str) -> Response {
    native_error(StatusCode::NOT_FOUND, &format!("model '{model}' not found"))
}

/// OpenAI's error shape. `from_handler`: produced by the native handler and
/// rewritten by Ollama's OpenAI writer (`application/json`, trailing
/// newline); otherwise by the OpenAI middleware itself (gin's `c.JSON`).
fn openai_error(status: StatusCode, msg: &str, from_handler: bool) -> Response {
    let kind = match status {
        StatusCode::BAD_REQUEST => "invalid_request_error",
        StatusCode::NOT_FOUND => "not_found_error",
        _ => "api_error",
    };
    let body = json!({
        "error": { "message": msg, "type": kind, "param": null, "code": null }
    });
    if from_handler {
        respond_json(status, CT_JSON, &body, true)
    } else {
        respond_json(status, CT_JSON_UTF8, &body, false)
    }
}

/// gin's `c.String`.
fn text(status: StatusCode, s: &'static str) -> Response {
    respond(status, Some(CT_TEXT_UTF8), Body::from(s))
}

/// gin's 404/405 bodies.
fn plain(status: StatusCode, s: &'static str) -> Response {
    respond(status, Some(CT_TEXT), Body::from(s))
}

/// A HEAD answer: the GET headers with the body's length, no body.
async fn strip_body(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    let len = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_or(0, |b| b.len());
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Response::from_parts(parts, Body::empty())
}

/// serde_json output with Go's HTML escaping (`<`, `>`, `&` only ever
/// occur inside strings in JSON text, so a byte replacement is exact).
fn go_json(v: &Value) -> Vec<u8> {
    let raw = serde_json::to_vec(v).expect("JSON values serialize");
    let mut out = Vec::with_capacity(raw.len());
    for b in raw {
        match b {
            b'<' => out.extend_from_slice(br"\u003c"),
            b'>' => out.extend_from_slice(br"\u003e"),
            b'&' => out.extend_from_slice(br"\u0026"),
            _ => out.push(b),
        }
    }
    out
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formatting of now")
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}
