//! The things under test, as processes: tollgate (one per store), nginx
//! and the floor (`examples/floor.rs`), started in front of the fake, and
//! their memory and CPU read from `/proc`.

use crate::load;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Credits granted to the benchmark key: enough that no request is ever
/// refused with 402.
pub const CREDITS: u64 = 100_000_000;

/// Extra environment for every tollgate started (`--tollgate-env`).
static EXTRA_ENV: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();

pub fn set_tollgate_env(vars: Vec<(String, String)>) {
    let _ = EXTRA_ENV.set(vars);
}

/// Processes started and not yet stopped, to stop them on Ctrl-C.
static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Stops (SIGTERM) every process started and not yet stopped.
pub fn stop_all() {
    for pid in CHILDREN.lock().unwrap().drain(..) {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// What a target is.
#[derive(Clone, Debug)]
pub enum Kind {
    /// The fake itself, called directly: the baseline.
    Direct,
    /// nginx as a plain reverse proxy with an API-key check.
    Nginx { binary: PathBuf },
    /// The floor: the least proxy that tollgate's building blocks make
    /// (`examples/floor.rs`), with nginx's key check; with `ledger`, also
    /// the least durable ledger (one SQLite row per request, group commit;
    /// or, as `journal:PATH`, one line appended to a plain file).
    Floor {
        binary: PathBuf,
        ledger: Option<String>,
    },
    /// tollgate with this `DATABASE_URL`.
    Tollgate {
        binary: PathBuf,
        database_url: String,
    },
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub kind: Kind,
}

/// A started target.
pub struct Running {
    pub addr: SocketAddr,
    child: Option<Child>,
    kind: Kind,
    pub log: Option<PathBuf>,
}

impl Running {
    /// The processes that make up the proxy (nginx: master and workers).
    pub fn pids(&self) -> Vec<u32> {
        let Some(child) = &self.child else {
            return Vec::new();
        };
        let master = child.id();
        let mut pids = vec![master];
        if matches!(self.kind, Kind::Nginx { .. }) {
            pids.extend(children_of(master));
        }
        pids
    }

    /// Stops the process: SIGTERM, then SIGKILL after 10 s.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        CHILDREN.lock().unwrap().retain(|pid| *pid != child.id());
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts a target in front of the fake at `fake`; `dir` holds its
/// configuration and log.
pub async fn start(spec: &Spec, fake: SocketAddr, dir: &Path) -> Result<Running, String> {
    let (addr, child, log) = match &spec.kind {
        Kind::Direct => {
            return Ok(Running {
                addr: fake,
                child: None,
                kind: spec.kind.clone(),
                log: None,
            })
        }
        Kind::Tollgate {
            binary,
            database_url,
        } => {
            let addr = free_port()?;
            let log = dir.join(format!("{}.log", spec.name));
            let child = spawn_logged(
                Command::new(binary)
                    .env_clear()
                    .current_dir(dir)
                    .env("LISTEN_ADDR", addr.to_string())
                    .env("OLLAMA_URL", format!("http://{fake}"))
                    .env(
                        "API_KEYS",
                        load::keys()
                            .iter()
                            .map(|k| format!("{k}={CREDITS}"))
                            .collect::<Vec<_>>()
                            .join(","),
                    )
                    .env("DATABASE_URL", database_url)
                    .env("LOG_FORMAT", "json")
                    .env("RUST_LOG", "warn")
                    .env("SHUTDOWN_GRACE_SECS", "5")
                    .envs(EXTRA_ENV.get().into_iter().flatten().cloned()),
                &log,
            )?;
            (addr, child, log)
        }
        Kind::Floor { binary, ledger } => {
            let addr = free_port()?;
            let log = dir.join(format!("{}.log", spec.name));
            let child = spawn_logged(
                Command::new(binary)
                    .arg(addr.to_string())
                    .arg(fake.to_string())
                    .arg(load::keys().join(","))
                    .args(ledger),
                &log,
            )?;
            (addr, child, log)
        }
        Kind::Nginx { binary } => {
            let addr = free_port()?;
            let prefix = dir.join(&spec.name);
            std::fs::create_dir_all(&prefix).map_err(|e| e.to_string())?;
            let conf = prefix.join("nginx.conf");
            std::fs::write(&conf, nginx_conf(addr, fake, &prefix)).map_err(|e| e.to_string())?;
            let log = prefix.join("error.log");
            let child = spawn_logged(
                Command::new(binary)
                    .arg("-p")
                    .arg(&prefix)
                    .arg("-c")
                    .arg(&conf)
                    .arg("-e")
                    .arg(&log),
                &prefix.join("stdout.log"),
            )?;
            (addr, child, log)
        }
    };
    CHILDREN.lock().unwrap().push(child.id());
    let mut running = Running {
        addr,
        child: Some(child),
        kind: spec.kind.clone(),
        log: Some(log),
    };
    let probe = match spec.kind {
        Kind::Tollgate { .. } => "/health",
        _ => "/",
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if load::get_ok(addr, probe).await {
            return Ok(running);
        }
        let exited = running
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if exited.is_some() || Instant::now() > deadline {
            let tail = running
                .log
                .as_ref()
                .and_then(|l| std::fs::read_to_string(l).ok())
                .map(|t| t.lines().rev().take(5).collect::<Vec<_>>().join(" | "))
                .unwrap_or_default();
            return Err(format!(
                "{} did not come up ({}): {tail}",
                spec.name,
                exited.map_or("timeout".into(), |s| s.to_string())
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts `command` with no input and its output appended to `output`.
fn spawn_logged(command: &mut Command, output: &Path) -> Result<Child, String> {
    command
        .stdin(Stdio::null())
        .stdout(log_file(output)?)
        .stderr(log_file(output)?)
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", command.get_program()))
}

fn log_file(path: &Path) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn free_port() -> Result<SocketAddr, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map_err(|e| e.to_string())
}

/// nginx as the issue asks: a plain reverse proxy, the key checked with a
/// `map`, no buffering, HTTP/1.1 and a keep-alive pool to the upstream.
/// Keep-alive limits are raised on both sides so that neither the client
/// nor the upstream connections are recycled every 1,000 requests (nginx's
/// default), which would measure reconnects; the key header is not
/// forwarded, as tollgate does not forward it.
pub fn nginx_conf(listen: SocketAddr, fake: SocketAddr, prefix: &Path) -> String {
    let p = prefix.display();
    let keys: String = load::keys()
        .iter()
        .map(|k| format!("        \"{k}\" 1;\n"))
        .collect();
    format!(
        r#"daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile 16384;
pid {p}/nginx.pid;
error_log {p}/error.log warn;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;

    map $http_x_api_key $key_ok {{
        default 0;
{keys}    }}

    upstream ollama {{
        server {fake};
        keepalive 256;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}

    server {{
        listen {listen} backlog=4096;

        location / {{
            if ($key_ok = 0) {{
                return 401 '{{"error":"invalid API key"}}';
            }}
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Api-Key "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"#
    )
}

/// nginx on this machine, if any.
pub fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

/// `nginx -v`, e.g. `nginx/1.22.1`.
pub fn nginx_version(binary: &Path) -> String {
    Command::new(binary)
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .map(|v| v.trim_start_matches("nginx version: ").to_string())
        .unwrap_or_default()
}

/// A fresh schema on the PostgreSQL server at `base`, and the URL that
/// makes tollgate use it (sqlx passes `options` to the server as start-up
/// options, so `-c search_path=...` applies to every pooled connection).
pub async fn postgres_schema(base: &str) -> Result<(String, String), String> {
    use sqlx::Connection;
    let schema = format!(
        "tollgate_bench_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    );
    let connect = sqlx::postgres::PgConnection::connect(base);
    let mut conn = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| format!("no answer from {base} within 5 s"))?
        .map_err(|e| format!("cannot connect to {base}: {e}"))?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .map_err(|e| format!("cannot create schema {schema}: {e}"))?;
    let _ = conn.close().await;
    let _ = PG_SCHEMA.set((base.to_string(), schema.clone()));
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    Ok((url, schema))
}

/// The schema this run created, to drop it also when interrupted.
pub static PG_SCHEMA: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();

pub async fn drop_postgres_schema(base: &str, schema: &str) {
    use sqlx::Connection;
    if let Ok(mut conn) = sqlx::postgres::PgConnection::connect(base).await {
        let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
    }
}

/// Memory of a set of processes, summed, in KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub pss_kib: u64,
}

pub fn memory(pids: &[u32]) -> Memory {
    let mut m = Memory::default();
    for pid in pids {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            m.rss_kib += field_kib(&status, "VmRSS:");
            m.hwm_kib += field_kib(&status, "VmHWM:");
        }
        if let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            m.pss_kib += field_kib(&rollup, "Pss:");
        }
    }
    m
}

fn field_kib(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) of a set of processes, in clock ticks.
pub fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| {
            // Fields after the command name (which may contain spaces).
            let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            // utime and stime are fields 14 and 15 of the whole line.
            get(11) + get(12)
        })
        .sum()
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
pub fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(") ")?.1.to_string();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}
