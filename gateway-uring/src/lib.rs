//! gateway-uring: holds client WebSocket and TCP connections on monoio shards (one pinned
//! thread per core, io_uring), authenticates them, registers their routes and presence in
//! Redis, publishes what clients send to `chatify.upstream` ([`upstream`]), pushes acks,
//! deliveries and events from `chatify.push.{node}` back down ([`push`]), and forwards
//! `sync` / `read` / `recall` to storage-reader ([`reader_bridge`]) (SPEC §1–3).

/// Token verification lives in chatify-core, shared with storage-reader.
pub use chatify_core::auth;
pub mod config;
pub mod conn;
pub mod handler;
pub mod push;
pub mod reader_bridge;
pub mod redis_bridge;
pub mod shard;
pub mod upstream;

use chatify_core::probe::{KafkaProbe, Readiness, RedisProbe};

/// Probes for Redis (routes, token deny-list), the topics this node uses, and its push
/// consumer's partitions.
pub fn readiness(
    config: &config::Config,
    push_assigned: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<Readiness> {
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
        .with(RedisProbe::new(redis))
        .with(push::PushAssignedProbe(push_assigned)))
}
