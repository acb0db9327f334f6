//! The PostgreSQL store when its connection breaks, or when another
//! gateway takes it for dead.
//!
//! The store talks to the server through [`Cutter`], a TCP relay that can
//! break the connection that carries a chosen statement at the moment a
//! test chooses: before the server sees the statement (nothing applied),
//! or after the server has committed it and before its answer reaches the
//! gateway (applied, but the gateway cannot know). Either way, a settlement
//! must be applied exactly once and its reservation released, and a
//! reservation reported failed must not stay held.

use super::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Text that only the settlement batch statement sends (when a connection
/// prepares it, i.e. the first time each connection runs it).
const SETTLEMENT_SQL: &[u8] = b"INSERT INTO settlement_batches";
/// Text that only the reservation statement sends (the same way).
const RESERVATION_SQL: &[u8] = b"SET reserved = reserved + $1";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Cut {
    /// Relay everything.
    Never,
    /// Break the connection that sends the statement, before the server
    /// receives it.
    BeforeTheServer,
    /// Relay the statement, and break its connection once the server has
    /// answered its execution, before the answer is relayed.
    AfterTheCommit,
    /// Relay the statement and the request to execute it, then break the
    /// connection at once: the server runs it with its client gone.
    AfterTheExecute,
    /// Relay the statement, the rest of its transaction and the `COMMIT`,
    /// and break the connection once the server has answered the commit,
    /// before the answer is relayed.
    AfterTheTransactionCommits,
    /// As `AfterTheCommit`, for an `INSERT` run on its own.
    AfterTheInsert,
}

impl Cut {
    /// The server's CommandComplete tag from which nothing is relayed, for
    /// the cuts made once the server has answered.
    fn answer_tag(self) -> Option<&'static [u8]> {
        match self {
            // Preparing a statement sends no CommandComplete; executing a
            // SELECT (or a statement ending in one) sends "SELECT n".
            Cut::AfterTheCommit => Some(b"SELECT "),
            Cut::AfterTheTransactionCommits => Some(b"COMMIT\0"),
            Cut::AfterTheInsert => Some(b"INSERT 0 "),
            Cut::Never | Cut::BeforeTheServer | Cut::AfterTheExecute => None,
        }
    }
}

/// A TCP relay to the PostgreSQL server that breaks one connection on cue.
struct Cutter {
    port: u16,
    /// The next cut, and the text of the statement it is for.
    plan: Arc<Mutex<(Cut, &'static [u8])>>,
    /// Connections broken so far.
    cuts: Arc<AtomicUsize>,
    /// Whether the server is out of reach: set, every relayed connection
    /// is broken and new ones are closed at once.
    down: Arc<tokio::sync::watch::Sender<bool>>,
    /// Whether the next cut also takes the server out of reach.
    down_after_cut: Arc<AtomicBool>,
}

impl Cutter {
    async fn start(server: (String, u16)) -> Cutter {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        let plan = Arc::new(Mutex::new((Cut::Never, &b""[..])));
        let cuts = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(tokio::sync::watch::Sender::new(false));
        let down_after_cut = Arc::new(AtomicBool::new(false));
        let relays = Relays {
            plan: plan.clone(),
            cuts: cuts.clone(),
            down: down.clone(),
            down_after_cut: down_after_cut.clone(),
        };
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *relays.down.borrow() {
                    continue;
                }
                let Ok(upstream) = TcpStream::connect((server.0.as_str(), server.1)).await else {
                    continue;
                };
                tokio::spawn(relay(client, upstream, relays.clone()));
            }
        });
        Cutter {
            port,
            plan,
            cuts,
            down,
            down_after_cut,
        }
    }

    /// Makes the next cut also take the server out of reach, until
    /// [`Cutter::up`].
    fn stay_down_after_cut(&self) {
        self.down_after_cut.store(true, Ordering::SeqCst);
    }

    /// Brings the server within reach again.
    fn up(&self) {
        self.down_after_cut.store(false, Ordering::SeqCst);
        self.down.send_replace(false);
    }

    /// Arms the next cut (one connection only), for the statement that
    /// contains `sql`.
    fn arm(&self, cut: Cut, sql: &'static [u8]) {
        *self.plan.lock().expect("plan") = (cut, sql);
    }

    fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

