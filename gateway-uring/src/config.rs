//! gateway-uring configuration: flags and env vars, validated at start-up.

use std::net::SocketAddr;

use chatify_core::config::{ConfigError, KafkaArgs, LogArgs, RedisArgs, validate_node_id};

/// Shortest HS256 secret we accept, in bytes (RFC 7518 §3.2: at least the hash size).
pub const JWT_SECRET_BYTES_MIN: usize = 32;

/// Shortest internal-caller credential accepted (storage-reader's rule too).
pub const INTERNAL_TOKEN_BYTES_MIN: usize = 32;

/// Every setting of gateway-uring (`gateway-uring --help` lists them with their env vars).
#[derive(Clone, clap::Parser)]
#[command(name = "gateway-uring", version, about)]
pub struct Config {
    #[command(flatten)]
    pub logs: LogArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "CHATIFY_ADMIN_ADDR", default_value = "127.0.0.1:9101")]
    pub admin_addr: SocketAddr,
    /// This gateway's node id: routes point at it and it consumes `{prefix}.push.{node_id}`.
    #[arg(long, env = "CHATIFY_NODE_ID", default_value = "gw-1")]
    pub node_id: String,
    /// HS256 secret that signs client tokens.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// WebSocket listener (`GET /ws`).
    #[arg(long, env = "CHATIFY_WS_ADDR", default_value = "127.0.0.1:8080")]
    pub ws_addr: SocketAddr,
    /// TCP listener (4-byte length prefix + protobuf).
    #[arg(long, env = "CHATIFY_TCP_ADDR", default_value = "127.0.0.1:8081")]
    pub tcp_addr: SocketAddr,
    /// Shards (threads, one per core); 0 means one per available core.
    #[arg(long, env = "CHATIFY_SHARDS", default_value_t = 0)]
    pub shards: usize,
    /// I/O driver of the shards: io_uring, the epoll fallback, or io_uring when available.
    #[arg(long, env = "CHATIFY_IO_DRIVER", value_enum, default_value = "auto")]
    pub io_driver: IoDriver,
    /// How io_uring runs its completion work for a shard (io_uring driver only): `defer`
    /// (default) only when the shard waits for completions, `coop` when it next enters the
    /// kernel, `signal` at once, interrupting the shard (the kernel's default). A kernel
    /// that refuses the mode asked for gets the next one in that order.
    #[arg(
        long,
        env = "CHATIFY_URING_TASKRUN",
        value_enum,
        default_value = "defer"
    )]
    pub uring_taskrun: UringTaskRun,
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// How this node takes part in the cluster: upstream producing, its push topic, routes,
/// presence, and the storage-reader it forwards `sync` / `read` / `recall` to.
#[derive(Clone, clap::Args)]
pub struct ClusterArgs {
    /// storage-reader's gRPC endpoint (`http://host:port`); unset: `sync`, `read` and
    /// `recall` are answered `unavailable`.
    #[arg(long, env = "CHATIFY_READER_URL")]
    pub reader_url: Option<String>,
    /// Secret that makes this gateway a trusted internal caller of storage-reader (it acts
    /// for the connection's authenticated user).
    #[arg(long, env = "CHATIFY_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,
    /// Longest a forwarded `sync` / `read` / `recall` may take before `unavailable`.
    #[arg(long, env = "CHATIFY_READER_TIMEOUT_MS", default_value_t = 5_000)]
    pub reader_timeout_ms: u64,
    /// Upstream records waiting in the producer (librdkafka queue); beyond that a `send` is
    /// answered `unavailable` instead of being buffered.
    #[arg(
        long,
        env = "CHATIFY_UPSTREAM_QUEUE_MESSAGES_MAX",
        default_value_t = 100_000
    )]
    pub upstream_queue_messages_max: u32,
    /// A `send` the broker has not taken within this time is answered `unavailable` (the
    /// client resends with the same client_msg_id; the writer dedupes).
    #[arg(long, env = "CHATIFY_UPSTREAM_TIMEOUT_MS", default_value_t = 5_000)]
    pub upstream_timeout_ms: u64,
    /// Idempotent producing (the default; needs a broker that supports it across retries).
    /// `false`: acks=all with one request in flight per broker, which keeps each session's
    /// order; a retry may then duplicate a record, which storage-writer's dedupe absorbs.
    #[arg(long, env = "CHATIFY_UPSTREAM_IDEMPOTENCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub upstream_idempotence: bool,
    /// Partitions of this node's push topic when the gateway has to create it.
    #[arg(long, env = "CHATIFY_PUSH_TOPIC_PARTITIONS", default_value_t = 4)]
    pub push_topic_partitions: i32,
    /// How often this node rewrites its connections' routes (last-active time, key TTL).
    #[arg(long, env = "CHATIFY_ROUTE_REFRESH_MS", default_value_t = 30_000)]
    pub route_refresh_ms: u64,
    /// A user whose last device left is announced offline only after this long without a
    /// device coming back.
    #[arg(long, env = "CHATIFY_PRESENCE_GRACE_MS", default_value_t = 10_000)]
    pub presence_grace_ms: u64,
}

