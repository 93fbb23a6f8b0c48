//! storage-reader: the tonic gRPC service for history queries, get, delete, recall,
//! mark-read, clear, session lists and group management (SPEC §5). This crate owns the
//! service; today it serves gRPC reflection of the Chatify protos and its readiness probes.

pub mod config;

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
