//! The cache-hit read's own Redis client: each page's commands are one pipeline, several
//! concurrent pages' pipelines go to Redis in one write on a shared connection, and the
//! replies are parsed in place.
//!
//! Why ours rather than redis-rs here (STYLE: a library unless the hot path needs ours):
//! a cache-hit page is one pipeline of ≈ 4 commands whose replies hold ≈ 60 values, 51 of
//! them the cached messages (≈ 10 KB). redis-rs parses each value with `combine` into an
//! owned `redis::Value` (one allocation and copy per entry), then `FromRedisValue` copies
//! each again: together with its driver ≈ 26 % of the reader's CPU per cache-hit page
//! (profile in docs/BENCHMARKS.md). Here the replies are first scanned for completeness
//! and then sliced out of the one read buffer (`Bytes`, no copy: a cached entry goes from
//! the socket buffer into the gRPC response as is). Everything else the reader asks Redis
//! stays on redis-rs; the pipelines are still built and encoded with `redis::Pipeline`.
//!
//! Connections ("lanes"): `connections` of them, each owned by one driver task (spawned on
//! first use). A call is queued on the next lane (round robin) and waits for its replies.
//! The driver takes every call queued by the time it is free (at most
//! [`BATCH_CALLS_MAX`]), writes their pipelines in one write and hands each call its own
//! replies in order. So under load Redis reads and answers many pages per socket event,
//! and the reader pays one `send` and one `recv` per batch rather than per page (a
//! connection per call cost Redis 2–3× the raw read's CPU per page). A call that times out
//! or is cancelled just stops waiting: its replies are still read off the connection and
//! dropped, so they can never be taken for another call's. A batch that fails (I/O error,
//! timeout, a reply that is not RESP) fails every call in it and drops the connection; the
//! next batch connects again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{mpsc, oneshot};

/// Default connections (lanes) the calls are spread over.
pub const CONNECTIONS_DEFAULT: usize = 2;
/// Default wait for a round trip, connecting included, in ms.
pub const TIMEOUT_DEFAULT_MS: u64 = 2000;
/// Most calls one write carries.
pub const BATCH_CALLS_MAX: usize = 64;
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

impl HotRedisError {
    /// The same error for another call of a failed batch (`std::io::Error` is not `Clone`:
    /// its kind and message are kept).
    fn duplicate(&self) -> Self {
        let io = |error: &std::io::Error| std::io::Error::new(error.kind(), error.to_string());
        match self {
            Self::Connect { addr, source } => Self::Connect {
                addr: addr.clone(),
                source: io(source),
            },
            Self::Io(error) => Self::Io(io(error)),
            Self::Closed => Self::Closed,
            Self::Timeout(after) => Self::Timeout(*after),
            Self::Protocol(what) => Self::Protocol(what),
            Self::Setup(message) => Self::Setup(message.clone()),
            Self::Type { wanted, got } => Self::Type {
                wanted,
                got: got.clone(),
            },
            Self::Server(message) => Self::Server(message.clone()),
            Self::Unsupported(what) => Self::Unsupported(what),
        }
    }
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
    /// Reads the next `count` replies (all of them complete before any is parsed).
    async fn read_replies(&mut self, count: usize) -> Result<Vec<Reply>, HotRedisError> {
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

/// What a driver needs to (re)connect and how long a batch may take.
#[derive(Debug)]
struct Target {
    address: Address,
    /// `AUTH` (username, password) and `SELECT` db sent on each new connection.
    setup: Option<Vec<u8>>,
    setup_replies: usize,
    timeout: Duration,
}

/// One queued call: its encoded pipeline, how many replies it expects, where they go.
struct Call {
    packed: Vec<u8>,
    count: usize,
    answer: oneshot::Sender<Result<Vec<Reply>, HotRedisError>>,
}

/// The client: `connections` lanes, each a queue drained by its driver task.
pub struct HotRedis {
    target: Arc<Target>,
    lanes: Box<[OnceLock<mpsc::UnboundedSender<Call>>]>,
    next: AtomicUsize,
}

impl std::fmt::Debug for HotRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotRedis")
            .field("address", &self.target.address)
            .field("connections", &self.lanes.len())
            .field("timeout", &self.target.timeout)
            .finish_non_exhaustive()
    }
}

