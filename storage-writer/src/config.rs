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
        Ok(())
    }
}
