//! Fuzz target: arbitrary bytes through the TCP length-prefix decoder; frames come out within
//! the limit and non-empty, or it asks for more, or it fails, never panics.
#![no_main]

#[path = "../../src/conn/tcp.rs"]
#[allow(dead_code)]
mod tcp;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

const FRAME_BYTES_MAX: usize = 512;

fuzz_target!(|data: &[u8]| {
    let mut decoder = tcp::LengthDecoder::new(FRAME_BYTES_MAX);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decoder.decode(&mut buf) {
        assert!(!frame.is_empty() && frame.len() <= FRAME_BYTES_MAX);
    }
});
