//! Load client for the JSON `ping` benchmark (issue 3): opens N WebSocket connections (each
//! with its own HS256 token), keeps `--in-flight` JSON pings outstanding on each, and measures
//! pongs per second and round-trip latency (from the echoed timestamp) over a fixed window
//! after a warm-up. Prints a one-line summary and writes the figures as JSON.
//!
//! The same binary measures `gateway-uring` and the tokio-tungstenite baseline
//! (`ws_ping_baseline`), see `bench/run-ws-ping.sh`.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use chatify_proto::client::v1::{
    Ping, client_frame::Frame as ClientFrame, server_frame::Frame as ServerFrame,
};
use clap::Parser;
use futures::{FutureExt as _, SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use jsonwebtoken::{EncodingKey, Header};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Highest latency the histogram tracks, in µs (60 s); larger values are clamped.
const LATENCY_US_MAX: u64 = 60_000_000;

#[derive(Debug, Parser)]
#[command(about = "JSON ping load over many WebSocket connections")]
struct Args {
    /// WebSocket URL without the token, e.g. ws://127.0.0.1:18080/ws.
    #[arg(long)]
    target: String,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Pings outstanding per connection (pipelined).
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 3)]
    warmup_seconds: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
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
    io: AtomicU64,
    unexpected_frame: AtomicU64,
    closed_early: AtomicU64,
}

/// What one connection measured.
#[derive(Debug)]
struct ConnectionResult {
    pongs_measured: u64,
    latency_us: Histogram<u64>,
}

/// Phase boundaries, shared by every connection.
#[derive(Debug, Clone, Copy)]
struct Phases {
    origin: Instant,
    measure_from: Instant,
    measure_until: Instant,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    label: String,
    target: String,
    connections: usize,
    connections_open: usize,
    in_flight: usize,
    warmup_seconds: u64,
    seconds: u64,
    connect_ms: f64,
    pongs: u64,
    pongs_per_second: f64,
    latency_us: Latency,
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

#[derive(Debug, serde::Serialize)]
struct ErrorCounts {
    connect: u64,
    io: u64,
    unexpected_frame: u64,
    closed_early: u64,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.connections > 0, "--connections must be positive");
    anyhow::ensure!(args.in_flight > 0, "--in-flight must be positive");
    anyhow::ensure!(args.seconds > 0, "--seconds must be positive");
    anyhow::ensure!(
        args.connect_concurrency > 0,
        "--connect-concurrency must be positive"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("build tokio runtime")?;
    let report = runtime.block_on(run(&args))?;
    println!(
        "{label}: {conns}/{want} conns (connect {connect:.0} ms), {pps:.0} pongs/s, \
         latency µs p50 {p50} p90 {p90} p99 {p99} p99.9 {p999} max {max}, \
         errors connect {ec} io {ei} unexpected {eu} closed {ecl}",
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
        ec = report.errors.connect,
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

async fn run(args: &Args) -> anyhow::Result<Report> {
    let key = EncodingKey::from_secret(args.jwt_secret.as_bytes());
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs()
        + 3600;
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let mut urls = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let claims = TokenClaims {
            sub: format!("bench-{i}"),
            did: "d".to_owned(),
            jti: format!("bench-{i}-{run_id}"),
            exp,
        };
        let token = jsonwebtoken::encode(&Header::default(), &claims, &key).context("mint JWT")?;
        urls.push(format!("{}?token={token}", args.target));
    }

    let errors = Arc::new(Errors::default());
    let connect_started = Instant::now();
    let sockets: Vec<Ws> = futures::stream::iter(urls)
        .map(|url| {
            let errors = Arc::clone(&errors);
            async move {
                match tokio_tungstenite::connect_async(url.as_str()).await {
                    Ok((ws, _response)) => Some(ws),
                    Err(error) => {
                        if errors.connect.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("first connect error: {error}");
                        }
                        None
                    }
                }
            }
        })
        .buffer_unordered(args.connect_concurrency)
        .filter_map(|ws| async move { ws })
        .collect()
        .await;
    let connect_ms = connect_started.elapsed().as_secs_f64() * 1e3;
    let connections_open = sockets.len();
    anyhow::ensure!(connections_open > 0, "no connection could be opened");

    let origin = Instant::now();
    let measure_from = origin + Duration::from_secs(args.warmup_seconds);
    let phases = Phases {
        origin,
        measure_from,
        measure_until: measure_from + Duration::from_secs(args.seconds),
    };
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|ws| {
            let errors = Arc::clone(&errors);
            tokio::spawn(ping_loop(ws, args.in_flight, phases, errors))
        })
        .collect();
    let mut pongs = 0;
    let mut latency_us = new_histogram()?;
    for task in tasks {
        let result = task.await.context("connection task panicked")?;
        pongs += result.pongs_measured;
        latency_us
            .add(&result.latency_us)
            .context("merge histograms")?;
    }