impl std::fmt::Debug for ClusterArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterArgs")
            .field("reader_url", &self.reader_url)
            .field(
                "internal_token",
                &self.internal_token.as_ref().map(|_| "<redacted>"),
            )
            .field("reader_timeout_ms", &self.reader_timeout_ms)
            .field(
                "upstream_queue_messages_max",
                &self.upstream_queue_messages_max,
            )
            .field("upstream_timeout_ms", &self.upstream_timeout_ms)
            .field("upstream_idempotence", &self.upstream_idempotence)
            .field("push_topic_partitions", &self.push_topic_partitions)
            .field("route_refresh_ms", &self.route_refresh_ms)
            .field("presence_grace_ms", &self.presence_grace_ms)
            .finish()
    }
}

impl ClusterArgs {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.reader_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::new(
                "CHATIFY_READER_URL",
                "must be an http:// or https:// URL",
            ));
        }
        if self.reader_url.is_some() && self.internal_token.is_none() {
            return Err(ConfigError::new(
                "CHATIFY_INTERNAL_TOKEN",
                "is required when CHATIFY_READER_URL is set (the gateway calls the reader as a trusted internal caller)",
            ));
        }
        // The same minimum storage-reader enforces for the credential.
        if self
            .internal_token
            .as_ref()
            .is_some_and(|token| token.len() < INTERNAL_TOKEN_BYTES_MIN)
        {
            return Err(ConfigError::new(
                "CHATIFY_INTERNAL_TOKEN",
                format!("must be at least {INTERNAL_TOKEN_BYTES_MIN} bytes"),
            ));
        }
        let positive: [(&'static str, u64); 5] = [
            ("CHATIFY_READER_TIMEOUT_MS", self.reader_timeout_ms),
            (
                "CHATIFY_UPSTREAM_QUEUE_MESSAGES_MAX",
                u64::from(self.upstream_queue_messages_max),
            ),
            ("CHATIFY_UPSTREAM_TIMEOUT_MS", self.upstream_timeout_ms),
            ("CHATIFY_ROUTE_REFRESH_MS", self.route_refresh_ms),
            ("CHATIFY_PRESENCE_GRACE_MS", self.presence_grace_ms),
        ];
        if let Some((variable, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError::new(variable, "must be greater than 0"));
        }
        if self.push_topic_partitions <= 0 {
            return Err(ConfigError::new(
                "CHATIFY_PUSH_TOPIC_PARTITIONS",
                "must be greater than 0",
            ));
        }
        // A route not refreshed for ROUTE_STALE_MS is dead; refresh well inside that.
        if self.route_refresh_ms > chatify_core::routing::ROUTE_STALE_MS / 2 {
            return Err(ConfigError::new(
                "CHATIFY_ROUTE_REFRESH_MS",
                format!(
                    "must be at most {} (half the route staleness limit)",
                    chatify_core::routing::ROUTE_STALE_MS / 2
                ),
            ));
        }
        Ok(())
    }
}

