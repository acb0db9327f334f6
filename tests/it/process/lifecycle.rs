//! The binary's life: first start, graceful restarts, grants that are
//! removed and come back, configuration errors, an absent Ollama (SPEC §1,
//! §2).

use super::{free_port, millis, sqlite_url, Launch, Ledger};
use crate::support::fake_ollama::{Behavior, FakeOllama};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

const ADMIN: &str = "process-admin-key";
const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// Every `tg_...` word in `text` (quotes stripped).
fn generated_keys(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || c == '\'' || c == '"')
        .filter(|w| w.starts_with("tg_"))
        .map(str::to_string)
        .collect()
}

/// SPEC §1: no key anywhere and an empty store → one key, printed once with
/// a curl line; the next start on the same store prints nothing.
#[tokio::test]
async fn first_start_prints_a_working_key_once() {
    let fake = FakeOllama::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("first.db");
    let launch = Launch::new(dir.path())
        .var("OLLAMA_URL", &fake.url())
        .var("DATABASE_URL", &sqlite_url(&db));

    let gw = launch.start().await;
    assert!(
        gw.wait_stdout("tg_", Duration::from_secs(10)).await,
        "no key printed on first start; stdout:\n{}",
        gw.stdout()
    );
    assert!(db.exists(), "the sqlite file was not created");
    let stdout = gw.stdout();
    let keys = generated_keys(&stdout);
    let key = keys[0].clone();
    assert!(key.len() >= 3 + 32, "a short generated key: {key}");
    assert!(
        keys.iter().all(|k| *k == key),
        "more than one key printed: {keys:?}"
    );
    let curl = stdout
        .lines()
        .find(|l| l.contains("curl"))
        .unwrap_or_else(|| panic!("no curl line in:\n{stdout}"));
    assert!(curl.contains(&key), "the curl line lacks the key: {curl}");
    assert!(
        curl.contains(&format!("http://{}/", gw.addr)),
        "the curl line does not name the listening address: {curl}"
    );

    assert_eq!(gw.generate(&key, "hello").await, 200);
    let (status, me) = gw.me(&key).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(millis(&me["credits"]), 9_000, "10 default credits, 1 spent");

    let out = gw.terminate(EXIT_WITHIN).await;
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", out.stderr);
    assert!(
        !out.stderr.contains(&key),
        "the key appeared in a log line:\n{}",
        out.stderr
    );

    // Second start on the same store: no new key, nothing printed, the old
    // key still works with its balance.
    let gw = launch.start().await;
    let (status, me) = gw.me(&key).await;
    assert_eq!(status, 200);
    assert_eq!(millis(&me["credits"]), 9_000);
    let out = gw.terminate(EXIT_WITHIN).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(
        generated_keys(&out.stdout).is_empty() && !out.stdout.contains("curl"),
        "a key was printed again:\n{}",
        out.stdout
    );
    let ledger = Ledger::read_sqlite(&db, &key).await;
    assert_eq!(ledger.balance, 9_000);
    ledger.assert_adds_up();
}

/// SPEC §2 grants: SIGTERM exits 0; a restart never refills; a granted key
/// no longer configured is disabled (logged) and comes back with its old
/// balance.
#[tokio::test]
async fn restart_keeps_balances_and_removed_grants_are_disabled() {
    let fake = FakeOllama::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("restart.db");
    let launch = Launch::new(dir.path())
        .var("OLLAMA_URL", &fake.url())
        .var("DATABASE_URL", &sqlite_url(&db))
        .var("API_KEYS", "alpha-key=10,beta-key=4")
        .var("ADMIN_KEY", ADMIN);

    let gw = launch.start().await;
    for _ in 0..3 {
        assert_eq!(gw.generate("alpha-key", "hi").await, 200);
    }
    assert_eq!(millis(&gw.me("alpha-key").await.1["credits"]), 7_000);
    let out = gw.terminate(EXIT_WITHIN).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "SIGTERM must end with exit code 0; stderr:\n{}",
        out.stderr
    );

    // Same configuration, same store: nothing refilled.
    let gw = launch.start().await;
    let (status, me) = gw.me("alpha-key").await;
    assert_eq!(status, 200);
    assert_eq!(millis(&me["credits"]), 7_000, "a restart refilled: {me}");
    assert_eq!(me["usage"]["requests"], 3);
    assert_eq!(millis(&gw.me("beta-key").await.1["credits"]), 4_000);
    assert_eq!(gw.generate("alpha-key", "hi").await, 200);
    assert_eq!(gw.terminate(EXIT_WITHIN).await.status.code(), Some(0));

    // alpha-key removed from the configuration: disabled, and logged.
    let gw = launch.clone().var("API_KEYS", "beta-key=4").start().await;
    assert_eq!(
        gw.me("alpha-key").await.0,
        401,
        "a removed grant still works"
    );
    assert_eq!(gw.generate("alpha-key", "hi").await, 401);
    assert_eq!(gw.me("beta-key").await.0, 200);
    let keys: Value = gw
        .get("/admin/keys")
        .header("x-api-key", ADMIN)
        .send()
        .await
        .expect("admin keys")
        .json()
        .await
        .expect("JSON");
    let alpha = keys
        .as_array()
        .expect("a list")
        .iter()
        .find(|k| k["credits"].as_f64() == Some(6.0))
        .unwrap_or_else(|| panic!("alpha-key (6 credits) not listed: {keys}"));
    assert_eq!(alpha["disabled"], true, "{alpha}");
    let out = gw.terminate(EXIT_WITHIN).await;
    assert!(
        out.stderr.contains("disabled a granted key"),
        "disabling was not logged:\n{}",
        out.stderr
    );
    assert!(!out.stderr.contains("alpha-key"), "a key in the log");

    // Back in the configuration, with a different amount: re-enabled with
    // its old balance (a grant is not a reset).
    let gw = launch
        .clone()
        .var("API_KEYS", "alpha-key=100,beta-key=4")
        .start()
        .await;
    let (status, me) = gw.me("alpha-key").await;
    assert_eq!(status, 200, "a returning grant was not re-enabled");
    assert_eq!(millis(&me["credits"]), 6_000, "{me}");
    let out = gw.terminate(EXIT_WITHIN).await;
    assert!(
        out.stderr.contains("re-enabled"),
        "re-enabling was not logged:\n{}",
        out.stderr
    );

    let ledger = Ledger::read_sqlite(&db, "alpha-key").await;
    assert_eq!(ledger.balance, 6_000);
    assert_eq!(ledger.adjustments.len(), 1, "one grant, nothing else");
    assert_eq!(ledger.usage.len(), 4);
    ledger.assert_adds_up();
}

