//! The JSON wire format of text WebSocket frames: the same frames as protobuf, tagged by
//! `"type"`, with enums as snake_case strings. Field names are a public contract
//! (docs/PROTOCOL.md); the tests below pin them.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::client::v1::{client_frame, server_frame};

/// A text frame that is not a valid Chatify JSON frame (WebSocket close 1007).
#[derive(Debug, thiserror::Error)]
#[error("invalid json frame: {0}")]
pub struct JsonFrameError(String);

impl From<serde_json::Error> for JsonFrameError {
    fn from(error: serde_json::Error) -> Self {
        Self(error.to_string())
    }
}

impl From<simd_json::Error> for JsonFrameError {
    fn from(error: simd_json::Error) -> Self {
        Self(error.to_string())
    }
}

/// Parses a client text frame, e.g. `{"type":"send","client_msg_id":"c1",...}`.
pub fn decode_client_frame(json: &[u8]) -> Result<client_frame::Frame, JsonFrameError> {
    Ok(serde_json::from_slice(json)?)
}

/// simd-json's working memory (the padded input copy, structural indexes, string and stack
/// buffers), kept between parses by [`decode_client_frame_with_buffers`].
pub use simd_json::Buffers as JsonBuffers;

/// Parses a client text frame with simd-json, which uses `json` as scratch space (its
/// contents are garbage afterwards). Allocates simd-json's working memory for this one
/// parse; the gateway keeps it instead ([`decode_client_frame_with_buffers`]).
pub fn decode_client_frame_in_place(
    json: &mut [u8],
) -> Result<client_frame::Frame, JsonFrameError> {
    Ok(simd_json::serde::from_slice(json)?)
}

/// The gateway's hot path: [`decode_client_frame_in_place`] with simd-json's working memory
/// reused from earlier parses (one set per shard), so a frame costs no allocations for it.
pub fn decode_client_frame_with_buffers(
    json: &mut [u8],
    buffers: &mut JsonBuffers,
) -> Result<client_frame::Frame, JsonFrameError> {
    Ok(simd_json::serde::from_slice_with_buffers(json, buffers)?)
}

/// Encodes a client frame as JSON (used by clients such as loadgen).
pub fn encode_client_frame(frame: &client_frame::Frame) -> Vec<u8> {
    serde_json::to_vec(frame).expect("generated frame types always serialize")
}

/// Parses a server text frame (used by clients such as loadgen).
pub fn decode_server_frame(json: &[u8]) -> Result<server_frame::Frame, JsonFrameError> {
    Ok(serde_json::from_slice(json)?)
}

/// Encodes a server frame as JSON.
pub fn encode_server_frame(frame: &server_frame::Frame) -> Vec<u8> {
    serde_json::to_vec(frame).expect("generated frame types always serialize")
}

/// Serde for an `i32` enum field through the prost enum's snake_case name.
fn serialize_enum<E, S>(value: &i32, serializer: S) -> Result<S::Ok, S::Error>
where
    E: TryFrom<i32> + Serialize + Default,
    S: Serializer,
{
    E::try_from(*value)
        .unwrap_or_default()
        .serialize(serializer)
}

fn deserialize_enum<'de, E, D>(deserializer: D) -> Result<i32, D::Error>
where
    E: Deserialize<'de> + Into<i32>,
    D: Deserializer<'de>,
{
    E::deserialize(deserializer).map(Into::into)
}

macro_rules! enum_field {
    ($module:ident, $enum:ty) => {
        #[doc = concat!("Serde for an `i32` field holding a [`", stringify!($enum), "`].")]
        pub mod $module {
            use super::*;
            pub fn serialize<S: Serializer>(value: &i32, serializer: S) -> Result<S::Ok, S::Error> {
                serialize_enum::<$enum, S>(value, serializer)
            }
            pub fn deserialize<'de, D: Deserializer<'de>>(
                deserializer: D,
            ) -> Result<i32, D::Error> {
                deserialize_enum::<$enum, D>(deserializer)
            }
        }
    };
}

