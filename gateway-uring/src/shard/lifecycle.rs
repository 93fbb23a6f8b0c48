//! The steps every client connection takes whatever its transport (shard-local): claiming
//! a node-wide connection slot, reading the socket under a deadline (the handshake's own
//! timer, then the heartbeat enforced by the shard's sweep), authenticating, joining the
//! shard's connection table, reading and writing in the connection's one task
//! ([`Admitted::run`]), and leaving. Reads borrow a buffer from the shard's pool only once
//! bytes are there (see [`wait_readable`]). `ws_conn.rs` and `tcp_conn.rs` add only what
//! their wire format needs.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use chatify_core::routing::unix_now_ms;

use bytes::BytesMut;
use monoio::buf::IoBuf;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt as _, OwnedReadHalf, OwnedWriteHalf};
use monoio::net::TcpStream;

use super::buffers;
use super::connection::CloseReason;
use super::writer::{Framing, OutboundQueue, WriteSide};
use super::{ConnectionIdentity, ConnectionSlot, LiveConnection, Shard};
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
/// The request's buffer is a zero-sized array (a `Box` of it allocates nothing), so the
/// pending `recv` holds a thin pointer rather than a `Vec`.
pub(super) async fn wait_readable<R: AsyncReadRent>(reader: &mut R) -> std::io::Result<()> {
    let (result, _) = reader.read(Box::new([0_u8; 0])).await;
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

/// A connection's task from its start (the handshake or authentication, boxed so it is
/// freed at admission) to the end of the frame loop `start` yields, if any. Not an `async`
/// block: one keeps room for its captures for its whole life, and
/// `if let Some(frame_loop) = start.await { frame_loop.await }` keeps the frame loop twice
/// (the awaited result and the future being polled); `flatten` keeps it once.
pub(super) fn boxed_start_then<L>(
    start: impl Future<Output = Option<L>>,
) -> impl Future<Output = ()>
where
    L: Future<Output = ()>,
{
    use futures::FutureExt as _;
    Box::pin(start)
        .map(futures::future::OptionFuture::from)
        .flatten()
        .map(|_: Option<()>| ())
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

/// The read side of an idle admitted connection: the zero-length `recv` of
/// [`wait_readable`], owning the read half and handing it back with whether the socket is
/// readable (`false`: the peer closed or the socket failed). This is what an idle
/// connection's task holds (the `recv` op and the half, no buffer), so it is kept apart
/// from [`read_into`], the larger read that follows. Not an `async fn`, which would keep a
/// second copy of its argument.
#[expect(
    clippy::manual_async_fn,
    reason = "an `async fn` would keep a second copy of the read half in every idle task"
)]
fn wait_step<R: AsyncReadRent>(mut reader: R) -> impl Future<Output = (R, bool)> {
    async move {
        let (result, _) = reader.read(Box::new([0_u8; 0])).await;
        (reader, result.is_ok())
    }
}

/// The read after [`wait_step`] said bytes are there: into `held` (a frame spanning reads)
/// or a buffer from the shard's pool. It owns the read half while it runs and hands it
/// back; the connection's task boxes it, so it takes memory only while bytes are in hand.
/// `None`: the peer closed or the socket failed. After decoding, hand the buffer back with
/// [`release_read_buffer`].
async fn read_into<R: AsyncReadRent>(
    shard: Rc<Shard>,
    mut reader: R,
    held: Option<BytesMut>,
) -> (R, Option<BytesMut>) {
    use monoio::buf::IoBufMut as _;
    let buffer = match held {
        Some(mut partial) => {
            if partial.capacity() - partial.len() < READ_SPARE_BYTES_MIN {
                partial.reserve(buffers::BUFFER_BYTES);
            }
            partial
        }
        None => shard.buffers.take(),
    };
    let start = buffer.len();
    let end = buffer.capacity();
    let (result, slice) = reader.read(buffer.slice_mut(start..end)).await;
    let buffer = slice.into_inner();
    match result {
        Ok(0) | Err(_) => {
            shard.buffers.give(buffer);
            (reader, None)
        }
        Ok(_) => (reader, Some(buffer)),
    }
}