/// SIGTERM with a stream in flight: new requests get 503, the stream
/// finishes and is charged, the process exits 0 (SPEC §2
/// `SHUTDOWN_GRACE_SECS`).
#[tokio::test]
async fn sigterm_lets_an_in_flight_stream_finish() {
    let fake = FakeOllama::start_with(Behavior {
        lockstep: true,
        chunks: 4,
        ..Behavior::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("drain.db");
    let launch = Launch::new(dir.path())
        .var("OLLAMA_URL", &fake.url())
        .var("DATABASE_URL", &sqlite_url(&db))
        .var("API_KEY", "drain-key");
    let mut gw = launch.start().await;

    let response = gw
        .post("/api/generate")
        .header("x-api-key", "drain-key")
        .json(&json!({"model": "mistral", "prompt": "hi", "stream": true}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("chunk");
    assert!(!first.is_empty());

    gw.sigterm();
    // Draining: new requests (health included) get 503.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let health = gw.get("/health").send().await.expect("health");
        if health.status() == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no 503 after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.generate("drain-key", "late").await, 503);

    fake.step_many(100);
    let mut text = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(
            &chunk.expect("stream ended cleanly"),
        ));
    }
    let last: Value = serde_json::from_str(text.lines().last().expect("lines")).expect("JSON");
    assert_eq!(last["done"], true, "stream cut by the shutdown: {text}");

    let out = gw.wait_exit(EXIT_WITHIN).await;
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", out.stderr);
    let ledger = Ledger::read_sqlite(&db, "drain-key").await;
    assert_eq!(ledger.balance, 9_000, "the drained stream was not charged");
    assert_eq!(ledger.usage.len(), 1, "the 503 must not be in the ledger");
    ledger.assert_adds_up();
}

/// SPEC §1: Ollama down at start → tollgate starts, logs one warning naming
/// the URL, answers 502 naming the URL, charges nothing.
#[tokio::test]
async fn ollama_unreachable_at_start() {
    let ollama = format!("http://127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    let launch = Launch::new(dir.path())
        .var("OLLAMA_URL", &ollama)
        .var("DATABASE_URL", "memory")
        .var("API_KEY", "lonely-key")
        .var("LOG_FORMAT", "json");
    let gw = launch.start().await;
    assert!(
        gw.wait_log("Ollama does not answer", Duration::from_secs(15))
            .await,
        "no warning about the absent Ollama:\n{}",
        gw.stderr()
    );

    let response = gw
        .post("/generate?prompt=hi")
        .header("x-api-key", "lonely-key")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.expect("JSON error");
    let message = body["error"].as_str().expect("Ollama's error shape");
    assert!(message.contains(&ollama), "502 without the URL: {message}");

    let response = gw
        .post("/api/chat")
        .header("x-api-key", "lonely-key")
        .json(&json!({"model": "mistral", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.expect("JSON error");
    assert!(body["error"].as_str().unwrap_or("").contains(&ollama));

    let health: Value = gw
        .get("/health")
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("JSON");
    assert_eq!(health["ollama"]["reachable"], false, "{health}");
    assert_eq!(millis(&gw.me("lonely-key").await.1["credits"]), 10_000);

    let out = gw.terminate(EXIT_WITHIN).await;
    assert_eq!(out.status.code(), Some(0));
    let warnings: Vec<Value> = out
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["level"] == "WARN")
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("Ollama does not answer"))
        })
        .collect();
    assert_eq!(warnings.len(), 1, "stderr:\n{}", out.stderr);
    assert!(
        warnings[0].to_string().contains(&ollama),
        "the warning does not name the URL: {}",
        warnings[0]
    );
}

/// SPEC §2: a value that cannot be parsed stops start-up with a message
/// naming the variable and the value; so does a self-loop.
#[tokio::test]
async fn bad_configuration_stops_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("CREDITS_PER_REQUEST", "abc"),
        ("CREDITS_PER_1K_PROMPT_TOKENS", "0.0001"),
        ("LISTEN_ADDR", "not-an-address"),
        ("DATABASE_URL", "mysql://somewhere/db"),
        ("SHUTDOWN_GRACE_SECS", "-1"),
        ("LOG_FORMAT", "xml"),
        ("OLLAMA_URL", "https://127.0.0.1:11434"),
        ("OLLAMA_URL", "http://user:secret@127.0.0.1:11434"),
        ("OLLAMA_URL", "http://127.0.0.1:11434/#part"),
    ];
    for (var, value) in cases {
        let launch = Launch::new(dir.path())
            .var("DATABASE_URL", "memory")
            .var("API_KEY", "k")
            .var("LISTEN_ADDR", &format!("127.0.0.1:{}", free_port()))
            .var(var, value);
        let out = launch.run_within(&[], Duration::from_secs(20)).await;
        assert!(!out.success(), "{var}={value} was accepted");
        assert!(
            out.stderr.contains(var) && out.stderr.contains(value),
            "{var}={value}: the message names neither:\n{}",
            out.stderr
        );
    }
    // API_KEYS holds secrets: the entry is named, not the value.
    let out = Launch::new(dir.path())
        .var("DATABASE_URL", "memory")
        .var("LISTEN_ADDR", &format!("127.0.0.1:{}", free_port()))
        .var("API_KEYS", "k-secret-1=5,k-secret-2=ten")
        .run_within(&[], Duration::from_secs(20))
        .await;
    assert!(!out.success());
    assert!(
        out.stderr.contains("API_KEYS") && out.stderr.contains("entry 2"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("k-secret"), "{}", out.stderr);

    // OLLAMA_URL is tollgate's own address: refused.
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut gw = Launch::new(dir.path())
        .var("DATABASE_URL", "memory")
        .var("API_KEY", "k")
        .var("OLLAMA_URL", &format!("http://{addr}"))
        .spawn_at(addr);
    let out = gw.wait_exit(Duration::from_secs(20)).await;
    assert!(!out.success(), "a self-loop was accepted");
    assert_eq!(
        out.status.code(),
        Some(2),
        "a configuration that cannot be used"
    );
    assert!(out.stderr.contains("OLLAMA_URL"), "{}", out.stderr);
}

