//! storage-reader QueryMessages and ListSessions over real gRPC, side by side with a raw
//! Redis read of the same data in the same run (issue 5).
//!
//! Seeds one chat of `--messages` messages and one user with `--sessions` sessions through
//! the writer's own store code (Postgres archive + Redis hot cache), starts the reader's
//! service in this process on loopback (on its own tokio runtime, threads `reader-server`,
//! apart from the callers' runtime, threads `bench-client`), then runs each case for
//! `--seconds` with `--concurrency` callers, closed loop:
//! - `raw-redis`: `ZREVRANGEBYSCORE` of the newest 51 hot-cache entries (what a cache-hit
//!   page reads), decoded;
//! - `query-cache`: QueryMessages, newest 50, served by the hot cache;
//! - `query-archive`: the same with the hot cache dropped (Postgres path);
//! - `list-sessions`: ListSessions, first 50 of the user's sessions;
//! - `grpc-floor`: the same QueryMessages call, same callers, against a tonic server on the
//!   reader's runtime that answers every call with the same page, prebuilt from the hot
//!   cache's entries (no token check, no Redis, nothing but gRPC over loopback): the most
//!   any gRPC service returning this page can do here, so `grpc-floor ÷ raw-redis` is the
//!   ceiling of the query-cache ratio on this machine.
//!
//! Both sides decode what they read: raw-redis decodes each of the 51 entries into a
//! `ChatMessage`, the gRPC callers decode each response in full (50 `ChatMessage`s). The
//! gRPC callers use [`GrpcCaller`] (`--grpc-client h2`, the default): unary gRPC on one
//! HTTP/2 connection with the `h2` crate, written and read by the calling task, because
//! tonic's `Channel` costs the callers about as much CPU per call as the reader spends
//! serving it (a `Buffer` worker task, hyper's client task and a task spawned per call),
//! and callers, reader and redis-server share this box's cores. The wire traffic is the
//! same as tonic's; `--grpc-client tonic` calls through tonic's generated client as
//! gateway-uring's reader bridge does. Neither side was made to skip work the other does.
//!
//! Each row also says how many cores the callers, the reader and redis-server used during
//! the case (thread CPU time from /proc, redis-server's from `INFO cpu`), so a run on a
//! small machine shows which of them was the bottleneck, and the reader's CPU per call
//! (which other load on the machine changes less than calls/s).
//!
//! `--rounds N` runs raw-redis and query-cache N times alternately (then the archive and
//! list-sessions cases N times each) and ends with the median of each case and the median
//! of the per-round query-cache ÷ raw-redis ratios. `--cases` picks the cases to run (e.g.
//! `--cases query-cache --seconds 30` to profile one).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::{BufMut as _, Bytes, BytesMut};
use chatify_core::ids::{MessageId, SessionId};
use chatify_core::keys;
use chatify_core::stores::Stores;
use chatify_proto::Message as _;
use chatify_proto::client::v1::{ChatMessage, MessageType};
use chatify_proto::storage::v1::storage_service_client::StorageServiceClient;
use chatify_proto::storage::v1::storage_service_server::{StorageService, StorageServiceServer};
use chatify_proto::storage::v1::{
    self as v1, ListSessionsRequest, ListSessionsResponse, QueryMessagesRequest,
    QueryMessagesResponse,
};
use clap::Parser;
use hdrhistogram::Histogram;
use storage_writer::cache::{self, CacheLimits, StoredMessage};
use storage_writer::record::{Incoming, Origin, Position};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SECRET: &str = "reader-bench-secret-that-is-long-enough-0123";

#[derive(Debug, Parser)]
#[command(about = "storage-reader vs raw Redis, one run of each case")]
struct Args {
    #[arg(long, default_value_t = 200)]
    messages: usize,
    #[arg(long, default_value_t = 500)]
    sessions: usize,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Worker threads of the callers' runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Worker threads of the reader's runtime.
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
    /// Times each case runs (raw-redis and query-cache alternate).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// How the gRPC cases call the reader.
    #[arg(long, value_enum, default_value_t = Client::H2)]
    grpc_client: Client,
    /// HTTP/2 connections the `h2` callers spread their calls over (round robin): one
    /// connection is one task on each side that reads and writes every call's frames.
    #[arg(long, default_value_t = 1)]
    grpc_connections: usize,
    /// Cases to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "raw-redis,query-cache,grpc-floor,query-archive,list-sessions"
    )]
    cases: Vec<Case>,
}

