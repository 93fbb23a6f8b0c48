//! Chatify benchmarks: criterion micro-benchmarks of hot paths in `benches/`, and (with the
//! load engine) side-by-side whole-system comparisons against named baselines.
//! Results and the commands that produced them live in docs/BENCHMARKS.md.

use chatify_proto::client::v1::{ChatMessage, Deliver, MessageType, server_frame};

/// A representative `deliver` frame with `content_bytes` of text content.
pub fn sample_deliver(content_bytes: usize) -> server_frame::Frame {
    server_frame::Frame::Deliver(Deliver {
        message: Some(ChatMessage {
            message_id: "01936f0e-8b2a-7c3d-9e4f-a1b2c3d4e5f6".into(),
            session_id: "p2p:user-000001:user-000002".into(),
            seq: 123_456,
            sender_id: "user-000001".into(),
            message_type: MessageType::Text.into(),
            content: "x".repeat(content_bytes),
            timestamp: 1_732_694_400_000,
            burn_after_seconds: None,
            recalled: false,
        }),
    })
}
