//! The load generator: raw hyper HTTP/1.1 client connections, kept alive,
//! one request in flight per connection.
//!
//! - [`closed_loop`]: N connections send request after request as fast as
//!   the target answers (saturation throughput, latency under saturation).
//! - [`open_loop`]: a fixed request rate, split over N connections, each on
//!   its own schedule (`rate / N` per connection, staggered). Latency is
//!   measured from the *intended* send time, so a slow answer that delays
//!   the next request on its connection is charged in full to the target
//!   (no coordinated omission). The intended time is the scheduled time
//!   when the connection was still busy then; when the connection was idle
//!   and only tokio's 1 ms timer woke the sender late, it is the actual
//!   send time: the generator's own timer lateness is not the target's,
//!   and is reported separately.
//! - [`stream_loop`]: N connections reading streamed replies, recording the
//!   time to the first complete line and the gaps between lines.
//! - [`hold_streams`]: N streams opened at once and kept open, for the
//!   memory scenario.
//!
//! Every response must be a 200 whose body is byte for byte the one the
//! fake sent; anything else counts as an error (a run with errors does not
//! count).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};

/// How many API keys the load is spread over (connection `i` uses key
/// `i mod KEYS`); every target accepts them all.
static KEYS: AtomicUsize = AtomicUsize::new(1);

pub fn set_keys(n: usize) {
    KEYS.store(n.max(1), Ordering::SeqCst);
}

/// The API keys every target accepts.
pub fn keys() -> Vec<String> {
    (0..KEYS.load(Ordering::SeqCst))
        .map(|i| format!("bench-key-{i:03}-6f1c2a9e"))
        .collect()
}

const PATH: &str = "/api/chat";
const NONSTREAM_BODY: &str =
    r#"{"model":"mistral","messages":[{"role":"user","content":"Say hello."}],"stream":false}"#;
const STREAM_BODY: &str =
    r#"{"model":"mistral","messages":[{"role":"user","content":"Say hello."}],"stream":true}"#;

/// What to ask and what must come back.
#[derive(Clone)]
pub struct Call {
    addr: SocketAddr,
    host: HeaderValue,
    key: HeaderValue,
    body: Bytes,
    streamed: bool,
    /// The exact response body expected.
    pub expect: Bytes,
}

impl Call {
    /// A non-streamed chat request.
    pub fn nonstream(addr: SocketAddr, expect: Bytes) -> Call {
        Call::new(addr, NONSTREAM_BODY, false, expect)
    }

    /// A streamed chat request.
    pub fn stream(addr: SocketAddr, expect: Bytes) -> Call {
        Call::new(addr, STREAM_BODY, true, expect)
    }

    fn new(addr: SocketAddr, body: &'static str, streamed: bool, expect: Bytes) -> Call {
        Call {
            addr,
            host: HeaderValue::from_str(&addr.to_string()).expect("host header"),
            key: HeaderValue::from_str(&keys()[0]).expect("key header"),
            body: Bytes::from_static(body.as_bytes()),
            streamed,
            expect,
        }
    }

    /// This call as connection `i` makes it (with its key).
    fn for_connection(&self, i: usize) -> Call {
        let keys = keys();
        let mut call = self.clone();
        call.key = HeaderValue::from_str(&keys[i % keys.len()]).expect("key header");
        call
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = hyper::Method::POST;
        *req.uri_mut() = hyper::Uri::from_static(PATH);
        let h = req.headers_mut();
        h.insert(HOST, self.host.clone());
        h.insert("x-api-key", self.key.clone());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        req
    }
}

/// One kept-alive connection.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    /// The connection in `slot`, opened first if there is none. A failed
    /// open is counted in `errors` and answered `None` after a short pause,
    /// for the caller to try again.
    pub async fn reuse_or_open<'a>(
        slot: &'a mut Option<Conn>,
        addr: SocketAddr,
        errors: &mut Errors,
    ) -> Option<&'a mut Conn> {
        if slot.is_none() {
            match Conn::open(addr).await {
                Ok(c) => *slot = Some(c),
                Err(e) => {
                    errors.add(e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    return None;
                }
            }
        }
        slot.as_mut()
    }

    pub async fn open(addr: SocketAddr) -> Result<Conn, String> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn { sender })
    }

    async fn send(&mut self, call: &Call) -> Result<Response<Incoming>, String> {
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let response = self
            .sender
            .send_request(call.request())
            .await
            .map_err(|e| format!("request: {e}"))?;
        if response.status() != hyper::StatusCode::OK {
            return Err(format!("status {}", response.status()));
        }
        Ok(response)
    }
}

