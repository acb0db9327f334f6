//! Connections to Ollama, each driven by the request that is using it.
//!
//! A general-purpose client (reqwest, over hyper-util's pool) runs every
//! connection in a task of its own. A proxied request then crosses two
//! tasks, often two threads, and a streamed reply is handed over one HTTP
//! chunk at a time through a one-slot channel, so the relay ends up writing
//! one line per system call even when Ollama's lines arrived together.
//!
//! Here a [`Connection`] is a hyper HTTP/1 connection with no task of its
//! own: whoever holds it drives its I/O while waiting for it. The request's
//! own task sends, waits for the head and reads the body; [`ReplyBody`]
//! drains everything that has already arrived before handing it on, the
//! way nginx reads what is there and writes it in one go. Idle connections
//! wait in a [`Pool`] and are checked for a close by Ollama before reuse
//! (and every 15 s by the server, which closes the stale ones).
//! A reply dropped before its end drops its connection, which closes it:
//! that is how Ollama learns that a client went away, and stops generating.

use axum::body::Body;
use axum::http::{Request, Response};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::{http1, TrySendError};
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Idle connections kept at most; more are closed when they come back.
const MAX_IDLE: usize = 1024;

/// How long an idle connection is kept.
const IDLE_FOR: Duration = Duration::from_secs(90);

/// The most bytes [`ReplyBody`] gathers into one piece.
const MAX_GATHERED: usize = 64 * 1024;

/// How much of a reply one read takes off a connection's socket.
///
/// hyper's own default starts at 8 KiB and grows. Each connection keeps its
/// buffer for as long as it lives, and an 8 KiB buffer has a page of its
/// own resident even when it holds one line of a stream: with 1,000 open
/// streams that is 4 MiB. Ollama streams lines of a few hundred bytes, one
/// by one, and most replies fit in 2 KiB; two such buffers share a page,
/// which saves 2 MiB per 1,000 open streams, at the price of more reads for
/// a large reply (see docs/benchmark-history.md: ~2% more CPU for a 64-line stream
/// that arrives at once; 1 KiB saved another megabyte but cost ~10%).
const READ_SIZE: usize = 2048;

/// One HTTP/1 connection to Ollama.
pub struct Connection {
    sender: http1::SendRequest<Body>,
    /// `None` once it has finished: the connection is closed. Dropped at
    /// once, since a finished driver still holds a request queued after
    /// the close (sent too late to be noticed), which hyper hands back,
    /// unsent, only when the driver is dropped.
    ///
    /// Boxed: hyper's connection state is ~700 bytes, and a `Connection`
    /// moves on every request (out of the idle queue, through the
    /// exchange's future, into the reply's body), as does every future
    /// that holds one; a box moves as a pointer.
    driver: Option<Box<http1::Connection<TokioIo<TcpStream>, Body>>>,
}

impl Connection {
    /// Connects to `host:port` (a name is resolved on each connect).
    pub async fn open(host: &str, port: u16) -> std::io::Result<Connection> {
        let stream = TcpStream::connect((host, port)).await?;
        stream.set_nodelay(true)?;
        let (sender, driver) = http1::Builder::new()
            .read_buf_exact_size(Some(READ_SIZE))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        Ok(Connection {
            sender,
            driver: Some(Box::new(driver)),
        })
    }

    /// Does the connection's pending I/O, registering `cx` for more.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(driver) = self.driver.as_mut() {
            if Pin::new(&mut **driver).poll(cx).is_ready() {
                self.driver = None;
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.driver.is_none()
    }

