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

use std::collections::BTreeMap;
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
}

const JWT_SECRET: &str = "fanout-bench-secret-that-is-long-enough-0123";

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
    arrivals: Arc<Vec<AtomicU64>>,
    rounds: usize,
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
    let mut seen = 0;
    while seen < rounds {
        // Frame header: server frames are unmasked.
        while buffer.len() < 2 {
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                bail!("closed");
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
                buffer.extend_from_slice(&chunk[..read]);
                continue;
            }
            short => (short as usize, 2),
        };
        while buffer.len() < header + length {
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                bail!("closed");
            }
            buffer.extend_from_slice(&chunk[..read]);
        }
        let opcode = buffer[0] & 0x0F;
        buffer.drain(..header + length);
        if opcode == 1 || opcode == 2 {
            arrivals[seen].fetch_max(unix_us(), Ordering::Relaxed);
            RECEIVED.fetch_add(1, Ordering::Relaxed);
            seen += 1;
        }
    }
    // Stay connected until the driver ends the process.
    std::future::pending::<()>().await;
    Ok(())
}

static CONNECTED: AtomicUsize = AtomicUsize::new(0);
static RECEIVED: AtomicUsize = AtomicUsize::new(0);

/// Client process: prints `connected N` once all are up, then `round R last_us T received N`
/// per round as the frames arrive.
async fn clients(args: ClientArgs) -> anyhow::Result<()> {
    // One socket per connection: take the hard open-files limit.
    if let Ok((_, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard);
    }
    let arrivals: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.rounds).map(|_| AtomicU64::new(0)).collect());
    let failures = Arc::new(AtomicUsize::new(0));
    let semaphore = Arc::new(tokio::sync::Semaphore::new(200));
    for index in args.first..args.first + args.count {
        let user = format!("{}{index}", args.user_prefix);
        let token = token(&user, &args.jwt_secret)?;
        let permit = Arc::clone(&semaphore).acquire_owned().await?;
        let (addr, arrivals, failures) = (
            args.ws_addr.clone(),
            Arc::clone(&arrivals),
            Arc::clone(&failures),
        );
        let rounds = args.rounds;
        tokio::spawn(async move {
            let before = CONNECTED.load(Ordering::Relaxed);
            let held = hold(addr, token, arrivals, rounds);
            tokio::pin!(held);
            // Release the connect permit once this connection is up (or failed).
            let result = loop {
                tokio::select! {
                    result = &mut held => break Some(result),
                    () = tokio::time::sleep(Duration::from_millis(5)) => {
                        if CONNECTED.load(Ordering::Relaxed) > before { break None; }
                    }
                }
            };
            drop(permit);
            let result = match result {
                Some(result) => result,
                None => held.await,
            };
            if let Err(error) = result
                && failures.fetch_add(1, Ordering::Relaxed) < 5
            {
                eprintln!("connection failed: {error:#}");
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while CONNECTED.load(Ordering::Relaxed) + failures.load(Ordering::Relaxed) < args.count {
        if Instant::now() > deadline {
            bail!("connecting timed out");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "connected {} failed {}",
        CONNECTED.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed)
    );
    let mut reported = 0;
    let connected = CONNECTED.load(Ordering::Relaxed);
    while reported < args.rounds {
        if RECEIVED.load(Ordering::Relaxed) >= connected * (reported + 1) {
            println!(
                "round {reported} last_us {} received {}",
                arrivals[reported].load(Ordering::Relaxed),
                connected
            );
            reported += 1;
            continue;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    std::future::pending::<()>().await;
    Ok(())
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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
    topics.extend(nodes.iter().map(|node| format!("{prefix}.push.{node}")));
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| NewTopic::new(name, 1, TopicReplication::Fixed(1)))
        .collect();
    admin.create_topics(&new, &AdminOptions::new()).await?;

    let mut processes = Vec::new();
    let mut gateways = Vec::new();
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
            .env("CHATIFY_HEARTBEAT_TIMEOUT_MS", "600000")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", args.gateway_binary.display()))?;
        processes.push(Process(child));
        gateways.push((node.clone(), format!("127.0.0.1:{ws}"), admin_port));
    }
    for (node, _, admin_port) in &gateways {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = reqwest_like_get(*admin_port, "/readyz")
                .await
                .unwrap_or(false);
            if ready {
                break;
            }
            if Instant::now() > deadline {
                bail!("gateway {node} not ready");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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

    // Every connection's route, read the way the writer does (pipelined), by node.
    let users: Vec<String> = (0..args.connections)
        .map(|i| format!("{user_prefix}{i}"))
        .collect();
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
        for (topic, payload) in &payloads {
            producer
                .send(
                    rdkafka::producer::FutureRecord::<(), _>::to(topic).payload(payload),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(error, _)| error)?;
        }
        let mut last = 0;
        let mut received = 0;
        for lines_of in &mut lines {
            let line = tokio::time::timeout(Duration::from_secs(60), lines_of.next_line())
                .await
                .context("a client process never got the push")??
                .context("client exited")?;
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
        let seconds = last.saturating_sub(t0) as f64 / 1e6;
        let rate = received as f64 / seconds;
        eprintln!(
            "round {round}: {received} deliveries, last after {:.1} ms, {:.0} deliveries/s",
            seconds * 1000.0,
            rate
        );
        results.push(serde_json::json!({
            "round": round, "deliveries": received, "last_delivery_ms": seconds * 1000.0,
            "deliveries_per_second": rate,
        }));
    }
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
