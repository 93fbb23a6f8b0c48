//! The outbound side of a connection (shard-local): a bounded queue of pre-encoded frames
//! and the write side that the connection's own task drives, one coalesced write per
//! wake-up (there is no writer task). A payload pushed to many connections is one shared
//! `Bytes`; each connection copies it once into a write buffer alongside its small frame
//! header. The write buffer is borrowed from the shard's pool when frames are queued and
//! returned after the write, and the queue frees its storage when it drains: an idle
//! connection's outbound side is the queue's fixed state and the write half, no buffer and
//! no task.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{BufMut as _, Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt as _;
use thin_vec::ThinVec;

use super::Shard;
use crate::conn::{tcp, ws};

/// Most bytes gathered into one write.
const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;

/// How frames are framed on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    WebSocket,
    Tcp,
}

/// One frame waiting to be written.
#[derive(Debug)]
enum Outbound {
    /// WebSocket frame: opcode + shared payload.
    Ws { opcode: ws::Opcode, payload: Bytes },
    /// Length-prefixed TCP frame.
    Tcp { payload: Bytes },
}

/// The queue is at its bound: the client does not read fast enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// The queue's state: 48 B, part of every connection's entry in the shard's table (the
/// entry fits mimalloc's 128 B size class; see `shard::tests::connection_task_sizes`).
#[derive(Debug)]
struct State {
    /// Frames in order. A `ThinVec` (8 B: its length and capacity live in its allocation,
    /// which exists only while frames are queued) rather than a `VecDeque` (32 B): the
    /// writer takes the whole queue at once but for a batch over `WRITE_BATCH_BYTES_MAX`.
    frames: ThinVec<Outbound>,
    waker: Option<Waker>,
    /// The reason of a close requested by the server. Written after nothing else.
    close_reason: Option<&'static str>,
    /// The bound on `frames` (a `u32` beside the flags: a bound above 4 G frames acts as
    /// 4 G).
    frames_max: u32,
    /// The close's code; kept apart from the reason (a `(u16, &str)` would pad the state by
    /// 8 B).
    close_code: u16,
    framing: Framing,
    /// The writer finished (closed or the socket broke); pushes are dropped.
    finished: bool,
}

/// A connection's outbound queue. Shard-local; part of the connection's entry in the
/// shard's table (one allocation for both), so every task of the shard holding the entry
/// can push to it.
#[derive(Debug)]
pub struct OutboundQueue(RefCell<State>);

impl OutboundQueue {
    pub fn new(framing: Framing, frames_max: usize) -> Self {
        Self(RefCell::new(State {
            framing,
            // Allocated by the first push, freed when drained (see `fill`).
            frames: ThinVec::new(),
            frames_max: u32::try_from(frames_max).unwrap_or(u32::MAX),
            close_reason: None,
            close_code: 0,
            finished: false,
            waker: None,
        }))
    }

    /// Queues a data frame (JSON text, protobuf binary, or a TCP frame).
    pub fn push(&self, binary: bool, payload: Bytes) -> Result<(), QueueFull> {
        let mut state = self.0.borrow_mut();
        if state.finished || state.close_reason.is_some() {
            return Ok(());
        }
        if state.frames.len() >= state.frames_max as usize {
            return Err(QueueFull);
        }
        let frame = match state.framing {
            Framing::WebSocket => Outbound::Ws {
                opcode: if binary {
                    ws::Opcode::Binary
                } else {
                    ws::Opcode::Text
                },
                payload,
            },
            Framing::Tcp => Outbound::Tcp { payload },
        };
        state.frames.push(frame);
        wake(&mut state);
        Ok(())
    }

    /// Queues a WebSocket control frame (pong); control frames skip the bound, they are
    /// tiny and answering pings keeps a healthy client alive.
    pub fn push_control(&self, opcode: ws::Opcode, payload: Bytes) {
        let mut state = self.0.borrow_mut();
        if state.finished || state.close_reason.is_some() || state.framing != Framing::WebSocket {
            return;
        }
        state.frames.push(Outbound::Ws { opcode, payload });
        wake(&mut state);
    }

