//! Upstream records: decoding and validation. Whatever the gateway let through is checked
//! again here, because the bus is a trust boundary too: a record that cannot be stored as
//! it is becomes [`Poison`] (dead-lettered, and answered with an `error` when we know who
//! sent it) instead of blocking its partition.

use chatify_core::ids::{self, MessageId, SessionId};
use chatify_proto::Message as _;
use chatify_proto::bus::v1::{UpstreamCommand, upstream_command};
use chatify_proto::client::v1::{ErrorCode, MessageType};

/// Longest `client_msg_id` accepted, in bytes.
pub const CLIENT_MSG_ID_BYTES_MAX: usize = 128;

/// Where a record came from on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// The gateway connection a command arrived on: where its ack or error goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub node_id: String,
    pub connection_id: u64,
}

/// A valid `send`, ready for the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub position: Position,
    pub origin: Origin,
    pub sender_id: String,
    pub device_id: String,
    pub session: SessionId,
    /// The id this record's message gets if it is new (replays derive the same one).
    pub message_id: MessageId,
    pub client_msg_id: String,
    pub message_type: MessageType,
    pub content: String,
    pub burn_after_seconds: Option<u32>,
    pub request_id: Option<String>,
    /// Gateway receive time, Unix ms: the message's timestamp.
    pub timestamp_ms: i64,
}

/// A record that cannot be processed, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Poison {
    pub position: Position,
    pub reason: String,
    /// Who to tell, when the record said who sent it.
    pub reply: Option<Box<PoisonReply>>,
    /// The record's payload as it came, for the dead-letter topic.
    pub original: Vec<u8>,
}

/// The `error` frame a poison record's sender gets.
#[derive(Debug, Clone, PartialEq)]
pub struct PoisonReply {
    pub origin: Origin,
    pub sender_id: String,
    pub client_msg_id: Option<String>,
    pub request_id: Option<String>,
    pub code: ErrorCode,
}

/// Limits a record must respect.
#[derive(Debug, Clone, Copy)]
pub struct RecordLimits {
    pub record_bytes_max: usize,
    pub content_bytes_max: usize,
}

/// Decodes and validates one upstream record.
pub fn decode(
    payload: Option<&[u8]>,
    position: Position,
    limits: RecordLimits,
) -> Result<Incoming, Poison> {
    let poison = |reason: String| Poison {
        position,
        reason,
        reply: None,
        original: payload.map(<[u8]>::to_vec).unwrap_or_default(),
    };
    let payload = payload.ok_or_else(|| poison("record has no payload".into()))?;
    if payload.len() > limits.record_bytes_max {
        return Err(poison(format!(
            "record is {} bytes, more than {}",
            payload.len(),
            limits.record_bytes_max
        )));
    }
    let command = UpstreamCommand::decode(payload)
        .map_err(|error| poison(format!("not an UpstreamCommand: {error}")))?;
    if command.node_id.is_empty() || command.node_id.contains('|') {
        return Err(poison(format!("bad node_id {:?}", command.node_id)));
    }
    ids::validate_id(&command.sender_id)
        .map_err(|error| poison(format!("bad sender_id {:?}: {error}", command.sender_id)))?;
    let origin = Origin {
        node_id: command.node_id.clone(),
        connection_id: command.connection_id,
    };
    let Some(upstream_command::Command::Send(send)) = command.command else {
        return Err(poison("command is not a send".into()));
    };
    // From here on the sender is known: a refusal is also answered to them.
    let refuse = |code: ErrorCode, reason: String| Poison {
        position,
        reason,
        original: payload.to_vec(),
        reply: Some(Box::new(PoisonReply {
            origin: origin.clone(),
            sender_id: command.sender_id.clone(),
            client_msg_id: (!send.client_msg_id.is_empty()).then(|| send.client_msg_id.clone()),
            request_id: send.request_id.clone(),
            code,
        })),
    };
    let bad = |reason: String| refuse(ErrorCode::BadRequest, reason);
    if send.client_msg_id.is_empty() || send.client_msg_id.len() > CLIENT_MSG_ID_BYTES_MAX {
        return Err(bad(format!(
            "client_msg_id must be 1..={CLIENT_MSG_ID_BYTES_MAX} bytes"
        )));
    }
    if send.content.len() > limits.content_bytes_max {
        return Err(refuse(
            ErrorCode::TooLarge,
            format!(
                "content is {} bytes, more than {}",
                send.content.len(),
                limits.content_bytes_max
            ),
        ));
    }
    let message_type = MessageType::try_from(send.message_type)
        .ok()
        .filter(|kind| *kind != MessageType::Unspecified)
        .ok_or_else(|| bad(format!("unknown message_type {}", send.message_type)))?;
    if send.burn_after_seconds == Some(0) || send.burn_after_seconds > Some(i32::MAX as u32) {
        return Err(bad("burn_after_seconds must be 1..=2^31-1".into()));
    }
    if command.received_at_ms <= 0 {
        return Err(bad("received_at_ms is not set".into()));
    }
    let session = SessionId::parse(&command.session_id)
        .map_err(|error| bad(format!("bad session_id {:?}: {error}", command.session_id)))?;
    match (&session, &send.receiver_id, &send.session_id) {
        (SessionId::Single { .. }, Some(receiver), None) => {
            if session.peer_of(&command.sender_id) != Some(receiver.as_str()) {
                return Err(bad(format!(
                    "session {session} is not the chat between {} and {receiver}",
                    command.sender_id
                )));
            }
        }
        (SessionId::Group(_), None, Some(named)) if *named == command.session_id => {}
        _ => {
            return Err(bad(format!(
                "session {session} does not match the send's receiver_id/session_id"
            )));
        }
    }
    let message_id = if command.message_id.is_empty() {
        MessageId::derive(
            &command.sender_id,
            &send.client_msg_id,
            command.received_at_ms as u64,
        )
    } else {
        MessageId::parse(&command.message_id)
            .map_err(|_| bad(format!("bad message_id {:?}", command.message_id)))?
    };
    Ok(Incoming {
        position,
        origin,
        sender_id: command.sender_id,
        device_id: command.device_id,
        session,
        message_id,
        client_msg_id: send.client_msg_id,
        message_type,
        content: send.content,
        burn_after_seconds: send.burn_after_seconds,
        request_id: send.request_id,
        timestamp_ms: command.received_at_ms,
    })
}