/// Errors seen in a run: how many, and the first few messages.
#[derive(Default, Debug, Clone)]
pub struct Errors {
    pub count: u64,
    pub samples: Vec<String>,
}

impl Errors {
    pub fn add(&mut self, e: String) {
        self.count += 1;
        if self.samples.len() < 3 && !self.samples.contains(&e) {
            self.samples.push(e);
        }
    }

    pub fn merge(&mut self, other: Errors) {
        self.count += other.count;
        for s in other.samples {
            if self.samples.len() < 3 && !self.samples.contains(&s) {
                self.samples.push(s);
            }
        }
    }
}

/// Sends `call` and checks the whole reply.
async fn whole(conn: &mut Conn, call: &Call) -> Result<(), String> {
    let response = conn.send(call).await?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    if body != call.expect {
        return Err(format!(
            "unexpected body ({} bytes): {}",
            body.len(),
            String::from_utf8_lossy(&body[..body.len().min(120)])
        ));
    }
    Ok(())
}

/// Timing of one streamed reply.
#[derive(Default)]
struct StreamTiming {
    /// Request sent → first complete line.
    ttfc: Duration,
    /// Gaps between consecutive complete lines.
    gaps: Vec<Duration>,
    /// Lines that arrived in the same read as the line before them.
    coalesced: u64,
}

/// Sends `call` (streamed) and checks the reply as it arrives, timing
/// each complete line. `on_first` runs when the first line is complete.
async fn streamed(
    conn: &mut Conn,
    call: &Call,
    timed: bool,
    on_first: Option<&(dyn Fn() + Sync)>,
) -> Result<StreamTiming, String> {
    let sent = Instant::now();
    let response = conn.send(call).await?;
    let mut body = response.into_body();
    let mut timing = StreamTiming::default();
    let mut offset = 0usize;
    let mut last_line: Option<Instant> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let now = Instant::now();
        let end = offset + data.len();
        if end > call.expect.len() || call.expect[offset..end] != data[..] {
            return Err(format!(
                "unexpected stream bytes at {offset}: {}",
                String::from_utf8_lossy(&data[..data.len().min(120)])
            ));
        }
        offset = end;
        let lines = data.iter().filter(|b| **b == b'\n').count();
        if lines == 0 {
            continue;
        }
        match last_line {
            None => {
                timing.ttfc = now - sent;
                if let Some(f) = on_first {
                    f();
                }
            }
            Some(prev) if timed => timing.gaps.push(now - prev),
            Some(_) => {}
        }
        if timed && lines > 1 {
            timing.coalesced += lines as u64 - 1;
            timing
                .gaps
                .extend(std::iter::repeat_n(Duration::ZERO, lines - 1));
        }
        last_line = Some(now);
    }
    if offset != call.expect.len() {
        return Err(format!(
            "stream ended after {offset} of {} bytes",
            call.expect.len()
        ));
    }
    Ok(timing)
}

/// Result of a closed-loop run.
#[derive(Debug, Default)]
pub struct Closed {
    /// Responses completed within the measurement window.
    pub completed: u64,
    pub window: Duration,
    /// Latencies of requests sent within the window, nanoseconds.
    pub latencies: Vec<u64>,
    pub errors: Errors,
}

impl Closed {
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.window.as_secs_f64()
    }
}

/// `conns` connections, as fast as possible, for `warmup + measure`.
pub async fn closed_loop(call: &Call, conns: usize, warmup: Duration, measure: Duration) -> Closed {
    let start = Instant::now();
    let window_start = start + warmup;
    let end = window_start + measure;
    let mut tasks = Vec::with_capacity(conns);
    for i in 0..conns {
        let call = call.for_connection(i);
        tasks.push(tokio::spawn(async move {
            let mut out = Closed::default();
            let mut conn: Option<Conn> = None;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let Some(c) = Conn::reuse_or_open(&mut conn, call.addr, &mut out.errors).await
                else {
                    continue;
                };
                let result = if call.streamed {
                    streamed(c, &call, false, None).await.map(|_| ())
                } else {
                    whole(c, &call).await
                };
                let done = Instant::now();
                match result {
                    Ok(()) => {
                        if done >= window_start && done <= end {
                            out.completed += 1;
                        }
                        if sent >= window_start && done <= end {
                            out.latencies.push((done - sent).as_nanos() as u64);
                        }
                    }
                    Err(e) => {
                        out.errors.add(e);
                        conn = None;
                    }
                }
            }
            out
        }));
    }
    let mut total = Closed {
        window: measure,
        ..Closed::default()
    };
    for task in tasks {
        let out = task.await.expect("load task");
        total.completed += out.completed;
        total.latencies.extend(out.latencies);
        total.errors.merge(out.errors);
    }
    total
}

