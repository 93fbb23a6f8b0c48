//! The client side of the two transports, pure code on owned buffers: the WebSocket upgrade
//! request and the check of its answer, masked client frames, the decoder of the server's
//! (unmasked) frames, and TCP's 4-byte length prefix. One decoder per connection
//! (shard-local); nothing here does I/O.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use sha1::{Digest as _, Sha1};

/// Appended to the key before hashing (RFC 6455 §1.3).
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Longest upgrade answer (status line and headers) buffered before it counts as garbage.
pub const HANDSHAKE_RESPONSE_BYTES_MAX: usize = 16 * 1024;

/// Largest server frame or TCP frame accepted; larger counts as a protocol error.
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Size of the big-endian length before every TCP frame.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// WebSocket opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }
}

/// What the server's byte stream may carry that is not a valid answer; counted by
/// [`WireError::label`], then the connection is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("upgrade answer is not http")]
    HandshakeGarbage,
    #[error("upgrade answer too large")]
    HandshakeTooLarge,
    #[error("upgrade refused with http {0}")]
    HandshakeStatus(u16),
    #[error("upgrade answer without a valid sec-websocket-accept")]
    HandshakeAccept,
    #[error("server frame with reserved bits or opcode")]
    Reserved,
    #[error("server frame is masked")]
    MaskedServerFrame,
    #[error("server frame too big")]
    FrameTooBig,
    #[error("bad fragmentation")]
    Fragmentation,
    #[error("bad close payload")]
    ClosePayload,
    #[error("empty tcp frame")]
    EmptyTcpFrame,
}

