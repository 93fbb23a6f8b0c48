//! What a run measures: counters, latency histograms (hdrhistogram) per kind, per-second
//! time series, and errors and closes by code. One `Stats` per shard (shard-local, no
//! atomics on the hot path); shards and worker processes merge theirs exactly
//! (histograms travel between processes as base64 hdrhistogram V2).

use std::collections::BTreeMap;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use serde::{Deserialize, Serialize};

/// Highest latency tracked, in µs (10 min); larger values are clamped to it.
pub const LATENCY_US_MAX: u64 = 600_000_000;

/// Significant digits of the whole-run histograms.
const RUN_SIGNIFICANT_DIGITS: u8 = 3;

/// Significant digits of the per-second histograms (1 %: small enough to keep one a second).
const SECOND_SIGNIFICANT_DIGITS: u8 = 2;

/// Latency kinds, each with its own histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Latency {
    /// TCP connect + upgrade (or TCP auth) until the connection is usable.
    Connect,
    /// `ping` intended send time → `pong`.
    Pong,
    /// `send` intended send time → `ack`.
    Ack,
    /// `send` intended send time → `deliver` at each receiver.
    Deliver,
    /// Reconnect → last `messages` page of the catch-up `sync`.
    CatchUp,
}

impl Latency {
    pub const ALL: [Latency; 5] = [
        Latency::Connect,
        Latency::Pong,
        Latency::Ack,
        Latency::Deliver,
        Latency::CatchUp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Latency::Connect => "connect",
            Latency::Pong => "pong",
            Latency::Ack => "ack",
            Latency::Deliver => "deliver",
            Latency::CatchUp => "catch_up",
        }
    }
}

/// Event counters, one slot each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    ConnectAttempts,
    Connected,
    ConnectFailed,
    /// Connections that ended before the run did (closed by the server, reset, garbage).
    DroppedEarly,
    /// Connections loadgen dropped on purpose (`sync`).
    DroppedOnPurpose,
    Reconnected,
    Sent,
    Pongs,
    Acks,
    Delivers,
    ErrorFrames,
    /// `error` frames answering a `send` (no ack will come).
    SendRefused,
    SyncRequests,
    SyncPages,
    SyncMessages,
    FramesOther,
    BytesSent,
    BytesReceived,
}

impl Counter {
    pub const ALL: [Counter; 18] = [
        Counter::ConnectAttempts,
        Counter::Connected,
        Counter::ConnectFailed,
        Counter::DroppedEarly,
        Counter::DroppedOnPurpose,
        Counter::Reconnected,
        Counter::Sent,
        Counter::Pongs,
        Counter::Acks,
        Counter::Delivers,
        Counter::ErrorFrames,
        Counter::SendRefused,
        Counter::SyncRequests,
        Counter::SyncPages,
        Counter::SyncMessages,
        Counter::FramesOther,
        Counter::BytesSent,
        Counter::BytesReceived,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::ConnectAttempts => "connect_attempts",
            Counter::Connected => "connected",
            Counter::ConnectFailed => "connect_failed",
            Counter::DroppedEarly => "dropped_early",
            Counter::DroppedOnPurpose => "dropped_on_purpose",
            Counter::Reconnected => "reconnected",
            Counter::Sent => "sent",
            Counter::Pongs => "pongs",
            Counter::Acks => "acks",
            Counter::Delivers => "delivers",
            Counter::ErrorFrames => "error_frames",
            Counter::SendRefused => "send_refused",
            Counter::SyncRequests => "sync_requests",
            Counter::SyncPages => "sync_pages",
            Counter::SyncMessages => "sync_messages",
            Counter::FramesOther => "frames_other",
            Counter::BytesSent => "bytes_sent",
            Counter::BytesReceived => "bytes_received",
        }
    }
}

/// A histogram as it travels between processes: base64 of its V2 serialization.
pub mod histogram_base64 {
    use super::*;

    pub fn encode(histogram: &Histogram<u64>) -> anyhow::Result<String> {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(histogram, &mut bytes)
            .map_err(|error| anyhow::anyhow!("serialize histogram: {error:?}"))?;
        Ok(BASE64.encode(bytes))
    }

    pub fn decode(text: &str) -> anyhow::Result<Histogram<u64>> {
        let bytes = BASE64.decode(text).context("histogram base64")?;
        Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|error| anyhow::anyhow!("deserialize histogram: {error:?}"))
    }

    pub fn serialize<S: serde::Serializer>(
        histogram: &Histogram<u64>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let text = encode(histogram).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(&text)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Histogram<u64>, D::Error> {
        let text = String::deserialize(deserializer)?;
        decode(&text).map_err(serde::de::Error::custom)
    }
}