    Ok(Report {
        label: args.label.clone(),
        target: args.target.clone(),
        connections: args.connections,
        connections_open,
        in_flight: args.in_flight,
        warmup_seconds: args.warmup_seconds,
        seconds: args.seconds,
        connect_ms,
        pongs,
        pongs_per_second: pongs as f64 / args.seconds as f64,
        latency_us: Latency {
            p50: latency_us.value_at_quantile(0.50),
            p90: latency_us.value_at_quantile(0.90),
            p99: latency_us.value_at_quantile(0.99),
            p999: latency_us.value_at_quantile(0.999),
            max: latency_us.max(),
            mean: latency_us.mean(),
        },
        errors: ErrorCounts {
            connect: errors.connect.load(Ordering::Relaxed),
            io: errors.io.load(Ordering::Relaxed),
            unexpected_frame: errors.unexpected_frame.load(Ordering::Relaxed),
            closed_early: errors.closed_early.load(Ordering::Relaxed),
        },
    })
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).context("histogram bounds")
}

fn ping(origin: Instant) -> Message {
    let nanos = i64::try_from(origin.elapsed().as_nanos()).expect("run shorter than 292 years");
    let json = chatify_proto::json::encode_client_frame(&ClientFrame::Ping(Ping {
        timestamp: Some(nanos),
    }));
    Message::text(String::from_utf8(json).expect("serde_json writes UTF-8"))
}

/// Keeps `in_flight` pings outstanding until the measured window ends; every pong received is
/// answered with a new ping. Pongs received inside the window are counted and timed.
async fn ping_loop(
    mut ws: Ws,
    in_flight: usize,
    phases: Phases,
    errors: Arc<Errors>,
) -> ConnectionResult {
    let mut result = ConnectionResult {
        pongs_measured: 0,
        latency_us: new_histogram().expect("constant bounds are valid"),
    };
    for _ in 0..in_flight {
        if ws.feed(ping(phases.origin)).await.is_err() {
            errors.io.fetch_add(1, Ordering::Relaxed);
            return result;
        }
    }
    if ws.flush().await.is_err() {
        errors.io.fetch_add(1, Ordering::Relaxed);
        return result;
    }
    let deadline = tokio::time::Instant::from_std(phases.measure_until);
    loop {
        let first = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_elapsed) => break,
            Ok(message) => message,
        };
        let mut next = Some(first);
        // Answer every pong already readable, then flush the new pings together.
        while let Some(message) = next.take() {
            let message = match message {
                None => {
                    errors.closed_early.fetch_add(1, Ordering::Relaxed);
                    return result;
                }
                Some(Err(_)) => {
                    errors.io.fetch_add(1, Ordering::Relaxed);
                    return result;
                }
                Some(Ok(message)) => message,
            };
            match message {
                Message::Text(text) => {
                    match chatify_proto::json::decode_server_frame(text.as_bytes()) {
                        Ok(ServerFrame::Pong(pong)) => {
                            let now = Instant::now();
                            if now >= phases.measure_from && now < phases.measure_until {
                                result.pongs_measured += 1;
                                let sent = pong.timestamp.unwrap_or(0);
                                let now_nanos = now.duration_since(phases.origin).as_nanos();
                                let rtt_nanos = u128::try_from(sent)
                                    .map(|sent| now_nanos.saturating_sub(sent))
                                    .unwrap_or(0);
                                let rtt_us = u64::try_from(rtt_nanos / 1_000)
                                    .unwrap_or(u64::MAX)
                                    .clamp(1, LATENCY_US_MAX);
                                result.latency_us.saturating_record(rtt_us);
                            }
                            if ws.feed(ping(phases.origin)).await.is_err() {
                                errors.io.fetch_add(1, Ordering::Relaxed);
                                return result;
                            }
                        }
                        _ => {
                            errors.unexpected_frame.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Message::Close(_) => {
                    errors.closed_early.fetch_add(1, Ordering::Relaxed);
                    return result;
                }
                _ => {}
            }
            next = ws.next().now_or_never();
        }
        if ws.flush().await.is_err() {
            errors.io.fetch_add(1, Ordering::Relaxed);
            return result;
        }
    }
    let _ = ws.close(None).await;
    result
}
