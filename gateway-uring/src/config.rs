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
        Ok(())
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
