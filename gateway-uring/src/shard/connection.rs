//! What WebSocket and TCP connections share once a frame is decoded: validation, the
//! per-user send rate check (node-wide, see [`super::NodeShared`]) with per-connection
//! strikes, the hand-off to the shard's handler, and encoding the reply in the connection's
//! wire format. Shard-local.

use bytes::Bytes;
use chatify_core::ids::{MessageId, SessionId, validate_id};
use chatify_proto::Message as _;
use chatify_proto::client::v1::{
    ErrorCode, ServerFrame, client_frame::Frame as ClientFrame, server_frame::Frame as Reply,
};

use std::rc::Rc;

use super::writer::{OutboundQueue, QueueFull};
use super::{LiveConnection, Shard};
use crate::handler::{ConnectionContext, Transport};

/// Longest `client_msg_id` / `request_id`, in bytes.
pub const CLIENT_ID_BYTES_MAX: usize = 128;
/// Largest `sync` page a client may ask for.
pub const SYNC_LIMIT_MAX: u32 = 200;

/// Why a connection must close (the code and reason go in the close frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

impl CloseReason {
    pub const fn new(code: u16, reason: &'static str) -> Self {
        Self { code, reason }
    }
}

/// One authenticated connection's frame processing.
#[derive(Debug)]
pub struct Connection {
    /// This connection's entry in the shard's table (identity, outbound queue, push
    /// format) and the transport of the frame being handled.
    pub context: ConnectionContext,
    /// Rate-limited `send` frames in a row on this connection. The allowance is per user
    /// (node-wide), the strikes per connection: the connection that keeps pushing is the one
    /// closed, not the user's other devices.
    rate_limit_strikes: u32,
}

impl Connection {
    pub(super) fn new(live: Rc<LiveConnection>, transport: Transport) -> Self {
        Self {
            context: ConnectionContext { live, transport },
            rate_limit_strikes: 0,
        }
    }

    pub fn queue(&self) -> &OutboundQueue {
        &self.context.live.queue
    }

    /// Handles one decoded frame; `Err` means close the connection with that reason.
    pub fn on_frame(
        &mut self,
        shard: &Shard,
        transport: Transport,
        frame: ClientFrame,
    ) -> Result<(), CloseReason> {
        metrics::counter!("chatify_gateway_frames_in_total", "type" => frame_type(&frame))
            .increment(1);
        self.context.transport = transport;
        self.context
            .live
            .push_binary
            .set(transport != Transport::WebSocketText);
        if let Err(reason) = validate(&frame, self.context.live.identity.user_id()) {
            return self.reply(error_reply(&frame, ErrorCode::BadRequest, reason));
        }
        if matches!(frame, ClientFrame::Send(_)) {
            // Once per `send`, against the user's node-wide allowance (see `NodeShared`).
            if shard
                .node
                .send_rate
                .check(&self.context.live.identity.user_id().to_owned())
            {
                self.rate_limit_strikes = 0;
            } else {
                metrics::counter!("chatify_gateway_refusals_total", "reason" => "rate_limited")
                    .increment(1);
                self.rate_limit_strikes += 1;
                if self.rate_limit_strikes >= shard.limits.rate_limit_strikes_max {
                    return Err(CloseReason::new(1008, "send rate abuse"));
                }
                return self.reply(error_reply(
                    &frame,
                    ErrorCode::RateLimited,
                    "send rate exceeded",
                ));
            }
        }
        if let Some(reply) = shard.handler.handle(&self.context, frame) {
            self.reply(reply)?;
        }
        Ok(())
    }

    /// Encodes `reply` in the wire format of the frame it answers and queues it.
    pub fn reply(&self, reply: Reply) -> Result<(), CloseReason> {
        let (binary, payload) = encode_reply(self.context.transport, reply);
        self.queue().push(binary, payload).map_err(|QueueFull| {
            metrics::counter!("chatify_gateway_refusals_total", "reason" => "slow_consumer")
                .increment(1);
            CloseReason::new(1008, "slow consumer")
        })
    }
}

/// (binary?, payload) of a server frame for a transport.
pub fn encode_reply(transport: Transport, reply: Reply) -> (bool, Bytes) {
    match transport {
        Transport::WebSocketText => (
            false,
            Bytes::from(chatify_proto::json::encode_server_frame(&reply)),
        ),
        Transport::WebSocketBinary | Transport::Tcp => (
            true,
            Bytes::from(ServerFrame { frame: Some(reply) }.encode_to_vec()),
        ),
    }
}

