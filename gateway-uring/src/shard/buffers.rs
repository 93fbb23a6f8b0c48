//! The shard's I/O buffers (shard-local): one bounded pool of read and write buffers that
//! connections borrow only while bytes are in hand, and the one JSON scratch buffer (with
//! simd-json's working memory) every text frame of the shard is parsed in. An idle
//! connection holds no buffer at all: it waits for its socket to become readable with a
//! zero-length read (see [`super::lifecycle::wait_readable`]) and for its outbound queue to
//! fill, and borrows a buffer only then. So memory follows the bytes in flight, not the connections open.

use std::cell::RefCell;

use bytes::BytesMut;

/// Capacity of a pooled buffer: one read or one coalesced write usually fits (a larger
/// frame grows the buffer it is read into; a grown buffer is not pooled again).
pub(crate) const BUFFER_BYTES: usize = 16 * 1024;
/// Most free buffers a shard keeps (1 MiB at [`BUFFER_BYTES`]). Buffers beyond this are
/// freed on return: a burst costs allocations, never memory held for good.
pub(crate) const POOLED_BUFFERS_MAX: usize = 64;
/// A pooled buffer that grew past this (a large frame or write batch) is freed on return
/// instead of pooled.
const POOLED_BUFFER_BYTES_MAX: usize = 4 * BUFFER_BYTES;
/// Starting capacity of the shard's JSON scratch buffer (it grows to the largest text frame
/// seen, bounded by `CHATIFY_MESSAGE_BYTES_MAX`).
const JSON_SCRATCH_BYTES: usize = 4 * 1024;

/// Free buffers of one shard. Shard-local (`RefCell`): only the shard's own tasks take and
/// return buffers, never across an await while borrowed.
pub(crate) struct BufferPool {
    free: RefCell<Vec<BytesMut>>,
    /// Where simd-json parses text frames in place (it overwrites its input, so the payload
    /// is copied here first). One per shard: parsing is synchronous, so no two connections
    /// of a shard ever use it at once.
    json_scratch: RefCell<Vec<u8>>,
    /// simd-json's working memory for those parses, kept so a frame allocates none (it grows
    /// with the scratch buffer, to the largest text frame seen).
    json_buffers: RefCell<chatify_proto::json::JsonBuffers>,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferPool")
            .field("free", &self.free.try_borrow().map(|free| free.len()).ok())
            .finish_non_exhaustive()
    }
}

impl Default for BufferPool {
    fn default() -> Self {
        Self {
            free: RefCell::new(Vec::with_capacity(POOLED_BUFFERS_MAX)),
            json_scratch: RefCell::new(Vec::with_capacity(JSON_SCRATCH_BYTES)),
            json_buffers: RefCell::new(chatify_proto::json::JsonBuffers::new(JSON_SCRATCH_BYTES)),
        }
    }
}

impl BufferPool {
    /// An empty buffer with room for at least [`BUFFER_BYTES`].
    pub(crate) fn take(&self) -> BytesMut {
        let mut buffer = self.free.borrow_mut().pop().unwrap_or_default();
        // A returned buffer may still share its allocation with payloads split off it (a
        // pong waiting in a queue): `reserve` reclaims the allocation when it is unique
        // again and allocates a fresh one otherwise, so a pooled buffer never aliases a
        // live payload.
        buffer.reserve(BUFFER_BYTES);
        buffer
    }

    /// Returns a buffer; its contents are discarded.
    pub(crate) fn give(&self, mut buffer: BytesMut) {
        let mut free = self.free.borrow_mut();
        if free.len() < POOLED_BUFFERS_MAX && buffer.capacity() <= POOLED_BUFFER_BYTES_MAX {
            buffer.clear();
            free.push(buffer);
        }
    }

    /// Runs `parse` on a copy of `payload` in the shard's JSON scratch buffer, with the
    /// shard's simd-json working memory.
    pub(crate) fn with_json_scratch<T>(
        &self,
        payload: &[u8],
        parse: impl FnOnce(&mut [u8], &mut chatify_proto::json::JsonBuffers) -> T,
    ) -> T {
        let mut scratch = self.json_scratch.borrow_mut();
        scratch.clear();
        scratch.extend_from_slice(payload);
        parse(&mut scratch, &mut self.json_buffers.borrow_mut())
    }

    #[cfg(test)]
    fn free_buffers(&self) -> usize {
        self.free.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut as _;

    #[test]
    fn a_returned_buffer_is_reused_empty() {
        let pool = BufferPool::default();
        let mut buffer = pool.take();
        assert!(buffer.capacity() >= BUFFER_BYTES);
        buffer.put_slice(b"leftover");
        let pointer = buffer.as_ptr();
        pool.give(buffer);
        assert_eq!(pool.free_buffers(), 1);
        let again = pool.take();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), pointer, "the same allocation comes back");
        assert_eq!(pool.free_buffers(), 0);
    }

    #[test]
    fn the_pool_is_bounded_and_grown_buffers_are_freed() {
        let pool = BufferPool::default();
        let buffers: Vec<BytesMut> = (0..POOLED_BUFFERS_MAX + 8).map(|_| pool.take()).collect();
        for buffer in buffers {
            pool.give(buffer);
        }
        assert_eq!(pool.free_buffers(), POOLED_BUFFERS_MAX);
        let pool = BufferPool::default();
        let mut grown = pool.take();
        grown.reserve(POOLED_BUFFER_BYTES_MAX + 1);
        pool.give(grown);
        assert_eq!(pool.free_buffers(), 0);
    }

    #[test]
    fn json_is_parsed_in_a_copy() {
        let pool = BufferPool::default();
        let payload = b"{\"a\":1}".to_vec();
        let seen = pool.with_json_scratch(&payload, |scratch, _| {
            scratch[0] = b'X';
            scratch.len()
        });
        assert_eq!(seen, payload.len());
        assert_eq!(payload, b"{\"a\":1}");
    }
}
