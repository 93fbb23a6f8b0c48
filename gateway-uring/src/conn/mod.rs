//! Client connections: the wire codecs of the two transports, pure code on owned buffers that
//! the shard's connection tasks call after each read (shard-local, nothing here crosses shards).
//!
//! `ws.rs` and `tcp.rs` use nothing from the rest of this crate, only their own dependencies:
//! the fuzz crate (`gateway-uring/fuzz`) compiles the two files on their own.

pub mod tcp;
pub mod ws;