enum_field!(message_type, crate::client::v1::MessageType);
enum_field!(error_code, crate::client::v1::ErrorCode);
enum_field!(presence_state, crate::client::v1::PresenceState);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::v1::*;
    use serde_json::{Value, json};

    fn server_json(frame: server_frame::Frame) -> Value {
        serde_json::from_slice(&encode_server_frame(&frame)).expect("valid json")
    }

    #[test]
    fn send_to_receiver_parses_with_flat_target() {
        let frame = decode_client_frame(
            br#"{"type":"send","client_msg_id":"c1","receiver_id":"u2","message_type":"text","content":"{\"text\":\"hi\"}","request_id":"r1"}"#,
        )
        .expect("valid send");
        let client_frame::Frame::Send(send) = frame else {
            panic!("expected send, got {frame:?}");
        };
        assert_eq!(send.client_msg_id, "c1");
        assert_eq!(send.receiver_id.as_deref(), Some("u2"));
        assert_eq!(send.session_id, None);
        assert_eq!(send.message_type(), MessageType::Text);
        assert_eq!(send.content, r#"{"text":"hi"}"#);
        assert_eq!(send.request_id.as_deref(), Some("r1"));
        assert_eq!(send.burn_after_seconds, None);
    }

    #[test]
    fn send_to_group_round_trips() {
        let send = Send {
            client_msg_id: "c2".into(),
            receiver_id: None,
            session_id: Some("grp:42".into()),
            message_type: MessageType::Image.into(),
            content: "aGk=".into(),
            burn_after_seconds: Some(10),
            request_id: None,
        };
        let frame = client_frame::Frame::Send(send.clone());
        let encoded: Value = serde_json::from_slice(&encode_client_frame(&frame)).expect("json");
        assert_eq!(
            encoded,
            json!({"type":"send","client_msg_id":"c2","session_id":"grp:42","message_type":"image",
                   "content":"aGk=","burn_after_seconds":10})
        );
        assert_eq!(
            decode_client_frame(&encode_client_frame(&frame)).expect("round trip"),
            client_frame::Frame::Send(send)
        );
    }

    #[test]
    fn every_client_frame_type_has_its_spec_name() {
        for (json, expected) in [
            (
                r#"{"type":"sync","session_id":"p2p:a:b","after_seq":5,"limit":20}"#,
                "sync",
            ),
            (r#"{"type":"read","session_id":"p2p:a:b","seq":7}"#, "read"),
            (r#"{"type":"recall","message_id":"m1"}"#, "recall"),
            (r#"{"type":"ping","timestamp":1}"#, "ping"),
            (r#"{"type":"pong"}"#, "pong"),
            (r#"{"type":"auth","token":"t"}"#, "auth"),
        ] {
            let frame = decode_client_frame(json.as_bytes()).expect(json);
            let back: Value = serde_json::from_slice(&encode_client_frame(&frame)).expect("json");
            assert_eq!(back["type"], expected);
            assert_eq!(back, serde_json::from_str::<Value>(json).expect("json"));
        }
    }

    #[test]
    fn server_frames_use_the_public_field_names() {
        assert_eq!(
            server_json(server_frame::Frame::Ack(Ack {
                client_msg_id: "c1".into(),
                message_id: "m1".into(),
                session_id: "p2p:a:b".into(),
                seq: 3,
                timestamp: 1_700_000_000_000,
            })),
            json!({"type":"ack","client_msg_id":"c1","message_id":"m1","session_id":"p2p:a:b",
                   "seq":3,"timestamp":1_700_000_000_000_i64})
        );
        assert_eq!(
            server_json(server_frame::Frame::Error(Error {
                code: ErrorCode::NotMember.into(),
                reason: "not a member of grp:1".into(),
                client_msg_id: Some("c1".into()),
                request_id: None,
            })),
            json!({"type":"error","code":"not_member","reason":"not a member of grp:1","client_msg_id":"c1"})
        );
        assert_eq!(
            server_json(server_frame::Frame::Deliver(Deliver {
                message: Some(ChatMessage {
                    message_id: "m1".into(),
                    session_id: "grp:1".into(),
                    seq: 9,
                    sender_id: "u1".into(),
                    message_type: MessageType::Text.into(),
                    content: "hi".into(),
                    timestamp: 5,
                    burn_after_seconds: None,
                    recalled: false,
                }),
            })),
            json!({"type":"deliver","message":{"message_id":"m1","session_id":"grp:1","seq":9,
                   "sender_id":"u1","message_type":"text","content":"hi","timestamp":5}})
        );
        assert_eq!(
            server_json(server_frame::Frame::ReadReceipt(ReadReceipt {
                session_id: "grp:1".into(),
                user_id: "u2".into(),
                seq: 4,
            })),
            json!({"type":"read_receipt","session_id":"grp:1","user_id":"u2","seq":4})
        );
        assert_eq!(
            server_json(server_frame::Frame::Recalled(Recalled {
                session_id: "grp:1".into(),
                message_id: "m1".into(),
                seq: 4,
            })),
            json!({"type":"recalled","session_id":"grp:1","message_id":"m1","seq":4})
        );
        assert_eq!(
            server_json(server_frame::Frame::Presence(Presence {
                user_id: "u2".into(),
                state: PresenceState::Offline.into(),
            })),
            json!({"type":"presence","user_id":"u2","state":"offline"})
        );
        assert_eq!(
            server_json(server_frame::Frame::Kicked(Kicked {
                reason: "token revoked".into()
            })),
            json!({"type":"kicked","reason":"token revoked"})
        );
        assert_eq!(
            server_json(server_frame::Frame::Messages(Messages {
                session_id: "grp:1".into(),
                messages: vec![],
                has_more: false,
                request_id: Some("r9".into()),
            })),
            json!({"type":"messages","session_id":"grp:1","messages":[],"has_more":false,"request_id":"r9"})
        );
    }

    #[test]
    fn unknown_type_and_bad_enum_are_errors() {
        assert!(decode_client_frame(br#"{"type":"teleport"}"#).is_err());
        assert!(decode_client_frame(br#"{"type":"send","message_type":"hologram"}"#).is_err());
        assert!(decode_client_frame(br#"{"client_msg_id":"c1"}"#).is_err());
        assert!(decode_client_frame(b"not json").is_err());
    }

    #[test]
    fn simd_json_and_serde_json_agree() {
        for json in [
            r#"{"type":"send","client_msg_id":"c1","receiver_id":"u2","message_type":"text","content":"{\"t\":\"hi ünï\"}","burn_after_seconds":5}"#,
            r#"{"type":"send","client_msg_id":"c2","session_id":"grp:1","message_type":"file","content":""}"#,
            r#"{"type":"sync","session_id":"p2p:a:b","after_seq":5,"limit":20,"request_id":"r"}"#,
            r#"{"type":"ping","timestamp":1732694400000}"#,
            r#"{"type":"recall","message_id":"m1"}"#,
        ] {
            let mut scratch = json.as_bytes().to_vec();
            assert_eq!(
                decode_client_frame_in_place(&mut scratch).expect(json),
                decode_client_frame(json.as_bytes()).expect(json)
            );
        }
        // One set of buffers across frames of different sizes, a bad one in between.
        let mut buffers = JsonBuffers::default();
        for json in [
            r#"{"type":"ping","timestamp":1}"#,
            r#"{"type":"send","client_msg_id":"c1","receiver_id":"u2","message_type":"text","content":"{\"t\":\"a much longer content than the ping before it, to grow every buffer\"}"}"#,
            r#"{"type":"send","message_type":"x"}"#,
            "not json",
            r#"{"type":"ping","timestamp":2}"#,
        ] {
            let mut scratch = json.as_bytes().to_vec();
            let reused = decode_client_frame_with_buffers(&mut scratch, &mut buffers);
            match decode_client_frame(json.as_bytes()) {
                Ok(expected) => assert_eq!(reused.expect(json), expected),
                Err(_) => assert!(reused.is_err(), "{json}"),
            }
        }
        for bad in [
            &b"not json"[..],
            br#"{"type":"teleport"}"#,
            br#"{"type":"send","message_type":"x"}"#,
        ] {
            assert!(decode_client_frame_in_place(&mut bad.to_vec()).is_err());
        }
    }

    #[test]
    fn protobuf_and_json_carry_the_same_frame() {
        use prost::Message as _;
        let frame = ClientFrame {
            frame: Some(client_frame::Frame::Read(Read {
                session_id: "grp:7".into(),
                seq: 11,
                request_id: Some("r1".into()),
            })),
        };
        let decoded = ClientFrame::decode(frame.encode_to_vec().as_slice()).expect("protobuf");
        let inner = decoded.frame.expect("frame set");
        assert_eq!(
            decode_client_frame(&encode_client_frame(&inner)).expect("json"),
            inner
        );
    }
}
