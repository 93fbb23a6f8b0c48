//! The cache-hit read's own Redis client: one pipelined round trip per page on a pooled
//! connection, replies parsed in place.
//!
//! Why ours rather than redis-rs here (STYLE: a library unless the hot path needs ours):
//! a cache-hit page is one pipeline of ≈ 5 commands whose replies hold ≈ 60 values, 51 of
//! them the cached messages (≈ 10 KB). redis-rs parses each value with `combine` into an
//! owned `redis::Value` (one allocation and copy per entry), then `FromRedisValue` copies
//! each again, and its multiplexed connection hands every call to a driver task through
//! channels: together ≈ 26 % of the reader's CPU per cache-hit page (profile in
//! docs/BENCHMARKS.md). Here the calling task writes its pipeline and reads the replies on
//! a connection it holds for the call, the replies are first scanned for completeness and
//! then sliced out of the one read buffer (`Bytes`, no copy: a cached entry goes from the
//! socket buffer into the gRPC response as is). Everything else the reader asks Redis
//! stays on redis-rs; the pipelines are still built and encoded with `redis::Pipeline`.
//!
//! Connections: at most `max_connections` at once (callers beyond wait), idle ones kept
//! for reuse. A connection that failed, timed out or whose call was cancelled mid-flight
//! is dropped, never reused, so a late reply can never be read as another call's.

use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Semaphore;

/// Default most connections open at once.
pub const CONNECTIONS_DEFAULT: usize = 32;
/// Default wait for a round trip, connecting included, in ms.
pub const TIMEOUT_DEFAULT_MS: u64 = 2000;
/// Deepest nesting of arrays a reply may have (ours have 2).
const DEPTH_MAX: usize = 8;
/// Read buffer growth per read.
const READ_CHUNK: usize = 16 * 1024;

/// Why a hot-path round trip failed.
#[derive(Debug, thiserror::Error)]
pub enum HotRedisError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("redis closed the connection")]
    Closed,
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("malformed reply: {0}")]
    Protocol(&'static str),
    #[error("connection setup refused: {0}")]
    Setup(String),
    #[error("unexpected reply: wanted {wanted}, got {got}")]
    Type { wanted: &'static str, got: String },
    #[error("redis error reply: {0}")]
    Server(String),
    #[error("{0} (the reader's page read sends plain pipelines over TCP or a unix socket)")]
    Unsupported(&'static str),
}

/// One RESP2 reply. Bulk and status strings are slices of the read buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Nil,
    Int(i64),
    Bulk(Bytes),
    Status(Bytes),
    Error(String),
    Array(Vec<Reply>),
}

impl Reply {
    fn type_error(&self, wanted: &'static str) -> HotRedisError {
        match self {
            Reply::Error(message) => HotRedisError::Server(message.clone()),
            other => HotRedisError::Type {
                wanted,
                got: format!("{other:?}").chars().take(80).collect(),
            },
        }
    }

    /// An integer reply as a bool (EXISTS, SISMEMBER).
    pub fn into_bool(self) -> Result<bool, HotRedisError> {
        Ok(self.into_u64()? != 0)
    }

    pub fn into_u64(self) -> Result<u64, HotRedisError> {
        match self {
            Reply::Int(value) if value >= 0 => Ok(value as u64),
            other => Err(other.type_error("a non-negative integer")),
        }
    }

    /// An array of bulk strings (nil entries are an error).
    pub fn into_bulks(self) -> Result<Vec<Bytes>, HotRedisError> {
        match self {
            Reply::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    Reply::Bulk(bytes) => Ok(bytes),
                    other => Err(other.type_error("a bulk string")),
                })
                .collect(),
            Reply::Nil => Ok(Vec::new()),
            other => Err(other.type_error("an array")),
        }
    }

    /// An array of optional numbers sent as bulk strings (ZMSCORE; WITHSCORES scores).
    pub fn into_optional_numbers(self) -> Result<Vec<Option<f64>>, HotRedisError> {
        match self {
            Reply::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    Reply::Nil => Ok(None),
                    Reply::Bulk(bytes) => number(&bytes).map(Some),
                    other => Err(other.type_error("a number")),
                })
                .collect(),
            other => Err(other.type_error("an array")),
        }
    }
}

