//! Load client for the JSON `ping` benchmarks (issues 3 and 7): opens N WebSocket
//! connections (each with its own HS256 token, in `?token=` or `Authorization: Bearer`) and
//! then, by `--mode`:
//!
//! - `ping`, closed loop (`--rate 0`): keeps `--in-flight` JSON pings outstanding on each
//!   connection, answering every pong with a new ping: the server's saturation throughput.
//! - `ping`, open loop (`--rate R`): R pings/s in total, spread evenly over the connections
//!   on a fixed schedule; latency is measured from the intended send time, so a server that
//!   falls behind is charged for it (no coordinated omission), and also from the actual send.
//! - `idle`: holds the connections open with one JSON ping per `--heartbeat-seconds` (each
//!   connection from the moment it opens, so a slow ramp never lets the first ones go silent),
//!   writes `--ready-file` once all are open, and stops after `--hold-seconds` (or on
//!   SIGTERM/SIGINT).
//!
//! The client speaks WebSocket itself over plain `TcpStream`s (a fixed handshake, masked text
//! frames written in batches with `try_write`, server frames scanned for the echoed
//! `timestamp` rather than parsed into a tree) so that it costs less per frame than the
//! servers it measures; it runs `--threads` current-thread runtimes (pin it with taskset).
//! Connections can be spread over several 127.x source addresses (`--source-ips`) to pass the
//! ~28k ephemeral ports one source address has towards one server address.
//!
//! Prints a one-line summary and writes the figures as JSON (`--json-out`).

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs as _},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use jsonwebtoken::{EncodingKey, Header};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Highest latency the histogram tracks, in µs (60 s); larger values are clamped.
const LATENCY_US_MAX: u64 = 60_000_000;
/// The RFC 6455 §1.3 example key and its accept value: the handshake is the same every time.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &[u8] = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// Largest HTTP response head accepted from a server.
const RESPONSE_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Bytes read from a socket at a time.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// Read buffer of an idle connection (heartbeat pongs only).
const IDLE_READ_BYTES: usize = 256;
const OPCODE_TEXT: u8 = 0x1;
const OPCODE_CLOSE: u8 = 0x8;
const OPCODE_PING: u8 = 0x9;
const OPCODE_PONG: u8 = 0xA;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// Pings and pongs: throughput and latency.
    Ping,
    /// Hold authenticated idle connections with heartbeats.
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Auth {
    /// `?token=` in the request target.
    Query,
    /// `Authorization: Bearer` header.
    Bearer,
}

#[derive(Debug, Parser)]
#[command(about = "JSON ping load and idle connections over many WebSocket connections")]
struct Args {
    /// WebSocket URL without the token, e.g. ws://127.0.0.1:18080/ws.
    #[arg(long)]
    target: String,
    /// What the connections do once open.
    #[arg(long, value_enum, default_value = "ping")]
    mode: Mode,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Closed loop: pings outstanding per connection (pipelined).
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Open loop: pings per second over all connections (0 = closed loop).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Connections being opened at the same time (per thread).
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 3)]
    warmup_seconds: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Idle mode: seconds between a connection's heartbeat pings.
    #[arg(long, default_value_t = 30)]
    heartbeat_seconds: u64,
    /// Idle mode: seconds to hold the connections once all are open (0 = until a signal).
    #[arg(long, default_value_t = 0)]
    hold_seconds: u64,
    /// Idle mode: file written (with the number of open connections) once all are open.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Client threads, each with its own current-thread runtime and share of connections.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Where the token goes.
    #[arg(long, value_enum, default_value = "query")]
    auth: Auth,
    /// Source addresses to spread connections over: `--source-ip-first` and the next N-1
    /// (0 = let the kernel choose, 127.0.0.1).
    #[arg(long, default_value_t = 0)]
    source_ips: u32,
    /// First source address when `--source-ips` > 0.
    #[arg(long, default_value = "127.0.1.1")]
    source_ip_first: Ipv4Addr,
    /// First user number: `sub` is `bench-<n>`; give processes disjoint ranges.
    #[arg(long, default_value_t = 0)]
    user_offset: usize,
    /// HS256 secret used to mint one token per connection.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// Label written into the JSON (e.g. "gateway-uring").
    #[arg(long, default_value = "target")]
    label: String,
    /// Where to write the JSON result.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Debug, serde::Serialize)]
