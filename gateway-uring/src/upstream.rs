//! The node's Kafka producer (crosses shards: one per node behind an `Arc`). Every client
//! `send` becomes one `UpstreamCommand` on `{prefix}.upstream`, keyed by session id so one
//! session stays ordered; presence events and device-replaced kicks go out through it too.
//!
//! Why a `ThreadedProducer` and not rdkafka's `FutureProducer`: awaiting a `FutureProducer`
//! on a monoio shard panics once its queue is full, because its retry sleeps on tokio timers
//! and there is no tokio reactor on a shard. Here `send` never waits: it enqueues into
//! librdkafka's bounded queue (`CHATIFY_UPSTREAM_QUEUE_MESSAGES_MAX`) or fails at once with
//! [`ProduceError::QueueFull`], and the outcome comes back through the delivery callback on
//! librdkafka's poll thread, which hands a failure to the owning shard's inbox. The gateway
//! never acks a message itself: the ack comes from storage-writer once it is durable.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};

use crate::shard::ShardCommand;

/// What a produced record was for, handed back with its delivery report.
#[derive(Debug)]
pub enum Pending {
    /// A client's `send`: a failure is answered `unavailable` on that connection.
    Send {
        connection_id: u64,
        client_msg_id: String,
        request_id: Option<String>,
    },
    /// A presence event or a kick: a failure is logged and counted.
    Event { kind: &'static str },
}

/// Why a record was not enqueued.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// librdkafka's queue is at its bound (the broker is slow or gone).
    #[error("upstream queue full")]
    QueueFull,
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// Producer callbacks: delivery reports go back to the shard that owns the connection.
#[derive(Debug, Default)]
pub struct UpstreamContext {
    /// Set once the shards exist (the producer is created first).
    shards: OnceLock<Vec<flume::Sender<ShardCommand>>>,
}

impl ClientContext for UpstreamContext {}

impl ProducerContext for UpstreamContext {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Self::DeliveryOpaque) {
        let Err((error, _)) = result else {
            metrics::counter!("chatify_gateway_upstream_delivered_total").increment(1);
            return;
        };
        match *pending {
            Pending::Send {
                connection_id,
                client_msg_id,
                request_id,
            } => {
                metrics::counter!("chatify_gateway_upstream_failed_total").increment(1);
                tracing::warn!(%error, connection_id, %client_msg_id, "upstream send failed");
                let shard = crate::shard::shard_of(connection_id);
                let Some(inbox) = self.shards.get().and_then(|shards| shards.get(shard)) else {
                    return;
                };
                let command = ShardCommand::UpstreamFailed {
                    connection_id,
                    client_msg_id,
                    request_id,
                };
                // Never block librdkafka's thread: a full inbox drops the answer (counted);
                // the client's own ack timeout makes it resend.
                if inbox.try_send(command).is_err() {
                    metrics::counter!("chatify_gateway_upstream_failure_answers_dropped_total")
                        .increment(1);
                }
            }
            Pending::Event { kind } => {
                metrics::counter!("chatify_gateway_events_failed_total", "kind" => kind)
                    .increment(1);
                tracing::warn!(%error, kind, "event not produced");
            }
        }
    }
}

/// The node's producer. Crosses shards.
pub struct Upstream {
    producer: ThreadedProducer<UpstreamContext>,
    upstream_topic: String,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("upstream_topic", &self.upstream_topic)
            .finish_non_exhaustive()
    }
}

/// Producer settings.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub bootstrap_servers: String,
    pub upstream_topic: String,
    pub node_id: String,
    pub queue_messages_max: u32,
    pub timeout_ms: u64,
    pub idempotence: bool,
}

impl Upstream {
    pub fn new(settings: &UpstreamSettings) -> Result<Arc<Self>, KafkaError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &settings.bootstrap_servers)
            .set("client.id", format!("gateway-{}", settings.node_id))
            // Idempotent with acks=all: librdkafka's own retries never duplicate or reorder
            // a session's records.
            .set("enable.idempotence", settings.idempotence.to_string())
            .set("acks", "all");
        if !settings.idempotence {
            // One request in flight per broker keeps partition order across retries.
            config.set("max.in.flight.requests.per.connection", "1");
        }
        let producer = config
            .set("linger.ms", "1")
            .set(
                "queue.buffering.max.messages",
                settings.queue_messages_max.to_string(),
            )
            .set("message.timeout.ms", settings.timeout_ms.to_string())
            .create_with_context(UpstreamContext::default())?;
        Ok(Arc::new(Self {
            producer,
            upstream_topic: settings.upstream_topic.clone(),
        }))
    }

    /// Lets delivery reports reach the shards (their inboxes, by shard index).
    pub fn attach_shards(&self, inboxes: Vec<flume::Sender<ShardCommand>>) {
        let _ = self.producer.context().shards.set(inboxes);
    }

    /// Enqueues one upstream record; never waits.
    pub fn send_upstream(
        &self,
        session_key: &str,
        payload: &[u8],
        pending: Pending,
    ) -> Result<(), ProduceError> {
        self.produce(&self.upstream_topic, session_key, payload, pending)
    }

    /// Enqueues a record on any topic (presence events, kicks); never waits.
    pub fn produce(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        pending: Pending,
    ) -> Result<(), ProduceError> {
        let record = BaseRecord::with_opaque_to(topic, Box::new(pending))
            .key(key)
            .payload(payload);
        match self.producer.send(record) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                metrics::counter!("chatify_gateway_upstream_queue_full_total").increment(1);
                Err(ProduceError::QueueFull)
            }
            Err((error, _)) => Err(ProduceError::Kafka(error)),
        }
    }

    /// Waits (blocking) for what is queued to be delivered, at most `timeout`.
    pub fn flush(&self, timeout: Duration) {
        if let Err(error) = self.producer.flush(timeout) {
            tracing::warn!(%error, "upstream records left unflushed at shutdown");
        }
    }
}
