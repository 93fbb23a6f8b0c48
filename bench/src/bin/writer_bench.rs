//! storage-writer throughput and per-stage latency against the real broker, Redis, Postgres
//! and MongoDB-protocol server, and in the same run the raw ceiling of each sink for the same
//! rows (pipelined `SET NX`, `insert_many`, `COPY`), at one batch size.
//!
//! `bench/run-writer.sh` runs it for each batch size and sink, side by side.
//!
//! Modes:
//! - `writer`: pre-produce `--messages` sends over `--sessions` single chats, start the real
//!   pipeline (`storage_writer::consumer::run`) with `CHATIFY_WRITER_BATCH_MAX = --batch`,
//!   and time from the first stored row to the last (the consumer-group join is excluded).
//!   With `--rate R` the sends are produced open-loop at R/s while the writer runs instead.
//! - `redis`, `mongo`, `postgres`: write the same rows straight to that sink in chunks of
//!   `--batch`, one round trip per chunk.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chatify_core::ids::{MessageId, SessionId};
use chatify_core::stores::Stores;
use chatify_core::topics::Topics;
use chatify_proto::Message as _;
use chatify_proto::bus::v1::{UpstreamCommand, upstream_command};
use chatify_proto::client::v1::{MessageType, Send};
use clap::{Parser, ValueEnum};
use mongodb::bson::{Document, doc};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use storage_writer::config::Config;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Writer,
    Redis,
    Mongo,
    Postgres,
}

#[derive(Debug, Parser)]
#[command(about = "storage-writer vs raw sink ceilings, one batch size per run")]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 200)]
    sessions: usize,
    /// Bytes of content per message.
    #[arg(long, default_value_t = 100)]
    content_bytes: usize,
    /// Produce open-loop at this many sends per second while the writer runs.
    #[arg(long)]
    rate: Option<u64>,
    /// Partitions of the bench's upstream topic.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
}

struct Row {
    sender: String,
    receiver: String,
    session: SessionId,
    client_msg_id: String,
    received_at_ms: i64,
    message_id: MessageId,
}

fn rows(args: &Args, tag: &str) -> anyhow::Result<Vec<Row>> {
    let now = chrono::Utc::now().timestamp_millis();
    (0..args.messages)
        .map(|i| {
            let sender = format!("s{tag}");
            let receiver = format!("r{tag}x{}", i % args.sessions);
            let session = SessionId::single(&sender, &receiver)?;
            let client_msg_id = format!("c{i}");
            let received_at_ms = now + (i / 1000) as i64;
            let message_id = MessageId::derive(&sender, &client_msg_id, received_at_ms as u64);
            Ok(Row {
                sender,
                receiver,
                session,
                client_msg_id,
                received_at_ms,
                message_id,
            })
        })
        .collect()
}

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| {
        format!("{name} is not set: run `scripts/services.sh up` and source .local/chatify.env")
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chatify_core::config::load_env_file()?;
    let args = Args::parse();
    let tag = format!(
        "{}{}",
        std::process::id(),
        chrono::Utc::now().timestamp_millis() % 1_000_000
    );
    let rows = rows(&args, &tag)?;
    let content = "x".repeat(args.content_bytes);
    let (elapsed, extra) = match args.mode {
        Mode::Writer => run_writer(&args, &tag, &rows, &content).await?,
        Mode::Redis => (sink_redis(&args, &rows).await?, String::new()),
        Mode::Mongo => (
            sink_mongo(&args, &tag, &rows, &content).await?,
            String::new(),
        ),
        Mode::Postgres => (sink_postgres(&args, &rows, &content).await?, String::new()),
    };
    let rate = rows.len() as f64 / elapsed.as_secs_f64();
    println!(
        "| {:?} | {} | {} | {:.0} msg/s | {:.2} s |{extra}",
        args.mode,
        args.batch,
        rows.len(),
        rate,
        elapsed.as_secs_f64()
    );
    Ok(())
}

fn upstream(row: &Row, content: &str) -> Vec<u8> {
    UpstreamCommand {
        sender_id: row.sender.clone(),
        device_id: "bench".into(),
        node_id: "gw-bench".into(),
        connection_id: 1,
        received_at_ms: row.received_at_ms,
        session_id: row.session.to_string(),
        message_id: String::new(),
        command: Some(upstream_command::Command::Send(Send {
            client_msg_id: row.client_msg_id.clone(),
            receiver_id: Some(row.receiver.clone()),
            session_id: None,
            message_type: MessageType::Text as i32,
            content: content.to_owned(),
            burn_after_seconds: None,
            request_id: None,
        })),
    }
    .encode_to_vec()
}

