//! The command line: one subcommand per scenario over a shared set of connection, load,
//! output and scale options. The whole parsed command (minus secrets) is written into the
//! JSON result as `config`; options and defaults are documented in loadgen/README.md.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::Serialize;

#[derive(Debug, Clone, clap::Parser, Serialize)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator for Chatify: many WebSocket/TCP clients, open-loop rates, \
             latency percentiles and correctness counts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
    #[command(flatten)]
    pub common: Common,
    /// Internal: this process is worker INDEX of COUNT started by `--processes`.
    #[arg(long, global = true, hide = true, num_args = 2, value_names = ["INDEX", "COUNT"])]
    pub worker: Option<Vec<usize>>,
}

#[derive(Debug, Clone, clap::Subcommand, Serialize)]
#[serde(rename_all = "snake_case", tag = "name")]
pub enum Scenario {
    /// Hold N authenticated idle connections with heartbeats; connect rate, failures, and
    /// (with --server-pid) the server's RSS per connection.
    Connect,
    /// JSON (or protobuf) `ping` frames at an aggregate rate; pong round-trip percentiles.
    Ping(PingArgs),
    /// Single chats between pairs (or random peers): send→ack and send→deliver latency,
    /// throughput, and loss, duplicates and seq gaps.
    Chat(ChatArgs),
    /// Groups of size G created through storage-reader's GroupService: fan-out deliveries
    /// per second and latency, with the same correctness counts.
    Group(GroupArgs),
    /// Pairs chatting while a share of the clients drops and reconnects, then catches up with
    /// `sync` from the last seq it saw: catch-up time and nothing missing.
    Sync(SyncArgs),
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Connect => "connect",
            Scenario::Ping(_) => "ping",
            Scenario::Chat(_) => "chat",
            Scenario::Group(_) => "group",
            Scenario::Sync(_) => "sync",
        }
    }

    /// Clients a worker's share must keep together (a pair, a group).
    pub fn unit(&self) -> usize {
        match self {
            Scenario::Chat(args) if args.peers == Peers::Pairs => 2,
            Scenario::Chat(_) => 1,
            Scenario::Sync(_) => 2,
            Scenario::Group(args) => args.group_size.max(2),
            Scenario::Connect | Scenario::Ping(_) => 1,
        }
    }
}

