//! What a shard does with the commands the push consumer and the producer send it
//! (shard-local): each pushed frame goes into the outbound queue of every target connection
//! the shard owns, as the shared `Bytes` in that connection's wire format; a target that
//! has gone is dropped and counted, a target that cannot keep up is disconnected.

use chatify_proto::client::v1::{ErrorCode, server_frame::Frame as Reply};

use super::Shard;
use super::connection::encode_reply;
use super::writer::QueueFull;
use crate::handler::Transport;
use crate::push::PushItem;

fn outcome(outcome: &'static str) {
    metrics::counter!("chatify_gateway_pushes_total", "outcome" => outcome).increment(1);
}

/// Delivers one batch of push items to this shard's connections.
pub(super) fn deliver(shard: &Shard, items: &[PushItem]) {
    let now_ms = chatify_core::routing::unix_now_ms();
    for item in items {
        let mut targets: Vec<u64> = item.connection_ids.clone();
        if !item.user_ids.is_empty() {
            let users = shard.users.borrow();
            for user in item.user_ids.iter() {
                users.connections_of(user, &mut targets);
            }
            targets.sort_unstable();
            targets.dedup();
        }
        let connections = shard.connections.borrow();
        for connection_id in targets {
            let Some(live) = connections.get(&connection_id) else {
                outcome("gone");
                continue;
            };
            let frame = &item.frame;
            let binary = live.push_binary.get();
            let payload = if binary {
                frame.protobuf.clone()
            } else {
                frame.json.clone()
            };
            match live.queue.push(binary, payload) {
                Ok(()) => outcome("queued"),
                Err(QueueFull) => {
                    outcome("slow_consumer");
                    metrics::counter!("chatify_gateway_refusals_total", "reason" => "slow_consumer")
                        .increment(1);
                    live.queue.close_with(1008, "slow consumer", true);
                    continue;
                }
            }
            if let Some((code, reason)) = frame.close {
                live.queue.close(code, reason);
                metrics::counter!("chatify_gateway_kicks_total").increment(1);
            }
        }
        if let Some(produced_at_ms) = item.frame.produced_at_ms {
            let lag_ms = (now_ms as i64).saturating_sub(produced_at_ms).max(0);
            metrics::histogram!("chatify_gateway_push_latency_seconds")
                .record(lag_ms as f64 / 1000.0);
        }
    }
}

/// The broker did not take a `send`: the client gets `unavailable` for that message.
pub(super) fn answer_upstream_failure(
    shard: &Shard,
    connection_id: u64,
    client_msg_id: String,
    request_id: Option<String>,
) {
    let Some(live) = shard.connections.borrow().get(&connection_id).cloned() else {
        return;
    };
    let transport = if live.push_binary.get() {
        Transport::WebSocketBinary
    } else {
        Transport::WebSocketText
    };
    let reply = Reply::Error(chatify_proto::client::v1::Error {
        code: ErrorCode::Unavailable.into(),
        reason: "the message bus did not take the message in time; resend it".into(),
        client_msg_id: Some(client_msg_id),
        request_id,
    });
    let (binary, payload) = encode_reply(transport, reply);
    if live.queue.push(binary, payload).is_err() {
        live.queue.close_with(1008, "slow consumer", true);
    }
}
