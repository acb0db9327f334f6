//! A minimal, fast fake Ollama for the benchmark.
//!
//! The test suite's fake (`tests/it/support/fake_ollama.rs`) models Ollama's
//! wire format in detail and records every request it receives, which makes
//! it grow without bound and spend most of its time on bookkeeping at tens
//! of thousands of requests per second. This one answers just what the
//! benchmark sends, on raw hyper, from bytes prepared in advance:
//!
//! - `POST /api/chat` whose body contains `"stream":false`: one fixed
//!   Ollama-shaped JSON reply (`application/json; charset=utf-8`);
//! - any other `POST /api/chat`: an NDJSON stream of [`Fake::set_stream`]'s
//!   chunks, each its own frame, the last one `"done":true` with
//!   `prompt_eval_count` and `eval_count`. With pacing, chunk `k` leaves at
//!   `start + k × pacing` (a schedule, so timer lateness does not add up);
//!   with `hold`, every chunk after the first waits for [`Fake::release`];
//! - `GET /`, `GET /api/version`, `GET /api/tags` as Ollama would, for
//!   start-up and health probes; anything else 404.
//!
//! It runs on its own tokio runtime (its own threads), so that it does not
//! share a scheduler with the load generator, and counts the streams it has
//! open ([`Fake::open_streams`]) to confirm the peak-memory scenario.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

pub const MODEL: &str = "mistral";
const CREATED_AT: &str = "2025-06-01T12:00:00.123456789Z";
const PROMPT_EVAL_COUNT: u64 = 7;

/// The non-streamed reply to every `"stream":false` chat request.
pub fn nonstream_body() -> Bytes {
    Bytes::from(format!(
        concat!(
            r#"{{"model":"{model}","created_at":"{at}","message":{{"role":"assistant","#,
            r#""content":"Hello! How can I help you today?"}},"done":true,"done_reason":"stop","#,
            r#""total_duration":12000000,"load_duration":1000000,"prompt_eval_count":{p},"#,
            r#""prompt_eval_duration":2000000,"eval_count":9,"eval_duration":9000000}}"#
        ),
        model = MODEL,
        at = CREATED_AT,
        p = PROMPT_EVAL_COUNT
    ))
}

/// The lines of a streamed reply with `chunks` content chunks: `chunks`
/// lines of content and the final `"done":true` line.
pub fn stream_lines(chunks: usize) -> Vec<Bytes> {
    let mut lines: Vec<Bytes> = (0..chunks)
        .map(|i| {
            Bytes::from(format!(
                concat!(
                    r#"{{"model":"{model}","created_at":"{at}","message":{{"role":"assistant","#,
                    r#""content":"w{i} "}},"done":false}}"#,
                    "\n"
                ),
                model = MODEL,
                at = CREATED_AT,
                i = i
            ))
        })
        .collect();
    lines.push(Bytes::from(format!(
        concat!(
            r#"{{"model":"{model}","created_at":"{at}","message":{{"role":"assistant","content":""}},"#,
            r#""done":true,"done_reason":"stop","total_duration":{total},"load_duration":1000000,"#,
            r#""prompt_eval_count":{p},"prompt_eval_duration":2000000,"eval_count":{n},"#,
            r#""eval_duration":{eval}}}"#,
            "\n"
        ),
        model = MODEL,
        at = CREATED_AT,
        total = 3_000_000 + chunks as u64 * 1_000_000,
        p = PROMPT_EVAL_COUNT,
        n = chunks,
        eval = chunks as u64 * 1_000_000
    )));
    lines
}

/// The whole body of a streamed reply, as a client should receive it.
pub fn stream_body(chunks: usize) -> Bytes {
    Bytes::from(stream_lines(chunks).concat())
}

/// How streamed replies are produced.
#[derive(Clone)]
struct StreamMode {
    lines: Arc<[Bytes]>,
    pacing: Duration,
    hold: bool,
}

struct State {
    nonstream: Bytes,
    mode: Mutex<StreamMode>,
    /// `true` once held streams may go on.
    released: watch::Sender<bool>,
    open_streams: AtomicUsize,
}

/// A running fake; it lives as long as the benchmark.
pub struct Fake {
    addr: SocketAddr,
    state: Arc<State>,
}