struct TokenClaims {
    sub: String,
    did: String,
    jti: String,
    exp: u64,
}

/// Errors counted across all connections.
#[derive(Debug, Default)]
struct Errors {
    connect: AtomicU64,
    refused: AtomicU64,
    io: AtomicU64,
    unexpected_frame: AtomicU64,
    closed_early: AtomicU64,
}

/// What one connection measured.
#[derive(Debug)]
struct ConnectionResult {
    pongs_measured: u64,
    pings_sent: u64,
    pongs_total: u64,
}

/// Round trips of one client thread: one pair per thread, shared by its connections (a
/// histogram is ~240 KB, too much to keep per connection at 19,000 connections).
#[derive(Debug)]
struct Histograms {
    /// From the intended send time (open loop) or the send time (closed loop).
    latency_us: Histogram<u64>,
    /// From the moment the ping was written.
    service_latency_us: Histogram<u64>,
}

impl Histograms {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            latency_us: new_histogram()?,
            service_latency_us: new_histogram()?,
        })
    }
}

/// The thread's histograms; only that thread's tasks lock it, so it is never contended.
type SharedHistograms = Arc<std::sync::Mutex<Histograms>>;

/// Phase boundaries and the schedule, shared by every connection.
#[derive(Debug, Clone, Copy)]
struct Plan {
    origin: Instant,
    measure_from: Instant,
    measure_until: Instant,
    mode: Mode,
    in_flight: usize,
    /// Open loop: time between two pings of one connection.
    interval: Option<Duration>,
    heartbeat: Duration,
    connections: usize,
}

/// Where and how to connect.
#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
    auth: Auth,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    label: String,
    target: String,
    mode: String,
    connections: usize,
    connections_open: usize,
    in_flight: usize,
    rate: f64,
    threads: usize,
    warmup_seconds: u64,
    seconds: u64,
    connect_ms: f64,
    pongs: u64,
    pongs_per_second: f64,
    pings_sent: u64,
    pongs_total: u64,
    latency_us: Latency,
    service_latency_us: Latency,
    client_cpu_seconds: f64,
    errors: ErrorCounts,
}

#[derive(Debug, serde::Serialize)]
struct Latency {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
}

