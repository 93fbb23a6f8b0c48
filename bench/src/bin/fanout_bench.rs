//! Fan-out benchmark (issue 6): one push record to every connection of a gateway node.
//!
//! `run` starts `--gateways` gateway-uring processes (node ids `fan-1..`, their own topic
//! prefix) and client processes of this same binary (`clients`, at most
//! `--connections-per-process` each: a process may hold only so many open files), connects
//! `--connections` WebSocket connections spread over the gateways, reads every connection's
//! route from Redis, then produces ONE `PushRecord` per gateway node listing all of that
//! node's connection ids and measures, per run, how long until the last connection has the
//! frame (deliveries/s = connections ÷ that time). The clock starts just before the records
//! are produced, so the figure includes the broker's hop (here: tansu on loopback).
//!
//! The clients are deliberately minimal (a raw WebSocket handshake, then reading frame
//! headers) so 10k+ connections per process cost little memory and CPU.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use chatify_proto::Message as _;
use chatify_proto::bus::v1::PushRecord;
use chatify_proto::client::v1::{Pong, ServerFrame, server_frame};
use clap::Parser;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "one push record to many connections: deliveries/s and last-delivery latency")]
enum Cli {
    /// Start gateways and client processes, push, report.
    Run(RunArgs),
    /// (internal) hold connections to one gateway and report when the push arrived.
    Clients(ClientArgs),
    /// Create the topics of a deployment with this prefix (for bench scripts that start
    /// the services themselves): upstream, its dead letters, the event topics and one push
    /// topic per node. Topics that exist are left as they are.
    Topics(TopicsArgs),
}

#[derive(Debug, clap::Args)]
struct TopicsArgs {
    #[arg(long)]
    prefix: String,
    /// Gateway node ids (one push topic each).
    #[arg(long = "node", required = true)]
    nodes: Vec<String>,
    /// Partitions of the upstream topic (the writer's parallelism).
    #[arg(long, default_value_t = 8)]
    upstream_partitions: i32,
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    kafka_bootstrap_servers: String,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Total connections.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Gateway processes (node ids fan-1..fan-N).
    #[arg(long, default_value_t = 1)]
    gateways: usize,
    /// Most connections one client process opens.
    #[arg(long, default_value_t = 15_000)]
    connections_per_process: usize,
    /// Pushes measured (each one record per node to every connection).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Shards per gateway (CHATIFY_SHARDS).
    #[arg(long, default_value_t = 2)]
    shards: usize,
    /// Path of the gateway-uring binary.
    #[arg(long, default_value = "target/release/gateway-uring")]
    gateway_binary: PathBuf,
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    kafka_bootstrap_servers: String,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// RUST_LOG of the gateways (their stderr is this process's).
    #[arg(long, default_value = "warn")]
    gateway_log: String,
    /// Instead of producing push records directly, go through the real pipeline: start
    /// storage-writer and storage-reader (next to the gateway binary), create one group of
    /// every connection's user through the reader's GroupService (CreateGroup, then
    /// AddMembers in chunks), and send one group message per round from an extra
    /// connection: the clock runs from the `send` to the last member's `deliver` (the
    /// writer pushes only after the message is stored in Postgres and Mongo).
    #[arg(long)]
    group: bool,
    #[arg(
        long,
        env = "POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/chatify"
    )]
    postgres_url: String,
    #[arg(long, env = "MONGO_URL", default_value = "mongodb://127.0.0.1:27017")]
    mongo_url: String,
}

#[derive(Debug, clap::Args)]
struct ClientArgs {
    #[arg(long)]
    ws_addr: String,
    #[arg(long)]
    user_prefix: String,
    #[arg(long)]
    first: usize,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    rounds: usize,
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// Once every connection is up: this many times, every connection sends one WebSocket
    /// ping at once (the server answers each with a pong), 2 s apart; pongs are counted.
    /// A burst of writes on every connection of the gateway without a broker.
    #[arg(long, default_value_t = 0)]
    ping_bursts: u32,
}

const JWT_SECRET: &str = "fanout-bench-secret-that-is-long-enough-0123";
/// The gateways' and this bench's credential as trusted internal callers of the reader.
const INTERNAL_TOKEN: &str = "fanout-bench-internal-caller-token-0123456789";

