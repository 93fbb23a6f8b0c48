//! One batch through steps 1–7 (the consumer commits, step 8). Every step is idempotent,
//! so a failed attempt is retried from the top with capped exponential backoff: nothing is
//! skipped, nothing is committed, and consumption stops meanwhile (backpressure).
//!
//! Order within an attempt: membership (so a refused send never takes a seq), dedupe + seq,
//! Postgres, MongoDB, then the Redis hot cache and session state (readers never see a
//! message the archive lacks), then publish (no ack before the message is durable).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use chatify_core::ids::SessionId;
use chatify_core::keys;
use chatify_core::producer::RenewableProducer;
use chatify_core::topics::Topics;
use chatify_proto::client::v1::ErrorCode;
use mongodb::bson::Document;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::archive::{self, Archived, Row};
use crate::cache::{self, CacheLimits, StoredMessage};
use crate::config::PipelineArgs;
use crate::error::{Stage, StoreFailure, WriterError};
use crate::members::{self, Members};
use crate::publish::{self, Delivery, Outbox, Refusal, Resend};
use crate::record::{Incoming, Poison};
use crate::sequence::{self, Assigned};

/// How long a record may wait for room in the producer's queue (its delivery timeout is
/// the producer's `message.timeout.ms`).
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a batch came to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchReport {
    pub stored: usize,
    pub duplicates: usize,
    pub refused: usize,
    pub dead_lettered: usize,
}

/// The clients of every store the pipeline writes.
#[derive(Clone)]
pub struct Sinks {
    pub redis: ConnectionManager,
    pub postgres: PgPool,
    pub mongo: mongodb::Collection<Document>,
    /// Replaced after a failed publish (see [`Pipeline::process`]).
    pub producer: RenewableProducer,
    pub topics: Topics,
}

impl std::fmt::Debug for Sinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sinks")
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

/// The pipeline of one writer process.
#[derive(Debug)]
pub struct Pipeline {
    sinks: Sinks,
    settings: PipelineArgs,
    mongo_indexed: bool,
}

enum AttemptError {
    Failed(Stage, StoreFailure),
    // Built only by fail points, which exist when the `fail` crate's `failpoints` feature is
    // on (the tests turn it on); release builds compile them away.
    #[allow(dead_code)]
    Crash(&'static str),
}

impl From<(Stage, StoreFailure)> for AttemptError {
    fn from((stage, failure): (Stage, StoreFailure)) -> Self {
        Self::Failed(stage, failure)
    }
}

/// Stops the attempt as if the process died here (tests configure these with `fail`).
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| Err(AttemptError::Crash($name)));
    };
}

/// Runs a stage, timing it and labelling its error.
async fn stage<T>(
    stage: Stage,
    work: impl Future<Output = Result<T, StoreFailure>>,
) -> Result<T, AttemptError> {
    let started = Instant::now();
    let result = work.await;
    metrics::histogram!("chatify_writer_stage_seconds", "stage" => stage.as_str())
        .record(started.elapsed().as_secs_f64());
    result.map_err(|failure| AttemptError::Failed(stage, failure))
}

impl Pipeline {
    pub fn new(sinks: Sinks, settings: PipelineArgs) -> Self {
        Self {
            sinks,
            settings,
            mongo_indexed: false,
        }
    }

