//! storage-writer: consumes `chatify.upstream` and makes every message durable before it is
//! acked (SPEC §4). This crate owns that pipeline: record validation ([`record`]),
//! membership ([`members`]), dedupe and per-session seq ([`sequence`]), the Postgres and
//! MongoDB archive ([`archive`]), the Redis hot cache and session state ([`cache`]), acks,
//! deliveries and dead letters ([`publish`]), the batch loop with retries ([`pipeline`]) and
//! the Kafka consumer that commits offsets only after all of it ([`consumer`]), which rejoins
//! its group when it owns nothing while nobody makes progress ([`stall`]).

pub mod archive;
pub mod cache;
pub mod config;
pub mod consumer;
pub mod error;
pub mod members;
pub mod pipeline;
pub mod publish;
pub mod record;
pub mod sequence;
pub mod stall;

/// Topics the writer reads or writes; readiness requires each to exist.
pub fn required_topics(config: &config::Config) -> Vec<String> {
    let topics = config.kafka.topics();
    vec![
        topics.upstream(),
        topics.upstream_dlq(),
        topics.message_events(),
    ]
}