fn main() -> anyhow::Result<()> {
    match Cli::parse() {
        Cli::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run(args)),
        Cli::Clients(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(clients(args)),
        Cli::Topics(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(create_topics(args)),
    }
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros() as u64)
}

fn token(user: &str, secret: &str) -> anyhow::Result<String> {
    let exp = unix_us() / 1_000_000 + 3600;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": user, "did": "d", "jti": format!("j-{user}"), "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// One minimal WebSocket client: handshake, then the unix-µs time each data frame arrives.
async fn hold(
    addr: String,
    token: String,
    arrivals: Arc<Rounds>,
    rounds: usize,
    up: tokio::sync::oneshot::Sender<()>,
    mut bursts: tokio::sync::watch::Receiver<u32>,
) -> anyhow::Result<()> {
    let mut stream = tokio::net::TcpStream::connect(&addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0_u8; 1024];
    let header_end = loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            bail!("closed during the handshake");
        }
        buffer.extend_from_slice(&chunk[..read]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    if !buffer.starts_with(b"HTTP/1.1 101") {
        bail!(
            "refused: {}",
            String::from_utf8_lossy(&buffer[..header_end])
        );
    }
    buffer.drain(..header_end);
    CONNECTED.fetch_add(1, Ordering::Relaxed);
    let _ = up.send(());
    // The write half: pong answers, and one WebSocket ping per `--ping-bursts` burst.
    let (mut stream, mut write_half) = stream.into_split();
    let (outgoing, mut to_write) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        // A heartbeat as real clients send (SPEC: 90 s of silence closes a connection, and
        // a route whose client was not heard from for 120 s counts as stale, so a silent
        // client would get no pushes); spread over the interval so they do not all coincide.
        let offset = Duration::from_millis(unix_us() % HEARTBEAT.as_millis() as u64);
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + offset, HEARTBEAT);
        loop {
            let frame = tokio::select! {
                _ = heartbeat.tick() => masked_frame(0x9, b"heartbeat"),
                frame = to_write.recv() => match frame {
                    Some(frame) => frame,
                    None => break,
                },
                changed = bursts.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    masked_frame(0x9, b"burst")
                }
            };
            if write_half.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    let mut seen = 0;
    while seen < rounds {
        // Frame header: server frames are unmasked.
        while buffer.len() < 2 {
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                bail!("closed without a close frame");
            }
            buffer.extend_from_slice(&chunk[..read]);
        }
        let (length, header) = match buffer[1] & 0x7F {
            126 if buffer.len() >= 4 => (u16::from_be_bytes([buffer[2], buffer[3]]) as usize, 4),
            127 if buffer.len() >= 10 => (
                u64::from_be_bytes(buffer[2..10].try_into().expect("8 bytes")) as usize,
                10,
            ),
            126 | 127 => {
                let read = stream.read(&mut chunk).await?;
                if read == 0 {
                    bail!("closed without a close frame");
                }
                buffer.extend_from_slice(&chunk[..read]);
                continue;
            }
            short => (short as usize, 2),
        };
        while buffer.len() < header + length {
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                bail!("closed without a close frame");
            }
            buffer.extend_from_slice(&chunk[..read]);
        }
        let opcode = buffer[0] & 0x0F;
        let payload: Vec<u8> = buffer[header..header + length].to_vec();
        buffer.drain(..header + length);
        match opcode {
            // Close: say who closed and why (the code and reason the server sent).
            8 => {
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default());
                bail!(
                    "server closed: code {} reason {reason:?} after {} frame(s)",
                    code.map_or_else(|| "none".to_owned(), |code| code.to_string()),
                    seen
                );
            }
            // Ping: answer with a masked pong carrying the same payload (a client must).
            9 => {
                let _ = outgoing.send(masked_frame(0xA, &payload));
                continue;
            }
            10 => {
                PONGS.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            _ => {}
        }
        if opcode == 1 || opcode == 2 {
            arrivals.last_us[seen].fetch_max(unix_us(), Ordering::Relaxed);
            arrivals.received[seen].fetch_add(1, Ordering::Relaxed);
            seen += 1;
        }
    }
    // Stay connected until the driver ends the process.
    std::future::pending::<()>().await;
    Ok(())
}

