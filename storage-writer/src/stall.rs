//! A writer with no partitions while nobody consumes them rejoins its group.
//!
//! tansu 0.6's group coordinator can complete a generation whose elected leader has died
//! (a writer killed -9 moments after it joined): the surviving members are handed empty
//! assignments and the group stays on that generation, heartbeats succeeding, with every
//! partition owned by nobody (docs/RELIABILITY.md). Apache Kafka rebalances when the dead
//! leader's session expires. The watch notices the state from outside: this member owns no
//! partition, the group's committed offsets lag the partitions' ends, and they have not moved
//! for [`STALL_REJOIN`]; it then leaves and joins the group again. A member that is idle
//! because other writers own every partition sees their offsets move (or no lag) and stays.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// How often the watch looks.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How long the group may make no progress, with lag, before this idle member rejoins
/// (longer than the session timeout, so a dead member has been expired by then).
pub const STALL_REJOIN: Duration = Duration::from_secs(20);
/// How long the broker may take to answer the watch's queries.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The group's progress on the topic, as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Sum of the committed offsets (a partition with none counts its start).
    pub committed: i64,
    /// Records between the committed offsets and the partitions' ends.
    pub lag: i64,
}

/// What the watch decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do.
    Fine,
    /// Rejoin the group now.
    Rejoin,
}

/// The watch's memory between checks.
#[derive(Debug)]
pub struct StallWatch {
    last: Option<Progress>,
    since: Instant,
}

impl Default for StallWatch {
    fn default() -> Self {
        Self {
            last: None,
            since: Instant::now(),
        }
    }
}

impl StallWatch {
    /// Feeds one observation: `progress` is `None` when this member owns partitions (or
    /// the group could not be read), which resets the watch.
    pub fn observe(&mut self, progress: Option<Progress>, now: Instant) -> Verdict {
        let Some(progress) = progress.filter(|progress| progress.lag > 0) else {
            self.last = None;
            self.since = now;
            return Verdict::Fine;
        };
        if self.last.map(|last| last.committed) != Some(progress.committed) {
            self.last = Some(progress);
            self.since = now;
            return Verdict::Fine;
        }
        if now.duration_since(self.since) >= STALL_REJOIN {
            self.last = None;
            self.since = now;
            return Verdict::Rejoin;
        }
        Verdict::Fine
    }
}

/// The group's progress on `topic` when this member owns no partition of it; `None` when
/// it owns some. Blocking (broker round trips).
pub fn idle_progress<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    topic: &str,
) -> KafkaResult<Option<Progress>> {
    if consumer.assignment()?.count() > 0 {
        return Ok(None);
    }
    let metadata = consumer.fetch_metadata(Some(topic), QUERY_TIMEOUT)?;
    let mut all = TopicPartitionList::new();
    for found in metadata
        .topics()
        .iter()
        .filter(|found| found.name() == topic)
    {
        for partition in found.partitions() {
            all.add_partition(topic, partition.id());
        }
    }
    if all.count() == 0 {
        return Ok(None);
    }
    let committed = consumer.committed_offsets(all.clone(), QUERY_TIMEOUT)?;
    let mut progress = Progress {
        committed: 0,
        lag: 0,
    };
    for element in all.elements() {
        let (low, high) = consumer.fetch_watermarks(topic, element.partition(), QUERY_TIMEOUT)?;
        let at = match committed
            .find_partition(topic, element.partition())
            .map(|found| found.offset())
        {
            Some(Offset::Offset(offset)) => offset,
            _ => low,
        };
        progress.committed += at;
        progress.lag += (high - at).max(0);
    }
    Ok(Some(progress))
}

/// One check: reads the group's progress (on a blocking thread) and rejoins when the
/// watch says so.
pub async fn check<C: ConsumerContext + 'static>(
    consumer: &Arc<StreamConsumer<C>>,
    topic: &str,
    watch: &mut StallWatch,
) {
    // The common case, a member that owns partitions, needs no broker round trip.
    if consumer
        .assignment()
        .is_ok_and(|assignment| assignment.count() > 0)
    {
        watch.observe(None, Instant::now());
        return;
    }
    let progress = {
        let consumer = Arc::clone(consumer);
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || idle_progress(&consumer, &topic)).await
    };
    let progress = match progress {
        Ok(Ok(progress)) => progress,
        Ok(Err(error)) => {
            tracing::debug!(%error, "group progress not read");
            None
        }
        Err(error) => {
            tracing::warn!(%error, "group progress task failed");
            None
        }
    };
    if watch.observe(progress, Instant::now()) == Verdict::Rejoin {
        metrics::counter!("chatify_writer_group_rejoins_total").increment(1);
        tracing::warn!(
            ?progress,
            "no partitions here and the group made no progress for {STALL_REJOIN:?}: rejoining"
        );
        consumer.unsubscribe();
        if let Err(error) = consumer.subscribe(&[topic]) {
            tracing::error!(%error, "cannot subscribe again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stuck(committed: i64) -> Option<Progress> {
        Some(Progress { committed, lag: 5 })
    }

    #[test]
    fn an_idle_member_rejoins_only_after_the_group_stalled_for_the_whole_window() {
        let start = Instant::now();
        let mut watch = StallWatch::default();
        assert_eq!(watch.observe(stuck(10), start), Verdict::Fine);
        assert_eq!(
            watch.observe(stuck(10), start + STALL_REJOIN - Duration::from_secs(1)),
            Verdict::Fine
        );
        assert_eq!(
            watch.observe(stuck(10), start + STALL_REJOIN),
            Verdict::Rejoin
        );
        // The window starts over after a rejoin.
        assert_eq!(
            watch.observe(stuck(10), start + STALL_REJOIN + Duration::from_secs(1)),
            Verdict::Fine
        );
    }

    #[test]
    fn progress_by_other_members_or_no_lag_or_own_partitions_keep_it_in_place() {
        let start = Instant::now();
        let mut watch = StallWatch::default();
        let mut at = start;
        for committed in 0..10 {
            at += STALL_REJOIN;
            // Other writers commit: offsets move.
            assert_eq!(watch.observe(stuck(committed), at), Verdict::Fine);
        }
        at += STALL_REJOIN;
        let caught_up = Some(Progress {
            committed: 9,
            lag: 0,
        });
        assert_eq!(watch.observe(caught_up, at), Verdict::Fine);
        at += STALL_REJOIN;
        assert_eq!(watch.observe(caught_up, at), Verdict::Fine);
        // Owning partitions (None) resets too.
        assert_eq!(watch.observe(stuck(9), at), Verdict::Fine);
        assert_eq!(watch.observe(None, at + STALL_REJOIN), Verdict::Fine);
        assert_eq!(
            watch.observe(stuck(9), at + STALL_REJOIN * 2),
            Verdict::Fine
        );
    }
}