/// A histogram in µs with the run's precision.
pub fn run_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, RUN_SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

fn second_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, SECOND_SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// Wrapper so a histogram (de)serializes as base64 V2.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Hist(#[serde(with = "histogram_base64")] pub Histogram<u64>);

impl Hist {
    fn run() -> Self {
        Self(run_histogram())
    }
}

/// One second of the run (seconds counted from the start of the load phase).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Second {
    pub counters: BTreeMap<String, u64>,
    pub latency: BTreeMap<Latency, Hist>,
    /// Counted while the run goes, folded into `counters` by [`Stats::settle`].
    #[serde(skip)]
    hot: HotCounters,
}

/// Everything one shard (or, merged, one run) measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    pub counters: BTreeMap<String, u64>,
    pub latency: BTreeMap<Latency, Hist>,
    pub errors: BTreeMap<String, u64>,
    pub closes: BTreeMap<String, u64>,
    pub series: Vec<Second>,
    /// Connections open at the end of the load phase.
    pub open_at_end: u64,
    /// Highest number of connections open at once.
    pub open_peak: u64,
    #[serde(skip)]
    hot: HotCounters,
    #[serde(skip)]
    open_now: u64,
}

/// The counters bumped on every frame, as a plain array (folded into `counters` on merge).
#[derive(Debug, Clone, Default)]
struct HotCounters([u64; Counter::ALL.len()]);

impl Default for Stats {
    fn default() -> Self {
        Self {
            counters: BTreeMap::new(),
            latency: Latency::ALL
                .iter()
                .map(|&kind| (kind, Hist::run()))
                .collect(),
            errors: BTreeMap::new(),
            closes: BTreeMap::new(),
            series: Vec::new(),
            open_at_end: 0,
            open_peak: 0,
            hot: HotCounters::default(),
            open_now: 0,
        }
    }
}

impl Stats {
    pub fn count(&mut self, counter: Counter, by: u64) {
        self.hot.0[counter as usize] += by;
    }

    /// Counts an event in the run total and in second `second` of the series (if any).
    pub fn count_at(&mut self, counter: Counter, by: u64, second: Option<usize>) {
        self.count(counter, by);
        if let Some(second) = second {
            self.second(second).hot.0[counter as usize] += by;
        }
    }

    pub fn get(&self, counter: Counter) -> u64 {
        self.hot.0[counter as usize] + self.counters.get(counter.name()).copied().unwrap_or(0)
    }

    /// Records a latency in µs in the run histogram and in its second of the series.
    pub fn record(&mut self, kind: Latency, micros: u64, second: Option<usize>) {
        let micros = micros.clamp(1, LATENCY_US_MAX);
        if let Some(hist) = self.latency.get_mut(&kind) {
            hist.0.saturating_record(micros);
        }
        if let Some(second) = second {
            self.second(second)
                .latency
                .entry(kind)
                .or_insert_with(|| Hist(second_histogram()))
                .0
                .saturating_record(micros);
        }
    }

    pub fn error(&mut self, label: impl Into<String>) {
        *self.errors.entry(label.into()).or_default() += 1;
    }

    pub fn close(&mut self, label: impl Into<String>) {
        *self.closes.entry(label.into()).or_default() += 1;
    }

    pub fn opened(&mut self) {
        self.open_now += 1;
        self.open_peak = self.open_peak.max(self.open_now);
    }

    pub fn closed(&mut self) {
        self.open_now = self.open_now.saturating_sub(1);
    }

    pub fn open_now(&self) -> u64 {
        self.open_now
    }

    /// A connection's writer finished: it counts as open at the end of the load if it was
    /// opened before and closed at or after it.
    pub fn held_through_load_end(&mut self) {
        self.open_at_end += 1;
    }

    /// The shard stops: connections whose writer never finished are still open.
    pub fn add_still_open(&mut self, connections: u64) {
        self.open_at_end += connections;
    }

    fn second(&mut self, second: usize) -> &mut Second {
        if self.series.len() <= second {
            self.series.resize_with(second + 1, Second::default);
        }
        &mut self.series[second]
    }

