//! storage-writer: consumes `chatify.upstream`, dedupes, assigns per-session seq, writes the
//! Redis hot cache, MongoDB and Postgres, then publishes acks and deliveries and only then
//! commits offsets (SPEC §4). This crate owns that pipeline; today it holds the config and
//! the readiness probes the pipeline will run behind.

pub mod config;

/// Topics the writer reads or writes; readiness requires each to exist.
pub fn required_topics(config: &config::Config) -> Vec<String> {
    let topics = config.kafka.topics();
    vec![
        topics.upstream(),
        topics.upstream_dlq(),
        topics.message_events(),
    ]
}