/// The gRPC callers' client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Client {
    /// [`GrpcCaller`]: requests written and responses read by the calling task.
    H2,
    /// tonic's generated client over a `Channel` (what gateway-uring's reader bridge uses).
    Tonic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Case {
    RawRedis,
    QueryCache,
    QueryArchive,
    ListSessions,
    GrpcFloor,
}

fn incoming(sender: &str, session: &SessionId, i: usize, at: i64) -> Incoming {
    let client_msg_id = format!("c{i}");
    Incoming {
        position: Position {
            partition: 0,
            offset: i as i64,
        },
        origin: Origin {
            node_id: "bench".into(),
            connection_id: 0,
        },
        sender_id: sender.to_owned(),
        device_id: "bench".into(),
        session: session.clone(),
        message_id: MessageId::derive(sender, &client_msg_id, at as u64),
        client_msg_id,
        message_type: MessageType::Text,
        content: format!("message {i} {}", "x".repeat(80)),
        burn_after_seconds: None,
        request_id: None,
        timestamp_ms: at,
    }
}

fn token(user: &str) -> anyhow::Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": user, "did": "bench", "jti": format!("bench-{user}"), "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )?)
}

/// Thread-name prefix of the reader's runtime.
const SERVER_THREADS: &str = "reader-server";
/// Thread-name prefix of the callers' runtime.
const CLIENT_THREADS: &str = "bench-client";

fn main() -> anyhow::Result<()> {
    chatify_core::config::load_env_file()?;
    let args = Args::parse();
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.server_threads.max(1))
        .thread_name(SERVER_THREADS)
        .enable_all()
        .build()?;
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .thread_name(CLIENT_THREADS)
        .enable_all()
        .build()?;
    client.block_on(run(args, server.handle().clone()))
}

