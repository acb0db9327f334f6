//! The benchmark of issues 3 and 5: tollgate (memory, SQLite and
//! PostgreSQL stores), nginx as a plain reverse proxy with a key check, and
//! a direct call, all in front of the same fast fake Ollama and driven by
//! the same load generator, in interleaved rounds.
//!
//! ```text
//! cargo build --release && cargo run --release --example bench -- [--quick]
//! ```
//!
//! Options:
//!
//! - `--quick`: two short rounds, a smoke test (figures are rough);
//! - `--rounds N`: rounds (default 5);
//! - `--only a,b`: only these targets (`direct`, `nginx`, `hyper-floor`,
//!   `tollgate-memory`, `tollgate-sqlite`, `tollgate-postgres`; and
//!   `hyper-floor-ledger`, `hyper-floor-journal` and
//!   `hyper-floor-journal-sqlite`, the floor with the least durable ledger
//!   in SQLite, in a plain file, or in both, and `hyper-floor-axum`, the
//!   floor behind an axum router, run only when named here);
//! - `--scenarios a,b`: only these scenarios (`rss`, `saturation`, `fixed`,
//!   `stream`, `paced`);
//! - `--out FILE`: also write the report (markdown) to FILE;
//! - `--tollgate PATH`: the tollgate binary (default: `tollgate` next to
//!   this example's directory, i.e. `target/release/tollgate`);
//! - `--client-threads N`, `--fake-threads N`: tokio worker threads of the
//!   load generator and of the fake (default 1 and 1: the lightest harness,
//!   which leaves the most of the shared cores to the proxy under test);
//! - `--keys N`: spread the load over N API keys (connection `i` uses key
//!   `i mod N`; default 1, a single client's key);
//! - `--tollgate-env NAME=VALUE` (repeatable): extra environment for every
//!   tollgate started (experiments, e.g. `MALLOC_ARENA_MAX=1`);
//! - `--fake-only CHUNKS,PACING_MS`: only serve the fake (streams of CHUNKS
//!   chunks, PACING_MS apart) and print its address, for profiling by hand.
//!
//! PostgreSQL: `TOLLGATE_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); a fresh schema is created
//! and dropped at the end. nginx: used when installed, skipped otherwise.
//! Nothing is sent anywhere but 127.0.0.1.
//!
//! See BENCHMARKS.md for what each scenario measures and the figures.

#[path = "bench/fake.rs"]
mod fake;
#[path = "bench/load.rs"]
mod load;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/targets.rs"]
mod targets;

use fake::Fake;
use load::{Call, Errors};
use report::{fmt, percentile_ms, table, Results, Row};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use targets::{Kind, Running, Spec};

const SAT_CONNS: usize = 32;
const FIXED_RATE: f64 = 1000.0;
const FIXED_CONNS: usize = 32;
const STREAM_CHUNKS: usize = 64;
const STREAM_CONNS: usize = 32;
const PACED_CHUNKS: usize = 32;
const PACING: Duration = Duration::from_millis(20);
const PACED_CONNS: usize = 64;
const RSS_STREAMS: usize = 1000;

/// The target the issues' targets are about: tollgate with its default
/// durable store.
const DEFAULT: &str = "tollgate-sqlite";

const SCENARIOS: [&str; 5] = ["rss", "saturation", "fixed", "stream", "paced"];

struct Opts {
    quick: bool,
    rounds: usize,
    only: Option<Vec<String>>,
    scenarios: Vec<String>,
    out: Option<PathBuf>,
    tollgate: Option<PathBuf>,
    client_threads: usize,
    fake_threads: usize,
    /// API keys to spread the load over.
    keys: usize,
    /// Extra environment for tollgate.
    tollgate_env: Vec<(String, String)>,
    /// Only serve the fake (streams of this many chunks, this far apart).
    fake_only: Option<(usize, Duration)>,
}

/// Warm-up and measured time of each scenario.
struct Plan {
    saturation: (Duration, Duration),
    fixed: (Duration, Duration),
    stream: (Duration, Duration),
    paced: (Duration, Duration),
}

