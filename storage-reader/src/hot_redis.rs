//! The cache-hit read's own Redis client: pipelines of concurrent pages combined into one
//! write and one read on a few shared connections, replies parsed in place.
//!
//! Why ours rather than redis-rs here (STYLE: a library unless the hot path needs ours):
//! a cache-hit page is one pipeline of ≈ 5 commands whose replies hold ≈ 60 values, 51 of
//! them the cached messages (≈ 10 KB). redis-rs parses each value with `combine` into an
//! owned `redis::Value` (one allocation and copy per entry), then `FromRedisValue` copies
//! each again, and its multiplexed connection hands every call to a driver task through
//! channels: together ≈ 26 % of the reader's CPU per cache-hit page (profile in
//! docs/BENCHMARKS.md). Here replies are first scanned for completeness and then sliced out
//! of the one read buffer (`Bytes`, no copy: a cached entry goes from the socket buffer into
//! the gRPC response as is). Everything else the reader asks Redis stays on redis-rs; the
//! pipelines are still built and encoded with `redis::Pipeline`.
//!
//! Connections (lanes): `lanes` connections, each shared by flat combining. A call queues
//! its pipeline on a lane; the calling task that finds the lane free becomes its driver: it
//! writes every queued pipeline in one `send`, reads their replies in order, hands each to
//! its caller, then passes the lane to the first call that queued meanwhile (which drives
//! the next batch) or leaves it free. No task sits between a caller and Redis, and under
//! load Redis and the reader pay one `send`/`recv` and one wake-up per batch rather than
//! per page. A driver cancelled mid-batch (its caller gone, or timed out) leaves the batch
//! to a spawned task that reads it to the end, so the other callers still get their
//! replies and no late reply is ever read as another call's; a connection that failed,
//! timed out or broke the protocol fails its batch's calls and is dropped, never reused.
//! Blocking commands (BLPOP and the like) would hold up their lane: the reader sends none.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Default connections (lanes) to Redis: 1 and 2 measured alike (docs/BENCHMARKS.md); two
/// let both of a small reader's threads drive at once.
pub const CONNECTIONS_DEFAULT: usize = 2;
/// Default wait for a round trip, connecting and queueing included, in ms.
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