/// Result of an open-loop (fixed-rate) run.
#[derive(Debug, Default)]
pub struct Open {
    /// Responses to requests scheduled within the window, received within
    /// it.
    pub completed: u64,
    pub window: Duration,
    /// Latency from the intended send time, nanoseconds.
    pub latencies: Vec<u64>,
    /// How late the generator's timer woke an idle connection, nanoseconds.
    pub timer_lateness: Vec<u64>,
    /// Requests sent late because their connection was still busy.
    pub queued: u64,
    /// Requests scheduled within the window but not sent by its end (the
    /// target could not keep up).
    pub unsent: u64,
    pub errors: Errors,
}

impl Open {
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.window.as_secs_f64()
    }
}

/// `rate` requests per second over `conns` connections, each on its own
/// schedule; see the module documentation for how latency is measured.
pub async fn open_loop(
    call: &Call,
    rate: f64,
    conns: usize,
    warmup: Duration,
    measure: Duration,
) -> Open {
    // Connect first, so that connecting is not part of the schedule.
    let mut opened = Vec::with_capacity(conns);
    let mut errors = Errors::default();
    for _ in 0..conns {
        match Conn::open(call.addr).await {
            Ok(c) => opened.push(c),
            Err(e) => errors.add(e),
        }
    }
    let step = Duration::from_secs_f64(1.0 / rate);
    let period = step * conns as u32;
    let start = Instant::now() + Duration::from_millis(5);
    let window_start = start + warmup;
    let end = window_start + measure;
    let mut tasks = Vec::with_capacity(conns);
    for (i, mut conn) in opened.into_iter().enumerate() {
        let call = call.for_connection(i);
        tasks.push(tokio::spawn(async move {
            let mut out = Open::default();
            let mut scheduled = start + step * i as u32;
            while scheduled < end {
                let now = Instant::now();
                if now >= end {
                    // Behind schedule at the end: what was never sent
                    // counts with what it had waited so far (a lower bound).
                    if scheduled >= window_start {
                        out.unsent += 1;
                        out.latencies.push((end - scheduled).as_nanos() as u64);
                    }
                    scheduled += period;
                    continue;
                }
                let busy = now > scheduled;
                if !busy {
                    tokio::time::sleep_until(scheduled.into()).await;
                }
                let sent = Instant::now();
                let intended = if busy { scheduled } else { sent };
                let result = whole(&mut conn, &call).await;
                let done = Instant::now();
                match result {
                    Ok(()) if scheduled >= window_start => {
                        if done <= end {
                            out.completed += 1;
                        }
                        out.latencies.push((done - intended).as_nanos() as u64);
                        if busy {
                            out.queued += 1;
                        } else {
                            out.timer_lateness
                                .push((sent - scheduled).as_nanos() as u64);
                        }
                    }
                    Ok(()) => {}
                    Err(e) => {
                        out.errors.add(e);
                        match Conn::open(call.addr).await {
                            Ok(c) => conn = c,
                            Err(e) => {
                                out.errors.add(e);
                                break;
                            }
                        }
                    }
                }
                scheduled += period;
            }
            out
        }));
    }
    let mut total = Open {
        window: measure,
        errors,
        ..Open::default()
    };
    for task in tasks {
        let out = task.await.expect("load task");
        total.completed += out.completed;
        total.latencies.extend(out.latencies);
        total.timer_lateness.extend(out.timer_lateness);
        total.queued += out.queued;
        total.unsent += out.unsent;
        total.errors.merge(out.errors);
    }
    total
}

/// Result of a run of streamed requests.
#[derive(Debug, Default)]
pub struct Streams {
    /// Streams completed within the window.
    pub completed: u64,
    /// Time to first chunk of streams started within the window, ns.
    pub ttfc: Vec<u64>,
    /// Every gap between consecutive lines of those streams, ns.
    pub gaps: Vec<u64>,
    /// Per stream, its largest gap, ns.
    pub max_gaps: Vec<u64>,
    /// Lines that arrived in one read with the line before them.
    pub coalesced: u64,
    pub errors: Errors,
}

