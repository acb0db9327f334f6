//! Tests that drive the real `tollgate` binary as a child process: start-up
//! output, restarts, `kill -9`, several gateways on one PostgreSQL, the CLI.
//!
//! Every process gets a clean environment (only the variables a test gives
//! it) and runs in a temporary working directory, so no stray `.env` or
//! `tollgate.db` is read. A [`Gateway`] is killed (SIGKILL) when dropped, so
//! a failing test leaves no process behind.

mod cli;
mod crash;
mod lifecycle;
mod logs;
mod two_gateways;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::time::Instant;

/// The binary under test, built by cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// How long a gateway may take to answer `/health` after it was spawned.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long a one-shot command (CLI) may run.
const COMMAND_WITHIN: Duration = Duration::from_secs(30);

/// A free TCP port on 127.0.0.1 (bound, then released for the child).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// `sqlite://PATH` for a file in `dir`.
pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// How to run the binary: working directory and environment.
#[derive(Clone, Debug)]
pub struct Launch {
    dir: PathBuf,
    vars: BTreeMap<String, String>,
}

impl Launch {
    /// Runs in `dir` with no variables at all.
    pub fn new(dir: &Path) -> Launch {
        Launch {
            dir: dir.to_path_buf(),
            vars: BTreeMap::new(),
        }
    }