impl HotRedisError {
    /// The same failure for another call of the failed batch (`io::Error` is not `Clone`).
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

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Stream {
    /// Cancel-safe: on cancellation nothing was written.
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.write(bytes).await,
            Stream::Unix(stream) => stream.write(bytes).await,
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.write_all(bytes).await,
            Stream::Unix(stream) => stream.write_all(bytes).await,
        }
    }

    /// Cancel-safe: on cancellation nothing was read.
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
    /// The bytes of one call's `count` replies, read on from the buffer and checked
    /// complete (parsing is left to the caller, on its own thread). Cancel-safe: bytes read
    /// stay in the buffer.
    async fn frame(&mut self, count: usize) -> Result<Bytes, HotRedisError> {
        loop {
            if let Some(end) = scan_replies(&self.buffer, count)? {
                return Ok(self.buffer.split_to(end).freeze());
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

/// How every lane connects.
struct Dial {
    address: Address,
    /// `AUTH` (username, password) and `SELECT` db sent on each new connection.
    setup: Option<Vec<u8>>,
    setup_replies: usize,
    timeout: Duration,
}

impl Dial {
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
            let frame = connection.frame(self.setup_replies).await?;
            for reply in parse_replies(&frame, self.setup_replies)? {
                if let Reply::Error(message) = reply {
                    return Err(HotRedisError::Setup(message));
                }
            }
        }
        Ok(connection)
    }
}

/// Where one call stands.
enum Outcome {
    /// Queued or in flight; the waker of the task waiting for it.
    Waiting(Option<Waker>),
    /// Its task is to drive the lane's next batch.
    Drive,
    /// The call's replies, unparsed, or why the batch failed.
    Done(Result<Bytes, HotRedisError>),
    Taken,
}

/// One caller's pipeline.
struct Call {
    packed: Vec<u8>,
    count: usize,
    outcome: Mutex<Outcome>,
}

impl Call {
    fn outcome(&self) -> MutexGuard<'_, Outcome> {
        self.outcome.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the outcome and wakes the waiting task.
    fn settle(&self, outcome: Outcome) {
        let waker = match std::mem::replace(&mut *self.outcome(), outcome) {
            Outcome::Waiting(waker) => waker,
            _ => None,
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// A lane's state between batches. Lock order: a lane's state, then a call's outcome.
struct LaneState {
    /// Calls not yet written, in arrival order.
    queued: VecDeque<Arc<Call>>,
    /// Someone drives the lane (a batch is in flight, or a call was told to drive next).
    driving: bool,
    /// The lane's connection while nobody drives (None: the next batch connects).
    connection: Option<Connection>,
    /// The batch write buffer, kept for reuse.
    out: Vec<u8>,
}

/// One shared connection and its queue.
struct Lane {
    dial: Arc<Dial>,
    state: Mutex<LaneState>,
    /// `state.driving`, readable without the lock: a hint for picking a free lane.
    busy: AtomicBool,
}

impl Lane {
    fn state(&self) -> MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `call`; when the lane is free, its caller is to drive.
    fn enqueue(&self, call: &Arc<Call>) {
        let mut state = self.state();
        state.queued.push_back(call.clone());
        if !state.driving {
            state.driving = true;
            self.busy.store(true, Ordering::Relaxed);
            *call.outcome() = Outcome::Drive;
        }
    }

    /// Hands the drive to the first queued call, or frees the lane.
    fn pass_on(&self, state: &mut LaneState) {
        match state.queued.front() {
            Some(next) => next.settle(Outcome::Drive),
            None => {
                state.driving = false;
                self.busy.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Takes the drive for `call` (told to drive) and everything queued as one batch.
    fn start_batch(self: &Arc<Self>, call: &Call) -> Batch {
        let mut state = self.state();
        *call.outcome() = Outcome::Waiting(None);
        let calls: Vec<Arc<Call>> = state.queued.drain(..).collect();
        let connection = state.connection.take();
        let mut out = std::mem::take(&mut state.out);
        drop(state);
        metrics::histogram!("chatify_reader_redis_batch_calls").record(calls.len() as f64);
        out.clear();
        for call in &calls {
            out.extend_from_slice(&call.packed);
        }
        Batch {
            lane: self.clone(),
            connection,
            calls,
            out,
            written: 0,
            answered: 0,
            released: false,
            adopted: false,
        }
    }
}

/// A batch in flight on a lane, and the drive of the lane until it is released. Every
/// step is cancel-safe and its progress kept here, so a dropped driver's batch can be
/// finished by another task (see `Drop`).
struct Batch {
    lane: Arc<Lane>,
    connection: Option<Connection>,
    calls: Vec<Arc<Call>>,
    out: Vec<u8>,
    /// Bytes of `out` written.
    written: usize,
    /// Calls answered, in order.
    answered: usize,
    released: bool,
    /// Owned by the task finishing a dropped driver's batch: dropped in turn (its runtime
    /// shutting down), it fails the rest rather than spawning again.
    adopted: bool,
}

impl Batch {
    /// Writes the batch and answers its calls; on failure, fails the rest and drops the
    /// connection.
    async fn exchange(&mut self) {
        if let Err(error) = self.try_exchange().await {
            self.fail(&error);
        }
    }

    async fn try_exchange(&mut self) -> Result<(), HotRedisError> {
        let connection = match &mut self.connection {
            Some(connection) => connection,
            None => self.connection.insert(self.lane.dial.connect().await?),
        };
        while self.written < self.out.len() {
            match connection.stream.write(&self.out[self.written..]).await? {
                0 => return Err(HotRedisError::Closed),
                n => self.written += n,
            }
        }
        while let Some(call) = self.calls.get(self.answered) {
            let frame = connection.frame(call.count).await?;
            call.settle(Outcome::Done(Ok(frame)));
            self.answered += 1;
        }
        Ok(())
    }

    fn fail(&mut self, error: &HotRedisError) {
        for call in &self.calls[self.answered..] {
            call.settle(Outcome::Done(Err(error.duplicate())));
        }
        self.answered = self.calls.len();
        self.connection = None;
    }

    /// Returns the connection (if still good) and passes the drive on.
    fn release(&mut self) {
        self.released = true;
        let mut state = self.lane.state();
        state.connection = self.connection.take();
        state.out = std::mem::take(&mut self.out);
        self.lane.pass_on(&mut state);
    }
}

impl Drop for Batch {
    /// A driver dropped mid-batch: a spawned task reads the batch to the end (bounded by
    /// the timeout) so its other calls get their replies; with no runtime to spawn on, or
    /// when the finishing task itself is dropped, the rest fail and the connection is
    /// dropped. Either way the drive is passed on.
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if self.answered == self.calls.len() {
            // Nothing in flight: the connection is still good.
            self.release();
            return;
        }
        if !self.adopted
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let mut rest = Batch {
                lane: self.lane.clone(),
                connection: self.connection.take(),
                calls: std::mem::take(&mut self.calls),
                out: std::mem::take(&mut self.out),
                written: self.written,
                answered: self.answered,
                released: false,
                adopted: true,
            };
            self.released = true;
            let timeout = rest.lane.dial.timeout;
            runtime.spawn(async move {
                if tokio::time::timeout(timeout, rest.exchange())
                    .await
                    .is_err()
                {
                    rest.fail(&HotRedisError::Timeout(timeout));
                }
                rest.release();
            });
            return;
        }
        self.fail(&HotRedisError::Closed);
        self.release();
    }
}

/// A caller's hold on its queued call: dropped before the call is answered, it withdraws
/// the call from the queue, and passes the drive on if it was told to drive.
struct Ticket<'a> {
    lane: &'a Arc<Lane>,
    call: Arc<Call>,
}

impl Ticket<'_> {
    /// The call's reply frame, driving the lane whenever told to.
    async fn outcome(&self) -> Result<Bytes, HotRedisError> {
        loop {
            let next = std::future::poll_fn(|context| {
                let mut outcome = self.call.outcome();
                match std::mem::replace(&mut *outcome, Outcome::Taken) {
                    Outcome::Done(result) => Poll::Ready(ControlFlow::Break(result)),
                    Outcome::Drive => {
                        *outcome = Outcome::Drive;
                        Poll::Ready(ControlFlow::Continue(()))
                    }
                    Outcome::Waiting(_) => {
                        *outcome = Outcome::Waiting(Some(context.waker().clone()));
                        Poll::Pending
                    }
                    Outcome::Taken => Poll::Ready(ControlFlow::Break(Err(HotRedisError::Closed))),
                }
            })
            .await;
            if let ControlFlow::Break(result) = next {
                return result;
            }
            // Group commit: let the tasks already woken on this thread (the other requests
            // of the same read off a gRPC connection, say) queue their calls first, so
            // they go out in this batch rather than waiting a whole round trip for the
            // next. Cancel-safe: dropped here, the ticket passes the drive on.
            tokio::task::yield_now().await;
            let mut batch = self.lane.start_batch(&self.call);
            batch.exchange().await;
            batch.release();
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        // Taken is final and set only by this ticket's task: no lane lock needed.
        if matches!(*self.call.outcome(), Outcome::Taken) {
            return;
        }
        let mut state = self.lane.state();
        let outcome = std::mem::replace(&mut *self.call.outcome(), Outcome::Taken);
        if matches!(outcome, Outcome::Waiting(_) | Outcome::Drive) {
            state
                .queued
                .retain(|queued| !Arc::ptr_eq(queued, &self.call));
        }
        if matches!(outcome, Outcome::Drive) {
            self.lane.pass_on(&mut state);
        }
    }
}

/// The client: a few lanes, each one connection shared by flat combining.
pub struct HotRedis {
    lanes: Box<[Arc<Lane>]>,
    next_lane: AtomicUsize,
    timeout: Duration,
}

impl std::fmt::Debug for HotRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotRedis")
            .field("address", &self.lanes[0].dial.address)
            .field("lanes", &self.lanes.len())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HotRedis {
    /// A client for the Redis `client` points at (its address, credentials and db), with
    /// `lanes` connections; a call (queueing and connecting included) gives up after
    /// `timeout`. Builds no connection: the first call on a lane connects it.
    pub fn new(
        client: &redis::Client,
        lanes: usize,
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
        let dial = Arc::new(Dial {
            address,
            setup: (setup_replies > 0).then(|| setup.get_packed_pipeline()),
            setup_replies,
            timeout,
        });
        let lanes = (0..lanes.max(1))
            .map(|_| {
                Arc::new(Lane {
                    dial: dial.clone(),
                    state: Mutex::new(LaneState {
                        queued: VecDeque::new(),
                        driving: false,
                        connection: None,
                        out: Vec::new(),
                    }),
                    busy: AtomicBool::new(false),
                })
            })
            .collect();
        Ok(Self {
            lanes,
            next_lane: AtomicUsize::new(0),
            timeout,
        })
    }

    /// [`HotRedis::new`] with the default lanes and timeout.
    pub fn with_defaults(client: &redis::Client) -> Result<Self, HotRedisError> {
        Self::new(
            client,
            CONNECTIONS_DEFAULT,
            Duration::from_millis(TIMEOUT_DEFAULT_MS),
        )
    }

    /// A free lane if there is one (a call on it is written at once), else the next in
    /// turn (its call joins the next batch there).
    fn lane(&self) -> &Arc<Lane> {
        let start = self.next_lane.fetch_add(1, Ordering::Relaxed);
        let count = self.lanes.len();
        (0..count)
            .map(|offset| &self.lanes[(start + offset) % count])
            .find(|lane| !lane.busy.load(Ordering::Relaxed))
            .unwrap_or(&self.lanes[start % count])
    }

    /// Sends `pipeline` and returns one reply per command, in order. Error replies come
    /// back as [`Reply::Error`] (the caller decides); a connection, timeout or protocol
    /// failure is an error (and that connection is dropped).
    pub async fn query(&self, pipeline: &redis::Pipeline) -> Result<Vec<Reply>, HotRedisError> {
        if pipeline.is_transaction() {
            return Err(HotRedisError::Unsupported("MULTI/EXEC pipeline"));
        }
        let lane = self.lane();
        let ticket = Ticket {
            lane,
            call: Arc::new(Call {
                packed: pipeline.get_packed_pipeline(),
                count: pipeline.len(),
                outcome: Mutex::new(Outcome::Waiting(None)),
            }),
        };
        lane.enqueue(&ticket.call);
        let frame = tokio::time::timeout(self.timeout, ticket.outcome())
            .await
            .map_err(|_| HotRedisError::Timeout(self.timeout))??;
        parse_replies(&frame, ticket.call.count)
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
