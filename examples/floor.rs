//! The floor of the benchmark: the least a reverse proxy built on tollgate's
//! building blocks (tokio, hyper's HTTP/1 server and client connections,
//! mimalloc) can do per request, measured next to nginx and tollgate.
//!
//! ```text
//! floor LISTEN_ADDR UPSTREAM_ADDR KEY[,KEY...] [LEDGER_FILE | journal:FILE | journal+sqlite:FILE | axum]
//! ```
//!
//! It does what the benchmark's nginx does and nothing more: checks the
//! `x-api-key` header against a fixed set (401 otherwise), drops it, and
//! forwards the request to the upstream over HTTP/1.1; the reply's body is
//! handed on frame by frame as it arrives. No JSON is read, nothing is
//! metered, logged or counted. Each client connection gets its own upstream
//! connection, opened with its first request and driven by a task of its
//! own, as hyper's client documentation does it: no pool, no lock.
//!
//! With `LEDGER_FILE` (target `hyper-floor-ledger`) it also keeps the least
//! durable ledger a gateway can keep: each forwarded request subtracts one
//! credit from its key's row and writes one ledger row (key, time,
//! credits) in a SQLite file in WAL mode with `synchronous=NORMAL`, as
//! tollgate's default store does; one writer thread commits whatever is
//! queued in one transaction (group commit), and the reply is handed on
//! only once its row has committed. No reservation, no token counts, no
//! other column or index: what this costs is the least that a charge
//! which survives `kill -9` can cost on this machine.
//!
//! With `journal:LEDGER_FILE` (target `hyper-floor-journal`) the ledger is
//! a plain file instead, one line appended per request with one `write` on
//! the request's own thread: no balance, no transaction, no hand-off; the
//! least that a charge which survives `kill -9` can cost at all. With
//! `journal+sqlite:FILE` (target `hyper-floor-journal-sqlite`), the same
//! journal, and the charge applied to the SQLite ledger (`FILE.db`) by the
//! writer thread afterwards, every 5 ms, in batches that no request waits
//! for.
//!
//! With `axum` instead of a ledger (target `hyper-floor-axum`), the same
//! forwarding goes through the framework tollgate's contract names: an
//! axum `Router` with a catch-all route per surface (`/api/{*path}`,
//! `/v1/{*path}`), the key checked by a `FromRequestParts` extractor, and
//! the handler taking the state, the method, the URI, the headers and the
//! body as tollgate's `passthrough` does. What it costs over the plain
//! floor is what the router and its extractors cost, before any of
//! tollgate's own work.
//!
//! It is not part of tollgate and serves nothing but the benchmark
//! (`examples/bench`, target `hyper-floor`). Nothing is sent anywhere but
//! to the given addresses, which the benchmark keeps on 127.0.0.1.

