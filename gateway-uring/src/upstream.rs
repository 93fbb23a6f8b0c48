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
//!
//! A producer that keeps failing is replaced: a supervisor thread swaps in a new one when
//! librdkafka reports a fatal error or every delivery has failed for twice the delivery
//! timeout. An idempotent producer whose records timed out during a broker outage can be
//! left failing for good when the broker cannot bump its epoch (tansu 0.6 after a restart:
//! docs/RELIABILITY.md); a new producer gets a new producer id and recovers.

use std::sync::atomic::{AtomicU64, Ordering};

use chatify_core::routing::unix_now_ms;
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::Duration;

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

/// Delivery outcomes across producer generations, read by the supervisor.
#[derive(Debug, Default)]
struct Health {
    /// When the current run of failed deliveries began (Unix ms); 0 after a success.
    failing_since_ms: AtomicU64,
}

impl Health {
    fn delivered(&self) {
        self.failing_since_ms.store(0, Ordering::Relaxed);
    }

    fn failed(&self) {
        let _ = self.failing_since_ms.compare_exchange(
            0,
            unix_now_ms(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

/// Producer callbacks: delivery reports go back to the shard that owns the connection.
#[derive(Debug, Default)]
pub struct UpstreamContext {
    /// Set once the shards exist (the producer is created first); shared by every
    /// producer generation.
    shards: Arc<OnceLock<Vec<flume::Sender<ShardCommand>>>>,
    health: Arc<Health>,
}

impl ClientContext for UpstreamContext {}

impl ProducerContext for UpstreamContext {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Self::DeliveryOpaque) {
        let Err((error, _)) = result else {
            metrics::counter!("chatify_gateway_upstream_delivered_total").increment(1);
            self.health.delivered();
            return;
        };
        self.health.failed();
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
    /// The current producer generation; a send holds its own `Arc` while it enqueues.
    producer: RwLock<Arc<ThreadedProducer<UpstreamContext>>>,
    settings: UpstreamSettings,
    shards: Arc<OnceLock<Vec<flume::Sender<ShardCommand>>>>,
    health: Arc<Health>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("upstream_topic", &self.settings.upstream_topic)
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
    /// librdkafka debug contexts (`CHATIFY_KAFKA_DEBUG`).
    pub debug: Option<String>,
}

impl Upstream {
    /// Creates the producer and starts its supervisor thread (which ends with the last
    /// `Arc`).
    pub fn new(settings: &UpstreamSettings) -> Result<Arc<Self>, KafkaError> {
        let shards = Arc::new(OnceLock::new());
        let health = Arc::new(Health::default());
        let producer = create_producer(settings, &shards, &health)?;
        let upstream = Arc::new(Self {
            producer: RwLock::new(Arc::new(producer)),
            settings: settings.clone(),
            shards,
            health,
        });
        let weak = Arc::downgrade(&upstream);
        std::thread::Builder::new()
            .name("upstream-supervisor".into())
            .spawn(move || supervise(&weak))
            .map_err(|error| {
                KafkaError::ClientCreation(format!("upstream supervisor thread: {error}"))
            })?;
        Ok(upstream)
    }

    /// Lets delivery reports reach the shards (their inboxes, by shard index).
    pub fn attach_shards(&self, inboxes: Vec<flume::Sender<ShardCommand>>) {
        let _ = self.shards.set(inboxes);
    }

    fn current(&self) -> Arc<ThreadedProducer<UpstreamContext>> {
        Arc::clone(
            &self
                .producer
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Why the current producer should be replaced, if it should.
    fn replacement_reason(&self, replaced_at_ms: u64) -> Option<String> {
        if let Some(fatal) = self.current().client().fatal_error() {
            return Some(format!("fatal error {fatal:?}"));
        }
        let failing_since = self.health.failing_since_ms.load(Ordering::Relaxed);
        let window = self.settings.timeout_ms.saturating_mul(2);
        let now = unix_now_ms();
        (failing_since != 0
            && now.saturating_sub(failing_since) >= window
            && now.saturating_sub(replaced_at_ms) >= window)
            .then(|| format!("every delivery failed for {} ms", now - failing_since))
    }

    /// Swaps in a new producer; the old one is dropped here, once no send holds it (its
    /// queued records are purged and answered `unavailable` through their callbacks).
    fn replace(&self, reason: &str) {
        let fresh = match create_producer(&self.settings, &self.shards, &self.health) {
            Ok(producer) => Arc::new(producer),
            Err(error) => {
                tracing::error!(%error, "cannot create a new upstream producer");
                return;
            }
        };
        let old = std::mem::replace(
            &mut *self
                .producer
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            fresh,
        );
        self.health.failing_since_ms.store(0, Ordering::Relaxed);
        metrics::counter!("chatify_gateway_upstream_producer_replaced_total").increment(1);
        tracing::warn!(reason, "replaced the upstream producer");
        // Never let a shard thread run the old producer's teardown.
        while Arc::strong_count(&old) > 1 {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(old);
    }

    /// Enqueues one upstream record; never waits.
    pub fn send_upstream(
        &self,
        session_key: &str,
        payload: &[u8],
        pending: Pending,
    ) -> Result<(), ProduceError> {
        self.produce(&self.settings.upstream_topic, session_key, payload, pending)
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
        match self.current().send(record) {
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
        if let Err(error) = self.current().flush(timeout) {
            tracing::warn!(%error, "upstream records left unflushed at shutdown");
        }
    }
}

fn create_producer(
    settings: &UpstreamSettings,
    shards: &Arc<OnceLock<Vec<flume::Sender<ShardCommand>>>>,
    health: &Arc<Health>,
) -> Result<ThreadedProducer<UpstreamContext>, KafkaError> {
    let mut config = chatify_core::config::client_config(
        &settings.bootstrap_servers,
        &format!("gateway-{}", settings.node_id),
        settings.debug.as_deref(),
    );
    // Idempotent with acks=all: librdkafka's own retries never duplicate or reorder a
    // session's records.
    config
        .set("enable.idempotence", settings.idempotence.to_string())
        .set("acks", "all");
    if !settings.idempotence {
        // One request in flight per broker keeps partition order across retries.
        config.set("max.in.flight.requests.per.connection", "1");
    }
    config
        .set("linger.ms", "1")
        .set(
            "queue.buffering.max.messages",
            settings.queue_messages_max.to_string(),
        )
        .set("message.timeout.ms", settings.timeout_ms.to_string())
        .create_with_context(UpstreamContext {
            shards: Arc::clone(shards),
            health: Arc::clone(health),
        })
}

/// How often the supervisor looks at the producer.
const SUPERVISE_EVERY: Duration = Duration::from_secs(1);

fn supervise(upstream: &Weak<Upstream>) {
    let mut replaced_at_ms = 0;
    loop {
        std::thread::sleep(SUPERVISE_EVERY);
        let Some(upstream) = upstream.upgrade() else {
            return;
        };
        if let Some(reason) = upstream.replacement_reason(replaced_at_ms) {
            upstream.replace(&reason);
            replaced_at_ms = unix_now_ms();
        }
    }
}