/// A number sent as a bulk string (`inf`, `-inf` included).
pub fn number(bytes: &[u8]) -> Result<f64, HotRedisError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or(HotRedisError::Protocol("a score that is not a number"))
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Stream {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.write_all(bytes).await,
            Stream::Unix(stream) => stream.write_all(bytes).await,
        }
    }

    async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.read_buf(buf).await,
            Stream::Unix(stream) => stream.read_buf(buf).await,
        }
    }
}

struct Connection {
    stream: Stream,
    buffer: BytesMut,
}

impl Connection {
    /// Writes `packed` (`count` commands) and reads their `count` replies.
    async fn round_trip(
        &mut self,
        packed: &[u8],
        count: usize,
    ) -> Result<Vec<Reply>, HotRedisError> {
        self.stream.write_all(packed).await?;
        loop {
            if let Some(end) = scan_replies(&self.buffer, count)? {
                let frame = self.buffer.split_to(end).freeze();
                return parse_replies(&frame, count);
            }
            self.buffer.reserve(READ_CHUNK);
            if self.stream.read_buf(&mut self.buffer).await? == 0 {
                return Err(HotRedisError::Closed);
            }
        }
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
enum Address {
    Tcp(String, u16),
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(host, port) => write!(f, "{host}:{port}"),
            Address::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The pool: bounded connections, idle ones reused.
pub struct HotRedis {
    address: Address,
    /// `AUTH` (username, password) and `SELECT` db sent on each new connection.
    setup: Option<Vec<u8>>,
    setup_replies: usize,
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
    idle_max: usize,
    timeout: Duration,
}

impl std::fmt::Debug for HotRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotRedis")
            .field("address", &self.address)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HotRedis {
    /// A pool for the Redis `client` points at (its address, credentials and db), with at
    /// most `max_connections` open; a round trip (connecting included) gives up after
    /// `timeout`. Builds no connection: the first call connects.
    pub fn new(
        client: &redis::Client,
        max_connections: usize,
        timeout: Duration,
    ) -> Result<Self, HotRedisError> {
        let info = client.get_connection_info();
        let address = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => Address::Tcp(host.clone(), *port),
            redis::ConnectionAddr::Unix(path) => Address::Unix(path.clone()),
            _ => return Err(HotRedisError::Unsupported("TLS Redis URL")),
        };
        let settings = info.redis_settings();
        let mut setup = redis::pipe();
        let mut setup_replies = 0;
        if let Some(password) = settings.password() {
            let auth = setup.cmd("AUTH");
            if let Some(username) = settings.username() {
                auth.arg(username);
            }
            auth.arg(password);
            setup_replies += 1;
        }
        if settings.db() != 0 {
            setup.cmd("SELECT").arg(settings.db());
            setup_replies += 1;
        }
        let max_connections = max_connections.max(1);
        Ok(Self {
            address,
            setup: (setup_replies > 0).then(|| setup.get_packed_pipeline()),
            setup_replies,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(max_connections),
            idle_max: max_connections,
            timeout,
        })
    }

    /// Sends `pipeline` and returns one reply per command, in order. Error replies come
    /// back as [`Reply::Error`] (the caller decides); a connection, timeout or protocol
    /// failure is an error and the connection is dropped.
    pub async fn query(&self, pipeline: &redis::Pipeline) -> Result<Vec<Reply>, HotRedisError> {
        if pipeline.is_transaction() {
            return Err(HotRedisError::Unsupported("MULTI/EXEC pipeline"));
        }
        let packed = pipeline.get_packed_pipeline();
        let count = pipeline.len();
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| HotRedisError::Closed)?;
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let call = async {
            let mut connection = match pooled {
                Some(connection) => connection,
                None => self.connect().await?,
            };
            let replies = connection.round_trip(&packed, count).await?;
            Ok::<_, HotRedisError>((connection, replies))
        };
        // Dropped on timeout or error (and on cancellation): never reused mid-reply.
        let (connection, replies) = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| HotRedisError::Timeout(self.timeout))??;
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.idle_max {
            idle.push(connection);
        }
        Ok(replies)
    }

