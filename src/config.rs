//! Configuration: the only module that reads the process environment.
//!
//! Values come from the environment, after `.env` in the working directory
//! has been loaded into it (variables already set in the environment win).
//! Every other module receives a [`Config`]; tests build one directly or
//! through [`Config::from_lookup`] without touching the real environment.

use crate::credits::Credits;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A value that stops start-up, with the variable and value named.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}={value:?} is not valid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("could not read .env: {0}")]
    DotEnv(String),
}

/// Where balances and the usage ledger live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// Nothing is kept across restarts: tests and demos.
    Memory,
    /// An SQLite file, created if missing.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL; several gateways may share it.
    Postgres(String),
}

impl FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "memory" {
            Ok(DatabaseUrl::Memory)
        } else if let Some(path) = s.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err("sqlite:// needs a file path, e.g. sqlite://tollgate.db".into());
            }
            Ok(DatabaseUrl::Sqlite(PathBuf::from(path)))
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(DatabaseUrl::Postgres(s.to_string()))
        } else {
            Err("expected sqlite://PATH, postgres://... or memory".into())
        }
    }
}

/// Prices, in exact thousandths of a credit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pricing {
    pub per_request: Credits,
    pub per_1k_prompt_tokens: Credits,
    pub per_1k_completion_tokens: Credits,
    /// Completion tokens reserved when a request sets no limit of its own.
    pub default_reserved_tokens: u64,
}

impl Pricing {
    /// Whether tokens cost anything (then tollgate needs token counts).
    pub fn prices_tokens(&self) -> bool {
        self.per_1k_prompt_tokens.is_positive() || self.per_1k_completion_tokens.is_positive()
    }

    /// The cost of a request that used these tokens, rounded up to a
    /// thousandth of a credit.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> Credits {
        let micros = self.per_1k_prompt_tokens.per_1k_cost_micros(prompt_tokens)
            + self
                .per_1k_completion_tokens
                .per_1k_cost_micros(completion_tokens);
        self.per_request + Credits::from_micros_ceil(micros)
    }

    /// What is reserved before a request is forwarded: its price plus the
    /// completion tokens it may produce (SPEC §4).
    pub fn estimate(&self, max_completion_tokens: Option<u64>) -> Credits {
        if !self.prices_tokens() {
            return self.per_request;
        }
        let tokens = max_completion_tokens.unwrap_or(self.default_reserved_tokens);
        self.cost(0, tokens)
    }
}

/// Time limits on the way to Ollama and back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub stream_idle: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Everything tollgate can be told, with the defaults of SPEC §2.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub ollama_url: String,
    /// Keys granted from `API_KEY` / `API_KEYS`, with their initial credits.
    pub grants: Vec<(String, Credits)>,
    /// `API_KEY_CREDITS`: the grant of `API_KEY`, and the credits of the
    /// key created on a first start with no key anywhere.
    pub default_credits: Credits,
    pub admin_key: Option<String>,
    pub database_url: DatabaseUrl,
    pub default_model: String,
    pub pricing: Pricing,
    pub max_body_bytes: usize,
    pub max_tokens_per_request: Option<u64>,
    pub max_num_ctx: Option<u64>,
    pub timeouts: Timeouts,
    pub auth_failures_per_minute: u32,
    pub rate_limit_rpm: Option<u32>,
    pub max_concurrent_per_key: Option<u32>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub shutdown_grace: Duration,
    /// How long a client connection may take to send a request's head,
    /// from connecting or from the previous response; `None`: no limit.
    pub client_header_timeout: Option<Duration>,
    pub metrics_require_admin: bool,
    pub cors_origins: Vec<String>,
    pub log_format: LogFormat,
    /// `RUST_LOG`: which log lines to write (default `info`).
    pub log_filter: String,
}

