//! storage-reader: the tonic gRPC service for history queries, get, delete, recall,
//! mark-read, clear, session lists and group management (SPEC §5). This crate owns the
//! service: caller identity ([`identity`]), the store reads and per-user writes
//! ([`store`]; a cache-hit page's one Redis round trip runs on its own client,
//! [`hot_redis`]), the RPCs ([`service`], [`group`], and [`admin`] for internal callers:
//! token revocation and device kicks), the pushes and events they publish ([`notify`]) and
//! the one error-to-status mapping ([`error`]), plus gRPC reflection and the standard
//! health service.

/// One RPC: authenticate the caller, run the body for them, map errors to statuses.
macro_rules! rpc {
    ($self:ident, $request:ident, $body:ident) => {{
        let caller = $self
            .gatekeeper
            .caller($request.metadata())
            .await
            .map_err(tonic::Status::from)?;
        $self
            .$body(&caller, $request.into_inner())
            .await
            .map(tonic::Response::new)
            .map_err(tonic::Status::from)
    }};
}

pub mod admin;
pub mod config;
pub mod error;
pub mod group;
pub mod hot_redis;
pub mod identity;
pub mod notify;
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