fn parse_args() -> Result<Opts, String> {
    let mut opts = Opts {
        quick: false,
        rounds: 0,
        only: None,
        scenarios: SCENARIOS.iter().map(|s| s.to_string()).collect(),
        out: None,
        tollgate: None,
        client_threads: 1,
        fake_threads: 1,
        fake_only: None,
        keys: 1,
        tollgate_env: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    let list = |v: String| v.split(',').map(|s| s.trim().to_string()).collect();
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--quick" => opts.quick = true,
            "--rounds" => opts.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--only" => opts.only = Some(list(value()?)),
            "--scenarios" => opts.scenarios = list(value()?),
            "--out" => opts.out = Some(value()?.into()),
            "--tollgate" => opts.tollgate = Some(value()?.into()),
            "--client-threads" => {
                opts.client_threads = value()?.parse().map_err(|e| format!("{arg}: {e}"))?
            }
            "--fake-threads" => {
                opts.fake_threads = value()?.parse().map_err(|e| format!("{arg}: {e}"))?
            }
            "--tollgate-env" => {
                let v = value()?;
                let (k, val) = v.split_once('=').ok_or(format!("{arg} wants NAME=VALUE"))?;
                opts.tollgate_env.push((k.to_string(), val.to_string()));
            }
            "--keys" => opts.keys = value()?.parse().map_err(|e| format!("{arg}: {e}"))?,
            "--fake-only" => {
                let v = value()?;
                let (chunks, pacing) = v.split_once(',').unwrap_or((&v, "0"));
                let chunks = chunks.parse().map_err(|e| format!("{arg}: {e}"))?;
                let pacing = pacing.parse().map_err(|e| format!("{arg}: {e}"))?;
                opts.fake_only = Some((chunks, Duration::from_millis(pacing)));
            }
            "-h" | "--help" => {
                return Err("usage: cargo run --release --example bench -- [--quick] \
                     [--rounds N] [--only t1,t2] [--scenarios s1,s2] [--out FILE] \
                     [--tollgate PATH] [--client-threads N] [--fake-threads N] \
                     [--keys N] [--tollgate-env NAME=VALUE] [--fake-only CHUNKS,PACING_MS]"
                    .into())
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if opts.rounds == 0 {
        opts.rounds = if opts.quick { 2 } else { 5 };
    }
    if let Some(s) = opts
        .scenarios
        .iter()
        .find(|s| !SCENARIOS.contains(&s.as_str()))
    {
        return Err(format!("unknown scenario {s:?}"));
    }
    Ok(opts)
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    load::set_keys(opts.keys);
    targets::set_tollgate_env(opts.tollgate_env.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.client_threads)
        .thread_name("load")
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(opts))
}

async fn run(opts: Opts) -> ExitCode {
    if let Some((chunks, pacing)) = opts.fake_only {
        // For profiling by hand: the fake alone, until interrupted.
        let fake = match Fake::start(opts.fake_threads) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("bench: cannot start the fake: {e}");
                return ExitCode::FAILURE;
            }
        };
        fake.set_stream(chunks, pacing, false);
        println!("fake Ollama on http://{}", fake.addr());
        let _ = tokio::signal::ctrl_c().await;
        return ExitCode::SUCCESS;
    }
    let ms = Duration::from_millis;
    let plan = if opts.quick {
        Plan {
            saturation: (ms(300), ms(1000)),
            fixed: (ms(500), ms(1500)),
            stream: (ms(300), ms(1000)),
            paced: (ms(700), ms(1500)),
        }
    } else {
        Plan {
            saturation: (ms(1000), ms(4000)),
            fixed: (ms(1000), ms(5000)),
            stream: (ms(1000), ms(4000)),
            paced: (ms(1000), ms(4000)),
        }
    };

    let binary = match tollgate_binary(&opts) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    // Ctrl-C or SIGTERM: stop the processes started, then exit.
    tokio::spawn(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
        eprintln!("bench: interrupted; stopping the targets");
        targets::stop_all();
        if let Some((base, schema)) = targets::PG_SCHEMA.get() {
            let drop = targets::drop_postgres_schema(base, schema);
            let _ = tokio::time::timeout(Duration::from_secs(3), drop).await;
        }
        std::process::exit(130);
    });
    let mut notes = Vec::new();
    if let Some(newer) = newer_source(&binary) {
        let note = format!(
            "WARNING: {} is older than {} — run `cargo build --release` first",
            binary.display(),
            newer.display()
        );
        eprintln!("bench: {note}");
        notes.push(note);
    }
    let load_before = loadavg();
    let started = Instant::now();
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();

    let fake = match Fake::start(opts.fake_threads) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("bench: cannot start the fake: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = tempfile::tempdir().expect("temp dir");

    let mut specs = vec![Spec {
        name: "direct".into(),
        kind: Kind::Direct,
    }];
    let mut nginx_version = None;
    match targets::find_nginx() {
        Some(binary) => {
            nginx_version = Some(targets::nginx_version(&binary));
            specs.push(Spec {
                name: "nginx".into(),
                kind: Kind::Nginx { binary },
            });
        }
        None => notes
            .push("nginx is not installed: skipped (apt-get install -y nginx-light)".to_string()),
    }
    match floor_binary() {
        Some(binary) => {
            specs.push(Spec {
                name: "hyper-floor".into(),
                kind: Kind::Floor {
                    binary: binary.clone(),
                    ledger: None,
                },
            });
            // Only when asked for by name: experiments, not targets of
            // the issues.
            let ledgers = [
                (
                    "hyper-floor-ledger",
                    dir.path().join("floor-ledger.db").display().to_string(),
                ),
                (
                    "hyper-floor-journal",
                    format!("journal:{}", dir.path().join("floor-journal").display()),
                ),
                (
                    "hyper-floor-journaled-writer",
                    format!(
                        "journaled-sqlite:{}",
                        dir.path().join("floor-journaled-writer").display()
                    ),
                ),
                (
                    "hyper-floor-journal-sqlite",
                    format!(
                        "journal+sqlite:{}",
                        dir.path().join("floor-journal-sqlite").display()
                    ),
                ),
                // Not a ledger: the floor behind an axum router.
                ("hyper-floor-axum", "axum".to_string()),
            ];
            for (name, ledger) in ledgers {
                if opts
                    .only
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|t| t == name))
                {
                    specs.push(Spec {
                        name: name.into(),
                        kind: Kind::Floor {
                            binary: binary.clone(),
                            ledger: Some(ledger),
                        },
                    });
                }
            }
        }
        None => notes.push(
            "the floor is not built: skipped (cargo build --release --example floor)".to_string(),
        ),
    }
    specs.push(Spec {
        name: "tollgate-memory".into(),
        kind: Kind::Tollgate {
            binary: binary.clone(),
            database_url: "memory".into(),
        },
    });
    specs.push(Spec {
        name: "tollgate-sqlite".into(),
        kind: Kind::Tollgate {
            binary: binary.clone(),
            database_url: format!("sqlite://{}", dir.path().join("bench.db").display()),
        },
    });
    let pg_base = std::env::var("TOLLGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let wants_pg = opts
        .only
        .as_ref()
        .is_none_or(|o| o.iter().any(|t| t == "tollgate-postgres"));
    let mut pg_schema = None;
    if wants_pg {
        match targets::postgres_schema(&pg_base).await {
            Ok((url, schema)) => {
                pg_schema = Some(schema);
                specs.push(Spec {
                    name: "tollgate-postgres".into(),
                    kind: Kind::Tollgate {
                        binary: binary.clone(),
                        database_url: url,
                    },
                });
            }
            Err(e) => notes.push(format!("PostgreSQL skipped: {e}")),
        }
    }
    if let Some(only) = &opts.only {
        specs.retain(|s| only.contains(&s.name));
    }
    if specs.is_empty() {
        eprintln!("bench: no target left to run");
        return ExitCode::from(2);
    }
    for note in &notes {
        eprintln!("bench: {note}");
    }
    eprintln!(
        "bench: {} round(s) over {}; fake on {}",
        opts.rounds,
        specs
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        fake.addr()
    );

    let ticks = targets::clock_ticks_per_sec() as f64;
    let mut results = Results::default();
    for round in 0..opts.rounds {
        eprintln!("bench: round {} of {}", round + 1, opts.rounds);
        // Fresh processes every round: the memory scenario comes first and
        // sees a process that has only been warmed up.
        fake.set_stream(STREAM_CHUNKS, Duration::ZERO, false);
        let mut running: Vec<(Spec, Running)> = Vec::new();
        for spec in &specs {
            match targets::start(spec, fake.addr(), dir.path()).await {
                Ok(r) => {
                    eprintln!(
                        "  started {} on {} (pids {:?})",
                        spec.name,
                        r.addr,
                        r.pids()
                    );
                    let warm = Call::nonstream(r.addr, fake::nonstream_body());
                    let w = load::closed_loop(&warm, 8, Duration::ZERO, ms(300)).await;
                    if w.errors.count > 0 {
                        failed_everywhere(&mut results, &opts, spec, round, &w.errors);
                        continue;
                    }
                    running.push((spec.clone(), r));
                }
                Err(e) => {
                    let errors = Errors {
                        count: 1,
                        samples: vec![e],
                    };
                    failed_everywhere(&mut results, &opts, spec, round, &errors);
                }
            }
        }
        // Round-robin, starting one further each round.
        let n = running.len();
        if n > 0 {
            running.rotate_left(round % n);
        }
        for scenario in &opts.scenarios {
            for (spec, target) in &running {
                let row = match scenario.as_str() {
                    "rss" if matches!(spec.kind, Kind::Direct) => continue,
                    "rss" => rss(&fake, target, spec, round).await,
                    "saturation" => saturation(target, spec, round, &plan, ticks).await,
                    "fixed" => fixed(target, spec, round, &plan).await,
                    "stream" => stream(&fake, target, spec, round, &plan, ticks).await,
                    "paced" => paced(&fake, target, spec, round, &plan).await,
                    _ => unreachable!("scenarios are checked"),
                };
                eprintln!("  {}", describe(&row));
                results.rows.push(row);
            }
        }
        for (_, target) in running {
            target.stop();
        }
    }
    if let Some(schema) = &pg_schema {
        targets::drop_postgres_schema(&pg_base, schema).await;
    }

    let context = Context {
        date,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        rounds: opts.rounds,
        quick: opts.quick,
        plan,
        notes,
        load_before,
        load_after: loadavg(),
        elapsed: started.elapsed(),
        nginx_version,
        targets: specs.iter().map(|s| s.name.clone()).collect(),
        client_threads: opts.client_threads,
        fake_threads: opts.fake_threads,
        keys: opts.keys,
        tollgate: describe_tollgate(&binary),
        tollgate_env: opts.tollgate_env.clone(),
    };
    let text = write_report(&results, &context);
    println!("{text}");
    if let Some(out) = &opts.out {
        if let Err(e) = std::fs::write(out, &text) {
            eprintln!("bench: cannot write {}: {e}", out.display());
        }
    }
    if results.failures().is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("bench: some runs failed (see the report)");
        ExitCode::FAILURE
    }
}

