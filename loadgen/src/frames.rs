//! Chatify frames on a connection: encodes client frames in the connection's codec (JSON text
//! or protobuf binary WebSocket frames, or length-prefixed protobuf on TCP) straight into the
//! outgoing buffer, and decodes what the server sends. `ping`/`pong` have a fast path that
//! skips serde, since `ping --rate max` is the tool's own ceiling. Shard-local.

use bytes::{Bytes, BytesMut};
use chatify_proto::Message as _;
use chatify_proto::client::v1::{
    Auth, ClientFrame, Ping, Pong, ServerFrame, client_frame, server_frame,
};

use crate::cli::{Codec, Transport};
use crate::wire::{self, Opcode, XorShift};

/// How one connection frames what it sends.
#[derive(Debug)]
pub struct Framer {
    pub transport: Transport,
    pub codec: Codec,
    rng: XorShift,
    scratch: Vec<u8>,
}

impl Framer {
    pub fn new(transport: Transport, codec: Codec, seed: u64) -> Self {
        // TCP carries protobuf only.
        let codec = if transport == Transport::Tcp {
            Codec::Protobuf
        } else {
            codec
        };
        Self {
            transport,
            codec,
            rng: XorShift::new(seed),
            scratch: Vec::with_capacity(256),
        }
    }

    pub fn rng(&mut self) -> &mut XorShift {
        &mut self.rng
    }

    /// Appends `frame` to `out`; returns the bytes appended.
    pub fn push(&mut self, frame: client_frame::Frame, out: &mut BytesMut) -> usize {
        self.scratch.clear();
        match self.codec {
            Codec::Json => {
                self.scratch = chatify_proto::json::encode_client_frame(&frame);
            }
            Codec::Protobuf => {
                let frame = ClientFrame { frame: Some(frame) };
                // Encoding into a Vec cannot run out of room.
                let _ = frame.encode(&mut self.scratch);
            }
        }
        self.push_scratch(out)
    }

    /// Appends a `ping` carrying `timestamp` (ns since the run's origin).
    pub fn push_ping(&mut self, timestamp: i64, out: &mut BytesMut) -> usize {
        match self.codec {
            Codec::Json => {
                self.scratch.clear();
                self.scratch
                    .extend_from_slice(br#"{"type":"ping","timestamp":"#);
                self.scratch
                    .extend_from_slice(itoa_i64(timestamp, &mut [0u8; 20]));
                self.scratch.push(b'}');
                self.push_scratch(out)
            }
            Codec::Protobuf => self.push(
                client_frame::Frame::Ping(Ping {
                    timestamp: Some(timestamp),
                }),
                out,
            ),
        }
    }

    /// Appends the TCP `auth` frame.
    pub fn push_auth(&mut self, token: &str, out: &mut BytesMut) -> usize {
        self.push(
            client_frame::Frame::Auth(Auth {
                token: token.to_owned(),
            }),
            out,
        )
    }

    /// Appends a WebSocket close frame (nothing on TCP, which just shuts down).
    pub fn push_close(&mut self, code: u16, reason: &str, out: &mut BytesMut) -> usize {
        if self.transport == Transport::Tcp {
            return 0;
        }
        let before = out.len();
        let mask = self.rng.mask();
        wire::encode_client_close(code, reason, mask, out);
        out.len() - before
    }

    fn push_scratch(&mut self, out: &mut BytesMut) -> usize {
        let before = out.len();
        match self.transport {
            Transport::Tcp => wire::encode_tcp_frame(&self.scratch, out),
            Transport::WebSocket => {
                let opcode = match self.codec {
                    Codec::Json => Opcode::Text,
                    Codec::Protobuf => Opcode::Binary,
                };
                let mask = self.rng.mask();
                wire::encode_client_frame(opcode, &self.scratch, mask, out);
            }
        }
        out.len() - before
    }
}

/// Formats `value` in decimal into `buf`, returning the digits.
fn itoa_i64(value: i64, buf: &mut [u8; 20]) -> &[u8] {
    let negative = value < 0;
    let mut magnitude = value.unsigned_abs();
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (magnitude % 10) as u8;
        magnitude /= 10;
        if magnitude == 0 {
            break;
        }
    }
    if negative {
        at -= 1;
        buf[at] = b'-';
    }
    &buf[at..]
}

/// A server payload that is no Chatify frame (counted as `decode:json` / `decode:protobuf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    Json,
    Protobuf,
    /// A text frame on a protobuf connection or a binary one on a JSON connection is still
    /// decoded; this is a frame with no `frame` set.
    Empty,
}

