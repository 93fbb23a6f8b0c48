//! Fuzz target: arbitrary bytes through the upgrade-request parser; it must never panic, and
//! whatever it accepts fits the header limit.
#![no_main]

#[path = "../../src/conn/ws.rs"]
#[allow(dead_code)]
mod ws;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, consumed))) = ws::parse_upgrade(data) {
        assert!(consumed <= ws::HANDSHAKE_BYTES_MAX && consumed <= data.len());
    }
});
