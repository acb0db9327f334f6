//! Serving connections: HTTP/1.1 on hyper's server connection, one task
//! per connection, with graceful shutdown.
//!
//! This is what `axum::serve` does, minus what tollgate does not use: it
//! speaks HTTP/1.1 only (clients of Ollama's API do; TLS already offers
//! only `http/1.1`), so a connection's first bytes are not sniffed for
//! HTTP/2's preface, and no request carries the machinery for protocol
//! upgrades. Each request gets the client's address as
//! [`ConnectInfo`] (failed-auth throttling reads it).
//!
//! A connection must send each request's head within the header timeout
//! (`CLIENT_HEADER_TIMEOUT_SECS`), counted from when it connects or from
//! the end of the previous response: a client that connects and sends
//! nothing, or a head byte by byte, cannot hold a connection for ever, and
//! neither can an idle keep-alive connection. The connection is closed
//! without a response (there is no request to answer).
//!
//! Shutdown: once `until` resolves, no connection is accepted any more;
//! every connection finishes the request it is serving (its response body
//! included) and then closes, idle ones at once. Those that have not closed
//! [`LINGER`] later (a client that stopped reading its stream) are cut, so
//! that what they hold is dropped and settled; [`serve`] returns when every
//! connection's task has ended.

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::Response;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tower::{BoxError, Service, ServiceExt};

/// Serves `service` on the connections `listener` accepts until `until`
/// resolves, then lets the open connections finish (see the module doc).
pub async fn serve<L, S>(
    mut listener: L,
    service: S,
    header_timeout: Option<Duration>,
    until: impl Future<Output = ()>,
) where
    L: Listener<Addr = SocketAddr>,
    L::Io: Send,
    S: Service<Request<Body>, Response = Response> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    // Shared: each connection's task keeps what its service closure
    // captures for as long as the connection lives.
    let shared = Arc::new(service);
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut until = std::pin::pin!(until);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut until => break,
        };
        let gateway = shared.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            // Boxed: the connection's task keeps its service's future
            // inline for as long as the connection lives (1,000 open
            // streams, 1,000 of them), and this one holds the whole
            // middleware stack's state until the response head is out.
            Box::pin(S::clone(&gateway).oneshot(request))
        });
        let connection = http.serve_connection(TokioIo::new(io), service);
        let connection = graceful.watch(connection);
        // Finished connections are taken out as new ones come.
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    // Connections end after their response in flight; one that cannot (its
    // client stopped reading a stream) is cut, so that shutdown ends and
    // what it held is settled.
    if tokio::time::timeout(LINGER, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = connections.len(),
            "connections still open after the shutdown deadline were cut"
        );
        connections.abort_all();
    }
    while connections.join_next().await.is_some() {}
}

/// How long connections may take to end once shutdown has begun to end them.
const LINGER: Duration = Duration::from_secs(2);
