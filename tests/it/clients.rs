//! tollgate driven by the official clients (issue 4, SPEC §1, §3, §5-§7):
//! the Python `ollama` and `openai` packages, `requests` as the original
//! recipe uses it, the JavaScript `ollama` package on the machine's Node, and
//! the `ollama-rs` crate (in [`ollama_rs`], in-process).
//!
//! The Python and JavaScript clients are pinned in `tests/clients/` and
//! installed inside the checkout by the first test that needs them (see
//! [`toolchain`]). Each test here starts its own tollgate in front of its
//! own fake Ollama, creates the keys the scripts need, serves a control
//! server for the fake, and runs one script file as a subprocess:
//!
//! | test | runs |
//! |---|---|
//! | `python_ollama_client` | `pytest tests/clients/python/test_ollama_client.py` |
//! | `python_openai_client` | `pytest tests/clients/python/test_openai_client.py` |
//! | `python_recipe_client` | `pytest tests/clients/python/test_recipe_client.py` |
//! | `js_ollama_client` | `node --test tests/clients/js/ollama.test.mjs` |
//!
//! The scripts find everything in environment variables (the full list is
//! in `tests/clients/python/tollgate_env.py`): `TOLLGATE_URL`, the keys
//! `TOLLGATE_KEY` (1000 credits), `TOLLGATE_EMPTY_KEY` (0 credits),
//! `TOLLGATE_LIMITED_KEY` (only the model `mistral`), `TOLLGATE_ADMIN_KEY`,
//! `TOLLGATE_THROTTLED_URL` (a second tollgate that answers 429 after two
//! wrong keys a minute), `TOLLGATE_PRICED_URL` (a third one with token
//! pricing on) and `TOLLGATE_CONTROL_URL`. The second and third have their
//! own fake Ollama, with its default behaviour, and grant `TOLLGATE_KEY`
//! 1000 credits too.
//!
//! # The control server
//!
//! A small HTTP server (at `TOLLGATE_CONTROL_URL`) through which a script
//! steers the fake Ollama of its test ([`control`]); bodies are JSON, every
//! call answers 200 `{"ok": true}` or 400 with the reason:
//!
//! * `POST /behavior` `{"chunks": 5, "lockstep": true, "stream_error_after":
//!   2, "die_after": 2, "prompt_eval_count": 7, "fail": {"status": 503,
//!   "message": "..."}, "models": ["mistral:latest"]}` (every field
//!   optional, unknown ones refused): the fake's behaviour from now on is
//!   its default with these fields changed (see `support::fake_ollama`):
//!   `lockstep` makes every streamed item after the first wait for one
//!   `/step`, `stream_error_after: k` fails a stream after `k` chunks as
//!   Ollama does (an in-stream `{"error": ...}` line on the native API, an
//!   empty chunk and no `[DONE]` on `/v1`), `die_after: k` drops the
//!   connection after `k` chunks.
//! * `POST /step` `{"n": 1}` (body optional): lets `n` more lockstep items
//!   go. Permits accumulate. This is how the scripts prove that chunks
//!   arrive one by one without ever timing anything: read chunk k, step,
//!   read chunk k+1; a gateway that buffered would never deliver chunk k.
//! * `POST /reset`: back to the default behaviour (every script does this
//!   before each test).
//! * `GET /requests`: every request the fake received so far, oldest first,
//!   as `[{"method", "path", "headers": {name: value}, "body"}]` (`body`
//!   parsed as JSON when it is JSON, else a string), to check what tollgate
//!   forwarded.
//!
//! A script's failure fails the test with its whole output; pytest runs with
//! `-p no:cacheprovider`, and its exit code 5 (no test ran) is a failure
//! like any non-zero code.

mod control;
mod ollama_rs;
mod toolchain;

use crate::support::{spawn, TestApp, ADMIN, KEY};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// No script may take longer (they take a few seconds).
const SCRIPT_LIMIT: Duration = Duration::from_secs(180);

/// One script at a time: the machine has two cores, and the other suites
/// run beside these.
static ONE_SCRIPT_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The gateways and keys one script runs against.
struct Gateway {
    app: Arc<TestApp>,
    throttled: TestApp,
    priced: TestApp,
    control: control::ControlServer,
    empty_key: String,
    limited_key: String,
}

impl Gateway {
    async fn start() -> Gateway {
        let app = spawn().var("API_KEY_CREDITS", "1000").start().await;
        let empty_key = create_key(&app, json!({"name": "empty", "credits": 0})).await;
        let limited_key = create_key(
            &app,
            json!({"name": "mistral-only", "credits": 100, "models": ["mistral"]}),
        )
        .await;
        let throttled = spawn()
            .var("API_KEY_CREDITS", "1000")
            .var("AUTH_FAILURES_PER_MINUTE", "2")
            .start()
            .await;
        let priced = spawn()
            .var("API_KEY_CREDITS", "1000")
            .var("CREDITS_PER_1K_PROMPT_TOKENS", "1")
            .var("CREDITS_PER_1K_COMPLETION_TOKENS", "1")
            .start()
            .await;
        let app = Arc::new(app);
        let control = control::serve(app.clone()).await;
        Gateway {
            app,
            throttled,
            priced,
            control,
            empty_key,
            limited_key,
        }
    }

