//! Step 7: what the batch tells the world, built as a list of Kafka records and produced
//! together. Routes of every user concerned are read in one Redis round trip; a message
//! becomes one push record per gateway node that holds a recipient (carrying that node's
//! connection ids), never one record per member. Push records and message events are keyed
//! by session id, so a gateway sees one session's pushes in seq order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chatify_core::ids::MessageId;
use chatify_core::routing::{self, Route};
use chatify_core::topics::Topics;
use chatify_proto::Message as _;
use chatify_proto::bus::v1::{DeadLetter, MessageEvent, PushRecord, message_event};
use chatify_proto::client::v1::{self as client, ErrorCode, server_frame};
use futures::future::try_join_all;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord};
use redis::aio::ConnectionManager;

use crate::cache::StoredMessage;
use crate::error::StoreFailure;
use crate::record::{Incoming, Origin, Poison};

/// One record to produce.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    /// A push to a gateway node whose topic does not exist (a node id from a stale route)
    /// is dropped and counted instead of blocking the partition: its clients catch up with
    /// `sync` when they reconnect.
    pub droppable: bool,
}

/// A stored message and who should receive it.
#[derive(Debug)]
pub struct Delivery<'a> {
    pub stored: StoredMessage<'a>,
    /// Every member of the session (the sender included).
    pub members: &'a [String],
}

/// A resend answered with the original ack.
#[derive(Debug)]
pub struct Resend<'a> {
    pub message: &'a Incoming,
    pub message_id: MessageId,
    pub seq: u64,
}

/// A send refused with an `error` (not a member, unknown group).
#[derive(Debug)]
pub struct Refusal<'a> {
    pub message: &'a Incoming,
    pub code: ErrorCode,
    pub reason: String,
}

/// Everything a batch publishes.
#[derive(Debug, Default)]
pub struct Outbox<'a> {
    pub deliveries: Vec<Delivery<'a>>,
    pub resends: Vec<Resend<'a>>,
    pub refusals: Vec<Refusal<'a>>,
    pub poison: Vec<&'a Poison>,
}

/// Builds every record of the batch; reads the routes it needs in one round trip.
pub async fn build(
    redis: &mut ConnectionManager,
    topics: &Topics,
    outbox: &Outbox<'_>,
    now_ms: i64,
) -> Result<Vec<Outgoing>, StoreFailure> {
    let mut users: BTreeSet<&str> = BTreeSet::new();
    for delivery in &outbox.deliveries {
        users.extend(delivery.members.iter().map(String::as_str));
    }
    for resend in &outbox.resends {
        users.insert(&resend.message.sender_id);
    }
    let users: Vec<&str> = users.into_iter().collect();
    let routes: HashMap<&str, Vec<Route>> = users
        .iter()
        .copied()
        .zip(routing::lookup_routes(redis, &users).await?)
        .collect();
    let no_routes = Vec::new();
    let routes_of = |user: &str| routes.get(user).unwrap_or(&no_routes);

    let mut out = Vec::new();
    for delivery in &outbox.deliveries {
        let message = delivery.stored.message;
        let session_key = message.session.to_string();
        let ack = ack_frame(message, &message.message_id, delivery.stored.seq);
        push_ack(&mut out, topics, &session_key, message, routes_of, ack);

        // Every device of every member except the connection that sent it.
        let mut by_node: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for member in delivery.members {
            for route in routes_of(member) {
                let is_origin = route.node_id == message.origin.node_id
                    && route.connection_id == message.origin.connection_id;
                if !is_origin {
                    by_node
                        .entry(&route.node_id)
                        .or_default()
                        .push(route.connection_id);
                }
            }
        }
        if !by_node.is_empty() {
            let frame = client::ServerFrame {
                frame: Some(server_frame::Frame::Deliver(client::Deliver {
                    message: Some(delivery.stored.chat_message()),
                })),
            };
            for (node, mut connection_ids) in by_node {
                connection_ids.sort_unstable();
                connection_ids.dedup();
                out.push(push(
                    topics,
                    node,
                    &session_key,
                    PushRecord {
                        connection_ids,
                        user_ids: Vec::new(),
                        frame: Some(frame.clone()),
                        close_code: None,
                    },
                ));
            }
        }
        out.push(Outgoing {
            topic: topics.message_events(),
            droppable: false,
            key: Some(session_key.clone()),
            payload: MessageEvent {
                event_id: format!("stored:{}", message.message_id),
                kind: message_event::Kind::Stored as i32,
                session_id: session_key,
                operator_id: message.sender_id.clone(),
                message_id: message.message_id.to_string(),
                seq: delivery.stored.seq,
                timestamp: message.timestamp_ms,
            }
            .encode_to_vec(),
        });
    }
    for resend in &outbox.resends {
        let message = resend.message;
        let ack = ack_frame(message, &resend.message_id, resend.seq);
        push_ack(
            &mut out,
            topics,
            &message.session.to_string(),
            message,
            routes_of,
            ack,
        );
    }
    for refusal in &outbox.refusals {
        let message = refusal.message;
        out.push(error_push(
            topics,
            &message.origin,
            &message.session.to_string(),
            client::Error {
                code: refusal.code as i32,
                reason: refusal.reason.clone(),
                client_msg_id: Some(message.client_msg_id.clone()),
                request_id: message.request_id.clone(),
            },
        ));
    }
    for poison in &outbox.poison {
        out.push(Outgoing {
            topic: topics.upstream_dlq(),
            droppable: false,
            key: None,
            payload: DeadLetter {
                original: poison.original.clone(),
                reason: poison.reason.clone(),
                source_topic: topics.upstream(),
                source_partition: poison.position.partition,
                source_offset: poison.position.offset,
                failed_at_ms: now_ms,
            }
            .encode_to_vec(),
        });
        if let Some(reply) = &poison.reply {
            out.push(error_push(
                topics,
                &reply.origin,
                &reply.sender_id,
                client::Error {
                    code: reply.code as i32,
                    reason: poison.reason.clone(),
                    client_msg_id: reply.client_msg_id.clone(),
                    request_id: reply.request_id.clone(),
                },
            ));
        }
    }
    Ok(out)
}

