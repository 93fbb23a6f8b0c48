//! Chaos, bounded: a whole deployment on services of its own (a private tansu broker,
//! Redis, PostgreSQL cluster and SecantusDB, so nothing shared is disturbed) under steady
//! chat load from WebSocket clients, while the test kills -9 the writer every 20 s,
//! restarts the broker, restarts Redis with its data gone, stops Postgres for 30 s and
//! kills -9 one of the two gateways. Clients behave as apps should: they resend an unacked
//! message with the same `client_msg_id`, reconnect (to the other gateway when theirs is
//! gone) and `sync` from the last seq they hold, and drop deliveries they already have.
//! loadgen's `chat` runs beside them on gateway A as extra steady load; it must end on its
//! own (its counts are printed, not judged: it neither resends nor syncs).
//!
//! At the end every message any client got an ack for must be stored exactly once in
//! Postgres and in Mongo under the acked (message_id, seq, session), every sent message
//! must have been acked, each session's seqs must run 1..=n without gaps or duplicates,
//! and every client's view after a final sync must equal the store. Any violation fails
//! the run with the offending ids; the counts are printed either way.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatify_e2e::private::{PrivateBroker, PrivateMongo, PrivatePostgres, PrivateRedis};
use chatify_e2e::stack::{Stack, StackOptions, internal_request, p2p_session, token};
use chatify_proto::storage::v1::CreateGroupRequest;
use chatify_proto::storage::v1::group_service_client::GroupServiceClient;
use futures::{SinkExt as _, StreamExt as _, TryStreamExt as _};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Chat users, each one WebSocket device; user 2k and 2k+1 chat with each other, and the
/// first [`GROUP_MEMBERS`] also talk in one group.
const USERS: usize = 16;
const GROUP_MEMBERS: usize = 6;
/// Each client sends one message per interval (16 clients: ~23 messages/s).
const SEND_INTERVAL: Duration = Duration::from_millis(700);
/// A message without an ack after this long is resent with the same client_msg_id.
const RESEND_AFTER: Duration = Duration::from_secs(8);
/// After an `unavailable` or `rate_limited` error, the resend comes this much later.
const RESEND_AFTER_ERROR: Duration = Duration::from_secs(2);
/// Resends per tick at most (with the new message: ~10/s, under the gateway's per-user
/// rate of 50/s, so a reconnect with a backlog is not a flood that gets closed 1008).
const RESENDS_PER_TICK: usize = 6;
/// A sync without an answer after this long is asked again.
const SYNC_RETRY_AFTER: Duration = Duration::from_secs(15);
/// A gap in a session (a later seq seen, an earlier missing) older than this is synced.
const GAP_SYNC_AFTER: Duration = Duration::from_secs(3);
const SYNC_PAGE: u32 = 200;
/// loadgen's chat clients (pairs) and their aggregate offered rate, beside the test's own.
const LOADGEN_CLIENTS: usize = 20;
const LOADGEN_RATE: u32 = 20;
/// How long after the load loadgen may take to finish (its grace, then its report).
const LOADGEN_END_MAX: Duration = Duration::from_secs(150);
/// Load runs this long; the faults happen inside it.
const LOAD: Duration = Duration::from_secs(180);
/// After the load: how long every outstanding message may take to be acked, and the final
/// sync to finish.
const DRAIN_MAX: Duration = Duration::from_secs(90);
const FINAL_SYNC_MAX: Duration = Duration::from_secs(60);

/// What the test injects, at seconds from the start of the load.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillWriter,
    RestartBroker,
    WipeRedis,
    StopPostgres,
    StartPostgres,
    KillGateway,
}

fn schedule() -> Vec<(u64, Fault)> {
    let mut faults: Vec<(u64, Fault)> = (10..LOAD.as_secs())
        .step_by(20)
        .map(|at| (at, Fault::KillWriter))
        .collect();
    faults.extend([
        (40, Fault::WipeRedis),
        (60, Fault::StopPostgres),
        (90, Fault::StartPostgres),
        (115, Fault::KillGateway),
        // Late, so every other fault has been exercised before it (with tansu 0.6 a broker
        // restart has once left the writers' group without progress: docs/RELIABILITY.md).
        (140, Fault::RestartBroker),
    ]);
    faults.sort_by_key(|(at, _)| *at);
    faults
}