impl Latency {
    fn of(histogram: &Histogram<u64>) -> Self {
        Self {
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
            mean: histogram.mean(),
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct ErrorCounts {
    connect: u64,
    refused: u64,
    io: u64,
    unexpected_frame: u64,
    closed_early: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.connections > 0, "--connections must be positive");
    anyhow::ensure!(args.in_flight > 0, "--in-flight must be positive");
    anyhow::ensure!(args.seconds > 0, "--seconds must be positive");
    anyhow::ensure!(args.threads > 0, "--threads must be positive");
    anyhow::ensure!(args.rate >= 0.0, "--rate must not be negative");
    anyhow::ensure!(
        args.connect_concurrency > 0,
        "--connect-concurrency must be positive"
    );
    let target = parse_target(&args.target, args.auth)?;
    let report = run(&args, target)?;
    println!(
        "{label}: {conns}/{want} conns (connect {connect:.0} ms), {pps:.0} pongs/s, \
         latency µs p50 {p50} p90 {p90} p99 {p99} p99.9 {p999} max {max}, \
         client CPU {cpu:.2}s, errors connect {ec} refused {er} io {ei} unexpected {eu} closed {ecl}",
        label = report.label,
        conns = report.connections_open,
        want = report.connections,
        connect = report.connect_ms,
        pps = report.pongs_per_second,
        p50 = report.latency_us.p50,
        p90 = report.latency_us.p90,
        p99 = report.latency_us.p99,
        p999 = report.latency_us.p999,
        max = report.latency_us.max,
        cpu = report.client_cpu_seconds,
        ec = report.errors.connect,
        er = report.errors.refused,
        ei = report.errors.io,
        eu = report.errors.unexpected_frame,
        ecl = report.errors.closed_early,
    );
    if let Some(path) = &args.json_out {
        let json = serde_json::to_vec_pretty(&report).context("encode report")?;
        std::fs::write(path, json).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

fn parse_target(url: &str, auth: Auth) -> anyhow::Result<Target> {
    let rest = url
        .strip_prefix("ws://")
        .context("--target must be a ws:// URL")?;
    let (host, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    let addr = host
        .to_socket_addrs()
        .with_context(|| format!("resolve {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to nothing"))?;
    Ok(Target {
        addr,
        host: host.to_owned(),
        path: path.to_owned(),
        auth,
    })
}

/// CPU seconds (user + system) this process has used so far.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Linux reports in USER_HZ, 100 on every architecture we run on.
    (ticks(11) + ticks(12)) / 100.0
}

fn run(args: &Args, target: Target) -> anyhow::Result<Report> {
    let key = EncodingKey::from_secret(args.jwt_secret.as_bytes());
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs()
        + 24 * 3600;
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    // One request head per connection, token minted up front so connecting costs no HMAC.
    let mut requests: Vec<Vec<Request>> = (0..args.threads).map(|_| Vec::new()).collect();
    for i in 0..args.connections {
        let user = args.user_offset + i;
        let claims = TokenClaims {
            sub: format!("bench-{user}"),
            did: "d".to_owned(),
            jti: format!("bench-{user}-{run_id}"),
            exp,
        };
        let token = jsonwebtoken::encode(&Header::default(), &claims, &key).context("mint JWT")?;
        let source = (args.source_ips > 0).then(|| {
            let first = u32::from(args.source_ip_first);
            IpAddr::V4(Ipv4Addr::from(first + (i as u32 % args.source_ips)))
        });
        requests[i % args.threads].push(Request {
            head: request_head(&target, &token).into_bytes(),
            source,
            index: i,
        });
    }

    let target = Arc::new(target);
    let errors = Arc::new(Errors::default());
    let stop = CancellationToken::new();
    let open = Arc::new(AtomicU64::new(0));
    // Every thread connects its share, then waits here so the load starts at one instant.
    let connected = Arc::new(std::sync::Barrier::new(args.threads + 1));
    let started = Arc::new(std::sync::OnceLock::<Plan>::new());
    let go = Arc::new(std::sync::Barrier::new(args.threads + 1));
    let connect_started = Instant::now();
    let cpu_at_start = process_cpu_seconds();
    let plan_from = |origin: Instant, connections_open: usize| {
        let measure_from = origin + Duration::from_secs(args.warmup_seconds);
        let measure_until = match args.mode {
            Mode::Ping => measure_from + Duration::from_secs(args.seconds),
            // Idle: the hold is ended by the stop flag, not by a deadline.
            Mode::Idle => origin + Duration::from_secs(365 * 24 * 3600),
        };
        let interval = (args.rate > 0.0 && connections_open > 0)
            .then(|| Duration::from_secs_f64(connections_open as f64 / args.rate));
        Plan {
            origin,
            measure_from,
            measure_until,
            mode: args.mode,
            in_flight: args.in_flight,
            interval,
            heartbeat: Duration::from_secs(args.heartbeat_seconds.max(1)),
            connections: args.connections,
        }
    };
    // Idle connections heartbeat on a schedule that starts with the ramp.
    let idle_plan = (args.mode == Mode::Idle).then(|| plan_from(connect_started, 0));

    let mut threads = Vec::new();
    for (shard, requests) in requests.into_iter().enumerate() {
        let target = Arc::clone(&target);
        let errors = Arc::clone(&errors);
        let stop = stop.clone();
        let open = Arc::clone(&open);
        let connected = Arc::clone(&connected);
        let started = Arc::clone(&started);
        let go = Arc::clone(&go);
        let concurrency = args.connect_concurrency;
        let thread = std::thread::Builder::new()
            .name(format!("load-{shard}"))
            .spawn(
                move || -> anyhow::Result<(Vec<ConnectionResult>, Histograms)> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("build tokio runtime")?;
                    runtime.block_on(async move {
                        let histograms: SharedHistograms =
                            Arc::new(std::sync::Mutex::new(Histograms::new()?));
                        let spawn = |plan: Plan, (index, stream, leftover)| {
                            let errors = Arc::clone(&errors);
                            let stop = stop.clone();
                            let histograms = Arc::clone(&histograms);
                            tokio::spawn(connection(
                                stream, leftover, index, plan, errors, stop, histograms,
                            ))
                        };
                        let mut tasks = Vec::new();
                        let mut sockets = Vec::new();
                        // Idle: each connection starts its heartbeats as soon as it is open,
                        // so a long ramp (many processes sharing the box) never leaves the
                        // first connections silent past the server's heartbeat timeout.
                        // Ping: all start at one instant, after every connection is open.
                        connect_each(&target, requests, concurrency, &errors, |opened| {
                            match idle_plan {
                                Some(plan) => tasks.push(spawn(plan, opened)),
                                None => sockets.push(opened),
                            }
                        })
                        .await;
                        open.fetch_add((tasks.len() + sockets.len()) as u64, Ordering::Relaxed);
                        connected.wait();
                        go.wait();
                        let plan = *started.get().context("plan set before go")?;
                        tasks.extend(sockets.into_iter().map(|opened| spawn(plan, opened)));
                        let mut results = Vec::with_capacity(tasks.len());
                        for task in tasks {
                            results.push(task.await.context("connection task panicked")?);
                        }
                        let histograms = Arc::try_unwrap(histograms)
                            .map_err(|_| anyhow::anyhow!("histograms still shared"))?
                            .into_inner()
                            .map_err(|_| anyhow::anyhow!("histogram lock poisoned"))?;
                        Ok((results, histograms))
                    })
                },
            )
            .context("spawn load thread")?;
        threads.push(thread);
    }

    connected.wait();
    let connect_ms = connect_started.elapsed().as_secs_f64() * 1e3;
    let connections_open = usize::try_from(open.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
    let plan = idle_plan.unwrap_or_else(|| plan_from(Instant::now(), connections_open));
    let _ = started.set(plan);
    go.wait();
    let cpu_at_load = process_cpu_seconds();

    if args.mode == Mode::Idle {
        eprintln!(
            "{}: {connections_open}/{} connections open in {connect_ms:.0} ms; holding",
            args.label, args.connections
        );
        if let Some(path) = &args.ready_file {
            std::fs::write(path, format!("{connections_open}\n"))
                .with_context(|| format!("write {}", path.display()))?;
        }
        wait_for_stop(args.hold_seconds)?;
        stop.cancel();
    }

    let mut pongs = 0;
    let mut pings_sent = 0;
    let mut pongs_total = 0;
    let mut latency_us = new_histogram()?;
    let mut service_latency_us = new_histogram()?;
    for thread in threads {
        let (results, histograms) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        for result in results {
            pongs += result.pongs_measured;
            pings_sent += result.pings_sent;
            pongs_total += result.pongs_total;
        }
        latency_us
            .add(&histograms.latency_us)
            .context("merge histograms")?;
        service_latency_us
            .add(&histograms.service_latency_us)
            .context("merge histograms")?;
    }
    let cpu_seconds = match args.mode {
        Mode::Ping => process_cpu_seconds() - cpu_at_load,
        Mode::Idle => process_cpu_seconds() - cpu_at_start,
    };

    Ok(Report {
        label: args.label.clone(),
        target: args.target.clone(),
        mode: format!("{:?}", args.mode).to_lowercase(),
        connections: args.connections,
        connections_open,
        in_flight: args.in_flight,
        rate: args.rate,
        threads: args.threads,
        warmup_seconds: args.warmup_seconds,
        seconds: args.seconds,
        connect_ms,
        pongs,
        pongs_per_second: pongs as f64 / args.seconds as f64,
        pings_sent,
        pongs_total,
        latency_us: Latency::of(&latency_us),
        service_latency_us: Latency::of(&service_latency_us),
        client_cpu_seconds: cpu_seconds,
        errors: ErrorCounts {
            connect: errors.connect.load(Ordering::Relaxed),
            refused: errors.refused.load(Ordering::Relaxed),
            io: errors.io.load(Ordering::Relaxed),
            unexpected_frame: errors.unexpected_frame.load(Ordering::Relaxed),
            closed_early: errors.closed_early.load(Ordering::Relaxed),
        },
    })
}

/// Blocks until `hold_seconds` have passed (0: forever) or SIGTERM/SIGINT arrives.
fn wait_for_stop(hold_seconds: u64) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build signal runtime")?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("SIGTERM handler")?;
        let hold = async {
            if hold_seconds == 0 {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_secs(hold_seconds)).await;
        };
        tokio::select! {
            _ = hold => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok(())
    })
}

/// One connection to open.
#[derive(Debug)]
struct Request {
    head: Vec<u8>,
    source: Option<IpAddr>,
    index: usize,
}

fn request_head(target: &Target, token: &str) -> String {
    let (path, auth_header) = match target.auth {
        Auth::Query => {
            let separator = if target.path.contains('?') { '&' } else { '?' };
            (
                format!("{}{separator}token={token}", target.path),
                String::new(),
            )
        }
        Auth::Bearer => (
            target.path.clone(),
            format!("Authorization: Bearer {token}\r\n"),
        ),
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n{auth_header}\r\n",
        host = target.host
    )
}

/// Opens `requests` with at most `concurrency` handshakes at a time. Returns each open
/// connection with any bytes the server sent after its response head.
/// Opens the connections, `concurrency` handshakes at a time, handing each one that opened
/// (index, stream, bytes read after the handshake) to `on_open`.
async fn connect_each(
    target: &Target,
    requests: Vec<Request>,
    concurrency: usize,
    errors: &Errors,
    mut on_open: impl FnMut((usize, TcpStream, Vec<u8>)),
) {
    futures::stream::iter(requests)
        .map(|request| async move {
            match handshake(target, &request).await {
                Ok((stream, leftover)) => Some((request.index, stream, leftover)),
                Err(HandshakeError::Refused(status)) => {
                    if errors.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("first refusal: {status}");
                    }
                    None
                }
                Err(HandshakeError::Io(error)) => {
                    if errors.connect.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("first connect error: {error:#}");
                    }
                    None
                }
            }
        })
        .buffer_unordered(concurrency)
        .for_each(|opened| {
            if let Some(opened) = opened {
                on_open(opened);
            }
            std::future::ready(())
        })
        .await;
}