fn failed_everywhere(results: &mut Results, opts: &Opts, spec: &Spec, round: usize, e: &Errors) {
    eprintln!("  {}: {}", spec.name, e.samples.join("; "));
    for scenario in SCENARIOS {
        if opts.scenarios.iter().any(|s| s == scenario) {
            results.rows.push(Row {
                scenario,
                target: spec.name.clone(),
                round,
                values: BTreeMap::new(),
                failed: Some(format!(
                    "did not start or warm up: {}",
                    e.samples.join("; ")
                )),
            });
        }
    }
}

fn row(scenario: &'static str, spec: &Spec, round: usize, errors: &Errors) -> Row {
    Row {
        scenario,
        target: spec.name.clone(),
        round,
        values: BTreeMap::new(),
        failed: (errors.count > 0).then(|| {
            format!(
                "{} bad responses, e.g. {}",
                errors.count,
                errors.samples.join("; ")
            )
        }),
    }
}

fn describe(row: &Row) -> String {
    let values: Vec<String> = row
        .values
        .iter()
        .map(|(k, v)| format!("{k}={v:.3}"))
        .collect();
    format!(
        "{:<10} {:<18} {}{}",
        row.scenario,
        row.target,
        values.join(" "),
        row.failed
            .as_ref()
            .map(|f| format!(" FAILED: {f}"))
            .unwrap_or_default()
    )
}