async fn run(args: Args, server: tokio::runtime::Handle) -> anyhow::Result<()> {
    let config: storage_reader::config::Config = chatify_core::config::parse_from([
        "storage-reader".to_owned(),
        format!("--jwt-secret={SECRET}"),
    ])?;
    let stores = Stores::open(&config.redis, &config.postgres, &config.mongo).await?;
    let mut redis = redis::aio::ConnectionManager::new(stores.redis.clone()).await?;
    let tag = format!(
        "{}{}",
        std::process::id(),
        chrono::Utc::now().timestamp_millis() % 1_000_000
    );
    let (alice, bob) = (format!("a{tag}"), format!("b{tag}"));
    let chat = SessionId::single(&alice, &bob)?;
    let now = chrono::Utc::now().timestamp_millis();

    // Seed through the writer's store code: the chat, then `sessions` chats of one user.
    let messages: Vec<Incoming> = (0..args.messages)
        .map(|i| incoming(&alice, &chat, i, now + i as i64))
        .collect();
    let mut hub_chats = Vec::new();
    for i in 0..args.sessions {
        let peer = format!("p{i}x{tag}");
        let session = SessionId::single(&bob, &peer)?;
        hub_chats.push((
            incoming(&peer, &session, 0, now + i as i64),
            vec![bob.clone(), peer],
        ));
    }
    let rows: Vec<storage_writer::archive::Row<'_>> = messages
        .iter()
        .enumerate()
        .map(|(i, message)| storage_writer::archive::Row {
            message,
            seq: i as u64 + 1,
        })
        .collect();
    storage_writer::archive::write_postgres(&stores.postgres, &rows)
        .await?
        .map_err(|collision| anyhow::anyhow!("seq collision {collision:?}"))?;
    let limits = CacheLimits {
        hot_cache_messages: args.messages,
        hot_cache_ttl_seconds: 3600,
    };
    let stored: Vec<StoredMessage<'_>> = rows
        .iter()
        .map(|row| StoredMessage {
            message: row.message,
            seq: row.seq,
        })
        .collect();
    let chat_members = vec![alice.clone(), bob.clone()];
    let members = std::iter::once((&chat, chat_members.as_slice())).collect();
    cache::write(&mut redis, &stored, &members, limits).await?;
    for (message, members) in &hub_chats {
        let stored = [StoredMessage { message, seq: 1 }];
        let members = std::iter::once((&message.session, members.as_slice())).collect();
        cache::write(&mut redis, &stored, &members, limits).await?;
    }

    // The reader, in this process, on loopback, on its own runtime (its store clients too,
    // so their I/O runs on the reader's threads).
    let addr = server
        .spawn({
            let config = config.clone();
            async move { serve(config).await }
        })
        .await
        .context("reader task")??;
    let bearer = format!("Bearer {}", token(&bob)?);
    let caller = Caller::connect(&args, addr, &bearer).await?;

    // The transport floor: the page a cache hit serves, prebuilt once.
    let floor = if args.cases.contains(&Case::GrpcFloor) {
        let page = floor_page(&mut redis, &chat).await?;
        let addr = server
            .spawn(serve_floor(page))
            .await
            .context("floor task")??;
        Some(Caller::connect(&args, addr, &bearer).await?)
    } else {
        None
    };

    println!(
        "| case | concurrency | calls/s | p50 ms | p99 ms | max ms | entries/call | cores: callers / reader / redis | reader µs CPU / call |\n|---|---|---|---|---|---|---|---|---|"
    );
    let duration = Duration::from_secs(args.seconds);
    let mut stats = redis.clone();
    let hot = keys::session_hot_cache(&chat);
    let raw_call = {
        let redis = redis.clone();
        let hot = hot.clone();
        move || {
            let mut redis = redis.clone();
            let hot = hot.clone();
            async move {
                let entries: Vec<Vec<u8>> = redis::cmd("ZREVRANGEBYSCORE")
                    .arg(&hot)
                    .arg("+inf")
                    .arg("-inf")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(51)
                    .query_async(&mut redis)
                    .await?;
                let mut decoded = 0;
                for entry in entries {
                    ChatMessage::decode(entry.as_slice())?;
                    decoded += 1;
                }
                anyhow::Ok(decoded)
            }
        }
    };
    let query_on = |caller: Caller| {
        let request = QueryMessagesRequest {
            session_id: chat.to_string(),
            direction: chatify_proto::storage::v1::Direction::Backward as i32,
            limit: 50,
            ..Default::default()
        };
        move || {
            let caller = caller.clone();
            let request = request.clone();
            async move {
                let page = caller.query_messages(request).await?;
                anyhow::Ok(page.messages.len())
            }
        }
    };
    let query = query_on(caller.clone());
    let floor_query = floor.map(query_on);
    let sessions_call = {
        let caller = caller.clone();
        move || {
            let caller = caller.clone();
            async move {
                let page = caller
                    .list_sessions(ListSessionsRequest {
                        limit: 50,
                        ..Default::default()
                    })
                    .await?;
                anyhow::Ok(page.sessions.len())
            }
        }
    };
    let wants = |case: Case| args.cases.contains(&case);
    let sessions_name = format!("list-sessions ({} sessions)", args.sessions + 1);
    let mut results: Vec<(&str, Vec<Outcome>)> = Vec::new();
    let (mut raw, mut cached, mut floors) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        if wants(Case::RawRedis) {
            let outcome =
                run_case(&mut stats, args.concurrency, duration, raw_call.clone()).await?;
            print_row("raw-redis", args.concurrency, &outcome);
            raw.push(outcome);
        }
        if wants(Case::QueryCache) {
            let outcome = run_case(&mut stats, args.concurrency, duration, query.clone()).await?;
            print_row("query-cache", args.concurrency, &outcome);
            cached.push(outcome);
        }
        if let Some(floor_query) = &floor_query {
            let outcome =
                run_case(&mut stats, args.concurrency, duration, floor_query.clone()).await?;
            print_row("grpc-floor", args.concurrency, &outcome);
            floors.push(outcome);
        }
    }
    let ratios_of = |outcomes: &[Outcome]| -> Vec<f64> {
        raw.iter()
            .zip(outcomes)
            .map(|(raw, outcome)| outcome.calls_per_second() / raw.calls_per_second())
            .collect()
    };
    let ratios = ratios_of(&cached);
    let floor_ratios = ratios_of(&floors);
    results.push(("raw-redis", raw));
    results.push(("query-cache", cached));
    results.push(("grpc-floor", floors));
    if wants(Case::QueryArchive) {
        redis::cmd("DEL")
            .arg(keys::session_hot_cache(&chat))
            .exec_async(&mut redis)
            .await?;
        let mut archive = Vec::new();
        for _ in 0..args.rounds {
            let outcome = run_case(&mut stats, args.concurrency, duration, query.clone()).await?;
            print_row("query-archive", args.concurrency, &outcome);
            archive.push(outcome);
        }
        results.push(("query-archive", archive));
    }
    if wants(Case::ListSessions) {
        let mut sessions = Vec::new();
        for _ in 0..args.rounds {
            let outcome = run_case(
                &mut stats,
                args.concurrency,
                duration,
                sessions_call.clone(),
            )
            .await?;
            print_row(&sessions_name, args.concurrency, &outcome);
            sessions.push(outcome);
        }
        results.push((&sessions_name, sessions));
    }
    println!("\nmedians of {} round(s):\n", args.rounds);
    println!(
        "| case | calls/s | p50 ms | p99 ms | µs CPU / call: callers / reader / redis |\n|---|---|---|---|---|"
    );
    for (name, outcomes) in &results {
        if outcomes.is_empty() {
            continue;
        }
        let ms = |q: f64| {
            median(
                outcomes
                    .iter()
                    .map(|outcome| outcome.latency.value_at_quantile(q) as f64 / 1000.0)
                    .collect(),
            )
        };
        let per_call = |index: usize| {
            median(
                outcomes
                    .iter()
                    .map(|outcome| outcome.micros_per_call(index))
                    .collect(),
            )
        };
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.1} / {:.1} / {:.1} |",
            median(outcomes.iter().map(Outcome::calls_per_second).collect()),
            ms(0.5),
            ms(0.99),
            per_call(0),
            per_call(1),
            per_call(2),
        );
    }
    for (name, ratios) in [("query-cache", ratios), ("grpc-floor", floor_ratios)] {
        if ratios.is_empty() {
            continue;
        }
        let shown: Vec<String> = ratios.iter().map(|ratio| format!("{ratio:.2}")).collect();
        println!(
            "\n{name} ÷ raw-redis per round: {}; median {:.2}",
            shown.join(" / "),
            median(ratios)
        );
    }
    Ok(())
}

