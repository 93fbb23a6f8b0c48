//! RFC 6455 WebSocket on owned buffers: the upgrade handshake (parse the request, build the 101
//! or a short HTTP error), the frame decoder that unmasks client frames in place and splits
//! their payloads off the read buffer without copying, and the server frame encoder. Pure code,
//! no I/O; one `FrameDecoder` per connection (shard-local).

use std::fmt::{self, Write as _};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use sha1::{Digest as _, Sha1};

/// Appended to the client's key before hashing (RFC 6455 §1.3).
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Longest upgrade request (request line and headers) we buffer before answering 431.
pub const HANDSHAKE_BYTES_MAX: usize = 8192;

/// Most header lines in an upgrade request; more is answered with 431.
pub const HANDSHAKE_HEADERS_MAX: usize = 32;

/// Control frames carry at most this much payload (RFC 6455 §5.5).
pub const CONTROL_PAYLOAD_BYTES_MAX: usize = 125;

/// Longest close reason that fits a control frame after the 2-byte code.
pub const CLOSE_REASON_BYTES_MAX: usize = CONTROL_PAYLOAD_BYTES_MAX - 2;

/// Longest server frame header: 2 bytes, a 64-bit length, no mask.
pub const SERVER_HEADER_BYTES_MAX: usize = 10;

/// Longest client frame header: 2 bytes, a 64-bit length, the 4-byte mask.
pub const CLIENT_HEADER_BYTES_MAX: usize = 14;

/// The close codes Chatify sends (docs/PROTOCOL.md).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub fn accept_key(sec_websocket_key: &str) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(sec_websocket_key.as_bytes());
    sha1.update(WEBSOCKET_GUID);
    BASE64.encode(sha1.finalize())
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// What the gateway needs from a valid upgrade request. Built once per connection, so it owns
/// its strings. Its `Debug` hides the tokens, so logging a request leaks no credential.
#[derive(Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// The path without the query (`/ws`); the caller decides which paths it serves.
    pub path: String,
    /// `?token=`, percent-decoded (browsers cannot set headers on a WebSocket).
    pub query_token: Option<String>,
    /// `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// Already checked to be base64 of 16 bytes.
    pub sec_websocket_key: String,
}

impl fmt::Debug for UpgradeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |token: &Option<String>| token.as_ref().map(|_| "<redacted>");
        f.debug_struct("UpgradeRequest")
            .field("path", &self.path)
            .field("query_token", &redacted(&self.query_token))
            .field("bearer_token", &redacted(&self.bearer_token))
            .field("sec_websocket_key", &self.sec_websocket_key)
            .finish()
    }
}

impl UpgradeRequest {
    /// The token to verify: the header wins over the query when both are present.
    pub fn token(&self) -> Option<&str> {
        self.bearer_token.as_deref().or(self.query_token.as_deref())
    }
}

/// The HTTP errors the handshake answers with before closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpErrorStatus {
    BadRequest,
    Unauthorized,
    NotFound,
    RequestTimeout,
    UpgradeRequired,
    RequestHeaderFieldsTooLarge,
    ServiceUnavailable,
}

impl HttpErrorStatus {
    pub fn code(self) -> u16 {
        match self {
            HttpErrorStatus::BadRequest => 400,
            HttpErrorStatus::Unauthorized => 401,
            HttpErrorStatus::NotFound => 404,
            HttpErrorStatus::RequestTimeout => 408,
            HttpErrorStatus::UpgradeRequired => 426,
            HttpErrorStatus::RequestHeaderFieldsTooLarge => 431,
            HttpErrorStatus::ServiceUnavailable => 503,
        }
    }

    pub fn reason_phrase(self) -> &'static str {
        match self {
            HttpErrorStatus::BadRequest => "Bad Request",
            HttpErrorStatus::Unauthorized => "Unauthorized",
            HttpErrorStatus::NotFound => "Not Found",
            HttpErrorStatus::RequestTimeout => "Request Timeout",
            HttpErrorStatus::UpgradeRequired => "Upgrade Required",
            HttpErrorStatus::RequestHeaderFieldsTooLarge => "Request Header Fields Too Large",
            HttpErrorStatus::ServiceUnavailable => "Service Unavailable",
        }
    }
}

/// Why an upgrade request is refused; each maps to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("{}", self.reason())]
    Malformed,
    #[error("{}", self.reason())]
    HttpVersion,
    #[error("{}", self.reason())]
    NotGet,
    #[error("{}", self.reason())]
    NotWebSocketUpgrade,
    #[error("{}", self.reason())]
    NoConnectionUpgrade,
    /// Answered with 426 and `Sec-WebSocket-Version: 13` so the client can retry (§4.4).
    #[error("{}", self.reason())]
    UnsupportedVersion,
    #[error("{}", self.reason())]
    InvalidKey,
    #[error("{}", self.reason())]
    TooLarge,
}

impl HandshakeError {
    pub fn status(&self) -> HttpErrorStatus {
        match self {
            HandshakeError::UnsupportedVersion => HttpErrorStatus::UpgradeRequired,
            HandshakeError::TooLarge => HttpErrorStatus::RequestHeaderFieldsTooLarge,
            HandshakeError::Malformed
            | HandshakeError::HttpVersion
            | HandshakeError::NotGet
            | HandshakeError::NotWebSocketUpgrade
            | HandshakeError::NoConnectionUpgrade
            | HandshakeError::InvalidKey => HttpErrorStatus::BadRequest,
        }
    }

    /// Short static text for logs and the response body.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Malformed => "malformed http request",
            HandshakeError::HttpVersion => "http/1.1 or later required",
            HandshakeError::NotGet => "method must be get",
            HandshakeError::NotWebSocketUpgrade => "upgrade header must be websocket",
            HandshakeError::NoConnectionUpgrade => "connection header must contain upgrade",
            HandshakeError::UnsupportedVersion => "sec-websocket-version must be 13",
            HandshakeError::InvalidKey => "sec-websocket-key must be base64 of 16 bytes",
            HandshakeError::TooLarge => "request header too large",
        }
    }

    /// Appends the HTTP response that refuses the upgrade.
    pub fn encode_response(&self, out: &mut BytesMut) {
        encode_error_response(self.status(), self.reason(), out);
    }
}