/// Logging of every process: rebalances and producer replacements are at info. With
/// `CHATIFY_CHAOS_KAFKA_DEBUG=cgrp,eos` (say) every Kafka client logs those librdkafka
/// debug contexts too, for a post-mortem of a failed run.
fn kafka_debug_env() -> Vec<(String, String)> {
    let mut filter = "warn,gateway_uring=info,storage_writer=info".to_owned();
    let mut env = Vec::new();
    if let Ok(contexts) = std::env::var("CHATIFY_CHAOS_KAFKA_DEBUG") {
        filter.push_str(",librdkafka=debug,rdkafka=debug");
        env.push(("CHATIFY_KAFKA_DEBUG".to_owned(), contexts));
    }
    env.push(("RUST_LOG".to_owned(), filter));
    env
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Send new messages.
    Load,
    /// No new messages; keep resending what is unacked.
    Drain,
    /// Sync every session to its end, then report.
    FinalSync,
    Stop,
}

/// One sent message as the whole test knows it.
#[derive(Debug)]
struct Sent {
    session: String,
    acked: Option<(String, u64)>,
}

#[derive(Debug, Default)]
struct Counts {
    send_frames: u64,
    resends: u64,
    acks: u64,
    duplicate_acks: u64,
    delivered: u64,
    duplicate_deliveries: u64,
    synced_new: u64,
    sync_overlap: u64,
    gap_syncs: u64,
    connects: u64,
    connect_failures: u64,
    errors: BTreeMap<String, u64>,
}

/// Shared by every client task; held only for a few map operations at a time.
#[derive(Debug, Default)]
struct Ledger {
    /// (sender, client_msg_id) -> what happened to it.
    sent: HashMap<(String, String), Sent>,
    violations: Vec<String>,
    counts: Counts,
}

type SharedLedger = Arc<Mutex<Ledger>>;

fn with<T>(ledger: &SharedLedger, f: impl FnOnce(&mut Ledger) -> T) -> T {
    f(&mut ledger.lock().expect("ledger lock"))
}

#[derive(Debug, Clone)]
enum Target {
    User(String),
    Group(String),
}

#[derive(Debug)]
struct Outstanding {
    target: usize,
    content: String,
    resend_at: Instant,
}

/// One client's own state: what it sent and has not seen acked, and its view of each
/// session (seq -> message_id).
#[derive(Debug)]
struct Client {
    user: String,
    token: String,
    home: usize,
    /// (session id, how to address a send to it)
    targets: Vec<(String, Target)>,
    next_message: u64,
    outstanding: BTreeMap<String, Outstanding>,
    view: HashMap<String, BTreeMap<u64, String>>,
    syncs_in_flight: HashMap<String, Instant>,
    gap_since: HashMap<String, Instant>,
    final_done: HashSet<String>,
    reported_done: bool,
    /// Gateways this client connected to, in order.
    connected_to: Vec<usize>,
}

impl Client {
    fn contiguous(&self, session: &str) -> u64 {
        let Some(view) = self.view.get(session) else {
            return 0;
        };
        let mut expected = 1;
        for seq in view.keys() {
            if *seq != expected {
                break;
            }
            expected += 1;
        }
        expected - 1
    }

    fn highest(&self, session: &str) -> u64 {
        self.view
            .get(session)
            .and_then(|view| view.keys().next_back().copied())
            .unwrap_or(0)
    }

    /// Records (session, seq) -> message_id; `Some(true)` when new, `Some(false)` when
    /// already held with the same id, `None` (and a violation) when held with another id.
    fn observe(
        &mut self,
        ledger: &SharedLedger,
        session: &str,
        seq: u64,
        message_id: &str,
        how: &str,
    ) -> Option<bool> {
        let view = self.view.entry(session.to_owned()).or_default();
        match view.get(&seq) {
            None => {
                view.insert(seq, message_id.to_owned());
                Some(true)
            }
            Some(held) if held == message_id => Some(false),
            Some(held) => {
                let violation = format!(
                    "{} saw {session} seq {seq} as {held} and then as {message_id} ({how})",
                    self.user
                );
                with(ledger, |ledger| ledger.violations.push(violation));
                None
            }
        }
    }
}

type WsSink = futures::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    WsMessage,
>;

async fn send_json(sink: &mut WsSink, frame: Value) -> bool {
    sink.send(WsMessage::Text(frame.to_string().into()))
        .await
        .is_ok()
}

fn send_frame(client: &Client, client_msg_id: &str, outstanding: &Outstanding) -> Value {
    let mut frame = json!({
        "type": "send", "client_msg_id": client_msg_id, "message_type": "text",
        "content": outstanding.content,
    });
    match &client.targets[outstanding.target].1 {
        Target::User(user) => frame["receiver_id"] = json!(user),
        Target::Group(session) => frame["session_id"] = json!(session),
    }
    frame
}

