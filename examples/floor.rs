//! The floor of the benchmark: the least a reverse proxy built on tollgate's
//! building blocks (tokio, hyper's HTTP/1 server and client connections,
//! mimalloc) can do per request, measured next to nginx and tollgate.
//!
//! ```text
//! floor LISTEN_ADDR UPSTREAM_ADDR KEY[,KEY...]
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
//! It is not part of tollgate and serves nothing but the benchmark
//! (`examples/bench`, target `hyper-floor`). Nothing is sent anywhere but
//! to the given addresses, which the benchmark keeps on 127.0.0.1.

use axum::body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Upstream = Arc<Mutex<Option<client::SendRequest<Incoming>>>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, keys] = args.as_slice() else {
        eprintln!("usage: floor LISTEN_ADDR UPSTREAM_ADDR KEY[,KEY...]");
        return ExitCode::from(2);
    };
    let (Ok(listen), Ok(upstream)) = (listen.parse::<SocketAddr>(), upstream.parse()) else {
        eprintln!("floor: addresses are IP:PORT");
        return ExitCode::from(2);
    };
    let keys: Arc<HashSet<Vec<u8>>> =
        Arc::new(keys.split(',').map(|k| k.as_bytes().to_vec()).collect());
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("floor: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        let _ = socket.set_nodelay(true);
        let keys = keys.clone();
        let conn: Upstream = Arc::new(Mutex::new(None));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                forward(request, keys.clone(), conn.clone(), upstream)
            });
            let _ = server::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

/// One request: the key check, then the exchange with the upstream.
async fn forward(
    mut request: Request<Incoming>,
    keys: Arc<HashSet<Vec<u8>>>,
    conn: Upstream,
    upstream: SocketAddr,
) -> Result<Response<Body>, BoxError> {
    let known = request
        .headers_mut()
        .remove("x-api-key")
        .is_some_and(|key| keys.contains(key.as_bytes()));
    if !known {
        let mut refused = Response::new(Body::from(r#"{"error":"invalid API key"}"#));
        *refused.status_mut() = StatusCode::UNAUTHORIZED;
        return Ok(refused);
    }
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
    drop(slot);
    Ok(reply.map(Body::new))
}

/// A new HTTP/1 connection to the upstream, driven by a task of its own.
/// A failure ends the client's connection (hyper closes it on an error).
async fn connect(upstream: SocketAddr) -> Result<client::SendRequest<Incoming>, BoxError> {
    let stream = TcpStream::connect(upstream).await?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = client::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}