/// Runs `work` while reading the CPU time the target's processes spend
/// during the measured window; seconds of CPU.
async fn with_cpu<T>(
    target: &Running,
    warmup: Duration,
    measure: Duration,
    ticks: f64,
    work: impl std::future::Future<Output = T>,
) -> (T, Option<f64>) {
    let pids = target.pids();
    let cpu = async {
        if pids.is_empty() {
            return None;
        }
        tokio::time::sleep(warmup).await;
        let before = targets::cpu_ticks(&pids);
        tokio::time::sleep(measure).await;
        let after = targets::cpu_ticks(&pids);
        Some((after.saturating_sub(before)) as f64 / ticks)
    };
    tokio::join!(work, cpu)
}

async fn saturation(target: &Running, spec: &Spec, round: usize, plan: &Plan, ticks: f64) -> Row {
    let call = Call::nonstream(target.addr, fake::nonstream_body());
    let (warmup, measure) = plan.saturation;
    let work = load::closed_loop(&call, SAT_CONNS, warmup, measure);
    let (mut r, cpu) = with_cpu(target, warmup, measure, ticks, work).await;
    let mut row = row("saturation", spec, round, &r.errors);
    row.values.insert("rps", r.rate());
    row.values
        .insert("p50_ms", percentile_ms(&mut r.latencies, 50.0));
    row.values
        .insert("p99_ms", percentile_ms(&mut r.latencies, 99.0));
    if let Some(cpu) = cpu {
        row.values
            .insert("cpu_us", cpu * 1e6 / r.completed.max(1) as f64);
        row.values
            .insert("cpu_pct", cpu * 100.0 / measure.as_secs_f64());
    }
    row
}

async fn fixed(target: &Running, spec: &Spec, round: usize, plan: &Plan) -> Row {
    let call = Call::nonstream(target.addr, fake::nonstream_body());
    let (warmup, measure) = plan.fixed;
    let mut r = load::open_loop(&call, FIXED_RATE, FIXED_CONNS, warmup, measure).await;
    let mut row = row("fixed", spec, round, &r.errors);
    row.values.insert("rps", r.rate());
    row.values
        .insert("p50_ms", percentile_ms(&mut r.latencies, 50.0));
    row.values
        .insert("p99_ms", percentile_ms(&mut r.latencies, 99.0));
    row.values
        .insert("p999_ms", percentile_ms(&mut r.latencies, 99.9));
    row.values.insert("queued", r.queued as f64);
    row.values.insert("unsent", r.unsent as f64);
    row.values
        .insert("timer_p50_ms", percentile_ms(&mut r.timer_lateness, 50.0));
    row.values
        .insert("timer_p99_ms", percentile_ms(&mut r.timer_lateness, 99.0));
    row
}

async fn stream(
    fake: &Fake,
    target: &Running,
    spec: &Spec,
    round: usize,
    plan: &Plan,
    ticks: f64,
) -> Row {
    fake.set_stream(STREAM_CHUNKS, Duration::ZERO, false);
    let call = Call::stream(target.addr, fake::stream_body(STREAM_CHUNKS));
    let (warmup, measure) = plan.stream;
    let work = load::closed_loop(&call, STREAM_CONNS, warmup, measure);
    let (mut r, cpu) = with_cpu(target, warmup, measure, ticks, work).await;
    let mut row = row("stream", spec, round, &r.errors);
    row.values.insert("rps", r.rate());
    row.values
        .insert("p50_ms", percentile_ms(&mut r.latencies, 50.0));
    if let Some(cpu) = cpu {
        row.values
            .insert("cpu_us", cpu * 1e6 / r.completed.max(1) as f64);
    }
    row
}