/// Asks for `session` after `after` (default: the end of what the client holds without a
/// gap).
async fn request_sync(
    sink: &mut WsSink,
    client: &mut Client,
    session: &str,
    kind: &str,
    after: Option<u64>,
) -> bool {
    let after = after.unwrap_or_else(|| client.contiguous(session));
    client
        .syncs_in_flight
        .insert(session.to_owned(), Instant::now());
    send_json(
        sink,
        json!({
            "type": "sync", "session_id": session, "after_seq": after, "limit": SYNC_PAGE,
            "request_id": format!("{kind}|{session}"),
        }),
    )
    .await
}

/// Runs one client until the phase is `Stop`; returns its state for the final checks.
async fn run_client(
    mut client: Client,
    gateways: Arc<Vec<SocketAddr>>,
    ledger: SharedLedger,
    mut phase: watch::Receiver<Phase>,
    done: Arc<AtomicUsize>,
) -> Client {
    let mut gateway = client.home;
    loop {
        let current = *phase.borrow();
        if current == Phase::Stop {
            return client;
        }
        let url = format!("ws://{}/ws?token={}", gateways[gateway], client.token);
        let connected = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url),
        )
        .await;
        let Ok(Ok((stream, _))) = connected else {
            with(&ledger, |ledger| ledger.counts.connect_failures += 1);
            // Theirs may be gone for good: try the other gateway next.
            gateway = (gateway + 1) % gateways.len();
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        with(&ledger, |ledger| ledger.counts.connects += 1);
        client.connected_to.push(gateway);
        run_connection(&mut client, stream, &ledger, &mut phase, &done).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn run_connection(
    client: &mut Client,
    stream: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    ledger: &SharedLedger,
    phase: &mut watch::Receiver<Phase>,
    done: &Arc<AtomicUsize>,
) {
    let (mut sink, mut frames) = stream.split();
    // A new connection: catch up on every session, resend everything unacked.
    client.syncs_in_flight.clear();
    let sessions: Vec<String> = client.targets.iter().map(|(s, _)| s.clone()).collect();
    for session in &sessions {
        let current = *phase.borrow();
        let kind = if current == Phase::FinalSync {
            "final"
        } else {
            "catch-up"
        };
        if !request_sync(&mut sink, client, session, kind, None).await {
            return;
        }
    }
    let now = Instant::now();
    for outstanding in client.outstanding.values_mut() {
        outstanding.resend_at = now;
    }
    let mut tick = tokio::time::interval(SEND_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                ticks += 1;
                let current = *phase.borrow();
                if !on_tick(client, &mut sink, ledger, current, done, ticks).await {
                    return;
                }
            }
            frame = frames.next() => match frame {
                Some(Ok(WsMessage::Text(text))) => {
                    let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                        with(ledger, |l| l.violations.push(format!("not json: {text}")));
                        continue;
                    };
                    let current = *phase.borrow();
                    if !on_frame(client, &mut sink, ledger, current, frame).await {
                        return;
                    }
                }
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            _ = phase.changed() => {
                if *phase.borrow() == Phase::Stop {
                    let _ = sink.close().await;
                    return;
                }
            }
        }
    }
}

