//! TCP framing: each frame is a 4-byte big-endian length followed by that many payload bytes
//! (docs/PROTOCOL.md). Pure code on the connection's owned read buffer: payloads are split
//! off it without copying. One `LengthDecoder` per connection (shard-local).

use bytes::{Buf, Bytes, BytesMut};

/// Size of the big-endian length that precedes every frame.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Why a TCP byte stream cannot be framed; the connection is closed after any of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TcpFrameError {
    /// A zero length carries no protobuf frame and is never sent by a correct client.
    #[error("empty frame")]
    Empty,
    /// Detected from the prefix alone, before any of the payload is buffered.
    #[error("frame of {frame_bytes} bytes over the limit of {frame_bytes_max} bytes")]
    TooBig {
        frame_bytes: u32,
        frame_bytes_max: usize,
    },
}

impl TcpFrameError {
    /// A short static reason for logs and the `error` frame sent before closing.
    pub fn reason(&self) -> &'static str {
        match self {
            TcpFrameError::Empty => "empty frame",
            TcpFrameError::TooBig { .. } => "frame too big",
        }
    }
}

/// Splits length-prefixed frames off a read buffer.
#[derive(Debug, Clone)]
pub struct LengthDecoder {
    frame_bytes_max: usize,
}

impl LengthDecoder {
    /// `frame_bytes_max` bounds the payload (the prefix not counted) and so the read buffer.
    pub fn new(frame_bytes_max: usize) -> Self {
        Self { frame_bytes_max }
    }

    pub fn frame_bytes_max(&self) -> usize {
        self.frame_bytes_max
    }

    /// Takes the next whole frame's payload off the front of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed: `buf` is left as it was, except that room for
    /// the rest of a frame whose length is known is reserved, so the next read can fill it.
    /// Several frames in one buffer come out one per call.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, TcpFrameError> {
        let Some(prefix) = buf.first_chunk::<LENGTH_PREFIX_BYTES>() else {
            return Ok(None);
        };
        let frame_bytes = u32::from_be_bytes(*prefix);
        if frame_bytes == 0 {
            return Err(TcpFrameError::Empty);
        }
        // u32 always fits usize on the 64-bit targets the gateway runs on; saturate elsewhere
        // so the comparison still rejects it.
        let payload_bytes = usize::try_from(frame_bytes).unwrap_or(usize::MAX);
        if payload_bytes > self.frame_bytes_max {
            return Err(TcpFrameError::TooBig {
                frame_bytes,
                frame_bytes_max: self.frame_bytes_max,
            });
        }
        let total_bytes = LENGTH_PREFIX_BYTES + payload_bytes;
        if buf.len() < total_bytes {
            buf.reserve(total_bytes - buf.len());
            return Ok(None);
        }
        buf.advance(LENGTH_PREFIX_BYTES);
        Ok(Some(buf.split_to(payload_bytes).freeze()))
    }
}

/// The prefix to write before a payload of `payload_bytes` (e.g. in a vectored write with a
/// payload `Bytes` shared by many connections).
///
/// Callers bound their payloads far below 4 GiB; a larger one is a bug, not a client error.
pub fn length_prefix(payload_bytes: usize) -> [u8; LENGTH_PREFIX_BYTES] {
    let frame_bytes = u32::try_from(payload_bytes).expect("frame payloads are bounded below 4 GiB");
    frame_bytes.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use proptest::prelude::*;

    fn framed(payloads: &[&[u8]]) -> BytesMut {
        let mut out = BytesMut::new();
        for payload in payloads {
            out.put_slice(&length_prefix(payload.len()));
            out.put_slice(payload);
        }
        out
    }

    fn decode_all(decoder: &mut LengthDecoder, buf: &mut BytesMut) -> Vec<Bytes> {
        let mut frames = Vec::new();
        while let Some(frame) = decoder.decode(buf).expect("valid frames") {
            frames.push(frame);
        }
        frames
    }

    #[test]
    fn length_prefix_is_big_endian() {
        assert_eq!(length_prefix(1), [0, 0, 0, 1]);
        assert_eq!(length_prefix(0x0102_0304), [1, 2, 3, 4]);
    }

    #[test]
    fn decodes_several_frames_from_one_buffer() {
        let mut buf = framed(&[b"one", b"two!", b"x"]);
        let mut decoder = LengthDecoder::new(1024);
        let frames = decode_all(&mut decoder, &mut buf);
        assert_eq!(frames, vec![&b"one"[..], &b"two!"[..], &b"x"[..]]);
        assert!(buf.is_empty());
    }

    #[test]
    fn incomplete_frame_leaves_the_buffer_and_reserves_the_rest() {
        let mut decoder = LengthDecoder::new(1 << 20);
        let mut buf = BytesMut::new();
        buf.put_slice(&[0, 0]);
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert_eq!(&buf[..], &[0, 0]);
        buf.put_slice(&[0x40, 0x00]); // 16 KiB
        buf.put_slice(b"abc");
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert_eq!(buf.len(), 7);
        assert!(buf.capacity() >= LENGTH_PREFIX_BYTES + 0x4000);
    }

    #[test]
    fn zero_length_frame_is_an_error() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(
            LengthDecoder::new(16).decode(&mut buf),
            Err(TcpFrameError::Empty)
        );
    }

    #[test]
    fn oversized_frame_is_rejected_from_the_prefix_alone() {
        let mut decoder = LengthDecoder::new(16);
        let mut buf = BytesMut::from(&length_prefix(17)[..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Err(TcpFrameError::TooBig {
                frame_bytes: 17,
                frame_bytes_max: 16
            })
        );
        let mut buf = BytesMut::from(&[0xFFu8, 0xFF, 0xFF, 0xFF][..]);
        assert!(matches!(
            decoder.decode(&mut buf),
            Err(TcpFrameError::TooBig { .. })
        ));
        let mut buf = framed(&[&[7u8; 16]]);
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Bytes::from(vec![7u8; 16])))
        );
    }

    proptest! {
        /// Whatever the read sizes, the same frames come out.
        #[test]
        fn any_chunking_gives_the_same_frames(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..20),
            chunk_bytes in prop::collection::vec(1usize..64, 1..8),
        ) {
            let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let wire = framed(&slices);
            let mut decoder = LengthDecoder::new(300);
            let mut buf = BytesMut::new();
            let mut frames = Vec::new();
            let mut offset = 0;
            for chunk in chunk_bytes.iter().cycle() {
                if offset == wire.len() {
                    break;
                }
                let end = (offset + chunk).min(wire.len());
                buf.put_slice(&wire[offset..end]);
                offset = end;
                frames.extend(decode_all(&mut decoder, &mut buf));
            }
            prop_assert_eq!(frames, payloads);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut decoder = LengthDecoder::new(64);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(frame)) = decoder.decode(&mut buf) {
                prop_assert!(!frame.is_empty() && frame.len() <= 64);
            }
        }
    }
}