/// SPEC §1: `.env` in the working directory is read, and the process
/// environment wins over it.
#[tokio::test]
async fn dotenv_is_read_and_the_environment_wins() {
    let fake = FakeOllama::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join(".env"),
        format!(
            "API_KEY=dotenv-key\nAPI_KEY_CREDITS=5\nCREDITS_PER_REQUEST=abc\nDATABASE_URL=memory\nOLLAMA_URL={}\n",
            fake.url()
        ),
    )
    .expect("write .env");
    let launch = Launch::new(dir.path());

    // The bad value from .env stops start-up...
    let out = launch
        .clone()
        .var("LISTEN_ADDR", &format!("127.0.0.1:{}", free_port()))
        .run_within(&[], Duration::from_secs(20))
        .await;
    assert!(!out.success());
    assert!(out.stderr.contains("CREDITS_PER_REQUEST"), "{}", out.stderr);

    // ...unless the environment overrides it.
    let gw = launch.var("CREDITS_PER_REQUEST", "2").start().await;
    assert_eq!(millis(&gw.me("dotenv-key").await.1["credits"]), 5_000);
    assert_eq!(gw.generate("dotenv-key", "hi").await, 200);
    assert_eq!(millis(&gw.me("dotenv-key").await.1["credits"]), 3_000);
    assert_eq!(gw.terminate(EXIT_WITHIN).await.status.code(), Some(0));
}

/// Only the working directory's `.env` is read, not one in a directory
/// above it (someone else's keys would become grants).
#[tokio::test]
async fn a_dotenv_above_the_working_directory_is_not_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(".env"), "CREDITS_PER_REQUEST=abc\n").expect("write .env");
    let child = dir.path().join("child");
    std::fs::create_dir(&child).expect("mkdir");
    let database = format!("sqlite://{}", dir.path().join("t.db").display());
    let out = Launch::new(&child)
        .var("DATABASE_URL", &database)
        .run_within(&["keys", "list"], Duration::from_secs(20))
        .await;
    assert!(out.success(), "{}", out.stderr);
    // In the directory itself, it is.
    let out = Launch::new(dir.path())
        .var("DATABASE_URL", &database)
        .run_within(&["keys", "list"], Duration::from_secs(20))
        .await;
    assert!(!out.success());
    assert!(out.stderr.contains("CREDITS_PER_REQUEST"), "{}", out.stderr);
}
