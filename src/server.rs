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
//! Shutdown: once `until` resolves, no connection is accepted any more;
//! every connection finishes the request it is serving (its response body
//! included) and then closes, idle ones at once; [`serve`] returns when
//! the last one has closed.

use axum::extract::ConnectInfo;
use axum::serve::Listener;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::net::SocketAddr;
use tower::Service;

/// Serves `router` on the connections `listener` accepts until `until`
/// resolves, then lets the open connections finish (see the module doc).
pub async fn serve<L>(mut listener: L, router: Router, until: impl Future<Output = ()>)
where
    L: Listener<Addr = SocketAddr>,
    L::Io: Send,
{
    let graceful = GracefulShutdown::new();
    let mut until = std::pin::pin!(until);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut until => break,
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().call(request)
        });
        let connection = http1::Builder::new().serve_connection(TokioIo::new(io), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
