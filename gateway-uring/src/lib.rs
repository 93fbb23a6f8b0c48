//! gateway-uring: holds client WebSocket and TCP connections on monoio shards (one pinned
//! thread per core, io_uring), authenticates them, publishes what clients send to
//! `chatify.upstream` and pushes acks, deliveries and events back down (SPEC §3). Today it
//! holds the config, validation and readiness probes; the shards arrive with issue 3.

pub mod config;

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