/// What every relayed connection shares with the [`Cutter`].
#[derive(Clone)]
struct Relays {
    plan: Arc<Mutex<(Cut, &'static [u8])>>,
    cuts: Arc<AtomicUsize>,
    down: Arc<tokio::sync::watch::Sender<bool>>,
    down_after_cut: Arc<AtomicBool>,
}

impl Relays {
    /// Counts a cut, taking the server out of reach if asked to.
    fn cut(&self) {
        self.cuts.fetch_add(1, Ordering::SeqCst);
        if self.down_after_cut.load(Ordering::SeqCst) {
            self.down.send_replace(true);
        }
    }
}

/// Relays one connection until either side closes it, the plan breaks it
/// or the server goes out of reach.
async fn relay(mut client: TcpStream, mut server: TcpStream, relays: Relays) {
    let Relays { plan, .. } = &relays;
    let mut down = relays.down.subscribe();
    let (mut from_client, mut to_client) = client.split();
    let (mut from_server, mut to_server) = server.split();
    // This connection carries the statement and is to be broken once the
    // server has answered this: its execution ("SELECT n") or the commit of
    // its transaction ("COMMIT").
    let doomed: Mutex<Option<&'static [u8]>> = Mutex::new(None);
    // Break the connection right after relaying the client's next chunk.
    let mut cut_after_next = false;
    let upward = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from_client.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            let chunk = &buf[..n];
            let cut = {
                let mut plan = plan.lock().expect("plan");
                match *plan {
                    (Cut::Never, _) => Cut::Never,
                    (cut, sql) if contains(chunk, sql) => {
                        *plan = (Cut::Never, b"");
                        cut
                    }
                    _ => Cut::Never,
                }
            };
            {
                match cut {
                    Cut::Never => {}
                    Cut::BeforeTheServer => {
                        relays.cut();
                        return;
                    }
                    Cut::AfterTheCommit | Cut::AfterTheTransactionCommits | Cut::AfterTheInsert => {
                        *doomed.lock().expect("doomed") = cut.answer_tag()
                    }
                    Cut::AfterTheExecute => {
                        if to_server.write_all(chunk).await.is_err() {
                            return;
                        }
                        cut_after_next = true;
                        continue;
                    }
                }
            }
            if to_server.write_all(chunk).await.is_err() {
                return;
            }
            if cut_after_next {
                relays.cut();
                return;
            }
        }
    };
    let downward = async {
        let mut buf = vec![0u8; 64 * 1024];
        // What the server sent since the connection was doomed.
        let mut held = Vec::new();
        loop {
            let n = from_server.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            let chunk = &buf[..n];
            // From the awaited CommandComplete ("SELECT n" of the
            // execution, preparing the statement sends none; or "COMMIT")
            // on, nothing is relayed; once ReadyForQuery (idle) follows,
            // the transaction has committed, and the connection is broken.
            let awaited = *doomed.lock().expect("doomed");
            if awaited.is_some_and(|tag| !held.is_empty() || contains(chunk, tag)) {
                held.extend_from_slice(chunk);
                if held.ends_with(b"Z\0\0\0\x05I") {
                    relays.cut();
                    return;
                }
                continue;
            }
            if to_client.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = upward => {}
        _ = downward => {}
        _ = down.wait_for(|down| *down) => {}
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A store on a fresh schema whose connections go through a [`Cutter`].
struct Relayed {
    cutter: Cutter,
    store: Arc<PostgresStore>,
    /// Connections to the schema that bypass the relay.
    options: PgConnectOptions,
    /// The server's options and the schema, for [`drop_schema`].
    base: PgConnectOptions,
    schema: String,
}

async fn store_behind_a_cutter() -> Option<Relayed> {
    let (base, options, schema) = pg_schema().await?;
    let server = (base.get_host().to_string(), base.get_port());
    let cutter = Cutter::start(server).await;
    let relayed = options.clone().host("127.0.0.1").port(cutter.port);
    let store = PostgresStore::connect_with(relayed)
        .await
        .expect("connect through the relay");
    Some(Relayed {
        cutter,
        store: Arc::new(store),
        options,
        base,
        schema,
    })
}

/// Ten settlements of one credit each on a key of 100, with the
/// connection of the first batch broken as `cut` says: each settlement is
/// answered with a balance, charged once, and every reservation released.
async fn settlements_survive(cut: Cut) {
    let Some(Relayed {
        cutter,
        store,
        base,
        schema,
        ..
    }) = store_behind_a_cutter().await
    else {
        return;
    };
    let s: SharedStore = store;
    let k = s.create_key(new_key("k", cr("100"))).await.unwrap().id;
    for _ in 0..10 {
        s.reserve(k, cr("2")).await.unwrap();
    }
    cutter.arm(cut, SETTLEMENT_SQL);
    let settling: Vec<_> = (0..10)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.settle(usage(k, cr("1")), cr("2")).await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in settling {
        answers.push(task.await.expect("settle task").expect("settled"));
    }
    assert_eq!(cutter.cuts(), 1, "the relay broke no connection");
    assert!(
        answers.iter().all(|b| *b >= cr("90") && *b < cr("100")),
        "{answers:?}"
    );
    assert!(answers.contains(&cr("90")), "{answers:?}");
    assert_eq!(balance(&s, k).await, cr("90"));
    assert_eq!(s.usage_totals(k).await.unwrap().requests, 10);
    // Nothing is still held: all 90 can be reserved.
    assert_eq!(s.reserve(k, cr("90")).await.unwrap(), Credits::ZERO);
    assert_ledger_adds_up(&s, k).await;
    drop(s);
    drop_schema(&base, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_batch_cut_off_before_the_server_is_sent_again() {
    settlements_survive(Cut::BeforeTheServer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_batch_whose_answer_is_lost_is_applied_once() {
    settlements_survive(Cut::AfterTheCommit).await;
}

/// An adjustment whose commit's answer is lost (the connection breaks
/// after the server committed it) is applied once and answered: the
/// store sends it again, and the attempt finds it done. Before the cut
/// nothing is applied, and the attempt after it applies it.
async fn an_adjustment_survives(cut: Cut) {
    let Some(Relayed {
        cutter,
        store,
        base,
        schema,
        ..
    }) = store_behind_a_cutter().await
    else {
        return;
    };
    let s: SharedStore = store;
    let k = s.create_key(new_key("k", cr("10"))).await.unwrap().id;
    // Text that only an adjustment sends (when a connection prepares it).
    cutter.arm(cut, b"FROM adjustments WHERE request_id = $1");
    let balance = s.adjust(k, add("5")).await.expect("adjusted");
    assert_eq!(cutter.cuts(), 1, "the relay broke no connection");
    assert_eq!(balance, cr("15"));
    assert_eq!(super::balance(&s, k).await, cr("15"));
    let adjustments = s.adjustments(k).await.unwrap();
    assert_eq!(
        adjustments.len(),
        2,
        "the grant and one top-up: {adjustments:?}"
    );
    assert_ledger_adds_up(&s, k).await;
    drop(s);
    drop_schema(&base, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_adjustment_whose_answer_is_lost_is_applied_once() {
    an_adjustment_survives(Cut::AfterTheTransactionCommits).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_adjustment_cut_off_before_the_server_is_sent_again() {
    an_adjustment_survives(Cut::BeforeTheServer).await;
}

/// An adjustment whose commit's answer is lost while the server then stays
/// out of reach past the retries: the caller is told that it may have
/// been applied (the last error, a pool that could not connect, says
/// nothing of the commit), and it was, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_adjustment_left_unconfirmed_says_it_may_have_been_applied() {
    let Some((relayed, s, k)) = an_adjustment_answer_to_be_lost().await else {
        return;
    };
    let unconfirmed = s.adjust(k, add("5")).await;
    assert_eq!(relayed.cutter.cuts(), 1, "the relay broke no connection");
    match unconfirmed {
        Err(e @ StoreError::Unconfirmed(_)) => {
            assert!(e.to_string().contains("may have been applied"), "{e}")
        }
        other => panic!("expected an unknown outcome, got {other:?}"),
    }
    relayed.cutter.up();
    assert_eq!(super::balance(&s, k).await, cr("15"));
    assert_eq!(s.adjustments(k).await.unwrap().len(), 2);
    relayed.drop_with(s).await;
}

/// The CLI tells a script the same by its exit code: 3 for a top-up or a
/// new key that may have been made, 1 for a command that changed nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_cli_top_up_left_unconfirmed_exits_with_its_own_code() {
    use crate::cli::{keys_command, KeysCommand};
    let Some((relayed, s, k)) = an_adjustment_answer_to_be_lost().await else {
        return;
    };
    let top_up = KeysCommand::Topup {
        id: k,
        credits: cr("5"),
        set: false,
        reason: None,
    };
    let unconfirmed = keys_command(s.clone(), top_up).await;
    assert_eq!(relayed.cutter.cuts(), 1, "the relay broke no connection");
    let failure = unconfirmed.expect_err("the top-up was not confirmed");
    assert_eq!(failure.exit_code(), 3, "{failure}");
    assert!(
        failure.to_string().contains("may have been applied"),
        "{failure}"
    );
    relayed.cutter.up();
    assert_eq!(super::balance(&s, k).await, cr("15"));
    // A key created as the connection breaks at its commit may exist.
    relayed
        .cutter
        .arm(Cut::AfterTheTransactionCommits, b"INSERT INTO api_keys");
    let create = KeysCommand::Create {
        name: "made once".into(),
        credits: cr("7"),
        role: Role::User,
        models: None,
        rate_limit_rpm: None,
        max_concurrent: None,
        expires: None,
    };
    let failure = keys_command(s.clone(), create)
        .await
        .expect_err("the new key was not confirmed");
    assert_eq!(relayed.cutter.cuts(), 2, "the relay broke no connection");
    assert_eq!(failure.exit_code(), 3, "{failure}");
    relayed.cutter.up();
    let made = s.keys().await.unwrap();
    assert_eq!(made.iter().filter(|k| k.name == "made once").count(), 1);
    let refused = keys_command(s.clone(), KeysCommand::Revoke { id: k + 1000 })
        .await
        .expect_err("no such key");
    assert_eq!(refused.exit_code(), 1, "{refused}");
    relayed.drop_with(s).await;
}

/// A store behind a cutter, a key of 10 credits on it, and the cutter
/// armed to break the connection for good once an adjustment's
/// transaction has committed, so that its answer is lost.
async fn an_adjustment_answer_to_be_lost() -> Option<(Relayed, SharedStore, KeyId)> {
    let relayed = store_behind_a_cutter().await?;
    let s: SharedStore = relayed.store.clone();
    let k = s.create_key(new_key("k", cr("10"))).await.unwrap().id;
    relayed.cutter.stay_down_after_cut();
    relayed.cutter.arm(
        Cut::AfterTheTransactionCommits,
        b"FROM adjustments WHERE request_id = $1",
    );
    Some((relayed, s, k))
}

impl Relayed {
    /// Closes the store (`s` is another handle on it) and drops the schema.
    async fn drop_with(self, s: SharedStore) {
        drop(s);
        drop(self.store);
        drop_schema(&self.base, &self.schema).await;
    }
}

/// A gateway taken for dead comes back, and its first heartbeat makes its
/// row again but loses the answer: the next heartbeat must still hold
/// again what its requests in flight hold (its row is there by then, so
/// only the failed beat can tell).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_gateway_whose_return_is_not_confirmed_holds_its_reservations_again() {
    let Some(Relayed {
        cutter,
        store: a,
        options,
        base,
        schema,
    }) = store_behind_a_cutter().await
    else {
        return;
    };
    {
        let b = PostgresStore::connect_with(options.clone()).await.unwrap();
        let k = taken_for_dead(&a, &b, &options).await;

        cutter.arm(Cut::AfterTheInsert, b"INSERT INTO instances");
        assert!(a.heartbeat_now().await.is_err());
        assert_eq!(cutter.cuts(), 1, "the relay broke no connection");
        a.heartbeat_now().await.unwrap();
        assert_eq!(
            reserved_in_rows(&options, a.instance_id(), k).await,
            (4_000, 4_000)
        );
        assert_eq!(refused_with(b.reserve(k, cr("7")).await), cr("6"));
    }
    drop(a);
    drop_schema(&base, &schema).await;
}

/// What the key's row and this instance's share row hold reserved.
async fn reserved_in_rows(options: &PgConnectOptions, instance: &str, id: KeyId) -> (i64, i64) {
    let mut admin = PgConnection::connect_with(options).await.unwrap();
    let rows = sqlx::query_as(
        "SELECT k.reserved, COALESCE(r.reserved, 0) FROM api_keys k \
         LEFT JOIN instance_reservations r ON r.key_id = k.id AND r.instance_id = $1 \
         WHERE k.id = $2",
    )
    .bind(instance)
    .bind(id)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    let _ = admin.close().await;
    rows
}

/// A reservation the server made but whose answer was lost is reported
/// failed, so it must not stay held: the next heartbeat gives it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_reservation_whose_answer_is_lost_is_given_back() {
    let Some(Relayed {
        cutter,
        store: s,
        options,
        base,
        schema,
    }) = store_behind_a_cutter().await
    else {
        return;
    };
    let k = s.create_key(new_key("k", cr("10"))).await.unwrap().id;
    let other = s.create_key(new_key("o", cr("10"))).await.unwrap().id;
    assert_eq!(s.reserve(other, cr("3")).await.unwrap(), cr("7"));
    cutter.arm(Cut::AfterTheCommit, RESERVATION_SQL);
    assert!(matches!(
        s.reserve(k, cr("4")).await,
        Err(StoreError::Backend(_))
    ));
    assert_eq!(cutter.cuts(), 1, "the relay broke no connection");
    // The server holds it; the gateway told its caller it failed.
    let instance = s.instance_id().to_string();
    assert_eq!(
        reserved_in_rows(&options, &instance, k).await,
        (4_000, 4_000)
    );
    s.heartbeat_now().await.unwrap();
    assert_eq!(reserved_in_rows(&options, &instance, k).await, (0, 0));
    // What the gateway does hold stays held.
    assert_eq!(
        reserved_in_rows(&options, &instance, other).await,
        (3_000, 3_000)
    );
    assert_eq!(s.reserve(k, cr("10")).await.unwrap(), Credits::ZERO);
    drop(s);
    drop_schema(&base, &schema).await;
}

/// Key "k" of 10 credits, 4 of them reserved by gateway `a`, which `b` then
/// takes for dead (its heartbeat a minute old), releasing them.
async fn taken_for_dead(a: &PostgresStore, b: &PostgresStore, options: &PgConnectOptions) -> KeyId {
    let k = a.create_key(new_key("k", cr("10"))).await.unwrap().id;
    assert_eq!(a.reserve(k, cr("4")).await.unwrap(), cr("6"));
    let mut admin = PgConnection::connect_with(options).await.unwrap();
    stop_heartbeat(&mut admin, a.instance_id()).await;
    let _ = admin.close().await;
    b.release_stale_reservations().await.unwrap();
    assert_eq!(reserved_in_rows(options, a.instance_id(), k).await, (0, 0));
    k
}

/// A gateway that could not reach the database for a minute is taken for
/// dead and its reservations released by another; when it is back, its
/// next heartbeat holds again what its requests in flight hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_gateway_taken_for_dead_holds_its_reservations_again() {
    let Some((base, options, schema)) = pg_schema().await else {
        return;
    };
    {
        let a = PostgresStore::connect_with(options.clone()).await.unwrap();
        let b = PostgresStore::connect_with(options.clone()).await.unwrap();
        let k = taken_for_dead(&a, &b, &options).await;

        a.heartbeat_now().await.unwrap();
        assert_eq!(
            reserved_in_rows(&options, a.instance_id(), k).await,
            (4_000, 4_000)
        );
        assert_eq!(refused_with(b.reserve(k, cr("7")).await), cr("6"));
        a.settle(usage(k, cr("1")), cr("4")).await.unwrap();
        assert_eq!(reserved_in_rows(&options, a.instance_id(), k).await, (0, 0));
        assert_eq!(b.reserve(k, cr("9")).await.unwrap(), Credits::ZERO);
    }
    drop_schema(&base, &schema).await;
}

/// A batch committed, its answer lost, and the attempt sent again refused
/// by the server (for a reason not in the batch: here a trigger refusing
/// once, as a permission change or a read-only server would): the batch
/// was applied, so it must be answered as applied, not settled again item
/// by item, and no other request's reservation given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_refused_retry_of_a_committed_batch_is_not_applied_again() {
    let Some(Relayed {
        cutter,
        store: s,
        options,
        base,
        schema,
    }) = store_behind_a_cutter().await
    else {
        return;
    };
    let mut admin = PgConnection::connect_with(&options).await.unwrap();
    sqlx::raw_sql(
        "CREATE SEQUENCE marks; \
         CREATE FUNCTION refuse_the_second() RETURNS trigger AS $$ BEGIN \
             IF nextval('marks') = 2 THEN \
                 RAISE EXCEPTION 'refused once' USING ERRCODE = '42501'; \
             END IF; \
             RETURN NEW; \
         END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER refuse_the_second BEFORE INSERT ON settlement_batches \
             FOR EACH ROW EXECUTE FUNCTION refuse_the_second();",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    let _ = admin.close().await;
    let k = s.create_key(new_key("k", cr("100"))).await.unwrap().id;
    s.reserve(k, cr("2")).await.unwrap();
    // Another request's reservation on the same key, still open.
    s.reserve(k, cr("3")).await.unwrap();
    cutter.arm(Cut::AfterTheCommit, SETTLEMENT_SQL);
    let answer = s.settle(usage(k, cr("1")), cr("2")).await.unwrap();
    assert_eq!(cutter.cuts(), 1, "the relay broke no connection");
    assert_eq!(answer, cr("99"));
    assert_eq!(balance(&(s.clone() as SharedStore), k).await, cr("99"));
    assert_eq!(s.usage_totals(k).await.unwrap().requests, 1);
    let instance = s.instance_id().to_string();
    assert_eq!(
        reserved_in_rows(&options, &instance, k).await,
        (3_000, 3_000)
    );
    drop(s);
    drop_schema(&base, &schema).await;
}

/// A reservation whose connection broke while it waited at the server for
/// the key's lock (held here by another connection): the server still runs
/// it once the lock is free, after the gateway has told its caller that it
/// failed. The heartbeat's reconciliation waits for it (it locks the key
/// too) and then gives its credits back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_reservation_still_queued_at_the_server_is_given_back() {
    let Some(Relayed {
        cutter,
        store: s,
        options,
        base,
        schema,
    }) = store_behind_a_cutter().await
    else {
        return;
    };
    let k = s.create_key(new_key("k", cr("10"))).await.unwrap().id;
    let mut blocker = lock_key_row(&options, k).await;
    cutter.arm(Cut::AfterTheExecute, RESERVATION_SQL);
    assert!(matches!(
        s.reserve(k, cr("4")).await,
        Err(StoreError::Backend(_))
    ));
    assert_eq!(cutter.cuts(), 1, "the relay broke no connection");
    // The orphaned reservation reaches the server's queue for the key's
    // lock (on a busy host, later than the gateway's answer).
    let (blocking,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(&mut blocker)
        .await
        .unwrap();
    let mut watcher = PgConnection::connect_with(&options).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
        )
        .bind(blocking)
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reservation never queued"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let _ = watcher.close().await;
    // The reconciliation queues for the key's lock behind the orphaned
    // reservation; the blocker lets both go.
    let reconciling = {
        let s = s.clone();
        tokio::spawn(async move { s.heartbeat_now().await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    unlock(blocker).await;
    if reconciling.await.expect("heartbeat task").is_err() {
        // Its lock wait outlasted its lock_timeout (a slow host): the
        // next heartbeat tries again, the key still suspect.
        s.heartbeat_now().await.unwrap();
    }
    let instance = s.instance_id().to_string();
    assert_eq!(reserved_in_rows(&options, &instance, k).await, (0, 0));
    assert_eq!(s.reserve(k, cr("10")).await.unwrap(), Credits::ZERO);
    drop(s);
    drop_schema(&base, &schema).await;
}

/// A database that cannot hold any Unicode text would refuse charges
/// (a model name in another script): the store refuses it at connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_database_not_in_utf8_is_refused() {
    let Some((base, _, schema)) = pg_schema().await else {
        return;
    };
    let name = format!("{schema}_latin1");
    let mut admin = PgConnection::connect_with(&base).await.unwrap();
    sqlx::query(&format!(
        "CREATE DATABASE {name} ENCODING 'LATIN1' TEMPLATE template0 \
         LC_COLLATE 'C' LC_CTYPE 'C'"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    let refused = PostgresStore::connect_with(base.clone().database(&name)).await;
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
    let _ = admin.close().await;
    drop_schema(&base, &schema).await;
    match refused {
        Err(StoreError::Backend(message)) => assert!(message.contains("UTF8"), "{message}"),
        Err(other) => panic!("refused for another reason: {other:?}"),
        Ok(_) => panic!("a LATIN1 database was accepted"),
    }
}