/// A client frame (masked, as RFC 6455 requires; the key is fixed, the bench needs no secrecy).
fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    const KEY: [u8; 4] = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![0x80 | opcode];
    // Control frames carry at most 125 bytes.
    frame.push(0x80 | payload.len().min(125) as u8);
    frame.extend_from_slice(&KEY);
    frame.extend(
        payload
            .iter()
            .take(125)
            .enumerate()
            .map(|(index, byte)| byte ^ KEY[index % 4]),
    );
    frame
}

/// How often each client connection sends a WebSocket ping.
const HEARTBEAT: Duration = Duration::from_secs(30);

static CONNECTED: AtomicUsize = AtomicUsize::new(0);
static PONGS: AtomicUsize = AtomicUsize::new(0);

/// Per round: the latest arrival (unix µs) and how many connections have the frame.
struct Rounds {
    last_us: Vec<AtomicU64>,
    received: Vec<AtomicUsize>,
}

/// Connections that ended, by what ended them (the server's close code and reason, a
/// refusal, an I/O error), with the seconds since the process started of the first one.
#[derive(Default)]
struct Failures {
    total: AtomicUsize,
    by_reason: std::sync::Mutex<BTreeMap<String, (usize, f64)>>,
}

impl Failures {
    fn record(&self, error: &anyhow::Error, started: Instant) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut by_reason = self.by_reason.lock().expect("not poisoned");
        let entry = by_reason
            .entry(format!("{error:#}"))
            .or_insert((0, started.elapsed().as_secs_f64()));
        entry.0 += 1;
    }

    fn report(&self) {
        for (reason, (count, first_s)) in self.by_reason.lock().expect("not poisoned").iter() {
            eprintln!("connections ended: {count} x {reason} (first at {first_s:.1} s)");
        }
    }
}

/// A round still short of some connections this long after its first arrival is reported
/// as it stands (the run then shows the missing deliveries instead of waiting forever).
const ROUND_STRAGGLER_WAIT: Duration = Duration::from_secs(20);