async fn run_writer(
    args: &Args,
    tag: &str,
    rows: &[Row],
    content: &str,
) -> anyhow::Result<(Duration, String)> {
    let bootstrap = env("KAFKA_BOOTSTRAP_SERVERS")?;
    let prefix = format!("bench{tag}");
    let topics = Topics::new(prefix.clone());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let names = [
        (topics.upstream(), args.partitions),
        (topics.upstream_dlq(), 1),
        (topics.message_events(), 4),
        (topics.push("gw-bench"), 4),
    ];
    let specs: Vec<NewTopic<'_>> = names
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    for result in admin.create_topics(&specs, &AdminOptions::new()).await? {
        result.map_err(|(topic, code)| anyhow::anyhow!("create {topic}: {code}"))?;
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let payloads: Vec<(String, Vec<u8>)> = rows
        .iter()
        .map(|row| (row.session.to_string(), upstream(row, content)))
        .collect();
    let metrics = chatify_core::telemetry::install_metrics()?;
    let config: Config = chatify_core::config::parse_from([
        "storage-writer".to_owned(),
        format!("--topic-prefix={prefix}"),
        format!("--consumer-group={prefix}-writer"),
        format!("--batch-max={}", args.batch),
    ])?;
    config.validate()?;
    let produce_all = |payloads: Vec<(String, Vec<u8>)>, rate: Option<u64>| {
        let producer = producer.clone();
        let upstream = topics.upstream();
        async move {
            let started = Instant::now();
            let mut pending = Vec::with_capacity(payloads.len());
            for (i, (key, payload)) in payloads.iter().enumerate() {
                if let Some(rate) = rate {
                    // Open loop: send i is due at i / rate seconds.
                    let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let record = FutureRecord::to(&upstream).key(key).payload(payload);
                pending.push(producer.send_result(record).map_err(|(error, _)| error)?);
            }
            for delivery in pending {
                delivery.await?.map_err(|(error, _)| error)?;
            }
            anyhow::Ok(())
        }
    };
    if args.rate.is_none() {
        produce_all(payloads.clone(), None).await?;
    }
    let stores = Stores::open(&config.redis, &config.postgres, &config.mongo).await?;
    let postgres = stores.postgres.clone();
    let shutdown = CancellationToken::new();
    let writer = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { storage_writer::consumer::run(&config, stores, shutdown).await }
    });
    let producing = args
        .rate
        .map(|rate| tokio::spawn(produce_all(payloads, Some(rate))));
    let sender = rows
        .first()
        .map(|row| row.sender.clone())
        .unwrap_or_default();
    let count = || {
        let postgres = postgres.clone();
        let sender = sender.clone();
        async move {
            let (count,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM messages WHERE sender_id = $1")
                    .bind(&sender)
                    .fetch_one(&postgres)
                    .await?;
            anyhow::Ok(count as usize)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first_row = None;
    loop {
        let stored = count().await?;
        if stored > 0 && first_row.is_none() {
            first_row = Some(Instant::now());
        }
        if stored >= rows.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {stored} of {} stored after 600 s", rows.len());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = first_row.map(|at| at.elapsed()).unwrap_or_default();
    if let Some(producing) = producing {
        producing.await??;
    }
    shutdown.cancel();
    writer.await??;
    Ok((elapsed, stage_summary(&metrics.render())))
}

/// p50 / p99 of each stage and of the whole batch, from the writer's own histograms.
fn stage_summary(rendered: &str) -> String {
    let quantile = |series: &str, q: &str| {
        rendered.lines().find_map(|line| {
            let rest = line.strip_prefix(series)?;
            if !rest.contains(&format!("quantile=\"{q}\"")) {
                return None;
            }
            let value: f64 = line.rsplit(' ').next()?.parse().ok()?;
            Some(value * 1000.0)
        })
    };
    let mut out = String::new();
    for stage in [
        "members",
        "dedupe",
        "postgres",
        "mongo",
        "hot_cache",
        "publish",
        "commit",
    ] {
        let series = format!("chatify_writer_stage_seconds{{stage=\"{stage}\"");
        if let (Some(p50), Some(p99)) = (quantile(&series, "0.5"), quantile(&series, "0.99")) {
            out.push_str(&format!(" {stage} {p50:.1}/{p99:.1} |"));
        }
    }
    let batch = "chatify_writer_batch_seconds{";
    if let (Some(p50), Some(p99)) = (quantile(batch, "0.5"), quantile(batch, "0.99")) {
        out.push_str(&format!(" batch {p50:.1}/{p99:.1} ms |"));
    }
    let records = "chatify_writer_batch_records{";
    if let Some(p50) = quantile(records, "0.5") {
        out.push_str(&format!(" records/batch p50 {:.0} |", p50 / 1000.0));
    }
    out
}

async fn sink_redis(args: &Args, rows: &[Row]) -> anyhow::Result<Duration> {
    let client = redis::Client::open(env("REDIS_URL")?)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let started = Instant::now();
    for chunk in rows.chunks(args.batch) {
        let mut pipe = redis::pipe();
        for row in chunk {
            pipe.cmd("SET")
                .arg(chatify_core::keys::dedupe(&row.sender, &row.client_msg_id))
                .arg(format!("{}|1", row.message_id))
                .arg("NX")
                .arg("EX")
                .arg(600)
                .ignore();
        }
        pipe.query_async::<()>(&mut connection).await?;
    }
    Ok(started.elapsed())
}

async fn sink_mongo(
    args: &Args,
    tag: &str,
    rows: &[Row],
    content: &str,
) -> anyhow::Result<Duration> {
    let client = mongodb::Client::with_uri_str(env("MONGO_URL")?).await?;
    let collection = client
        .database(&format!("bench{tag}"))
        .collection::<Document>("messages");
    // The writer's indexes, so the ceiling pays the same index maintenance.
    storage_writer::archive::ensure_mongo_indexes(&collection).await?;
    let started = Instant::now();
    for (chunk_index, chunk) in rows.chunks(args.batch).enumerate() {
        let documents: Vec<Document> = chunk
            .iter()
            .enumerate()
            .map(|(i, row)| {
                doc! {
                    "_id": row.message_id.to_string(),
                    "session_id": row.session.to_string(),
                    "seq": (chunk_index * args.batch + i + 1) as i64,
                    "sender_id": &row.sender,
                    "client_msg_id": &row.client_msg_id,
                    "message_type": "text",
                    "content": content,
                    "created_at": mongodb::bson::DateTime::from_millis(row.received_at_ms),
                    "recalled": false,
                }
            })
            .collect();
        collection.insert_many(documents).ordered(false).await?;
    }
    Ok(started.elapsed())
}

async fn sink_postgres(args: &Args, rows: &[Row], content: &str) -> anyhow::Result<Duration> {
    let postgres = sqlx::PgPool::connect(&env("POSTGRES_URL")?).await?;
    // A logged scratch table shaped like `messages` with the same keys and indexes, so the
    // archive is untouched and the WAL cost is the same.
    let table = format!("bench_messages_{}", std::process::id());
    sqlx::query(&format!(
        "CREATE TABLE {table} (LIKE messages INCLUDING ALL)"
    ))
    .execute(&postgres)
    .await?;
    let mut connection = postgres.acquire().await?;
    let started = Instant::now();
    for (chunk_index, chunk) in rows.chunks(args.batch).enumerate() {
        let mut text = String::with_capacity(chunk.len() * (content.len() + 160));
        for (i, row) in chunk.iter().enumerate() {
            let created = chrono::DateTime::from_timestamp_millis(row.received_at_ms)
                .context("timestamp")?
                .to_rfc3339();
            text.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\ttext\t\\\\x{}\t{}\t\\N\t\\N\t\\N\n",
                row.message_id,
                row.session,
                chunk_index * args.batch + i + 1,
                row.sender,
                row.client_msg_id,
                hex(content.as_bytes()),
                created
            ));
        }
        let mut copy = connection
            .copy_in_raw(&format!(
                "COPY {table} (message_id, session_id, seq, sender_id, client_msg_id, \
                 message_type, content, created_at, burn_after_seconds, recalled_at, recalled_by) \
                 FROM STDIN"
            ))
            .await?;
        copy.send(text.into_bytes()).await?;
        copy.finish().await?;
    }
    let elapsed = started.elapsed();
    drop(connection);
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&postgres)
        .await?;
    Ok(elapsed)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, byte| {
        let _ = write!(out, "{byte:02x}");
        out
    })
}