fn error_reply(frame: &ClientFrame, code: ErrorCode, reason: &str) -> Reply {
    let (client_msg_id, request_id) = match frame {
        ClientFrame::Send(send) => (Some(send.client_msg_id.clone()), send.request_id.clone()),
        ClientFrame::Sync(sync) => (None, sync.request_id.clone()),
        ClientFrame::Recall(recall) => (None, recall.request_id.clone()),
        _ => (None, None),
    };
    Reply::Error(chatify_proto::client::v1::Error {
        code: code.into(),
        reason: reason.to_owned(),
        client_msg_id: client_msg_id.filter(|id| !id.is_empty()),
        request_id,
    })
}

fn frame_type(frame: &ClientFrame) -> &'static str {
    match frame {
        ClientFrame::Auth(_) => "auth",
        ClientFrame::Send(_) => "send",
        ClientFrame::Sync(_) => "sync",
        ClientFrame::Read(_) => "read",
        ClientFrame::Recall(_) => "recall",
        ClientFrame::Ping(_) => "ping",
        ClientFrame::Pong(_) => "pong",
    }
}

fn client_id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= CLIENT_ID_BYTES_MAX
}

/// Field checks of a well-formed frame; the error goes back as `bad_request`.
pub fn validate(frame: &ClientFrame, sender_id: &str) -> Result<(), &'static str> {
    match frame {
        ClientFrame::Send(send) => {
            if !client_id_ok(&send.client_msg_id) {
                return Err("client_msg_id must be 1..=128 bytes");
            }
            if send
                .request_id
                .as_deref()
                .is_some_and(|id| !client_id_ok(id))
            {
                return Err("request_id must be 1..=128 bytes");
            }
            match (&send.receiver_id, &send.session_id) {
                (Some(receiver), None) => {
                    validate_id(receiver).map_err(|_| "receiver_id is not a valid user id")?;
                    if receiver == sender_id {
                        return Err("receiver_id is the sender");
                    }
                }
                (None, Some(session)) => {
                    SessionId::parse(session)
                        .map_err(|_| "session_id is not a valid session id")?;
                }
                _ => return Err("exactly one of receiver_id or session_id is required"),
            }
            if send.message_type == 0 {
                return Err("message_type is required");
            }
            if send.burn_after_seconds == Some(0) {
                return Err("burn_after_seconds must be positive");
            }
            Ok(())
        }
        ClientFrame::Sync(sync) => {
            SessionId::parse(&sync.session_id)
                .map_err(|_| "session_id is not a valid session id")?;
            if sync.limit > SYNC_LIMIT_MAX {
                return Err("limit is at most 200");
            }
            Ok(())
        }
        ClientFrame::Read(read) => {
            SessionId::parse(&read.session_id)
                .map_err(|_| "session_id is not a valid session id")?;
            Ok(())
        }
        ClientFrame::Recall(recall) => {
            MessageId::parse(&recall.message_id)
                .map_err(|_| "message_id is not a valid message id")?;
            Ok(())
        }
        ClientFrame::Auth(_) | ClientFrame::Ping(_) | ClientFrame::Pong(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatify_proto::client::v1::{MessageType, Send};

    fn send(receiver: Option<&str>, session: Option<&str>) -> ClientFrame {
        ClientFrame::Send(Send {
            client_msg_id: "c1".into(),
            receiver_id: receiver.map(Into::into),
            session_id: session.map(Into::into),
            message_type: MessageType::Text.into(),
            content: "hi".into(),
            burn_after_seconds: None,
            request_id: None,
        })
    }

    #[test]
    fn send_needs_exactly_one_valid_target() {
        assert_eq!(validate(&send(Some("u2"), None), "u1"), Ok(()));
        assert_eq!(validate(&send(None, Some("grp:g1")), "u1"), Ok(()));
        assert!(validate(&send(Some("u2"), Some("grp:g1")), "u1").is_err());
        assert!(validate(&send(None, None), "u1").is_err());
        assert!(validate(&send(Some("u1"), None), "u1").is_err());
        assert!(validate(&send(None, Some("room:1")), "u1").is_err());
        assert!(validate(&send(Some("bad id"), None), "u1").is_err());
    }
}