/// The page `grpc-floor` answers: the newest 50 hot-cache entries of `chat`, as a cache-hit
/// QueryMessages serves them (already encoded, passed through).
async fn floor_page(
    redis: &mut redis::aio::ConnectionManager,
    chat: &SessionId,
) -> anyhow::Result<QueryMessagesResponse> {
    let entries: Vec<Vec<u8>> = redis::cmd("ZREVRANGEBYSCORE")
        .arg(keys::session_hot_cache(chat))
        .arg("+inf")
        .arg("-inf")
        .arg("LIMIT")
        .arg(0)
        .arg(50)
        .query_async(redis)
        .await?;
    let encoded_messages = entries
        .into_iter()
        .map(chatify_proto::page::EncodedChatMessage::new)
        .collect::<Result<Vec<_>, _>>()?;
    let next_cursor = encoded_messages
        .last()
        .map(|entry| entry.seq().to_string())
        .unwrap_or_default();
    Ok(QueryMessagesResponse {
        has_more: true,
        next_cursor,
        encoded_messages,
        ..Default::default()
    })
}

/// Answers QueryMessages with `page`, every time; the other methods are unimplemented.
struct Floor {
    page: QueryMessagesResponse,
}

type Answer<T> = Result<tonic::Response<T>, tonic::Status>;

fn floor_only<T>() -> Answer<T> {
    Err(tonic::Status::unimplemented(
        "the floor serves QueryMessages only",
    ))
}

