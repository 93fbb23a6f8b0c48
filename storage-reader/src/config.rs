//! storage-reader configuration: flags and env vars, validated at start-up.

use std::net::SocketAddr;

use chatify_core::config::{ConfigError, KafkaArgs, LogArgs, MongoArgs, PostgresArgs, RedisArgs};

/// Shortest accepted secret, in bytes (HS256 wants at least the hash size).
pub const JWT_SECRET_BYTES_MIN: usize = 32;

/// Every setting of storage-reader (`storage-reader --help` lists them with their env vars).
#[derive(Clone, clap::Parser)]
#[command(name = "storage-reader", version, about)]
pub struct Config {
    #[command(flatten)]
    pub logs: LogArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub postgres: PostgresArgs,
    #[command(flatten)]
    pub mongo: MongoArgs,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "CHATIFY_ADMIN_ADDR", default_value = "127.0.0.1:9103")]
    pub admin_addr: SocketAddr,
    /// Address the gRPC service listens on.
    #[arg(long, env = "CHATIFY_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// HS256 secret of client tokens (the gateway's): callers authenticate with
    /// `authorization: Bearer <token>`.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// Shared secret of trusted internal callers (the gateway forwarding its users'
    /// requests): `x-chatify-internal-token` plus `x-chatify-user-id`. Unset: only tokens.
    #[arg(long, env = "CHATIFY_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,
    /// How long after sending a sender may recall a message, in seconds.
    #[arg(long, env = "CHATIFY_RECALL_WINDOW_SECONDS", default_value_t = 120)]
    pub recall_window_seconds: u64,
    /// Most members a group may have, owner included.
    #[arg(long, env = "CHATIFY_GROUP_MEMBERS_MAX", default_value_t = 2000)]
    pub group_members_max: usize,
    /// How often burn-after-read messages whose timer ran out are purged, in ms.
    #[arg(long, env = "CHATIFY_BURN_SWEEP_MS", default_value_t = 1000)]
    pub burn_sweep_ms: u64,
    /// Store that serves history pages the Redis hot cache cannot: postgres or mongo.
    #[arg(
        long,
        env = "CHATIFY_READER_ARCHIVE",
        value_enum,
        default_value = "postgres"
    )]
    pub archive: crate::store::ArchiveStore,
    /// How long a user's clear watermark and hidden seqs of a session stay in Redis after
    /// their last rebuild from Postgres or change, in seconds (a read after that rebuilds).
    #[arg(
        long,
        env = "CHATIFY_READER_MARKS_TTL_SECONDS",
        default_value_t = 86_400
    )]
    pub marks_ttl_seconds: u64,
    /// Redis connections of the cache-hit page read (its own client, `hot_redis`): each is
    /// shared, concurrent pages' pipelines on one go out in one write.
    #[arg(
        long,
        env = "CHATIFY_READER_REDIS_CONNECTIONS",
        default_value_t = crate::hot_redis::CONNECTIONS_DEFAULT
    )]
    pub redis_connections: usize,
    /// How long a cache-hit page waits for Redis (queueing and connecting included)
    /// before the call fails Unavailable, in ms.
    #[arg(
        long,
        env = "CHATIFY_READER_REDIS_TIMEOUT_MS",
        default_value_t = crate::hot_redis::TIMEOUT_DEFAULT_MS
    )]
    pub redis_timeout_ms: u64,
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        self.redis.validate()?;
        self.postgres.validate()?;
        self.mongo.validate()?;
        if self.jwt_secret.len() < JWT_SECRET_BYTES_MIN {
            return Err(ConfigError::new(
                "JWT_SECRET",
                format!("must be at least {JWT_SECRET_BYTES_MIN} bytes"),
            ));
        }
        if self
            .internal_token
            .as_ref()
            .is_some_and(|token| token.len() < JWT_SECRET_BYTES_MIN)
        {
            return Err(ConfigError::new(
                "CHATIFY_INTERNAL_TOKEN",
                format!("must be at least {JWT_SECRET_BYTES_MIN} bytes"),
            ));
        }
        if self.marks_ttl_seconds == 0 {
            return Err(ConfigError::new(
                "CHATIFY_READER_MARKS_TTL_SECONDS",
                "must be at least 1",
            ));
        }
        if self.redis_connections == 0 {
            return Err(ConfigError::new(
                "CHATIFY_READER_REDIS_CONNECTIONS",
                "must be at least 1",
            ));
        }
        if self.redis_timeout_ms == 0 {
            return Err(ConfigError::new(
                "CHATIFY_READER_REDIS_TIMEOUT_MS",
                "must be at least 1",
            ));
        }
        if self.group_members_max < 2 {
            return Err(ConfigError::new(
                "CHATIFY_GROUP_MEMBERS_MAX",
                "must be at least 2",
            ));
        }
        if self.grpc_addr == self.admin_addr {
            return Err(ConfigError::new(
                "CHATIFY_GRPC_ADDR",
                "must differ from CHATIFY_ADMIN_ADDR",
            ));
        }
        Ok(())
    }
}

impl Config {
    /// The cache-hit page read's Redis client, as configured.
    pub fn hot_redis(
        &self,
        client: &redis::Client,
    ) -> Result<crate::hot_redis::HotRedis, crate::hot_redis::HotRedisError> {
        crate::hot_redis::HotRedis::new(
            client,
            self.redis_connections,
            std::time::Duration::from_millis(self.redis_timeout_ms),
        )
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("grpc_addr", &self.grpc_addr)
            .field("admin_addr", &self.admin_addr)
            .field("jwt_secret", &"<redacted>")
            .field(
                "internal_token",
                &self.internal_token.as_ref().map(|_| "<redacted>"),
            )
            .field("recall_window_seconds", &self.recall_window_seconds)
            .finish_non_exhaustive()
    }
}
