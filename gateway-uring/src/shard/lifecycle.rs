//! The steps every client connection takes whatever its transport (shard-local): claiming
//! a node-wide connection slot, reading the socket under a deadline (the handshake, then
//! the heartbeat), authenticating, joining the shard's connection table with a writer task,
//! and leaving it. `ws_conn.rs` and `tcp_conn.rs` add only what their wire format needs.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use chatify_core::routing::unix_now_ms;

use bytes::BytesMut;
use monoio::buf::IoBuf;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt as _, OwnedWriteHalf};
use monoio::net::TcpStream;

use super::connection::CloseReason;
use super::writer::{self, Framing, OutboundQueue};
use super::{ConnectionSlot, LiveConnection, Shard};
use crate::auth::{AuthError, Identity};
use crate::redis_bridge::Admission;

/// Bytes reserved ahead of each read.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Claims one of the node's connection slots. When the node is full, the refusal is counted
/// and `refusal()` (the transport's way of saying so) is written before giving up.
pub(super) async fn claim_slot<B: IoBuf>(
    shard: &Shard,
    stream: &mut TcpStream,
    refusal: impl FnOnce() -> B,
) -> Option<ConnectionSlot> {
    let slot = shard.node.try_claim(shard.limits.connections_max);
    if slot.is_none() {
        metrics::counter!("chatify_gateway_refusals_total", "reason" => "connections_max")
            .increment(1);
        let _ = stream.write_all(refusal()).await;
    }
    slot
}

/// How a read under a deadline ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReadEnd {
    /// More bytes are in the buffer.
    Data,
    /// Nothing arrived in time.
    TimedOut,
    /// The peer closed or the socket failed.
    Closed,
}

/// Reads more bytes into the spare capacity of `buffer` (after what it holds), waiting at
/// most `timeout`.
pub(super) async fn read_more_within<R: AsyncReadRent>(
    reader: &mut R,
    buffer: &mut BytesMut,
    timeout: Duration,
) -> ReadEnd {
    use monoio::buf::IoBufMut as _;
    // The buffer is owned by the read while it runs (io_uring) and handed back after.
    let mut owned = std::mem::take(buffer);
    owned.reserve(READ_CHUNK_BYTES);
    let start = owned.len();
    let end = owned.capacity();
    let read = reader.read(owned.slice_mut(start..end));
    let Ok((result, slice)) = monoio::time::timeout(timeout, read).await else {
        return ReadEnd::TimedOut;
    };
    *buffer = slice.into_inner();
    match result {
        Ok(0) | Err(_) => ReadEnd::Closed,
        Ok(_) => ReadEnd::Data,
    }
}

/// Reads after the handshake: a connection silent for the heartbeat timeout is counted and
/// reported as [`ReadEnd::TimedOut`].
pub(super) async fn read_or_heartbeat_timeout<R: AsyncReadRent>(
    shard: &Shard,
    reader: &mut R,
    buffer: &mut BytesMut,
) -> ReadEnd {
    let end = read_more_within(reader, buffer, shard.heartbeat_timeout()).await;
    if end == ReadEnd::TimedOut {
        metrics::counter!("chatify_gateway_refusals_total", "reason" => "heartbeat_timeout")
            .increment(1);
    }
    end
}

/// Why the handshake produced nothing to go on with.
#[derive(Debug)]
pub(super) enum HandshakeFailure<E> {
    /// The decoder refused what arrived.
    Invalid(E),
    /// The handshake deadline passed (counted as `handshake_timeout`).
    TimedOut,
    /// The peer left before finishing.
    Closed,
}