impl Config {
    /// Loads `.env` (if present) into the environment, then reads it.
    pub fn from_env() -> Result<Config, ConfigError> {
        // The working directory's `.env` only: dotenvy's `dotenv()` would
        // also look in every parent directory, and take someone else's.
        match dotenvy::from_path(".env") {
            Ok(_) => {}
            Err(e) if e.not_found() => {}
            Err(e) => return Err(ConfigError::DotEnv(e.to_string())),
        }
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds a configuration from a map of variables: the defaults for
    /// every variable the map lacks.
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Config, ConfigError> {
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    /// Reads every variable through `lookup`; empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let vars = Vars { get: &get };

        let default_credits = vars.parse_or("API_KEY_CREDITS", Credits::whole(10))?;
        if default_credits < Credits::ZERO {
            return Err(invalid(
                "API_KEY_CREDITS",
                &default_credits.to_string(),
                "a grant cannot be negative".into(),
            ));
        }
        let mut grants = Vec::new();
        if let Some(key) = get("API_KEY") {
            grants.push((key.trim().to_string(), default_credits));
        }
        if let Some(list) = get("API_KEYS") {
            grants.extend(parse_key_list(&list)?);
        }

        let ollama_url = get("OLLAMA_URL")
            .unwrap_or_else(|| "http://127.0.0.1:11434".to_string())
            .trim_end_matches('/')
            .to_string();
        if !ollama_url.starts_with("http://") {
            return Err(invalid(
                "OLLAMA_URL",
                &ollama_url,
                "expected an http:// URL".into(),
            ));
        }

        let secs = |name: &'static str, default: u64| -> Result<Duration, ConfigError> {
            vars.parse_or(name, default).map(Duration::from_secs)
        };

        let config = Config {
            listen_addr: vars.parse_or("LISTEN_ADDR", SocketAddr::from(([127, 0, 0, 1], 8000)))?,
            ollama_url,
            grants,
            default_credits,
            admin_key: get("ADMIN_KEY").map(|k| k.trim().to_string()),
            database_url: vars.parse_or(
                "DATABASE_URL",
                DatabaseUrl::Sqlite(PathBuf::from("tollgate.db")),
            )?,
            default_model: get("DEFAULT_MODEL").unwrap_or_else(|| "mistral".into()),
            pricing: Pricing {
                per_request: vars.parse_or("CREDITS_PER_REQUEST", Credits::whole(1))?,
                per_1k_prompt_tokens: vars
                    .parse_or("CREDITS_PER_1K_PROMPT_TOKENS", Credits::ZERO)?,
                per_1k_completion_tokens: vars
                    .parse_or("CREDITS_PER_1K_COMPLETION_TOKENS", Credits::ZERO)?,
                default_reserved_tokens: vars.parse_or("DEFAULT_RESERVED_TOKENS", 512)?,
            },
            max_body_bytes: vars.parse_or("MAX_BODY_BYTES", 32 * 1024 * 1024)?,
            max_tokens_per_request: vars.parse_opt("MAX_TOKENS_PER_REQUEST")?,
            max_num_ctx: vars.parse_opt("MAX_NUM_CTX")?,
            timeouts: Timeouts {
                connect: secs("OLLAMA_CONNECT_TIMEOUT_SECS", 5)?,
                first_byte: secs("OLLAMA_FIRST_BYTE_TIMEOUT_SECS", 600)?,
                stream_idle: secs("STREAM_IDLE_TIMEOUT_SECS", 300)?,
            },
            auth_failures_per_minute: vars.parse_or("AUTH_FAILURES_PER_MINUTE", 30)?,
            rate_limit_rpm: vars.parse_opt("RATE_LIMIT_RPM")?,
            max_concurrent_per_key: vars.parse_opt("MAX_CONCURRENT_PER_KEY")?,
            tls_cert: get("TLS_CERT").map(PathBuf::from),
            tls_key: get("TLS_KEY").map(PathBuf::from),
            shutdown_grace: secs("SHUTDOWN_GRACE_SECS", 30)?,
            client_header_timeout: Some(secs("CLIENT_HEADER_TIMEOUT_SECS", 60)?)
                .filter(|limit| !limit.is_zero()),
            metrics_require_admin: vars.parse_or("METRICS_REQUIRE_ADMIN", false)?,
            cors_origins: get("CORS_ORIGINS")
                .map(|v| {
                    v.split(',')
                        .map(|o| o.trim().trim_end_matches('/').to_string())
                        .filter(|o| !o.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            log_filter: get("RUST_LOG").unwrap_or_else(|| "info".into()),
            log_format: match get("LOG_FORMAT").as_deref().map(str::trim) {
                None | Some("pretty") => LogFormat::Pretty,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    return Err(invalid(
                        "LOG_FORMAT",
                        other,
                        "expected pretty or json".into(),
                    ))
                }
            },
        };
        for (name, price) in [
            ("CREDITS_PER_REQUEST", config.pricing.per_request),
            (
                "CREDITS_PER_1K_PROMPT_TOKENS",
                config.pricing.per_1k_prompt_tokens,
            ),
            (
                "CREDITS_PER_1K_COMPLETION_TOKENS",
                config.pricing.per_1k_completion_tokens,
            ),
        ] {
            if price < Credits::ZERO {
                return Err(invalid(
                    name,
                    &price.to_string(),
                    "a price cannot be negative".into(),
                ));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log_filter) {
            return Err(invalid("RUST_LOG", &config.log_filter, e.to_string()));
        }
        match (&config.tls_cert, &config.tls_key) {
            (Some(cert), None) => {
                return Err(invalid(
                    "TLS_CERT",
                    &cert.display().to_string(),
                    "TLS_KEY is not set: TLS_CERT and TLS_KEY go together".into(),
                ))
            }
            (None, Some(key)) => {
                return Err(invalid(
                    "TLS_KEY",
                    &key.display().to_string(),
                    "TLS_CERT is not set: TLS_CERT and TLS_KEY go together".into(),
                ))
            }
            _ => {}
        }
        // 0 would not be a limit but a trap: a key blocked for good, a cap
        // that Ollama reads as "no limit", a time limit nothing meets.
        for (name, limit) in [
            ("RATE_LIMIT_RPM", config.rate_limit_rpm.map(u64::from)),
            (
                "MAX_CONCURRENT_PER_KEY",
                config.max_concurrent_per_key.map(u64::from),
            ),
            ("MAX_TOKENS_PER_REQUEST", config.max_tokens_per_request),
            ("MAX_BODY_BYTES", Some(config.max_body_bytes as u64)),
            (
                "AUTH_FAILURES_PER_MINUTE",
                Some(u64::from(config.auth_failures_per_minute)),
            ),
            ("MAX_NUM_CTX", config.max_num_ctx),
            (
                "OLLAMA_CONNECT_TIMEOUT_SECS",
                Some(config.timeouts.connect.as_secs()),
            ),
            (
                "OLLAMA_FIRST_BYTE_TIMEOUT_SECS",
                Some(config.timeouts.first_byte.as_secs()),
            ),
            (
                "STREAM_IDLE_TIMEOUT_SECS",
                Some(config.timeouts.stream_idle.as_secs()),
            ),
        ] {
            if limit == Some(0) {
                return Err(invalid(
                    name,
                    "0",
                    "a limit is at least 1 (unset, the default applies)".into(),
                ));
            }
        }
        if let Some(admin) = &config.admin_key {
            if config.grants.iter().any(|(key, _)| key == admin) {
                return Err(invalid(
                    "ADMIN_KEY",
                    "(not shown)",
                    "the same key is also in API_KEY or API_KEYS: give it one role".into(),
                ));
            }
        }
        Ok(config)
    }

    /// Whether `OLLAMA_URL` points back at tollgate's own listening address
    /// (a request would loop forever).
    pub fn ollama_is_self(&self) -> bool {
        let Some((host, port)) = host_and_port(&self.ollama_url) else {
            return false;
        };
        if port != self.listen_addr.port() {
            return false;
        }
        let listen_ip = self.listen_addr.ip();
        let is_local_name = host == "localhost";
        match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            Ok(ip) => ip == listen_ip || (listen_ip.is_unspecified() && ip.is_loopback()),
            Err(_) => is_local_name && (listen_ip.is_loopback() || listen_ip.is_unspecified()),
        }
    }

    /// Whether `OLLAMA_URL` names a loopback host.
    pub fn ollama_is_loopback(&self) -> bool {
        host_and_port(&self.ollama_url).is_some_and(|(host, _)| {
            host == "localhost"
                || host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        })
    }
}

fn host_and_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit('@').next()?;
    let default_port = if scheme == "https" { 443 } else { 80 };
    if let Some(end) = authority.find(']') {
        let host = &authority[..=end];
        let port = authority[end + 1..].strip_prefix(':').map(str::parse);
        return Some((host.to_string(), port.unwrap_or(Ok(default_port)).ok()?));
    }
    match authority.split_once(':') {
        Some((host, port)) => Some((host.to_ascii_lowercase(), port.parse().ok()?)),
        None => Some((authority.to_ascii_lowercase(), default_port)),
    }
}

/// `key=credits,key2=credits`. An error shows the list with its keys left
/// out: they are secrets.
fn parse_key_list(list: &str) -> Result<Vec<(String, Credits)>, ConfigError> {
    let entries: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .collect();
    // Nothing of an entry is echoed: a key may hold a `=`, and what
    // follows the last one may be part of it.
    let shown = "(not shown: it holds keys)";
    let refuse =
        |i: usize, reason: &str| invalid("API_KEYS", shown, format!("entry {}: {reason}", i + 1));
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let (key, credits) = entry
                .rsplit_once('=')
                .ok_or_else(|| refuse(i, "not key=credits"))?;
            let credits: Credits = credits
                .trim()
                .parse()
                .map_err(|e| refuse(i, &format!("credits {e}")))?;
            if credits < Credits::ZERO {
                return Err(refuse(i, "a grant cannot be negative"));
            }
            let key = key.trim();
            if key.is_empty() {
                return Err(refuse(i, "an empty key"));
            }
            Ok((key.to_string(), credits))
        })
        .collect()
}