/// Parses an upgrade request from the start of `buf`.
///
/// `Ok(None)`: the request is incomplete, read more and call again with the whole buffer.
/// `Ok(Some((request, consumed)))`: the request took `consumed` bytes; whatever follows is
/// not part of it.
pub fn parse_upgrade(buf: &[u8]) -> Result<Option<(UpgradeRequest, usize)>, HandshakeError> {
    // Parse no more than the limit, so a client cannot make us scan an ever larger buffer.
    let window = &buf[..buf.len().min(HANDSHAKE_BYTES_MAX)];
    let mut headers = [httparse::EMPTY_HEADER; HANDSHAKE_HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    let consumed = match request.parse(window) {
        Ok(httparse::Status::Complete(consumed)) => consumed,
        Ok(httparse::Status::Partial) if buf.len() >= HANDSHAKE_BYTES_MAX => {
            return Err(HandshakeError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooLarge),
        Err(_) => return Err(HandshakeError::Malformed),
    };
    // RFC 6455 §4.1: HTTP/1.1 or higher; httparse reads only 1.0 and 1.1.
    if request.version != Some(1) {
        return Err(HandshakeError::HttpVersion);
    }
    if request.method != Some("GET") {
        return Err(HandshakeError::NotGet);
    }
    let target = request.path.ok_or(HandshakeError::Malformed)?;

    let mut upgrade_websocket = false;
    let mut connection_upgrade = false;
    let mut version_seen = false;
    let mut version_13 = true;
    let mut key: Option<&[u8]> = None;
    let mut bearer_token = None;
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade_websocket |= has_token(header.value, b"websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= has_token(header.value, b"upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version_seen = true;
            version_13 &= header.value.trim_ascii() == b"13";
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if key.is_some() {
                return Err(HandshakeError::InvalidKey);
            }
            key = Some(header.value.trim_ascii());
        } else if name.eq_ignore_ascii_case("authorization") && bearer_token.is_none() {
            bearer_token = parse_bearer(header.value);
        }
    }
    if !upgrade_websocket {
        return Err(HandshakeError::NotWebSocketUpgrade);
    }
    if !connection_upgrade {
        return Err(HandshakeError::NoConnectionUpgrade);
    }
    if !(version_seen && version_13) {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let sec_websocket_key = key
        .filter(|key| is_valid_key(key))
        .and_then(|key| std::str::from_utf8(key).ok())
        .ok_or(HandshakeError::InvalidKey)?;

    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let query_token = match query.and_then(token_in_query) {
        Some(raw) => Some(
            percent_encoding::percent_decode_str(raw)
                .decode_utf8()
                .map_err(|_| HandshakeError::Malformed)?
                .into_owned(),
        ),
        None => None,
    };
    Ok(Some((
        UpgradeRequest {
            path: path.to_owned(),
            query_token,
            bearer_token,
            sec_websocket_key: sec_websocket_key.to_owned(),
        },
        consumed,
    )))
}

/// Whether a comma-separated header value lists `token` (case-insensitive, RFC 7230 §7).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&byte| byte == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// A valid key is base64 of exactly 16 bytes, that is 24 characters (RFC 6455 §4.1).
fn is_valid_key(key: &[u8]) -> bool {
    let mut decoded = [0u8; 18];
    key.len() == 24 && BASE64.decode_slice(key, &mut decoded) == Ok(16)
}

fn parse_bearer(value: &[u8]) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

/// The raw (still percent-encoded) value of the first `token=` in a query string.
fn token_in_query(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
}

/// Appends the `101 Switching Protocols` that completes the handshake.
pub fn encode_switching_protocols(sec_websocket_key: &str, out: &mut BytesMut) {
    put_fmt(
        out,
        format_args!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            accept_key(sec_websocket_key)
        ),
    );
}

/// Appends a short HTTP error response; the caller closes the connection after writing it.
pub fn encode_error_response(status: HttpErrorStatus, body: &str, out: &mut BytesMut) {
    let version_header = if status == HttpErrorStatus::UpgradeRequired {
        "Sec-WebSocket-Version: 13\r\n"
    } else {
        ""
    };
    put_fmt(
        out,
        format_args!(
            "HTTP/1.1 {} {}\r\n{version_header}Content-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            status.code(),
            status.reason_phrase(),
            body.len(),
        ),
    );
}

/// The path of a complete plain (non-upgrade) `GET` request in `buf`, query removed, so
/// the listener can serve the try-it page at `/`.
pub fn plain_get_path(buf: &[u8]) -> Option<String> {
    let window = &buf[..buf.len().min(HANDSHAKE_BYTES_MAX)];
    let mut headers = [httparse::EMPTY_HEADER; HANDSHAKE_HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(window) {
        Ok(httparse::Status::Complete(_)) if request.method == Some("GET") => {}
        _ => return None,
    }
    let upgrade = request
        .headers
        .iter()
        .any(|header| header.name.eq_ignore_ascii_case("upgrade"));
    if upgrade {
        return None;
    }
    let target = request.path?;
    Some(target.split('?').next().unwrap_or(target).to_owned())
}

/// `200 OK` with an HTML body, then close.
pub fn encode_html_response(body: &str, out: &mut BytesMut) {
    put_fmt(
        out,
        format_args!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
             Content-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
            body.len(),
        ),
    );
}

fn put_fmt(out: &mut BytesMut, args: fmt::Arguments<'_>) {
    // BytesMut grows as needed, so formatting into it cannot fail.
    let _ = out.write_fmt(args);
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

/// The opcodes RFC 6455 defines; the others are reserved and refused.
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
        match bits {
            0x0 => Some(Opcode::Continuation),
            0x1 => Some(Opcode::Text),
            0x2 => Some(Opcode::Binary),
            0x8 => Some(Opcode::Close),
            0x9 => Some(Opcode::Ping),
            0xA => Some(Opcode::Pong),
            _ => None,
        }
    }

    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// One complete message from the client. Payloads are slices of the connection's read buffer
/// (or of the reassembly buffer for fragmented messages); `Text` is valid UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// `None` when the close frame had no payload (status 1005 on the wire is never sent).
    Close(Option<(u16, String)>),
}

/// Why a client's byte stream is not valid WebSocket; the connection is closed with
/// [`WsError::close_code`] and [`WsError::reason`]. Plain data, never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("{}", self.reason())]
    ReservedBits,
    #[error("{}", self.reason())]
    ReservedOpcode,
    #[error("{}", self.reason())]
    UnmaskedFrame,
    #[error("{}", self.reason())]
    FragmentedControlFrame,
    #[error("{}", self.reason())]
    ControlFrameTooLong,
    /// A 16- or 64-bit length where a shorter form fits (RFC 6455 §5.2 "minimal number").
    #[error("{}", self.reason())]
    NonMinimalLength,
    #[error("{}", self.reason())]
    LengthMsbSet,
    #[error("{}", self.reason())]
    ContinuationWithoutMessage,
    #[error("{}", self.reason())]
    MessageInterrupted,
    #[error("{}", self.reason())]
    ClosePayloadTooShort,
    #[error("{}", self.reason())]
    InvalidCloseCode,
    #[error("{}", self.reason())]
    InvalidUtf8,
    #[error("{}", self.reason())]
    FrameTooBig,
    #[error("{}", self.reason())]
    MessageTooBig,
}

impl WsError {
    /// The close code to send (docs/PROTOCOL.md): framing 1002, bad UTF-8 1007, size 1009.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::InvalidUtf8 => close_code::INVALID_PAYLOAD,
            WsError::FrameTooBig | WsError::MessageTooBig => close_code::TOO_BIG,
            WsError::ReservedBits
            | WsError::ReservedOpcode
            | WsError::UnmaskedFrame
            | WsError::FragmentedControlFrame
            | WsError::ControlFrameTooLong
            | WsError::NonMinimalLength
            | WsError::LengthMsbSet
            | WsError::ContinuationWithoutMessage
            | WsError::MessageInterrupted
            | WsError::ClosePayloadTooShort
            | WsError::InvalidCloseCode => close_code::PROTOCOL_ERROR,
        }
    }

    /// Short static reason for the close frame (well under [`CLOSE_REASON_BYTES_MAX`]).
    pub fn reason(&self) -> &'static str {
        match self {
            WsError::ReservedBits => "reserved bits set",
            WsError::ReservedOpcode => "reserved opcode",
            WsError::UnmaskedFrame => "client frame not masked",
            WsError::FragmentedControlFrame => "fragmented control frame",
            WsError::ControlFrameTooLong => "control frame over 125 bytes",
            WsError::NonMinimalLength => "length not minimally encoded",
            WsError::LengthMsbSet => "64-bit length with the high bit set",
            WsError::ContinuationWithoutMessage => "continuation without a message",
            WsError::MessageInterrupted => "new message before the last one ended",
            WsError::ClosePayloadTooShort => "close payload of 1 byte",
            WsError::InvalidCloseCode => "invalid close code",
            WsError::InvalidUtf8 => "invalid utf-8",
            WsError::FrameTooBig => "frame too big",
            WsError::MessageTooBig => "message too big",
        }
    }
}

/// A parsed client frame header, up to its length; the mask is the last 4 header bytes.
#[derive(Debug, Clone, Copy)]
struct FrameHeader {
    fin: bool,
    opcode: Opcode,
    /// The whole header, mask included.
    header_bytes: usize,
    payload_bytes: usize,
}

