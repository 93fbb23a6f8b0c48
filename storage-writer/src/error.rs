//! Errors of the writer pipeline. A store error is transient by policy: the batch is retried
//! with backoff, never skipped. Only a record's own content makes it poison (see
//! [`crate::record::Poison`]).

/// Which step of the pipeline failed; also the `stage` label of the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Members,
    Dedupe,
    Postgres,
    Mongo,
    HotCache,
    SessionState,
    Publish,
    Commit,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Members => "members",
            Self::Dedupe => "dedupe",
            Self::Postgres => "postgres",
            Self::Mongo => "mongo",
            Self::HotCache => "hot_cache",
            Self::SessionState => "session_state",
            Self::Publish => "publish",
            Self::Commit => "commit",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A store or the bus failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreFailure {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("mongo: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Inconsistent(String),
}

/// Why the writer stopped.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("{stage}: {source}")]
    Store {
        stage: Stage,
        #[source]
        source: StoreFailure,
    },
    #[error("kafka consumer: {0}")]
    Consumer(#[from] rdkafka::error::KafkaError),
    #[error("store client: {0}")]
    Open(#[from] chatify_core::stores::StoreError),
    /// A fail point made the writer stop as if the process had died at that point (tests).
    #[error("injected crash at {0}")]
    InjectedCrash(&'static str),
    /// Shutdown was requested while a store was still failing: the batch in hand is
    /// abandoned uncommitted and will be replayed.
    #[error("shut down while {stage} was failing")]
    Abandoned { stage: Stage },
}
