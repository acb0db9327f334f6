//! Test harness: a fake Ollama and tollgate's real router on real sockets,
//! spawned in-process the way "Zero to Production" spawns its app.

pub mod fake_ollama;

use fake_ollama::FakeOllama;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate::app::{App, Hooks};
use tollgate::config::Config;
use tollgate::store::SharedStore;

/// The key every test app grants unless told otherwise, with 10 credits.
pub const KEY: &str = "abc";
pub const ADMIN: &str = "admin-secret";

/// A running tollgate in front of a running fake Ollama.
pub struct TestApp {
    pub addr: SocketAddr,
    pub url: String,
    pub fake: FakeOllama,
    pub store: SharedStore,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    pub server: Option<JoinHandle<std::io::Result<()>>>,
}

/// How to build a [`TestApp`].
pub struct Spawn {
    vars: HashMap<String, String>,
    hooks: Hooks,
    store: Option<SharedStore>,
    fake: Option<FakeOllama>,
}

pub fn spawn() -> Spawn {
    let mut vars = HashMap::new();
    vars.insert("API_KEY".to_string(), KEY.to_string());
    vars.insert("ADMIN_KEY".to_string(), ADMIN.to_string());
    vars.insert("DATABASE_URL".to_string(), "memory".to_string());
    Spawn {
        vars,
        hooks: Hooks::default(),
        store: None,
        fake: None,
    }
}

impl Spawn {
    /// Sets a configuration variable (as if from the environment).
    pub fn var(mut self, name: &str, value: &str) -> Self {
        self.vars.insert(name.to_string(), value.to_string());
        self
    }

    /// Removes a configuration variable.
    pub fn unset(mut self, name: &str) -> Self {
        self.vars.remove(name);
        self
    }

    pub fn hooks(mut self, hooks: Hooks) -> Self {
        self.hooks = hooks;
        self
    }

    /// Uses this store instead of opening `DATABASE_URL`.
    pub fn store(mut self, store: SharedStore) -> Self {
        self.store = Some(store);
        self
    }

    /// Puts this fake Ollama behind the gateway.
    pub fn fake(mut self, fake: FakeOllama) -> Self {
        self.fake = Some(fake);
        self
    }

    pub async fn start(mut self) -> TestApp {
        let fake = match self.fake.take() {
            Some(fake) => fake,
            None => FakeOllama::start().await,
        };
        self.vars
            .entry("OLLAMA_URL".to_string())
            .or_insert_with(|| fake.url());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        self.vars
            .insert("LISTEN_ADDR".to_string(), addr.to_string());
        let config = Config::from_map(&self.vars).expect("config");
        let app = match self.store {
            Some(store) => App::with_store(config, store, self.hooks).await,
            None => App::build(config, self.hooks).await,
        }
        .expect("app");
        let store = app.state().store.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(app.serve(listener, async {
            let _ = rx.await;
        }));
        TestApp {
            addr,
            url: format!("http://{addr}"),
            fake,
            store,
            client: reqwest::Client::new(),
            shutdown: Some(tx),
            server: Some(server),
        }
    }
}

impl TestApp {
    pub async fn new() -> TestApp {
        spawn().start().await
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(format!("{}{}", self.url, path))
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{}", self.url, path))
    }

    pub fn head(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.head(format!("{}{}", self.url, path))
    }

    /// The requests Ollama received from clients through tollgate (not
    /// tollgate's own health checks and model-list refreshes).
    pub fn forwarded(&self) -> Vec<fake_ollama::Recorded> {
        self.fake
            .requests()
            .into_iter()
            .filter(|r| r.header("user-agent") != Some(tollgate::proxy::upstream::OWN_USER_AGENT))
            .collect()
    }