/// Parses the header at the front of `buf` up to the payload length; `Ok(None)` if that is
/// not all there yet. Every check that the bytes at hand allow is made before waiting for
/// more, so a bad frame fails on its first two bytes, and the mask is not needed to judge
/// the length.
fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, WsError> {
    let [first, second, rest @ ..] = buf else {
        return Ok(None);
    };
    let fin = first & 0x80 != 0;
    // No extension is ever negotiated, so RSV1-3 must be clear (RFC 6455 §5.2).
    if first & 0x70 != 0 {
        return Err(WsError::ReservedBits);
    }
    let opcode = Opcode::from_bits(first & 0x0F).ok_or(WsError::ReservedOpcode)?;
    // Clients must mask every frame (RFC 6455 §5.1).
    if second & 0x80 == 0 {
        return Err(WsError::UnmaskedFrame);
    }
    let length_bits = second & 0x7F;
    if opcode.is_control() {
        if !fin {
            return Err(WsError::FragmentedControlFrame);
        }
        if usize::from(length_bits) > CONTROL_PAYLOAD_BYTES_MAX {
            return Err(WsError::ControlFrameTooLong);
        }
    }
    let (payload_bytes, rest) = match length_bits {
        126 => {
            let Some((length, rest)) = rest.split_first_chunk::<2>() else {
                return Ok(None);
            };
            let length = u16::from_be_bytes(*length);
            if length < 126 {
                return Err(WsError::NonMinimalLength);
            }
            (u64::from(length), rest)
        }
        127 => {
            let Some((length, rest)) = rest.split_first_chunk::<8>() else {
                return Ok(None);
            };
            let length = u64::from_be_bytes(*length);
            if length >> 63 != 0 {
                return Err(WsError::LengthMsbSet);
            }
            if length <= u64::from(u16::MAX) {
                return Err(WsError::NonMinimalLength);
            }
            (length, rest)
        }
        short => (u64::from(short), rest),
    };
    Ok(Some(FrameHeader {
        fin,
        opcode,
        header_bytes: buf.len() - rest.len() + 4,
        // Saturating: a length that does not fit usize is over any limit anyway.
        payload_bytes: usize::try_from(payload_bytes).unwrap_or(usize::MAX),
    }))
}

/// Kind of the fragmented data message being reassembled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragmented {
    Text,
    Binary,
}

/// A fragmented data message being reassembled: boxed in the decoder, so the decoder every
/// idle WebSocket's task holds is 16 B and pays for this only while a message is in pieces.
#[derive(Debug)]
struct Fragments {
    kind: Fragmented,
    /// Payload of the message so far.
    payload: BytesMut,
    /// Leading bytes of `payload` known to be complete, valid UTF-8 (text only), so each
    /// byte is validated once and an invalid prefix fails before the message ends. `u32`:
    /// `payload` never grows past `message_bytes_max`, itself a `u32`.
    utf8_valid_bytes: u32,
}

/// Turns the client's byte stream into messages: checks every RFC 6455 rule a server must,
/// unmasks in place, and hands out payloads split off the read buffer.
///
/// After an error the decoder's state is unspecified; the connection is to be closed.
#[derive(Debug)]
pub struct FrameDecoder {
    /// The limits are `u32` because every idle WebSocket's task holds a decoder (a limit
    /// above 4 GiB acts as 4 GiB).
    frame_bytes_max: u32,
    message_bytes_max: u32,
    /// The data message whose first fragment has arrived but not its last.
    fragmented: Option<Box<Fragments>>,
}

impl FrameDecoder {
    /// `frame_bytes_max` bounds one frame's payload, `message_bytes_max` a whole (possibly
    /// fragmented) message; either is refused with 1009 from the header, before buffering.
    pub fn new(frame_bytes_max: usize, message_bytes_max: usize) -> Self {
        Self {
            frame_bytes_max: u32::try_from(frame_bytes_max).unwrap_or(u32::MAX),
            message_bytes_max: u32::try_from(message_bytes_max).unwrap_or(u32::MAX),
            fragmented: None,
        }
    }

    /// Decodes the next message from the front of `buf`.
    ///
    /// `Ok(None)`: more bytes are needed; whole frames already consumed stay consumed (their
    /// fragments are kept in the decoder) and room for the rest of a frame whose length is
    /// known is reserved in `buf`, so the next read can fill it. Several messages in one
    /// buffer come out one per call.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, WsError> {
        loop {
            let Some(header) = parse_header(buf)? else {
                return Ok(None);
            };
            self.check_limits_and_order(&header)?;
            let frame_bytes = header.header_bytes.saturating_add(header.payload_bytes);
            if buf.len() < frame_bytes {
                buf.reserve(frame_bytes - buf.len());
                return Ok(None);
            }
            let mut mask = [0u8; 4];
            mask.copy_from_slice(&buf[header.header_bytes - 4..header.header_bytes]);
            buf.advance(header.header_bytes);
            let mut payload = buf.split_to(header.payload_bytes);
            unmask(&mut payload, mask);
            let message = match header.opcode {
                Opcode::Text if header.fin => {
                    simdutf8::basic::from_utf8(&payload).map_err(|_| WsError::InvalidUtf8)?;
                    Message::Text(payload.freeze())
                }
                Opcode::Binary if header.fin => Message::Binary(payload.freeze()),
                Opcode::Text | Opcode::Binary | Opcode::Continuation => {
                    let kind = match header.opcode {
                        Opcode::Text => Some(Fragmented::Text),
                        Opcode::Binary => Some(Fragmented::Binary),
                        _ => None,
                    };
                    if let Some(kind) = kind {
                        self.fragmented = Some(Box::new(Fragments {
                            kind,
                            payload: BytesMut::new(),
                            utf8_valid_bytes: 0,
                        }));
                    }
                    match self.push_fragment(&payload, header.fin)? {
                        Some(message) => message,
                        // A fragment alone is no message: look for the next frame.
                        None => continue,
                    }
                }
                Opcode::Close => Message::Close(parse_close_payload(&payload)?),
                Opcode::Ping => Message::Ping(payload.freeze()),
                Opcode::Pong => Message::Pong(payload.freeze()),
            };
            return Ok(Some(message));
        }
    }

    /// Checks a header against the size limits and the fragmentation state before any of the
    /// payload is buffered.
    fn check_limits_and_order(&self, header: &FrameHeader) -> Result<(), WsError> {
        let frame_bytes_max = self.frame_bytes_max as usize;
        let message_bytes_max = self.message_bytes_max as usize;
        if header.payload_bytes > frame_bytes_max {
            return Err(WsError::FrameTooBig);
        }
        match (header.opcode, self.fragmented.as_deref()) {
            (Opcode::Continuation, None) => Err(WsError::ContinuationWithoutMessage),
            (Opcode::Text | Opcode::Binary, Some(_)) => Err(WsError::MessageInterrupted),
            (Opcode::Continuation, Some(fragments))
                if header.payload_bytes
                    > message_bytes_max.saturating_sub(fragments.payload.len()) =>
            {
                Err(WsError::MessageTooBig)
            }
            (Opcode::Text | Opcode::Binary, None) if header.payload_bytes > message_bytes_max => {
                Err(WsError::MessageTooBig)
            }
            _ => Ok(()),
        }
    }

    /// Appends one fragment; returns the message when it was the last one.
    fn push_fragment(&mut self, payload: &[u8], fin: bool) -> Result<Option<Message>, WsError> {
        let fragments = self
            .fragmented
            .as_deref_mut()
            .ok_or(WsError::ContinuationWithoutMessage)?;
        fragments.payload.extend_from_slice(payload);
        if fragments.kind == Fragmented::Text {
            fragments.validate_utf8(fin)?;
        }
        if !fin {
            return Ok(None);
        }
        let Fragments { kind, payload, .. } = *self
            .fragmented
            .take()
            .ok_or(WsError::ContinuationWithoutMessage)?;
        let payload = payload.freeze();
        Ok(Some(match kind {
            Fragmented::Text => Message::Text(payload),
            Fragmented::Binary => Message::Binary(payload),
        }))
    }
}