/// A send rate: messages per second over all connections, or `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    PerSecond(f64),
    Max,
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Rate::PerSecond(rate) => serializer.serialize_f64(*rate),
            Rate::Max => serializer.serialize_str("max"),
        }
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.eq_ignore_ascii_case("max") {
            return Ok(Rate::Max);
        }
        match text.parse::<f64>() {
            Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(Rate::PerSecond(rate)),
            _ => Err(format!(
                "rate must be a positive number of messages per second or `max`, got {text:?}"
            )),
        }
    }
}

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct PingArgs {
    /// Aggregate pings per second over all connections, or `max` (each connection keeps
    /// --in-flight pings outstanding, a new one per pong).
    #[arg(long, default_value = "1000")]
    pub rate: Rate,
    /// Pings outstanding per connection with `--rate max`.
    #[arg(long, default_value_t = 8)]
    pub in_flight: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Peers {
    /// Client 2k talks to 2k+1 only.
    Pairs,
    /// Each send goes to a random other client of the same process.
    Random,
}

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct ChatArgs {
    /// Aggregate sends per second over all connections.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    #[arg(long, value_enum, default_value_t = Peers::Pairs)]
    pub peers: Peers,
    /// Bytes of message content (at least what the timestamp needs).
    #[arg(long, default_value_t = 64)]
    pub message_bytes: usize,
}

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct GroupArgs {
    /// Members per group (each connection is one member; N / G groups).
    #[arg(long, default_value_t = 10)]
    pub group_size: usize,
    /// Aggregate sends per second over all groups (each fans out to G - 1 members).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Clients of each group that send (the first S members); 0 means every member.
    #[arg(long, default_value_t = 0)]
    pub senders_per_group: usize,
    #[arg(long, default_value_t = 64)]
    pub message_bytes: usize,
    /// storage-reader gRPC address (GroupService.CreateGroup).
    #[arg(
        long,
        env = "LOADGEN_GRPC_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub grpc_addr: String,
    /// Internal caller secret of storage-reader (`CHATIFY_INTERNAL_TOKEN`); without it the
    /// group owner's JWT is the caller.
    #[arg(long, env = "CHATIFY_INTERNAL_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub internal_token: Option<String>,
}

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct SyncArgs {
    /// Aggregate sends per second over all connections (pairs).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Share of clients that drop and reconnect (0..=1).
    #[arg(long, default_value_t = 0.2)]
    pub drop_share: f64,
    /// Seconds into the load phase when the chosen clients drop.
    #[arg(long, default_value_t = 2.0)]
    pub drop_after: f64,
    /// How long a dropped client stays offline, in ms.
    #[arg(long, default_value_t = 2000)]
    pub offline_ms: u64,
    /// Messages per `sync` page (the gateway allows at most 200).
    #[arg(long, default_value_t = 100)]
    pub sync_limit: u32,
    #[arg(long, default_value_t = 64)]
    pub message_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    /// Text frames with JSON.
    Json,
    /// Binary frames with protobuf (TCP always uses protobuf).
    Protobuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IoDriver {
    /// io_uring where the kernel allows it, else epoll.
    Auto,
    Uring,
    Legacy,
}

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct Common {
    /// ws://host:port/path (WebSocket) or tcp://host:port (length-prefixed protobuf).
    #[arg(
        long,
        global = true,
        env = "LOADGEN_TARGET",
        default_value = "ws://127.0.0.1:8080/ws"
    )]
    pub target: String,
    #[arg(long, global = true, value_enum, default_value_t = Codec::Json)]
    pub codec: Codec,
    /// Connections (clients) in all.
    #[arg(short = 'n', long, global = true, default_value_t = 100)]
    pub connections: usize,
    /// New connections per second over all processes (the ramp); 0 = all at once.
    #[arg(long, global = true, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// A connection not usable within this many ms counts as `connect:timeout`.
    #[arg(long, global = true, default_value_t = 10_000)]
    pub connect_timeout_ms: u64,
    /// Seconds of load, measured after the ramp and the warm-up.
    #[arg(short = 'd', long, global = true, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load after the ramp that are not measured.
    #[arg(long, global = true, default_value_t = 0.0)]
    pub warmup: f64,
    /// Seconds after the load stops to wait for acks and deliveries still on their way.
    #[arg(long, global = true, default_value_t = 3.0)]
    pub grace: f64,
    /// Heartbeat (JSON/protobuf `ping`) interval per connection in ms; 0 = none.
    #[arg(long, global = true, default_value_t = 30_000)]
    pub heartbeat_ms: u64,
    /// HS256 secret to mint one token per client (the gateway's JWT_SECRET).
    #[arg(long, global = true, env = "JWT_SECRET", hide_env_values = true)]
    #[serde(skip)]
    pub jwt_secret: Option<String>,
    /// File with one JWT a line (client i takes line i), instead of --jwt-secret.
    #[arg(long, global = true)]
    pub tokens_file: Option<PathBuf>,
    /// User ids are PREFIX + client index; default `lg-<run id>-` (fresh sessions per run).
    #[arg(long, global = true)]
    pub user_prefix: Option<String>,
    /// Source addresses to bind connections to, round robin (repeatable). Default for a
    /// loopback target: 127.0.0.2, 127.0.0.3, ... as many as --source-addrs.
    #[arg(long = "local-addr", global = true)]
    pub local_addrs: Vec<IpAddr>,
    /// Loopback source addresses to use when no --local-addr is given (0 = one per 25,000
    /// connections, at least one per process).
    #[arg(long, global = true, default_value_t = 0)]
    pub source_addrs: usize,
    /// Client shards (threads) per process; 0 = one per available core.
    #[arg(long, global = true, default_value_t = 0)]
    pub threads: usize,
    /// Pin shard i to CPU cpus[i % len] (e.g. --cpus 1 to keep off the server's core 0).
    #[arg(long, global = true, value_delimiter = ',')]
    pub cpus: Vec<usize>,
    /// Worker processes; 0 = as many as the open-file limit needs.
    #[arg(long, global = true, default_value_t = 0)]
    pub processes: usize,
    /// monoio driver of the client shards. epoll by default: with monoio 0.2's io_uring
    /// driver, timers and connects stalled for seconds once thousands of sockets were open
    /// (docs/BENCHMARKS.md), which would break the open-loop schedule.
    #[arg(long, global = true, value_enum, default_value_t = IoDriver::Legacy)]
    pub io_driver: IoDriver,
    /// Sample this PID's RSS from /proc once a second (the server's memory per connection).
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// Write the result as JSON here.
    #[arg(long, global = true)]
    pub json: Option<PathBuf>,
    /// Write throughput and latency over time as an SVG plot here.
    #[arg(long, global = true)]
    pub plot: Option<PathBuf>,
    /// No live progress on stderr.
    #[arg(long, global = true)]
    pub quiet: bool,
}