    /// Whether a request could be sent right now, without waiting. Reads
    /// what Ollama sent an idle connection, and so notices a close.
    fn is_ready_now(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.drive(&mut cx);
        !self.is_closed() && matches!(self.sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }

    /// Whether a connection idle since `since` may take a request now.
    fn is_reusable(&mut self, since: Instant) -> bool {
        since.elapsed() < IDLE_FOR && self.is_ready_now()
    }

    /// Waits until a request can be sent.
    async fn ready(&mut self) -> hyper::Result<()> {
        poll_fn(|cx| {
            self.drive(cx);
            self.sender.poll_ready(cx)
        })
        .await
    }

    /// Sends `request`; resolves when the response head has arrived. The
    /// error holds the request if none of it was sent.
    async fn send(
        &mut self,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Body>>> {
        let mut response = std::pin::pin!(self.sender.try_send_request(request));
        poll_fn(|cx| {
            self.drive(cx);
            response.as_mut().poll(cx)
        })
        .await
    }
}

/// Idle connections to one address, most recently used first.
pub struct Pool {
    host: String,
    port: u16,
    idle: Mutex<VecDeque<(Connection, Instant)>>,
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{0}")]
    Connect(#[source] std::io::Error),
    #[error("{0}")]
    Http(#[source] hyper::Error),
}

impl Pool {
    pub fn new(host: String, port: u16) -> Arc<Pool> {
        Arc::new(Pool {
            host,
            port,
            idle: Mutex::new(VecDeque::new()),
        })
    }

    /// Sends `request` on an idle connection, or on a new one when there
    /// is none or the idle one turned out closed before the request left.
    /// The connect itself is bounded by `connect_timeout`.
    pub async fn exchange(
        self: &Arc<Self>,
        request: Request<Body>,
        connect_timeout: Duration,
    ) -> Result<Response<ReplyBody>, ExchangeError> {
        let mut request = request;
        if let Some(mut connection) = self.checkout() {
            match connection.send(request).await {
                Ok(response) => return Ok(self.reply(response, connection)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(ExchangeError::Http(e.into_error())),
                },
            }
        }
        let opening = Connection::open(&self.host, self.port);
        let mut connection = match tokio::time::timeout(connect_timeout, opening).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => return Err(ExchangeError::Connect(e)),
            Err(_) => {
                return Err(ExchangeError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {connect_timeout:?}"),
                )))
            }
        };
        connection.ready().await.map_err(ExchangeError::Http)?;
        match connection.send(request).await {
            Ok(response) => Ok(self.reply(response, connection)),
            Err(e) => Err(ExchangeError::Http(e.into_error())),
        }
    }

    fn reply(
        self: &Arc<Self>,
        response: Response<Incoming>,
        connection: Connection,
    ) -> Response<ReplyBody> {
        response.map(|incoming| ReplyBody {
            incoming,
            connection: Some(connection),
            pool: Arc::clone(self),
            error: None,
            ended: false,
        })
    }

    /// The host connections go to (an IPv6 address without brackets).
    #[cfg(test)]
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The most recently used idle connection that can take a request.
    fn checkout(&self) -> Option<Connection> {
        loop {
            let (mut connection, since) = self.idle_connections().pop_back()?;
            if connection.is_reusable(since) {
                return Some(connection);
            }
            // Dropped here, outside the lock: closing is a system call.
        }
    }

    /// Keeps a connection whose exchange is complete for the next request.
    fn checkin(&self, mut connection: Connection) {
        if !connection.is_ready_now() {
            return;
        }
        let mut idle = self.idle_connections();
        if idle.len() < MAX_IDLE {
            idle.push_back((connection, Instant::now()));
        }
        // One not kept is closed here, once the lock is released.
    }

    /// Closes the idle connections that Ollama closed or that waited
    /// longer than [`IDLE_FOR`]; checkout looks only at the end of the
    /// queue, so without traffic nothing else would.
    pub fn close_stale(&self) {
        let mut idle = self.idle_connections();
        let before = std::mem::take(&mut *idle);
        let mut stale = Vec::new();
        for (mut connection, since) in before {
            if connection.is_reusable(since) {
                idle.push_back((connection, since));
            } else {
                stale.push(connection);
            }
        }
        drop(idle);
        // `stale` is closed here, outside the lock.
    }

    /// The idle connections, locked. Nothing panics while holding them,
    /// and the deque is consistent at every step anyway.
    fn idle_connections(&self) -> MutexGuard<'_, VecDeque<(Connection, Instant)>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Idle connections kept now.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle_connections().len()
    }
}

/// The body of a reply from Ollama, read by the task that consumes it.
///
/// Each piece it yields is everything that had arrived when it was asked
/// (up to [`MAX_GATHERED`] bytes), never less than one chunk and never
/// waiting for more. At the end, the connection goes back to the pool.
pub struct ReplyBody {
    incoming: Incoming,
    /// Until the end of the body.
    connection: Option<Connection>,
    pool: Arc<Pool>,
    /// An error that followed data already gathered: reported next time.
    error: Option<hyper::Error>,
    ended: bool,
}

impl Stream for ReplyBody {
    type Item = Result<Bytes, hyper::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(e) = this.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let mut gathered = Gathered::None;
        while gathered.len() < MAX_GATHERED {
            // The driver moves what has arrived into the body, one chunk
            // each time the body has been emptied.
            if let Some(connection) = this.connection.as_mut() {
                connection.drive(cx);
            }
            match Pin::new(&mut this.incoming).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        gathered.push(data);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.ended = true;
                    this.connection = None;
                    if gathered.is_empty() {
                        return Poll::Ready(Some(Err(e)));
                    }
                    this.error = Some(e);
                    break;
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    if let Some(connection) = this.connection.take() {
                        this.pool.checkin(connection);
                    }
                    if gathered.is_empty() {
                        return Poll::Ready(None);
                    }
                    break;
                }
                Poll::Pending if gathered.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        Poll::Ready(Some(Ok(gathered.into_bytes())))
    }
}