    /// Processes one batch until it is done, retrying failed attempts with backoff.
    /// Returns early only on shutdown (the batch is abandoned, uncommitted) or an injected
    /// crash.
    pub async fn process(
        &mut self,
        records: &[Result<Incoming, Poison>],
        shutdown: &CancellationToken,
    ) -> Result<BatchReport, WriterError> {
        let min = Duration::from_millis(self.settings.retry_min_ms);
        let max = Duration::from_millis(self.settings.retry_max_ms);
        let mut delay = min;
        let started = Instant::now();
        loop {
            match self.attempt(records).await {
                Ok(report) => {
                    metrics::histogram!("chatify_writer_batch_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::histogram!("chatify_writer_batch_records")
                        .record(records.len() as f64);
                    for (outcome, count) in [
                        ("stored", report.stored),
                        ("duplicate", report.duplicates),
                        ("refused", report.refused),
                        ("dead_lettered", report.dead_lettered),
                    ] {
                        metrics::counter!("chatify_writer_messages_total", "outcome" => outcome)
                            .increment(count as u64);
                    }
                    metrics::gauge!("chatify_writer_backpressure").set(0.0);
                    return Ok(report);
                }
                Err(AttemptError::Crash(name)) => return Err(WriterError::InjectedCrash(name)),
                Err(AttemptError::Failed(stage, failure)) => {
                    metrics::counter!("chatify_writer_store_failures_total", "stage" => stage.as_str())
                        .increment(1);
                    metrics::gauge!("chatify_writer_backpressure").set(1.0);
                    tracing::warn!(
                        %stage,
                        error = %failure,
                        retry_in_ms = delay.as_millis() as u64,
                        records = records.len(),
                        "batch failed; consumption paused until it succeeds"
                    );
                    // The retried batch publishes everything again, which the gateways
                    // and clients tolerate (they dedupe by message id and seq).
                    if stage == Stage::Publish && matches!(failure, StoreFailure::Kafka(_)) {
                        self.sinks.producer.renew("publish failed");
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return Err(WriterError::Abandoned { stage }),
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(max);
                }
            }
        }
    }

    async fn attempt(
        &mut self,
        records: &[Result<Incoming, Poison>],
    ) -> Result<BatchReport, AttemptError> {
        let mut outbox = Outbox::default();
        let mut valid: Vec<&Incoming> = Vec::with_capacity(records.len());
        for record in records {
            match record {
                Ok(message) => valid.push(message),
                Err(poison) => outbox.poison.push(poison),
            }
        }

        // Step 3 first: a refused send must not take a seq.
        let sessions: Vec<&SessionId> = valid
            .iter()
            .map(|message| &message.session)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut redis = self.sinks.redis.clone();
        let members = stage(
            Stage::Members,
            members::load(
                &mut redis,
                &self.sinks.postgres,
                &sessions,
                self.settings.members_cache_ttl_seconds,
            ),
        )
        .await?;
        crash_point!("writer::after_members");
        let mut accepted: Vec<&Incoming> = Vec::with_capacity(valid.len());
        for message in valid {
            match members.get(&message.session) {
                Some(known) if known.contains(&message.sender_id) => accepted.push(message),
                Some(Members::UnknownGroup) => outbox.refusals.push(Refusal {
                    message,
                    code: ErrorCode::NotFound,
                    reason: format!("group {} does not exist", message.session),
                }),
                _ => outbox.refusals.push(Refusal {
                    message,
                    code: ErrorCode::NotMember,
                    reason: format!(
                        "{} is not a member of {}",
                        message.sender_id, message.session
                    ),
                }),
            }
        }

        // Steps 1-2.
        let assigned = stage(
            Stage::Dedupe,
            sequence::assign(
                &mut redis,
                &self.sinks.postgres,
                &accepted,
                self.settings.dedupe_ttl_seconds,
            ),
        )
        .await?;
        crash_point!("writer::after_dedupe");
        let mut rows: Vec<Row<'_>> = Vec::with_capacity(accepted.len());
        for (message, assigned) in accepted.iter().zip(assigned) {
            match assigned {
                Assigned::Fresh { seq } => rows.push(Row { message, seq }),
                Assigned::Duplicate { message_id, seq } => outbox.resends.push(Resend {
                    message,
                    message_id,
                    seq,
                }),
            }
        }

        // Step 5, Postgres: the source of truth for (message_id, seq).
        let archived = stage(
            Stage::Postgres,
            archive::write_postgres(&self.sinks.postgres, &rows),
        )
        .await?;
        let archived = match archived {
            Ok(archived) => archived,
            Err(collision) => {
                let failure = self.repair_collision(&rows, &collision.indexes).await;
                return Err(AttemptError::Failed(Stage::Postgres, failure));
            }
        };
        let mut stored: Vec<Row<'_>> = Vec::with_capacity(rows.len());
        let mut restore = redis::pipe();
        let mut restored = 0;
        for (row, archived) in rows.iter().zip(archived) {
            match archived {
                Archived::Stored => stored.push(*row),
                Archived::AlreadyStoredAs { message_id, seq } => {
                    // Redis had forgotten this resend: remember the stored values again.
                    restore
                        .cmd("SET")
                        .arg(keys::dedupe(
                            &row.message.sender_id,
                            &row.message.client_msg_id,
                        ))
                        .arg(format!("{message_id}|{seq}"))
                        .arg("EX")
                        .arg(self.settings.dedupe_ttl_seconds)
                        .ignore();
                    restored += 1;
                    outbox.resends.push(Resend {
                        message: row.message,
                        message_id,
                        seq,
                    });
                }
            }
        }
        crash_point!("writer::after_postgres");

        // Step 5, MongoDB.
        if !self.mongo_indexed {
            stage(
                Stage::Mongo,
                archive::ensure_mongo_indexes(&self.sinks.mongo),
            )
            .await?;
            self.mongo_indexed = true;
        }
        let documents = stored.iter().map(archive::mongo_document).collect();
        stage(
            Stage::Mongo,
            archive::write_mongo(&self.sinks.mongo, documents),
        )
        .await?;
        crash_point!("writer::after_mongo");

        // Steps 4 and 6.
        let stored: Vec<StoredMessage<'_>> = stored
            .into_iter()
            .map(|row| StoredMessage {
                message: row.message,
                seq: row.seq,
            })
            .collect();
        let member_lists: BTreeMap<&SessionId, &[String]> = members
            .iter()
            .filter_map(|(session, members)| match members {
                Members::Known(list) => Some((session, list.as_slice())),
                Members::UnknownGroup => None,
            })
            .collect();
        let limits = CacheLimits {
            hot_cache_messages: self.settings.hot_cache_messages,
            hot_cache_ttl_seconds: self.settings.hot_cache_ttl_seconds,
        };
        stage(Stage::HotCache, async {
            if restored > 0 {
                restore.query_async::<()>(&mut redis).await?;
            }
            cache::write(&mut redis, &stored, &member_lists, limits).await
        })
        .await?;
        crash_point!("writer::after_cache");

        // Step 7.
        let report = BatchReport {
            stored: stored.len(),
            duplicates: outbox.resends.len(),
            refused: outbox.refusals.len(),
            dead_lettered: outbox.poison.len(),
        };
        outbox.deliveries = stored
            .into_iter()
            .map(|stored| {
                let members = member_lists
                    .get(&stored.message.session)
                    .copied()
                    .unwrap_or_default();
                Delivery { stored, members }
            })
            .collect();
        let now_ms = chrono::Utc::now().timestamp_millis();
        stage(Stage::Publish, async {
            let records = publish::build(&mut redis, &self.sinks.topics, &outbox, now_ms).await?;
            publish::produce(&self.sinks.producer.get(), &records, PRODUCE_TIMEOUT).await
        })
        .await?;
        crash_point!("writer::after_publish");
        Ok(report)
    }

    /// Postgres holds other messages at some of the seqs Redis handed out: the counter went
    /// backwards (Redis lost it and was reseeded from a stale view). Moves each counter past
    /// the stored maximum and forgets those messages' dedupe keys, so the retry assigns them
    /// fresh seqs. Returns the failure that makes the attempt retry.
    async fn repair_collision(&mut self, rows: &[Row<'_>], indexes: &[usize]) -> StoreFailure {
        let sessions: Vec<String> = indexes
            .iter()
            .map(|&index| rows[index].message.session.to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        tracing::error!(
            ?sessions,
            "seq collision in postgres: repairing the seq counters"
        );
        metrics::counter!("chatify_writer_seq_collisions_total").increment(indexes.len() as u64);
        let maxima = match archive::max_seqs(&self.sinks.postgres, &sessions).await {
            Ok(maxima) => maxima,
            Err(failure) => return failure,
        };
        let maxima: HashMap<String, i64> = maxima.into_iter().collect();
        let raise = redis::Script::new(
            "local c = tonumber(redis.call('GET', KEYS[1]) or '0') \
             if c < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end return 0",
        );
        let mut redis = self.sinks.redis.clone();
        for (session_id, max_seq) in &maxima {
            let Ok(session) = SessionId::parse(session_id) else {
                continue;
            };
            let raised: Result<i64, _> = raise
                .key(keys::session_seq(&session))
                .arg(*max_seq)
                .invoke_async(&mut redis)
                .await;
            if let Err(error) = raised {
                return error.into();
            }
        }
        let mut forget = redis::pipe();
        for &index in indexes {
            let message = rows[index].message;
            forget
                .del(keys::dedupe(&message.sender_id, &message.client_msg_id))
                .ignore();
        }
        if let Err(error) = forget.query_async::<()>(&mut redis).await {
            return error.into();
        }
        StoreFailure::Inconsistent(format!(
            "seq collision on {} message(s) in {sessions:?}; counters raised, retrying",
            indexes.len()
        ))
    }
}
