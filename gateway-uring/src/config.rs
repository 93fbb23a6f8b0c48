//! gateway-uring configuration: flags and env vars, validated at start-up.

use std::net::SocketAddr;

use chatify_core::config::{ConfigError, KafkaArgs, LogArgs, RedisArgs, validate_node_id};

/// Shortest HS256 secret we accept, in bytes (RFC 7518 §3.2: at least the hash size).
pub const JWT_SECRET_BYTES_MIN: usize = 32;

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
    #[command(flatten)]
    pub limits: Limits,
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
            .field("limits", &self.limits)
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
        self.limits.validate()
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