/// Client process: prints `connected N failed F` once every connection is up or refused,
/// then `round R last_us T received N` per round as the frames arrive. Every connection
/// that ends is reported on stderr with its reason.
async fn clients(args: ClientArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    // One socket per connection: take the hard open-files limit.
    if let Ok((_, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard);
    }
    let rounds = Arc::new(Rounds {
        last_us: (0..args.rounds).map(|_| AtomicU64::new(0)).collect(),
        received: (0..args.rounds).map(|_| AtomicUsize::new(0)).collect(),
    });
    let failures = Arc::new(Failures::default());
    // Connections whose attempt has settled (up, or failed before coming up).
    let settled = Arc::new(AtomicUsize::new(0));
    let semaphore = Arc::new(tokio::sync::Semaphore::new(200));
    let (burst, bursts) = tokio::sync::watch::channel(0_u32);
    for index in args.first..args.first + args.count {
        let user = format!("{}{index}", args.user_prefix);
        let token = token(&user, &args.jwt_secret)?;
        let permit = Arc::clone(&semaphore).acquire_owned().await?;
        let (addr, rounds, failures, settled) = (
            args.ws_addr.clone(),
            Arc::clone(&rounds),
            Arc::clone(&failures),
            Arc::clone(&settled),
        );
        let round_count = args.rounds;
        let bursts = bursts.clone();
        tokio::spawn(async move {
            let (up, is_up) = tokio::sync::oneshot::channel();
            let held = hold(addr, token, rounds, round_count, up, bursts);
            tokio::pin!(held);
            // The connect permit is released once this connection is up (or failed).
            let result = tokio::select! {
                result = &mut held => Some(result),
                _ = is_up => None,
            };
            settled.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            let result = match result {
                Some(result) => result,
                None => held.await,
            };
            if let Err(error) = result {
                failures.record(&error, started);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while settled.load(Ordering::Relaxed) < args.count {
        if Instant::now() > deadline {
            bail!("connecting timed out");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connected = CONNECTED.load(Ordering::Relaxed);
    println!("connected {connected} failed {}", args.count - connected);
    eprintln!(
        "client {}..{}: {connected} up after {:.1} s",
        args.first,
        args.first + args.count,
        started.elapsed().as_secs_f64()
    );
    failures.report();
    for round in 1..=args.ping_bursts {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = PONGS.load(Ordering::Relaxed);
        let sent = Instant::now();
        burst.send_replace(round);
        let live = connected - failures.total.load(Ordering::Relaxed);
        while PONGS.load(Ordering::Relaxed) - before < live && sent.elapsed() < ROUND_STRAGGLER_WAIT
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        eprintln!(
            "ping burst {round}: {} pongs for {live} live connections in {:.1} ms",
            PONGS.load(Ordering::Relaxed) - before,
            sent.elapsed().as_secs_f64() * 1000.0
        );
        failures.report();
    }
    let mut reported_failures = failures.total.load(Ordering::Relaxed);
    for round in 0..args.rounds {
        let mut first_seen: Option<Instant> = None;
        loop {
            let received = rounds.received[round].load(Ordering::Relaxed);
            if received > 0 && first_seen.is_none() {
                first_seen = Some(Instant::now());
            }
            let straggling = first_seen.is_some_and(|first| first.elapsed() > ROUND_STRAGGLER_WAIT);
            if received >= connected || straggling {
                println!(
                    "round {round} last_us {} received {received}",
                    rounds.last_us[round].load(Ordering::Relaxed),
                );
                break;
            }
            let ended = failures.total.load(Ordering::Relaxed);
            if ended != reported_failures {
                reported_failures = ended;
                eprintln!("{ended} connection(s) ended so far:");
                failures.report();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    if failures.total.load(Ordering::Relaxed) > 0 {
        failures.report();
    }
    std::future::pending::<()>().await;
    Ok(())
}

async fn create_topics(args: TopicsArgs) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &args.kafka_bootstrap_servers)
        .create()?;
    let prefix = &args.prefix;
    let mut topics: Vec<(String, i32)> = vec![
        (format!("{prefix}.upstream"), args.upstream_partitions),
        (format!("{prefix}.upstream.dlq"), 1),
        (format!("{prefix}.user-events"), 1),
        (format!("{prefix}.message-events"), 1),
    ];
    topics.extend(
        args.nodes
            .iter()
            .map(|node| (format!("{prefix}.push.{node}"), 2)),
    );
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    for result in admin.create_topics(&new, &AdminOptions::new()).await? {
        match result {
            Ok(name) => eprintln!("created {name}"),
            Err((name, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                eprintln!("{name} exists");
            }
            Err((name, code)) => bail!("create topic {name}: {code}"),
        }
    }
    Ok(())
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nothing listens on now, never one this process handed out before: the
/// kernel may give the same free port to two probes in a row (the probe's listener is
/// closed before the port is used), which once started two gateways on one port.
fn free_port() -> anyhow::Result<u16> {
    static HANDED_OUT: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..100 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port not handed out before in 100 probes")
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let prefix = format!("fanout.{}", std::process::id());
    let nodes: Vec<String> = (1..=args.gateways).map(|n| format!("fan-{n}")).collect();
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &args.kafka_bootstrap_servers)
        .create()?;
    let mut topics: Vec<String> = vec![
        format!("{prefix}.upstream"),
        format!("{prefix}.user-events"),
    ];
    if args.group {
        topics.push(format!("{prefix}.upstream.dlq"));
        topics.push(format!("{prefix}.message-events"));
    }
    topics.extend(nodes.iter().map(|node| format!("{prefix}.push.{node}")));
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| NewTopic::new(name, 1, TopicReplication::Fixed(1)))
        .collect();
    admin.create_topics(&new, &AdminOptions::new()).await?;

    let mut processes = Vec::new();
    let mut gateways = Vec::new();
    let mut grpc_port = None;
    if args.group {
        let binaries = args
            .gateway_binary
            .parent()
            .context("gateway binary has a directory")?
            .to_owned();
        let (writer_admin, reader_admin, grpc) = (free_port()?, free_port()?, free_port()?);
        let common = [
            (
                "KAFKA_BOOTSTRAP_SERVERS",
                args.kafka_bootstrap_servers.clone(),
            ),
            ("REDIS_URL", args.redis_url.clone()),
            ("POSTGRES_URL", args.postgres_url.clone()),
            ("MONGO_URL", args.mongo_url.clone()),
            ("CHATIFY_TOPIC_PREFIX", prefix.clone()),
            ("JWT_SECRET", JWT_SECRET.to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ];
        let writer = Command::new(binaries.join("storage-writer"))
            .env_clear()
            .envs(common.iter().map(|(k, v)| (*k, v.as_str())))
            .env("CHATIFY_ADMIN_ADDR", format!("127.0.0.1:{writer_admin}"))
            .env("CHATIFY_WRITER_GROUP", format!("{prefix}-writers"))
            .stdout(Stdio::null())
            .spawn()
            .context("start storage-writer")?;
        processes.push(Process(writer));
        let reader = Command::new(binaries.join("storage-reader"))
            .env_clear()
            .envs(common.iter().map(|(k, v)| (*k, v.as_str())))
            .env("CHATIFY_ADMIN_ADDR", format!("127.0.0.1:{reader_admin}"))
            .env("CHATIFY_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
            .env("CHATIFY_INTERNAL_TOKEN", INTERNAL_TOKEN)
            .env(
                "CHATIFY_GROUP_MEMBERS_MAX",
                (args.connections + 1).to_string(),
            )
            .stdout(Stdio::null())
            .spawn()
            .context("start storage-reader")?;
        processes.push(Process(reader));
        wait_ready("storage-writer", writer_admin).await?;
        wait_ready("storage-reader", reader_admin).await?;
        grpc_port = Some(grpc);
    }
    for node in &nodes {
        let (ws, tcp, admin_port) = (free_port()?, free_port()?, free_port()?);
        let child = Command::new(&args.gateway_binary)
            .env_clear()
            .env("KAFKA_BOOTSTRAP_SERVERS", &args.kafka_bootstrap_servers)
            .env("REDIS_URL", &args.redis_url)
            .env("CHATIFY_TOPIC_PREFIX", &prefix)
            .env("CHATIFY_NODE_ID", node)
            .env("JWT_SECRET", JWT_SECRET)
            .env("CHATIFY_WS_ADDR", format!("127.0.0.1:{ws}"))
            .env("CHATIFY_TCP_ADDR", format!("127.0.0.1:{tcp}"))
            .env("CHATIFY_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
            .env("CHATIFY_SHARDS", args.shards.to_string())
            .env("CHATIFY_SEND_QUEUE_FRAMES_MAX", "64")
            .env("RUST_LOG", &args.gateway_log)
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", args.gateway_binary.display()))?;
        processes.push(Process(child));
        gateways.push((node.clone(), format!("127.0.0.1:{ws}"), admin_port));
    }
    for (node, _, admin_port) in &gateways {
        wait_ready(node, *admin_port).await?;
    }
    // Client processes: connections spread evenly over the gateways.
    let user_prefix = format!("fan{}-", std::process::id());
    let per_gateway = args.connections.div_ceil(args.gateways);
    let exe = std::env::current_exe()?;
    let mut client_outputs = Vec::new();
    let started = Instant::now();
    let mut first = 0;
    for (_, ws, _) in &gateways {
        let mut left = per_gateway.min(args.connections - first);
        while left > 0 {
            let count = left.min(args.connections_per_process);
            let mut child = Command::new(&exe)
                .args(["clients", "--ws-addr", ws, "--user-prefix", &user_prefix])
                .args(["--first", &first.to_string(), "--count", &count.to_string()])
                .args(["--rounds", &args.rounds.to_string()])
                .env("JWT_SECRET", JWT_SECRET)
                .stdout(Stdio::piped())
                .spawn()?;
            let stdout = child.stdout.take().context("client stdout")?;
            client_outputs.push(tokio::io::BufReader::new(
                tokio::process::ChildStdout::from_std(stdout)?,
            ));
            processes.push(Process(child));
            first += count;
            left -= count;
        }
    }
    use tokio::io::AsyncBufReadExt as _;
    let mut connected = 0;
    let mut lines = Vec::new();
    for output in client_outputs {
        let mut lines_of = output.lines();
        let line = lines_of.next_line().await?.context("client exited")?;
        let mut parts = line.split(' ');
        connected += parts
            .nth(1)
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        lines.push(lines_of);
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    eprintln!("{connected} connections up in {connect_seconds:.1} s");

    let users: Vec<String> = (0..args.connections)
        .map(|i| format!("{user_prefix}{i}"))
        .collect();
    let mut group = None;
    if let Some(grpc) = grpc_port {
        let owner = format!("{user_prefix}owner");
        let created = Instant::now();
        let session_id = create_group(grpc, &owner, &users).await?;
        eprintln!(
            "group {session_id} of {} members created in {:.1} s",
            users.len() + 1,
            created.elapsed().as_secs_f64()
        );
        let url = format!(
            "ws://{}/ws?token={}",
            gateways[0].1,
            token(&owner, JWT_SECRET)?
        );
        let (sender, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .context("connect the group's sender")?;
        group = Some((session_id, sender));
    }

    // Every connection's route, read the way the writer does (pipelined), by node.
    let redis = redis::Client::open(args.redis_url.as_str())?;
    let mut redis = redis.get_multiplexed_async_connection().await?;
    let mut by_node: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for chunk in users.chunks(1000) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        for (node, targets) in chatify_core::routing::lookup_by_node(&mut redis, &refs).await? {
            by_node
                .entry(node)
                .or_default()
                .extend(targets.connection_ids);
        }
    }
    let routed: usize = by_node.values().map(Vec::len).sum();
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &args.kafka_bootstrap_servers)
        .set("message.max.bytes", "67108864")
        .set("linger.ms", "0")
        .create()?;
    let mut results = Vec::new();
    for round in 0..args.rounds {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let payloads: Vec<(String, Vec<u8>)> = by_node
            .iter()
            .map(|(node, ids)| {
                let record = PushRecord {
                    connection_ids: ids.clone(),
                    user_ids: vec![],
                    frame: Some(ServerFrame {
                        frame: Some(server_frame::Frame::Pong(Pong {
                            timestamp: Some(round as i64),
                        })),
                    }),
                    close_code: None,
                };
                (format!("{prefix}.push.{node}"), record.encode_to_vec())
            })
            .collect();
        let t0 = unix_us();
        let mut ack_ms = None;
        if let Some((session_id, sender)) = &mut group {
            ack_ms = Some(send_to_group(sender, session_id, round, t0).await?);
        } else {
            for (topic, payload) in &payloads {
                producer
                    .send(
                        rdkafka::producer::FutureRecord::<(), _>::to(topic).payload(payload),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(error, _)| error)?;
            }
        }
        let mut last = 0;
        let mut received = 0;
        for lines_of in &mut lines {
            let Ok(line) =
                tokio::time::timeout(Duration::from_secs(60), lines_of.next_line()).await
            else {
                print_gateway_counters(&gateways).await;
                bail!("a client process never got the push");
            };
            let line = line?.context("client exited")?;
            let parts: Vec<&str> = line.split(' ').collect();
            last = last.max(
                parts
                    .get(3)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0),
            );
            received += parts
                .get(5)
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
        }
        if received < connected {
            eprintln!(
                "round {round}: {} of {connected} connections did not get the push",
                connected - received
            );
        }
        let seconds = last.saturating_sub(t0) as f64 / 1e6;
        let rate = received as f64 / seconds;
        eprintln!(
            "round {round}: {received} deliveries, last after {:.1} ms, {:.0} deliveries/s",
            seconds * 1000.0,
            rate
        );
        if let Some(ack_ms) = ack_ms {
            eprintln!("round {round}: sender's ack after {ack_ms:.1} ms");
        }
        results.push(serde_json::json!({
            "round": round, "deliveries": received, "missing": connected - received.min(connected),
            "last_delivery_ms": seconds * 1000.0, "deliveries_per_second": rate, "ack_ms": ack_ms,
        }));
    }
    print_gateway_counters(&gateways).await;
    let mut rates: Vec<f64> = results
        .iter()
        .filter_map(|r| r["deliveries_per_second"].as_f64())
        .collect();
    rates.sort_by(f64::total_cmp);
    let mut lasts: Vec<f64> = results
        .iter()
        .filter_map(|r| r["last_delivery_ms"].as_f64())
        .collect();
    lasts.sort_by(f64::total_cmp);
    let summary = serde_json::json!({
        "mode": if args.group { "group message through writer" } else { "push record" },
        "connections": connected, "routed": routed, "gateways": args.gateways, "shards": args.shards,
        "connect_seconds": connect_seconds, "rounds": results,
        "median_deliveries_per_second": rates[rates.len() / 2],
        "median_last_delivery_ms": lasts[lasts.len() / 2],
    });
    println!("{summary}");
    if let Some(path) = args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)?;
    }
    Ok(())
}

/// What each gateway counted: refusals and closes by reason, push records and outcomes.
async fn print_gateway_counters(gateways: &[(String, String, u16)]) {
    for (node, _, admin_port) in gateways {
        match metrics_of(*admin_port).await {
            Ok(text) => {
                for line in text.lines().filter(|line| {
                    !line.starts_with('#')
                        && [
                            "refusals",
                            "closes_total",
                            "push_records_total",
                            "pushes_total",
                            "push_dropped",
                            "kicks",
                            "bridge_dropped",
                            "replaced",
                            "accept_errors",
                            "gateway_connections ",
                        ]
                        .iter()
                        .any(|name| line.contains(name))
                }) {
                    eprintln!("{node}: {line}");
                }
            }
            Err(error) => eprintln!("{node}: /metrics unreadable: {error:#}"),
        }
    }
}

async fn wait_ready(name: &str, admin_port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !reqwest_like_get(admin_port, "/readyz")
        .await
        .unwrap_or(false)
    {
        if Instant::now() > deadline {
            bail!("{name} not ready");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Members added per AddMembers call.
const ADD_MEMBERS_CHUNK: usize = 5_000;

/// Creates a group owned by `owner` with every one of `members`, through storage-reader's
/// GroupService as a trusted internal caller acting for the owner; returns its session id.
async fn create_group(grpc_port: u16, owner: &str, members: &[String]) -> anyhow::Result<String> {
    use chatify_proto::storage::v1::group_service_client::GroupServiceClient;
    use chatify_proto::storage::v1::{AddMembersRequest, CreateGroupRequest, Role};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc_port}"))?
        .connect()
        .await
        .context("connect to storage-reader")?;
    let mut client = GroupServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    fn as_caller<T>(owner: &str, message: T) -> anyhow::Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("x-chatify-internal-token", INTERNAL_TOKEN.parse()?);
        request
            .metadata_mut()
            .insert("x-chatify-user-id", owner.parse()?);
        Ok(request)
    }
    let mut chunks = members.chunks(ADD_MEMBERS_CHUNK);
    let session_id = client
        .create_group(as_caller(
            owner,
            CreateGroupRequest {
                user_id: owner.to_owned(),
                name: "fan-out bench".into(),
                member_ids: chunks.next().unwrap_or_default().to_vec(),
            },
        )?)
        .await
        .context("CreateGroup")?
        .into_inner()
        .session_id;
    for chunk in chunks {
        client
            .add_members(as_caller(
                owner,
                AddMembersRequest {
                    user_id: owner.to_owned(),
                    session_id: session_id.clone(),
                    member_ids: chunk.to_vec(),
                    role: Role::Member.into(),
                },
            )?)
            .await
            .context("AddMembers")?;
    }
    Ok(session_id)
}

type Sender =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends one JSON `send` to the group and waits for its `ack`; returns send→ack in ms.
async fn send_to_group(
    sender: &mut Sender,
    session_id: &str,
    round: usize,
    t0_us: u64,
) -> anyhow::Result<f64> {
    use futures::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let client_msg_id = format!("fanout-{}-{round}", std::process::id());
    let frame = serde_json::json!({
        "type": "send", "client_msg_id": client_msg_id, "session_id": session_id,
        "message_type": "text", "content": format!("{{\"text\":\"round {round}\"}}"),
    });
    sender.send(Message::text(frame.to_string())).await?;
    let wait = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(message) = sender.next().await {
            if let Message::Text(text) = message? {
                let value: serde_json::Value = serde_json::from_str(&text)?;
                match value["type"].as_str() {
                    Some("ack") if value["client_msg_id"] == client_msg_id.as_str() => {
                        return anyhow::Ok(unix_us());
                    }
                    Some("error") => bail!("the send was refused: {text}"),
                    _ => {}
                }
            }
        }
        bail!("the sender's connection closed before the ack")
    });
    let acked_us = wait.await.context("no ack within 60 s")??;
    Ok(acked_us.saturating_sub(t0_us) as f64 / 1000.0)
}

async fn metrics_of(port: u16) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

async fn reqwest_like_get(port: u16, path: &str) -> anyhow::Result<bool> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response.starts_with("HTTP/1.1 200"))
}