impl HotRedis {
    /// A client for the Redis `client` points at (its address, credentials and db), over
    /// `connections` connections; a call (connecting included) gives up after `timeout`.
    /// Builds no connection: each lane's driver starts, and connects, on its first call
    /// (so this may run outside a tokio runtime; calls must run inside one).
    pub fn new(
        client: &redis::Client,
        connections: usize,
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
        Ok(Self {
            target: Arc::new(Target {
                address,
                setup: (setup_replies > 0).then(|| setup.get_packed_pipeline()),
                setup_replies,
                timeout,
            }),
            lanes: (0..connections.max(1)).map(|_| OnceLock::new()).collect(),
            next: AtomicUsize::new(0),
        })
    }

    /// [`HotRedis::new`] with the default connections and timeout.
    pub fn with_defaults(client: &redis::Client) -> Result<Self, HotRedisError> {
        Self::new(
            client,
            CONNECTIONS_DEFAULT,
            Duration::from_millis(TIMEOUT_DEFAULT_MS),
        )
    }

    /// Sends `pipeline` and returns one reply per command, in order. Error replies come
    /// back as [`Reply::Error`] (the caller decides); a connection, timeout or protocol
    /// failure is an error.
    pub async fn query(&self, pipeline: &redis::Pipeline) -> Result<Vec<Reply>, HotRedisError> {
        if pipeline.is_transaction() {
            return Err(HotRedisError::Unsupported("MULTI/EXEC pipeline"));
        }
        let (answer, answered) = oneshot::channel();
        let call = Call {
            packed: pipeline.get_packed_pipeline(),
            count: pipeline.len(),
            answer,
        };
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        let lane = self.lanes[turn].get_or_init(|| {
            let (calls, queued) = mpsc::unbounded_channel();
            tokio::spawn(drive(Arc::clone(&self.target), queued));
            calls
        });
        lane.send(call).map_err(|_| HotRedisError::Closed)?;
        let timeout = self.target.timeout;
        match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(replies)) => replies,
            // The driver is gone (the runtime is shutting down).
            Ok(Err(_)) => Err(HotRedisError::Closed),
            Err(_) => Err(HotRedisError::Timeout(timeout)),
        }
    }
}

/// A lane's driver: batches of queued calls, one write and their replies in order each,
/// until every sender is gone.
async fn drive(target: Arc<Target>, mut queued: mpsc::UnboundedReceiver<Call>) {
    let mut connection: Option<Connection> = None;
    let mut batch: Vec<Call> = Vec::with_capacity(BATCH_CALLS_MAX);
    let mut packed = Vec::new();
    while queued.recv_many(&mut batch, BATCH_CALLS_MAX).await > 0 {
        // Calls whose caller stopped waiting are not sent at all.
        batch.retain(|call| !call.answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        packed.clear();
        for call in &batch {
            packed.extend_from_slice(&call.packed);
        }
        // Answered from the end: the calls left in `batch` are the ones still waiting.
        batch.reverse();
        let round_trip = async {
            let mut open = match connection.take() {
                Some(open) => open,
                None => target.connect().await?,
            };
            open.stream.write_all(&packed).await?;
            while let Some(count) = batch.last().map(|call| call.count) {
                let replies = open.read_replies(count).await?;
                if let Some(call) = batch.pop() {
                    // A caller that stopped waiting drops its replies here.
                    let _ = call.answer.send(Ok(replies));
                }
            }
            Ok::<_, HotRedisError>(open)
        };
        match tokio::time::timeout(target.timeout, round_trip).await {
            Ok(Ok(open)) => connection = Some(open),
            Ok(Err(error)) => fail(&mut batch, &error),
            Err(_) => fail(&mut batch, &HotRedisError::Timeout(target.timeout)),
        }
        batch.clear();
    }
}

/// Fails the calls of a batch not answered yet (the connection is dropped: the next batch
/// connects again, so no late reply is ever read as another call's).
fn fail(batch: &mut Vec<Call>, error: &HotRedisError) {
    for call in batch.drain(..) {
        let _ = call.answer.send(Err(error.duplicate()));
    }
}

impl Target {
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
            connection.stream.write_all(setup).await?;
            for reply in connection.read_replies(self.setup_replies).await? {
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
