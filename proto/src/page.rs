//! `chatify.storage.v1.QueryMessagesResponse`, written by hand rather than generated: the
//! same wire message, but a page may also carry messages that are already encoded.
//! storage-reader serves cached pages with the hot cache's entries as they are (each is one
//! encoded `ChatMessage`, written by storage-writer), instead of decoding 50 messages and
//! encoding them again. Both lists are entries of the same repeated field 1; decoding
//! always fills `messages`.

use bytes::{Buf, BufMut, Bytes};
use prost::DecodeError;
use prost::encoding::{self, DecodeContext, WireType};

use crate::client::v1::ChatMessage;

/// Why bytes are not one well-formed `ChatMessage`.
#[derive(Debug, thiserror::Error)]
pub enum EncodedMessageError {
    #[error("not a chat message: {0}")]
    Decode(#[from] DecodeError),
    #[error("chat message field {field} runs past the end")]
    Truncated { field: u32 },
    #[error("chat message field {field} is not utf-8")]
    NotUtf8 { field: u32 },
}

/// A page of history (`chatify.storage.v1.QueryMessagesResponse`).
#[derive(Clone, PartialEq, Default, Debug)]
pub struct QueryMessagesResponse {
    /// The page's messages, in page order.
    pub messages: Vec<ChatMessage>,
    /// Cursor of the next page; empty when there is none.
    pub next_cursor: String,
    pub has_more: bool,
    /// The page's messages already encoded, in page order: each exactly one `ChatMessage`
    /// as [`EncodedChatMessage::new`] checked it. Sent after `messages` as more entries of
    /// field 1, so a page sets one list or the other. Never filled by decoding.
    pub encoded_messages: Vec<EncodedChatMessage>,
}

/// One `ChatMessage`'s encoding, checked to be well formed, and its seq.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct EncodedChatMessage {
    bytes: Bytes,
    seq: u64,
}