/// Sends what is due; `false` when the connection is gone.
async fn on_tick(
    client: &mut Client,
    sink: &mut WsSink,
    ledger: &SharedLedger,
    phase: Phase,
    done: &Arc<AtomicUsize>,
    ticks: u64,
) -> bool {
    let now = Instant::now();
    if phase == Phase::Load {
        client.next_message += 1;
        let n = client.next_message;
        let client_msg_id = format!("{}-{n}", client.user);
        let target = (n as usize) % client.targets.len();
        let outstanding = Outstanding {
            target,
            content: format!("chaos {n} from {}", client.user),
            resend_at: now + RESEND_AFTER,
        };
        let session = client.targets[target].0.clone();
        let frame = send_frame(client, &client_msg_id, &outstanding);
        with(ledger, |ledger| {
            ledger.counts.send_frames += 1;
            ledger.sent.insert(
                (client.user.clone(), client_msg_id.clone()),
                Sent {
                    session,
                    acked: None,
                },
            );
        });
        client.outstanding.insert(client_msg_id, outstanding);
        if !send_json(sink, frame).await {
            return false;
        }
    }
    let due: Vec<String> = client
        .outstanding
        .iter()
        .filter(|(_, outstanding)| outstanding.resend_at <= now)
        .map(|(id, _)| id.clone())
        .take(RESENDS_PER_TICK)
        .collect();
    for client_msg_id in due {
        let outstanding = client
            .outstanding
            .get_mut(&client_msg_id)
            .expect("due is outstanding");
        outstanding.resend_at = now + RESEND_AFTER;
        let frame = send_frame(client, &client_msg_id, &client.outstanding[&client_msg_id]);
        with(ledger, |ledger| {
            ledger.counts.send_frames += 1;
            ledger.counts.resends += 1;
        });
        if !send_json(sink, frame).await {
            return false;
        }
    }
    let sessions: Vec<String> = client.targets.iter().map(|(s, _)| s.clone()).collect();
    for session in &sessions {
        let in_flight = client
            .syncs_in_flight
            .get(session)
            .is_some_and(|sent| now.duration_since(*sent) < SYNC_RETRY_AFTER);
        if in_flight {
            continue;
        }
        if phase == Phase::FinalSync {
            if !client.final_done.contains(session)
                && !request_sync(sink, client, session, "final", None).await
            {
                return false;
            }
            continue;
        }
        if client.contiguous(session) < client.highest(session) {
            let since = *client.gap_since.entry(session.clone()).or_insert(now);
            if now.duration_since(since) >= GAP_SYNC_AFTER {
                client.gap_since.remove(session);
                with(ledger, |ledger| ledger.counts.gap_syncs += 1);
                if !request_sync(sink, client, session, "gap", None).await {
                    return false;
                }
            }
        } else {
            client.gap_since.remove(session);
        }
    }
    if phase == Phase::FinalSync
        && !client.reported_done
        && client.final_done.len() == client.targets.len()
    {
        client.reported_done = true;
        done.fetch_add(1, Ordering::SeqCst);
    }
    // A heartbeat now and then keeps an idle connection (drain, final sync) alive.
    if ticks.is_multiple_of(20) && !send_json(sink, json!({"type": "ping"})).await {
        return false;
    }
    true
}

/// Handles one server frame; `false` when the connection is gone.
async fn on_frame(
    client: &mut Client,
    sink: &mut WsSink,
    ledger: &SharedLedger,
    phase: Phase,
    frame: Value,
) -> bool {
    let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    match frame["type"].as_str().unwrap_or_default() {
        "ack" => {
            let client_msg_id = text(&frame["client_msg_id"]);
            let message_id = text(&frame["message_id"]);
            let session = text(&frame["session_id"]);
            let seq = frame["seq"].as_u64().unwrap_or(0);
            client.outstanding.remove(&client_msg_id);
            let key = (client.user.clone(), client_msg_id.clone());
            with(ledger, |ledger| {
                ledger.counts.acks += 1;
                let violation = match ledger.sent.get_mut(&key) {
                    None => Some(format!("ack for {key:?}, never sent")),
                    Some(sent) if sent.session != session => Some(format!(
                        "ack for {key:?} in {session}, sent to {}",
                        sent.session
                    )),
                    Some(sent) => match &sent.acked {
                        None => {
                            sent.acked = Some((message_id.clone(), seq));
                            None
                        }
                        Some(first) if *first == (message_id.clone(), seq) => {
                            ledger.counts.duplicate_acks += 1;
                            None
                        }
                        Some(first) => Some(format!(
                            "{key:?} acked as {first:?} and then as ({message_id}, {seq})"
                        )),
                    },
                };
                ledger.violations.extend(violation);
            });
            client.observe(ledger, &session, seq, &message_id, "ack");
        }
        "deliver" => {
            let message = &frame["message"];
            let session = text(&message["session_id"]);
            let seq = message["seq"].as_u64().unwrap_or(0);
            match client.observe(
                ledger,
                &session,
                seq,
                &text(&message["message_id"]),
                "deliver",
            ) {
                Some(true) => with(ledger, |ledger| ledger.counts.delivered += 1),
                Some(false) => with(ledger, |ledger| ledger.counts.duplicate_deliveries += 1),
                None => {}
            }
        }
        "messages" => {
            let session = text(&frame["session_id"]);
            let request_id = text(&frame["request_id"]);
            let kind = request_id.split('|').next().unwrap_or_default().to_owned();
            let mut last = None;
            for message in frame["messages"].as_array().into_iter().flatten() {
                let seq = message["seq"].as_u64().unwrap_or(0);
                last = Some(seq);
                match client.observe(ledger, &session, seq, &text(&message["message_id"]), "sync") {
                    Some(true) => with(ledger, |ledger| ledger.counts.synced_new += 1),
                    Some(false) => with(ledger, |ledger| ledger.counts.sync_overlap += 1),
                    None => {}
                }
            }
            if frame["has_more"] == true {
                return request_sync(sink, client, &session, &kind, last).await;
            }
            client.syncs_in_flight.remove(&session);
            if kind == "final" && phase == Phase::FinalSync {
                client.final_done.insert(session);
            }
        }
        "error" => {
            let code = text(&frame["code"]);
            with(ledger, |ledger| {
                *ledger.counts.errors.entry(code.clone()).or_default() += 1;
            });
            if let Some(client_msg_id) = frame["client_msg_id"].as_str() {
                match code.as_str() {
                    "unavailable" | "rate_limited" => {
                        if let Some(outstanding) = client.outstanding.get_mut(client_msg_id) {
                            outstanding.resend_at = Instant::now() + RESEND_AFTER_ERROR;
                        }
                    }
                    _ => {
                        let violation =
                            format!("{} send {client_msg_id} refused: {frame}", client.user);
                        with(ledger, |ledger| ledger.violations.push(violation));
                    }
                }
            } else if let Some(request_id) = frame["request_id"].as_str() {
                // A sync the reader could not answer (a store is down): ask again later.
                if let Some(session) = request_id.split('|').nth(1) {
                    client.syncs_in_flight.remove(session);
                }
                if code != "unavailable" {
                    let violation = format!("{} sync refused: {frame}", client.user);
                    with(ledger, |ledger| ledger.violations.push(violation));
                }
            }
        }
        _ => {}
    }
    true
}

