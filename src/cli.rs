//! The command line: `tollgate` (or `tollgate serve`) runs the gateway; the
//! other commands manage keys and read the ledger directly on the configured
//! store, like the admin API does over HTTP.

use crate::admin::export::{self, Format};
use crate::admin::keys::{self, KeyError, KeySpec, KeyView};
use crate::app::{App, Hooks, StartError};
use crate::config::{Config, DatabaseUrl};
use crate::credits::Credits;
use crate::store::{self, BalanceChange, KeyId, PageRequest, Role, SharedStore, StoreError};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An authenticated, credit-metered gateway in front of Ollama",
    long_about = "An authenticated, credit-metered gateway in front of Ollama.\n\n\
        Configuration comes from the environment and from .env in the working \
        directory (see the README). Without a command, tollgate serves."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Manage API keys in the configured store.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Show ledger rows, newest first.
    Usage {
        /// Only this key's rows.
        #[arg(long)]
        key: Option<KeyId>,
        /// How many rows.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print CSV instead of JSON lines.
        #[arg(long)]
        csv: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum KeysCommand {
    /// Create a key and print its secret (shown this once).
    Create {
        /// A name for the key (who holds it).
        #[arg(long, value_parser = parse_name)]
        name: String,
        /// Initial credits (up to three decimals).
        #[arg(long, default_value = "0")]
        credits: Credits,
        /// user or admin.
        #[arg(long, default_value = "user", value_parser = parse_role)]
        role: Role,
        /// Models the key may use, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// Requests per minute.
        #[arg(long)]
        rate_limit_rpm: Option<u32>,
        /// Concurrent requests.
        #[arg(long)]
        max_concurrent: Option<u32>,
        /// Expiry, as an RFC 3339 time (e.g. 2027-01-01T00:00:00Z).
        #[arg(long, value_parser = parse_expiry)]
        expires: Option<i64>,
    },
    /// List every key (never secrets).
    List,
    /// Add credits to a key (or set its balance with --set).
    Topup {
        id: KeyId,
        credits: Credits,
        /// Set the balance to CREDITS instead of adding.
        #[arg(long)]
        set: bool,
        /// Why, for the ledger.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Revoke a key: it gets 401 from then on; its ledger stays.
    Revoke { id: KeyId },
}

/// The admin API refuses blank names; so does the CLI.
fn parse_name(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("the name must not be empty".into())
    } else {
        Ok(s.to_string())
    }
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("{s:?} is not a role: use user or admin"))
}

fn parse_expiry(s: &str) -> Result<i64, String> {
    keys::parse_time(s).ok_or_else(|| format!("{s:?} is not an RFC 3339 time"))
}

/// Why a command failed, told to scripts by the exit code: 1 when it
/// failed (nothing was changed), 2 when the command line, a value in it or
/// the configuration cannot be used (clap exits with 2 too), 3 when the
/// database did not confirm a change that it may have applied (a top-up
/// or a new key made again blindly could count twice).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Unusable(String),
    #[error(transparent)]
    Unconfirmed(StoreError),
}

impl Failure {
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Failure::Failed(_) => 1,
            Failure::Unusable(_) => 2,
            Failure::Unconfirmed(_) => 3,
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unconfirmed(_) => Failure::Unconfirmed(e),
            // A balance a top-up or set would take out of range: the value
            // given cannot be used.
            StoreError::BalanceOutOfRange => Failure::Unusable(e.to_string()),
            other => Failure::Failed(other.to_string()),
        }
    }
}

impl From<KeyError> for Failure {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Store(e) => Failure::from(e),
            // A value the command line gave that no key can have.
            invalid => Failure::Unusable(invalid.to_string()),
        }
    }
}

impl From<StartError> for Failure {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Store(e @ StoreError::Unconfirmed(_)) => Failure::Unconfirmed(e),
            store @ StartError::Store(_) => Failure::Failed(store.to_string()),
            // OLLAMA_URL: tollgate's own address, or not a usable URL.
            unusable => Failure::Unusable(unusable.to_string()),
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Failed(message)
    }
}

pub async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let config = Config::from_env().map_err(|e| Failure::Unusable(e.to_string()))?;
    crate::telemetry::init_logging(config.log_format, &config.log_filter);
    let command = cli.command.unwrap_or(Command::Serve);
    if !matches!(command, Command::Serve) && config.database_url == DatabaseUrl::Memory {
        return Err(Failure::Unusable(
            "DATABASE_URL=memory keeps nothing outside the gateway's process: \
             the CLI works on a sqlite:// or postgres:// store"
                .into(),
        ));
    }
    match command {
        Command::Serve => serve(config).await,
        Command::Keys(cmd) => {
            let store = store::open_beside(&config.database_url).await?;
            keys_command(store, cmd).await
        }
        Command::Usage { key, limit, csv } => {
            let store = store::open_beside(&config.database_url).await?;
            print_usage(store, key, limit, csv).await
        }
    }
}

