//! The downstream side: one dedicated thread consumes `{prefix}.push.{node}` (a consumer
//! group of this node's own) and hands each record to the shards owning its target
//! connections, one inbox command per shard per poll. A record's frame is encoded once per
//! wire format here, and the same `Bytes` go to every target connection: a record for
//! thousands of connections costs two encodes, not thousands. Crosses shards: the thread
//! holds every shard's inbox sender; what it sends are [`PushItem`]s (immutable, `Arc`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chatify_proto::Message as _;
use chatify_proto::bus::v1::PushRecord;
use chatify_proto::client::v1::{ServerFrame, server_frame::Frame};
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message as _;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;

use crate::shard::{ShardCommand, shard_of};

/// Records taken per poll before they are handed out (each shard gets one command).
const POLL_BATCH_MAX: usize = 512;
/// Longest one poll waits for a record (also how often shutdown is noticed).
const POLL_WAIT: Duration = Duration::from_millis(100);

/// A frame encoded once in each wire format, shared by every target connection.
#[derive(Debug)]
pub struct EncodedFrame {
    /// JSON text (WebSocket text frames).
    pub json: Bytes,
    /// Protobuf `ServerFrame` (WebSocket binary frames and TCP).
    pub protobuf: Bytes,
    /// Close the targets after pushing, with this code and reason (kicks).
    pub close: Option<(u16, &'static str)>,
    /// Broker timestamp of the record (Unix ms), for the push latency histogram.
    pub produced_at_ms: Option<i64>,
}

/// One record's frame and its targets on one shard.
#[derive(Debug, Clone)]
pub struct PushItem {
    pub frame: Arc<EncodedFrame>,
    /// Target connections owned by the receiving shard.
    pub connection_ids: Vec<u64>,
    /// Every connection of these users on the receiving shard.
    pub user_ids: Arc<[String]>,
}

/// Why a record was dropped without reaching a connection.
fn dropped(reason: &'static str) {
    metrics::counter!("chatify_gateway_push_dropped_total", "reason" => reason).increment(1);
}

/// Close reasons are static strings (they live in every close frame); a kick's free-form
/// reason maps onto the ones we document.
fn kick_reason(frame: &Frame) -> &'static str {
    match frame {
        Frame::Kicked(kicked) => match kicked.reason.as_str() {
            "token revoked" => "token revoked",
            "device kicked" => "device kicked",
            "replaced by a newer connection of this device" => {
                "replaced by a newer connection of this device"
            }
            _ => "kicked",
        },
        _ => "closed by the server",
    }
}

/// Decodes and encodes one record; `None` when it is unusable (counted).
pub fn encode_record(
    payload: &[u8],
    produced_at_ms: Option<i64>,
) -> Option<(PushRecord, Arc<EncodedFrame>)> {
    let Ok(mut record) = PushRecord::decode(payload) else {
        dropped("undecodable");
        return None;
    };
    let Some(frame) = record.frame.take().and_then(|frame| frame.frame) else {
        dropped("no_frame");
        return None;
    };
    let close = record.close_code.map(|code| {
        // Only codes an application may send; anything else becomes a policy close.
        let code = u16::try_from(code)
            .ok()
            .filter(|code| matches!(code, 1000 | 1001 | 1008 | 1011 | 1013 | 4000..=4999))
            .unwrap_or(1008);
        (code, kick_reason(&frame))
    });
    let json = Bytes::from(chatify_proto::json::encode_server_frame(&frame));
    let protobuf = Bytes::from(ServerFrame { frame: Some(frame) }.encode_to_vec());
    Some((
        record,
        Arc::new(EncodedFrame {
            json,
            protobuf,
            close,
            produced_at_ms,
        }),
    ))
}

/// Splits records into one list of items per shard.
pub fn split_by_shard(
    records: Vec<(PushRecord, Arc<EncodedFrame>)>,
    shard_count: usize,
) -> Vec<Vec<PushItem>> {
    let mut per_shard: Vec<Vec<PushItem>> = vec![Vec::new(); shard_count];
    for (record, frame) in records {
        let user_ids: Arc<[String]> = record.user_ids.into();
        let mut by_shard: Vec<Vec<u64>> = vec![Vec::new(); shard_count];
        for connection_id in record.connection_ids {
            match by_shard.get_mut(shard_of(connection_id)) {
                Some(ids) => ids.push(connection_id),
                None => dropped("unknown_shard"),
            }
        }
        for (shard, connection_ids) in by_shard.into_iter().enumerate() {
            if connection_ids.is_empty() && user_ids.is_empty() {
                continue;
            }
            per_shard[shard].push(PushItem {
                frame: Arc::clone(&frame),
                connection_ids,
                user_ids: Arc::clone(&user_ids),
            });
        }
    }
    per_shard
}

/// Consumer callbacks: readiness flips once this node's partitions are assigned.
struct PushContext {
    assigned: Arc<AtomicBool>,
}

impl ClientContext for PushContext {}