/// Applies the migrations to the private Postgres with the real tool.
async fn migrate(postgres_url: &str) {
    let status = tokio::process::Command::new(chatify_e2e::workspace_binary("chatify-migrate"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("POSTGRES_URL", postgres_url)
        .env("RUST_LOG", "warn")
        .status()
        .await
        .expect("run chatify-migrate");
    assert!(status.success(), "chatify-migrate failed");
}

/// One stored message as the test compares it.
type StoredRow = (String, String, u64, String, String); // (message_id, session, seq, sender, client_msg_id)

async fn postgres_rows(pool: &sqlx::PgPool, sessions: &[String]) -> Vec<StoredRow> {
    let rows: Vec<(String, String, i64, String, String)> = sqlx::query_as(
        "SELECT message_id::text, session_id, seq, sender_id, client_msg_id FROM messages \
         WHERE session_id = ANY($1)",
    )
    .bind(sessions)
    .fetch_all(pool)
    .await
    .expect("read the archive");
    rows.into_iter()
        .map(|(id, session, seq, sender, client_msg_id)| {
            (id, session, seq as u64, sender, client_msg_id)
        })
        .collect()
}

async fn mongo_rows(url: &str, sessions: &[String]) -> Vec<StoredRow> {
    let client = mongodb::Client::with_uri_str(url).await.expect("mongo");
    let collection = client
        .database("chatify")
        .collection::<mongodb::bson::Document>("messages");
    let documents: Vec<mongodb::bson::Document> = collection
        .find(mongodb::bson::doc! {"session_id": {"$in": sessions.to_vec()}})
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("documents");
    documents
        .iter()
        .map(|document| {
            let text = |key: &str| document.get_str(key).unwrap_or_default().to_owned();
            (
                text("_id"),
                text("session_id"),
                document.get_i64("seq").unwrap_or(-1) as u64,
                text("sender_id"),
                text("client_msg_id"),
            )
        })
        .collect()
}

/// Checks one store against what clients were acked; returns the violations and, per
/// session, seq -> message_id.
fn check_store(
    store: &str,
    rows: &[StoredRow],
    ledger: &Ledger,
    sessions: &[String],
) -> (Vec<String>, HashMap<String, BTreeMap<u64, String>>) {
    let mut violations = Vec::new();
    let mut by_key: HashMap<(String, String), Vec<&StoredRow>> = HashMap::new();
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    let mut by_session: HashMap<String, BTreeMap<u64, String>> = HashMap::new();
    for row in rows {
        by_key
            .entry((row.3.clone(), row.4.clone()))
            .or_default()
            .push(row);
        *by_id.entry(&row.0).or_default() += 1;
        if let Some(other) = by_session
            .entry(row.1.clone())
            .or_default()
            .insert(row.2, row.0.clone())
        {
            violations.push(format!(
                "{store}: {} seq {} held by {other} and {}",
                row.1, row.2, row.0
            ));
        }
    }
    for (id, count) in &by_id {
        if *count > 1 {
            violations.push(format!("{store}: message {id} stored {count} times"));
        }
    }
    for (key, sent) in &ledger.sent {
        let stored = by_key.get(key).map(Vec::as_slice).unwrap_or_default();
        match (&sent.acked, stored) {
            (Some((id, seq)), [row]) => {
                if (&row.0, &row.1, row.2) != (id, &sent.session, *seq) {
                    violations.push(format!(
                        "{store}: {key:?} acked as ({id}, {}, {seq}), stored as {row:?}",
                        sent.session
                    ));
                }
            }
            (Some(acked), []) => {
                violations.push(format!("{store}: {key:?} acked as {acked:?}, not stored"));
            }
            (_, many @ [_, _, ..]) => {
                violations.push(format!(
                    "{store}: {key:?} stored {} times: {many:?}",
                    many.len()
                ));
            }
            // Never acked: reported once, by the caller.
            (None, _) => {}
        }
    }
    for key in by_key.keys() {
        if !ledger.sent.contains_key(key) {
            violations.push(format!("{store}: {key:?} stored, never sent"));
        }
    }
    for session in sessions {
        let seqs: Vec<u64> = by_session
            .get(session)
            .map(|view| view.keys().copied().collect())
            .unwrap_or_default();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        if seqs != expected {
            let missing: Vec<u64> = (1..=seqs.last().copied().unwrap_or(0))
                .filter(|seq| !seqs.contains(seq))
                .collect();
            violations.push(format!(
                "{store}: {session} seqs are not 1..={}: missing {missing:?}",
                seqs.len()
            ));
        }
    }
    (violations, by_session)
}

fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_nothing_acked_is_lost_or_duplicated_and_every_view_matches_the_store() {
    let mut broker = PrivateBroker::start().await;
    let mut redis = PrivateRedis::start().await;
    let mut postgres = PrivatePostgres::start().await;
    let mongo = PrivateMongo::start().await;
    let postgres_url = postgres.url("chatify");
    migrate(&postgres_url).await;
    let mut stack = Stack::start(StackOptions {
        nodes: vec!["gw-a".into(), "gw-b".into()],
        kafka_bootstrap_servers: Some(broker.bootstrap()),
        gateway_env: vec![
            ("CHATIFY_PRESENCE_GRACE_MS".into(), "1500".into()),
            // Routes come back within 2 s after Redis lost them.
            ("CHATIFY_ROUTE_REFRESH_MS".into(), "2000".into()),
            // tansu 0.6 cannot take an idempotent producer across its restart: a produce
            // from a producer id it knew before panics its storage task
            // (`idempotent_message_check`: "more or less than one row") and the broker
            // answers nothing after (docs/RELIABILITY.md). The gateways' upstream
            // producers live through the restart, so they run the non-idempotent mode
            // here; the writer dedupes, and this test checks nothing is stored twice.
            ("CHATIFY_UPSTREAM_IDEMPOTENCE".into(), "false".into()),
        ],
        service_env: vec![
            ("REDIS_URL".into(), redis.url()),
            ("POSTGRES_URL".into(), postgres_url.clone()),
            ("MONGO_URL".into(), mongo.url()),
            ("CHATIFY_WRITER_RETRY_MAX_MS".into(), "2000".into()),
        ]
        .into_iter()
        .chain(kafka_debug_env())
        .collect(),
        ..StackOptions::default()
    })
    .await;

    let users: Vec<String> = (0..USERS).map(|i| stack.user(&format!("u{i}"))).collect();
    let grpc = stack.reader_grpc.expect("reader");
    let group = GroupServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("reader grpc")
        .create_group(internal_request(
            &users[0],
            CreateGroupRequest {
                user_id: users[0].clone(),
                name: "chaos".into(),
                member_ids: users[1..GROUP_MEMBERS].to_vec(),
            },
        ))
        .await
        .expect("CreateGroup")
        .into_inner()
        .session_id;

    let gateways = Arc::new(stack.gateways.iter().map(|g| g.ws).collect::<Vec<_>>());
    let ledger = SharedLedger::default();
    let done = Arc::new(AtomicUsize::new(0));
    let (phase_tx, phase_rx) = watch::channel(Phase::Load);
    let mut sessions: Vec<String> = vec![group.clone()];
    let mut tasks = Vec::new();
    for (index, user) in users.iter().enumerate() {
        let partner = &users[index ^ 1];
        let mut targets = vec![(p2p_session(user, partner), Target::User(partner.clone()))];
        if index < GROUP_MEMBERS {
            targets.push((group.clone(), Target::Group(group.clone())));
        }
        if index % 2 == 0 {
            sessions.push(targets[0].0.clone());
        }
        let client = Client {
            user: user.clone(),
            token: token(user, "phone").0,
            home: index % 2,
            targets,
            next_message: 0,
            outstanding: BTreeMap::new(),
            view: HashMap::new(),
            syncs_in_flight: HashMap::new(),
            gap_since: HashMap::new(),
            final_done: HashSet::new(),
            reported_done: false,
            connected_to: Vec::new(),
        };
        tasks.push(tokio::spawn(run_client(
            client,
            Arc::clone(&gateways),
            Arc::clone(&ledger),
            phase_rx.clone(),
            Arc::clone(&done),
        )));
        // Spread the clients' send ticks over the interval.
        tokio::time::sleep(SEND_INTERVAL / USERS as u32).await;
    }

    // loadgen's chat load beside the test's own clients (pairs of its own users on gateway
    // A, which is never killed): the steady load a user of the product would run. Its
    // messages are not in the ledger (loadgen does not resend or sync, so under these
    // faults its loss and gap counts are the faults' effect, not a verdict): they are
    // load, and loadgen itself must end on its own, never hang or panic.
    let loadgen_json = std::env::temp_dir().join(chatify_e2e::unique_name("chaos-loadgen"));
    let mut loadgen = std::process::Command::new(chatify_e2e::workspace_binary("loadgen"))
        .args([
            "chat",
            "--target",
            &format!("ws://{}/ws", stack.gateways[0].ws),
        ])
        .args(["-n", &LOADGEN_CLIENTS.to_string()])
        .args(["--rate", &LOADGEN_RATE.to_string()])
        .args(["--duration", &LOAD.as_secs().to_string()])
        .args([
            "--grace",
            "20",
            "--heartbeat-ms",
            "5000",
            "--quiet",
            "--json",
        ])
        .arg(&loadgen_json)
        .env("JWT_SECRET", chatify_e2e::stack::JWT_SECRET)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start loadgen (cargo build --workspace --bins)");

    // The faults, on schedule.
    let start = Instant::now();
    let mut injected: Vec<String> = Vec::new();
    for (at, fault) in schedule() {
        tokio::time::sleep_until((start + Duration::from_secs(at)).into()).await;
        let writer = stack.writer.as_mut().expect("writer");
        match fault {
            Fault::KillWriter => {
                writer.kill();
                tokio::time::sleep(Duration::from_millis(500)).await;
                writer.restart();
            }
            Fault::RestartBroker => {
                broker.kill();
                tokio::time::sleep(Duration::from_secs(2)).await;
                broker.restart().await;
            }
            Fault::WipeRedis => redis.restart_empty().await,
            Fault::StopPostgres => postgres.stop_server().await,
            Fault::StartPostgres => postgres.start_server().await,
            Fault::KillGateway => stack.gateways[1].service.kill(),
        }
        let line = format!(
            "{:>5.1}s {fault:?} (at {at}s on schedule)",
            start.elapsed().as_secs_f64()
        );
        eprintln!("chaos: {line}");
        injected.push(line);
    }
    tokio::time::sleep_until((start + LOAD).into()).await;
    let load_seconds = start.elapsed().as_secs_f64();

    // Drain: no new messages; clients resend until everything is acked.
    phase_tx.send_replace(Phase::Drain);
    let drain_start = Instant::now();
    loop {
        let unacked = with(&ledger, |ledger| {
            ledger.sent.values().filter(|s| s.acked.is_none()).count()
        });
        if unacked == 0 || drain_start.elapsed() > DRAIN_MAX {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drain_seconds = drain_start.elapsed().as_secs_f64();
    // Final sync: every client reads every session of its to the end.
    phase_tx.send_replace(Phase::FinalSync);
    let final_start = Instant::now();
    while done.load(Ordering::SeqCst) < USERS && final_start.elapsed() < FINAL_SYNC_MAX {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let final_synced = done.load(Ordering::SeqCst);
    phase_tx.send_replace(Phase::Stop);
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await.expect("client task"));
    }
    let total_seconds = start.elapsed().as_secs_f64();
    let loadgen_deadline = start + LOAD + LOADGEN_END_MAX;
    let loadgen_status = loop {
        match loadgen.try_wait().expect("wait for loadgen") {
            Some(status) => break Some(status),
            None if Instant::now() > loadgen_deadline => {
                let _ = loadgen.kill();
                break None;
            }
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let loadgen_result: Option<Value> = std::fs::read(&loadgen_json)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());

    // The stores, read back.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&postgres_url)
        .await
        .expect("connect to the private postgres");
    let pg_rows = postgres_rows(&pool, &sessions).await;
    let mongo_rows = mongo_rows(&mongo.url(), &sessions).await;

    let ledger = Arc::try_unwrap(ledger)
        .expect("clients are done")
        .into_inner()
        .expect("ledger");
    let mut violations = ledger.violations.clone();
    let never_acked: Vec<&(String, String)> = ledger
        .sent
        .iter()
        .filter(|(_, sent)| sent.acked.is_none())
        .map(|(key, _)| key)
        .collect();
    if !never_acked.is_empty() {
        violations.push(format!(
            "{} sent messages never acked after the drain: {never_acked:?}",
            never_acked.len()
        ));
    }
    let (pg_violations, store) = check_store("postgres", &pg_rows, &ledger, &sessions);
    violations.extend(pg_violations);
    let (mongo_violations, mongo_store) = check_store("mongo", &mongo_rows, &ledger, &sessions);
    violations.extend(mongo_violations);
    if mongo_store != store {
        violations.push("mongo and postgres hold different (session, seq) -> message_id".into());
    }
    if final_synced < USERS {
        violations.push(format!(
            "only {final_synced} of {USERS} clients finished the final sync"
        ));
    }
    // Every client's view equals the store, session by session.
    let mut moved = 0;
    for client in &clients {
        if client
            .connected_to
            .iter()
            .any(|gateway| *gateway != client.home)
        {
            moved += 1;
        }
        for (session, _) in &client.targets {
            let empty = BTreeMap::new();
            let expected = store.get(session).unwrap_or(&empty);
            let view = client.view.get(session).unwrap_or(&empty);
            if view != expected {
                let missing: Vec<&u64> = expected
                    .keys()
                    .filter(|seq| !view.contains_key(seq))
                    .collect();
                let wrong: Vec<&u64> = view
                    .iter()
                    .filter(|(seq, id)| expected.get(seq) != Some(id))
                    .map(|(seq, _)| seq)
                    .collect();
                violations.push(format!(
                    "{}'s view of {session} differs from the store: missing seqs {missing:?}, \
                     not stored as seen {wrong:?}",
                    client.user
                ));
            }
        }
    }
    // The clients of the killed gateway all went on to the other one.
    for client in &clients {
        if client.home == 1 && client.connected_to.last() != Some(&0) {
            violations.push(format!(
                "{} (of the killed gateway) ended on gateways {:?}",
                client.user, client.connected_to
            ));
        }
    }

    let loadgen_summary = match (&loadgen_status, &loadgen_result) {
        (Some(status), Some(result)) if status.success() => format!(
            "loadgen chat ({LOADGEN_CLIENTS} clients, {LOADGEN_RATE} msg/s offered): counts {}, \
             correctness {}",
            result["counts"], result["correctness"]
        ),
        (None, _) => {
            violations.push(format!(
                "loadgen did not end within {LOADGEN_END_MAX:?} after the load"
            ));
            "loadgen: killed, it did not end".into()
        }
        (status, _) => {
            violations.push(format!("loadgen ended with {status:?} and no result"));
            format!("loadgen: {status:?}")
        }
    };
    let _ = std::fs::remove_file(&loadgen_json);

    let acked = ledger.sent.values().filter(|s| s.acked.is_some()).count();
    let counts = &ledger.counts;
    eprintln!(
        "chaos summary: load {load_seconds:.0}s, drain {drain_seconds:.1}s, total {total_seconds:.0}s\n\
         faults injected ({}):\n  {}\n\
         messages: sent {} (send frames {}, resends {}), acked {acked} (acks received {}, \
         repeated acks {}), stored postgres {}, stored mongo {}, sessions {}\n\
         clients: delivered {} (duplicates seen and suppressed {}), synced new {}, sync \
         overlap {}, gap syncs {}, connects {} (failed attempts {}), clients that moved \
         gateway {moved}, errors {:?}\n\
         {loadgen_summary}\n\
         violations: {}",
        injected.len(),
        injected.join("\n  "),
        ledger.sent.len(),
        counts.send_frames,
        counts.resends,
        counts.acks,
        counts.duplicate_acks,
        pg_rows.len(),
        mongo_rows.len(),
        sessions.len(),
        counts.delivered,
        counts.duplicate_deliveries,
        counts.synced_new,
        counts.sync_overlap,
        counts.gap_syncs,
        counts.connects,
        counts.connect_failures,
        counts.errors,
        violations.len(),
    );
    if !violations.is_empty() {
        let logs: String = stack
            .services()
            .map(|service| {
                format!(
                    "--- {} ({}), last lines:\n{}\n",
                    service.name,
                    service.log.display(),
                    log_tail(&service.log)
                )
            })
            .collect();
        panic!(
            "{} violations:\n{}\n{logs}",
            violations.len(),
            violations
                .iter()
                .take(50)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(ledger.sent.len() >= USERS * 10, "the load ran");
}
