//! The hand-off seam: every decoded, authorised client frame goes to one
//! [`FrameHandler`]. Part 2 (routing through Kafka) plugs in there; until then
//! [`UnroutedHandler`] answers `ping` and refuses what it cannot do with `unavailable`,
//! never with a fake ack. Shard-local: one handler per shard.

use std::future::Future;

use chatify_proto::client::v1::{
    ErrorCode, Pong, client_frame::Frame as ClientFrame, server_frame::Frame as ServerFrame,
};

use crate::auth::Identity;

/// Which transport a connection uses (replies go back in the matching encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket text frames (JSON).
    WebSocketText,
    /// WebSocket binary frames (protobuf).
    WebSocketBinary,
    /// Length-prefixed protobuf over TCP.
    Tcp,
}

/// What a handler knows about the connection a frame came from. Shard-local.
#[derive(Debug, Clone)]
pub struct ConnectionContext {
    /// Node-unique: the shard index is in the high bits.
    pub connection_id: u64,
    pub identity: Identity,
    pub transport: Transport,
}

/// Receives every authorised client frame of a shard.
pub trait FrameHandler {
    /// Handles one frame; an immediate reply (if any) goes back on the same connection.
    fn handle(
        &self,
        connection: &ConnectionContext,
        frame: ClientFrame,
    ) -> impl Future<Output = Option<ServerFrame>>;
}

/// The built-in handler used until frames are routed through Kafka.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnroutedHandler;

fn error(
    code: ErrorCode,
    reason: &str,
    client_msg_id: Option<String>,
    request_id: Option<String>,
) -> ServerFrame {
    ServerFrame::Error(chatify_proto::client::v1::Error {
        code: code.into(),
        reason: reason.to_owned(),
        client_msg_id,
        request_id,
    })
}

impl FrameHandler for UnroutedHandler {
    async fn handle(
        &self,
        _connection: &ConnectionContext,
        frame: ClientFrame,
    ) -> Option<ServerFrame> {
        const NOT_ROUTED: &str = "message routing is not available on this gateway yet";
        match frame {
            ClientFrame::Ping(ping) => Some(ServerFrame::Pong(Pong {
                timestamp: ping.timestamp,
            })),
            ClientFrame::Pong(_) => None,
            ClientFrame::Auth(_) => Some(error(
                ErrorCode::BadRequest,
                "already authenticated",
                None,
                None,
            )),
            ClientFrame::Send(send) => Some(error(
                ErrorCode::Unavailable,
                NOT_ROUTED,
                Some(send.client_msg_id),
                send.request_id,
            )),
            ClientFrame::Sync(sync) => Some(error(
                ErrorCode::Unavailable,
                NOT_ROUTED,
                None,
                sync.request_id,
            )),
            ClientFrame::Recall(recall) => Some(error(
                ErrorCode::Unavailable,
                NOT_ROUTED,
                None,
                recall.request_id,
            )),
            ClientFrame::Read(_) => Some(error(ErrorCode::Unavailable, NOT_ROUTED, None, None)),
        }
    }
}