#[derive(Debug)]
enum HandshakeError {
    /// The server answered with something other than 101 (its status line).
    Refused(String),
    Io(anyhow::Error),
}

async fn handshake(
    target: &Target,
    request: &Request,
) -> Result<(TcpStream, Vec<u8>), HandshakeError> {
    let io =
        |error: std::io::Error, what: &str| HandshakeError::Io(anyhow::anyhow!("{what}: {error}"));
    let socket = TcpSocket::new_v4().map_err(|e| io(e, "socket"))?;
    if let Some(source) = request.source {
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|e| io(e, "bind source address"))?;
    }
    let mut stream = socket
        .connect(target.addr)
        .await
        .map_err(|e| io(e, "connect"))?;
    stream.set_nodelay(true).map_err(|e| io(e, "TCP_NODELAY"))?;
    stream
        .write_all(&request.head)
        .await
        .map_err(|e| io(e, "write request"))?;
    let mut response = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| io(e, "read response"))?;
        if n == 0 {
            return Err(HandshakeError::Io(anyhow::anyhow!(
                "server closed during the handshake"
            )));
        }
        response.extend_from_slice(&chunk[..n]);
        if let Some(end) = memchr::memmem::find(&response, b"\r\n\r\n") {
            break end + 4;
        }
        if response.len() > RESPONSE_HEAD_BYTES_MAX {
            return Err(HandshakeError::Io(anyhow::anyhow!(
                "response head too long"
            )));
        }
    };
    let status_line = response
        .split(|&b| b == b'\r')
        .next()
        .map(|line| String::from_utf8_lossy(line).into_owned())
        .unwrap_or_default();
    if !status_line.starts_with("HTTP/1.1 101") {
        return Err(HandshakeError::Refused(status_line));
    }
    if memchr::memmem::find(&response[..head_end], WS_ACCEPT).is_none() {
        return Err(HandshakeError::Io(anyhow::anyhow!(
            "101 without the expected Sec-WebSocket-Accept"
        )));
    }
    let leftover = response.split_off(head_end);
    Ok((stream, leftover))
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).context("histogram bounds")
}