    /// Asks the writer to send a close (WebSocket close frame; TCP just ends) and stop.
    /// The first close wins. `drop_pending` discards frames not yet written (slow reader).
    pub fn close_with(&self, code: u16, reason: &'static str, drop_pending: bool) {
        let mut state = self.0.borrow_mut();
        if state.close_reason.is_none() {
            state.close_reason = Some(reason);
            state.close_code = code;
        }
        if drop_pending {
            state.frames.clear();
        }
        wake(&mut state);
    }

    /// [`Self::close_with`] after the frames already queued.
    pub fn close(&self, code: u16, reason: &'static str) {
        self.close_with(code, reason, false);
    }

    pub fn is_finished(&self) -> bool {
        self.0.borrow().finished
    }

    /// Whether the writer has something to do: queued frames or a close not yet written.
    pub(super) fn has_work(&self) -> bool {
        let state = self.0.borrow();
        !state.finished && (!state.frames.is_empty() || state.close_reason.is_some())
    }

    /// Remembers the connection task's waker: a push, a close or the heartbeat sweep
    /// ([`Self::wake`]) wakes it.
    pub(super) fn register(&self, waker: &Waker) {
        let mut state = self.0.borrow_mut();
        if !state.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            state.waker = Some(waker.clone());
        }
    }

    /// Wakes the connection task (see [`Self::register`]).
    pub(super) fn wake(&self) {
        wake(&mut self.0.borrow_mut());
    }

    /// Moves queued frames (and a pending close) into `out`. Returns true when the
    /// connection must close after this write.
    pub(super) fn fill(&self, out: &mut BytesMut) -> bool {
        let mut state = self.0.borrow_mut();
        let mut taken = 0;
        for frame in &state.frames {
            if out.len() >= WRITE_BATCH_BYTES_MAX {
                break;
            }
            match frame {
                Outbound::Ws { opcode, payload } => {
                    let (header, header_len) = ws::frame_header(*opcode, payload.len());
                    out.put_slice(&header[..header_len]);
                    out.put_slice(payload);
                }
                Outbound::Tcp { payload } => {
                    out.put_slice(&tcp::length_prefix(payload.len()));
                    out.put_slice(payload);
                }
            }
            taken += 1;
        }
        if taken < state.frames.len() {
            // Over one batch's bytes (rare): the rest moves to the front for the next write.
            state.frames.drain(..taken);
            return false;
        }
        // Drained: give the storage back, so an idle connection's queue holds none. Busy
        // connections pay one small allocation per write batch.
        state.frames = ThinVec::new();
        match state.close_reason {
            Some(reason) => {
                if state.framing == Framing::WebSocket {
                    ws::encode_close(state.close_code, reason, out);
                }
                true
            }
            None => false,
        }
    }

    pub(super) fn finish(&self) {
        let mut state = self.0.borrow_mut();
        state.finished = true;
        state.frames = ThinVec::new();
    }
}

fn wake(state: &mut State) {
    if let Some(waker) = state.waker.take() {
        waker.wake();
    }
}

/// A write in flight: it owns the write half and hands it back with the buffer.
type WriteInFlight<W> = Pin<Box<dyn Future<Output = (W, std::io::Result<()>, BytesMut, bool)>>>;

/// The write side of a connection, driven by the connection's own task (there is no
/// writer task): idle, it holds only the write half; with frames queued it borrows a pooled
/// buffer, fills it with everything queued and writes it in one boxed write (alive only
/// while bytes are in flight: inline it would size the task an idle connection keeps for
/// its whole life), then the buffer goes back. A written close or a failed write finishes
/// the queue (later pushes are dropped).
pub(super) struct WriteSide<W> {
    /// The write half while no write is in flight; `None` during a write and once finished.
    sink: Option<W>,
    /// The write in flight; it hands back whether it carried the close (the queue then
    /// finishes), so the idle side keeps no flag for it.
    in_flight: Option<WriteInFlight<W>>,
}

impl<W> std::fmt::Debug for WriteSide<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteSide")
            .field("writing", &self.in_flight.is_some())
            .finish_non_exhaustive()
    }
}