/// Which monoio driver the shards run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoDriver {
    /// io_uring when the kernel allows it, else epoll.
    Auto,
    /// io_uring only (start-up fails without it).
    Uring,
    /// epoll (monoio's legacy driver).
    Legacy,
}

/// When a shard's io_uring runs the work that completes its operations (a receive whose
/// bytes arrived from another core, say). The kernel's default interrupts the shard's thread
/// with an inter-processor interrupt each time such work is queued from another core: under
/// the ping load that was ≈ 15 % of the shard's samples, and `defer` spends ≈ 20 % less CPU
/// per pong than `signal` (docs/BENCHMARKS.md, "io_uring task work"). A shard enters the
/// kernel on every turn of its loop anyway (to submit, or to wait), so batching the work
/// there costs it nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UringTaskRun {
    /// `IORING_SETUP_DEFER_TASKRUN` + `SINGLE_ISSUER` (Linux 6.1): the work runs only when
    /// the shard waits for completions, in one batch.
    Defer,
    /// `IORING_SETUP_COOP_TASKRUN` + `SINGLE_ISSUER` (Linux 6.0): no interrupt; the work
    /// runs on the shard's next entry to the kernel.
    Coop,
    /// The kernel's default: an interrupt per piece of work queued from another core.
    Signal,
}

impl UringTaskRun {
    /// The mode to try when the kernel refuses this one.
    pub fn fallback(self) -> Option<Self> {
        match self {
            Self::Defer => Some(Self::Coop),
            Self::Coop => Some(Self::Signal),
            Self::Signal => None,
        }
    }
}

/// Every bound of the gateway; each one is what creates backpressure or a clear refusal.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Limits {
    /// Most live connections on this node (WebSocket and TCP); more get HTTP 503 / a close.
    #[arg(long, env = "CHATIFY_CONNECTIONS_MAX", default_value_t = 100_000)]
    pub connections_max: usize,
    /// Largest single frame a client may send (WebSocket frame or TCP frame).
    #[arg(long, env = "CHATIFY_FRAME_BYTES_MAX", default_value_t = 64 * 1024)]
    pub frame_bytes_max: usize,
    /// Largest WebSocket message after reassembling fragments.
    #[arg(long, env = "CHATIFY_MESSAGE_BYTES_MAX", default_value_t = 256 * 1024)]
    pub message_bytes_max: usize,
    /// Frames waiting for a slow reader before it is disconnected.
    #[arg(long, env = "CHATIFY_SEND_QUEUE_FRAMES_MAX", default_value_t = 256)]
    pub send_queue_frames_max: usize,
    /// Time a client has to finish the WebSocket upgrade or the TCP `auth` frame.
    #[arg(long, env = "CHATIFY_HANDSHAKE_TIMEOUT_MS", default_value_t = 5_000)]
    pub handshake_timeout_ms: u64,
    /// A connection silent this long is closed.
    #[arg(long, env = "CHATIFY_HEARTBEAT_TIMEOUT_MS", default_value_t = 90_000)]
    pub heartbeat_timeout_ms: u64,
    /// Sustained `send` frames per second per user, shared by all of the user's connections
    /// on this node (each gateway node limits on its own).
    #[arg(long, env = "CHATIFY_SEND_RATE_PER_SECOND", default_value_t = 50)]
    pub send_rate_per_second: u32,
    /// Burst of `send` frames per user allowed above the sustained rate (per node, shared by
    /// the user's connections).
    #[arg(long, env = "CHATIFY_SEND_BURST", default_value_t = 100)]
    pub send_burst: u32,
    /// Rate-limited `send` frames in a row on one connection before that connection is
    /// closed for abuse.
    #[arg(long, env = "CHATIFY_RATE_LIMIT_STRIKES_MAX", default_value_t = 20)]
    pub rate_limit_strikes_max: u32,
}

