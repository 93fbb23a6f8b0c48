//! The outbound side of a connection (shard-local): a bounded queue of pre-encoded frames
//! and the writer task that drains it with one coalesced write per wake-up. A payload
//! pushed to many connections is one shared `Bytes`; each connection copies it once into
//! a write buffer alongside its small frame header. The write buffer is borrowed from the
//! shard's pool when frames are queued and returned after the write, and the queue frees
//! its storage when it drains: an idle connection's outbound side is the queue's fixed
//! state and the parked writer task, no buffer.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

use bytes::{BufMut as _, Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt as _;

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

#[derive(Debug)]
struct State {
    framing: Framing,
    frames: VecDeque<Outbound>,
    frames_max: usize,
    /// A close requested by the server: (code, reason). Written after nothing else.
    close: Option<(u16, &'static str)>,
    /// The writer finished (closed or the socket broke); pushes are dropped.
    finished: bool,
    waker: Option<Waker>,
}

/// Handle to a connection's outbound queue. Shard-local (`Rc`), cloned into the connection
/// table so other tasks of the shard can push to it.
#[derive(Debug, Clone)]
pub struct OutboundQueue(Rc<RefCell<State>>);

impl OutboundQueue {
    pub fn new(framing: Framing, frames_max: usize) -> Self {
        Self(Rc::new(RefCell::new(State {
            framing,
            // Allocated by the first push, freed when drained (see `fill`).
            frames: VecDeque::new(),
            frames_max,
            close: None,
            finished: false,
            waker: None,
        })))
    }

    /// Queues a data frame (JSON text, protobuf binary, or a TCP frame).
    pub fn push(&self, binary: bool, payload: Bytes) -> Result<(), QueueFull> {
        let mut state = self.0.borrow_mut();
        if state.finished || state.close.is_some() {
            return Ok(());
        }
        if state.frames.len() >= state.frames_max {
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
        state.frames.push_back(frame);
        wake(&mut state);
        Ok(())
    }

    /// Queues a WebSocket control frame (pong); control frames skip the bound, they are
    /// tiny and answering pings keeps a healthy client alive.
    pub fn push_control(&self, opcode: ws::Opcode, payload: Bytes) {
        let mut state = self.0.borrow_mut();
        if state.finished || state.close.is_some() || state.framing != Framing::WebSocket {
            return;
        }
        state.frames.push_back(Outbound::Ws { opcode, payload });
        wake(&mut state);
    }

    /// Asks the writer to send a close (WebSocket close frame; TCP just ends) and stop.
    /// The first close wins. `drop_pending` discards frames not yet written (slow reader).
    pub fn close_with(&self, code: u16, reason: &'static str, drop_pending: bool) {
        let mut state = self.0.borrow_mut();
        if state.close.is_none() {
            state.close = Some((code, reason));
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

    /// Waits until there is something to write: queued frames or a close.
    async fn work(&self) {
        poll_fn(|cx| {
            let mut state = self.0.borrow_mut();
            if state.frames.is_empty() && state.close.is_none() {
                state.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(())
        })
        .await;
    }

    /// Moves queued frames (and a pending close) into `out`. Returns true when the
    /// connection must close after this write.
    fn fill(&self, out: &mut BytesMut) -> bool {
        let mut state = self.0.borrow_mut();
        while out.len() < WRITE_BATCH_BYTES_MAX {
            let Some(frame) = state.frames.pop_front() else {
                break;
            };
            match frame {
                Outbound::Ws { opcode, payload } => {
                    let (header, header_len) = ws::frame_header(opcode, payload.len());
                    out.put_slice(&header[..header_len]);
                    out.put_slice(&payload);
                }
                Outbound::Tcp { payload } => {
                    out.put_slice(&tcp::length_prefix(payload.len()));
                    out.put_slice(&payload);
                }
            }
        }
        if !state.frames.is_empty() {
            return false;
        }
        // Drained: give the storage back, so an idle connection's queue holds none. Busy
        // connections pay one small allocation per write batch.
        state.frames = VecDeque::new();
        match state.close {
            Some((code, reason)) => {
                if state.framing == Framing::WebSocket {
                    ws::encode_close(code, reason, out);
                }
                true
            }
            None => false,
        }
    }

    fn finish(&self) {
        let mut state = self.0.borrow_mut();
        state.finished = true;
        state.frames = VecDeque::new();
    }
}

fn wake(state: &mut State) {
    if let Some(waker) = state.waker.take() {
        waker.wake();
    }
}

/// Drains the queue into the socket until a close is written or the socket breaks. The
/// write buffer comes from the shard's pool for each write and goes back after it.
pub(super) async fn run<W: monoio::io::AsyncWriteRent>(
    shard: Rc<Shard>,
    queue: OutboundQueue,
    mut sink: W,
) {
    loop {
        queue.work().await;
        let mut buffer = shard.buffers.take();
        let closing = queue.fill(&mut buffer);
        if !buffer.is_empty() {
            // Boxed: the write's future is only alive during a write, and inline it would
            // size the task an idle connection keeps for its whole life. One small
            // allocation per coalesced write.
            let (result, written) = Box::pin(sink.write_all(buffer)).await;
            shard.buffers.give(written);
            if let Err(error) = result {
                tracing::debug!(%error, "write failed");
                break;
            }
        } else {
            shard.buffers.give(buffer);
        }
        if closing {
            let _ = sink.shutdown().await;
            break;
        }
    }
    queue.finish();
}