async fn paced(fake: &Fake, target: &Running, spec: &Spec, round: usize, plan: &Plan) -> Row {
    fake.set_stream(PACED_CHUNKS, PACING, false);
    let call = Call::stream(target.addr, fake::stream_body(PACED_CHUNKS));
    let (warmup, measure) = plan.paced;
    // Spread the streams' starts over one stream's duration: 64 streams
    // in flight at any time, not 64 arriving in the same millisecond.
    let stagger = PACING * (PACED_CHUNKS as u32 + 1) / PACED_CONNS as u32;
    let mut r = load::stream_loop(&call, PACED_CONNS, stagger, warmup, measure).await;
    fake.set_stream(STREAM_CHUNKS, Duration::ZERO, false);
    let mut row = row("paced", spec, round, &r.errors);
    let pacing_ms = PACING.as_secs_f64() * 1e3;
    row.values.insert("streams", r.ttfc.len() as f64);
    row.values
        .insert("ttfc_p50_ms", percentile_ms(&mut r.ttfc, 50.0));
    row.values
        .insert("ttfc_p99_ms", percentile_ms(&mut r.ttfc, 99.0));
    row.values.insert(
        "gap_p99_extra_ms",
        percentile_ms(&mut r.gaps, 99.0) - pacing_ms,
    );
    row.values.insert(
        "gap_max_extra_ms",
        percentile_ms(&mut r.gaps, 100.0) - pacing_ms,
    );
    row.values.insert("held_back", r.coalesced as f64);
    if row.failed.is_none() && r.ttfc.is_empty() {
        row.failed = Some("no stream completed in the window".into());
    }
    row
}

async fn rss(fake: &Fake, target: &Running, spec: &Spec, round: usize) -> Row {
    fake.set_stream(4, Duration::ZERO, true);
    let call = Call::stream(target.addr, fake::stream_body(4));
    let held = load::hold_streams(&call, RSS_STREAMS, 64);
    let all_open = held.wait_all_open(Duration::from_secs(60)).await;
    // Every stream must also be open at the fake when memory is read.
    let deadline = Instant::now() + Duration::from_secs(10);
    while all_open && fake.open_streams() < RSS_STREAMS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let open_before = fake.open_streams();
    let memory = targets::memory(&target.pids());
    let open_after = fake.open_streams();
    fake.release();
    let errors = held.finish().await;
    fake.set_stream(STREAM_CHUNKS, Duration::ZERO, false);
    let mut row = row("rss", spec, round, &errors);
    let mib = |kib: u64| kib as f64 / 1024.0;
    row.values.insert("rss_mib", mib(memory.rss_kib));
    row.values.insert("hwm_mib", mib(memory.hwm_kib));
    row.values.insert("pss_mib", mib(memory.pss_kib));
    row.values
        .insert("open", open_after.min(open_before) as f64);
    if row.failed.is_none()
        && (!all_open || open_before != RSS_STREAMS || open_after != RSS_STREAMS)
    {
        row.failed = Some(format!(
            "streams open at the fake when memory was read: {open_before}/{open_after} of {RSS_STREAMS}"
        ));
    }
    row
}

fn tollgate_binary(opts: &Opts) -> Result<PathBuf, String> {
    let binary = match &opts.tollgate {
        Some(b) => b.clone(),
        None => {
            // target/<profile>/examples/bench -> target/<profile>/tollgate
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .ok_or("cannot locate the target directory")?;
            if !profile_dir.ends_with("release") {
                eprintln!("bench: not a release build; use `cargo run --release --example bench`");
            }
            profile_dir.join("tollgate")
        }
    };
    if !binary.is_file() {
        return Err(format!(
            "{} not found: run `cargo build --release` first",
            binary.display()
        ));
    }
    Ok(binary)
}

/// The floor proxy (`examples/floor.rs`), built next to this example.
fn floor_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.join("floor")).filter(|p| p.is_file())
}

/// A source file newer than the binary, if any.
fn newer_source(binary: &Path) -> Option<PathBuf> {
    let built = std::fs::metadata(binary).ok()?.modified().ok()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stack = vec![root.join("src"), root.join("Cargo.toml")];
    while let Some(p) = stack.pop() {
        let meta = std::fs::metadata(&p).ok()?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&p).ok()?.flatten() {
                stack.push(entry.path());
            }
        } else if meta.modified().ok()? > built {
            return Some(p);
        }
    }
    None
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

struct Context {
    date: String,
    command: String,
    rounds: usize,
    quick: bool,
    plan: Plan,
    notes: Vec<String>,
    load_before: String,
    load_after: String,
    elapsed: Duration,
    nginx_version: Option<String>,
    targets: Vec<String>,
    client_threads: usize,
    fake_threads: usize,
    keys: usize,
    tollgate: String,
    tollgate_env: Vec<(String, String)>,
}

