//! The command line (SPEC §5, issue 3 item 10): key management and usage
//! working directly on the store, alongside a running gateway.

use super::{free_port, millis, sqlite_url, Launch, Ledger, Output};
use crate::support::fake_ollama::FakeOllama;
use serde_json::{json, Value};
use std::time::Duration;

const ADMIN: &str = "cli-admin-key";

/// `keys create` output: the key's fields (JSON) and its secret.
fn created(out: &Output) -> (Value, String) {
    let view = out
        .stdout
        .lines()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| panic!("no JSON line in:\n{}", out.stdout));
    let secret = out
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("tg_"))
        .unwrap_or_else(|| panic!("no key printed:\n{}", out.stdout))
        .to_string();
    (view, secret)
}

/// A new temporary directory (removed when dropped) and a launch of
/// `tollgate` on the SQLite file `name` in it, in front of `fake`, with
/// the admin key.
fn on_a_new_sqlite_file(name: &str, fake: &FakeOllama) -> (tempfile::TempDir, Launch) {
    let dir = tempfile::tempdir().expect("tempdir");
    let launch = Launch::new(dir.path())
        .var("DATABASE_URL", &sqlite_url(&dir.path().join(name)))
        .var("OLLAMA_URL", &fake.url())
        .var("ADMIN_KEY", ADMIN);
    (dir, launch)
}