impl ConsumerContext for PushContext {
    /// Assigns each partition at an explicit offset (the committed one, else the end of
    /// the partition read now), and only then reports the node ready. With
    /// `auto.offset.reset=latest` alone, "latest" is resolved later, when fetching starts:
    /// a push produced between the assignment and that moment was skipped although the
    /// node already said it was ready.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                resolve_start_offsets(consumer, partitions);
                if let Err(error) = consumer.assign(partitions) {
                    tracing::error!(%error, "push partitions not assigned");
                    return;
                }
                tracing::info!(partitions = partitions.count(), "push partitions assigned");
                // The node is its group's only live member: an empty assignment is a
                // coordinator that elected a dead leader (see `run`), not readiness.
                self.assigned
                    .store(partitions.count() > 0, Ordering::Release);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.assigned.store(false, Ordering::Release);
                if let Err(error) = consumer.unassign() {
                    tracing::warn!(%error, "push partitions not unassigned");
                }
            }
            other => {
                tracing::warn!(error = ?RDKafkaErrorCode::from(other), "push consumer rebalance error");
                let _ = consumer.unassign();
            }
        }
    }
}

/// How long a rebalance waits for the committed offsets and the partition ends.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Sets every partition's start offset: the group's committed offset, else the partition's
/// end (a node new to the group has nothing to catch up on). A partition whose offsets
/// cannot be read keeps the `auto.offset.reset` behaviour (logged).
fn resolve_start_offsets(
    consumer: &BaseConsumer<PushContext>,
    partitions: &mut TopicPartitionList,
) {
    let committed = consumer
        .committed_offsets(partitions.clone(), RESOLVE_TIMEOUT)
        .map_err(|error| tracing::warn!(%error, "committed push offsets not read"))
        .ok();
    let targets: Vec<(String, i32)> = partitions
        .elements()
        .iter()
        .map(|element| (element.topic().to_owned(), element.partition()))
        .collect();
    for (topic, partition) in targets {
        let committed = committed
            .as_ref()
            .and_then(|list| list.find_partition(&topic, partition))
            .map(|element| element.offset());
        let start = match committed {
            Some(offset @ Offset::Offset(_)) => offset,
            _ => match consumer.fetch_watermarks(&topic, partition, RESOLVE_TIMEOUT) {
                Ok((_, high)) => Offset::Offset(high),
                Err(error) => {
                    tracing::warn!(%error, %topic, partition, "push partition end not read");
                    continue;
                }
            },
        };
        if let Err(error) = partitions.set_partition_offset(&topic, partition, start) {
            tracing::warn!(%error, %topic, partition, "push start offset not set");
        }
    }
}

/// Settings of the push consumer.
#[derive(Debug, Clone)]
pub struct PushSettings {
    pub bootstrap_servers: String,
    pub topic: String,
    pub node_id: String,
    /// librdkafka debug contexts (`CHATIFY_KAFKA_DEBUG`).
    pub debug: Option<String>,
}

