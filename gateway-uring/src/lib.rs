//! gateway-uring: holds client WebSocket and TCP connections on monoio shards (one pinned
//! thread per core, io_uring), authenticates them, publishes what clients send to
//! `chatify.upstream` and pushes acks, deliveries and events back down (SPEC §3). Frames are
//! decoded, validated and handed to one [`handler::FrameHandler`]; routing them through
//! Kafka arrives with issue 6.

/// Token verification lives in chatify-core, shared with storage-reader.
pub use chatify_core::auth;
pub mod config;
pub mod conn;
pub mod handler;
pub mod redis_bridge;
pub mod shard;

use chatify_core::probe::{KafkaProbe, Readiness, RedisProbe};

/// Probes for Redis (routes, token deny-list) and the topics this node uses.
pub fn readiness(config: &config::Config) -> anyhow::Result<Readiness> {
    let topics = config.kafka.topics();
    let kafka = KafkaProbe::new(
        &config.kafka.kafka_bootstrap_servers,
        vec![
            topics.upstream(),
            topics.push(&config.node_id),
            topics.user_events(),
        ],
    )?;
    let redis = redis::Client::open(config.redis.redis_url.as_str())?;
    Ok(Readiness::default()
        .with(kafka)
        .with(RedisProbe::new(redis)))
}