/// `conns` connections reading streamed replies one after another;
/// connection `i` starts after `i × stagger`, so that the streams are
/// spread over time rather than arriving all at once, every round.
pub async fn stream_loop(
    call: &Call,
    conns: usize,
    stagger: Duration,
    warmup: Duration,
    measure: Duration,
) -> Streams {
    let start = Instant::now();
    let window_start = start + warmup;
    let end = window_start + measure;
    let mut tasks = Vec::with_capacity(conns);
    for i in 0..conns {
        let call = call.for_connection(i);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(stagger * i as u32).await;
            let mut out = Streams::default();
            let mut conn: Option<Conn> = None;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let Some(c) = Conn::reuse_or_open(&mut conn, call.addr, &mut out.errors).await
                else {
                    continue;
                };
                match streamed(c, &call, true, None).await {
                    Ok(t) => {
                        let done = Instant::now();
                        if done >= window_start && done <= end {
                            out.completed += 1;
                        }
                        if sent >= window_start && done <= end {
                            out.ttfc.push(t.ttfc.as_nanos() as u64);
                            let max = t.gaps.iter().max().copied().unwrap_or_default();
                            out.max_gaps.push(max.as_nanos() as u64);
                            out.gaps.extend(t.gaps.iter().map(|g| g.as_nanos() as u64));
                            out.coalesced += t.coalesced;
                        }
                    }
                    Err(e) => {
                        out.errors.add(e);
                        conn = None;
                    }
                }
            }
            out
        }));
    }
    let mut total = Streams::default();
    for task in tasks {
        let out = task.await.expect("load task");
        total.completed += out.completed;
        total.ttfc.extend(out.ttfc);
        total.gaps.extend(out.gaps);
        total.max_gaps.extend(out.max_gaps);
        total.coalesced += out.coalesced;
        total.errors.merge(out.errors);
    }
    total
}

/// `n` streams opened and held open (the fake must be in hold mode).
pub struct Held {
    first_lines: Arc<AtomicUsize>,
    notify: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
}

/// Opens `n` streams, at most `opening` connections being set up at a
/// time (so that no listen backlog overflows).
pub fn hold_streams(call: &Call, n: usize, opening: usize) -> Held {
    let first_lines = Arc::new(AtomicUsize::new(0));
    let notify = Arc::new(Notify::new());
    let gate = Arc::new(Semaphore::new(opening));
    let tasks = (0..n)
        .map(|i| {
            let call = call.for_connection(i);
            let first_lines = first_lines.clone();
            let notify = notify.clone();
            let gate = gate.clone();
            tokio::spawn(async move {
                let permit = gate.acquire_owned().await.expect("gate");
                let mut conn = Conn::open(call.addr).await?;
                let permit = std::sync::Mutex::new(Some(permit));
                let on_first = || {
                    drop(permit.lock().unwrap().take());
                    first_lines.fetch_add(1, Ordering::SeqCst);
                    notify.notify_one();
                };
                streamed(&mut conn, &call, false, Some(&on_first))
                    .await
                    .map(|_| ())
            })
        })
        .collect();
    Held {
        first_lines,
        notify,
        tasks,
    }
}

impl Held {
    /// Waits until every stream has received its first line; false on
    /// timeout or when a stream failed.
    pub async fn wait_all_open(&self, within: Duration) -> bool {
        let n = self.tasks.len();
        let deadline = Instant::now() + within;
        loop {
            if self.first_lines.load(Ordering::SeqCst) >= n {
                return true;
            }
            if Instant::now() > deadline || self.tasks.iter().any(|t| t.is_finished()) {
                return false;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), self.notify.notified()).await;
        }
    }

    /// Waits for every stream to end; the errors.
    pub async fn finish(self) -> Errors {
        let mut errors = Errors::default();
        for task in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.add(e),
                Err(e) => errors.add(format!("task: {e}")),
            }
        }
        errors
    }
}

/// Whether `GET path` (with the key) answers 200 within 2 s.
pub async fn get_ok(addr: SocketAddr, path: &str) -> bool {
    let attempt = async {
        let mut conn = Conn::open(addr).await.ok()?;
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = path.parse().ok()?;
        let h = req.headers_mut();
        h.insert(HOST, HeaderValue::from_str(&addr.to_string()).ok()?);
        h.insert("x-api-key", HeaderValue::from_str(&keys()[0]).ok()?);
        conn.sender.ready().await.ok()?;
        let response = conn.sender.send_request(req).await.ok()?;
        let ok = response.status() == hyper::StatusCode::OK;
        response.into_body().collect().await.ok()?;
        Some(ok)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}