/// The running consumer thread.
#[derive(Debug)]
pub struct PushConsumer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PushConsumer {
    /// Starts consuming; `assigned` turns true once this node's partitions are assigned.
    pub fn start(
        settings: &PushSettings,
        shards: Vec<flume::Sender<ShardCommand>>,
        assigned: Arc<AtomicBool>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let consumer: BaseConsumer<PushContext> = chatify_core::config::client_config(
            &settings.bootstrap_servers,
            &format!("gateway-{}-push", settings.node_id),
            settings.debug.as_deref(),
        )
        // One group per push topic (prefix and node): deployments sharing a broker under
        // different prefixes never share a group.
        .set("group.id", format!("chatify-gateway:{}", settings.topic))
        // Pushes are for live connections: a node that starts for the first time has
        // nothing to catch up on (its clients `sync`); a restarted one resumes at its
        // committed offset and drops what targets connections of its previous run.
        .set("auto.offset.reset", "latest")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        // Latency over batching: a push should leave the broker at once.
        .set("fetch.wait.max.ms", "10")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // Notice soon when a missing push topic gets created.
        .set("topic.metadata.refresh.interval.ms", "5000")
        .create_with_context(PushContext {
            assigned: Arc::clone(&assigned),
        })?;
        consumer.subscribe(&[&settings.topic])?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("push-consumer".into())
            .spawn({
                let stop = Arc::clone(&stop);
                let topic = settings.topic.clone();
                move || run(&consumer, &topic, &shards, &assigned, &stop)
            })
            .map_err(|error| {
                rdkafka::error::KafkaError::ClientCreation(format!("push consumer thread: {error}"))
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops consuming and joins the thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long the consumer may go without partitions before it leaves and joins its group
/// again. The node is its group's only live member, yet tansu 0.6's coordinator can complete
/// a generation whose elected leader is the node's previous, killed run: the new member is
/// handed nothing and the group stays so (docs/RELIABILITY.md). Longer than the session
/// timeout, so the dead member has expired when the node joins again.
const UNASSIGNED_REJOIN: Duration = Duration::from_secs(15);

fn run(
    consumer: &BaseConsumer<PushContext>,
    topic: &str,
    shards: &[flume::Sender<ShardCommand>],
    assigned: &AtomicBool,
    stop: &AtomicBool,
) {
    let mut unassigned_since = std::time::Instant::now();
    while !stop.load(Ordering::Acquire) {
        if assigned.load(Ordering::Acquire) {
            unassigned_since = std::time::Instant::now();
        } else if unassigned_since.elapsed() >= UNASSIGNED_REJOIN {
            metrics::counter!("chatify_gateway_push_group_rejoins_total").increment(1);
            tracing::warn!("no push partitions for {UNASSIGNED_REJOIN:?}: rejoining the group");
            consumer.unsubscribe();
            if let Err(error) = consumer.subscribe(&[topic]) {
                tracing::error!(%error, "cannot subscribe to the push topic again");
            }
            unassigned_since = std::time::Instant::now();
        }
        let mut records = Vec::new();
        let mut wait = POLL_WAIT;
        while records.len() < POLL_BATCH_MAX {
            match consumer.poll(wait) {
                None => break,
                Some(Err(error)) => {
                    tracing::warn!(%error, "push consumer error");
                    break;
                }
                Some(Ok(message)) => {
                    metrics::counter!("chatify_gateway_push_records_total").increment(1);
                    let produced_at_ms = message.timestamp().to_millis();
                    if let Some(encoded) = message
                        .payload()
                        .and_then(|payload| encode_record(payload, produced_at_ms))
                    {
                        records.push(encoded);
                    }
                }
            }
            // After the first record, take only what is already there.
            wait = Duration::ZERO;
        }
        if records.is_empty() {
            continue;
        }
        for (shard, items) in split_by_shard(records, shards.len())
            .into_iter()
            .enumerate()
        {
            if items.is_empty() {
                continue;
            }
            // A full inbox blocks this thread (bounded backpressure: the broker holds the
            // rest); a stopped shard means the node is shutting down.
            if shards[shard].send(ShardCommand::Push(items)).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatify_proto::client::v1::{Kicked, Pong};

    fn record(connection_ids: Vec<u64>, user_ids: Vec<String>, frame: Frame) -> Vec<u8> {
        PushRecord {
            connection_ids,
            user_ids,
            frame: Some(ServerFrame { frame: Some(frame) }),
            close_code: None,
        }
        .encode_to_vec()
    }

    #[test]
    fn one_record_is_encoded_once_and_split_by_owning_shard() {
        let on_shard_1 = (1_u64 << 56) | 7;
        let payload = record(
            vec![3, on_shard_1, 4, (9_u64 << 56) | 1],
            vec![],
            Frame::Pong(Pong { timestamp: Some(5) }),
        );
        let encoded = encode_record(&payload, Some(1)).expect("valid");
        let frame = Arc::clone(&encoded.1);
        let per_shard = split_by_shard(vec![encoded], 2);
        assert_eq!(per_shard[0][0].connection_ids, vec![3, 4]);
        assert_eq!(per_shard[1][0].connection_ids, vec![on_shard_1]);
        // Both shards share the one encoding.
        assert!(Arc::ptr_eq(&per_shard[0][0].frame, &frame));
        assert!(Arc::ptr_eq(&per_shard[1][0].frame, &frame));
        assert_eq!(&frame.json[..], br#"{"type":"pong","timestamp":5}"#);
    }

    #[test]
    fn user_targets_reach_every_shard_and_kicks_carry_their_close() {
        let mut payload = PushRecord {
            connection_ids: vec![],
            user_ids: vec!["u1".into()],
            frame: Some(ServerFrame {
                frame: Some(Frame::Kicked(Kicked {
                    reason: "token revoked".into(),
                })),
            }),
            close_code: Some(1008),
        }
        .encode_to_vec();
        let encoded = encode_record(&payload, None).expect("valid");
        assert_eq!(encoded.1.close, Some((1008, "token revoked")));
        let per_shard = split_by_shard(vec![encoded], 3);
        assert!(per_shard.iter().all(|items| items.len() == 1));
        payload.truncate(3);
        assert!(encode_record(&payload, None).is_none());
        assert!(
            encode_record(
                &record(vec![1], vec![], Frame::Pong(Pong::default()))[..0],
                None
            )
            .is_none()
        );
    }
}

/// `/readyz` probe: the push consumer owns its partitions (before that, pushes for this
/// node's connections would wait on the broker).
#[derive(Debug, Clone)]
pub struct PushAssignedProbe(pub Arc<AtomicBool>);

impl chatify_core::probe::Probe for PushAssignedProbe {
    fn name(&self) -> &'static str {
        "push_consumer"
    }

    fn check(&self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        let assigned = self.0.load(Ordering::Acquire);
        Box::pin(async move {
            if assigned {
                Ok(())
            } else {
                Err("push topic partitions not assigned yet".into())
            }
        })
    }
}