impl<W: monoio::io::AsyncWriteRent + 'static> WriteSide<W> {
    pub(super) fn new(sink: W) -> Self {
        Self {
            sink: Some(sink),
            in_flight: None,
        }
    }

    /// Makes progress: finishes the write in flight, starts the next one while frames are
    /// queued. Never completes: the queue says when the writer is done
    /// ([`OutboundQueue::is_finished`]). The task is woken by the write's completion and by
    /// the queue (a push, a close, the heartbeat sweep).
    pub(super) fn poll(&mut self, cx: &mut Context<'_>, shard: &Shard, queue: &OutboundQueue) {
        // Always, also while a write is in flight: the heartbeat sweep wakes the task
        // through the queue.
        queue.register(cx.waker());
        loop {
            if let Some(write) = self.in_flight.as_mut() {
                let Poll::Ready((sink, result, buffer, closing)) = write.as_mut().poll(cx) else {
                    return;
                };
                self.in_flight = None;
                shard.buffers.give(buffer);
                match result {
                    Ok(()) if !closing => self.sink = Some(sink),
                    Ok(()) => queue.finish(),
                    Err(error) => {
                        tracing::debug!(%error, "write failed");
                        queue.finish();
                    }
                }
            }
            let Some(sink) = self.sink.take_if(|_| queue.has_work()) else {
                return;
            };
            let mut buffer = shard.buffers.take();
            let closing = queue.fill(&mut buffer);
            self.in_flight = Some(Box::pin(write(sink, buffer, closing)));
        }
    }
}

/// One coalesced write (skipped when `buffer` is empty), then, after a written close, the
/// write side is shut down.
async fn write<W: monoio::io::AsyncWriteRent>(
    mut sink: W,
    buffer: BytesMut,
    closing: bool,
) -> (W, std::io::Result<()>, BytesMut, bool) {
    let (result, buffer) = if buffer.is_empty() {
        (Ok(()), buffer)
    } else {
        let (result, buffer) = sink.write_all(buffer).await;
        (result.map(drop), buffer)
    };
    if closing && result.is_ok() {
        let _ = sink.shutdown().await;
    }
    (sink, result, buffer, closing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits TCP frames (4-byte length, payload) back out of what `fill` wrote.
    fn tcp_frames(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        while let Some((length, rest)) = bytes.split_first_chunk::<4>() {
            let length = u32::from_be_bytes(*length) as usize;
            frames.push(rest[..length].to_vec());
            bytes = &rest[length..];
        }
        frames
    }

    #[test]
    fn frames_go_out_in_order_across_batches_and_the_drained_queue_holds_no_storage() {
        let queue = OutboundQueue::new(Framing::Tcp, 100);
        // 40 frames of 16 KiB: more than one write batch (256 KiB).
        let payloads: Vec<Vec<u8>> = (0..40_u8).map(|i| vec![i; 16 * 1024]).collect();
        for payload in &payloads {
            queue
                .push(true, Bytes::from(payload.clone()))
                .expect("below the bound");
        }
        let mut written = Vec::new();
        let mut batches = 0;
        loop {
            let mut out = BytesMut::new();
            let closing = queue.fill(&mut out);
            assert!(!closing);
            if out.is_empty() {
                break;
            }
            assert!(out.len() <= WRITE_BATCH_BYTES_MAX + 16 * 1024 + 4);
            written.extend(tcp_frames(&out));
            batches += 1;
        }
        assert_eq!(written, payloads);
        assert!(batches >= 2, "one batch held {} frames", payloads.len());
        let state = queue.0.borrow();
        assert!(state.frames.is_empty());
        assert_eq!(
            state.frames.capacity(),
            0,
            "a drained queue frees its storage"
        );
    }

    #[test]
    fn the_bound_refuses_a_push_and_a_close_goes_out_after_the_queued_frames() {
        let queue = OutboundQueue::new(Framing::WebSocket, 2);
        for payload in [&b"one"[..], b"two"] {
            queue
                .push(false, Bytes::from_static(payload))
                .expect("below the bound");
        }
        assert_eq!(
            queue.push(false, Bytes::from_static(b"three")),
            Err(QueueFull)
        );
        queue.close(1000, "bye");
        let mut out = BytesMut::new();
        assert!(
            queue.fill(&mut out),
            "the close was written: the writer ends"
        );
        let mut expected = BytesMut::new();
        ws::encode_frame(ws::Opcode::Text, b"one", &mut expected);
        ws::encode_frame(ws::Opcode::Text, b"two", &mut expected);
        ws::encode_close(1000, "bye", &mut expected);
        assert_eq!(out, expected);
    }
}