/// A read into a buffer in flight (see [`read_into`]).
type ReadInFlight<R> = Pin<Box<dyn Future<Output = (R, Option<BytesMut>)>>>;

fn heartbeat_timed_out() -> CloseReason {
    metrics::counter!("chatify_gateway_refusals_total", "reason" => "heartbeat_timeout")
        .increment(1);
    CloseReason::new(1000, "heartbeat timeout")
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
        identity: ConnectionIdentity::new(&identity),
        connected_at_ms: now_ms,
        push_binary: Cell::new(framing == Framing::Tcp),
        last_active_ms: Cell::new(now_ms),
        heartbeat_expired: Cell::new(false),
        reader_in_flight: Cell::new(0),
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
    /// Gives up before anything was written after the handshake (its answer could not be
    /// written).
    pub(super) fn abandon(self, shard: &Shard) {
        shard.remove_connection(self.live.connection_id);
        shard.redis.disconnect(self.live.route_entry());
    }

    /// The admitted connection's whole life in its one task (there is no writer task): the
    /// read side (always either the zero-length `recv` of [`wait_step`], which holds no
    /// buffer, or the boxed [`read_into`] that follows it) and the write side
    /// ([`WriteSide`]: a write only while frames are queued) are polled together, so neither
    /// waits for the other and an idle connection's task is only that pending zero-length
    /// read. `on_bytes` decodes and handles every whole frame of what was read (`Err` closes
    /// the connection with that reason); `held` is what the client sent after the
    /// handshake. A frame that spans reads keeps its bytes in the boxed read that fetches
    /// the rest (straight into the spare room after it, no readiness wait first), never in
    /// the task itself, so the task has no room for a buffer it holds only while busy.
    /// Then the close (a close frame on WebSocket; TCP just ends) goes out after what is
    /// queued, and the connection leaves the shard's tables, its route is removed and its
    /// slot freed.
    /// Not an `async fn` (see `ws_conn::serve`): the future uses what it captures in place.
    pub(super) fn run(
        self,
        shard: Rc<Shard>,
        reader: OwnedReadHalf<TcpStream>,
        sink: OwnedWriteHalf<TcpStream>,
        held: Option<BytesMut>,
        on_bytes: impl FnMut(&Shard, &mut BytesMut) -> Result<(), CloseReason>,
    ) -> impl Future<Output = ()> {
        // What the client sent after the handshake is decoded first, as if just read.
        let (reading, mut reader): (Option<ReadInFlight<_>>, _) = match held {
            Some(held) => (
                Some(Box::pin(std::future::ready((reader, Some(held))))),
                None,
            ),
            None => (None, Some(reader)),
        };
        let mut open = Open {
            shard,
            admitted: self,
            writes: WriteSide::new(sink),
            reading,
            on_bytes,
        };
        async move {
            // Pinned here, outside `open`: polling it needs it pinned, and `open` is not.
            let mut waiting = std::pin::pin!(None);
            let close = loop {
                if open.admitted.live.queue.is_finished() {
                    break CloseReason::new(1000, "write side closed");
                }
                if let Some(reader) = reader.take() {
                    waiting.set(Some(wait_step(reader)));
                }
                let read = std::future::poll_fn(|cx| open.poll_io(cx, waiting.as_mut())).await;
                // On expiry the pending read is dropped (cancelled) with its buffer, if any.
                let Some((returned, buffer)) = read else {
                    break heartbeat_timed_out();
                };
                // On a close the read half goes with `returned`: the read side ends first.
                let Some(mut buffer) = buffer else {
                    break CloseReason::new(1000, "peer gone");
                };
                open.admitted.live.last_active_ms.set(unix_now_ms());
                if let Err(close) = (open.on_bytes)(&open.shard, &mut buffer) {
                    open.shard.buffers.give(buffer);
                    break close;
                }
                if buffer.is_empty() {
                    // Every whole frame taken: the buffer goes back to the pool.
                    open.shard.buffers.give(buffer);
                    reader = Some(returned);
                } else {
                    // A frame spans reads: fetch the rest into the same buffer.
                    let read = read_into(Rc::clone(&open.shard), returned, Some(buffer));
                    open.reading = Some(Box::pin(read));
                }
            };
            // The read side goes first, so the socket closes as soon as the write side is
            // done.
            waiting.set(None);
            reader = None;
            open.close(close);
            std::future::poll_fn(|cx| open.poll_close(cx)).await;
            drop(reader);
            let Open {
                shard, admitted, ..
            } = open;
            shard.remove_connection(admitted.live.connection_id);
            shard.redis.disconnect(admitted.live.route_entry());
            drop(admitted.slot);
        }
    }
}

