//! storage-reader: the tonic gRPC service for history queries, get, delete, recall,
//! mark-read, clear, session lists and group management (SPEC §5). This crate owns the
//! service: caller identity ([`identity`]), the store reads and per-user writes
//! ([`store`]), the RPCs ([`service`]) and the one error-to-status mapping ([`error`]), plus
//! gRPC reflection and the standard health service.

pub mod config;
pub mod error;
pub mod identity;
pub mod service;
pub mod store;

/// Topics the reader publishes to; readiness requires each to exist.
pub fn required_topics(config: &config::Config) -> Vec<String> {
    vec![config.kafka.topics().message_events()]
}

/// gRPC server reflection over every Chatify proto.
pub fn reflection_service() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(chatify_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
}
