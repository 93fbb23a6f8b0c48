//! storage-writer configuration: flags and env vars, validated at start-up.

use std::net::SocketAddr;

use chatify_core::config::{ConfigError, KafkaArgs, LogArgs, MongoArgs, PostgresArgs, RedisArgs};

/// Every setting of storage-writer (`storage-writer --help` lists them with their env vars).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "storage-writer", version, about)]
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
    #[arg(long, env = "CHATIFY_ADMIN_ADDR", default_value = "127.0.0.1:9102")]
    pub admin_addr: SocketAddr,
    /// Kafka consumer group the writers share.
    #[arg(
        long,
        env = "CHATIFY_WRITER_GROUP",
        default_value = "chatify-storage-writer"
    )]
    pub consumer_group: String,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
}

/// Batching, retention and retry settings of the pipeline.
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineArgs {
    /// Most upstream records in one batch.
    #[arg(long, env = "CHATIFY_WRITER_BATCH_MAX", default_value_t = 512)]
    pub batch_max: usize,
    /// Most payload bytes in one batch.
    #[arg(long, env = "CHATIFY_WRITER_BATCH_BYTES_MAX", default_value_t = 4 << 20)]
    pub batch_bytes_max: usize,
    /// How long a batch waits for more records after its first one, in milliseconds.
    #[arg(long, env = "CHATIFY_WRITER_BATCH_LINGER_MS", default_value_t = 5)]
    pub batch_linger_ms: u64,
    /// Largest upstream record accepted; bigger ones go to the dead-letter topic.
    #[arg(long, env = "CHATIFY_WRITER_RECORD_BYTES_MAX", default_value_t = 256 << 10)]
    pub record_bytes_max: usize,
    /// Largest message content accepted, in bytes (the gateway's
    /// CHATIFY_MESSAGE_BYTES_MAX should not exceed it).
    #[arg(long, env = "CHATIFY_CONTENT_BYTES_MAX", default_value_t = 64 << 10)]
    pub content_bytes_max: usize,
    /// How long (sender, client_msg_id) is remembered for resends, in seconds.
    #[arg(long, env = "CHATIFY_DEDUPE_TTL_SECONDS", default_value_t = 24 * 3600)]
    pub dedupe_ttl_seconds: u64,
    /// Messages kept per session in the Redis hot cache.
    #[arg(long, env = "CHATIFY_HOT_CACHE_MESSAGES", default_value_t = 200)]
    pub hot_cache_messages: usize,
    /// Idle time after which a session's hot cache expires, in seconds.
    #[arg(long, env = "CHATIFY_HOT_CACHE_TTL_SECONDS", default_value_t = 3600)]
    pub hot_cache_ttl_seconds: u64,
    /// How long a session's member list is cached in Redis, in seconds.
    #[arg(long, env = "CHATIFY_MEMBERS_CACHE_TTL_SECONDS", default_value_t = 300)]
    pub members_cache_ttl_seconds: u64,
    /// First retry delay after a store fails, in milliseconds (doubles up to the cap).
    #[arg(long, env = "CHATIFY_WRITER_RETRY_MIN_MS", default_value_t = 100)]
    pub retry_min_ms: u64,
    /// Longest retry delay while a store is down, in milliseconds.
    #[arg(long, env = "CHATIFY_WRITER_RETRY_MAX_MS", default_value_t = 5_000)]
    pub retry_max_ms: u64,
}

impl PipelineArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("CHATIFY_WRITER_BATCH_MAX", self.batch_max as u64),
            (
                "CHATIFY_WRITER_BATCH_BYTES_MAX",
                self.batch_bytes_max as u64,
            ),
            (
                "CHATIFY_WRITER_RECORD_BYTES_MAX",
                self.record_bytes_max as u64,
            ),
            ("CHATIFY_CONTENT_BYTES_MAX", self.content_bytes_max as u64),
            ("CHATIFY_DEDUPE_TTL_SECONDS", self.dedupe_ttl_seconds),
            ("CHATIFY_HOT_CACHE_MESSAGES", self.hot_cache_messages as u64),
            ("CHATIFY_HOT_CACHE_TTL_SECONDS", self.hot_cache_ttl_seconds),
            (
                "CHATIFY_MEMBERS_CACHE_TTL_SECONDS",
                self.members_cache_ttl_seconds,
            ),
            ("CHATIFY_WRITER_RETRY_MIN_MS", self.retry_min_ms),
        ];
        for (variable, value) in positive {
            if value == 0 {
                return Err(ConfigError::new(variable, "must be greater than 0"));
            }
        }
        if self.retry_max_ms < self.retry_min_ms {
            return Err(ConfigError::new(
                "CHATIFY_WRITER_RETRY_MAX_MS",
                "must not be below CHATIFY_WRITER_RETRY_MIN_MS",
            ));
        }
        Ok(())
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        self.redis.validate()?;
        self.postgres.validate()?;
        self.mongo.validate()?;
        if self.consumer_group.trim().is_empty() {
            return Err(ConfigError::new("CHATIFY_WRITER_GROUP", "is empty"));
        }
        self.pipeline.validate()
    }
}