/// What a first start prints: the key it created, once, with a curl line
/// that works as pasted (over HTTPS when tollgate serves it).
fn first_key_message(key: &str, addr: SocketAddr, tls_cert: Option<&Path>) -> String {
    let (scheme, note) = match tls_cert {
        Some(cert) => (
            "https",
            format!(
                "\n    (with a self-signed certificate, add --cacert {})\n",
                cert.display()
            ),
        ),
        None => ("http", String::new()),
    };
    format!(
        "\nNo API key was configured, so tollgate created one (shown only this once):\n\n    \
         {key}\n\nTry it:\n\n    curl -X POST '{scheme}://{addr}/generate?prompt=hello' \
         -H 'x-api-key: {key}'\n{note}"
    )
}

async fn serve(config: Config) -> Result<(), Failure> {
    let addr = config.listen_addr;
    if !addr.ip().is_loopback() && config.tls_cert.is_none() {
        tracing::warn!(%addr, "listening beyond loopback without TLS: API keys travel in clear text");
    }
    if !config.ollama_is_loopback() {
        tracing::warn!(url = %config.ollama_url, "OLLAMA_URL is not a loopback address: clients that reach Ollama directly go around the gate");
    }
    let app = App::build(config, Hooks::default()).await?;
    if let Some(key) = &app.first_key {
        println!(
            "{}",
            first_key_message(key, addr, app.state().config.tls_cert.as_deref())
        );
    }
    let upstream = app.state().upstream.clone();
    let tls = match (&app.state().config.tls_cert, &app.state().config.tls_key) {
        (Some(cert), Some(key)) => {
            Some(crate::tls::acceptor(cert, key).map_err(|e| Failure::Unusable(e.to_string()))?)
        }
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(url = %format!("{scheme}://{addr}"), ollama = upstream.base_url(), "tollgate is listening");
    tokio::spawn(async move {
        if !upstream.is_reachable().await {
            tracing::warn!(
                url = upstream.base_url(),
                "Ollama does not answer; requests will get 502 until it does"
            );
        }
    });
    let served = match tls {
        Some(tls) => app.serve_tls(listener, tls, shutdown_signal()).await,
        None => app.serve(listener, shutdown_signal()).await,
    };
    served.map_err(|e| Failure::Failed(e.to_string()))
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

pub(crate) async fn keys_command(store: SharedStore, cmd: KeysCommand) -> Result<(), Failure> {
    let store = store.as_ref();
    let actor = "cli";
    match cmd {
        KeysCommand::Create {
            name,
            credits,
            role,
            models,
            rate_limit_rpm,
            max_concurrent,
            expires,
        } => {
            let spec = KeySpec {
                name,
                credits,
                role,
                models,
                rate_limit_rpm,
                max_concurrent,
                expires_at: expires,
            };
            let (record, secret) = keys::create(store, spec, actor).await?;
            println!("{}", json_line(&KeyView::from(&record))?);
            println!("key: {secret}");
            eprintln!("Keep this key now: it is not stored and cannot be shown again.");
        }
        KeysCommand::List => {
            for key in store.keys().await? {
                println!("{}", json_line(&KeyView::from(&key))?);
            }
        }
        KeysCommand::Topup {
            id,
            credits,
            set,
            reason,
        } => {
            let change = if set {
                BalanceChange::Set(credits)
            } else {
                BalanceChange::Add(credits)
            };
            let balance = keys::change_credits(store, id, change, actor, reason).await?;
            println!("key {id}: {balance} credits");
        }
        KeysCommand::Revoke { id } => {
            let key = keys::revoke(store, id).await?;
            println!("{}", json_line(&KeyView::from(&key))?);
        }
    }
    Ok(())
}

async fn print_usage(
    store: SharedStore,
    key: Option<KeyId>,
    limit: u32,
    csv: bool,
) -> Result<(), Failure> {
    let rows = store
        .usage(
            key,
            PageRequest {
                limit,
                before: None,
            },
        )
        .await?;
    let format = if csv { Format::Csv } else { Format::Ndjson };
    if csv {
        println!("{}", export::CSV_HEADER);
    }
    for row in rows {
        println!("{}", export::line(row, format));
    }
    Ok(())
}

fn json_line<T: serde::Serialize>(value: &T) -> Result<String, String> {
    serde_json::to_string(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_keys_curl_line_uses_the_served_scheme() {
        let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let plain = first_key_message("tg_k", addr, None);
        assert!(
            plain.contains(
                "curl -X POST 'http://127.0.0.1:8000/generate?prompt=hello' -H 'x-api-key: tg_k'"
            ),
            "{plain}"
        );
        let tls = first_key_message("tg_k", addr, Some(Path::new("/etc/tollgate/cert.pem")));
        assert!(tls.contains("'https://127.0.0.1:8000/generate"), "{tls}");
        assert!(tls.contains("--cacert /etc/tollgate/cert.pem"), "{tls}");
    }
}