/// What an admitted connection's task keeps besides its pending readiness wait (which is
/// pinned in the task): one struct, so the task's polls borrow it through one reference
/// rather than one per field (every reference is kept in the task for its whole life).
struct Open<F> {
    shard: Rc<Shard>,
    admitted: Admitted,
    writes: WriteSide<OwnedWriteHalf<TcpStream>>,
    /// The boxed [`read_into`] after the readiness wait said bytes are there, or while a
    /// frame spans reads (its bytes so far are in it).
    reading: Option<ReadInFlight<OwnedReadHalf<TcpStream>>>,
    on_bytes: F,
}

impl<F> Open<F> {
    /// Drives the write side and the read side together. Ready with `None` when the
    /// heartbeat expired (no timer per connection: the shard's sweep sets
    /// `heartbeat_expired` and wakes the task through the queue's waker), with the read
    /// half and what was read otherwise (`None`: the peer closed or the socket failed).
    fn poll_io<W: Future<Output = (OwnedReadHalf<TcpStream>, bool)>>(
        &mut self,
        cx: &mut Context<'_>,
        mut waiting: Pin<&mut Option<W>>,
    ) -> Poll<Option<(OwnedReadHalf<TcpStream>, Option<BytesMut>)>> {
        let live = &self.admitted.live;
        if live.heartbeat_expired.get() {
            return Poll::Ready(None);
        }
        self.writes.poll(cx, &self.shard, &live.queue);
        loop {
            if let Some(read) = self.reading.as_mut() {
                let done = std::task::ready!(read.as_mut().poll(cx));
                self.reading = None;
                return Poll::Ready(Some(done));
            }
            let wait = waiting
                .as_mut()
                .as_pin_mut()
                .expect("a read is always in flight here");
            let (reader, readable) = std::task::ready!(wait.poll(cx));
            waiting.set(None);
            if !readable {
                return Poll::Ready(Some((reader, None)));
            }
            let read = read_into(Rc::clone(&self.shard), reader, None);
            self.reading = Some(Box::pin(read));
        }
    }

    /// Ends the read side (a frame in progress goes with it) and asks the write side to
    /// send the close after what is queued.
    fn close(&mut self, close: CloseReason) {
        drop(self.reading.take());
        // Every close of an admitted connection, by its reason (a bounded set of static
        // strings): the one place that says why connections went away.
        metrics::counter!("chatify_gateway_closes_total", "reason" => close.reason).increment(1);
        // A slow reader's pending frames are dropped so the close goes out at once.
        let slow = close.reason == "slow consumer";
        self.admitted
            .live
            .queue
            .close_with(close.code, close.reason, slow);
    }

    /// Ready once the write side is done (the close written, or the socket broke).
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let queue = &self.admitted.live.queue;
        self.writes.poll(cx, &self.shard, queue);
        if queue.is_finished() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UringTaskRun;
    use crate::shard::uring_runtime;
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

    /// On each task-run mode a shard may run (`CHATIFY_URING_TASKRUN`): the mode changes
    /// when the kernel completes the receive, which must not change what it answers.
    #[test]
    fn zero_length_read_is_a_readiness_wait_on_io_uring() {
        if !monoio::utils::detect_uring() {
            eprintln!("io_uring is not available to this process: skipped");
            return;
        }
        for taskrun in [
            UringTaskRun::Signal,
            UringTaskRun::Coop,
            UringTaskRun::Defer,
        ] {
            let (mut runtime, got) = uring_runtime(taskrun).expect("io_uring runtime");
            eprintln!("asked for {taskrun:?}, got {got:?}");
            runtime.block_on(zero_length_read_waits_for_bytes_and_consumes_none());
        }
    }
}