impl Fragments {
    /// Validates the bytes of `payload` not yet known good; an incomplete character at the
    /// end is fine until the last fragment.
    fn validate_utf8(&mut self, fin: bool) -> Result<(), WsError> {
        // Both fit in u32: `payload` never grows past `message_bytes_max`.
        let valid = self.utf8_valid_bytes as usize;
        let unchecked = &self.payload[valid..];
        match simdutf8::compat::from_utf8(unchecked) {
            Ok(_) => self.utf8_valid_bytes = self.payload.len() as u32,
            Err(error) if error.error_len().is_none() && !fin => {
                self.utf8_valid_bytes = (valid + error.valid_up_to()) as u32;
            }
            Err(_) => return Err(WsError::InvalidUtf8),
        }
        Ok(())
    }
}

/// Close payload: empty, or a 2-byte code and a UTF-8 reason (RFC 6455 §5.5.1, §7.4).
fn parse_close_payload(payload: &[u8]) -> Result<Option<(u16, String)>, WsError> {
    let Some((code, reason)) = payload.split_first_chunk::<2>() else {
        return if payload.is_empty() {
            Ok(None)
        } else {
            Err(WsError::ClosePayloadTooShort)
        };
    };
    let code = u16::from_be_bytes(*code);
    if !is_valid_close_code(code) {
        return Err(WsError::InvalidCloseCode);
    }
    let reason = simdutf8::basic::from_utf8(reason).map_err(|_| WsError::InvalidUtf8)?;
    Ok(Some((code, reason.to_owned())))
}

/// Codes a peer may send: the defined ones that are not reserved for local use (1004, 1005,
/// 1006, 1015) plus the IANA-registered 1012-1014, and the application ranges 3000-4999.
fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs `payload` with the 4-byte mask, 8 bytes at a time. The mask is replicated into a u64
/// in memory order, so the result does not depend on the host's endianness, and every 8-byte
/// chunk starts at a multiple of 4, so the mask phase stays aligned for the tail.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
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
// Encoder
// ---------------------------------------------------------------------------------------------

/// Header of a final, unmasked server frame carrying `payload_bytes`: the bytes and how many of
/// them to send. Write it and a shared payload `Bytes` with one vectored write, so a payload
/// fanned out to many connections is never copied.
pub fn frame_header(
    opcode: Opcode,
    payload_bytes: usize,
) -> ([u8; SERVER_HEADER_BYTES_MAX], usize) {
    let mut header = [0u8; SERVER_HEADER_BYTES_MAX];
    // The server never fragments: FIN is always set.
    header[0] = 0x80 | opcode as u8;
    let header_bytes = if payload_bytes < 126 {
        header[1] = payload_bytes as u8;
        2
    } else if let Ok(medium) = u16::try_from(payload_bytes) {
        header[1] = 126;
        header[2..4].copy_from_slice(&medium.to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(payload_bytes as u64).to_be_bytes());
        10
    };
    (header, header_bytes)
}

/// Appends a whole server frame (header and a copy of `payload`) to `out`.
pub fn encode_frame(opcode: Opcode, payload: &[u8], out: &mut BytesMut) {
    let (header, header_bytes) = frame_header(opcode, payload.len());
    out.reserve(header_bytes + payload.len());
    out.put_slice(&header[..header_bytes]);
    out.put_slice(payload);
}