impl DecodeError {
    pub fn label(self) -> &'static str {
        match self {
            DecodeError::Json => "decode:json",
            DecodeError::Protobuf => "decode:protobuf",
            DecodeError::Empty => "decode:empty_frame",
        }
    }
}

/// Decodes a JSON text frame from the server.
pub fn decode_json(payload: &[u8]) -> Result<server_frame::Frame, DecodeError> {
    if let Some(timestamp) = fast_pong(payload) {
        return Ok(server_frame::Frame::Pong(Pong { timestamp }));
    }
    chatify_proto::json::decode_server_frame(payload).map_err(|_| DecodeError::Json)
}

/// Decodes a protobuf frame from the server.
pub fn decode_protobuf(payload: Bytes) -> Result<server_frame::Frame, DecodeError> {
    ServerFrame::decode(payload)
        .map_err(|_| DecodeError::Protobuf)?
        .frame
        .ok_or(DecodeError::Empty)
}

/// `{"type":"pong","timestamp":N}` exactly as the gateway writes it; anything else goes
/// through serde.
fn fast_pong(payload: &[u8]) -> Option<Option<i64>> {
    if payload == br#"{"type":"pong"}"# {
        return Some(None);
    }
    let digits = payload
        .strip_prefix(br#"{"type":"pong","timestamp":"#)?
        .strip_suffix(b"}")?;
    let text = std::str::from_utf8(digits).ok()?;
    text.parse::<i64>().ok().map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::apply_mask;

    #[test]
    fn itoa_matches_to_string() {
        for value in [0i64, 7, -7, 1_234_567_890_123, i64::MAX, i64::MIN] {
            assert_eq!(
                itoa_i64(value, &mut [0; 20]),
                value.to_string().as_bytes(),
                "{value}"
            );
        }
    }

    #[test]
    fn json_ping_is_what_the_gateway_parses() {
        let mut framer = Framer::new(Transport::WebSocket, Codec::Json, 1);
        let mut out = BytesMut::new();
        framer.push_ping(42, &mut out);
        // Unmask and parse as the gateway would.
        let mask = [out[2], out[3], out[4], out[5]];
        let mut payload = out[6..].to_vec();
        apply_mask(&mut payload, mask);
        let frame = chatify_proto::json::decode_client_frame(&payload).expect("valid json frame");
        assert_eq!(
            frame,
            client_frame::Frame::Ping(Ping {
                timestamp: Some(42)
            })
        );
    }

    #[test]
    fn pongs_decode_fast_or_through_serde() {
        for (json, timestamp) in [
            (&br#"{"type":"pong","timestamp":123}"#[..], Some(123)),
            (br#"{"type":"pong"}"#, None),
            (br#"{ "timestamp": 9, "type": "pong" }"#, Some(9)),
        ] {
            assert_eq!(
                decode_json(json),
                Ok(server_frame::Frame::Pong(Pong { timestamp }))
            );
        }
        assert_eq!(decode_json(b"nonsense"), Err(DecodeError::Json));
        assert_eq!(
            decode_protobuf(Bytes::from_static(b"\xff\xff\xff")),
            Err(DecodeError::Protobuf)
        );
    }

    #[test]
    fn protobuf_frames_over_tcp_are_length_prefixed() {
        let mut framer = Framer::new(Transport::Tcp, Codec::Json, 1);
        let mut out = BytesMut::new();
        framer.push_auth("tok", &mut out);
        let payload = crate::wire::decode_tcp_frame(&mut out)
            .expect("valid")
            .expect("complete");
        let frame = ClientFrame::decode(payload).expect("protobuf");
        assert_eq!(
            frame.frame,
            Some(client_frame::Frame::Auth(Auth {
                token: "tok".into()
            }))
        );
        // A server pong in protobuf decodes back.
        let pong = ServerFrame {
            frame: Some(server_frame::Frame::Pong(Pong { timestamp: Some(5) })),
        };
        assert_eq!(
            decode_protobuf(Bytes::from(pong.encode_to_vec())),
            Ok(server_frame::Frame::Pong(Pong { timestamp: Some(5) }))
        );
        // Close frames exist only on WebSocket.
        assert_eq!(framer.push_close(1000, "bye", &mut out), 0);
        let mut ws = Framer::new(Transport::WebSocket, Codec::Protobuf, 2);
        let mut close = BytesMut::new();
        ws.push_close(1000, "bye", &mut close);
        assert_eq!(close[0], 0x88);
    }
}
