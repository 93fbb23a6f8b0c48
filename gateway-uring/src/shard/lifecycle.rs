//! The steps every client connection takes whatever its transport (shard-local): claiming
//! a node-wide connection slot, reading the socket under a deadline (the handshake's own
//! timer, then the heartbeat enforced by the shard's sweep), authenticating, joining the
//! shard's connection table with a writer task, and leaving it. Reads borrow a buffer from
//! the shard's pool only once bytes are there (see [`wait_readable`]). `ws_conn.rs` and
//! `tcp_conn.rs` add only what their wire format needs.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use chatify_core::routing::unix_now_ms;

use bytes::BytesMut;
use monoio::buf::IoBuf;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt as _, OwnedWriteHalf};
use monoio::net::TcpStream;

use super::buffers;
use super::connection::CloseReason;
use super::writer::{self, Framing, OutboundQueue};
use super::{ConnectionSlot, LiveConnection, Shard};
use crate::auth::{AuthError, Identity};
use crate::redis_bridge::Admission;

/// Spare room below which a held read buffer is grown before the next read.
const READ_SPARE_BYTES_MIN: usize = 1024;

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

/// Waits until the socket has bytes to read, has reached end of stream or has failed,
/// without lending it a buffer: a zero-length `recv`. The kernel's TCP receive needs at
/// least one byte queued (or EOF, or an error) to answer a zero-length request, and answers
/// it without consuming anything; until then it is "would block", so io_uring parks the
/// request on the socket's poll and the epoll driver waits for readiness, exactly as for a
/// real read. `Ok(())` says a real read will not wait; it reads the data (or the EOF, or
/// the error). This is how an idle connection holds no read buffer with monoio's owned
/// buffers: a pending read must own its buffer until it completes, and `readable()` is not
/// reachable through the split read half.
pub(super) async fn wait_readable<R: AsyncReadRent>(reader: &mut R) -> std::io::Result<()> {
    let (result, _) = reader.read(Vec::<u8>::new()).await;
    result.map(drop)
}

/// Reads more bytes within `timeout`. `held` is the connection's read buffer: `None` when
/// no bytes are pending (the idle case), then the read waits with [`wait_readable`] and
/// borrows a buffer from the shard's pool only once bytes are there; `Some` while a frame
/// spans reads, then it reads straight into the spare room after the partial frame. After
/// decoding, hand the buffer back with [`release_read_buffer`].
pub(super) async fn read_more_within<R: AsyncReadRent>(
    shard: &Shard,
    reader: &mut R,
    held: &mut Option<BytesMut>,
    timeout: Duration,
) -> ReadEnd {
    let read = read_more(shard, reader, held.take());
    // On a timeout the buffer (if any) goes with the dropped read: the connection closes.
    let Ok((end, buffer)) = monoio::time::timeout(timeout, read).await else {
        return ReadEnd::TimedOut;
    };
    *held = buffer;
    end
}

async fn read_more<R: AsyncReadRent>(
    shard: &Shard,
    reader: &mut R,
    held: Option<BytesMut>,
) -> (ReadEnd, Option<BytesMut>) {
    use monoio::buf::IoBufMut as _;
    let mut buffer = match held {
        Some(mut partial) => {
            if partial.capacity() - partial.len() < READ_SPARE_BYTES_MIN {
                partial.reserve(buffers::BUFFER_BYTES);
            }
            partial
        }
        None => {
            if wait_readable(reader).await.is_err() {
                return (ReadEnd::Closed, None);
            }
            shard.buffers.take()
        }
    };
    let start = buffer.len();
    let end = buffer.capacity();
    // The buffer is owned by the read while it runs (io_uring) and handed back after.
    let (result, slice) = reader.read(buffer.slice_mut(start..end)).await;
    buffer = slice.into_inner();
    match result {
        Ok(0) => {
            shard.buffers.give(buffer);
            (ReadEnd::Closed, None)
        }
        Err(error) => {
            tracing::debug!(%error, "read failed");
            shard.buffers.give(buffer);
            (ReadEnd::Closed, None)
        }
        Ok(_) => (ReadEnd::Data, Some(buffer)),
    }
}

/// After the decoder took every whole frame: an emptied buffer goes back to the pool, so
/// the connection holds one only while a frame spans reads.
pub(super) fn release_read_buffer(shard: &Shard, held: &mut Option<BytesMut>) {
    if held.as_ref().is_some_and(BytesMut::is_empty)
        && let Some(buffer) = held.take()
    {
        shard.buffers.give(buffer);
    }
}

/// Reads after the handshake, like [`read_more_within`] but without a timer: the shard's
/// heartbeat sweep ends the read of a connection silent for the heartbeat timeout (counted,
/// and reported as [`ReadEnd::TimedOut`]). The future is small on purpose: it is what an
/// idle connection's task holds while it waits.
pub(super) async fn read_or_heartbeat_timeout<R: AsyncReadRent>(
    shard: &Shard,
    live: &LiveConnection,
    reader: &mut R,
    held: &mut Option<BytesMut>,
) -> ReadEnd {
    use monoio::buf::IoBufMut as _;
    let mut buffer = match held.take() {
        Some(mut partial) => {
            if partial.capacity() - partial.len() < READ_SPARE_BYTES_MIN {
                partial.reserve(buffers::BUFFER_BYTES);
            }
            partial
        }
        None => match until_heartbeat_expired(live, wait_readable(reader)).await {
            Some(Ok(())) => shard.buffers.take(),
            Some(Err(_)) => return ReadEnd::Closed,
            None => return heartbeat_timed_out(),
        },
    };
    let start = buffer.len();
    let end = buffer.capacity();
    let read = reader.read(buffer.slice_mut(start..end));
    // On expiry the buffer goes with the dropped read: the connection closes.
    let Some((result, slice)) = until_heartbeat_expired(live, read).await else {
        return heartbeat_timed_out();
    };
    buffer = slice.into_inner();
    match result {
        Ok(0) | Err(_) => {
            shard.buffers.give(buffer);
            ReadEnd::Closed
        }
        Ok(_) => {
            *held = Some(buffer);
            ReadEnd::Data
        }
    }
}

