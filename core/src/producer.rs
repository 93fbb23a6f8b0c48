//! A Kafka producer that can be replaced after it fails. An idempotent producer whose
//! records timed out needs the broker to bump its epoch before it can produce again
//! (KIP-360); a broker that cannot (tansu 0.6 after a restart: docs/RELIABILITY.md) leaves
//! it failing for good. A new producer gets a new producer id and works, so the services
//! swap one in after a failed produce. Clones share the current producer.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::error::KafkaResult;
use rdkafka::producer::FutureProducer;

/// The current producer and the config that builds its successor.
#[derive(Clone)]
pub struct RenewableProducer {
    config: ClientConfig,
    current: Arc<RwLock<FutureProducer>>,
    /// Metric label naming the owner (`writer`, `reader`).
    owner: &'static str,
    /// When the producer was last replaced: failures of many concurrent callers (a broker
    /// outage) replace it once per [`RENEW_INTERVAL_MIN`].
    renewed_at: Arc<Mutex<Option<Instant>>>,
}

/// Shortest time between two replacements.
pub const RENEW_INTERVAL_MIN: Duration = Duration::from_secs(5);

impl std::fmt::Debug for RenewableProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenewableProducer")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl RenewableProducer {
    /// Creates the first producer from `config`.
    pub fn new(config: ClientConfig, owner: &'static str) -> KafkaResult<Self> {
        let producer = config.create()?;
        Ok(Self {
            config,
            current: Arc::new(RwLock::new(producer)),
            owner,
            renewed_at: Arc::new(Mutex::new(None)),
        })
    }

    /// The current producer (a cheap handle).
    pub fn get(&self) -> FutureProducer {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces the current producer with a new one, unless that was done less than
    /// [`RENEW_INTERVAL_MIN`] ago; `reason` is logged. Records still queued in the old one
    /// fail when its last handle goes.
    pub fn renew(&self, reason: &str) {
        {
            let mut renewed_at = self
                .renewed_at
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if renewed_at.is_some_and(|at| at.elapsed() < RENEW_INTERVAL_MIN) {
                return;
            }
            *renewed_at = Some(Instant::now());
        }
        match self.config.create::<FutureProducer>() {
            Ok(fresh) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh;
                metrics::counter!("chatify_kafka_producer_renewed_total", "owner" => self.owner)
                    .increment(1);
                tracing::warn!(owner = self.owner, reason, "replaced the Kafka producer");
            }
            Err(error) => {
                tracing::error!(owner = self.owner, %error, "cannot create a new Kafka producer");
            }
        }
    }
}