impl Limits {
    fn validate(&self) -> Result<(), ConfigError> {
        let positive: [(&'static str, u64); 8] = [
            ("CHATIFY_CONNECTIONS_MAX", self.connections_max as u64),
            ("CHATIFY_FRAME_BYTES_MAX", self.frame_bytes_max as u64),
            (
                "CHATIFY_SEND_QUEUE_FRAMES_MAX",
                self.send_queue_frames_max as u64,
            ),
            ("CHATIFY_HANDSHAKE_TIMEOUT_MS", self.handshake_timeout_ms),
            ("CHATIFY_HEARTBEAT_TIMEOUT_MS", self.heartbeat_timeout_ms),
            (
                "CHATIFY_SEND_RATE_PER_SECOND",
                u64::from(self.send_rate_per_second),
            ),
            ("CHATIFY_SEND_BURST", u64::from(self.send_burst)),
            (
                "CHATIFY_RATE_LIMIT_STRIKES_MAX",
                u64::from(self.rate_limit_strikes_max),
            ),
        ];
        if let Some((variable, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError::new(variable, "must be greater than 0"));
        }
        if self.message_bytes_max < self.frame_bytes_max {
            return Err(ConfigError::new(
                "CHATIFY_MESSAGE_BYTES_MAX",
                "must be at least CHATIFY_FRAME_BYTES_MAX",
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never reaches a log line.
        f.debug_struct("Config")
            .field("logs", &self.logs)
            .field("kafka", &self.kafka)
            .field("redis", &self.redis)
            .field("admin_addr", &self.admin_addr)
            .field("node_id", &self.node_id)
            .field("jwt_secret", &"<redacted>")
            .field("ws_addr", &self.ws_addr)
            .field("tcp_addr", &self.tcp_addr)
            .field("shards", &self.shards)
            .field("io_driver", &self.io_driver)
            .field("uring_taskrun", &self.uring_taskrun)
            .field("limits", &self.limits)
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        self.redis.validate()?;
        validate_node_id("CHATIFY_NODE_ID", &self.node_id)?;
        if self.jwt_secret.len() < JWT_SECRET_BYTES_MIN {
            return Err(ConfigError::new(
                "JWT_SECRET",
                format!("must be at least {JWT_SECRET_BYTES_MIN} bytes"),
            ));
        }
        if self.ws_addr == self.tcp_addr {
            return Err(ConfigError::new(
                "CHATIFY_TCP_ADDR",
                "must differ from CHATIFY_WS_ADDR",
            ));
        }
        self.limits.validate()?;
        self.cluster.validate()
    }

    /// Shards to run: the configured count, or one per available core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            return self.shards;
        }
        std::thread::available_parallelism().map_or(1, usize::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        chatify_core::config::parse_from::<Config, _, _>(
            std::iter::once("gateway-uring").chain(args.iter().copied()),
        )
        .expect("parses")
    }

    #[test]
    fn short_secret_and_bad_node_id_name_their_variable() {
        let config = parse(&["--jwt-secret", "short"]);
        assert_eq!(config.validate().expect_err("short").variable, "JWT_SECRET");
        let secret = "s".repeat(32);
        let config = parse(&["--jwt-secret", &secret, "--node-id", "gw 1"]);
        assert_eq!(
            config.validate().expect_err("space").variable,
            "CHATIFY_NODE_ID"
        );
        parse(&["--jwt-secret", &secret]).validate().expect("valid");
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let secret = "super-secret-value-that-is-long-enough";
        let config = parse(&["--jwt-secret", secret]);
        assert!(!format!("{config:?}").contains(secret));
    }
}