fn heartbeat_timed_out() -> ReadEnd {
    metrics::counter!("chatify_gateway_refusals_total", "reason" => "heartbeat_timeout")
        .increment(1);
    ReadEnd::TimedOut
}

/// Runs `io` until it completes (`Some`) or the heartbeat sweep expires the connection
/// (`None`; `io` is dropped, which cancels it).
async fn until_heartbeat_expired<F: std::future::Future>(
    live: &LiveConnection,
    io: F,
) -> Option<F::Output> {
    let mut io = std::pin::pin!(io);
    let output = std::future::poll_fn(|cx| {
        if live.heartbeat_expired.get() {
            return std::task::Poll::Ready(None);
        }
        match io.as_mut().poll(cx) {
            std::task::Poll::Ready(output) => std::task::Poll::Ready(Some(output)),
            std::task::Poll::Pending => {
                let mut waker = live.read_waker.borrow_mut();
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                std::task::Poll::Pending
            }
        }
    })
    .await;
    live.read_waker.borrow_mut().take();
    output
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

/// Runs `decode` over the bytes read so far until it yields the handshake (the upgrade
/// request, the TCP `auth` frame), reading more as needed, all within the shard's handshake
/// timeout so a slow client (slowloris) cannot hold a slot. What the client sent after the
/// handshake stays in `held` (see [`read_more_within`]).
pub(super) async fn read_handshake<T, E>(
    shard: &Shard,
    stream: &mut TcpStream,
    held: &mut Option<BytesMut>,
    mut decode: impl FnMut(&mut BytesMut) -> Result<Option<T>, E>,
) -> Result<T, HandshakeFailure<E>> {
    let deadline = Instant::now() + shard.handshake_timeout();
    loop {
        if let Some(buffer) = held.as_mut()
            && let Some(decoded) = decode(buffer).map_err(HandshakeFailure::Invalid)?
        {
            return Ok(decoded);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match read_more_within(shard, stream, held, left).await {
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
        identity: Rc::new(identity),
        connected_at_ms: now_ms,
        push_binary: Cell::new(framing == Framing::Tcp),
        last_active_ms: Cell::new(now_ms),
        heartbeat_expired: Cell::new(false),
        read_waker: std::cell::RefCell::new(None),
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
    pub(super) fn start(
        self,
        shard: &Rc<Shard>,
        write_half: OwnedWriteHalf<TcpStream>,
    ) -> Registered {
        let writer = monoio::spawn(writer::run(
            Rc::clone(shard),
            self.live.queue.clone(),
            write_half,
        ));
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
        // Every close of an admitted connection, by its reason (a bounded set of static
        // strings): the one place that says why connections went away.
        metrics::counter!("chatify_gateway_closes_total", "reason" => reason.reason).increment(1);
        // A slow reader's pending frames are dropped so the close goes out at once.
        let slow = reason.reason == "slow consumer";
        self.live.queue.close_with(reason.code, reason.reason, slow);
        drop(reader);
        self.writer.await;
        shard.remove_connection(self.live.connection_id);
        shard.redis.disconnect(self.live.route_entry());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use monoio::io::Splitable as _;
    use monoio::net::TcpListener;

    /// The zero-length read [`wait_readable`] relies on: it waits while nothing has arrived,
    /// completes once bytes are queued without consuming any, and completes at end of
    /// stream; on both monoio drivers.
    async fn zero_length_read_waits_for_bytes_and_consumes_none() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("local addr");
        let mut client = TcpStream::connect(address).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (mut reader, _writer) = server.into_split();

        let idle = monoio::time::timeout(Duration::from_millis(300), wait_readable(&mut reader));
        assert!(idle.await.is_err(), "completed with nothing to read");

        let (written, _) = client.write_all(b"hello").await;
        written.expect("write");
        wait_readable(&mut reader).await.expect("readable");
        wait_readable(&mut reader)
            .await
            .expect("still readable: nothing was consumed");
        let (read, buffer) = reader.read(Vec::with_capacity(64)).await;
        assert_eq!(read.expect("read"), 5);
        assert_eq!(buffer, b"hello");

        drop(client);
        wait_readable(&mut reader).await.expect("end of stream");
        let (read, _) = reader.read(Vec::with_capacity(64)).await;
        assert_eq!(read.expect("read"), 0);
    }

    #[test]
    fn zero_length_read_is_a_readiness_wait_on_epoll() {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("epoll runtime")
            .block_on(zero_length_read_waits_for_bytes_and_consumes_none());
    }

    #[test]
    fn zero_length_read_is_a_readiness_wait_on_io_uring() {
        if !monoio::utils::detect_uring() {
            eprintln!("io_uring is not available to this process: skipped");
            return;
        }
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("io_uring runtime")
            .block_on(zero_length_read_waits_for_bytes_and_consumes_none());
    }
}
