//! What the reader tells online clients and other services after a command: `recalled` and
//! `read_receipt` frames pushed to the members' live connections, one push record per
//! gateway node (as the writer publishes them), and a message event; and the `kicked`
//! pushes of [`crate::admin`]. Records are keyed by session id (kicks: by user id), so a
//! gateway sees one session's pushes in order.

use chatify_core::ids::SessionId;
use chatify_core::producer::RenewableProducer;
use chatify_core::routing;
use chatify_core::topics::Topics;
use chatify_proto::Message as _;
use chatify_proto::bus::v1::{MessageEvent, PushRecord, message_event};
use chatify_proto::client::v1::ServerFrame;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::FutureRecord;
use redis::aio::ConnectionManager;
use sqlx::PgPool;

use crate::error::ReaderError;

/// How long the broker may take to acknowledge a record.
const PRODUCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Publishes pushes and events.
#[derive(Clone)]
pub struct Notifier {
    /// Replaced after a failed produce (see [`RenewableProducer`]).
    pub producer: RenewableProducer,
    pub topics: Topics,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

/// Every member of a session (the pair of a single chat, the rows of a group).
pub async fn members(postgres: &PgPool, session: &SessionId) -> Result<Vec<String>, ReaderError> {
    if let SessionId::Single { lo, hi } = session {
        return Ok(vec![lo.clone(), hi.clone()]);
    }
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT user_id FROM session_members WHERE session_id = $1")
            .bind(session.to_string())
            .fetch_all(postgres)
            .await?;
    Ok(rows.into_iter().map(|(user,)| user).collect())
}

impl Notifier {
    /// Pushes `frame` to every live connection of `users` (one record per gateway node)
    /// and publishes `event`; waits for the broker to have all of it.
    pub async fn publish(
        &self,
        redis: &mut ConnectionManager,
        session: &SessionId,
        users: &[&str],
        frame: ServerFrame,
        event: MessageEvent,
    ) -> Result<(), ReaderError> {
        let by_node = routing::lookup_by_node(redis, users).await?;
        let mut records: Vec<(String, Vec<u8>)> = by_node
            .into_iter()
            .map(|(node, targets)| {
                let record = PushRecord {
                    connection_ids: targets.connection_ids,
                    user_ids: Vec::new(),
                    frame: Some(frame.clone()),
                    close_code: None,
                };
                (self.topics.push(&node), record.encode_to_vec())
            })
            .collect();
        let pushes = records.len();
        records.push((self.topics.message_events(), event.encode_to_vec()));
        self.send(&session.to_string(), &records, pushes).await?;
        Ok(())
    }

    /// Publishes one push record per gateway node (`node`, record), keyed by `key`; waits
    /// for the broker. Returns whether each record was delivered (false: the node has no
    /// push topic, a stale route).
    pub async fn push(
        &self,
        key: &str,
        records: Vec<(String, PushRecord)>,
    ) -> Result<Vec<bool>, ReaderError> {
        let records: Vec<(String, Vec<u8>)> = records
            .into_iter()
            .map(|(node, record)| (self.topics.push(&node), record.encode_to_vec()))
            .collect();
        self.send(key, &records, records.len()).await
    }

    /// Sends `(topic, payload)` records keyed by `key` and waits for every acknowledgement.
    /// The first `pushes` records are gateway pushes: one to a topic that does not exist is
    /// dropped (counted, reported false); any other failure is Unavailable.
    async fn send(
        &self,
        key: &str,
        records: &[(String, Vec<u8>)],
        pushes: usize,
    ) -> Result<Vec<bool>, ReaderError> {
        let producer = self.producer.get();
        let sends = records.iter().map(|(topic, payload)| {
            producer.send(
                FutureRecord::to(topic).key(key).payload(payload),
                PRODUCE_TIMEOUT,
            )
        });
        // The timeout given to `send` bounds only the wait for room in the producer's queue;
        // without this one a broker that never answers would hold the call for the
        // producer's `message.timeout.ms` (librdkafka's default: 5 minutes).
        let results = tokio::time::timeout(PRODUCE_TIMEOUT, futures::future::join_all(sends))
            .await
            .map_err(|_| {
                self.producer.renew("no acknowledgement in time");
                ReaderError::Unavailable {
                    store: "kafka",
                    reason: format!("no acknowledgement within {} s", PRODUCE_TIMEOUT.as_secs()),
                }
            })?;
        let mut delivered = Vec::with_capacity(records.len());
        for (index, result) in results.into_iter().enumerate() {
            match result {
                Ok(_) => delivered.push(true),
                // A route naming a gateway node with no topic (a stale route): that node
                // cannot be reached; its clients catch up with `sync`.
                Err((error, _))
                    if index < pushes
                        && matches!(
                            error.rdkafka_error_code(),
                            Some(
                                RDKafkaErrorCode::UnknownTopicOrPartition
                                    | RDKafkaErrorCode::UnknownTopic
                            )
                        ) =>
                {
                    tracing::warn!(topic = %records[index].0, "dropping a push to a gateway node with no topic");
                    metrics::counter!("chatify_reader_pushes_dropped_total").increment(1);
                    delivered.push(false);
                }
                Err((error, _)) => {
                    self.producer.renew("produce failed");
                    return Err(ReaderError::Unavailable {
                        store: "kafka",
                        reason: error.to_string(),
                    });
                }
            }
        }
        Ok(delivered)
    }
}

/// A message event of `kind` now.
pub fn event(
    kind: message_event::Kind,
    session: &SessionId,
    operator: &str,
    message_id: &str,
    seq: u64,
) -> MessageEvent {
    let now = now_ms();
    MessageEvent {
        event_id: format!(
            "{}:{session}:{operator}:{message_id}:{seq}",
            kind.as_str_name()
        ),
        kind: kind as i32,
        session_id: session.to_string(),
        operator_id: operator.to_owned(),
        message_id: message_id.to_owned(),
        seq,
        timestamp: now,
    }
}

/// Unix time now, in ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or_default()
}