impl Fake {
    /// Binds `127.0.0.1:0` and serves on a runtime with `threads` worker
    /// threads of its own.
    pub fn start(threads: usize) -> std::io::Result<Fake> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state = Arc::new(State {
            nonstream: nonstream_body(),
            mode: Mutex::new(StreamMode {
                lines: stream_lines(64).into(),
                pacing: Duration::ZERO,
                hold: false,
            }),
            released: watch::channel(true).0,
            open_streams: AtomicUsize::new(0),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("fake-ollama")
            .enable_all()
            .build()?;
        let served = state.clone();
        std::thread::Builder::new()
            .name("fake-ollama-main".into())
            .spawn(move || runtime.block_on(accept_loop(std_listener, served)))?;
        Ok(Fake { addr, state })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Streamed replies from now on: `chunks` content chunks, `pacing`
    /// between items (zero: as fast as possible); `hold`: the first chunk at
    /// once, the others after [`Fake::release`].
    pub fn set_stream(&self, chunks: usize, pacing: Duration, hold: bool) {
        if hold {
            self.state.released.send_replace(false);
        }
        *self.state.mode.lock().unwrap() = StreamMode {
            lines: stream_lines(chunks).into(),
            pacing,
            hold,
        };
    }

    /// Lets held streams finish.
    pub fn release(&self) {
        self.state.released.send_replace(true);
    }

    /// Streamed replies whose body has not been fully handed over (or
    /// dropped) yet.
    pub fn open_streams(&self) -> usize {
        self.state.open_streams.load(Ordering::SeqCst)
    }
}

async fn accept_loop(std_listener: std::net::TcpListener, state: Arc<State>) {
    let listener = tokio::net::TcpListener::from_std(std_listener).expect("fake: listener");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                // Out of file descriptors or similar: try again shortly.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .header_read_timeout(None)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = match (method, path.as_str()) {
        (Method::POST, "/api/chat") => {
            let body = match req.into_body().collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => return Ok(reply(StatusCode::BAD_REQUEST, "text/plain", "bad body")),
            };
            if contains(&body, br#""stream":false"#) {
                let mut r = Response::new(Body::Full(Some(state.nonstream.clone())));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/json; charset=utf-8"),
                );
                r
            } else {
                let mode = state.mode.lock().unwrap().clone();
                let mut r = Response::new(Body::Stream(Box::new(Stream::new(&state, mode))));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-ndjson"),
                );
                r
            }
        }
        (Method::GET | Method::HEAD, "/") => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "Ollama is running",
        ),
        (Method::GET, "/api/version") => reply(
            StatusCode::OK,
            "application/json; charset=utf-8",
            r#"{"version":"0.12.6"}"#,
        ),
        (Method::GET, "/api/tags") => reply(
            StatusCode::OK,
            "application/json; charset=utf-8",
            r#"{"models":[{"name":"mistral:latest","model":"mistral:latest","modified_at":"2025-06-01T12:00:00.123456789Z","size":4113301824,"digest":"f974a74358d62a017b37c6f424fcdf2744ca02926c4f952513ddf474b2fa5091","details":{"parent_model":"","format":"gguf","family":"llama","families":["llama"],"parameter_size":"7.2B","quantization_level":"Q4_0"}}]}"#,
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "404 page not found"),
    };
    Ok(response)
}

fn reply(status: StatusCode, content_type: &'static str, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::Full(Some(Bytes::from_static(body.as_bytes()))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A response body: a whole reply or a stream.
pub enum Body {
    Full(Option<Bytes>),
    Stream(Box<Stream>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Stream(stream) => stream.poll_next(cx).map(|o| o.map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(data) => data.is_none(),
            Body::Stream(stream) => stream.next >= stream.mode.lines.len(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Body::Full(Some(data)) => hyper::body::SizeHint::with_exact(data.len() as u64),
            Body::Full(None) => hyper::body::SizeHint::with_exact(0),
            Body::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}

/// A streamed reply in progress; counted in `open_streams` until it is
/// finished or dropped.
pub struct Stream {
    state: Arc<State>,
    mode: StreamMode,
    next: usize,
    start: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    held: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    open: bool,
}

impl Stream {
    fn new(state: &Arc<State>, mode: StreamMode) -> Stream {
        state.open_streams.fetch_add(1, Ordering::SeqCst);
        let held: Option<Pin<Box<dyn Future<Output = ()> + Send>>> = if mode.hold {
            let mut released = state.released.subscribe();
            Some(Box::pin(async move {
                let _ = released.wait_for(|r| *r).await;
            }))
        } else {
            None
        };
        Stream {
            state: state.clone(),
            mode,
            next: 0,
            start: Instant::now(),
            sleep: None,
            held,
            open: true,
        }
    }

    fn close(&mut self) {
        if std::mem::take(&mut self.open) {
            self.state.open_streams.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.next >= self.mode.lines.len() {
            self.close();
            return Poll::Ready(None);
        }
        if self.next >= 1 {
            if let Some(held) = self.held.as_mut() {
                if held.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.held = None;
                // Paced items after a hold are scheduled from the release.
                self.start = Instant::now() - self.mode.pacing * self.next as u32;
            }
            if !self.mode.pacing.is_zero() {
                let due = self.start + self.mode.pacing * self.next as u32;
                if Instant::now() < due || self.sleep.is_some() {
                    let sleep = self
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.sleep = None;
                }
            }
        }
        let line = self.mode.lines[self.next].clone();
        self.next += 1;
        if self.next >= self.mode.lines.len() {
            self.close();
        }
        Poll::Ready(Some(line))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.close();
    }
}
