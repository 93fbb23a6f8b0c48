//! What happens to every decoded, authorised client frame (shard-local: one
//! [`ClusterHandler`] per shard). `send` becomes one upstream record on Kafka (the ack comes
//! back from storage-writer once the message is durable, never from here); `sync`, `read`
//! and `recall` go to storage-reader over gRPC and their answers come back on the same
//! connection with the `request_id`; `ping` is answered at once.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use chatify_core::ids::{MessageId, SessionId};
use chatify_core::routing::unix_now_ms;
use chatify_proto::Message as _;
use chatify_proto::bus::v1::{UpstreamCommand, upstream_command};
use chatify_proto::client::v1::{
    ErrorCode, Pong, client_frame::Frame as ClientFrame, server_frame::Frame as ServerFrame,
};

use crate::reader_bridge::{ReaderBridge, ReaderCall};
use crate::shard::{LiveConnection, ShardCluster};
use crate::upstream::{Pending, ProduceError, Upstream};

/// Most `sync` / `read` / `recall` requests one connection may have waiting on the reader.
pub const READER_IN_FLIGHT_MAX: u32 = 16;

/// Which transport a connection uses (replies go back in the matching encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket text frames (JSON).
    WebSocketText,
    /// WebSocket binary frames (protobuf).
    WebSocketBinary,
    /// Length-prefixed protobuf over TCP.
    Tcp,
}

/// What a handler knows about the connection a frame came from. Shard-local.
#[derive(Debug, Clone)]
pub struct ConnectionContext {
    /// The connection's entry in the shard's table: its id (node-unique: the shard index
    /// is in the high bits), identity, outbound queue and reader requests in flight.
    pub(crate) live: Rc<LiveConnection>,
    pub transport: Transport,
}

/// Message ids without coordination (shard-local): a UUIDv7 whose time is the receive
/// time and whose other bits are this node's tag, the shard, the boot nonce and a
/// per-shard counter, so two gateways, two shards or two runs never make the same id.
#[derive(Debug)]
pub struct MessageIds {
    node_tag: [u8; 3],
    shard: u8,
    boot_nonce: [u8; 2],
    counter: Cell<u32>,
}

impl MessageIds {
    pub fn new(node_id: &str, shard: usize, boot_nonce: u32) -> Self {
        // FNV-1a of the node id: a stable tag, different for different node ids.
        let mut hash: u32 = 0x811c_9dc5;
        for byte in node_id.bytes() {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        let tag = hash.to_be_bytes();
        let nonce = boot_nonce.to_be_bytes();
        Self {
            node_tag: [tag[1], tag[2], tag[3]],
            shard: shard as u8,
            boot_nonce: [nonce[2], nonce[3]],
            counter: Cell::new(0),
        }
    }

    pub fn next(&self, received_at_ms: u64) -> MessageId {
        let counter = self.counter.get().wrapping_add(1);
        self.counter.set(counter);
        let count = counter.to_be_bytes();
        // 10 bytes after the time: the UUID version takes the high nibble of the first and
        // the variant the top two bits of the third, so the nonce and node tag lose those
        // bits; the shard and the counter are whole in the last five.
        let bits = [
            self.boot_nonce[0],
            self.boot_nonce[1],
            self.node_tag[0],
            self.node_tag[1],
            self.node_tag[2],
            self.shard,
            count[0],
            count[1],
            count[2],
            count[3],
        ];
        MessageId::from_unix_ms_and_bits(received_at_ms, bits)
    }
}

/// The per-shard frame handler.
#[derive(Debug)]
pub struct ClusterHandler {
    node_id: Arc<str>,
    upstream: Arc<Upstream>,
    reader: Option<ReaderBridge>,
    ids: MessageIds,
}

fn error(
    code: ErrorCode,
    reason: impl Into<String>,
    client_msg_id: Option<String>,
    request_id: Option<String>,
) -> ServerFrame {
    ServerFrame::Error(chatify_proto::client::v1::Error {
        code: code.into(),
        reason: reason.into(),
        client_msg_id,
        request_id,
    })
}

impl ClusterHandler {
    pub fn new(shard: usize, cluster: &ShardCluster) -> Self {
        Self {
            node_id: Arc::clone(&cluster.node_id),
            upstream: Arc::clone(&cluster.upstream),
            reader: cluster.reader.clone(),
            ids: MessageIds::new(&cluster.node_id, shard, cluster.boot_nonce),
        }
    }