/// The database spelling of a message type (the `messages.message_type` check).
pub fn message_type_name(kind: MessageType) -> &'static str {
    match kind {
        MessageType::Unspecified | MessageType::Text => "text",
        MessageType::Image => "image",
        MessageType::File => "file",
        MessageType::System => "system",
        MessageType::Control => "control",
        MessageType::Indicator => "indicator",
    }
}

#[cfg(test)]
mod tests {
    use chatify_proto::client::v1::Send;

    use super::*;

    const LIMITS: RecordLimits = RecordLimits {
        record_bytes_max: 4096,
        content_bytes_max: 100,
    };
    const AT: Position = Position {
        partition: 0,
        offset: 7,
    };

    fn command(session_id: &str, send: Send) -> UpstreamCommand {
        UpstreamCommand {
            sender_id: "alice".into(),
            device_id: "phone".into(),
            node_id: "gw-1".into(),
            connection_id: 9,
            received_at_ms: 1_700_000_000_000,
            session_id: session_id.into(),
            message_id: String::new(),
            command: Some(upstream_command::Command::Send(send)),
        }
    }

    fn to_bob() -> Send {
        Send {
            client_msg_id: "c1".into(),
            receiver_id: Some("bob".into()),
            message_type: MessageType::Text as i32,
            content: "hi".into(),
            ..Send::default()
        }
    }

    fn decode_command(command: &UpstreamCommand) -> Result<Incoming, Poison> {
        decode(Some(&command.encode_to_vec()), AT, LIMITS)
    }

    #[test]
    fn a_valid_single_chat_send_decodes_with_a_derived_id() {
        let incoming = decode_command(&command("p2p:alice:bob", to_bob())).expect("valid");
        assert_eq!(incoming.session.to_string(), "p2p:alice:bob");
        assert_eq!(
            incoming.message_id,
            MessageId::derive("alice", "c1", 1_700_000_000_000)
        );
        assert_eq!(incoming.origin.connection_id, 9);
    }

    #[test]
    fn a_gateway_assigned_id_is_kept() {
        let mut record = command("p2p:alice:bob", to_bob());
        let id = MessageId::derive("x", "y", 1_700_000_000_001);
        record.message_id = id.to_string();
        assert_eq!(decode_command(&record).expect("valid").message_id, id);
    }

    #[test]
    fn garbage_and_oversize_records_are_poison_without_a_reply() {
        let poison = decode(Some(b"\xff\xff\xff"), AT, LIMITS).expect_err("garbage");
        assert!(poison.reason.contains("not an UpstreamCommand"));
        assert!(poison.reply.is_none());
        let big = vec![0_u8; 5000];
        assert!(
            decode(Some(&big), AT, LIMITS)
                .expect_err("too big")
                .reason
                .contains("more than 4096")
        );
        assert!(decode(None, AT, LIMITS).is_err());
    }

    #[test]
    fn bad_fields_are_answered_to_the_sender() {
        let mut forged = command("p2p:bob:carol", to_bob());
        let poison = decode_command(&forged).expect_err("not alice's chat");
        let reply = poison.reply.expect("reply");
        assert_eq!(reply.code, ErrorCode::BadRequest);
        assert_eq!(reply.client_msg_id.as_deref(), Some("c1"));

        forged = command("p2p:alice:bob", to_bob());
        if let Some(upstream_command::Command::Send(send)) = forged.command.as_mut() {
            send.content = "x".repeat(101);
        }
        let poison = decode_command(&forged).expect_err("too large");
        assert_eq!(poison.reply.expect("reply").code, ErrorCode::TooLarge);

        let mut group = command("grp:team", to_bob());
        assert!(
            decode_command(&group).is_err(),
            "group send with receiver_id"
        );
        if let Some(upstream_command::Command::Send(send)) = group.command.as_mut() {
            send.receiver_id = None;
            send.session_id = Some("grp:team".into());
        }
        assert!(decode_command(&group).is_ok());

        let mut untyped = command("p2p:alice:bob", to_bob());
        if let Some(upstream_command::Command::Send(send)) = untyped.command.as_mut() {
            send.message_type = 0;
        }
        assert!(decode_command(&untyped).is_err());
    }
}