/// What was measured: the binary, its build time and the source state.
fn describe_tollgate(binary: &Path) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let changed = git(&[
        "status",
        "--porcelain",
        "--",
        "src",
        "Cargo.toml",
        "migrations",
    ])
    .map_or(0, |s| s.lines().count());
    let built = std::fs::metadata(binary)
        .and_then(|m| m.modified())
        .ok()
        .map(|t| {
            time::OffsetDateTime::from(t)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        })
        .unwrap_or_default();
    // Named from the repository's root when it is the repository's own
    // build, so that a report pasted into BENCHMARKS.md names no machine.
    let shown = binary.strip_prefix(root).unwrap_or(binary);
    format!(
        "`{}` built {built} from commit {commit}{}",
        shown.display(),
        if changed > 0 {
            format!(" plus uncommitted changes to {changed} file(s) under src/, Cargo.toml, migrations/")
        } else {
            String::new()
        }
    )
}

fn write_report(results: &Results, cx: &Context) -> String {
    let mut out = String::new();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let secs = |d: Duration| format!("{:.1} s", d.as_secs_f64());
    let _ = writeln!(out, "## Run of {}\n", cx.date);
    let _ = writeln!(out, "- command: `{}`", cx.command);
    let _ = writeln!(
        out,
        "- {} round(s){}, targets round-robin within each round (starting one further each round), fresh processes every round; figures are the median over the rounds with (min..max); ratios and differences are taken within a round, then summarised",
        cx.rounds,
        if cx.quick { " (--quick: rough figures)" } else { "" }
    );
    let _ = writeln!(
        out,
        "- machine: {cores} cores ({}), kernel {}; the load generator ({} tokio worker thread(s)), the fake Ollama ({} thread(s)) and the proxy under test all share these cores",
        cpu_model(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        cx.client_threads,
        cx.fake_threads
    );
    let _ = writeln!(
        out,
        "- load average before: {}, after: {}; run took {}",
        cx.load_before,
        cx.load_after,
        secs(cx.elapsed)
    );
    let _ = writeln!(
        out,
        "- requests: `POST /api/chat` with the same body on every target, {}, each key granted {} credits (no 402 is ever measured); tollgate with `LOG_FORMAT=json RUST_LOG=warn`",
        if cx.keys == 1 {
            "one API key (`API_KEYS=key=credits`)".to_string()
        } else {
            format!("{} API keys, connection i using key i mod {}", cx.keys, cx.keys)
        },
        targets::CREDITS
    );
    let _ = writeln!(out, "- tollgate: {}", cx.tollgate);
    if !cx.tollgate_env.is_empty() {
        let vars: Vec<String> = cx
            .tollgate_env
            .iter()
            .map(|(k, v)| format!("`{k}={v}`"))
            .collect();
        let _ = writeln!(out, "- extra tollgate environment: {}", vars.join(" "));
    }
    if let Some(v) = &cx.nginx_version {
        let _ = writeln!(out, "- nginx: {v}");
    }
    let _ = writeln!(
        out,
        "- windows (warm-up + measured): saturation {} + {}, fixed rate {} + {}, streamed {} + {}, paced {} + {}",
        secs(cx.plan.saturation.0),
        secs(cx.plan.saturation.1),
        secs(cx.plan.fixed.0),
        secs(cx.plan.fixed.1),
        secs(cx.plan.stream.0),
        secs(cx.plan.stream.1),
        secs(cx.plan.paced.0),
        secs(cx.plan.paced.1)
    );
    for note in &cx.notes {
        let _ = writeln!(out, "- note: {note}");
    }
    out.push('\n');

    let has = |t: &str| cx.targets.iter().any(|x| x == t);
    let ratio = |a: f64, b: f64| a / b;
    let diff = |a: f64, b: f64| a - b;

    // Targets from the issues.
    let _ = writeln!(out, "### Targets from the issues\n");
    let mut rows = Vec::new();
    let mut check = |issue: &str,
                     what: &str,
                     s: Option<report::Summary>,
                     digits: usize,
                     ok: fn(f64) -> bool| {
        let verdict = match s {
            None => "not measured".to_string(),
            Some(s) if ok(s.median) => "met".to_string(),
            Some(_) => "**missed**".to_string(),
        };
        rows.push(vec![
            issue.to_string(),
            what.to_string(),
            fmt(s, digits),
            verdict,
        ]);
    };
    if has(DEFAULT) && has("nginx") {
        check(
            "#5",
            "non-stream throughput, tollgate-sqlite / nginx ≥ 0.9",
            results.paired("saturation", "rps", DEFAULT, "nginx", ratio),
            2,
            |m| m >= 0.9,
        );
        check(
            "#5",
            "streamed throughput (64 chunks), tollgate-sqlite / nginx ≥ 0.9",
            results.paired("stream", "rps", DEFAULT, "nginx", ratio),
            2,
            |m| m >= 0.9,
        );
    }
    if has(DEFAULT) && has("direct") {
        check(
            "#5",
            "added p50 latency at 1,000 req/s (tollgate-sqlite − direct) ≤ 0.3 ms",
            results.paired("fixed", "p50_ms", DEFAULT, "direct", diff),
            3,
            |m| m <= 0.3,
        );
        check(
            "#5",
            "added p99 latency at 1,000 req/s (tollgate-sqlite − direct) ≤ 1 ms",
            results.paired("fixed", "p99_ms", DEFAULT, "direct", diff),
            3,
            |m| m <= 1.0,
        );
        check(
            "#5",
            "added time to first chunk, p50 (tollgate-sqlite − direct) ≤ 1 ms",
            results.paired("paced", "ttfc_p50_ms", DEFAULT, "direct", diff),
            3,
            |m| m <= 1.0,
        );
        check(
            "#5",
            "added time to first chunk, p99 (tollgate-sqlite − direct) ≤ 1 ms",
            results.paired("paced", "ttfc_p99_ms", DEFAULT, "direct", diff),
            3,
            |m| m <= 1.0,
        );
    }
    if has(DEFAULT) {
        check(
            "#5",
            "no chunk held back: lines that arrived together with the previous one (tollgate-sqlite, all rounds) = 0",
            results.series("paced", DEFAULT, "held_back").map(|mut s| {
                s.median = results.total("paced", DEFAULT, "held_back");
                s
            }),
            0,
            |m| m == 0.0,
        );
    }
    if has(DEFAULT) && has("nginx") {
        check(
            "#5",
            "peak RSS (VmHWM) with 1,000 open streams, tollgate-sqlite / nginx (master + workers) ≤ 1",
            results.paired("rss", "hwm_mib", DEFAULT, "nginx", ratio),
            2,
            |m| m <= 1.0,
        );
    }
    if has(DEFAULT) && has("tollgate-memory") {
        check(
            "#3",
            "p50 at 1,000 req/s, sqlite − memory ≤ 0.2 ms",
            results.paired("fixed", "p50_ms", DEFAULT, "tollgate-memory", diff),
            3,
            |m| m <= 0.2,
        );
    }
    if has("tollgate-postgres") && has("tollgate-memory") {
        check(
            "#3",
            "p50 at 1,000 req/s, postgres − memory ≤ 1 ms",
            results.paired(
                "fixed",
                "p50_ms",
                "tollgate-postgres",
                "tollgate-memory",
                diff,
            ),
            3,
            |m| m <= 1.0,
        );
    }
    if has(DEFAULT) && has("tollgate-memory") {
        check(
            "#3",
            "saturation throughput, sqlite / memory ≥ 0.9",
            results.paired("saturation", "rps", DEFAULT, "tollgate-memory", ratio),
            2,
            |m| m >= 0.9,
        );
    }
    table(&mut out, &["issue", "target", "measured", "verdict"], &rows);

    // Scenario tables.
    let per_target = |f: &dyn Fn(&str) -> Vec<String>| -> Vec<Vec<String>> {
        cx.targets
            .iter()
            .map(|t| {
                let mut row = vec![t.clone()];
                row.extend(f(t));
                row
            })
            .collect()
    };

    let _ = writeln!(
        out,
        "### Non-stream chat at saturation ({SAT_CONNS} connections)\n"
    );
    let rows = per_target(&|t| {
        vec![
            fmt(results.series("saturation", t, "rps"), 0),
            fmt(results.series("saturation", t, "p50_ms"), 3),
            fmt(results.series("saturation", t, "p99_ms"), 3),
            fmt(results.series("saturation", t, "cpu_us"), 1),
            fmt(results.series("saturation", t, "cpu_pct"), 0),
        ]
    });
    table(
        &mut out,
        &[
            "target",
            "requests/s",
            "p50 ms",
            "p99 ms",
            "proxy CPU µs/request",
            "proxy CPU %",
        ],
        &rows,
    );
    let mut ratios = Vec::new();
    for (a, b) in [
        (DEFAULT, "nginx"),
        ("tollgate-memory", "nginx"),
        (DEFAULT, "tollgate-memory"),
        ("tollgate-postgres", "tollgate-memory"),
        ("hyper-floor", "nginx"),
        ("tollgate-memory", "hyper-floor"),
        ("hyper-floor-ledger", "nginx"),
        ("hyper-floor-ledger", "hyper-floor"),
        ("hyper-floor-journal", "nginx"),
        ("hyper-floor-journal", "hyper-floor"),
        ("hyper-floor-journal-sqlite", "nginx"),
        ("hyper-floor-journal-sqlite", "hyper-floor"),
        ("hyper-floor-journaled-writer", "hyper-floor"),
        ("hyper-floor-axum", "nginx"),
        ("hyper-floor-axum", "hyper-floor"),
        ("tollgate-memory", "hyper-floor-axum"),
        (DEFAULT, "hyper-floor-ledger"),
        ("nginx", "direct"),
    ] {
        if has(a) && has(b) {
            ratios.push(vec![
                format!("{a} / {b}"),
                fmt(results.paired("saturation", "rps", a, b, ratio), 2),
                fmt(results.paired("stream", "rps", a, b, ratio), 2),
            ]);
        }
    }
    let _ = writeln!(out, "Throughput ratios, same round:\n");
    table(
        &mut out,
        &["ratio", "non-stream", "streamed (64 chunks)"],
        &ratios,
    );

    let _ = writeln!(
        out,
        "### Non-stream chat at a fixed {FIXED_RATE} requests/s ({FIXED_CONNS} connections, latency from the intended send time)\n"
    );
    let rows = per_target(&|t| {
        vec![
            fmt(results.series("fixed", t, "rps"), 0),
            fmt(results.series("fixed", t, "p50_ms"), 3),
            fmt(results.series("fixed", t, "p99_ms"), 3),
            fmt(results.series("fixed", t, "p999_ms"), 3),
            fmt(results.paired("fixed", "p50_ms", t, "direct", diff), 3),
            fmt(results.paired("fixed", "p99_ms", t, "direct", diff), 3),
            fmt(results.series("fixed", t, "queued"), 0),
            fmt(results.series("fixed", t, "unsent"), 0),
        ]
    });
    table(
        &mut out,
        &[
            "target",
            "achieved req/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "added p50 ms",
            "added p99 ms",
            "sends delayed by a busy connection",
            "not sent by the end (behind schedule)",
        ],
        &rows,
    );
    for t in &cx.targets {
        if let Some(unsent) = results.series("fixed", t, "unsent").filter(|u| u.max > 0.0) {
            let _ = writeln!(
                out,
                "**{t} could not sustain {FIXED_RATE} requests/s**: up to {:.0} requests per round were still unsent when the window closed; their latency counts as the time they had waited by then (a lower bound), so its percentiles are lower bounds too.\n",
                unsent.max
            );
        }
    }
    let _ = writeln!(
        out,
        "Load generator's own timer lateness on idle connections (not counted in the latencies above): p50 {} ms, p99 {} ms (direct target).\n",
        fmt(results.series("fixed", "direct", "timer_p50_ms"), 3),
        fmt(results.series("fixed", "direct", "timer_p99_ms"), 3)
    );

    let _ = writeln!(
        out,
        "### Streamed chat, {STREAM_CHUNKS} chunks, {STREAM_CONNS} connections\n"
    );
    let rows = per_target(&|t| {
        vec![
            fmt(results.series("stream", t, "rps"), 0),
            fmt(results.series("stream", t, "p50_ms"), 3),
            fmt(results.series("stream", t, "cpu_us"), 1),
        ]
    });
    table(
        &mut out,
        &[
            "target",
            "streams/s",
            "p50 ms (whole stream)",
            "proxy CPU µs/stream",
        ],
        &rows,
    );

    let _ = writeln!(
        out,
        "### Paced streams: {PACED_CHUNKS} chunks {} ms apart, {PACED_CONNS} concurrent\n",
        PACING.as_millis()
    );
    let rows = per_target(&|t| {
        vec![
            fmt(results.series("paced", t, "streams"), 0),
            fmt(results.series("paced", t, "ttfc_p50_ms"), 3),
            fmt(results.series("paced", t, "ttfc_p99_ms"), 3),
            fmt(results.paired("paced", "ttfc_p50_ms", t, "direct", diff), 3),
            fmt(results.paired("paced", "ttfc_p99_ms", t, "direct", diff), 3),
            fmt(results.series("paced", t, "gap_p99_extra_ms"), 3),
            fmt(results.series("paced", t, "gap_max_extra_ms"), 3),
            format!("{}", results.total("paced", t, "held_back")),
        ]
    });
    table(
        &mut out,
        &[
            "target",
            "streams measured",
            "TTFC p50 ms",
            "TTFC p99 ms",
            "added TTFC p50 ms",
            "added TTFC p99 ms",
            "gap beyond pacing, p99 ms",
            "gap beyond pacing, max ms",
            "lines held back (all rounds)",
        ],
        &rows,
    );

    let _ = writeln!(
        out,
        "### Memory with {RSS_STREAMS} concurrent open streams (confirmed open at the fake when read; fresh process)\n"
    );
    let rows: Vec<Vec<String>> = per_target(&|t| {
        vec![
            fmt(results.series("rss", t, "rss_mib"), 1),
            fmt(results.series("rss", t, "hwm_mib"), 1),
            fmt(results.series("rss", t, "pss_mib"), 1),
        ]
    })
    .into_iter()
    .filter(|r| r[0] != "direct")
    .collect();
    table(
        &mut out,
        &[
            "target",
            "RSS MiB (VmRSS)",
            "peak RSS MiB (VmHWM)",
            "PSS MiB",
        ],
        &rows,
    );
    let _ = writeln!(out, "For nginx, the sum over the master and its workers.\n");

    let failures = results.failures();
    if !failures.is_empty() {
        let _ = writeln!(out, "### Runs that did not count\n");
        for f in failures {
            let _ = writeln!(
                out,
                "- round {}, {}, {}: {}",
                f.round + 1,
                f.scenario,
                f.target,
                f.failed.as_deref().unwrap_or_default()
            );
        }
        out.push('\n');
    }
    out
}