impl EncodedChatMessage {
    /// Checks that `bytes` is one well-formed `ChatMessage` (every field of the right wire
    /// type, every string valid UTF-8) without building it, and reads its seq.
    pub fn new(bytes: impl Into<Bytes>) -> Result<Self, EncodedMessageError> {
        let bytes = bytes.into();
        let seq = check_chat_message(&bytes)?;
        Ok(Self { bytes, seq })
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The message itself (a full decode).
    pub fn decode(&self) -> Result<ChatMessage, DecodeError> {
        <ChatMessage as prost::Message>::decode(self.bytes.clone())
    }
}

/// Field numbers of `chatify.client.v1.ChatMessage` (frames.proto).
const CHAT_MESSAGE_STRINGS: [u32; 4] = [1, 2, 4, 6];
const CHAT_MESSAGE_SEQ: u32 = 3;
const CHAT_MESSAGE_VARINTS: [u32; 5] = [3, 5, 7, 8, 9];

/// Walks one `ChatMessage` encoding field by field, as `decode` would, without allocating;
/// returns its seq (0 when absent, as decoding would give).
fn check_chat_message(mut buf: &[u8]) -> Result<u64, EncodedMessageError> {
    let mut seq = 0;
    while buf.has_remaining() {
        let (tag, wire_type) = encoding::decode_key(&mut buf)?;
        if CHAT_MESSAGE_STRINGS.contains(&tag) {
            encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
            let len = encoding::decode_varint(&mut buf)?;
            let (text, rest) = usize::try_from(len)
                .ok()
                .and_then(|len| buf.split_at_checked(len))
                .ok_or(EncodedMessageError::Truncated { field: tag })?;
            // ASCII (ids, most text) is valid UTF-8: `is_ascii` is an inlined word-at-a-time
            // scan, cheaper than the call into `from_utf8` for these short strings.
            if !text.is_ascii() {
                std::str::from_utf8(text)
                    .map_err(|_| EncodedMessageError::NotUtf8 { field: tag })?;
            }
            buf = rest;
        } else if CHAT_MESSAGE_VARINTS.contains(&tag) {
            encoding::check_wire_type(WireType::Varint, wire_type)?;
            let value = encoding::decode_varint(&mut buf)?;
            if tag == CHAT_MESSAGE_SEQ {
                seq = value;
            }
        } else {
            encoding::skip_field(wire_type, tag, &mut buf, DecodeContext::default())?;
        }
    }
    Ok(seq)
}

impl prost::Message for QueryMessagesResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encoding::message::encode_repeated(1, &self.messages, buf);
        for message in &self.encoded_messages {
            // As `encoding::bytes::encode`, but copying the slice rather than cloning the
            // `Bytes` (a clone of a `Bytes` made from a `Vec` allocates).
            encoding::encode_key(1, WireType::LengthDelimited, buf);
            encoding::encode_varint(message.bytes.len() as u64, buf);
            buf.put_slice(&message.bytes);
        }
        if !self.next_cursor.is_empty() {
            encoding::string::encode(2, &self.next_cursor, buf);
        }
        if self.has_more {
            encoding::bool::encode(3, &self.has_more, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let (field, result) = match tag {
            1 => (
                "messages",
                encoding::message::merge_repeated(wire_type, &mut self.messages, buf, ctx),
            ),
            2 => (
                "next_cursor",
                encoding::string::merge(wire_type, &mut self.next_cursor, buf, ctx),
            ),
            3 => (
                "has_more",
                encoding::bool::merge(wire_type, &mut self.has_more, buf, ctx),
            ),
            _ => return encoding::skip_field(wire_type, tag, buf, ctx),
        };
        result.map_err(|mut error| {
            error.push("QueryMessagesResponse", field);
            error
        })
    }

    fn encoded_len(&self) -> usize {
        let encoded: usize = self
            .encoded_messages
            .iter()
            .map(|message| encoding::bytes::encoded_len(1, &message.bytes))
            .sum();
        encoding::message::encoded_len_repeated(1, &self.messages)
            + encoded
            + if self.next_cursor.is_empty() {
                0
            } else {
                encoding::string::encoded_len(2, &self.next_cursor)
            }
            + if self.has_more {
                encoding::bool::encoded_len(3, &self.has_more)
            } else {
                0
            }
    }

    fn clear(&mut self) {
        self.messages.clear();
        self.next_cursor.clear();
        self.has_more = false;
        self.encoded_messages.clear();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use prost::Message as _;

    use super::*;
    use crate::client::v1::MessageType;

    fn message(seq: u64, content: &str) -> ChatMessage {
        ChatMessage {
            message_id: format!("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a{seq:02}"),
            session_id: "s:alice:bob".into(),
            seq,
            sender_id: "alice".into(),
            message_type: MessageType::Image as i32,
            content: content.into(),
            timestamp: 1_700_000_000_000 + seq as i64,
            burn_after_seconds: Some(30),
            recalled: seq.is_multiple_of(2),
        }
    }

    #[test]
    fn encoded_messages_decode_as_the_messages_they_were() {
        let messages: Vec<ChatMessage> = (1..=3)
            .map(|seq| message(seq, &format!("héllo {seq}")))
            .collect();
        let encoded: Vec<EncodedChatMessage> = messages
            .iter()
            .map(|message| EncodedChatMessage::new(message.encode_to_vec()).unwrap())
            .collect();
        assert_eq!(
            encoded
                .iter()
                .map(EncodedChatMessage::seq)
                .collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(encoded[1].decode().unwrap(), messages[1]);
        let passed_through = QueryMessagesResponse {
            next_cursor: "3".into(),
            has_more: true,
            encoded_messages: encoded,
            ..Default::default()
        };
        let built = QueryMessagesResponse {
            messages: messages.clone(),
            next_cursor: "3".into(),
            has_more: true,
            ..Default::default()
        };
        // The same bytes on the wire as the page built from decoded messages.
        let wire = passed_through.encode_to_vec();
        assert_eq!(wire.len(), passed_through.encoded_len());
        assert_eq!(wire, built.encode_to_vec());
        let decoded = QueryMessagesResponse::decode(wire.as_slice()).unwrap();
        assert_eq!(decoded, built);
        assert!(decoded.encoded_messages.is_empty());
        // An empty page is an empty message.
        assert!(QueryMessagesResponse::default().encode_to_vec().is_empty());
    }

    #[test]
    fn bytes_that_are_not_one_chat_message_are_refused() {
        let good = message(7, "hi").encode_to_vec();
        // Cut inside the content string.
        let cut = Bytes::copy_from_slice(&good[..good.len() - 12]);
        assert!(EncodedChatMessage::new(cut).is_err());
        // Content that is not UTF-8.
        let mut bad = message(7, "hi").encode_to_vec();
        let at = bad.windows(2).position(|pair| pair == b"hi").unwrap();
        bad[at] = 0xff;
        assert!(matches!(
            EncodedChatMessage::new(bad),
            Err(EncodedMessageError::NotUtf8 { field: 6 })
        ));
        // A string where seq (a varint) belongs.
        let wrong_type = vec![0x1a, 0x01, b'x'];
        assert!(EncodedChatMessage::new(wrong_type).is_err());
        assert!(EncodedChatMessage::new(Bytes::from_static(&[0xff])).is_err());
        // No seq at all decodes as seq 0, as prost would.
        assert_eq!(EncodedChatMessage::new(Bytes::new()).unwrap().seq(), 0);
    }
}