/// Appends a close frame; a reason longer than a control frame allows is cut at a character
/// boundary.
pub fn encode_close(code: u16, reason: &str, out: &mut BytesMut) {
    let mut reason_bytes = reason.len().min(CLOSE_REASON_BYTES_MAX);
    while !reason.is_char_boundary(reason_bytes) {
        reason_bytes -= 1;
    }
    let reason = &reason.as_bytes()[..reason_bytes];
    let (header, header_bytes) = frame_header(Opcode::Close, 2 + reason.len());
    out.reserve(header_bytes + 2 + reason.len());
    out.put_slice(&header[..header_bytes]);
    out.put_u16(code);
    out.put_slice(reason);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // -- helpers ---------------------------------------------------------------------------

    /// What a client sends: a masked frame with the minimal length encoding.
    fn client_frame(out: &mut BytesMut, fin: bool, opcode: u8, mask: [u8; 4], payload: &[u8]) {
        out.put_u8(if fin { 0x80 } else { 0 } | opcode);
        let len = payload.len();
        if len < 126 {
            out.put_u8(0x80 | len as u8);
        } else if len <= 0xFFFF {
            out.put_u8(0x80 | 126);
            out.put_u16(len as u16);
        } else {
            out.put_u8(0x80 | 127);
            out.put_u64(len as u64);
        }
        out.put_slice(&mask);
        out.extend(
            payload
                .iter()
                .enumerate()
                .map(|(i, byte)| byte ^ mask[i % 4]),
        );
    }

    const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        client_frame(&mut out, fin, opcode, MASK, payload);
        out
    }

    fn decoder() -> FrameDecoder {
        FrameDecoder::new(1 << 20, 1 << 20)
    }

    fn decode_one(bytes: &[u8]) -> Result<Option<Message>, WsError> {
        decoder().decode(&mut BytesMut::from(bytes))
    }

    /// Decodes every message in `buf`, stopping at the first error.
    fn decode_all(decoder: &mut FrameDecoder, buf: &mut BytesMut) -> Result<Vec<Message>, WsError> {
        let mut messages = Vec::new();
        while let Some(message) = decoder.decode(buf)? {
            messages.push(message);
        }
        Ok(messages)
    }

    fn request_bytes(lines: &[&str]) -> Vec<u8> {
        let mut text = lines.join("\r\n");
        text.push_str("\r\n\r\n");
        text.into_bytes()
    }

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn upgrade_lines() -> Vec<&'static str> {
        vec![
            "GET /ws HTTP/1.1",
            "Host: chat.example",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ]
    }

    /// Replaces (or with `None` removes) the line starting with `prefix`.
    fn with_line<'a>(
        mut lines: Vec<&'a str>,
        prefix: &str,
        replacement: Option<&'a str>,
    ) -> Vec<&'a str> {
        let index = lines
            .iter()
            .position(|line| line.starts_with(prefix))
            .expect("line to replace");
        lines.remove(index);
        if let Some(replacement) = replacement {
            lines.insert(index, replacement);
        }
        lines
    }

    // -- handshake -------------------------------------------------------------------------

    #[test]
    fn accept_key_matches_rfc_6455_section_1_3() {
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn parses_a_valid_upgrade_and_reports_consumed_bytes() {
        let mut bytes = request_bytes(&upgrade_lines());
        let request_bytes = bytes.len();
        bytes.extend_from_slice(b"trailing");
        let (request, consumed) = parse_upgrade(&bytes).expect("valid").expect("complete");
        assert_eq!(consumed, request_bytes);
        assert_eq!(
            request,
            UpgradeRequest {
                path: "/ws".into(),
                query_token: None,
                bearer_token: None,
                sec_websocket_key: KEY.into(),
            }
        );
        assert_eq!(request.token(), None);
    }

    #[test]
    fn incomplete_request_asks_for_more() {
        let bytes = request_bytes(&upgrade_lines());
        for end in 0..bytes.len() {
            assert_eq!(
                parse_upgrade(&bytes[..end]),
                Ok(None),
                "prefix of {end} bytes"
            );
        }
    }

    #[test]
    fn tokens_come_from_query_and_bearer_header() {
        let lines = with_line(
            upgrade_lines(),
            "GET",
            Some("GET /ws?v=2&token=a%2Eb%20c&token=second HTTP/1.1"),
        );
        let (request, _) = parse_upgrade(&request_bytes(&lines))
            .expect("valid")
            .expect("complete");
        assert_eq!(request.path, "/ws");
        assert_eq!(request.query_token.as_deref(), Some("a.b c"));
        assert_eq!(request.token(), Some("a.b c"));

        let mut lines = lines;
        lines.push("authorization: bearer  header.jwt ");
        let (request, _) = parse_upgrade(&request_bytes(&lines))
            .expect("valid")
            .expect("complete");
        assert_eq!(request.bearer_token.as_deref(), Some("header.jwt"));
        assert_eq!(
            request.token(),
            Some("header.jwt"),
            "header wins over query"
        );

        let debug = format!("{request:?}");
        assert!(
            !debug.contains("header.jwt") && !debug.contains("a.b c"),
            "{debug}"
        );

        let mut lines = upgrade_lines();
        lines.push("Authorization: Basic dXNlcjpwYXNz");
        let (request, _) = parse_upgrade(&request_bytes(&lines))
            .expect("valid")
            .expect("complete");
        assert_eq!(request.bearer_token, None);
    }

    #[test]
    fn invalid_percent_encoding_in_token_is_malformed() {
        let lines = with_line(
            upgrade_lines(),
            "GET",
            Some("GET /ws?token=%FF%FE HTTP/1.1"),
        );
        assert_eq!(
            parse_upgrade(&request_bytes(&lines)),
            Err(HandshakeError::Malformed)
        );
    }

    #[test]
    fn header_tokens_are_case_insensitive_lists() {
        let lines = with_line(upgrade_lines(), "Upgrade", Some("upgrade: WebSocket"));
        let lines = with_line(lines, "Connection", Some("connection: keep-alive, UPGRADE"));
        assert!(
            parse_upgrade(&request_bytes(&lines))
                .expect("valid")
                .is_some()
        );
    }

    #[test]
    fn refuses_requests_that_are_not_websocket_upgrades() {
        let cases: Vec<(Vec<&str>, HandshakeError)> = vec![
            (
                with_line(upgrade_lines(), "GET", Some("POST /ws HTTP/1.1")),
                HandshakeError::NotGet,
            ),
            (
                with_line(upgrade_lines(), "GET", Some("GET /ws HTTP/1.0")),
                HandshakeError::HttpVersion,
            ),
            (
                with_line(upgrade_lines(), "Upgrade", None),
                HandshakeError::NotWebSocketUpgrade,
            ),
            (
                with_line(upgrade_lines(), "Upgrade", Some("Upgrade: h2c")),
                HandshakeError::NotWebSocketUpgrade,
            ),
            (
                with_line(
                    upgrade_lines(),
                    "Connection",
                    Some("Connection: keep-alive"),
                ),
                HandshakeError::NoConnectionUpgrade,
            ),
            (
                with_line(
                    upgrade_lines(),
                    "Sec-WebSocket-Version",
                    Some("Sec-WebSocket-Version: 8"),
                ),
                HandshakeError::UnsupportedVersion,
            ),
            (
                with_line(upgrade_lines(), "Sec-WebSocket-Version", None),
                HandshakeError::UnsupportedVersion,
            ),
            (
                with_line(upgrade_lines(), "Sec-WebSocket-Key", None),
                HandshakeError::InvalidKey,
            ),
            (
                // base64 of 15 bytes
                with_line(
                    upgrade_lines(),
                    "Sec-WebSocket-Key",
                    Some("Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA"),
                ),
                HandshakeError::InvalidKey,
            ),
            (
                with_line(
                    upgrade_lines(),
                    "Sec-WebSocket-Key",
                    Some("Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!=="),
                ),
                HandshakeError::InvalidKey,
            ),
        ];
        for (lines, expected) in cases {
            assert_eq!(
                parse_upgrade(&request_bytes(&lines)),
                Err(expected),
                "{lines:?}"
            );
        }
        let mut duplicate_key = upgrade_lines();
        duplicate_key.push("Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==");
        assert_eq!(
            parse_upgrade(&request_bytes(&duplicate_key)),
            Err(HandshakeError::InvalidKey)
        );
        assert_eq!(
            parse_upgrade(b"GET /ws\x01 HTTP/1.1\r\n\r\n"),
            Err(HandshakeError::Malformed)
        );
    }

    #[test]
    fn oversized_request_is_431() {
        // Incomplete and already at the limit.
        let mut bytes = b"GET /ws HTTP/1.1\r\nX-Filler: ".to_vec();
        bytes.resize(HANDSHAKE_BYTES_MAX, b'a');
        assert_eq!(parse_upgrade(&bytes[..HANDSHAKE_BYTES_MAX - 1]), Ok(None));
        assert_eq!(parse_upgrade(&bytes), Err(HandshakeError::TooLarge));
        // Complete, but past the limit.
        let filler = format!("X-Filler: {}", "a".repeat(HANDSHAKE_BYTES_MAX));
        let mut lines = upgrade_lines();
        lines.push(&filler);
        assert_eq!(
            parse_upgrade(&request_bytes(&lines)),
            Err(HandshakeError::TooLarge)
        );
        // Too many header lines.
        let many: Vec<String> = (0..HANDSHAKE_HEADERS_MAX)
            .map(|i| format!("X-{i}: 1"))
            .collect();
        let mut lines = upgrade_lines();
        lines.extend(many.iter().map(String::as_str));
        let error = parse_upgrade(&request_bytes(&lines)).expect_err("too many headers");
        assert_eq!(error, HandshakeError::TooLarge);
        assert_eq!(error.status().code(), 431);
    }

    #[test]
    fn switching_protocols_response_carries_the_accept_key() {
        let mut out = BytesMut::new();
        encode_switching_protocols(KEY, &mut out);
        assert_eq!(
            &out[..],
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"[..]
        );
    }

    /// Splits a response into head and body and checks Content-Length and Connection.
    fn check_error_response(bytes: &[u8], code: u16) -> String {
        let text = std::str::from_utf8(bytes).expect("ascii response");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with(&format!("HTTP/1.1 {code} ")), "{head}");
        assert!(
            head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(head.contains("\r\nConnection: close"), "{head}");
        head.to_owned()
    }

    #[test]
    fn error_responses_have_length_and_close() {
        for (status, code) in [
            (HttpErrorStatus::BadRequest, 400),
            (HttpErrorStatus::Unauthorized, 401),
            (HttpErrorStatus::NotFound, 404),
            (HttpErrorStatus::RequestTimeout, 408),
            (HttpErrorStatus::UpgradeRequired, 426),
            (HttpErrorStatus::RequestHeaderFieldsTooLarge, 431),
            (HttpErrorStatus::ServiceUnavailable, 503),
        ] {
            assert_eq!(status.code(), code);
            let mut out = BytesMut::new();
            encode_error_response(status, "no token", &mut out);
            let head = check_error_response(&out, code);
            assert_eq!(head.contains("Sec-WebSocket-Version: 13"), code == 426);
        }
        let mut out = BytesMut::new();
        HandshakeError::UnsupportedVersion.encode_response(&mut out);
        let head = check_error_response(&out, 426);
        assert!(head.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(out.ends_with(b"sec-websocket-version must be 13"));
    }

    // -- frame decoding --------------------------------------------------------------------

    #[test]
    fn decodes_masked_text_and_binary() {
        assert_eq!(
            decode_one(&frame(true, 0x1, b"Hello")),
            Ok(Some(Message::Text(Bytes::from_static(b"Hello"))))
        );
        // RFC 6455 §5.7: a masked "Hello".
        assert_eq!(
            decode_one(&[
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]),
            Ok(Some(Message::Text(Bytes::from_static(b"Hello"))))
        );
        assert_eq!(
            decode_one(&frame(true, 0x2, &[0, 1, 2, 255])),
            Ok(Some(Message::Binary(Bytes::from_static(&[0, 1, 2, 255]))))
        );
        assert_eq!(
            decode_one(&frame(true, 0x2, b"")),
            Ok(Some(Message::Binary(Bytes::new())))
        );
    }

    #[test]
    fn length_forms_at_their_boundaries() {
        for len in [0, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let bytes = frame(true, 0x2, &payload);
            let header_bytes = match len {
                0..=125 => 6,
                126..=65535 => 8,
                _ => 14,
            };
            assert_eq!(bytes.len(), header_bytes + len);
            // Every strict prefix is incomplete, the whole frame decodes.
            let mut decoder = decoder();
            for cut in [0, 1, header_bytes - 1, header_bytes, bytes.len() - 1] {
                if cut < bytes.len() {
                    let mut partial = BytesMut::from(&bytes[..cut]);
                    assert_eq!(
                        decoder.decode(&mut partial),
                        Ok(None),
                        "len {len} cut {cut}"
                    );
                    assert_eq!(
                        partial.len(),
                        cut,
                        "nothing consumed before the frame is whole"
                    );
                }
            }
            let mut buf = BytesMut::from(&bytes[..]);
            assert_eq!(
                decoder.decode(&mut buf),
                Ok(Some(Message::Binary(payload.into())))
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn incomplete_frame_reserves_room_for_the_rest() {
        let bytes = frame(true, 0x2, &[9u8; 20_000]);
        let mut buf = BytesMut::from(&bytes[..8]);
        assert_eq!(decoder().decode(&mut buf), Ok(None));
        assert!(buf.capacity() >= bytes.len());
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let mut buf = frame(true, 0x1, b"one");
        buf.extend_from_slice(&frame(true, 0x9, b"ping"));
        buf.extend_from_slice(&frame(true, 0x2, b"two"));
        buf.extend_from_slice(&frame(true, 0xA, b""));
        buf.extend_from_slice(&frame(false, 0x2, b"thr")[..]);
        let mut decoder = decoder();
        assert_eq!(
            decode_all(&mut decoder, &mut buf),
            Ok(vec![
                Message::Text("one".into()),
                Message::Ping("ping".into()),
                Message::Binary("two".into()),
                Message::Pong(Bytes::new()),
            ])
        );
        buf.extend_from_slice(&frame(true, 0x0, b"ee"));
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Message::Binary("three".into())))
        );
    }

    #[test]
    fn unmask_matches_the_bytewise_definition() {
        for len in 0..40 {
            let original: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mask = [0xA1, 0x02, 0xF3, 0x44];
            let mut fast = original.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = original
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow, "len {len}");
        }
    }

    #[test]
    fn unmasked_client_frame_is_1002() {
        let error = decode_one(&[0x81, 0x05, b'H', b'e', b'l', b'l', b'o']).expect_err("unmasked");
        assert_eq!(error, WsError::UnmaskedFrame);
        assert_eq!(error.close_code(), 1002);
    }

    #[test]
    fn reserved_bits_are_1002() {
        for rsv in [0x40, 0x20, 0x10] {
            let mut bytes = frame(true, 0x1, b"x");
            bytes[0] |= rsv;
            assert_eq!(decode_one(&bytes), Err(WsError::ReservedBits));
        }
    }

    #[test]
    fn reserved_opcodes_are_1002() {
        for opcode in (0x3..=0x7).chain(0xB..=0xF) {
            let error = decode_one(&frame(true, opcode, b"")).expect_err("reserved");
            assert_eq!(error, WsError::ReservedOpcode, "opcode {opcode:#x}");
            assert_eq!(error.close_code(), 1002);
            // Detected from the first two bytes alone.
            assert_eq!(
                decode_one(&[0x80 | opcode, 0x80]),
                Err(WsError::ReservedOpcode)
            );
        }
    }

    #[test]
    fn control_frames_must_be_final_and_short() {
        for opcode in [0x8, 0x9, 0xA] {
            assert_eq!(
                decode_one(&frame(false, opcode, b"")),
                Err(WsError::FragmentedControlFrame)
            );
            let error = decode_one(&frame(true, opcode, &[0u8; 126])).expect_err("too long");
            assert_eq!(error, WsError::ControlFrameTooLong);
            assert_eq!(error.close_code(), 1002);
        }
        assert_eq!(
            decode_one(&frame(true, 0x9, &[7u8; 125])),
            Ok(Some(Message::Ping(vec![7u8; 125].into())))
        );
    }

    #[test]
    fn lengths_must_be_minimal_and_below_2_pow_63() {
        // 16-bit form for 125 bytes.
        let mut bytes = BytesMut::from(&[0x82, 0x80 | 126, 0, 125][..]);
        assert_eq!(decoder().decode(&mut bytes), Err(WsError::NonMinimalLength));
        // 64-bit form for 65535 bytes.
        let mut bytes = BytesMut::from(&[0x82, 0x80 | 127, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF][..]);
        assert_eq!(decoder().decode(&mut bytes), Err(WsError::NonMinimalLength));
        // Most significant bit set.
        let mut bytes = BytesMut::from(&[0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1][..]);
        let error = decoder().decode(&mut bytes).expect_err("msb");
        assert_eq!(error, WsError::LengthMsbSet);
        assert_eq!(error.close_code(), 1002);
    }

    #[test]
    fn fragmented_message_with_interleaved_control_frames() {
        let mut buf = frame(false, 0x1, b"Hel");
        buf.extend_from_slice(&frame(true, 0x9, b"p"));
        buf.extend_from_slice(&frame(false, 0x0, b"lo, "));
        buf.extend_from_slice(&frame(true, 0xA, b"q"));
        buf.extend_from_slice(&frame(false, 0x0, b""));
        buf.extend_from_slice(&frame(true, 0x0, b"world"));
        let mut decoder = decoder();
        assert_eq!(
            decode_all(&mut decoder, &mut buf),
            Ok(vec![
                Message::Ping("p".into()),
                Message::Pong("q".into()),
                Message::Text("Hello, world".into()),
            ])
        );
        // The decoder is ready for the next message.
        let mut buf = frame(true, 0x2, b"next");
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Message::Binary("next".into())))
        );
    }

    #[test]
    fn a_reassembled_message_leaves_no_buffer_in_the_decoder() {
        let mut buf = frame(false, 0x1, b"Hel");
        buf.extend_from_slice(&frame(true, 0x0, b"lo"));
        let mut decoder = decoder();
        assert_eq!(
            decode_all(&mut decoder, &mut buf),
            Ok(vec![Message::Text("Hello".into())])
        );
        // An idle connection's decoder holds no reassembly storage.
        assert!(decoder.fragmented.is_none());
        assert_eq!(std::mem::size_of::<FrameDecoder>(), 16);
    }

    #[test]
    fn close_inside_a_fragmented_message_is_delivered() {
        let mut buf = frame(false, 0x2, b"part");
        buf.extend_from_slice(&frame(true, 0x8, &[0x03, 0xE8]));
        assert_eq!(
            decode_all(&mut decoder(), &mut buf),
            Ok(vec![Message::Close(Some((1000, String::new())))])
        );
    }

    #[test]
    fn continuation_without_a_message_is_1002() {
        for fin in [true, false] {
            let error = decode_one(&frame(fin, 0x0, b"x")).expect_err("no message open");
            assert_eq!(error, WsError::ContinuationWithoutMessage);
            assert_eq!(error.close_code(), 1002);
        }
    }

    #[test]
    fn new_data_frame_inside_a_message_is_1002() {
        for opcode in [0x1, 0x2] {
            let mut buf = frame(false, 0x2, b"a");
            buf.extend_from_slice(&frame(true, opcode, b"b"));
            let error = decode_all(&mut decoder(), &mut buf).expect_err("interrupted");
            assert_eq!(error, WsError::MessageInterrupted);
            assert_eq!(error.close_code(), 1002);
        }
    }

    #[test]
    fn close_payloads() {
        assert_eq!(
            decode_one(&frame(true, 0x8, b"")),
            Ok(Some(Message::Close(None)))
        );
        let mut payload = 1001u16.to_be_bytes().to_vec();
        payload.extend_from_slice("bye ✓".as_bytes());
        assert_eq!(
            decode_one(&frame(true, 0x8, &payload)),
            Ok(Some(Message::Close(Some((1001, "bye ✓".into())))))
        );
        for code in [1000, 1003, 1007, 1011, 1014, 3000, 4999] {
            assert!(
                matches!(
                    decode_one(&frame(true, 0x8, &u16::to_be_bytes(code))),
                    Ok(Some(_))
                ),
                "code {code}"
            );
        }
        let error = decode_one(&frame(true, 0x8, &[0x03])).expect_err("one byte");
        assert_eq!(error, WsError::ClosePayloadTooShort);
        assert_eq!(error.close_code(), 1002);
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            let error = decode_one(&frame(true, 0x8, &u16::to_be_bytes(code))).expect_err("code");
            assert_eq!(error, WsError::InvalidCloseCode, "code {code}");
            assert_eq!(error.close_code(), 1002);
        }
        let error = decode_one(&frame(true, 0x8, &[0x03, 0xE8, 0xFF])).expect_err("bad utf-8");
        assert_eq!(error, WsError::InvalidUtf8);
        assert_eq!(error.close_code(), 1007);
    }

    #[test]
    fn invalid_utf8_text_is_1007() {
        let error = decode_one(&frame(true, 0x1, &[b'a', 0xC3])).expect_err("truncated");
        assert_eq!(error, WsError::InvalidUtf8);
        assert_eq!(error.close_code(), 1007);
        assert_eq!(
            decode_one(&frame(true, 0x1, &[0xED, 0xA0, 0x80])),
            Err(WsError::InvalidUtf8)
        );
        // Binary is not validated.
        assert!(
            decode_one(&frame(true, 0x2, &[0xFF]))
                .expect("binary")
                .is_some()
        );
    }

    #[test]
    fn utf8_may_split_across_fragments() {
        let text = "κόσμε €𝄞";
        let bytes = text.as_bytes();
        for first in 0..=bytes.len() {
            for second in first..=bytes.len() {
                let mut buf = frame(false, 0x1, &bytes[..first]);
                buf.extend_from_slice(&frame(false, 0x0, &bytes[first..second]));
                buf.extend_from_slice(&frame(true, 0x0, &bytes[second..]));
                assert_eq!(
                    decode_all(&mut decoder(), &mut buf),
                    Ok(vec![Message::Text(Bytes::copy_from_slice(bytes))])
                );
            }
        }
    }

    #[test]
    fn invalid_utf8_fails_before_the_message_ends() {
        let mut decoder = decoder();
        let mut buf = frame(false, 0x1, b"ok");
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        let mut buf = frame(false, 0x0, &[0xF0, 0x28]);
        assert_eq!(decoder.decode(&mut buf), Err(WsError::InvalidUtf8));
        // An incomplete character is only an error at the end.
        let mut decoder = self::decoder();
        let mut buf = frame(false, 0x1, &[b'a', 0xF0, 0x9D]);
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        let mut buf = frame(true, 0x0, &[0x84]);
        assert_eq!(decoder.decode(&mut buf), Err(WsError::InvalidUtf8));
    }

    #[test]
    fn oversized_frame_is_1009_from_the_header_alone() {
        let mut decoder = FrameDecoder::new(1000, 4000);
        let bytes = frame(true, 0x2, &[0u8; 1001]);
        let mut header_only = BytesMut::from(&bytes[..8]);
        let error = decoder.decode(&mut header_only).expect_err("too big");
        assert_eq!(error, WsError::FrameTooBig);
        assert_eq!(error.close_code(), 1009);
        let mut exact = frame(true, 0x2, &[0u8; 1000]);
        assert!(
            FrameDecoder::new(1000, 1000)
                .decode(&mut exact)
                .expect("at the limit")
                .is_some()
        );
        // A length that does not fit usize on any platform is still just too big.
        let mut huge =
            BytesMut::from(&[0x82, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF][..]);
        assert_eq!(
            FrameDecoder::new(1000, 4000).decode(&mut huge),
            Err(WsError::FrameTooBig)
        );
    }

    #[test]
    fn oversized_message_is_1009_from_the_header_alone() {
        let mut decoder = FrameDecoder::new(1000, 2500);
        let mut buf = frame(false, 0x2, &[0u8; 1000]);
        buf.extend_from_slice(&frame(false, 0x0, &[0u8; 1000]));
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        let bytes = frame(true, 0x0, &[0u8; 501]);
        let mut header_only = BytesMut::from(&bytes[..8]);
        let error = decoder
            .decode(&mut header_only)
            .expect_err("message too big");
        assert_eq!(error, WsError::MessageTooBig);
        assert_eq!(error.close_code(), 1009);
        // A single frame over the message limit.
        let mut decoder = FrameDecoder::new(1000, 500);
        assert_eq!(
            decoder.decode(&mut frame(true, 0x1, &[b'a'; 501])),
            Err(WsError::MessageTooBig)
        );
        // Exactly at the limit is fine.
        let mut decoder = FrameDecoder::new(1000, 2500);
        let mut buf = frame(false, 0x2, &[1u8; 1000]);
        buf.extend_from_slice(&frame(false, 0x0, &[2u8; 1000]));
        buf.extend_from_slice(&frame(true, 0x0, &[3u8; 500]));
        let messages = decode_all(&mut decoder, &mut buf).expect("at the limit");
        assert!(matches!(&messages[..], [Message::Binary(payload)] if payload.len() == 2500));
    }

    #[test]
    fn error_reasons_fit_a_close_frame() {
        let all = [
            WsError::ReservedBits,
            WsError::ReservedOpcode,
            WsError::UnmaskedFrame,
            WsError::FragmentedControlFrame,
            WsError::ControlFrameTooLong,
            WsError::NonMinimalLength,
            WsError::LengthMsbSet,
            WsError::ContinuationWithoutMessage,
            WsError::MessageInterrupted,
            WsError::ClosePayloadTooShort,
            WsError::InvalidCloseCode,
            WsError::InvalidUtf8,
            WsError::FrameTooBig,
            WsError::MessageTooBig,
        ];
        for error in all {
            assert!(!error.reason().is_empty() && error.reason().len() <= CLOSE_REASON_BYTES_MAX);
            assert_eq!(error.to_string(), error.reason());
            assert!(is_valid_close_code(error.close_code()));
        }
    }

    // -- encoding --------------------------------------------------------------------------

    #[test]
    fn server_frame_headers_use_the_minimal_length_form() {
        assert_eq!(
            frame_header(Opcode::Text, 0),
            ([0x81, 0, 0, 0, 0, 0, 0, 0, 0, 0], 2)
        );
        assert_eq!(frame_header(Opcode::Binary, 125).1, 2);
        assert_eq!(
            &frame_header(Opcode::Binary, 126).0[..4],
            &[0x82, 126, 0, 126]
        );
        assert_eq!(
            &frame_header(Opcode::Binary, 65535).0[..4],
            &[0x82, 126, 0xFF, 0xFF]
        );
        assert_eq!(
            frame_header(Opcode::Binary, 65536),
            ([0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0], 10)
        );
        assert_eq!(frame_header(Opcode::Pong, 3).0[0], 0x8A);
    }

    #[test]
    fn encode_frame_and_close() {
        let mut out = BytesMut::new();
        encode_frame(Opcode::Text, b"Hello", &mut out);
        // RFC 6455 §5.7: an unmasked "Hello".
        assert_eq!(&out[..], &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);

        let mut out = BytesMut::new();
        encode_close(close_code::TOO_BIG, "message too big", &mut out);
        assert_eq!(&out[..4], &[0x88, 17, 0x03, 0xF1]);
        assert_eq!(&out[4..], b"message too big");

        // A long reason is cut at a character boundary so the frame stays a control frame.
        let long = "é".repeat(100);
        let mut out = BytesMut::new();
        encode_close(close_code::NORMAL, &long, &mut out);
        assert_eq!(out[1] as usize, 2 + 122);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }

    // -- properties --------------------------------------------------------------------------

    /// Deterministic bytes from a seed, so large payloads cost one proptest value.
    struct SplitMix(u64);

    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn mask(&mut self) -> [u8; 4] {
            (self.next() as u32).to_ne_bytes()
        }
    }

    fn binary_payload(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = SplitMix(seed);
        (0..len).map(|_| rng.next() as u8).collect()
    }

    /// About `len` bytes of UTF-8 with 1- to 4-byte characters.
    fn text_payload(len: usize, seed: u64) -> Vec<u8> {
        const CHARS: [char; 6] = ['a', 'Z', 'é', 'ж', '€', '𝄞'];
        let mut rng = SplitMix(seed);
        let mut text = String::with_capacity(len + 4);
        while text.len() < len {
            text.push(CHARS[(rng.next() % CHARS.len() as u64) as usize]);
        }
        text.into_bytes()
    }

    /// Sizes around every length-form boundary, mostly small.
    fn payload_bytes() -> impl Strategy<Value = usize> {
        prop_oneof![
            6 => 0usize..=130,
            1 => 65530usize..=65540,
            1 => prop::sample::select(vec![125usize, 126, 127, 65535, 65536]),
        ]
    }

    /// What the client sends: a data message (in fragments, with pings between them) or a
    /// control frame.
    #[derive(Debug, Clone)]
    enum Sent {
        Data {
            text: bool,
            len: usize,
            seed: u64,
            /// Where the payload is cut into fragments (sorted, deduplicated fractions).
            cuts: Vec<u16>,
            /// Fragment indexes after which a ping is sent.
            pings_after: Vec<usize>,
        },
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(u16, String),
    }

    fn sent() -> impl Strategy<Value = Sent> {
        prop_oneof![
            6 => (
                any::<bool>(),
                payload_bytes(),
                any::<u64>(),
                prop::collection::vec(any::<u16>(), 0..4),
                prop::collection::vec(0usize..5, 0..3),
            )
                .prop_map(|(text, len, seed, cuts, pings_after)| Sent::Data {
                    text,
                    len,
                    seed,
                    cuts,
                    pings_after,
                }),
            1 => prop::collection::vec(any::<u8>(), 0..=125).prop_map(Sent::Ping),
            1 => prop::collection::vec(any::<u8>(), 0..=125).prop_map(Sent::Pong),
            1 => (prop::sample::select(vec![1000u16, 1001, 1011, 4000]), "[a-z é]{0,40}")
                .prop_map(|(code, reason)| Sent::Close(code, reason)),
        ]
    }

    /// Encodes what the client sends and the messages the server must see, in order.
    fn encode_client(sent: &[Sent], mask_seed: u64) -> (BytesMut, Vec<Message>) {
        let mut rng = SplitMix(mask_seed);
        let mut wire = BytesMut::new();
        let mut expected = Vec::new();
        for item in sent {
            match item {
                Sent::Data {
                    text,
                    len,
                    seed,
                    cuts,
                    pings_after,
                } => {
                    let payload = if *text {
                        text_payload(*len, *seed)
                    } else {
                        binary_payload(*len, *seed)
                    };
                    let mut points: Vec<usize> = cuts
                        .iter()
                        .map(|cut| payload.len() * usize::from(*cut) / usize::from(u16::MAX))
                        .collect();
                    points.sort_unstable();
                    points.dedup();
                    let mut bounds = vec![0];
                    bounds.extend(points);
                    bounds.push(payload.len());
                    let fragments = bounds.len() - 1;
                    for index in 0..fragments {
                        let opcode = match (index, text) {
                            (0, true) => 0x1,
                            (0, false) => 0x2,
                            _ => 0x0,
                        };
                        let fin = index + 1 == fragments;
                        let fragment = &payload[bounds[index]..bounds[index + 1]];
                        client_frame(&mut wire, fin, opcode, rng.mask(), fragment);
                        if !fin && pings_after.contains(&index) {
                            let ping = index.to_be_bytes();
                            client_frame(&mut wire, true, 0x9, rng.mask(), &ping);
                            expected.push(Message::Ping(Bytes::copy_from_slice(&ping)));
                        }
                    }
                    let payload = Bytes::from(payload);
                    expected.push(if *text {
                        Message::Text(payload)
                    } else {
                        Message::Binary(payload)
                    });
                }
                Sent::Ping(payload) => {
                    client_frame(&mut wire, true, 0x9, rng.mask(), payload);
                    expected.push(Message::Ping(payload.clone().into()));
                }
                Sent::Pong(payload) => {
                    client_frame(&mut wire, true, 0xA, rng.mask(), payload);
                    expected.push(Message::Pong(payload.clone().into()));
                }
                Sent::Close(code, reason) => {
                    let mut payload = code.to_be_bytes().to_vec();
                    payload.extend_from_slice(reason.as_bytes());
                    client_frame(&mut wire, true, 0x8, rng.mask(), &payload);
                    expected.push(Message::Close(Some((*code, reason.clone()))));
                }
            }
        }
        (wire, expected)
    }

    /// Feeds `wire` in chunks of the given sizes (cycled), decoding after each read.
    fn decode_in_chunks(wire: &[u8], chunk_bytes: &[usize]) -> Result<Vec<Message>, WsError> {
        let mut decoder = decoder();
        let mut buf = BytesMut::new();
        let mut messages = Vec::new();
        let mut offset = 0;
        for chunk in chunk_bytes.iter().cycle() {
            if offset == wire.len() {
                break;
            }
            let end = (offset + chunk).min(wire.len());
            buf.extend_from_slice(&wire[offset..end]);
            offset = end;
            messages.extend(decode_all(&mut decoder, &mut buf)?);
        }
        assert!(buf.is_empty(), "every byte consumed");
        Ok(messages)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// (a) Valid frames decode to the same messages whether they arrive all at once, a byte
        /// at a time, or in arbitrary reads.
        #[test]
        fn any_chunking_gives_the_same_messages(
            sent in prop::collection::vec(sent(), 1..6),
            mask_seed in any::<u64>(),
            chunk_bytes in prop::collection::vec(1usize..70_000, 1..6),
        ) {
            let (wire, expected) = encode_client(&sent, mask_seed);
            prop_assert_eq!(decode_in_chunks(&wire, &[wire.len()]), Ok(expected.clone()));
            prop_assert_eq!(decode_in_chunks(&wire, &chunk_bytes), Ok(expected.clone()));
            prop_assert_eq!(decode_in_chunks(&wire, &[1]), Ok(expected));
        }
    }

    /// Bytes that look like frame headers often enough to get past the first checks.
    fn frameish_bytes() -> impl Strategy<Value = Vec<u8>> {
        let header_byte = prop_oneof![
            any::<u8>(),
            prop::sample::select(vec![0x00u8, 0x01, 0x02, 0x80, 0x81, 0x82, 0x88, 0x89, 0x8A]),
        ];
        let length_byte = prop_oneof![any::<u8>(), (0x80u8..=0xFF)];
        let piece = (
            header_byte,
            length_byte,
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(first, second, rest)| {
                let mut piece = vec![first, second];
                piece.extend(rest);
                piece
            });
        prop::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// (b) Arbitrary bytes give messages, a request for more, or an error; never a panic,
        /// and never a message over the limits.
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..600), frameish_bytes()],
            chunk_bytes in 1usize..64,
        ) {
            for chunk in [bytes.len().max(1), chunk_bytes, 1] {
                let mut decoder = FrameDecoder::new(64, 128);
                let mut buf = BytesMut::new();
                'feed: for piece in bytes.chunks(chunk) {
                    buf.extend_from_slice(piece);
                    loop {
                        match decoder.decode(&mut buf) {
                            Ok(Some(Message::Text(payload))) => {
                                prop_assert!(payload.len() <= 128);
                                prop_assert!(std::str::from_utf8(&payload).is_ok());
                            }
                            Ok(Some(Message::Binary(payload))) => prop_assert!(payload.len() <= 128),
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(error) => {
                                prop_assert!(matches!(error.close_code(), 1002 | 1007 | 1009));
                                break 'feed;
                            }
                        }
                    }
                }
            }
        }

        /// Handshake parsing never panics either.
        #[test]
        fn arbitrary_handshake_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_upgrade(&bytes);
            let mut request = b"GET /ws?token=".to_vec();
            request.extend_from_slice(&bytes);
            let _ = parse_upgrade(&request);
        }
    }
}