    /// Folds the hot counters into the named map (before serializing or merging).
    pub fn settle(&mut self) {
        fold(&mut self.hot, &mut self.counters);
        for second in &mut self.series {
            fold(&mut second.hot, &mut second.counters);
        }
    }

    /// Adds `other` into `self`: counters and maps add, histograms merge exactly.
    pub fn merge(&mut self, mut other: Stats) -> anyhow::Result<()> {
        self.settle();
        other.settle();
        add_maps(&mut self.counters, &other.counters);
        add_maps(&mut self.errors, &other.errors);
        add_maps(&mut self.closes, &other.closes);
        for (kind, hist) in other.latency {
            match self.latency.get_mut(&kind) {
                Some(mine) => mine.0.add(&hist.0).context("merge histograms")?,
                None => {
                    self.latency.insert(kind, hist);
                }
            }
        }
        if self.series.len() < other.series.len() {
            self.series.resize_with(other.series.len(), Second::default);
        }
        for (mine, theirs) in self.series.iter_mut().zip(other.series) {
            add_maps(&mut mine.counters, &theirs.counters);
            for (kind, hist) in theirs.latency {
                match mine.latency.get_mut(&kind) {
                    Some(existing) => existing.0.add(&hist.0).context("merge histograms")?,
                    None => {
                        mine.latency.insert(kind, hist);
                    }
                }
            }
        }
        self.open_at_end += other.open_at_end;
        // Peaks of different shards need not coincide; their sum bounds the true peak.
        self.open_peak += other.open_peak;
        Ok(())
    }
}

fn fold(hot: &mut HotCounters, into: &mut BTreeMap<String, u64>) {
    for counter in Counter::ALL {
        let value = std::mem::take(&mut hot.0[counter as usize]);
        if value > 0 {
            *into.entry(counter.name().to_owned()).or_default() += value;
        }
    }
}

fn add_maps(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (key, value) in from {
        *into.entry(key.clone()).or_default() += value;
    }
}

/// p50/p90/p99/p99.9/max of one histogram, in µs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>) -> Self {
        Self {
            count: histogram.len(),
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
            mean: histogram.mean(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_histograms_equal_one_histogram_of_all_values() {
        let mut all = Stats::default();
        let mut parts = [Stats::default(), Stats::default(), Stats::default()];
        for value in 1..=30_000u64 {
            let micros = value * 37 % 100_000 + 1;
            all.record(Latency::Pong, micros, Some((value % 4) as usize));
            parts[(value % 3) as usize].record(Latency::Pong, micros, Some((value % 4) as usize));
        }
        let mut merged = Stats::default();
        for part in parts {
            // Through JSON and base64 V2, as between worker processes.
            let json = serde_json::to_string(&part).expect("serialize");
            let back: Stats = serde_json::from_str(&json).expect("deserialize");
            merged.merge(back).expect("merge");
        }
        let expected = &all.latency[&Latency::Pong].0;
        let got = &merged.latency[&Latency::Pong].0;
        assert_eq!(got.len(), expected.len());
        for quantile in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(
                got.value_at_quantile(quantile),
                expected.value_at_quantile(quantile)
            );
        }
        assert_eq!(got.max(), expected.max());
        for second in 0..4 {
            assert_eq!(
                merged.series[second].latency[&Latency::Pong].0.len(),
                all.series[second].latency[&Latency::Pong].0.len()
            );
        }
    }

    #[test]
    fn counters_errors_and_closes_add_up() {
        let mut a = Stats::default();
        a.count_at(Counter::Sent, 5, Some(0));
        a.error("http:401");
        a.close("1008");
        let mut b = Stats::default();
        b.count_at(Counter::Sent, 2, Some(1));
        b.error("http:401");
        b.error("connect:refused");
        a.merge(b).expect("merge");
        assert_eq!(a.get(Counter::Sent), 7);
        assert_eq!(a.errors["http:401"], 2);
        assert_eq!(a.errors["connect:refused"], 1);
        assert_eq!(a.closes["1008"], 1);
        assert_eq!(a.series.len(), 2);
        assert_eq!(a.series[1].counters["sent"], 2);
    }

    #[test]
    fn latencies_are_clamped_into_range() {
        let mut stats = Stats::default();
        stats.record(Latency::Ack, 0, None);
        stats.record(Latency::Ack, u64::MAX, None);
        let hist = &stats.latency[&Latency::Ack].0;
        assert_eq!(hist.len(), 2);
        assert_eq!(hist.min(), 1);
        assert!(hist.max() >= LATENCY_US_MAX);
    }
}
