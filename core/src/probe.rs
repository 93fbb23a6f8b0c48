//! Readiness probes: one real round trip to each backing service (Redis PING, Kafka
//! metadata of the topics a service needs, Postgres `SELECT 1`, Mongo `ping`). `/readyz`
//! runs them concurrently, each under a timeout.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

/// Longest a single probe may take before it counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One dependency check.
pub trait Probe: Send + Sync + 'static {
    /// Short name shown in `/readyz`, e.g. `redis`.
    fn name(&self) -> &'static str;
    /// Ok when the dependency answered a real request.
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// Result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub name: &'static str,
    pub result: Result<(), String>,
}

/// The probes of one service.
#[derive(Clone, Default)]
pub struct Readiness {
    probes: Vec<Arc<dyn Probe>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.probes.iter().map(|probe| probe.name()).collect();
        f.debug_struct("Readiness").field("probes", &names).finish()
    }
}

impl Readiness {
    pub fn with(mut self, probe: impl Probe) -> Self {
        self.probes.push(Arc::new(probe));
        self
    }

    /// Runs every probe concurrently, each bounded by [`PROBE_TIMEOUT`].
    pub async fn check(&self) -> Vec<ProbeOutcome> {
        futures::future::join_all(self.probes.iter().map(|probe| async move {
            let result = match tokio::time::timeout(PROBE_TIMEOUT, probe.check()).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
            };
            ProbeOutcome {
                name: probe.name(),
                result,
            }
        }))
        .await
    }
}

/// Redis answers `PING`.
#[derive(Debug, Clone)]
pub struct RedisProbe {
    client: redis::Client,
}

impl RedisProbe {
    pub fn new(client: redis::Client) -> Self {
        Self { client }
    }
}

impl Probe for RedisProbe {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let mut connection = self
                .client
                .get_multiplexed_async_connection()
                .await
                .map_err(|error| error.to_string())?;
            let pong: String = redis::cmd("PING")
                .query_async(&mut connection)
                .await
                .map_err(|error| error.to_string())?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(format!("unexpected reply {pong:?}"))
            }
        })
    }
}

/// The Kafka cluster answers a metadata request and every required topic exists (topics
/// are never auto-created).
pub struct KafkaProbe {
    client: Arc<rdkafka::producer::BaseProducer>,
    topics: Vec<String>,
}

impl std::fmt::Debug for KafkaProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProbe")
            .field("topics", &self.topics)
            .finish()
    }
}

impl KafkaProbe {
    pub fn new(bootstrap_servers: &str, topics: Vec<String>) -> rdkafka::error::KafkaResult<Self> {
        let client = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap_servers)
            .set("client.id", "chatify-readiness")
            .create()?;
        Ok(Self {
            client: Arc::new(client),
            topics,
        })
    }
}

impl Probe for KafkaProbe {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        let client = Arc::clone(&self.client);
        let topics = self.topics.clone();
        Box::pin(async move {
            // librdkafka's metadata call blocks; keep it off the async workers.
            tokio::task::spawn_blocking(move || {
                use rdkafka::producer::Producer as _;
                for topic in &topics {
                    let metadata = client
                        .client()
                        .fetch_metadata(Some(topic), PROBE_TIMEOUT)
                        .map_err(|error| error.to_string())?;
                    let found = metadata.topics().iter().find(|t| t.name() == topic);
                    match found {
                        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {}
                        _ => return Err(format!("topic {topic} is missing")),
                    }
                }
                Ok(())
            })
            .await
            .map_err(|error| error.to_string())?
        })
    }
}

/// PostgreSQL answers `SELECT 1`.
#[cfg(feature = "postgres")]
#[derive(Debug, Clone)]
pub struct PostgresProbe {
    pool: sqlx::PgPool,
}

#[cfg(feature = "postgres")]
impl PostgresProbe {
    pub fn new(pool: sqlx::PgPool) -> Self {
        Self { pool }
    }
}

#[cfg(feature = "postgres")]
impl Probe for PostgresProbe {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let one: i32 = sqlx::query_scalar("SELECT 1")
                .fetch_one(&self.pool)
                .await
                .map_err(|error| error.to_string())?;
            if one == 1 {
                Ok(())
            } else {
                Err(format!("SELECT 1 returned {one}"))
            }
        })
    }
}

/// MongoDB answers `ping`.
#[cfg(feature = "mongo")]
#[derive(Debug, Clone)]
pub struct MongoProbe {
    database: mongodb::Database,
}

#[cfg(feature = "mongo")]
impl MongoProbe {
    pub fn new(database: mongodb::Database) -> Self {
        Self { database }
    }
}

#[cfg(feature = "mongo")]
impl Probe for MongoProbe {
    fn name(&self) -> &'static str {
        "mongo"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.database
                .run_command(mongodb::bson::doc! { "ping": 1 })
                .await
                .map(drop)
                .map_err(|error| error.to_string())
        })
    }
}