    /// The environment the scripts read.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TOLLGATE_URL", self.app.url.clone()),
            ("TOLLGATE_KEY", KEY.to_string()),
            ("TOLLGATE_EMPTY_KEY", self.empty_key.clone()),
            ("TOLLGATE_LIMITED_KEY", self.limited_key.clone()),
            ("TOLLGATE_ADMIN_KEY", ADMIN.to_string()),
            ("TOLLGATE_THROTTLED_URL", self.throttled.url.clone()),
            ("TOLLGATE_PRICED_URL", self.priced.url.clone()),
            ("TOLLGATE_CONTROL_URL", self.control.url.clone()),
        ]
    }
}

/// Creates a key through the admin API; returns its secret.
async fn create_key(app: &TestApp, body: Value) -> String {
    let response = app
        .admin(reqwest::Method::POST, "/admin/keys")
        .json(&body)
        .send()
        .await
        .expect("POST /admin/keys");
    assert_eq!(response.status(), 201, "POST /admin/keys {body}");
    let created: Value = response.json().await.expect("JSON");
    created["key"]
        .as_str()
        .expect("the new key's secret")
        .to_string()
}

/// A command for a client script, with a clean environment: none of the
/// variables the clients read on their own, no proxy for loopback.
fn script(program: &Path, gateway: &Gateway, dir: &Path) -> Command {
    let mut command = Command::new(program);
    command.current_dir(dir);
    for name in [
        "OLLAMA_API_KEY",
        "OLLAMA_HOST",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_ORG_ID",
        "OPENAI_PROJECT_ID",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "PYTEST_ADDOPTS",
        "NODE_OPTIONS",
    ] {
        command.env_remove(name);
    }
    command
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("NO_COLOR", "1")
        .envs(gateway.env());
    command
}

/// Runs a script to its end; panics with its output unless it succeeded.
/// Returns its standard output.
async fn run_script(mut command: Command, what: &str) -> String {
    let _turn = ONE_SCRIPT_AT_A_TIME.lock().await;
    let started = Instant::now();
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    let status = tokio::time::timeout(SCRIPT_LIMIT, child.wait()).await;
    if status.is_err() {
        let _ = child.kill().await;
    }
    let (stdout, stderr) = (
        stdout.await.unwrap_or_default(),
        stderr.await.unwrap_or_default(),
    );
    let report = format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    match status {
        Err(_) => panic!("{what} did not finish within {SCRIPT_LIMIT:?}\n{report}"),
        Ok(Err(e)) => panic!("{what}: cannot wait for it: {e}\n{report}"),
        Ok(Ok(status)) if !status.success() => panic!("{what} failed ({status})\n{report}"),
        Ok(Ok(_)) => {
            println!(
                "{what} passed in {:.1} s\n{report}",
                started.elapsed().as_secs_f64()
            );
            stdout
        }
    }
}

/// Reads a pipe to its end in a task.
fn read_all<R>(pipe: Option<R>) -> tokio::task::JoinHandle<String>
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
{
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes).await;
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs one pytest file of `tests/clients/python` against a fresh gateway.
async fn pytest(file: &str) {
    let Some(python) = toolchain::python().await else {
        return;
    };
    let gateway = Gateway::start().await;
    let dir = toolchain::clients_dir().join("python");
    let mut command = script(&python, &gateway, &dir);
    command.args([
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-v",
        "--color=no",
        "--strict-markers",
        file,
    ]);
    // Exit code 5 (nothing collected) fails like any other non-zero code.
    let stdout = run_script(command, &format!("pytest {file}")).await;
    assert!(
        stdout.contains(" passed"),
        "pytest {file} reported no passed test:\n{stdout}"
    );
}

#[tokio::test]
async fn python_ollama_client() {
    pytest("test_ollama_client.py").await;
}

#[tokio::test]
async fn python_openai_client() {
    pytest("test_openai_client.py").await;
}

#[tokio::test]
async fn python_recipe_client() {
    pytest("test_recipe_client.py").await;
}

#[tokio::test]
async fn js_ollama_client() {
    let Some(node) = toolchain::node().await else {
        return;
    };
    let gateway = Gateway::start().await;
    let dir: PathBuf = toolchain::clients_dir().join("js");
    let mut command = script(&node, &gateway, &dir);
    command.args(["--test", "--test-reporter=tap", "ollama.test.mjs"]);
    let stdout = run_script(command, "node --test ollama.test.mjs").await;
    let count = |label: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(label)?.trim().parse::<u32>().ok())
    };
    assert_eq!(count("# fail "), Some(0), "node --test:\n{stdout}");
    assert!(
        count("# pass ").is_some_and(|n| n > 0),
        "node --test ran no test:\n{stdout}"
    );
}