#[tonic::async_trait]
impl StorageService for Floor {
    async fn query_messages(
        &self,
        _: tonic::Request<QueryMessagesRequest>,
    ) -> Answer<QueryMessagesResponse> {
        Ok(tonic::Response::new(self.page.clone()))
    }
    async fn get_message(
        &self,
        _: tonic::Request<v1::GetMessageRequest>,
    ) -> Answer<v1::GetMessageResponse> {
        floor_only()
    }
    async fn delete_message(
        &self,
        _: tonic::Request<v1::DeleteMessageRequest>,
    ) -> Answer<v1::DeleteMessageResponse> {
        floor_only()
    }
    async fn recall_message(
        &self,
        _: tonic::Request<v1::RecallMessageRequest>,
    ) -> Answer<v1::RecallMessageResponse> {
        floor_only()
    }
    async fn clear_session(
        &self,
        _: tonic::Request<v1::ClearSessionRequest>,
    ) -> Answer<v1::ClearSessionResponse> {
        floor_only()
    }
    async fn mark_message_read(
        &self,
        _: tonic::Request<v1::MarkMessageReadRequest>,
    ) -> Answer<v1::MarkMessageReadResponse> {
        floor_only()
    }
    async fn list_sessions(
        &self,
        _: tonic::Request<ListSessionsRequest>,
    ) -> Answer<ListSessionsResponse> {
        floor_only()
    }
    async fn get_unread_count(
        &self,
        _: tonic::Request<v1::GetUnreadCountRequest>,
    ) -> Answer<v1::GetUnreadCountResponse> {
        floor_only()
    }
}

/// Serves [`Floor`] on loopback with the reader's server settings (see [`serve`]).
async fn serve_floor(page: QueryMessagesResponse) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(StorageServiceServer::new(Floor { page }))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );
    Ok(addr)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Starts the reader's service on loopback; returns its address.
async fn serve(config: storage_reader::config::Config) -> anyhow::Result<std::net::SocketAddr> {
    let stores = Stores::open(&config.redis, &config.postgres, &config.mongo).await?;
    let redis = redis::aio::ConnectionManager::new(stores.redis.clone()).await?;
    let storage = storage_reader::service::Storage {
        gatekeeper: storage_reader::identity::Gatekeeper::new(
            chatify_core::auth::Authenticator::hs256(SECRET.as_bytes()),
            None,
            redis.clone(),
        ),
        postgres: stores.postgres.clone(),
        redis,
        hot: Arc::new(config.hot_redis(&stores.redis)?),
        mongo: stores.mongo.collection("messages"),
        notifier: storage_reader::notify::Notifier {
            producer: chatify_core::producer::RenewableProducer::new(
                rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", &config.kafka.kafka_bootstrap_servers)
                    .clone(),
                "reader",
            )?,
            topics: config.kafka.topics(),
        },
        recall_window_ms: 120_000,
        archive: storage_reader::store::ArchiveStore::Postgres,
        marks_ttl_seconds: 3600,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(StorageServiceServer::new(storage))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );
    Ok(addr)
}

struct Outcome {
    calls: u64,
    seconds: f64,
    entries: usize,
    latency: Histogram<u64>,
    /// Cores used during the case: callers, reader, redis-server.
    cores: [f64; 3],
}

impl Outcome {
    fn calls_per_second(&self) -> f64 {
        self.calls as f64 / self.seconds
    }

    /// CPU time per call in µs of the callers (0), the reader (1) or redis-server (2).
    fn micros_per_call(&self, index: usize) -> f64 {
        self.cores[index] * 1e6 / self.calls_per_second().max(1e-9)
    }
}

