//! The Kafka side: a consumer-group member on `chatify.upstream` that cuts batches (by
//! count, bytes and linger time), runs each through the [`Pipeline`] and only then commits
//! the batch's offsets (step 8). A batch holds the records of every partition this member
//! owns, each partition's in offset order; sessions are keyed to partitions, so a session's
//! messages keep their order. Batches are strictly one after another.

use std::sync::Arc;
use std::time::Duration;

use chatify_core::producer::RenewableProducer;
use chatify_core::stores::Stores;
use rdkafka::ClientContext;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::WriterError;
use crate::pipeline::{Pipeline, Sinks};
use crate::record::{self, Incoming, Poison, Position, RecordLimits};
use crate::stall::{self, StallWatch};

/// Consumer callbacks: rebalance logs and the consumer-lag gauge.
#[derive(Debug, Default)]
pub struct WriterContext;

impl ClientContext for WriterContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, partition_stats) in &stats.partitions {
                if *partition >= 0 && partition_stats.consumer_lag >= 0 {
                    metrics::gauge!(
                        "chatify_writer_consumer_lag",
                        "topic" => topic.clone(),
                        "partition" => partition.to_string()
                    )
                    .set(partition_stats.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for WriterContext {
    fn pre_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        tracing::info!(rebalance = ?describe(rebalance), "partitions rebalancing");
    }

    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        tracing::info!(rebalance = ?describe(rebalance), "partitions rebalanced");
    }
}

fn describe(rebalance: &Rebalance<'_>) -> String {
    match rebalance {
        Rebalance::Assign(list) => format!("assigned {:?}", partitions(list)),
        Rebalance::Revoke(list) => format!("revoked {:?}", partitions(list)),
        Rebalance::Error(error) => format!("error {error}"),
    }
}

fn partitions(list: &TopicPartitionList) -> Vec<i32> {
    list.elements()
        .iter()
        .map(|element| element.partition())
        .collect()
}

/// Runs the writer until `shutdown`: the batch in hand is finished and committed first.
pub async fn run(
    config: &Config,
    stores: Stores,
    shutdown: CancellationToken,
) -> Result<(), WriterError> {
    let topics = config.kafka.topics();
    let consumer: StreamConsumer<WriterContext> = config
        .kafka
        .client_config("storage-writer")
        .set("group.id", &config.consumer_group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // A store outage pauses polling; stay in the group for a long one.
        .set("max.poll.interval.ms", "900000")
        .set("statistics.interval.ms", "5000")
        .create_with_context(WriterContext)?;
    consumer.subscribe(&[&topics.upstream()])?;
    let consumer = Arc::new(consumer);
    let mut producer_config = config.kafka.client_config("storage-writer");
    producer_config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        // A publish that cannot finish fails within 10 s and is retried with a new
        // producer (`Pipeline::process`).
        .set("message.timeout.ms", "10000");
    let producer = RenewableProducer::new(producer_config, "writer")?;
    let Some(redis) = chatify_core::stores::connect_redis(&stores.redis, &shutdown).await else {
        return Ok(());
    };
    let sinks = Sinks {
        redis,
        postgres: stores.postgres.clone(),
        mongo: stores.mongo.collection("messages"),
        producer,
        topics: topics.clone(),
    };
    let settings = config.pipeline.clone();
    let limits = RecordLimits {
        record_bytes_max: settings.record_bytes_max,
        content_bytes_max: settings.content_bytes_max,
    };
    let linger = Duration::from_millis(settings.batch_linger_ms);
    let (batch_max, batch_bytes_max) = (settings.batch_max, settings.batch_bytes_max);
    let mut pipeline = Pipeline::new(sinks, settings);
    tracing::info!(topic = %topics.upstream(), group = %config.consumer_group, "consuming");
    let upstream = topics.upstream();
    let mut stall = StallWatch::default();
    let mut stall_check = tokio::time::interval(stall::CHECK_EVERY);
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            received = consumer.recv() => received,
            _ = stall_check.tick() => {
                stall::check(&consumer, &upstream, &mut stall).await;
                continue;
            }
        };
        let mut batch = Vec::new();
        let mut bytes = 0;
        match first {
            Ok(message) => {
                bytes += message.payload_len();
                batch.push(poll(&message, limits));
            }
            Err(error) => {
                tracing::warn!(%error, "kafka consumer error");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < batch_max && bytes < batch_bytes_max {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(message)) => {
                    bytes += message.payload_len();
                    batch.push(poll(&message, limits));
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "kafka consumer error");
                    break;
                }
                Err(_elapsed) => break,
            }
        }
        let report = pipeline.process(&batch, &shutdown).await?;
        tracing::debug!(?report, "batch done");
        fail::fail_point!("writer::before_commit", |_| Err(
            WriterError::InjectedCrash("writer::before_commit")
        ));
        commit(&consumer, &upstream, &batch).await;
    }
    tracing::info!("consumer stopped");
    Ok(())
}

fn poll(
    message: &rdkafka::message::BorrowedMessage<'_>,
    limits: RecordLimits,
) -> Result<Incoming, Poison> {
    let position = Position {
        partition: message.partition(),
        offset: message.offset(),
    };
    record::decode(message.payload(), position, limits)
}

/// Commits the offset after the last record of each partition in the batch. A failed
/// commit (e.g. the partition moved to another member meanwhile) is logged: the records
/// are replayed by their next owner and finished idempotently.
async fn commit(
    consumer: &Arc<StreamConsumer<WriterContext>>,
    topic: &str,
    batch: &[Result<Incoming, Poison>],
) {
    let mut next: std::collections::BTreeMap<i32, i64> = Default::default();
    for record in batch {
        let position = match record {
            Ok(message) => message.position,
            Err(poison) => poison.position,
        };
        let offset = next
            .entry(position.partition)
            .or_insert(position.offset + 1);
        *offset = (*offset).max(position.offset + 1);
    }
    let mut list = TopicPartitionList::new();
    for (partition, offset) in &next {
        if let Err(error) = list.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::error!(%error, partition, offset, "cannot build the commit");
            return;
        }
    }
    let consumer = Arc::clone(consumer);
    let started = std::time::Instant::now();
    let committed =
        tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync)).await;
    metrics::histogram!("chatify_writer_stage_seconds", "stage" => "commit")
        .record(started.elapsed().as_secs_f64());
    match committed {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            metrics::counter!("chatify_writer_commit_failures_total").increment(1);
            tracing::warn!(%error, ?next, "offset commit failed; the records will be replayed");
        }
        Err(error) => tracing::error!(%error, "commit task failed"),
    }
}