fn nanos_since(origin: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX)
}

/// Appends a masked text frame `{"type":"ping","timestamp":<timestamp>}`.
fn push_ping(out: &mut Vec<u8>, timestamp: u64, mask: [u8; 4]) {
    let mut digits = itoa_buffer();
    let digits = format_u64(&mut digits, timestamp);
    const HEAD: &[u8] = br#"{"type":"ping","timestamp":"#;
    let len = HEAD.len() + digits.len() + 1;
    debug_assert!(len < 126, "a ping always fits the 7-bit length");
    out.push(0x80 | OPCODE_TEXT);
    out.push(0x80 | len as u8);
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(HEAD);
    out.extend_from_slice(digits);
    out.push(b'}');
    for (i, byte) in out[start..].iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Appends a masked control frame (pong or close) with `payload`.
fn push_control(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    let len = payload.len().min(125);
    out.push(0x80 | opcode);
    out.push(0x80 | len as u8);
    out.extend_from_slice(&mask);
    out.extend(
        payload[..len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i & 3]),
    );
}

fn itoa_buffer() -> [u8; 20] {
    [0; 20]
}

fn format_u64(buffer: &mut [u8; 20], mut value: u64) -> &[u8] {
    let mut i = buffer.len();
    loop {
        i -= 1;
        buffer[i] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    &buffer[i..]
}

/// The `timestamp` of a pong text frame; None if the frame is not a pong.
fn pong_timestamp(payload: &[u8]) -> Option<u64> {
    memchr::memmem::find(payload, br#""pong""#)?;
    let at = memchr::memmem::find(payload, br#""timestamp":"#)? + 12;
    let digits = payload[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(0u64, |n, &b| {
            n.wrapping_mul(10).wrapping_add(u64::from(b - b'0'))
        });
    Some(digits)
}

/// A complete server frame at the start of `buffer`: (opcode, payload range, frame length).
fn parse_frame(buffer: &[u8]) -> Result<Option<(u8, std::ops::Range<usize>, usize)>, ()> {
    if buffer.len() < 2 {
        return Ok(None);
    }
    if buffer[1] & 0x80 != 0 || buffer[0] & 0x80 == 0 {
        // Server frames are never masked; fragmented messages are not expected here.
        return Err(());
    }
    let (len, header) = match buffer[1] & 0x7f {
        126 => {
            if buffer.len() < 4 {
                return Ok(None);
            }
            (usize::from(u16::from_be_bytes([buffer[2], buffer[3]])), 4)
        }
        127 => {
            if buffer.len() < 10 {
                return Ok(None);
            }
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&buffer[2..10]);
            (
                usize::try_from(u64::from_be_bytes(bytes)).map_err(|_| ())?,
                10,
            )
        }
        len => (usize::from(len), 2),
    };
    if buffer.len() < header + len {
        return Ok(None);
    }
    Ok(Some((buffer[0] & 0x0f, header..header + len, header + len)))
}

/// What reading a connection's socket found.
enum Readable {
    Open,
    Closed,
}

/// Per-connection state between reads and writes.
struct Conn {
    stream: TcpStream,
    read: Vec<u8>,
    write: Vec<u8>,
    written: usize,
    mask: u32,
    /// Open loop: intended send time of each ping in flight, oldest first (ns since origin).
    intended: VecDeque<u64>,
    result: ConnectionResult,
    histograms: SharedHistograms,
}

impl Conn {
    fn next_mask(&mut self) -> [u8; 4] {
        self.mask = self
            .mask
            .wrapping_mul(1_664_525)
            .wrapping_add(1_013_904_223);
        self.mask.to_le_bytes()
    }

    fn queue_ping(&mut self, plan: &Plan, intended: Option<u64>) {
        let sent = nanos_since(plan.origin, Instant::now());
        if let Some(intended) = intended {
            self.intended.push_back(intended);
        }
        let mask = self.next_mask();
        push_ping(&mut self.write, sent, mask);
        self.result.pings_sent += 1;
    }

    /// Writes what is queued as far as the socket takes it.
    fn flush(&mut self) -> std::io::Result<()> {
        while self.written < self.write.len() {
            match self.stream.try_write(&self.write[self.written..]) {
                Ok(n) => self.written += n,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) => return Err(error),
            }
        }
        self.write.clear();
        self.written = 0;
        Ok(())
    }

    fn pending_write(&self) -> bool {
        self.written < self.write.len()
    }

    /// Reads what is readable and handles every complete frame.
    fn on_readable(&mut self, plan: &Plan, errors: &Errors) -> std::io::Result<Readable> {
        loop {
            let old = self.read.len();
            let chunk = if plan.mode == Mode::Idle {
                IDLE_READ_BYTES
            } else {
                READ_CHUNK_BYTES
            };
            self.read.resize(old + chunk, 0);
            let n = match self.stream.try_read(&mut self.read[old..]) {
                Ok(n) => n,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    self.read.truncate(old);
                    break;
                }
                Err(error) => {
                    self.read.truncate(old);
                    return Err(error);
                }
            };
            self.read.truncate(old + n);
            if n == 0 {
                return Ok(Readable::Closed);
            }
            if self.handle_frames(plan, errors) {
                return Ok(Readable::Closed);
            }
            if n < chunk {
                break;
            }
        }
        if plan.mode == Mode::Idle && self.read.is_empty() {
            // Give the memory back: an idle connection holds no buffer between heartbeats.
            self.read = Vec::new();
        }
        Ok(Readable::Open)
    }

    /// Handles the complete frames in the read buffer; true if the server closed.
    fn handle_frames(&mut self, plan: &Plan, errors: &Errors) -> bool {
        let mut consumed = 0;
        let mut closed = false;
        while let Ok(Some((opcode, payload, frame_len))) = parse_frame(&self.read[consumed..]) {
            let payload = consumed + payload.start..consumed + payload.end;
            consumed += frame_len;
            match opcode {
                OPCODE_TEXT => match pong_timestamp(&self.read[payload]) {
                    Some(sent) => self.on_pong(plan, sent),
                    None => {
                        errors.unexpected_frame.fetch_add(1, Ordering::Relaxed);
                    }
                },
                OPCODE_PING => {
                    let body = self.read[payload].to_vec();
                    let mask = self.next_mask();
                    push_control(&mut self.write, OPCODE_PONG, &body, mask);
                }
                OPCODE_PONG => {}
                OPCODE_CLOSE => {
                    closed = true;
                    break;
                }
                _ => {
                    errors.unexpected_frame.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if parse_frame(&self.read[consumed..]).is_err() {
            errors.unexpected_frame.fetch_add(1, Ordering::Relaxed);
            closed = true;
        }
        self.read.drain(..consumed);
        closed
    }

    fn on_pong(&mut self, plan: &Plan, sent: u64) {
        let now = Instant::now();
        self.result.pongs_total += 1;
        let intended = self.intended.pop_front();
        if now >= plan.measure_from && now < plan.measure_until {
            let now_nanos = nanos_since(plan.origin, now);
            let us = |from: u64| (now_nanos.saturating_sub(from) / 1_000).clamp(1, LATENCY_US_MAX);
            self.result.pongs_measured += 1;
            if let Ok(mut histograms) = self.histograms.lock() {
                histograms.service_latency_us.saturating_record(us(sent));
                histograms
                    .latency_us
                    .saturating_record(us(intended.unwrap_or(sent)));
            }
        }
        if plan.mode == Mode::Ping && plan.interval.is_none() && now < plan.measure_until {
            self.queue_ping(plan, None);
        }
    }
}

/// Drives one connection until the plan's end (ping) or the stop flag (idle).
async fn connection(
    stream: TcpStream,
    leftover: Vec<u8>,
    index: usize,
    plan: Plan,
    errors: Arc<Errors>,
    stop: CancellationToken,
    histograms: SharedHistograms,
) -> ConnectionResult {
    let mut conn = Conn {
        stream,
        read: leftover,
        write: Vec::new(),
        written: 0,
        mask: index as u32 ^ 0x9e37_79b9,
        intended: VecDeque::new(),
        result: ConnectionResult {
            pongs_measured: 0,
            pings_sent: 0,
            pongs_total: 0,
        },
        histograms,
    };
    if conn.handle_frames(&plan, &errors) {
        errors.closed_early.fetch_add(1, Ordering::Relaxed);
        return conn.result;
    }
    // The first send of this connection, phased so sends spread evenly over an interval.
    let phase = |period: Duration| period.mul_f64(index as f64 / plan.connections as f64);
    let period = match (plan.mode, plan.interval) {
        (Mode::Idle, _) => Some(plan.heartbeat),
        (Mode::Ping, Some(interval)) => Some(interval),
        (Mode::Ping, None) => None,
    };
    let mut next_due = period.map(|period| {
        let mut first = plan.origin + phase(period);
        if plan.mode == Mode::Idle {
            // Opened after its first slots (a long ramp): one heartbeat now at most, not one
            // per slot missed.
            let now = Instant::now();
            while first + period <= now {
                first += period;
            }
        }
        first
    });
    if period.is_none() {
        for _ in 0..plan.in_flight {
            conn.queue_ping(&plan, None);
        }
    }
    let end = tokio::time::sleep_until(plan.measure_until.into());
    tokio::pin!(end);
    let due = tokio::time::sleep_until(next_due.unwrap_or(plan.measure_until).into());
    tokio::pin!(due);
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        if let (Some(at), Some(period)) = (next_due, period) {
            let now = Instant::now();
            if at <= now {
                let mut at = at;
                while at <= now && at < plan.measure_until {
                    let intended = (plan.mode == Mode::Ping).then(|| nanos_since(plan.origin, at));
                    conn.queue_ping(&plan, intended);
                    at += period;
                }
                if at < plan.measure_until {
                    next_due = Some(at);
                    due.as_mut().reset(at.into());
                } else {
                    // The schedule is over; only the pongs still in flight are awaited.
                    next_due = None;
                }
            }
        }
        if let Err(_error) = conn.flush() {
            errors.io.fetch_add(1, Ordering::Relaxed);
            return conn.result;
        }
        let want_write = conn.pending_write();
        tokio::select! {
            biased;
            readable = conn.stream.readable() => {
                if readable.is_err() {
                    errors.io.fetch_add(1, Ordering::Relaxed);
                    return conn.result;
                }
                match conn.on_readable(&plan, &errors) {
                    Ok(Readable::Open) => {}
                    Ok(Readable::Closed) => {
                        errors.closed_early.fetch_add(1, Ordering::Relaxed);
                        return conn.result;
                    }
                    Err(_error) => {
                        errors.io.fetch_add(1, Ordering::Relaxed);
                        return conn.result;
                    }
                }
            }
            writable = conn.stream.writable(), if want_write => {
                if writable.is_err() {
                    errors.io.fetch_add(1, Ordering::Relaxed);
                    return conn.result;
                }
            }
            () = &mut end, if plan.mode == Mode::Ping => break,
            () = &mut due, if next_due.is_some() => {}
            () = &mut stopped => break,
        }
    }
    // A clean close (1000), best effort.
    let mask = conn.next_mask();
    push_control(&mut conn.write, OPCODE_CLOSE, &1000u16.to_be_bytes(), mask);
    let _ = conn.flush();
    conn.result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_frame_unmasks_to_the_json_ping() {
        let mut out = Vec::new();
        push_ping(&mut out, 1_234_567, [1, 2, 3, 4]);
        assert_eq!(out[0], 0x81);
        let len = usize::from(out[1] & 0x7f);
        let mask = [out[2], out[3], out[4], out[5]];
        let payload: Vec<u8> = out[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i & 3])
            .collect();
        assert_eq!(payload.len(), len);
        assert_eq!(payload, br#"{"type":"ping","timestamp":1234567}"#);
    }

    #[test]
    fn server_frames_are_split_and_pongs_read() {
        let mut buffer = vec![0x81, 0];
        let body = br#"{"type":"pong","timestamp":42}"#;
        buffer[1] = body.len() as u8;
        buffer.extend_from_slice(body);
        let (opcode, payload, len) = parse_frame(&buffer).expect("valid").expect("complete");
        assert_eq!((opcode, len), (OPCODE_TEXT, buffer.len()));
        assert_eq!(pong_timestamp(&buffer[payload]), Some(42));
        assert_eq!(parse_frame(&buffer[..5]), Ok(None));
        assert_eq!(pong_timestamp(br#"{"type":"error","timestamp":1}"#), None);
    }
}
