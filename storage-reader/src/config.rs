//! storage-reader configuration: flags and env vars, validated at start-up.

use std::net::SocketAddr;

use chatify_core::config::{ConfigError, KafkaArgs, LogArgs, MongoArgs, PostgresArgs, RedisArgs};

/// Every setting of storage-reader (`storage-reader --help` lists them with their env vars).
#[derive(Debug, Clone, clap::Parser)]
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
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        self.redis.validate()?;
        self.postgres.validate()?;
        self.mongo.validate()?;
        if self.grpc_addr == self.admin_addr {
            return Err(ConfigError::new(
                "CHATIFY_GRPC_ADDR",
                "must differ from CHATIFY_ADMIN_ADDR",
            ));
        }
        Ok(())
    }
}