fn print_row(name: &str, concurrency: usize, outcome: &Outcome) {
    let ms = |q: f64| outcome.latency.value_at_quantile(q) as f64 / 1000.0;
    let [callers, reader, redis] = outcome.cores;
    println!(
        "| {name} | {concurrency} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {callers:.2} / {reader:.2} / {redis:.2} | {:.1} |",
        outcome.calls_per_second(),
        ms(0.5),
        ms(0.99),
        outcome.latency.max() as f64 / 1000.0,
        outcome.entries,
        outcome.micros_per_call(1),
    );
}

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
const PROC_TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds used so far by this process's threads whose name starts with `prefix`
/// (0 where /proc is not there).
fn threads_cpu_seconds(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut ticks = 0_u64;
    for task in tasks.flatten() {
        let path = task.path();
        let named = std::fs::read_to_string(path.join("comm"))
            .is_ok_and(|name| name.trim_end().starts_with(prefix));
        if !named {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // Fields after the `(comm)`: state is the 3rd field, utime and stime the 14th/15th.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        for index in [11, 12] {
            ticks += fields
                .get(index)
                .and_then(|field| field.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ticks as f64 / PROC_TICKS_PER_SECOND
}

/// CPU seconds redis-server has used (`INFO cpu`: user + sys).
async fn redis_cpu_seconds(redis: &mut redis::aio::ConnectionManager) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(redis).await?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            matches!(name, "used_cpu_user" | "used_cpu_sys")
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum())
}

/// Runs `call` from `concurrency` callers back to back for `duration`; latency in µs.
async fn run_case<F, Fut>(
    redis: &mut redis::aio::ConnectionManager,
    concurrency: usize,
    duration: Duration,
    call: F,
) -> anyhow::Result<Outcome>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<usize>> + Send,
{
    let call = Arc::new(call);
    let cpu_before = [
        threads_cpu_seconds(CLIENT_THREADS),
        threads_cpu_seconds(SERVER_THREADS),
        redis_cpu_seconds(redis).await?,
    ];
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let call = Arc::clone(&call);
        workers.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut entries = 0;
            while Instant::now() < deadline {
                let sent = Instant::now();
                entries = call().await?;
                latency.record(sent.elapsed().as_micros().max(1) as u64)?;
            }
            anyhow::Ok((latency, entries))
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut entries = 0;
    for worker in workers {
        let (part, seen) = worker.await.context("worker")??;
        latency.add(&part)?;
        entries = seen;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = [
        threads_cpu_seconds(CLIENT_THREADS),
        threads_cpu_seconds(SERVER_THREADS),
        redis_cpu_seconds(redis).await?,
    ];
    let mut cores = [0.0; 3];
    for (core, (after, before)) in cores.iter_mut().zip(cpu_after.iter().zip(cpu_before)) {
        *core = (after - before) / seconds;
    }
    Ok(Outcome {
        calls: latency.len(),
        seconds,
        entries,
        latency,
        cores,
    })
}

/// gRPC path of QueryMessages.
const QUERY_MESSAGES_PATH: &str = "/chatify.storage.v1.StorageService/QueryMessages";
/// gRPC path of ListSessions.
const LIST_SESSIONS_PATH: &str = "/chatify.storage.v1.StorageService/ListSessions";

/// The callers' gRPC client (`--grpc-client`), cloned into each caller.
#[derive(Clone)]
enum Caller {
    H2(GrpcCaller),
    Tonic {
        channel: tonic::transport::Channel,
        bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    },
}

/// A tonic request carrying the caller's bearer token.
fn authorized<T>(
    message: T,
    bearer: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", bearer.clone());
    request
}

impl Caller {
    /// The client `--grpc-client` names, to the server at `addr`.
    async fn connect(
        args: &Args,
        addr: std::net::SocketAddr,
        bearer: &str,
    ) -> anyhow::Result<Self> {
        Ok(match args.grpc_client {
            Client::H2 => Self::H2(
                GrpcCaller::connect(addr, bearer.parse()?, args.grpc_connections.max(1)).await?,
            ),
            Client::Tonic => Self::Tonic {
                channel: tonic::transport::Channel::from_shared(format!("http://{addr}"))?
                    .connect()
                    .await?,
                bearer: bearer.parse()?,
            },
        })
    }

    async fn query_messages(
        &self,
        request: QueryMessagesRequest,
    ) -> anyhow::Result<QueryMessagesResponse> {
        match self {
            Self::H2(caller) => caller.unary(QUERY_MESSAGES_PATH, &request).await,
            Self::Tonic { channel, bearer } => {
                let mut client = StorageServiceClient::new(channel.clone());
                Ok(client
                    .query_messages(authorized(request, bearer))
                    .await?
                    .into_inner())
            }
        }
    }

    async fn list_sessions(
        &self,
        request: ListSessionsRequest,
    ) -> anyhow::Result<ListSessionsResponse> {
        match self {
            Self::H2(caller) => caller.unary(LIST_SESSIONS_PATH, &request).await,
            Self::Tonic { channel, bearer } => {
                let mut client = StorageServiceClient::new(channel.clone());
                Ok(client
                    .list_sessions(authorized(request, bearer))
                    .await?
                    .into_inner())
            }
        }
    }
}

/// A gRPC unary caller on `--grpc-connections` HTTP/2 connections driven by the `h2` crate (the HTTP/2 of
/// tonic and hyper) directly: the calling task writes the request and reads the response.
/// tonic's `Channel` passes each call through a `Buffer` worker task, hyper's client task
/// and a task spawned per call before h2, which made the callers spend about as much CPU
/// per call as the reader spent serving it. The wire traffic is tonic's: HEADERS (`POST`,
/// the method's path, `content-type: application/grpc`, `te: trailers`,
/// `authorization`), one length-prefixed message, and the answer's `grpc-status` checked
/// (from the trailers, or the headers of a trailers-only error); the response is decoded
/// in full, as tonic would.
#[derive(Clone)]
struct GrpcCaller {
    connections: Arc<[h2::client::SendRequest<Bytes>]>,
    next: Arc<std::sync::atomic::AtomicUsize>,
    authority: hyper::http::uri::Authority,
    authorization: hyper::header::HeaderValue,
}

impl GrpcCaller {
    async fn connect(
        addr: std::net::SocketAddr,
        authorization: hyper::header::HeaderValue,
        connections: usize,
    ) -> anyhow::Result<Self> {
        let mut sends = Vec::with_capacity(connections);
        for _ in 0..connections {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            // The windows tonic's client asks for (hyper's defaults): no page waits on them.
            let (send, connection) = h2::client::Builder::new()
                .initial_window_size(2 * 1024 * 1024)
                .initial_connection_window_size(5 * 1024 * 1024)
                .handshake(tcp)
                .await?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    eprintln!("grpc connection failed: {error}");
                }
            });
            sends.push(send);
        }
        Ok(Self {
            connections: sends.into(),
            next: Arc::default(),
            authority: addr.to_string().parse()?,
            authorization,
        })
    }

    /// One unary call of `path` (`/package.Service/Method`).
    async fn unary<Req, Res>(&self, path: &'static str, request: &Req) -> anyhow::Result<Res>
    where
        Req: chatify_proto::Message,
        Res: chatify_proto::Message + Default,
    {
        let len = request.encoded_len();
        let mut framed = BytesMut::with_capacity(5 + len);
        framed.put_u8(0);
        framed.put_u32(u32::try_from(len)?);
        request.encode(&mut framed)?;
        let uri = hyper::Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()?;
        let head = hyper::Request::post(uri)
            .header(hyper::header::CONTENT_TYPE, "application/grpc")
            .header(hyper::header::TE, "trailers")
            .header(hyper::header::AUTHORIZATION, self.authorization.clone())
            .body(())?;
        let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut send = self.connections[turn % self.connections.len()]
            .clone()
            .ready()
            .await?;
        let (response, mut stream) = send.send_request(head, false)?;
        stream.send_data(framed.freeze(), true)?;
        let (parts, mut body) = response.await?.into_parts();
        anyhow::ensure!(
            parts.status == hyper::StatusCode::OK,
            "http {}",
            parts.status
        );
        if parts.headers.contains_key(GRPC_STATUS) {
            // Trailers-only: an error (or an empty answer).
            check_grpc_status(&parts.headers)?;
        }
        let mut message = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            body.flow_control().release_capacity(chunk.len())?;
            message.extend_from_slice(&chunk);
        }
        if !parts.headers.contains_key(GRPC_STATUS) {
            let trailers = body.trailers().await?.unwrap_or_default();
            check_grpc_status(&trailers)?;
        }
        // One length-prefixed, uncompressed message.
        anyhow::ensure!(message.len() >= 5, "no response message");
        anyhow::ensure!(message[0] == 0, "compressed response message");
        let len = u32::from_be_bytes([message[1], message[2], message[3], message[4]]) as usize;
        anyhow::ensure!(message.len() == 5 + len, "not one response message");
        Ok(Res::decode(&message[5..])?)
    }
}

const GRPC_STATUS: &str = "grpc-status";

/// Fails unless `headers` carry `grpc-status: 0`.
fn check_grpc_status(headers: &hyper::HeaderMap) -> anyhow::Result<()> {
    match headers.get(GRPC_STATUS) {
        Some(status) if status == "0" => Ok(()),
        status => anyhow::bail!("grpc-status {status:?}: {:?}", headers.get("grpc-message")),
    }
}