    /// A POST with the standard key.
    pub fn keyed(&self, path: &str) -> reqwest::RequestBuilder {
        self.post(path).header("x-api-key", KEY)
    }

    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{}", self.url, path))
            .header("x-api-key", ADMIN)
    }

    /// The balance of the key with this secret.
    pub async fn balance_of(&self, secret: &str) -> tollgate::credits::Credits {
        self.key_of(secret).await.balance
    }

    pub async fn key_of(&self, secret: &str) -> tollgate::store::KeyRecord {
        self.store
            .key_by_hash(&tollgate::auth::keys::hash(secret))
            .await
            .expect("store")
            .expect("key exists")
    }

    /// Waits until every settlement has landed: the ledger of `secret` has
    /// `rows` rows.
    pub async fn wait_ledger(&self, secret: &str, rows: usize) -> Vec<tollgate::store::UsageEntry> {
        let id = self.key_of(secret).await.id;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let entries = self
                .store
                .usage(
                    Some(id),
                    tollgate::store::PageRequest {
                        limit: 10_000,
                        before: None,
                    },
                )
                .await
                .expect("usage");
            if entries.len() >= rows || tokio::time::Instant::now() > deadline {
                return entries;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Triggers graceful shutdown and waits for the server to end.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.server.take() {
            Some(server) => server.await.expect("server task"),
            None => Ok(()),
        }
    }

    /// Sends the shutdown signal without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The `/api/blobs/:digest` path of `blob`, under its real SHA-256.
pub fn blob_path(blob: &[u8]) -> String {
    use sha2::Digest;
    format!(
        "/api/blobs/sha256:{}",
        hex::encode(sha2::Sha256::digest(blob))
    )
}

/// A hook that panics when a request reaches it.
pub fn panicking_hook() -> Hooks {
    Hooks {
        before_forward: Some(Arc::new(|path: &str| {
            panic!("test hook: panic while handling {path}")
        })),
    }
}

/// Asserts a JSON error body in Ollama's shape and returns its message.
pub async fn ollama_error(response: reqwest::Response, status: u16) -> String {
    assert_eq!(response.status().as_u16(), status);
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("not Ollama's error shape: {body}"))
        .to_string()
}

/// The sum of the samples of `name` in a Prometheus text whose labels
/// include `labels` (0 when there is none).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends a request and reads its body, for tests that only need the body.
pub trait Fetch {
    fn fetch_json<T: serde::de::DeserializeOwned>(self) -> impl std::future::Future<Output = T>;
    fn fetch_text(self) -> impl std::future::Future<Output = String>;
}

impl Fetch for reqwest::RequestBuilder {
    async fn fetch_json<T: serde::de::DeserializeOwned>(self) -> T {
        self.send()
            .await
            .expect("send")
            .json()
            .await
            .expect("JSON body")
    }

    async fn fetch_text(self) -> String {
        self.send().await.expect("send").text().await.expect("body")
    }
}

/// An upstream that answers every request with `body`, as `content_type`:
/// for bytes Ollama itself never sends, which the fake cannot say.
pub async fn raw_upstream(content_type: &'static str, body: String) -> String {
    raw_upstream_ending(content_type, body, true).await
}

/// As [`raw_upstream`]; with `close` false, the reply stays open after
/// `body`, sending nothing more.
pub async fn raw_upstream_ending(content_type: &'static str, body: String, close: bool) -> String {
    use futures_util::StreamExt;
    upstream_with(content_type, move || {
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(body.clone())]);
        let rest = if close {
            futures_util::stream::empty().boxed()
        } else {
            futures_util::stream::pending().boxed()
        };
        axum::body::Body::from_stream(first.chain(rest))
    })
    .await
}

/// An upstream that answers every request with a body made by `body`, as
/// `content_type`.
pub async fn upstream_with(
    content_type: &'static str,
    body: impl Fn() -> axum::body::Body + Clone + Send + Sync + 'static,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || {
        let body = body();
        async move { ([(axum::http::header::CONTENT_TYPE, content_type)], body) }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}
