//! The application: shared state, start-up, serving and graceful shutdown.
//!
//! [`App::build`] opens the store, brings the configured keys in, and
//! checks the configuration for mistakes that would make the gate useless;
//! [`App::serve`] answers requests on a listener until a shutdown signal,
//! then drains (SPEC §2 `SHUTDOWN_GRACE_SECS`).

use crate::auth::keys;
use crate::auth::throttle::AuthFailures;
use crate::config::Config;
use crate::credits::Credits;
use crate::error::ApiError;
use crate::limits::Limits;
use crate::policy::Caps;
use crate::proxy::Upstream;
use crate::store::{self, Grant, NewKey, Role, SharedStore, StoreError};
use crate::tally::{Counted, Tally};
use crate::telemetry::{request_id_of, RequestLog};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use axum::serve::{Listener, ListenerExt};
use axum::Router;
use futures_util::FutureExt;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::util::Either;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};
use tracing::Instrument;

/// Test-only hooks into request handling; empty in production.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called with the path after a request's cost was reserved, just
    /// before it is forwarded (tests make it panic).
    #[allow(clippy::type_complexity)]
    pub before_forward: Option<Arc<dyn Fn(&str) + Send + Sync>>,
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub config: Config,
    pub store: SharedStore,
    pub upstream: Upstream,
    pub auth_failures: AuthFailures,
    pub limits: Limits,
    pub hooks: Hooks,
    /// Turns true when in-flight streams must be ended (shutdown deadline).
    pub stop_streams: watch::Receiver<bool>,
    draining: AtomicBool,
    /// Requests whose response is not done yet.
    in_flight: Tally,
    /// Settlements of dropped requests still running.
    pub unsettled: Tally,
}

impl Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl Shared {
    pub fn caps(&self) -> Caps {
        Caps {
            max_tokens: self.config.max_tokens_per_request,
            max_num_ctx: self.config.max_num_ctx,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("OLLAMA_URL ({0}) is tollgate's own address: requests would loop")]
    SelfLoop(String),
    #[error("could not open the store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Upstream(#[from] crate::proxy::UpstreamError),
}

/// A ready-to-serve gateway.
pub struct App {
    state: AppState,
    stop_tx: watch::Sender<bool>,
    /// A key created on first start, to be shown once.
    pub first_key: Option<String>,
}

impl App {
    /// Opens the store and prepares the gateway.
    pub async fn build(config: Config, hooks: Hooks) -> Result<App, StartError> {
        let store = store::open(&config.database_url).await?;
        App::with_store(config, store, hooks).await
    }

    /// Prepares the gateway on an already opened store.
    pub async fn with_store(
        config: Config,
        store: SharedStore,
        hooks: Hooks,
    ) -> Result<App, StartError> {
        if config.ollama_is_self() {
            return Err(StartError::SelfLoop(config.ollama_url.clone()));
        }
        // Metrics are recorded from the first request on.
        crate::telemetry::metrics_handle();
        store.release_stale_reservations().await?;
        let first_key = sync_keys(&config, store.as_ref()).await?;
        let upstream = Upstream::new(&config.ollama_url, config.timeouts)?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let state = AppState(Arc::new(Shared {
            auth_failures: AuthFailures::new(config.auth_failures_per_minute),
            limits: Limits::new(config.rate_limit_rpm, config.max_concurrent_per_key),
            config,
            store,
            upstream,
            hooks,
            stop_streams: stop_rx,
            draining: AtomicBool::new(false),
            in_flight: Tally::default(),
            unsettled: Tally::default(),
        }));
        Ok(App {
            state,
            stop_tx,
            first_key,
        })
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The router with its middleware around it, outermost first: CORS
    /// (when configured), so that errors (401, 402, 429, 503) carry the
    /// CORS headers too and a page can read them; then [`Observe`], which
    /// also answers 500 when a handler panics. The layers wrap the router
    /// as a whole, once: `Router::layer` would wrap each route instead,
    /// boxing every request's future once more per layer.
    pub fn service(&self) -> Gateway {
        let observed = Observe {
            inner: crate::routes::router(self.state.clone()),
            state: self.state.clone(),
        };
        // CORS answers preflights itself, before [`Observe`] gives the
        // request an id: [`RequestId`] gives it one first.
        let cors = cors(&self.state.config.cors_origins)
            .map(|cors| tower::layer::layer_fn(move |inner| RequestId(cors.layer(inner))));
        ServiceBuilder::new().option_layer(cors).service(observed)
    }

    /// Serves until `shutdown` resolves, then drains: new requests get 503,
    /// in-flight ones may finish within the grace period, what remains is
    /// ended with an error line and settled.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        self.serve_on(listener, shutdown).await
    }

    /// Serves HTTPS on `listener` with `tls` (see [`crate::tls`]).
    pub async fn serve_tls(
        self,
        listener: TcpListener,
        tls: tokio_rustls::TlsAcceptor,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let listener = crate::tls::TlsListener::new(listener, tls)?.tap_io(|_| {});
        self.serve_on(listener, shutdown).await
    }

