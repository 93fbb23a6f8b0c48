//! Chatify's protobuf definitions and their generated Rust types: client frames (also
//! the JSON wire format of text WebSocket frames), records on the Kafka bus, and the
//! gRPC storage and group services. This is the only crate that knows protobuf.

pub mod json;
pub mod page;

/// Frames between clients and gateway-uring (SPEC §3).
pub mod client {
    pub mod v1 {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("chatify.client.v1");
    }
}

/// Records on the Kafka bus (upstream commands, push records, events, dead letters).
pub mod bus {
    pub mod v1 {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("chatify.bus.v1");
    }
}

/// gRPC StorageService and GroupService of storage-reader (SPEC §5).
pub mod storage {
    pub mod v1 {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("chatify.storage.v1");

        // Written by hand (`crate::page`): a page may carry already-encoded messages.
        pub use crate::page::QueryMessagesResponse;
    }
}

/// Encoded `FileDescriptorSet` of every Chatify proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/chatify_descriptor.bin"));

pub use prost::Message;