impl Common {
    pub fn transport(&self) -> anyhow::Result<Target> {
        Target::parse(&self.target)
    }
}

/// Where to connect and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub transport: Transport,
    /// host:port as given (for the Host header).
    pub authority: String,
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    WebSocket,
    Tcp,
}

impl Target {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let (transport, rest) = if let Some(rest) = text.strip_prefix("ws://") {
            (Transport::WebSocket, rest)
        } else if let Some(rest) = text.strip_prefix("tcp://") {
            (Transport::Tcp, rest)
        } else {
            anyhow::bail!("--target must start with ws:// or tcp:// (wss is not supported): {text}")
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, "/"),
        };
        anyhow::ensure!(!authority.is_empty(), "--target has no host: {text}");
        Ok(Self {
            transport,
            authority: authority.to_owned(),
            path: path.to_owned(),
        })
    }

    pub fn resolve(&self) -> anyhow::Result<std::net::SocketAddr> {
        use anyhow::Context as _;
        use std::net::ToSocketAddrs as _;
        self.authority
            .to_socket_addrs()
            .with_context(|| format!("resolve {}", self.authority))?
            .next()
            .with_context(|| format!("{} resolves to no address", self.authority))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn targets_parse_by_scheme() {
        assert_eq!(
            Target::parse("ws://127.0.0.1:8080/ws").expect("ws"),
            Target {
                transport: Transport::WebSocket,
                authority: "127.0.0.1:8080".into(),
                path: "/ws".into()
            }
        );
        assert_eq!(
            Target::parse("tcp://localhost:8081")
                .expect("tcp")
                .transport,
            Transport::Tcp
        );
        assert!(Target::parse("wss://x/ws").is_err());
        assert!(Target::parse("http://x/").is_err());
    }

    #[test]
    fn rates_are_numbers_or_max() {
        assert_eq!("max".parse::<Rate>(), Ok(Rate::Max));
        assert_eq!("2500".parse::<Rate>(), Ok(Rate::PerSecond(2500.0)));
        assert!("0".parse::<Rate>().is_err());
        assert!("fast".parse::<Rate>().is_err());
    }

    #[test]
    fn options_go_before_or_after_the_scenario() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "-n",
            "10",
            "ping",
            "--rate",
            "max",
            "--duration",
            "2",
            "--worker",
            "1",
            "3",
        ])
        .expect("parse");
        assert_eq!(cli.common.connections, 10);
        assert_eq!(cli.common.duration, 2.0);
        assert_eq!(cli.worker, Some(vec![1, 3]));
        let Scenario::Ping(ping) = cli.scenario else {
            panic!("ping expected");
        };
        assert_eq!(ping.rate, Rate::Max);
        let config = serde_json::to_value(Cli::try_parse_from(["loadgen", "connect"]).expect("p"))
            .expect("json");
        assert_eq!(config["scenario"]["name"], "connect");
        assert!(config["common"].get("jwt_secret").is_none());
    }
}