    /// Handles one frame. An immediate reply (if any) is returned; answers that take a
    /// round trip are queued on the connection's outbound queue when they arrive.
    pub fn handle(
        &self,
        connection: &ConnectionContext,
        frame: ClientFrame,
    ) -> Option<ServerFrame> {
        match frame {
            ClientFrame::Ping(ping) => Some(ServerFrame::Pong(Pong {
                timestamp: ping.timestamp,
            })),
            ClientFrame::Pong(_) => None,
            ClientFrame::Auth(_) => Some(error(
                ErrorCode::BadRequest,
                "already authenticated",
                None,
                None,
            )),
            ClientFrame::Send(send) => self.send(connection, send),
            ClientFrame::Sync(sync) => self.ask_reader(
                connection,
                sync.request_id.clone(),
                ReaderCall::Sync {
                    session_id: sync.session_id,
                    after_seq: sync.after_seq,
                    limit: sync.limit,
                },
            ),
            ClientFrame::Read(read) => self.ask_reader(
                connection,
                read.request_id.clone(),
                ReaderCall::Read {
                    session_id: read.session_id,
                    seq: read.seq,
                },
            ),
            ClientFrame::Recall(recall) => self.ask_reader(
                connection,
                recall.request_id.clone(),
                ReaderCall::Recall {
                    message_id: recall.message_id,
                },
            ),
        }
    }

    /// One upstream record per `send`; nothing is acked here.
    fn send(
        &self,
        connection: &ConnectionContext,
        send: chatify_proto::client::v1::Send,
    ) -> Option<ServerFrame> {
        let identity = &connection.live.identity;
        // Validated before (`connection::validate`): exactly one target, well formed.
        let session = match (&send.receiver_id, &send.session_id) {
            (Some(receiver), _) => SessionId::single(identity.user_id(), receiver),
            (None, Some(session)) => SessionId::parse(session),
            (None, None) => Err(chatify_core::ids::IdError::BadSession),
        };
        let Ok(session) = session else {
            return Some(error(
                ErrorCode::BadRequest,
                "no valid receiver_id or session_id",
                Some(send.client_msg_id),
                send.request_id,
            ));
        };
        let received_at_ms = unix_now_ms();
        let message_id = self.ids.next(received_at_ms);
        let session_key = session.to_string();
        let client_msg_id = send.client_msg_id.clone();
        let request_id = send.request_id.clone();
        let command = UpstreamCommand {
            sender_id: identity.user_id().to_owned(),
            device_id: identity.device_id().to_owned(),
            node_id: self.node_id.to_string(),
            connection_id: connection.live.connection_id,
            received_at_ms: received_at_ms as i64,
            session_id: session_key.clone(),
            message_id: message_id.to_string(),
            command: Some(upstream_command::Command::Send(send)),
        };
        let pending = Pending::Send {
            connection_id: connection.live.connection_id,
            client_msg_id: client_msg_id.clone(),
            request_id: request_id.clone(),
        };
        match self
            .upstream
            .send_upstream(&session_key, &command.encode_to_vec(), pending)
        {
            Ok(()) => {
                metrics::counter!("chatify_gateway_messages_sent_total").increment(1);
                None
            }
            Err(ProduceError::QueueFull) => Some(error(
                ErrorCode::Unavailable,
                "the message bus is saturated; resend later",
                Some(client_msg_id),
                request_id,
            )),
            Err(ProduceError::Kafka(kafka)) => {
                tracing::warn!(error = %kafka, "upstream produce failed");
                Some(error(
                    ErrorCode::Unavailable,
                    "the message bus is unavailable; resend later",
                    Some(client_msg_id),
                    request_id,
                ))
            }
        }
    }

    /// Forwards to storage-reader; the answer is queued when it arrives.
    fn ask_reader(
        &self,
        connection: &ConnectionContext,
        request_id: Option<String>,
        call: ReaderCall,
    ) -> Option<ServerFrame> {
        let Some(reader) = self.reader.clone() else {
            return Some(error(
                ErrorCode::Unavailable,
                "history service is not configured on this gateway",
                None,
                request_id,
            ));
        };
        let live = Rc::clone(&connection.live);
        let in_flight = &live.reader_in_flight;
        if in_flight.get() >= READER_IN_FLIGHT_MAX {
            return Some(error(
                ErrorCode::RateLimited,
                format!("at most {READER_IN_FLIGHT_MAX} history requests may wait at once"),
                None,
                request_id,
            ));
        }
        in_flight.set(in_flight.get() + 1);
        let transport = connection.transport;
        monoio::spawn(async move {
            let answer = reader.call(live.identity.user_id(), request_id, call).await;
            live.reader_in_flight
                .set(live.reader_in_flight.get().saturating_sub(1));
            if let Some(answer) = answer {
                let (binary, payload) = crate::shard::encode_reply(transport, answer);
                if live.queue.push(binary, payload).is_err() {
                    live.queue.close_with(1008, "slow consumer", true);
                }
            }
        });
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_unique_across_nodes_shards_and_runs_and_ordered_by_time() {
        let a = MessageIds::new("gw-1", 0, 7);
        let b = MessageIds::new("gw-2", 0, 7);
        let c = MessageIds::new("gw-1", 1, 7);
        let d = MessageIds::new("gw-1", 0, 8);
        let at = 1_700_000_000_000;
        let ids = [a.next(at), b.next(at), c.next(at), d.next(at), a.next(at)];
        let unique: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        assert!(a.next(at + 1) > ids[4]);
        assert_eq!(ids[0].timestamp_ms(), at);
        assert_eq!(ids[0].as_uuid().get_version_num(), 7);
    }
}