    pub fn var(mut self, name: &str, value: &str) -> Launch {
        self.vars.insert(name.to_string(), value.to_string());
        self
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_clear()
            .envs(&self.vars)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs a one-shot command (`keys ...`, `usage`, `--help`) to its end.
    pub async fn run(&self, args: &[&str]) -> Output {
        self.run_within(args, COMMAND_WITHIN).await
    }

    /// [`Launch::run`], panicking if the process is still running after
    /// `within` (it is then killed).
    pub async fn run_within(&self, args: &[&str], within: Duration) -> Output {
        let mut cmd = tokio::process::Command::from(self.command(args));
        cmd.kill_on_drop(true);
        let out = tokio::time::timeout(within, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("tollgate {args:?} did not end"))
            .expect("run tollgate");
        Output {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts the gateway on a free port and waits until `/health` answers.
    pub async fn start(&self) -> Gateway {
        for attempt in 0.. {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut gateway = self.spawn_at(addr);
            match gateway.wait_ready().await {
                Ok(()) => return gateway,
                // Someone else took the port between our probe and the bind.
                Err(out) if attempt < 3 && out.stderr.contains("cannot listen") => continue,
                Err(out) => panic!(
                    "tollgate did not start (exit: {:?})\n--- stdout\n{}\n--- stderr\n{}",
                    out.status, out.stdout, out.stderr
                ),
            }
        }
        unreachable!()
    }

    /// Spawns the gateway listening on `addr` without waiting for it.
    pub fn spawn_at(&self, addr: SocketAddr) -> Gateway {
        let mut cmd = self.command(&[]);
        cmd.env("LISTEN_ADDR", addr.to_string());
        let mut child = cmd.spawn().expect("spawn tollgate");
        let stdout = Captured::of(child.stdout.take().expect("stdout pipe"));
        let stderr = Captured::of(child.stderr.take().expect("stderr pipe"));
        Gateway {
            child: Some(child),
            addr,
            url: format!("http://{addr}"),
            stdout,
            stderr,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
        }
    }
}

/// A process that has ended.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics with the output unless the command succeeded.
    pub fn ok(self) -> Output {
        assert!(
            self.success(),
            "command failed ({:?})\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Everything a child wrote to one of its pipes, read by a thread.
struct Captured {
    text: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Captured {
    fn of(mut pipe: impl Read + Send + 'static) -> Captured {
        let text = Arc::new(Mutex::new(String::new()));
        let sink = text.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => lock(&sink).push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        });
        Captured {
            text,
            reader: Some(reader),
        }
    }

    fn text(&self) -> String {
        lock(&self.text).clone()
    }

    /// The whole output, once the pipe is closed (the process ended).
    fn finish(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.text()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running `tollgate` process.
pub struct Gateway {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub url: String,
    stdout: Captured,
    stderr: Captured,
    pub client: reqwest::Client,
}

impl Gateway {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// What the process has printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    /// What the process has logged (stderr) so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Polls `/health` until it answers 200; on an early exit, returns the
    /// output.
    async fn wait_ready(&mut self) -> Result<(), Output> {
        let deadline = Instant::now() + READY_WITHIN;
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        loop {
            if let Some(status) = self.try_status() {
                return Err(self.collect(status));
            }
            let health = probe.get(format!("{}/health", self.url)).send().await;
            if health.is_ok_and(|r| r.status() == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.as_mut().map(Child::kill);
                let status = self.child.as_mut().expect("child").wait().expect("wait");
                return Err(self.collect(status));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
    }

    fn collect(&mut self, status: ExitStatus) -> Output {
        self.child = None;
        Output {
            status,
            stdout: self.stdout.finish(),
            stderr: self.stderr.finish(),
        }
    }

    /// Waits until stderr contains `needle`; false on timeout.
    pub async fn wait_log(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.stderr().contains(needle) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Waits until stdout contains `needle`; false on timeout.
    pub async fn wait_stdout(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.stdout().contains(needle) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// SIGTERM, then waits for the exit (at most `within`).
    pub async fn terminate(mut self, within: Duration) -> Output {
        self.sigterm();
        self.wait_exit(within).await
    }

    /// `kill -9`: SIGKILL, and waits for the process to be gone.
    pub fn kill9(mut self) -> Output {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        let status = child.wait().expect("wait");
        Output {
            status,
            stdout: self.stdout.finish(),
            stderr: self.stderr.finish(),
        }
    }

    /// Waits for the process to end by itself; panics (after SIGKILL) when it
    /// does not within `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Output {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_status() {
                return self.collect(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.as_mut().map(Child::kill);
                panic!(
                    "tollgate did not exit within {within:?}\n--- stderr\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{}", self.url, path))
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(format!("{}{}", self.url, path))
    }

    /// `GET /me` with `key`: the status and the body (JSON or null).
    pub async fn me(&self, key: &str) -> (u16, serde_json::Value) {
        let response = self
            .get("/me")
            .header("x-api-key", key)
            .send()
            .await
            .expect("GET /me");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }

    /// `POST /generate?prompt=...` with `key`: the status.
    pub async fn generate(&self, key: &str, prompt: &str) -> u16 {
        self.post("/generate")
            .query(&[("prompt", prompt)])
            .header("x-api-key", key)
            .send()
            .await
            .expect("POST /generate")
            .status()
            .as_u16()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A JSON number as exact thousandths of a credit.
pub fn millis(v: &serde_json::Value) -> i64 {
    let f = v
        .as_f64()
        .unwrap_or_else(|| panic!("not a number of credits: {v}"));
    (f * 1000.0).round() as i64
}

/// A key's balance and ledger, read directly from a store.
pub struct Ledger {
    pub id: tollgate::store::KeyId,
    /// Thousandths of a credit.
    pub balance: i64,
    pub adjustments: Vec<tollgate::store::AdjustmentEntry>,
    /// Newest first.
    pub usage: Vec<tollgate::store::UsageRecord>,
}

impl Ledger {
    /// Opens the SQLite file (no gateway may be running on it) and reads the
    /// ledger of the key with this secret.
    pub async fn read_sqlite(path: &Path, secret: &str) -> Ledger {
        Ledger::read(&tollgate::config::DatabaseUrl::Sqlite(path.into()), secret).await
    }

    pub async fn read(url: &tollgate::config::DatabaseUrl, secret: &str) -> Ledger {
        use tollgate::store::PageRequest;
        let store = tollgate::store::open_beside(url)
            .await
            .expect("open the store");
        let key = store
            .key_by_hash(&tollgate::auth::keys::hash(secret))
            .await
            .expect("store")
            .expect("the key exists");
        let adjustments = store.adjustments(key.id).await.expect("adjustments");
        let mut usage = Vec::new();
        let mut before = None;
        loop {
            let page = store
                .usage(
                    Some(key.id),
                    PageRequest {
                        limit: 1000,
                        before,
                    },
                )
                .await
                .expect("usage");
            let Some(last) = page.last() else { break };
            before = Some(last.id);
            usage.extend(page.into_iter().map(|e| e.record));
        }
        Ledger {
            id: key.id,
            balance: key.balance.millis(),
            adjustments,
            usage,
        }
    }

    /// Grants + adjustments − charges = balance, exactly.
    pub fn assert_adds_up(&self) {
        let adjusted: i64 = self.adjustments.iter().map(|a| a.delta.millis()).sum();
        let charged: i64 = self.usage.iter().map(|u| u.credits.millis()).sum();
        assert_eq!(
            adjusted - charged,
            self.balance,
            "the ledger does not add up: adjustments {adjusted} - charges {charged} != balance {} (thousandths)",
            self.balance
        );
    }

    /// Rows of requests that succeeded and were charged.
    pub fn charged_successes(&self) -> usize {
        self.usage
            .iter()
            .filter(|u| u.status == 200 && u.credits.millis() > 0)
            .count()
    }
}
