//! Debian's Chromium, installed when missing, started headless for one
//! test and always ended with it.

use super::cdp::Cdp;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const CHROMIUM: &str = "/usr/bin/chromium";

/// How long apt-get may wait for another apt-get's lock.
const APT_LOCK_WAIT_SECS: u32 = 300;

/// The browser, installed with apt-get when missing, or `None` (after
/// printing why) when the browser tests are skipped. With `CI=true` a
/// browser that cannot be had fails the test instead.
pub async fn available() -> Option<PathBuf> {
    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = tokio::task::spawn_blocking(|| INSTALLED.get_or_init(install).clone())
        .await
        .expect("install task");
    match result {
        Ok(path) => Some(path),
        Err(reason) if in_ci() => panic!(
            "the browser tests cannot run: {reason}\n\
             (CI=true: a missing browser fails the run instead of skipping)"
        ),
        Err(reason) => {
            println!("skipped: the browser tests: {reason}");
            None
        }
    }
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Installs Debian's `chromium` unless it is there. Never another build:
/// no test tool downloads a browser of its own.
fn install() -> Result<PathBuf, String> {
    let path = PathBuf::from(CHROMIUM);
    if path.exists() {
        return Ok(path);
    }
    let started = Instant::now();
    eprintln!("{CHROMIUM} is missing: installing Debian's chromium with apt-get ...");
    let lock_wait = format!("DPkg::Lock::Timeout={APT_LOCK_WAIT_SECS}");
    apt(&["-q", "-o", &lock_wait, "update"])?;
    apt(&[
        "-q",
        "-y",
        "-o",
        &lock_wait,
        "install",
        "--no-install-recommends",
        "chromium",
    ])?;
    if !path.exists() {
        return Err(format!(
            "apt-get installed chromium, but {CHROMIUM} is not there"
        ));
    }
    eprintln!(
        "installed chromium in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(path)
}

fn apt(args: &[&str]) -> Result<(), String> {
    let shown = format!("apt-get {}", args.join(" "));
    let output = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`{shown}` cannot run ({e})"))?;
    if output.status.success() {
        return Ok(());
    }
    let mut said = String::from_utf8_lossy(&output.stdout).into_owned();
    said.push_str(&String::from_utf8_lossy(&output.stderr));
    let tail: Vec<&str> = said.lines().rev().take(15).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(format!(
        "`{shown}` failed ({}):\n{}",
        output.status,
        tail.join("\n")
    ))
}

/// A headless Chromium with a fresh profile, in a process group of its
/// own. Dropping it ends the browser and everything it started (on the
/// failure path too), then removes the profile.
pub struct Browser {
    child: Child,
    cdp: Option<Cdp>,
    stderr: Arc<Mutex<Vec<String>>>,
    // Removed after the browser is gone (fields drop after `drop`).
    _profile: tempfile::TempDir,
}

/// What a page left for the test: the value its `window.results` promise
/// settled to, and the lines of the browser's console (including the
/// browser's own messages, such as CORS refusals).
pub struct PageRun {
    pub results: Value,
    pub console: Vec<String>,
}

impl Browser {
    /// Starts the browser and connects to its DevTools endpoint.
    pub async fn start(executable: &Path) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut command = Command::new(executable);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", executable.display()));
        // Drained all along, so that the browser never blocks on a full
        // pipe; kept to show when something goes wrong.
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().expect("stderr");
        let lines = stderr.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
        let mut browser = Browser {
            child,
            cdp: None,
            stderr,
            _profile: profile,
        };
        let endpoint = browser.endpoint().await;
        match Cdp::connect(&endpoint).await {
            Ok(cdp) => browser.cdp = Some(cdp),
            Err(e) => browser.fail(&format!("cannot drive Chromium: {e}")),
        }
        browser
    }

    /// The DevTools address, from the `DevToolsActivePort` file the
    /// browser writes into its profile once it listens.
    async fn endpoint(&mut self) -> String {
        let file = self._profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    return format!("ws://127.0.0.1:{}{}", port.trim(), path.trim());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.fail(&format!("Chromium exited at start ({status})"));
            }
            if Instant::now() > deadline {
                self.fail("Chromium did not open its DevTools endpoint within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens `url` in a new tab, waits for its load event, and returns
    /// what its `window.results` promise settles to.
    pub async fn run_page(&mut self, url: &str) -> PageRun {
        let cdp = self.cdp.as_mut().expect("connected");
        let run = async {
            let target = cdp
                .call(None, "Target.createTarget", json!({"url": "about:blank"}))
                .await?;
            let session = cdp
                .call(
                    None,
                    "Target.attachToTarget",
                    json!({"targetId": target["targetId"], "flatten": true}),
                )
                .await?;
            let session = session["sessionId"]
                .as_str()
                .ok_or("no sessionId")?
                .to_string();
            let s = Some(session.as_str());
            cdp.call(s, "Page.enable", json!({})).await?;
            cdp.call(s, "Runtime.enable", json!({})).await?;
            cdp.call(s, "Log.enable", json!({})).await?;
            let navigated = cdp.call(s, "Page.navigate", json!({"url": url})).await?;
            if let Some(error) = navigated.get("errorText") {
                return Err(format!("navigating to {url}: {error}"));
            }
            cdp.wait_event(&session, "Page.loadEventFired").await?;
            let evaluated = cdp
                .call(
                    s,
                    "Runtime.evaluate",
                    json!({
                        "expression": "window.results",
                        "awaitPromise": true,
                        "returnByValue": true,
                    }),
                )
                .await?;
            if let Some(exception) = evaluated.get("exceptionDetails") {
                return Err(format!("the page's script failed: {exception}"));
            }
            let results = evaluated["result"]["value"].clone();
            let console = cdp.take_events().iter().filter_map(console_line).collect();
            Ok::<_, String>(PageRun { results, console })
        };
        match tokio::time::timeout(Duration::from_secs(90), run).await {
            Ok(Ok(run)) => run,
            Ok(Err(e)) => self.fail(&e),
            Err(_) => self.fail(&format!("the page {url} gave no results within 90 s")),
        }
    }

    /// Panics with the browser's own output (the browser is ended by drop).
    fn fail(&self, why: &str) -> ! {
        let lines = self.stderr.lock().unwrap();
        let said = lines[lines.len().saturating_sub(60)..].join("\n");
        panic!("{why}\n--- Chromium's stderr ---\n{said}");
    }

    /// Asks the browser to close and waits (a little) for it to exit, so
    /// that it reaps its own helpers; drop ends whatever is left.
    pub async fn close(mut self) {
        if let Some(mut cdp) = self.cdp.take() {
            let closing = cdp.call(None, "Browser.close", json!({}));
            if tokio::time::timeout(Duration::from_secs(5), closing)
                .await
                .is_ok()
            {
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    if matches!(self.child.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

impl Drop for Browser {
    /// Ends the browser's process group (its id is the browser's pid):
    /// the browser itself, if still there, and any helper left behind.
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A console message or a browser log entry as one line, or `None` for
/// other events.
fn console_line(event: &Value) -> Option<String> {
    let params = &event["params"];
    match event["method"].as_str()? {
        "Log.entryAdded" => Some(format!(
            "[{} {}] {}",
            params["entry"]["source"].as_str().unwrap_or("?"),
            params["entry"]["level"].as_str().unwrap_or("?"),
            params["entry"]["text"].as_str().unwrap_or("")
        )),
        "Runtime.consoleAPICalled" => Some(format!(
            "[console {}] {}",
            params["type"].as_str().unwrap_or("?"),
            params["args"]
                .as_array()
                .map(|args| args
                    .iter()
                    .map(|a| a["value"].to_string())
                    .collect::<Vec<_>>()
                    .join(" "))
                .unwrap_or_default()
        )),
        "Runtime.exceptionThrown" => Some(format!(
            "[exception] {}",
            params["exceptionDetails"]["exception"]["description"]
                .as_str()
                .unwrap_or("?")
        )),
        _ => None,
    }
}
