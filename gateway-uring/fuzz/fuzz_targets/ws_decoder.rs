//! Fuzz target: arbitrary bytes through the WebSocket frame decoder, all at once and in small
//! reads; it must return messages, ask for more, or fail, never panic or exceed its limits.
#![no_main]

#[path = "../../src/conn/ws.rs"]
#[allow(dead_code)]
mod ws;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

const FRAME_BYTES_MAX: usize = 256;
const MESSAGE_BYTES_MAX: usize = 1024;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size, so chunked feeding is explored too.
    let Some((&read_bytes, data)) = data.split_first() else {
        return;
    };
    for read_bytes in [data.len().max(1), usize::from(read_bytes).max(1)] {
        let mut decoder = ws::FrameDecoder::new(FRAME_BYTES_MAX, MESSAGE_BYTES_MAX);
        let mut buf = BytesMut::new();
        'feed: for read in data.chunks(read_bytes) {
            buf.extend_from_slice(read);
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(ws::Message::Text(payload))) => {
                        assert!(payload.len() <= MESSAGE_BYTES_MAX);
                        assert!(std::str::from_utf8(&payload).is_ok());
                    }
                    Ok(Some(ws::Message::Binary(payload))) => {
                        assert!(payload.len() <= MESSAGE_BYTES_MAX);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(error) => {
                        assert!(matches!(error.close_code(), 1002 | 1007 | 1009));
                        break 'feed;
                    }
                }
            }
        }
    }
});
