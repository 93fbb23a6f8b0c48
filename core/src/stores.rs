//! Clients of the stores both storage services use, built from config without connecting:
//! connections open lazily, so a service starts and reports "not ready" while a store is
//! down instead of refusing to start.

use crate::config::{MongoArgs, PostgresArgs, RedisArgs};

/// A store client could not be built from its config.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("mongo: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Redis, Postgres and MongoDB clients.
#[derive(Debug, Clone)]
pub struct Stores {
    pub redis: redis::Client,
    pub postgres: sqlx::PgPool,
    pub mongo: mongodb::Database,
}

impl Stores {
    pub async fn open(
        redis: &RedisArgs,
        postgres: &PostgresArgs,
        mongo: &MongoArgs,
    ) -> Result<Self, StoreError> {
        let redis_client = redis::Client::open(redis.redis_url.as_str())?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(postgres.postgres_connections_max)
            .connect_lazy(&postgres.postgres_url)?;
        let database = mongodb::Client::with_uri_str(&mongo.mongo_url)
            .await?
            .database(&mongo.mongo_database);
        Ok(Self {
            redis: redis_client,
            postgres: pool,
            mongo: database,
        })
    }

    /// Probes for every store plus Kafka with the given topics.
    pub fn readiness(
        &self,
        kafka_bootstrap_servers: &str,
        topics: Vec<String>,
    ) -> Result<crate::probe::Readiness, StoreError> {
        use crate::probe::{KafkaProbe, MongoProbe, PostgresProbe, Readiness, RedisProbe};
        Ok(Readiness::default()
            .with(KafkaProbe::new(kafka_bootstrap_servers, topics)?)
            .with(RedisProbe::new(self.redis.clone()))
            .with(PostgresProbe::new(self.postgres.clone()))
            .with(MongoProbe::new(self.mongo.clone())))
    }
}

/// A Redis connection manager, retrying with capped backoff until Redis answers or
/// `shutdown` (then `None`): services start while Redis is still coming up.
pub async fn connect_redis(
    client: &redis::Client,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<redis::aio::ConnectionManager> {
    let mut delay = std::time::Duration::from_millis(100);
    loop {
        match redis::aio::ConnectionManager::new(client.clone()).await {
            Ok(manager) => return Some(manager),
            Err(error) => {
                tracing::warn!(%error, "redis unavailable; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}