/// Waits until a change the CLI committed is seen by every request a
/// gateway on the same SQLite file takes (10 ms after the commit; README,
/// *Storage*).
async fn seen_by_the_gateway() {
    tokio::time::sleep(Duration::from_millis(11)).await;
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// create, list, topup (add and --set), usage (JSON and CSV) and revoke,
/// each seen by a gateway running on the same SQLite file.
#[tokio::test]
async fn keys_commands_work_on_a_running_gateways_store() {
    let fake = FakeOllama::start().await;
    let (dir, launch) = on_a_new_sqlite_file("cli.db", &fake);
    let db = dir.path().join("cli.db");

    let out = launch
        .run(&[
            "keys",
            "create",
            "--name",
            "alice",
            "--credits",
            "100",
            "--models",
            "mistral",
            "--expires",
            "2030-01-01T00:00:00Z",
        ])
        .await
        .ok();
    let (view, alice) = created(&out);
    let id = view["id"].as_i64().expect("an id");
    assert_eq!(view["name"], "alice");
    assert_eq!(view["role"], "user");
    assert_eq!(millis(&view["credits"]), 100_000);
    assert_eq!(view["models"], json!(["mistral"]));
    assert!(
        view["expires_at"]
            .as_str()
            .is_some_and(|t| t.starts_with("2030-01-01T00:00:00")),
        "{view}"
    );
    assert!(!out.stderr.contains(&alice), "the secret was logged");

    let out = launch.run(&["keys", "list"]).await.ok();
    assert!(!out.stdout.contains(&alice), "keys list shows a secret");
    assert!(!out.stdout.contains("hash"), "keys list shows a hash");
    let listed = json_lines(&out.stdout);
    let row = listed
        .iter()
        .find(|k| k["id"] == id)
        .unwrap_or_else(|| panic!("alice is not listed: {listed:?}"));
    assert_eq!(row["name"], "alice");
    assert!(row.get("key").is_none(), "{row}");

    // A gateway on the same file sees the key and what the CLI does to it.
    let gw = launch.start().await;
    let (status, me) = gw.me(&alice).await;
    assert_eq!(status, 200);
    assert_eq!(millis(&me["credits"]), 100_000);
    assert_eq!(gw.generate(&alice, "hi").await, 200);
    let other_model = gw
        .post("/api/generate")
        .header("x-api-key", &alice)
        .json(&json!({"model": "llama3.2", "prompt": "hi", "stream": false}))
        .send()
        .await
        .expect("send");
    assert_eq!(other_model.status(), 403, "--models was not applied");

    let id_arg = id.to_string();
    let out = launch.run(&["keys", "topup", &id_arg, "5"]).await.ok();
    assert!(out.stdout.contains("104"), "{}", out.stdout);
    seen_by_the_gateway().await;
    assert_eq!(millis(&gw.me(&alice).await.1["credits"]), 104_000);

    let out = launch
        .run(&["keys", "topup", &id_arg, "7", "--set", "--reason", "reset"])
        .await
        .ok();
    assert!(out.stdout.contains('7'), "{}", out.stdout);
    seen_by_the_gateway().await;
    assert_eq!(millis(&gw.me(&alice).await.1["credits"]), 7_000);

    let out = launch.run(&["keys", "topup", &id_arg, "0.125"]).await.ok();
    assert!(out.stdout.contains("7.125"), "{}", out.stdout);

    let out = launch.run(&["usage"]).await.ok();
    let rows = json_lines(&out.stdout);
    let row = rows
        .iter()
        .find(|r| r["key_id"] == id)
        .unwrap_or_else(|| panic!("alice's request is not in `usage`: {rows:?}"));
    assert_eq!(row["endpoint"], "/generate", "{row}");
    assert_eq!(row["status"], 200);
    assert_eq!(millis(&row["credits"]), 1_000);

    let out = launch.run(&["usage", "--csv"]).await.ok();
    let mut lines = out.stdout.lines();
    let header = lines.next().expect("a header");
    assert!(
        header.contains("endpoint") && header.contains("credits"),
        "{header}"
    );
    let data: Vec<&str> = lines.collect();
    assert!(
        data.iter()
            .any(|l| l.contains("/generate") && l.split(',').nth(1) == Some(id_arg.as_str())),
        "no CSV row for alice:\n{}",
        out.stdout
    );

    let out = launch
        .run(&["usage", "--key", &id_arg, "--limit", "1"])
        .await
        .ok();
    assert_eq!(json_lines(&out.stdout).len(), 1, "{}", out.stdout);

    // Revoked while the gateway runs: 401 from then on.
    let out = launch.run(&["keys", "revoke", &id_arg]).await.ok();
    seen_by_the_gateway().await;
    let revoked = json_lines(&out.stdout);
    assert!(!revoked[0]["revoked_at"].is_null(), "{}", out.stdout);
    assert_eq!(gw.me(&alice).await.0, 401, "a revoked key still works");
    assert_eq!(gw.generate(&alice, "hi").await, 401);
    // The ledger stays.
    let out = launch.run(&["usage", "--key", &id_arg]).await.ok();
    assert_eq!(json_lines(&out.stdout).len(), 1);

    // Operations on a key that does not exist fail with a message.
    for args in [
        &["keys", "topup", "424242", "5"][..],
        &["keys", "revoke", "424242"][..],
    ] {
        let out = launch.run(args).await;
        assert!(!out.success(), "{args:?} succeeded");
        assert!(out.stderr.contains("424242"), "{args:?}: {}", out.stderr);
    }

    assert_eq!(
        gw.terminate(Duration::from_secs(30)).await.status.code(),
        Some(0)
    );
    let ledger = Ledger::read_sqlite(&db, &alice).await;
    assert_eq!(ledger.balance, 7_125);
    assert_eq!(ledger.adjustments.len(), 4, "grant, top-up, set, top-up");
    assert!(
        ledger.adjustments.iter().all(|a| a.actor == "cli"),
        "{:?}",
        ledger.adjustments
    );
    assert!(ledger.adjustments.iter().any(|a| a.reason == "reset"));
    ledger.assert_adds_up();
}

/// A key created with `--expires` works until then and gets 401 after.
#[tokio::test]
async fn an_expired_key_gets_401() {
    let fake = FakeOllama::start().await;
    let (_dir, launch) = on_a_new_sqlite_file("expiry.db", &fake);
    let gw = launch.start().await;

    let expiry = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let expiry_text = expiry
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format");
    let out = launch
        .run(&[
            "keys",
            "create",
            "--name",
            "soon",
            "--credits",
            "5",
            "--expires",
            &expiry_text,
        ])
        .await
        .ok();
    let (_, soon) = created(&out);
    if time::OffsetDateTime::now_utc() + time::Duration::seconds(1) < expiry {
        assert_eq!(gw.me(&soon).await.0, 200, "a key that has not expired");
    }
    let wait = expiry - time::OffsetDateTime::now_utc() + time::Duration::seconds(1);
    tokio::time::sleep(Duration::try_from(wait).unwrap_or_default()).await;
    assert_eq!(gw.me(&soon).await.0, 401, "an expired key still works");
    assert_eq!(gw.generate(&soon, "hi").await, 401);

    // An expiry in the past: refused, or a key that never works.
    let out = launch
        .run(&[
            "keys",
            "create",
            "--name",
            "past",
            "--credits",
            "5",
            "--expires",
            "2000-01-01T00:00:00Z",
        ])
        .await;
    if out.success() {
        let (_, past) = created(&out);
        assert_eq!(gw.me(&past).await.0, 401, "a key expired in 2000 works");
    } else {
        assert!(out.stderr.contains("2000"), "{}", out.stderr);
    }
}

/// `--help` on every command; bad arguments exit non-zero with a message
/// and touch nothing.
#[tokio::test]
async fn help_and_bad_arguments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("args.db");
    let launch = Launch::new(dir.path()).var("DATABASE_URL", &sqlite_url(&db));

    let helps: &[(&[&str], &[&str])] = &[
        (&["--help"], &["serve", "keys", "usage"]),
        (&["help"], &["serve", "keys", "usage"]),
        (&["serve", "--help"], &[]),
        (&["keys", "--help"], &["create", "list", "topup", "revoke"]),
        (
            &["keys", "create", "--help"],
            &["--name", "--credits", "--role", "--models", "--expires"],
        ),
        (&["keys", "list", "--help"], &[]),
        (&["keys", "topup", "--help"], &["--set"]),
        (&["keys", "revoke", "--help"], &[]),
        (&["usage", "--help"], &["--csv", "--key", "--limit"]),
    ];
    for (args, words) in helps {
        let out = launch.run(args).await.ok();
        assert!(out.stdout.contains("Usage"), "{args:?}:\n{}", out.stdout);
        for word in *words {
            assert!(
                out.stdout.contains(word),
                "{args:?} does not mention {word}:\n{}",
                out.stdout
            );
        }
    }
    let out = launch.run(&["--version"]).await.ok();
    assert!(out.stdout.contains(env!("CARGO_PKG_VERSION")));

    let bad: &[(&[&str], &str)] = &[
        (
            &["keys", "create", "--name", "x", "--credits", "1.2345"],
            "1.2345",
        ),
        (
            &["keys", "create", "--name", "x", "--credits", "ten"],
            "ten",
        ),
        (&["keys", "create", "--name", "x", "--role", "root"], "root"),
        (
            &["keys", "create", "--name", "x", "--expires", "tomorrow"],
            "tomorrow",
        ),
        (&["keys", "create", "--credits", "5"], "--name"),
        (&["keys", "create", "--name", " ", "--credits", "5"], "name"),
        (&["keys", "topup", "abc", "5"], "abc"),
        (&["keys", "topup", "1", "five"], "five"),
        (&["keys", "revoke"], "ID"),
        (&["keys", "frobnicate"], "frobnicate"),
        (&["usage", "--limit", "lots"], "lots"),
        (&["unknown-command"], "unknown-command"),
        // Past the command line's parser, refused by the key's checks.
        (
            &["keys", "create", "--name", "x", "--rate-limit-rpm", "0"],
            "rate_limit_rpm",
        ),
        (&["keys", "create", "--name", "x", "--models", ""], "model"),
    ];
    for (args, word) in bad {
        let out = launch.run(args).await;
        assert!(!out.success(), "{args:?} succeeded:\n{}", out.stdout);
        // 2: the command line cannot be used (README, the CLI's exit codes).
        assert_eq!(out.status.code(), Some(2), "{args:?}:\n{}", out.stderr);
        assert!(
            out.stderr.contains(word),
            "{args:?}: the message does not mention {word}:\n{}",
            out.stderr
        );
    }

    // Nothing above created a key.
    let out = launch.run(&["keys", "list"]).await.ok();
    assert!(out.stdout.trim().is_empty(), "{}", out.stdout);
    // A command that fails, having changed nothing: 1.
    let out = launch.run(&["keys", "revoke", "999"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    // A top-up that would take the balance out of range: a value that
    // cannot be used, 2.
    let out = launch
        .run(&["keys", "create", "--name", "full", "--credits", "10"])
        .await
        .ok();
    let created: serde_json::Value =
        serde_json::from_str(out.stdout.lines().next().unwrap_or_default()).expect("a JSON line");
    let id = created["id"].to_string();
    let out = launch.run(&["keys", "topup", &id, "1000000000000"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("within"), "{}", out.stderr);
}

/// One gateway per SQLite file: a second `tollgate` started on the file
/// of a running one is refused (it would not see the first one's
/// reservations, nor its settlement journal) and says why; the first goes
/// on serving, and the CLI still works beside it.
#[tokio::test]
async fn a_second_gateway_on_one_sqlite_file_is_refused() {
    let fake = FakeOllama::start().await;
    let (_dir, launch) = on_a_new_sqlite_file("one.db", &fake);
    let launch = launch.var("API_KEYS", "k1=5");
    let gw = launch.start().await;
    let second = launch
        .clone()
        .var("LISTEN_ADDR", &format!("127.0.0.1:{}", free_port()))
        .run_within(&["serve"], Duration::from_secs(30))
        .await;
    assert!(!second.success(), "a second gateway started");
    assert!(
        second
            .stderr
            .contains("a gateway is serving that file already"),
        "{}",
        second.stderr
    );
    assert_eq!(gw.generate("k1", "hi").await, 200);
    let out = launch.run(&["keys", "list"]).await.ok();
    assert!(out.stdout.contains("\"name\""), "{}", out.stdout);
}

/// The memory store lives only inside a gateway's process: a key the CLI
/// made there would be printed and lost. The CLI refuses it.
#[tokio::test]
async fn the_cli_refuses_the_memory_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launch = Launch::new(dir.path()).var("DATABASE_URL", "memory");
    for args in [
        &["keys", "create", "--name", "x"][..],
        &["keys", "list"],
        &["usage"],
    ] {
        let out = launch.run_within(args, Duration::from_secs(20)).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stderr.contains("DATABASE_URL=memory"), "{}", out.stderr);
        assert!(!out.stdout.contains("tg_"), "{}", out.stdout);
    }
}