fn invalid(var: &'static str, value: &str, reason: String) -> ConfigError {
    ConfigError::Invalid {
        var,
        value: value.to_string(),
        reason,
    }
}

struct Vars<'a> {
    get: &'a dyn Fn(&str) -> Option<String>,
}

impl Vars<'_> {
    fn parse_opt<T>(&self, var: &'static str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        (self.get)(var)
            .map(|v| {
                v.trim()
                    .parse()
                    .map_err(|e: T::Err| invalid(var, &v, e.to_string()))
            })
            .transpose()
    }

    fn parse_or<T>(&self, var: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        Ok(self.parse_opt(var)?.unwrap_or(default))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_map(&map)
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = config(&[]).unwrap();
        assert_eq!(c.listen_addr.to_string(), "127.0.0.1:8000");
        assert_eq!(c.ollama_url, "http://127.0.0.1:11434");
        assert_eq!(c.database_url, DatabaseUrl::Sqlite("tollgate.db".into()));
        assert_eq!(c.default_model, "mistral");
        assert_eq!(c.pricing.per_request, Credits::whole(1));
        assert_eq!(c.max_body_bytes, 32 * 1024 * 1024);
        assert_eq!(c.timeouts.first_byte, Duration::from_secs(600));
        assert_eq!(c.client_header_timeout, Some(Duration::from_secs(60)));
        assert!(c.grants.is_empty());
    }

    #[test]
    fn grants_come_from_api_key_and_api_keys() {
        let c = config(&[
            ("API_KEY", "abc"),
            ("API_KEYS", "k1=5, k2=0.5"),
            ("API_KEY_CREDITS", "3"),
        ])
        .unwrap();
        assert_eq!(
            c.grants,
            vec![
                ("abc".to_string(), Credits::whole(3)),
                ("k1".to_string(), Credits::whole(5)),
                ("k2".to_string(), Credits::from_millis(500)),
            ]
        );
        assert_eq!(
            config(&[("API_KEY", "abc")]).unwrap().grants[0].1,
            Credits::whole(10)
        );
    }

    /// Every variable tollgate reads is in `.env.example` and in the
    /// README's configuration table.
    #[test]
    fn every_variable_is_documented() {
        let asked = std::cell::RefCell::new(Vec::new());
        Config::from_lookup(|name| {
            asked.borrow_mut().push(name.to_string());
            // A key makes the read of its credits happen too.
            (name == "API_KEY").then(|| "abc".to_string())
        })
        .unwrap();
        let example = include_str!("../.env.example");
        let table: Vec<&str> = include_str!("../README.md")
            .lines()
            .filter(|l| l.starts_with("| `"))
            .collect();
        let asked = asked.into_inner();
        assert!(asked.len() > 20, "{asked:?}");
        for name in asked {
            assert!(
                example
                    .lines()
                    .any(|l| l.trim_start_matches("# ").starts_with(&format!("{name}="))),
                "{name} is not in .env.example"
            );
            assert!(
                table.iter().any(|l| l.contains(&format!("`{name}`"))),
                "{name} is not in the README's configuration table"
            );
        }
    }

    #[test]
    fn a_bad_value_names_the_variable_and_the_value() {
        for (var, value) in [
            ("LISTEN_ADDR", "nowhere"),
            ("CREDITS_PER_REQUEST", "1.2345"),
            ("CREDITS_PER_REQUEST", "-1"),
            ("RATE_LIMIT_RPM", "0"),
            ("MAX_CONCURRENT_PER_KEY", "0"),
            ("MAX_TOKENS_PER_REQUEST", "0"),
            ("MAX_NUM_CTX", "0"),
            ("MAX_BODY_BYTES", "0"),
            ("AUTH_FAILURES_PER_MINUTE", "0"),
            ("OLLAMA_CONNECT_TIMEOUT_SECS", "0"),
            ("OLLAMA_FIRST_BYTE_TIMEOUT_SECS", "0"),
            ("STREAM_IDLE_TIMEOUT_SECS", "0"),
            ("TLS_CERT", "/etc/cert.pem"),
            ("TLS_KEY", "/etc/key.pem"),
            ("DATABASE_URL", "mysql://x"),
            ("MAX_BODY_BYTES", "lots"),
            ("LOG_FORMAT", "xml"),
            ("OLLAMA_URL", "127.0.0.1:11434"),
            ("OLLAMA_URL", "https://127.0.0.1:11434"),
            ("METRICS_REQUIRE_ADMIN", "perhaps"),
            ("RUST_LOG", "tollgate=loud"),
        ] {
            let err = config(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(var), "{err}");
            assert!(err.contains(value), "{err}");
        }
    }

    /// The keys in `API_KEYS` are secrets: an error names the entry, not
    /// the key.
    #[test]
    fn a_bad_key_list_is_reported_without_its_keys() {
        for (list, entry) in [
            ("supersecret1=5,oops", "entry 2"),
            ("supersecret1=5,oops=many", "entry 2"),
            ("supersecret1=-5", "entry 1"),
            ("=5", "entry 1"),
        ] {
            let err = config(&[("API_KEYS", list)]).unwrap_err().to_string();
            assert!(err.contains("API_KEYS") && err.contains(entry), "{err}");
            assert!(
                !err.contains("supersecret1") && !err.contains("oops="),
                "{err}"
            );
        }
        let err = config(&[("API_KEYS", "a=1,team=Zx9secret")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("entry 2") && !err.contains("Zx9secret"),
            "{err}"
        );
    }

    #[test]
    fn one_key_has_one_role() {
        let err = config(&[("ADMIN_KEY", "k-123"), ("API_KEYS", "other=1,k-123=5")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("ADMIN_KEY") && !err.contains("k-123"), "{err}");
        let err = config(&[("API_KEY", "k"), ("API_KEY_CREDITS", "-5")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("API_KEY_CREDITS") && err.contains("-5"),
            "{err}"
        );
        assert!(config(&[("ADMIN_KEY", "same"), ("API_KEY", "same")]).is_err());
        assert!(config(&[("ADMIN_KEY", "a"), ("API_KEY", "b")]).is_ok());
    }

    #[test]
    fn detects_ollama_url_pointing_at_tollgate_itself() {
        let looped = |listen: &str, url: &str| {
            config(&[("LISTEN_ADDR", listen), ("OLLAMA_URL", url)])
                .unwrap()
                .ollama_is_self()
        };
        assert!(looped("127.0.0.1:8000", "http://127.0.0.1:8000"));
        assert!(looped("127.0.0.1:8000", "http://localhost:8000/"));
        assert!(looped("0.0.0.0:8000", "http://127.0.0.1:8000"));
        assert!(!looped("127.0.0.1:8000", "http://127.0.0.1:11434"));
        assert!(!looped("127.0.0.1:443", "http://127.0.0.1"));
    }

    #[test]
    fn token_pricing_rounds_up_and_estimates_the_reserve() {
        let p = Pricing {
            per_request: Credits::whole(1),
            per_1k_prompt_tokens: Credits::from_millis(500),
            per_1k_completion_tokens: Credits::whole(2),
            default_reserved_tokens: 512,
        };
        // 1 + 10*0.0005 + 3*0.002 = 1.011
        assert_eq!(p.cost(10, 3), Credits::from_millis(1011));
        // 1 + 1*0.0005 = 1.0005 -> rounded up to 1.001
        assert_eq!(p.cost(1, 0), Credits::from_millis(1001));
        assert_eq!(p.estimate(None), Credits::from_millis(1000 + 1024));
        assert_eq!(p.estimate(Some(100)), Credits::from_millis(1200));
        let flat = Pricing {
            per_1k_prompt_tokens: Credits::ZERO,
            per_1k_completion_tokens: Credits::ZERO,
            ..p
        };
        assert_eq!(flat.estimate(Some(100_000)), Credits::whole(1));
    }
}