    /// [`HotRedis::new`] with the default bound and timeout.
    pub fn with_defaults(client: &redis::Client) -> Result<Self, HotRedisError> {
        Self::new(
            client,
            CONNECTIONS_DEFAULT,
            Duration::from_millis(TIMEOUT_DEFAULT_MS),
        )
    }

    async fn connect(&self) -> Result<Connection, HotRedisError> {
        let failed = |source| HotRedisError::Connect {
            addr: self.address.to_string(),
            source,
        };
        let stream = match &self.address {
            Address::Tcp(host, port) => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(failed)?;
                stream.set_nodelay(true).map_err(failed)?;
                Stream::Tcp(stream)
            }
            Address::Unix(path) => Stream::Unix(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(failed)?,
            ),
        };
        let mut connection = Connection {
            stream,
            buffer: BytesMut::with_capacity(READ_CHUNK),
        };
        if let Some(setup) = &self.setup {
            for reply in connection.round_trip(setup, self.setup_replies).await? {
                if let Reply::Error(message) = reply {
                    return Err(HotRedisError::Setup(message));
                }
            }
        }
        Ok(connection)
    }
}

/// The end offset of `count` complete replies at the start of `buf`, or None when more
/// bytes are needed. Bulk strings are skipped by their length, so a re-scan after each
/// read costs the number of values, not the bytes.
pub fn scan_replies(buf: &[u8], count: usize) -> Result<Option<usize>, HotRedisError> {
    let mut position = 0;
    for _ in 0..count {
        match scan_value(buf, position, 0)? {
            Some(end) => position = end,
            None => return Ok(None),
        }
    }
    Ok(Some(position))
}

/// One line (`\r\n`-terminated) from `position`: its content and the offset after it.
fn line(buf: &[u8], position: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(position..)?;
    let newline = memchr::memchr(b'\n', rest)?;
    let content = rest[..newline]
        .strip_suffix(b"\r")
        .unwrap_or(&rest[..newline]);
    Some((content, position + newline + 1))
}

fn integer(text: &[u8]) -> Result<i64, HotRedisError> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', digits)) => (true, digits),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 18 {
        return Err(HotRedisError::Protocol("bad integer"));
    }
    let mut value: i64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return Err(HotRedisError::Protocol("bad integer"));
        }
        value = value * 10 + i64::from(digit - b'0');
    }
    Ok(if negative { -value } else { value })
}

fn scan_value(buf: &[u8], position: usize, depth: usize) -> Result<Option<usize>, HotRedisError> {
    if depth > DEPTH_MAX {
        return Err(HotRedisError::Protocol("arrays nested too deep"));
    }
    let Some((header, after)) = line(buf, position) else {
        return Ok(None);
    };
    let (&kind, rest) = header
        .split_first()
        .ok_or(HotRedisError::Protocol("empty reply line"))?;
    match kind {
        b'+' | b'-' => Ok(Some(after)),
        b':' => integer(rest).map(|_| Some(after)),
        b'$' => {
            let length = integer(rest)?;
            if length < 0 {
                return Ok(Some(after));
            }
            let end = after + length as usize + 2;
            Ok((buf.len() >= end).then_some(end))
        }
        b'*' => {
            let length = integer(rest)?;
            let mut position = after;
            for _ in 0..length.max(0) {
                match scan_value(buf, position, depth + 1)? {
                    Some(end) => position = end,
                    None => return Ok(None),
                }
            }
            Ok(Some(position))
        }
        _ => Err(HotRedisError::Protocol("unknown reply type")),
    }
}

/// Parses `count` replies from `frame`, which [`scan_replies`] found complete.
pub fn parse_replies(frame: &Bytes, count: usize) -> Result<Vec<Reply>, HotRedisError> {
    let mut position = 0;
    let mut replies = Vec::with_capacity(count);
    for _ in 0..count {
        let (reply, end) = parse_value(frame, position)?;
        replies.push(reply);
        position = end;
    }
    Ok(replies)
}