impl WireError {
    /// Key under which the error is counted in the result (`errors`).
    pub fn label(&self) -> String {
        match self {
            WireError::HandshakeGarbage => "handshake:garbage".into(),
            WireError::HandshakeTooLarge => "handshake:too_large".into(),
            WireError::HandshakeStatus(status) => format!("http:{status}"),
            WireError::HandshakeAccept => "handshake:bad_accept".into(),
            WireError::Reserved => "ws:reserved_bits_or_opcode".into(),
            WireError::MaskedServerFrame => "ws:masked_server_frame".into(),
            WireError::FrameTooBig => "ws:frame_too_big".into(),
            WireError::Fragmentation => "ws:bad_fragmentation".into(),
            WireError::ClosePayload => "ws:bad_close_payload".into(),
            WireError::EmptyTcpFrame => "tcp:empty_frame".into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// A fresh `Sec-WebSocket-Key` (base64 of 16 bytes) from the connection's generator.
pub fn new_key(rng: &mut XorShift) -> String {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&rng.next_u64().to_ne_bytes());
    key[8..].copy_from_slice(&rng.next_u64().to_ne_bytes());
    BASE64.encode(key)
}

/// The `Sec-WebSocket-Accept` a server must answer for `key`.
pub fn accept_key(key: &str) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(WEBSOCKET_GUID);
    BASE64.encode(sha1.finalize())
}

/// Appends the upgrade request; the token goes in `Authorization: Bearer`.
pub fn encode_upgrade_request(host: &str, path: &str, key: &str, token: &str, out: &mut BytesMut) {
    for part in [
        "GET ",
        path,
        " HTTP/1.1\r\nHost: ",
        host,
        "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: ",
        key,
        "\r\nAuthorization: Bearer ",
        token,
        "\r\n\r\n",
    ] {
        out.put_slice(part.as_bytes());
    }
}

/// Checks the upgrade answer at the front of `buf`. `Ok(None)`: incomplete, read more.
/// `Ok(Some(consumed))`: a valid 101; frames may follow in `buf[consumed..]`.
pub fn parse_upgrade_response(buf: &[u8], key: &str) -> Result<Option<usize>, WireError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let consumed = match response.parse(buf) {
        Ok(httparse::Status::Complete(consumed)) => consumed,
        Ok(httparse::Status::Partial) if buf.len() >= HANDSHAKE_RESPONSE_BYTES_MAX => {
            return Err(WireError::HandshakeTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(WireError::HandshakeTooLarge),
        Err(_) => return Err(WireError::HandshakeGarbage),
    };
    let status = response.code.unwrap_or(0);
    if status != 101 {
        return Err(WireError::HandshakeStatus(status));
    }
    let expected = accept_key(key);
    let accepted = response.headers.iter().any(|header| {
        header.name.eq_ignore_ascii_case("sec-websocket-accept")
            && header.value.trim_ascii() == expected.as_bytes()
    });
    if !accepted {
        return Err(WireError::HandshakeAccept);
    }
    Ok(Some(consumed))
}

// ---------------------------------------------------------------------------------------------
// Client frames (masked)
// ---------------------------------------------------------------------------------------------

/// Appends one final, masked client frame (RFC 6455 §5.3: every client frame is masked).
pub fn encode_client_frame(opcode: Opcode, payload: &[u8], mask: [u8; 4], out: &mut BytesMut) {
    let length = payload.len();
    out.reserve(14 + length);
    out.put_u8(0x80 | opcode as u8);
    if length < 126 {
        out.put_u8(0x80 | length as u8);
    } else if let Ok(medium) = u16::try_from(length) {
        out.put_u8(0x80 | 126);
        out.put_u16(medium);
    } else {
        out.put_u8(0x80 | 127);
        out.put_u64(length as u64);
    }
    out.put_slice(&mask);
    let start = out.len();
    out.put_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// Appends a masked close frame with a code and a short reason.
pub fn encode_client_close(code: u16, reason: &str, mask: [u8; 4], out: &mut BytesMut) {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    encode_client_frame(Opcode::Close, &payload, mask, out);
}

/// XORs `payload` with the mask, 8 bytes at a time.
pub fn apply_mask(payload: &mut [u8], mask: [u8; 4]) {
    let [m0, m1, m2, m3] = mask;
    let mask_word = u64::from_ne_bytes([m0, m1, m2, m3, m0, m1, m2, m3]);
    let (words, tail) = payload.as_chunks_mut::<8>();
    for word in words {
        *word = (u64::from_ne_bytes(*word) ^ mask_word).to_ne_bytes();
    }
    for (byte, mask_byte) in tail.iter_mut().zip(mask.iter().cycle()) {
        *byte ^= mask_byte;
    }
}

// ---------------------------------------------------------------------------------------------
// Server frames (unmasked)
// ---------------------------------------------------------------------------------------------

/// One complete message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// The close code (`None`: a close frame without one).
    Close(Option<u16>),
}

/// Splits the server's byte stream into messages, reassembling fragments.
#[derive(Debug, Default)]
pub struct ServerFrameDecoder {
    fragmented: Option<Opcode>,
    fragments: BytesMut,
}

impl ServerFrameDecoder {
    /// The next message at the front of `buf`, `Ok(None)` when more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<ServerMessage>, WireError> {
        loop {
            let [first, second, rest @ ..] = &buf[..] else {
                return Ok(None);
            };
            let (first, second) = (*first, *second);
            if first & 0x70 != 0 {
                return Err(WireError::Reserved);
            }
            let opcode = Opcode::from_bits(first & 0x0F).ok_or(WireError::Reserved)?;
            if second & 0x80 != 0 {
                return Err(WireError::MaskedServerFrame);
            }
            let fin = first & 0x80 != 0;
            let (payload_bytes, header_bytes) = match second & 0x7F {
                126 => match rest.first_chunk::<2>() {
                    Some(length) => (u64::from(u16::from_be_bytes(*length)), 4),
                    None => return Ok(None),
                },
                127 => match rest.first_chunk::<8>() {
                    Some(length) => (u64::from_be_bytes(*length), 10),
                    None => return Ok(None),
                },
                short => (u64::from(short), 2),
            };
            let payload_bytes = usize::try_from(payload_bytes).unwrap_or(usize::MAX);
            if payload_bytes > FRAME_BYTES_MAX {
                return Err(WireError::FrameTooBig);
            }
            if buf.len() < header_bytes + payload_bytes {
                buf.reserve(header_bytes + payload_bytes - buf.len());
                return Ok(None);
            }
            buf.advance(header_bytes);
            let payload = buf.split_to(payload_bytes);
            let message = match opcode {
                Opcode::Text | Opcode::Binary if fin && self.fragmented.is_none() => {
                    if opcode == Opcode::Text {
                        ServerMessage::Text(payload.freeze())
                    } else {
                        ServerMessage::Binary(payload.freeze())
                    }
                }
                Opcode::Text | Opcode::Binary if self.fragmented.is_none() => {
                    self.fragmented = Some(opcode);
                    self.fragments.extend_from_slice(&payload);
                    continue;
                }
                Opcode::Continuation if self.fragmented.is_some() => {
                    self.fragments.extend_from_slice(&payload);
                    if self.fragments.len() > FRAME_BYTES_MAX {
                        return Err(WireError::FrameTooBig);
                    }
                    if !fin {
                        continue;
                    }
                    let whole = self.fragments.split().freeze();
                    match self.fragmented.take() {
                        Some(Opcode::Text) => ServerMessage::Text(whole),
                        _ => ServerMessage::Binary(whole),
                    }
                }
                Opcode::Text | Opcode::Binary | Opcode::Continuation => {
                    return Err(WireError::Fragmentation);
                }
                Opcode::Close => match payload.first_chunk::<2>() {
                    Some(code) => ServerMessage::Close(Some(u16::from_be_bytes(*code))),
                    None if payload.is_empty() => ServerMessage::Close(None),
                    None => return Err(WireError::ClosePayload),
                },
                Opcode::Ping => ServerMessage::Ping(payload.freeze()),
                Opcode::Pong => ServerMessage::Pong(payload.freeze()),
            };
            return Ok(Some(message));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TCP
// ---------------------------------------------------------------------------------------------

/// Appends one length-prefixed TCP frame.
pub fn encode_tcp_frame(payload: &[u8], out: &mut BytesMut) {
    out.reserve(LENGTH_PREFIX_BYTES + payload.len());
    // Frames are far below 4 GiB (the gateway refuses over 64 KiB).
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
}

/// The next TCP frame's payload at the front of `buf`, `Ok(None)` when more bytes are needed.
pub fn decode_tcp_frame(buf: &mut BytesMut) -> Result<Option<Bytes>, WireError> {
    let Some(prefix) = buf.first_chunk::<LENGTH_PREFIX_BYTES>() else {
        return Ok(None);
    };
    let length = usize::try_from(u32::from_be_bytes(*prefix)).unwrap_or(usize::MAX);
    if length == 0 {
        return Err(WireError::EmptyTcpFrame);
    }
    if length > FRAME_BYTES_MAX {
        return Err(WireError::FrameTooBig);
    }
    if buf.len() < LENGTH_PREFIX_BYTES + length {
        buf.reserve(LENGTH_PREFIX_BYTES + length - buf.len());
        return Ok(None);
    }
    buf.advance(LENGTH_PREFIX_BYTES);
    Ok(Some(buf.split_to(length).freeze()))
}

/// A small, fast generator for masks and keys (xorshift64*); not for secrets.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // A zero state would stay zero.
        Self(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn mask(&mut self) -> [u8; 4] {
        let [a, b, c, d, ..] = self.next_u64().to_ne_bytes();
        [a, b, c, d]
    }

    /// Uniform enough in `0..bound` for picking peers (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        if payload.len() < 126 {
            out.push(payload.len() as u8);
        } else {
            out.push(126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn accept_key_matches_rfc_6455() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn client_frames_are_masked_and_unmask_to_the_payload() {
        for length in [0usize, 5, 125, 126, 1000, 70_000] {
            let payload: Vec<u8> = (0..length).map(|i| (i % 251) as u8).collect();
            let mask = [1, 2, 3, 4];
            let mut out = BytesMut::new();
            encode_client_frame(Opcode::Text, &payload, mask, &mut out);
            assert_eq!(out[0], 0x81);
            assert!(out[1] & 0x80 != 0, "mask bit");
            let header = match length {
                0..=125 => 2,
                126..=65535 => 4,
                _ => 10,
            };
            assert_eq!(&out[header..header + 4], &mask);
            let mut body = out[header + 4..].to_vec();
            apply_mask(&mut body, mask);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn decodes_server_frames_split_anywhere() {
        let mut stream = server_frame(true, 1, br#"{"type":"pong"}"#);
        stream.extend(server_frame(false, 2, b"ab"));
        stream.extend(server_frame(true, 9, b"p"));
        stream.extend(server_frame(true, 0, &[b'c'; 300]));
        stream.extend(server_frame(true, 8, &1008u16.to_be_bytes()));
        for split in 0..stream.len() {
            let mut decoder = ServerFrameDecoder::default();
            let mut buf = BytesMut::from(&stream[..split]);
            let mut messages = Vec::new();
            while let Some(message) = decoder.decode(&mut buf).expect("valid") {
                messages.push(message);
            }
            buf.extend_from_slice(&stream[split..]);
            while let Some(message) = decoder.decode(&mut buf).expect("valid") {
                messages.push(message);
            }
            let mut binary = b"ab".to_vec();
            binary.extend([b'c'; 300]);
            assert_eq!(
                messages,
                vec![
                    ServerMessage::Text(Bytes::from_static(br#"{"type":"pong"}"#)),
                    ServerMessage::Ping(Bytes::from_static(b"p")),
                    ServerMessage::Binary(Bytes::from(binary)),
                    ServerMessage::Close(Some(1008)),
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn garbage_from_the_server_is_an_error_not_a_wait() {
        let mut decoder = ServerFrameDecoder::default();
        assert_eq!(
            decoder.decode(&mut BytesMut::from(&b"HTTP/1.1 200 OK"[..])),
            Err(WireError::Reserved)
        );
        let mut masked = server_frame(true, 1, b"x");
        masked[1] |= 0x80;
        assert_eq!(
            ServerFrameDecoder::default().decode(&mut BytesMut::from(&masked[..])),
            Err(WireError::MaskedServerFrame)
        );
        assert_eq!(
            ServerFrameDecoder::default().decode(&mut BytesMut::from(&[0x80u8, 0][..])),
            Err(WireError::Fragmentation)
        );
    }

    #[test]
    fn upgrade_answers_are_checked() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok =
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00";
        assert_eq!(parse_upgrade_response(ok, key), Ok(Some(ok.len() - 2)));
        assert_eq!(parse_upgrade_response(&ok[..20], key), Ok(None));
        assert_eq!(
            parse_upgrade_response(
                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 3\r\n\r\nbad",
                key
            ),
            Err(WireError::HandshakeStatus(401))
        );
        assert_eq!(
            parse_upgrade_response(b"\x00\x01garbage\r\n\r\n", key),
            Err(WireError::HandshakeGarbage)
        );
        assert_eq!(
            parse_upgrade_response(
                b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: nope\r\n\r\n",
                key
            ),
            Err(WireError::HandshakeAccept)
        );
    }

    #[test]
    fn tcp_frames_round_trip_and_refuse_empty() {
        let mut buf = BytesMut::new();
        encode_tcp_frame(b"hello", &mut buf);
        encode_tcp_frame(b"x", &mut buf);
        let mut partial = buf.split_to(3);
        assert_eq!(decode_tcp_frame(&mut partial), Ok(None));
        partial.unsplit(buf);
        assert_eq!(
            decode_tcp_frame(&mut partial),
            Ok(Some(Bytes::from_static(b"hello")))
        );
        assert_eq!(
            decode_tcp_frame(&mut partial),
            Ok(Some(Bytes::from_static(b"x")))
        );
        assert_eq!(
            decode_tcp_frame(&mut BytesMut::from(&[0u8, 0, 0, 0][..])),
            Err(WireError::EmptyTcpFrame)
        );
    }
}