/// Pieces of a body gathered for one hand-over: the first one as it came,
/// copied together only when a second one follows.
enum Gathered {
    None,
    One(Bytes),
    Many(BytesMut),
}

impl Gathered {
    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        *self = match std::mem::replace(self, Gathered::None) {
            Gathered::None => Gathered::One(data),
            Gathered::One(first) => {
                let mut many = BytesMut::with_capacity(first.len() + data.len() * 4);
                many.extend_from_slice(&first);
                many.extend_from_slice(&data);
                Gathered::Many(many)
            }
            Gathered::Many(mut many) => {
                many.extend_from_slice(&data);
                Gathered::Many(many)
            }
        };
    }

    fn len(&self) -> usize {
        match self {
            Gathered::None => 0,
            Gathered::One(one) => one.len(),
            Gathered::Many(many) => many.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Gathered::None => Bytes::new(),
            Gathered::One(one) => one,
            Gathered::Many(many) => many.freeze(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Uri;
    use futures_util::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Reads one request head (the requests here have no body); `false`
    /// when the client closed the connection instead.
    async fn read_head(socket: &mut tokio::net::TcpStream) -> bool {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match socket.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    }

    /// A chunked reply whose chunks are `lines`, written in one go.
    fn chunked_reply(lines: &[&str]) -> Vec<u8> {
        let mut reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for line in lines {
            reply.extend(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes());
        }
        reply.extend(b"0\r\n\r\n");
        reply
    }

    /// A server that answers every request on a connection with `reply`,
    /// closing each connection after `per_connection` requests; counts
    /// the connections it accepted.
    async fn server(reply: Vec<u8>, per_connection: usize) -> (Arc<Pool>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let reply = reply.clone();
                tokio::spawn(async move {
                    for _ in 0..per_connection {
                        if !read_head(&mut socket).await {
                            return;
                        }
                        socket.write_all(&reply).await.unwrap();
                    }
                });
            }
        });
        (Pool::new("127.0.0.1".into(), port), accepted)
    }

    fn get() -> Request<Body> {
        let mut request = Request::new(Body::empty());
        *request.uri_mut() = Uri::from_static("/api/chat");
        request
            .headers_mut()
            .insert(axum::http::header::HOST, "127.0.0.1".parse().unwrap());
        request
    }

    async fn exchange(pool: &Arc<Pool>) -> ReplyBody {
        let response = pool
            .exchange(get(), Duration::from_secs(5))
            .await
            .expect("exchange");
        assert_eq!(response.status(), 200);
        response.into_body()
    }

    #[tokio::test]
    async fn lines_that_arrived_together_are_handed_on_together() {
        let lines = ["{\"n\":1}\n", "{\"n\":2}\n", "{\"n\":3,\"done\":true}\n"];
        let (pool, _) = server(chunked_reply(&lines), 1).await;
        let mut body = exchange(&pool).await;
        let mut pieces = Vec::new();
        while let Some(piece) = body.next().await {
            pieces.push(piece.expect("piece"));
        }
        assert_eq!(pieces, vec![Bytes::from(lines.concat())]);
    }

    #[tokio::test]
    async fn a_reply_many_reads_long_arrives_whole() {
        // Lines longer than one read, and a reply of many reads, chunked
        // and with a content-length.
        let long: Vec<String> = (0..40)
            .map(|n| {
                format!(
                    "{{\"n\":{n},\"text\":\"{}\"}}\n",
                    "x".repeat(READ_SIZE * 3 / 2 + n)
                )
            })
            .collect();
        let lines: Vec<&str> = long.iter().map(String::as_str).collect();
        let all = lines.concat();
        let sized = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{all}",
            all.len()
        );
        for reply in [chunked_reply(&lines), sized.into_bytes()] {
            let (pool, _) = server(reply, 1).await;
            let mut body = exchange(&pool).await;
            let mut received = Vec::new();
            while let Some(piece) = body.next().await {
                received.extend_from_slice(&piece.expect("piece"));
            }
            assert_eq!(received, all.as_bytes());
        }
    }

    #[tokio::test]
    async fn a_finished_exchange_leaves_its_connection_for_the_next() {
        let (pool, accepted) = server(chunked_reply(&["{}\n"]), 10).await;
        for _ in 0..3 {
            let mut body = exchange(&pool).await;
            while body.next().await.is_some() {}
            assert_eq!(pool.idle_count(), 1);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn idle_connections_that_the_server_closed_are_swept() {
        let (pool, close_tx) = after_one_exchange().await;
        pool.close_stale();
        assert_eq!(pool.idle_count(), 1, "a live idle connection is kept");
        close_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        pool.close_stale();
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_connection_closed_by_the_server_while_idle_is_replaced() {
        let (pool, accepted) = server(chunked_reply(&["{}\n"]), 1).await;
        for round in 1..=3 {
            let mut body = exchange(&pool).await;
            while body.next().await.is_some() {}
            // Let the server's close arrive.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(accepted.load(Ordering::SeqCst), round);
        }
    }

    #[tokio::test]
    async fn a_reply_dropped_before_its_end_closes_its_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            assert!(read_head(&mut socket).await);
            let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{}\n\r\n";
            socket.write_all(head).await.unwrap();
            // Nothing more is sent: the next read sees the client close.
            let mut rest = [0u8; 16];
            let _ = closed_tx.send(socket.read(&mut rest).await.unwrap_or(0));
        });
        let pool = Pool::new("127.0.0.1".into(), port);
        let mut body = exchange(&pool).await;
        assert_eq!(body.next().await.unwrap().unwrap(), Bytes::from("{}\n"));
        drop(body);
        let read = tokio::time::timeout(Duration::from_secs(5), closed_rx)
            .await
            .expect("the server saw the close")
            .unwrap();
        assert_eq!(read, 0);
        assert_eq!(pool.idle_count(), 0);
    }

    /// A server that answers one request with `reply`, then waits for
    /// `close` (if given) before closing the connection.
    async fn one_reply_server(
        reply: &'static [u8],
        close: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> Arc<Pool> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            assert!(read_head(&mut socket).await);
            socket.write_all(reply).await.unwrap();
            match close {
                Some(close) => {
                    let _ = close.await;
                    drop(socket);
                }
                // Held open: only tollgate may close it.
                None => tokio::time::sleep(Duration::from_secs(60)).await,
            }
        });
        Pool::new("127.0.0.1".into(), port)
    }

    /// A pool holding one idle connection after a finished exchange, and
    /// the trigger that makes the server close that connection.
    async fn after_one_exchange() -> (Arc<Pool>, tokio::sync::oneshot::Sender<()>) {
        let (close_tx, close_rx) = tokio::sync::oneshot::channel();
        let pool = one_reply_server(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            Some(close_rx),
        )
        .await;
        let mut body = exchange(&pool).await;
        while body.next().await.is_some() {}
        (pool, close_tx)
    }

    #[tokio::test]
    async fn a_request_sent_as_the_server_closes_comes_back_unsent() {
        // Ollama's close arrives after the connection was found ready and
        // before the request left: the request must come back (to be sent
        // on a new connection), not wait for a reply that never comes.
        let (pool, close_tx) = after_one_exchange().await;
        let mut connection = pool.checkout().expect("the connection was kept");
        close_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sent = tokio::time::timeout(Duration::from_secs(5), connection.send(get()))
            .await
            .expect("the send resolves");
        match sent {
            Err(mut e) => assert!(e.take_message().is_some(), "{}", e.into_error()),
            Ok(_) => panic!("a reply from a closed connection"),
        }
    }

    #[tokio::test]
    async fn a_connection_the_server_will_close_is_not_kept() {
        let pool = one_reply_server(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            None,
        )
        .await;
        let mut body = exchange(&pool).await;
        while body.next().await.is_some() {}
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_reply_that_comes_before_the_upload_ends_does_not_keep_the_connection() {
        let pool = one_reply_server(
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\nno",
            None,
        )
        .await;
        // A request body that never ends.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        tx.send(Ok(Bytes::from_static(b"partial"))).await.unwrap();
        let mut request = get();
        *request.method_mut() = axum::http::Method::POST;
        *request.body_mut() =
            Body::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        let response = pool
            .exchange(request, Duration::from_secs(5))
            .await
            .expect("exchange");
        assert_eq!(response.status(), 400);
        let mut body = response.into_body();
        while body.next().await.is_some() {}
        assert_eq!(pool.idle_count(), 0);
        drop(tx);
    }

    #[tokio::test]
    async fn no_server_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let pool = Pool::new("127.0.0.1".into(), port);
        let result = pool.exchange(get(), Duration::from_secs(5)).await;
        assert!(matches!(result, Err(ExchangeError::Connect(_))));
    }
}