fn parse_value(frame: &Bytes, position: usize) -> Result<(Reply, usize), HotRedisError> {
    let incomplete = HotRedisError::Protocol("reply shorter than scanned");
    let (header, after) = line(frame, position).ok_or(incomplete)?;
    let (&kind, rest) = header
        .split_first()
        .ok_or(HotRedisError::Protocol("empty reply line"))?;
    let content = |from: usize, to: usize| frame.slice(from..to);
    Ok(match kind {
        b'+' => (
            Reply::Status(content(position + 1, position + 1 + rest.len())),
            after,
        ),
        b'-' => (
            Reply::Error(String::from_utf8_lossy(rest).into_owned()),
            after,
        ),
        b':' => (Reply::Int(integer(rest)?), after),
        b'$' => {
            let length = integer(rest)?;
            if length < 0 {
                return Ok((Reply::Nil, after));
            }
            let end = after + length as usize;
            if frame.get(end..end + 2) != Some(b"\r\n") {
                return Err(HotRedisError::Protocol("bulk string without its CRLF"));
            }
            (Reply::Bulk(content(after, end)), end + 2)
        }
        b'*' => {
            let length = integer(rest)?;
            if length < 0 {
                return Ok((Reply::Nil, after));
            }
            let mut items = Vec::with_capacity(length as usize);
            let mut position = after;
            for _ in 0..length {
                let (item, end) = parse_value(frame, position)?;
                items.push(item);
                position = end;
            }
            (Reply::Array(items), position)
        }
        _ => return Err(HotRedisError::Protocol("unknown reply type")),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const REPLIES: &[u8] =
        b":1\r\n*2\r\n$5\r\nhello\r\n$-1\r\n+OK\r\n-WRONGTYPE no\r\n*-1\r\n$0\r\n\r\n";

    #[test]
    fn replies_are_sliced_out_of_the_frame() {
        let end = scan_replies(REPLIES, 6).unwrap().expect("complete");
        assert_eq!(end, REPLIES.len());
        let frame = Bytes::from_static(REPLIES);
        let replies = parse_replies(&frame, 6).unwrap();
        assert_eq!(
            replies,
            vec![
                Reply::Int(1),
                Reply::Array(vec![Reply::Bulk(Bytes::from_static(b"hello")), Reply::Nil]),
                Reply::Status(Bytes::from_static(b"OK")),
                Reply::Error("WRONGTYPE no".into()),
                Reply::Nil,
                Reply::Bulk(Bytes::new()),
            ]
        );
    }

    #[test]
    fn every_cut_short_of_the_end_asks_for_more() {
        for cut in 0..REPLIES.len() {
            assert_eq!(
                scan_replies(&REPLIES[..cut], 6).unwrap(),
                None,
                "cut at {cut}"
            );
        }
        // Fewer replies than there are: the end of the ones asked for.
        assert_eq!(scan_replies(REPLIES, 1).unwrap(), Some(4));
    }

    #[test]
    fn garbage_is_an_error_not_a_hang() {
        assert!(scan_replies(b"?what\r\n", 1).is_err());
        assert!(scan_replies(b"$x\r\n", 1).is_err());
        assert!(scan_replies(b":99999999999999999999\r\n", 1).is_err());
        let deep = "*1\r\n".repeat(DEPTH_MAX + 2);
        assert!(scan_replies(deep.as_bytes(), 1).is_err());
        let frame = Bytes::from_static(b"$3\r\nabcd\r\n");
        assert!(parse_replies(&frame, 1).is_err());
    }

    #[test]
    fn typed_views_of_replies() {
        assert!(Reply::Int(1).into_bool().unwrap());
        assert!(Reply::Int(-1).into_u64().is_err());
        assert!(matches!(
            Reply::Error("ERR x".into()).into_u64(),
            Err(HotRedisError::Server(_))
        ));
        let scores = Reply::Array(vec![
            Reply::Bulk(Bytes::from_static(b"3")),
            Reply::Nil,
            Reply::Bulk(Bytes::from_static(b"inf")),
        ]);
        assert_eq!(
            scores.into_optional_numbers().unwrap(),
            vec![Some(3.0), None, Some(f64::INFINITY)]
        );
        assert!(Reply::Array(vec![Reply::Nil]).into_bulks().is_err());
    }
}