/// Runs `decode` over `buffer` until it yields the handshake (the upgrade request, the TCP
/// `auth` frame), reading more as needed, all within the shard's handshake timeout so a
/// slow client (slowloris) cannot hold a slot.
pub(super) async fn read_handshake<T, E>(
    shard: &Shard,
    stream: &mut TcpStream,
    buffer: &mut BytesMut,
    mut decode: impl FnMut(&mut BytesMut) -> Result<Option<T>, E>,
) -> Result<T, HandshakeFailure<E>> {
    let deadline = Instant::now() + shard.handshake_timeout();
    loop {
        if let Some(decoded) = decode(buffer).map_err(HandshakeFailure::Invalid)? {
            return Ok(decoded);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match read_more_within(stream, buffer, left).await {
            ReadEnd::Data => {}
            ReadEnd::TimedOut => {
                metrics::counter!("chatify_gateway_refusals_total", "reason" => "handshake_timeout")
                    .increment(1);
                return Err(HandshakeFailure::TimedOut);
            }
            ReadEnd::Closed => return Err(HandshakeFailure::Closed),
        }
    }
}

/// Verifies the token (algorithm, signature, expiry, claims). The deny-list is checked by
/// [`admit`], in the same Redis round trip that registers the route. A refusal is counted
/// by its reason.
pub(super) fn verify(shard: &Shard, token: &str) -> Result<Identity, AuthError> {
    let verified = shard.auth.verify(token);
    if let Err(error) = &verified {
        metrics::counter!("chatify_gateway_refusals_total", "reason" => error.label()).increment(1);
    }
    verified
}

/// A verified, admitted connection: in the shard's tables (pushes queue up for it), its
/// route registered, its token not revoked. Nothing is written to the socket until
/// [`Admitted::start`], so the handshake answer always goes out first.
pub(super) struct Admitted {
    pub(super) live: Rc<LiveConnection>,
    slot: ConnectionSlot,
}

/// Gives a verified connection its id and outbound queue, enters it in the shard's tables,
/// then checks the deny-list and registers its route in one Redis round trip (fails
/// closed: Redis down refuses the connection as unavailable).
pub(super) async fn admit(
    shard: &Shard,
    identity: Identity,
    framing: Framing,
    slot: ConnectionSlot,
) -> Result<Admitted, AuthError> {
    let connection_id = shard.next_connection_id();
    let now_ms = unix_now_ms();
    let live = Rc::new(LiveConnection {
        connection_id,
        queue: OutboundQueue::new(framing, shard.limits.send_queue_frames_max),
        identity,
        connected_at_ms: now_ms,
        push_binary: Cell::new(framing == Framing::Tcp),
        last_active_ms: Cell::new(now_ms),
    });
    // Entered before the route exists, so no push addressed to the new route can miss it.
    shard.insert_connection(Rc::clone(&live));
    let refusal = match shard.redis.connect(live.route_entry()).await {
        Ok(Admission::Admitted) => return Ok(Admitted { live, slot }),
        Ok(Admission::Revoked) => AuthError::Revoked,
        Err(_) => AuthError::Unavailable,
    };
    shard.remove_connection(connection_id);
    metrics::counter!("chatify_gateway_refusals_total", "reason" => refusal.label()).increment(1);
    Err(refusal)
}

impl Admitted {
    /// Starts the writer task: from now on queued frames (pushes that arrived during the
    /// handshake first) go to the socket.
    pub(super) fn start(self, write_half: OwnedWriteHalf<TcpStream>) -> Registered {
        let writer = monoio::spawn(writer::run(self.live.queue.clone(), write_half));
        Registered {
            live: self.live,
            writer,
            _slot: self.slot,
        }
    }

    /// Gives up before the writer started (the handshake answer could not be written).
    pub(super) fn abandon(self, shard: &Shard) {
        shard.remove_connection(self.live.connection_id);
        shard.redis.disconnect(self.live.route_entry());
    }
}

/// A connection in the shard's table, its writer task draining the queue to the socket.
pub(super) struct Registered {
    pub(super) live: Rc<LiveConnection>,
    writer: monoio::task::JoinHandle<()>,
    _slot: ConnectionSlot,
}

impl Registered {
    /// Sends the close (a close frame on WebSocket; TCP just ends), waits for the writer to
    /// finish, leaves the shard's tables, removes the route and frees the slot. `reader`
    /// goes first so the socket closes as soon as the writer lets go of it.
    pub(super) async fn close<R>(self, shard: &Shard, reason: CloseReason, reader: R) {
        // A slow reader's pending frames are dropped so the close goes out at once.
        let slow = reason.reason == "slow consumer";
        self.live.queue.close_with(reason.code, reason.reason, slow);
        drop(reader);
        self.writer.await;
        shard.remove_connection(self.live.connection_id);
        shard.redis.disconnect(self.live.route_entry());
    }
}