    async fn serve_on<L>(
        self,
        listener: L,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()>
    where
        L: Listener<Addr = SocketAddr>,
        L::Io: Send,
    {
        let service = self.service();
        let state = self.state.clone();
        let upstream = state.upstream.clone();
        let refresher = tokio::spawn(async move {
            // The models Ollama lists bound the metrics' model label.
            loop {
                if let Some(models) = upstream.list_models().await {
                    crate::telemetry::set_known_models(models);
                }
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        });
        let upstream = state.upstream.clone();
        let sweeper = tokio::spawn(async move {
            // Idle connections that Ollama closed, or that waited too
            // long, are closed on tollgate's side too, traffic or not.
            loop {
                tokio::time::sleep(Duration::from_secs(15)).await;
                upstream.close_stale_connections();
            }
        });
        let stop_tx = self.stop_tx;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            shutdown.await;
            let grace = state.config.shutdown_grace;
            tracing::info!(
                grace_secs = grace.as_secs(),
                "shutting down: draining in-flight requests"
            );
            state.draining.store(true, Ordering::SeqCst);
            if !state.in_flight.wait_idle(grace, POLL).await {
                tracing::warn!(
                    remaining = state.in_flight.count(),
                    "grace period over: ending the remaining streams"
                );
                let _ = stop_tx.send(true);
                state
                    .in_flight
                    .wait_idle(Duration::from_secs(5), POLL)
                    .await;
            }
            let _ = done_tx.send(());
        });
        let header_timeout = self.state.config.client_header_timeout;
        crate::server::serve(listener, service, header_timeout, async {
            let _ = done_rx.await;
        })
        .await;
        // The server has ended every connection, those it had to cut too
        // (a stream whose client stopped reading): let the settlements of
        // what they dropped land, then close the store.
        if !self
            .state
            .unsettled
            .wait_idle(Duration::from_secs(10), POLL)
            .await
        {
            tracing::error!("settlements of cut requests still running at exit");
        }
        self.state.store.close().await;
        refresher.abort();
        sweeper.abort();
        Ok(())
    }
}

/// How often shutdown looks whether what it waits for is done.
const POLL: Duration = Duration::from_millis(20);

/// The gateway as served: [`App::service`].
pub type Gateway = Either<RequestId<Cors<Observed>>, Observed>;

/// Gives a request its id (the client's when sane, else a new one) in its
/// `x-request-id` header, where [`Observe`] finds it, and puts it on a
/// response that lacks it: one that a layer between the two answered
/// (CORS preflights).
#[derive(Clone)]
pub struct RequestId<S>(S);

impl<S> Service<Request> for RequestId<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let id = HeaderValue::from_str(&request_id_of(request.headers())).ok();
        if let Some(id) = &id {
            request.headers_mut().insert("x-request-id", id.clone());
        }
        let response = self.0.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            if let Some(id) = id {
                response.headers_mut().entry("x-request-id").or_insert(id);
            }
            Ok(response)
        })
    }
}

/// The router inside [`Observe`].
pub type Observed = Observe<Router>;

/// Around every request: gives it an id and a log record, counts it in
/// flight until its response body is done, answers 503 while draining,
/// and answers 500 for a request whose handling panicked.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    state: AppState,
}

impl<S> Service<Request> for Observe<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    /// Always ready: the clone that serves a request is made ready in
    /// [`observe`] (`oneshot`).
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        Box::pin(observe(self.state.clone(), request, self.inner.clone()))
    }
}

async fn observe<S>(state: AppState, mut request: Request, inner: S) -> Result<Response, Infallible>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    let request_id = request_id_of(request.headers());
    let log = Arc::new(RequestLog::new(
        request_id.clone(),
        request.method().clone(),
        route_label(request.uri().path()),
    ));
    // Errors answered here are outside the router's `/v1` layer.
    let openai = request.uri().path().starts_with("/v1/");
    let mut response = if state.draining.load(Ordering::SeqCst) {
        let response = own_error(
            openai,
            ApiError::Unavailable("tollgate is shutting down".into()),
        );
        log.set_status(response.status().as_u16());
        response
    } else {
        let guard = state.in_flight.enter();
        request.extensions_mut().insert(log.clone());
        let span = tracing::info_span!("request", request_id = %request_id);
        // `oneshot` calls the router when first polled, so a panic in the
        // call and one in the handler's future are both caught here.
        let handled = AssertUnwindSafe(inner.oneshot(request))
            .catch_unwind()
            .instrument(span);
        // Pinned here rather than in `select!`, so that it is dropped at the
        // end of this block, after the log has the status the client gets:
        // a settlement dropped with it records that status (a panic's 500,
        // the shutdown's 503).
        let mut handled = std::pin::pin!(handled);
        // At the shutdown deadline, a request that Ollama has not answered
        // yet (its body still arriving, or waiting for Ollama's head) is
        // ended: the handler's future is dropped, which drops its call to
        // Ollama and settles what it reserved (nothing reached the client:
        // refunded). One that Ollama answered is left to finish: its reply
        // is being read or settled (a stream ends itself at the deadline).
        let mut stop = state.stop_streams.clone();
        let answered = log.clone();
        let cut = async move {
            let stopped = stop.wait_for(|stop| *stop).await.is_ok();
            if !stopped || answered.answered_by_ollama() {
                std::future::pending::<()>().await;
            }
        };
        let outcome = tokio::select! {
            biased;
            handled = &mut handled => Some(handled),
            () = cut => None,
        };
        let response = match outcome {
            Some(Ok(Ok(response))) => response,
            Some(Err(_panic)) => own_error(openai, ApiError::Internal("the request failed".into())),
            None => own_error(
                openai,
                ApiError::Unavailable("tollgate is shutting down; the request was cut".into()),
            ),
        };
        log.set_status(response.status().as_u16());
        let (parts, body) = response.into_parts();
        let body = Body::new(TrackedBody {
            body,
            _guard: guard,
            _log: log.clone(),
        });
        Response::from_parts(parts, body)
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    Ok(response)
}