use axum::body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Mutex};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A client connection's own upstream connection, lent to one request at
/// a time.
type Upstream<B> = Arc<Mutex<Option<client::SendRequest<B>>>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, upstream, keys, ledger) = match args.as_slice() {
        [listen, upstream, keys] => (listen, upstream, keys, None),
        [listen, upstream, keys, ledger] => (listen, upstream, keys, Some(ledger)),
        _ => {
            eprintln!(
                "usage: floor LISTEN_ADDR UPSTREAM_ADDR KEY[,KEY...] [LEDGER_FILE | journal:FILE | journal+sqlite:FILE | axum]"
            );
            return ExitCode::from(2);
        }
    };
    let (Ok(listen), Ok(upstream)) = (listen.parse::<SocketAddr>(), upstream.parse()) else {
        eprintln!("floor: addresses are IP:PORT");
        return ExitCode::from(2);
    };
    let keys: Arc<HashMap<Vec<u8>, i64>> = Arc::new(
        keys.split(',')
            .zip(1..)
            .map(|(k, id)| (k.as_bytes().to_vec(), id))
            .collect(),
    );
    let through_axum = ledger.is_some_and(|mode| mode == "axum");
    let ledger = ledger.filter(|_| !through_axum);
    let ledger = match ledger.map(|path| Ledger::open(path, keys.values().copied())) {
        None => None,
        Some(Ok(ledger)) => Some(ledger),
        Some(Err(e)) => {
            eprintln!("floor: cannot open the ledger: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("floor: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let router = through_axum.then(|| routed::router(keys.clone(), upstream));
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        let _ = socket.set_nodelay(true);
        if let Some(router) = &router {
            tokio::spawn(routed::serve(socket, router.clone()));
            continue;
        }
        let keys = keys.clone();
        let ledger = ledger.clone();
        let conn: Upstream<Incoming> = Arc::new(Mutex::new(None));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                forward(
                    request,
                    keys.clone(),
                    ledger.clone(),
                    conn.clone(),
                    upstream,
                )
            });
            let _ = server::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

/// The floor behind an axum `Router` (`axum` mode, see the module
/// documentation).
mod routed {
    use super::{exchange, refused, Upstream};
    use axum::body::Body;
    use axum::extract::{FromRequestParts, State};
    use axum::http::request::Parts;
    use axum::http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
    use axum::routing::{any, get};
    use axum::{Extension, Router};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use tokio::net::TcpStream;
    use tokio::sync::Mutex;
    use tower::ServiceExt;

    #[derive(Clone)]
    pub struct Floor {
        keys: Arc<HashMap<Vec<u8>, i64>>,
        upstream: SocketAddr,
    }

    /// The caller's key, checked as tollgate's auth extractor checks it
    /// (here against a fixed set) and taken out of the headers.
    struct Key(#[allow(dead_code)] i64);

    impl FromRequestParts<Floor> for Key {
        type Rejection = Response<Body>;

        async fn from_request_parts(
            parts: &mut Parts,
            state: &Floor,
        ) -> Result<Key, Response<Body>> {
            parts
                .headers
                .remove("x-api-key")
                .and_then(|key| state.keys.get(key.as_bytes()).copied())
                .map(Key)
                .ok_or_else(refused)
        }
    }

    pub fn router(keys: Arc<HashMap<Vec<u8>, i64>>, upstream: SocketAddr) -> Router {
        Router::new()
            .route("/", get(root))
            .route("/api/{*path}", any(passthrough))
            .route("/v1/{*path}", any(passthrough))
            .with_state(Floor { keys, upstream })
    }

    /// One client connection: its requests go through `router`, each with
    /// the connection's own upstream connection in its extensions.
    pub async fn serve(socket: TcpStream, router: Router) {
        let conn: Upstream<Body> = Arc::new(Mutex::new(None));
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(conn.clone());
            Box::pin(router.clone().oneshot(request))
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(socket), service)
            .await;
    }

    /// What tollgate's `passthrough` takes, forwarded as the floor does.
    async fn passthrough(
        State(state): State<Floor>,
        _key: Key,
        Extension(conn): Extension<Upstream<Body>>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Body,
    ) -> Result<Response<Body>, StatusCode> {
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        exchange(&conn, state.upstream, request)
            .await
            .map_err(|_| StatusCode::BAD_GATEWAY)
    }

    /// `GET /` and `HEAD /`, Ollama's probe: no key needed, as in
    /// tollgate, and none passed on.
    async fn root(
        State(state): State<Floor>,
        Extension(conn): Extension<Upstream<Body>>,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, StatusCode> {
        request.headers_mut().remove("x-api-key");
        exchange(&conn, state.upstream, request)
            .await
            .map_err(|_| StatusCode::BAD_GATEWAY)
    }
}

/// One request: the key check, then the exchange with the upstream.
async fn forward(
    mut request: Request<Incoming>,
    keys: Arc<HashMap<Vec<u8>, i64>>,
    ledger: Option<Ledger>,
    conn: Upstream<Incoming>,
    upstream: SocketAddr,
) -> Result<Response<Body>, BoxError> {
    let known = request
        .headers_mut()
        .remove("x-api-key")
        .and_then(|key| keys.get(key.as_bytes()).copied());
    let Some(key_id) = known else {
        return Ok(refused());
    };
    let reply = exchange(&conn, upstream, request).await?;
    if let Some(ledger) = ledger {
        ledger.charge(key_id).await?;
    }
    Ok(reply)
}

/// Sends `request` on the client connection's own upstream connection
/// (opened on first use, or again when the upstream closed it).
async fn exchange<B>(
    conn: &Upstream<B>,
    upstream: SocketAddr,
    request: Request<B>,
) -> Result<Response<Body>, BoxError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // One request at a time per client connection: the lock is never
    // contended, it only lends the connection to this request.
    let mut slot = conn.lock().await;
    let mut sender = match slot.take() {
        Some(sender) if !sender.is_closed() => sender,
        _ => connect(upstream).await?,
    };
    sender.ready().await?;
    let reply = sender.send_request(request).await?;
    *slot = Some(sender);
    Ok(reply.map(Body::new))
}

/// The answer to a request without a known key.
fn refused() -> Response<Body> {
    let mut refused = Response::new(Body::from(r#"{"error":"invalid API key"}"#));
    *refused.status_mut() = StatusCode::UNAUTHORIZED;
    refused
}

/// The least durable ledger (see the module documentation).
#[derive(Clone)]
enum Ledger {
    /// A queue to one writer thread that commits everything queued in one
    /// SQLite transaction.
    Sqlite(mpsc::Sender<(i64, oneshot::Sender<bool>)>),
    /// `journal:PATH`: a line appended to a plain file with one `write`
    /// per request, on the request's own thread: the least a charge that
    /// survives `kill -9` can cost (it is in the operating system's hands
    /// once the write returns), with no balance, no index, no transaction.
    Journal(Arc<std::sync::Mutex<std::fs::File>>),
    /// `journal+sqlite:PATH`: the journal line (the charge's durability),
    /// and the same charge applied to the SQLite ledger (`PATH.db`) by the
    /// writer thread later, in batches nobody waits for: a journal in
    /// front of the database.
    JournalThenSqlite(
        Arc<std::sync::Mutex<std::fs::File>>,
        mpsc::Sender<(i64, oneshot::Sender<bool>)>,
    ),
}

impl Ledger {
    fn open(path: &str, keys: impl Iterator<Item = i64>) -> Result<Ledger, BoxError> {
        let shared = |file| Arc::new(std::sync::Mutex::new(file));
        if let Some(path) = path.strip_prefix("journal:") {
            return Ok(Ledger::Journal(shared(open_journal(path)?)));
        }
        if let Some(path) = path.strip_prefix("journaled-sqlite:") {
            let pace = Pace::Journaled(open_journal(path)?);
            let queue = open_sqlite(&format!("{path}.db"), keys, Some(pace))?;
            return Ok(Ledger::Sqlite(queue));
        }
        if let Some(path) = path.strip_prefix("journal+sqlite:") {
            let queue = open_sqlite(&format!("{path}.db"), keys, Some(Pace::Every(APPLY_EVERY)))?;
            return Ok(Ledger::JournalThenSqlite(
                shared(open_journal(path)?),
                queue,
            ));
        }
        Ok(Ledger::Sqlite(open_sqlite(path, keys, None)?))
    }

    /// One credit of key `id`, answered once committed (written).
    async fn charge(&self, id: i64) -> Result<(), BoxError> {
        match self {
            Ledger::Sqlite(queue) => {
                let (answer, answered) = oneshot::channel();
                queue.send((id, answer)).map_err(|_| "the ledger is gone")?;
                if answered.await? {
                    Ok(())
                } else {
                    Err("the ledger's commit failed".into())
                }
            }
            Ledger::Journal(file) => append(file, id),
            Ledger::JournalThenSqlite(file, queue) => {
                append(file, id)?;
                let (answer, _) = oneshot::channel();
                queue.send((id, answer)).map_err(|_| "the ledger is gone")?;
                Ok(())
            }
        }
    }
}

/// How the SQLite ledger's writer takes its batches (by default: each as
/// soon as it can, committed before the charges in it are answered).
enum Pace {
    /// Waits this long after each batch, so that batches nobody waits for
    /// grow.
    Every(std::time::Duration),
    /// Appends each batch to this journal with one `write` and answers its
    /// charges; commits what the journal holds to SQLite every
    /// [`APPLY_EVERY`].
    Journaled(std::fs::File),
}

/// The SQLite ledger and its writer thread.
fn open_sqlite(
    path: &str,
    keys: impl Iterator<Item = i64>,
    pace: Option<Pace>,
) -> Result<mpsc::Sender<(i64, oneshot::Sender<bool>)>, BoxError> {
    let conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // As tollgate's store: commits never checkpoint; a thread of its
    // own does, every `CHECKPOINT_EVERY` commits.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS keys (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS ledger (id INTEGER PRIMARY KEY,
                 key_id INTEGER NOT NULL, at INTEGER NOT NULL, credits INTEGER NOT NULL);",
    )?;
    for id in keys {
        conn.execute(
            "INSERT OR IGNORE INTO keys (id, balance) VALUES (?1, 1000000000000)",
            [id],
        )?;
    }
    let checkpointer = rusqlite::Connection::open(path)?;
    let (checkpoint, checkpoints) = mpsc::sync_channel::<()>(1);
    std::thread::spawn(move || {
        for () in checkpoints {
            let _ = checkpointer.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        }
    });
    let (queue, queued) = mpsc::channel();
    std::thread::spawn(move || write(conn, queued, checkpoint, pace));
    Ok(queue)
}

/// How long the writer of `journal+sqlite` waits between batches.
const APPLY_EVERY: std::time::Duration = std::time::Duration::from_millis(5);

/// A journal file, appended to.
fn open_journal(path: &str) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Milliseconds since the Unix epoch.
fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One journal line for a charge of key `id`, with one `write`.
fn append(file: &std::sync::Mutex<std::fs::File>, id: i64) -> Result<(), BoxError> {
    use std::io::Write as _;
    let at = now_millis();
    let line = format!("{id} {at} 1000\n");
    let mut file = file.lock().map_err(|_| "the journal is poisoned")?;
    file.write_all(line.as_bytes())?;
    Ok(())
}

/// The writer thread: takes everything queued, applies it in one
/// transaction, commits, answers.
fn write(
    mut conn: rusqlite::Connection,
    queued: mpsc::Receiver<(i64, oneshot::Sender<bool>)>,
    checkpoint: mpsc::SyncSender<()>,
    pace: Option<Pace>,
) {
    let pace = match pace {
        Some(Pace::Journaled(journal)) => {
            return write_journaled(conn, queued, checkpoint, journal)
        }
        Some(Pace::Every(pace)) => Some(pace),
        None => None,
    };
    let mut commits = 0u64;
    while let Ok(first) = queued.recv() {
        let mut batch = vec![first];
        batch.extend(queued.try_iter());
        let committed = apply(&mut conn, batch.iter().map(|(id, _)| *id)).is_ok();
        for (_, answer) in batch {
            let _ = answer.send(committed);
        }
        commits += 1;
        if commits.is_multiple_of(CHECKPOINT_EVERY) {
            let _ = checkpoint.try_send(());
        }
        if let Some(pace) = pace {
            std::thread::sleep(pace);
        }
    }
}

/// The writer of [`Pace::Journaled`]: each batch appended to `journal` and
/// answered; SQLite committed every [`APPLY_EVERY`] with all of them.
fn write_journaled(
    mut conn: rusqlite::Connection,
    queued: mpsc::Receiver<(i64, oneshot::Sender<bool>)>,
    checkpoint: mpsc::SyncSender<()>,
    mut journal: std::fs::File,
) {
    use std::io::Write as _;
    let mut pending: Vec<i64> = Vec::new();
    let mut committed_at = std::time::Instant::now();
    let mut commits = 0u64;
    let mut lines = String::new();
    loop {
        let first = match queued.recv_timeout(APPLY_EVERY) {
            Ok(first) => Some(first),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut batch: Vec<_> = first.into_iter().collect();
        batch.extend(queued.try_iter());
        if !batch.is_empty() {
            lines.clear();
            for (id, _) in &batch {
                lines.push_str(&format!("{id} 1000\n"));
            }
            let written = journal.write_all(lines.as_bytes()).is_ok();
            for (id, answer) in batch {
                let _ = answer.send(written);
                pending.push(id);
            }
        }
        if !pending.is_empty() && committed_at.elapsed() >= APPLY_EVERY {
            let _ = apply(&mut conn, pending.drain(..));
            committed_at = std::time::Instant::now();
            commits += 1;
            if commits.is_multiple_of(CHECKPOINT_EVERY) {
                let _ = checkpoint.try_send(());
            }
        }
    }
}

/// Commits between two checkpoints of the ledger's WAL (tollgate's figure).
const CHECKPOINT_EVERY: u64 = 200;

/// One credit of each of `ids`, with its ledger row, in one transaction.
fn apply(
    conn: &mut rusqlite::Connection,
    ids: impl IntoIterator<Item = i64>,
) -> rusqlite::Result<()> {
    let at = now_millis();
    let tx = conn.transaction()?;
    {
        let mut charge =
            tx.prepare_cached("UPDATE keys SET balance = balance - 1000 WHERE id = ?1")?;
        let mut row =
            tx.prepare_cached("INSERT INTO ledger (key_id, at, credits) VALUES (?1, ?2, 1000)")?;
        for id in ids {
            charge.execute([id])?;
            row.execute([id, at])?;
        }
    }
    tx.commit()
}

/// A new HTTP/1 connection to the upstream, driven by a task of its own.
/// A failure ends the client's connection (hyper closes it on an error).
async fn connect<B>(upstream: SocketAddr) -> Result<client::SendRequest<B>, BoxError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = TcpStream::connect(upstream).await?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = client::handshake::<_, B>(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}
