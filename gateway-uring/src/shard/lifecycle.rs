//! The steps every client connection takes whatever its transport (shard-local): claiming
//! a node-wide connection slot, reading the socket under a deadline (the handshake, then
//! the heartbeat), authenticating, joining the shard's connection table with a writer task,
//! and leaving it. `ws_conn.rs` and `tcp_conn.rs` add only what their wire format needs.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::buf::IoBuf;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt as _, OwnedWriteHalf};
use monoio::net::TcpStream;

use super::connection::CloseReason;
use super::writer::{self, Framing, OutboundQueue};
use super::{ConnectionSlot, Shard};
use crate::auth::{AuthError, Identity};

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

/// Verifies the token and checks the deny-list (fails closed when Redis is down). A refusal
/// is counted by its reason.
pub(super) async fn authenticate(shard: &Shard, token: &str) -> Result<Identity, AuthError> {
    let verified = match shard.auth.verify(token) {
        Ok(identity) => match shard.redis.is_revoked(&identity.jti).await {
            Ok(false) => Ok(identity),
            Ok(true) => Err(AuthError::Revoked),
            Err(_) => Err(AuthError::Unavailable),
        },
        Err(error) => Err(error),
    };
    if let Err(error) = verified {
        metrics::counter!("chatify_gateway_refusals_total", "reason" => error.label()).increment(1);
    }
    verified
}

/// A connection in the shard's table, its writer task draining `queue` to the socket.
pub(super) struct Registered {
    pub(super) connection_id: u64,
    pub(super) queue: OutboundQueue,
    writer: monoio::task::JoinHandle<()>,
    _slot: ConnectionSlot,
}

/// Gives an authenticated connection its id, outbound queue and writer task, and enters it
/// in the shard's table (where shutdown finds it). The slot is held until [`Registered::close`].
pub(super) fn register(
    shard: &Shard,
    framing: Framing,
    write_half: OwnedWriteHalf<TcpStream>,
    slot: ConnectionSlot,
) -> Registered {
    let connection_id = shard.next_connection_id();
    let queue = OutboundQueue::new(framing, shard.limits.send_queue_frames_max);
    shard
        .connections
        .borrow_mut()
        .insert(connection_id, queue.clone());
    let writer = monoio::spawn(writer::run(queue.clone(), write_half));
    Registered {
        connection_id,
        queue,
        writer,
        _slot: slot,
    }
}

impl Registered {
    /// Sends the close (a close frame on WebSocket; TCP just ends), waits for the writer to
    /// finish, leaves the shard's table and frees the slot. `reader` goes first so the
    /// socket closes as soon as the writer lets go of it.
    pub(super) async fn close<R>(self, shard: &Shard, reason: CloseReason, reader: R) {
        // A slow reader's pending frames are dropped so the close goes out at once.
        let slow = reason.reason == "slow consumer";
        self.queue.close_with(reason.code, reason.reason, slow);
        drop(reader);
        self.writer.await;
        shard.connections.borrow_mut().remove(&self.connection_id);
    }
}