/// An error that [`observe`] answers itself, in OpenAI's shape on `/v1`.
fn own_error(openai: bool, error: ApiError) -> Response {
    let response = error.into_response();
    if openai {
        crate::error::in_openai_shape(response)
    } else {
        response
    }
}

/// A bounded label for a path: metrics and logs never carry arbitrary
/// client-chosen paths.
fn route_label(path: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "/",
        "/generate",
        "/chat",
        "/me",
        "/usage",
        "/health",
        "/metrics",
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/api/tags",
        "/api/show",
        "/api/ps",
        "/api/version",
        "/api/pull",
        "/api/push",
        "/api/create",
        "/api/copy",
        "/api/delete",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
    ];
    if let Some(known) = KNOWN.iter().find(|k| **k == path) {
        return known;
    }
    if path.starts_with("/api/blobs/") {
        "/api/blobs"
    } else if path.starts_with("/v1/models/") {
        "/v1/models/{model}"
    } else if path.starts_with("/admin/") {
        "/admin"
    } else if path.starts_with("/api/") || path.starts_with("/v1/") {
        "/api/other"
    } else {
        "other"
    }
}

/// The CORS policy for `CORS_ORIGINS`: allowed request headers are named
/// (a wildcard would not cover `Authorization`), and the credit and
/// request-id headers are readable by the page.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([
                Method::GET,
                Method::HEAD,
                Method::POST,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                HeaderName::from_static("x-api-key"),
                axum::http::header::AUTHORIZATION,
                axum::http::header::CONTENT_TYPE,
                HeaderName::from_static("x-request-id"),
            ])
            // Browsers may reuse a preflight for ten minutes.
            .max_age(Duration::from_secs(600))
            .expose_headers([
                HeaderName::from_static("x-credits-remaining"),
                HeaderName::from_static("x-request-id"),
                axum::http::header::RETRY_AFTER,
            ]),
    )
}

/// A response body that counts its request in flight until it is dropped.
struct TrackedBody {
    body: Body,
    _guard: Counted,
    _log: Arc<RequestLog>,
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Brings configured keys into the store (grants, not resets) and, on a
/// first start with no key anywhere, creates one to show the operator.
async fn sync_keys(
    config: &Config,
    store: &dyn store::Store,
) -> Result<Option<String>, StoreError> {
    let mut grants: Vec<Grant> = config
        .grants
        .iter()
        .enumerate()
        .map(|(i, (key, credits))| Grant {
            hash: keys::hash(key),
            name: format!("configured key {}", i + 1),
            role: Role::User,
            credits: *credits,
        })
        .collect();
    if let Some(admin) = &config.admin_key {
        grants.push(Grant {
            hash: keys::hash(admin),
            name: "ADMIN_KEY".into(),
            role: Role::Admin,
            credits: Credits::ZERO,
        });
    }
    let report = store.sync_grants(&grants).await?;
    for id in &report.created {
        tracing::info!(key_id = id, "granted a configured key");
    }
    for id in &report.reenabled {
        tracing::info!(key_id = id, "re-enabled a configured key that came back");
    }
    for id in &report.role_changed {
        tracing::warn!(
            key_id = id,
            "a configured key now has the role of the variable that names it"
        );
    }
    for id in &report.disabled {
        tracing::warn!(
            key_id = id,
            "disabled a granted key that is no longer configured"
        );
    }
    if !grants.is_empty() || !store.keys().await?.is_empty() {
        return Ok(None);
    }
    let key = keys::generate();
    store
        .create_key(NewKey {
            hash: keys::hash(&key),
            name: "first key".into(),
            role: Role::User,
            credits: config.default_credits,
            models: None,
            rate_limit_rpm: None,
            max_concurrent: None,
            expires_at: None,
            granted: false,
            actor: "first start".into(),
        })
        .await?;
    Ok(Some(key))
}