fn ack_frame(message: &Incoming, message_id: &MessageId, seq: u64) -> client::ServerFrame {
    client::ServerFrame {
        frame: Some(server_frame::Frame::Ack(client::Ack {
            client_msg_id: message.client_msg_id.clone(),
            message_id: message_id.to_string(),
            session_id: message.session.to_string(),
            seq,
            timestamp: message_id.timestamp_ms() as i64,
        })),
    }
}

/// The ack goes to the connection that sent the message and to every device of the sender
/// (`user_ids`) on each node the sender is connected to.
fn push_ack<'r>(
    out: &mut Vec<Outgoing>,
    topics: &Topics,
    session_key: &str,
    message: &Incoming,
    routes_of: impl Fn(&str) -> &'r Vec<Route>,
    ack: client::ServerFrame,
) {
    let mut nodes: BTreeSet<&str> = routes_of(&message.sender_id)
        .iter()
        .map(|route| route.node_id.as_str())
        .collect();
    nodes.insert(&message.origin.node_id);
    for node in nodes {
        let connection_ids = if node == message.origin.node_id {
            vec![message.origin.connection_id]
        } else {
            Vec::new()
        };
        out.push(push(
            topics,
            node,
            session_key,
            PushRecord {
                connection_ids,
                user_ids: vec![message.sender_id.clone()],
                frame: Some(ack.clone()),
                close_code: None,
            },
        ));
    }
}

fn error_push(topics: &Topics, origin: &Origin, key: &str, error: client::Error) -> Outgoing {
    push(
        topics,
        &origin.node_id,
        key,
        PushRecord {
            connection_ids: vec![origin.connection_id],
            user_ids: Vec::new(),
            frame: Some(client::ServerFrame {
                frame: Some(server_frame::Frame::Error(error)),
            }),
            close_code: None,
        },
    )
}

fn push(topics: &Topics, node: &str, key: &str, record: PushRecord) -> Outgoing {
    Outgoing {
        topic: topics.push(node),
        droppable: true,
        key: Some(key.to_owned()),
        payload: record.encode_to_vec(),
    }
}

/// Produces every record and waits until the broker has all of them (acks=all).
pub async fn produce(
    producer: &FutureProducer,
    records: &[Outgoing],
    timeout: Duration,
) -> Result<(), StoreFailure> {
    let sends = records.iter().map(|record| async move {
        let mut future = FutureRecord::to(&record.topic).payload(&record.payload);
        if let Some(key) = &record.key {
            future = future.key(key);
        }
        match producer.send(future, timeout).await {
            Ok(_) => Ok(()),
            Err((error, _))
                if record.droppable
                    && matches!(
                        error.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::UnknownTopicOrPartition
                                | RDKafkaErrorCode::UnknownTopic
                        )
                    ) =>
            {
                tracing::warn!(topic = %record.topic, "dropping a push to a gateway node with no topic");
                metrics::counter!("chatify_writer_pushes_dropped_total").increment(1);
                Ok(())
            }
            Err((error, _)) => Err(StoreFailure::Kafka(error)),
        }
    });
    try_join_all(sends).await?;
    Ok(())
}
