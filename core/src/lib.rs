//! Shared plumbing every Chatify service uses: client token verification, ids and session ids, the Redis key layout,
//! Kafka topic names and a renewable producer, config parsing and validation, route records, telemetry (logs,
//! metrics, health endpoints) and readiness probes. No I/O loops of its own live here
//! besides the small admin HTTP server.

pub mod auth;
pub mod config;
pub mod ids;
pub mod keys;
pub mod probe;
pub mod producer;
pub mod routing;
#[cfg(all(feature = "postgres", feature = "mongo"))]
pub mod stores;
pub mod telemetry;
pub mod topics;

pub use ids::{MessageId, SessionId};
pub use topics::Topics;
