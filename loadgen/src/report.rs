//! The result of a run as users and scripts see it: the JSON document (`--json`, schema in
//! loadgen/README.md: it is a stable interface for bench/ scripts), the table on stdout,
//! the SVG plot (`--plot`) of throughput and latency over time, and hints about the
//! system limits a run ran into.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use crate::accounting::Verdict;
use crate::cli::Cli;
use crate::run::ProcessResult;
use crate::stats::{Counter, Latency, Percentiles, histogram_base64};

/// Version of the JSON layout; bumped only when a field changes meaning or goes away.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub loadgen_version: &'static str,
    pub scenario: &'static str,
    pub run_id: String,
    pub started_at_unix_ms: u64,
    pub target: String,
    pub transport: &'static str,
    pub codec: String,
    pub processes: usize,
    pub threads_per_process: usize,
    pub io_driver: String,
    pub source_addrs: Vec<String>,
    pub phases_seconds: PhaseSeconds,
    pub connections: Connections,
    pub counts: BTreeMap<String, u64>,
    pub throughput_per_second: Throughput,
    /// Latency percentiles in µs, by kind (only kinds with samples).
    pub latency_us: BTreeMap<&'static str, Percentiles>,
    pub errors: BTreeMap<String, u64>,
    pub closes: BTreeMap<String, u64>,
    pub correctness: Option<Correctness>,
    pub server: Option<ServerMemory>,
    /// CPU seconds (user + system) over the measured window: every loadgen process, and the
    /// `--server-pid` process.
    pub cpu_seconds: CpuSeconds,
    pub series: Vec<SeriesPoint>,
    pub hints: Vec<String>,
    /// The full histograms (base64 hdrhistogram V2, µs), to merge runs exactly.
    pub histograms: BTreeMap<&'static str, String>,
    pub config: serde_json::Value,
}

#[derive(Debug, Serialize)]
pub struct PhaseSeconds {
    pub ramp: f64,
    pub warmup: f64,
    pub duration: f64,
    pub grace: f64,
}

#[derive(Debug, Serialize)]
pub struct Connections {
    pub target: usize,
    pub attempts: u64,
    pub connected: u64,
    pub failed: u64,
    pub reconnected: u64,
    pub dropped_early: u64,
    pub dropped_on_purpose: u64,
    pub open_at_end: u64,
    /// First connections opened per second over the ramp (over 1 s when the ramp is shorter).
    pub connect_rate_per_second: f64,
}

#[derive(Debug, Serialize)]
pub struct Throughput {
    /// Frames sent (pings or sends) per measured second.
    pub sent: f64,
    pub pongs: f64,
    pub acks: f64,
    pub delivers: f64,
}

#[derive(Debug, Serialize)]
pub struct Correctness {
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Sends answered by an `error` frame.
    pub refused: u64,
    /// Sends with neither an ack nor an error by the end of the grace period.
    pub unanswered: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerMemory {
    pub pid: u32,
    pub rss_bytes_before: u64,
    pub rss_bytes_at_load_end: u64,
    pub rss_bytes_peak: u64,
    /// (RSS at the end of the load − RSS before connecting) ÷ connections open then.
    pub rss_bytes_per_connection: Option<f64>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuSeconds {
    pub loadgen: f64,
    pub server: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct SeriesPoint {
    pub second: usize,
    pub sent: u64,
    pub pongs: u64,
    pub acks: u64,
    pub delivers: u64,
    pub p50_us: BTreeMap<&'static str, u64>,
    pub p99_us: BTreeMap<&'static str, u64>,
    pub max_us: BTreeMap<&'static str, u64>,
}

/// Inputs of the report besides the merged result.
#[derive(Debug)]
pub struct RunFacts {
    pub run_id: String,
    pub started_at_unix_ms: u64,
    pub processes: usize,
    pub ramp_seconds: f64,
    pub server: Option<ServerMemory>,
    pub cpu: CpuSeconds,
}

pub fn build(cli: &Cli, result: &ProcessResult, facts: RunFacts) -> anyhow::Result<Report> {
    let common = &cli.common;
    let stats = &result.stats;
    let target = common.transport()?;
    let duration = common.duration.max(1e-9);
    let measured_seconds = common.duration.ceil() as usize;
    let window = |name: &str| -> u64 {
        stats
            .series
            .iter()
            .take(measured_seconds)
            .map(|second| second.counters.get(name).copied().unwrap_or(0))
            .sum()
    };
    let mut latency_us = BTreeMap::new();
    let mut histograms = BTreeMap::new();
    for kind in Latency::ALL {
        if let Some(hist) = stats.latency.get(&kind)
            && !hist.0.is_empty()
        {
            latency_us.insert(kind.name(), Percentiles::of(&hist.0));
            histograms.insert(kind.name(), histogram_base64::encode(&hist.0)?);
        }
    }
    let series = stats
        .series
        .iter()
        .enumerate()
        .map(|(second, point)| {
            let counter = |name: &str| point.counters.get(name).copied().unwrap_or(0);
            let mut p50_us = BTreeMap::new();
            let mut p99_us = BTreeMap::new();
            let mut max_us = BTreeMap::new();
            for (kind, hist) in &point.latency {
                if !hist.0.is_empty() {
                    p50_us.insert(kind.name(), hist.0.value_at_quantile(0.5));
                    p99_us.insert(kind.name(), hist.0.value_at_quantile(0.99));
                    max_us.insert(kind.name(), hist.0.max());
                }
            }
            SeriesPoint {
                second,
                sent: counter("sent"),
                pongs: counter("pongs"),
                acks: counter("acks"),
                delivers: counter("delivers"),
                p50_us,
                p99_us,
                max_us,
            }
        })
        .collect();
    let correctness = result.verdict.clone().map(|verdict| {
        let refused = stats.get(Counter::SendRefused);
        let unanswered = stats
            .get(Counter::Sent)
            .saturating_sub(stats.get(Counter::Acks))
            .saturating_sub(refused);
        Correctness {
            verdict,
            refused,
            unanswered,
        }
    });
    let connected = stats.get(Counter::Connected);
    let mut report = Report {
        schema_version: SCHEMA_VERSION,
        loadgen_version: env!("CARGO_PKG_VERSION"),
        scenario: cli.scenario.name(),
        run_id: facts.run_id,
        started_at_unix_ms: facts.started_at_unix_ms,
        target: common.target.clone(),
        transport: crate::run::transport_name(target.transport),
        codec: format!("{:?}", common.codec).to_lowercase(),
        processes: facts.processes,
        threads_per_process: result.threads,
        io_driver: result.io_driver.clone(),
        source_addrs: result
            .source_addrs
            .iter()
            .map(ToString::to_string)
            .collect(),
        phases_seconds: PhaseSeconds {
            ramp: facts.ramp_seconds,
            warmup: common.warmup,
            duration: common.duration,
            grace: common.grace,
        },
        connections: Connections {
            target: common.connections,
            attempts: stats.get(Counter::ConnectAttempts),
            connected,
            failed: stats.get(Counter::ConnectFailed),
            reconnected: stats.get(Counter::Reconnected),
            dropped_early: stats.get(Counter::DroppedEarly),
            dropped_on_purpose: stats.get(Counter::DroppedOnPurpose),
            open_at_end: stats.open_at_end,
            // First connections only: reconnects (`sync`) are not part of the ramp.
            connect_rate_per_second: connected.saturating_sub(stats.get(Counter::Reconnected))
                as f64
                / facts.ramp_seconds.max(1.0),
        },
        counts: Counter::ALL
            .iter()
            .map(|&counter| (counter.name().to_owned(), stats.get(counter)))
            .collect(),
        throughput_per_second: Throughput {
            sent: window("sent") as f64 / duration,
            pongs: window("pongs") as f64 / duration,
            acks: window("acks") as f64 / duration,
            delivers: window("delivers") as f64 / duration,
        },
        latency_us,
        errors: stats.errors.clone(),
        closes: stats.closes.clone(),
        correctness,
        server: facts.server,
        cpu_seconds: facts.cpu,
        series,
        hints: Vec::new(),
        histograms,
        config: serde_json::to_value(cli).context("config as json")?,
    };
    report.hints = hints(&report);
    Ok(report)
}

/// Which system limits the errors point at, and what to set.
pub fn hints(report: &Report) -> Vec<String> {
    let has = |prefix: &str| report.errors.keys().any(|key| key.ends_with(prefix));
    let mut hints = Vec::new();
    if has("addr_not_available") || has("addr_in_use") {
        hints.push(
            "ephemeral ports ran out: widen `sysctl net.ipv4.ip_local_port_range=\"1024 65535\"` \
             and/or spread connections over more source addresses (--local-addr / --source-addrs; \
             ~28k connections per address with the default range)"
                .to_owned(),
        );
    }
    if has("too_many_open_files") {
        hints.push(
            "the open-file limit of a process was hit: raise `ulimit -n` (nofile in \
             /etc/security/limits.conf or LimitNOFILE=) or run more worker processes \
             (--processes); the server needs the same for its side"
                .to_owned(),
        );
    }
    if has("file_table_full") {
        hints.push("the system-wide file table is full: raise `sysctl fs.file-max`".to_owned());
    }
    if has("connect:refused") || has("connect:timeout") || has("connect:timed_out") {
        hints.push(
            "connections were refused or timed out: the server's accept backlog may overflow \
             at this --connect-rate; raise `sysctl net.core.somaxconn` and \
             `net.ipv4.tcp_max_syn_backlog` (and the server's listen backlog), or lower \
             --connect-rate"
                .to_owned(),
        );
    }
    hints
}

pub fn write_json(report: &Report, path: &Path) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(report).context("encode result")?;
    std::fs::write(path, json).with_context(|| format!("write {}", path.display()))
}

/// The human summary printed on stdout.
pub fn table(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let c = &report.connections;
    let _ = writeln!(
        out,
        "loadgen {} → {} ({}, {}, {} process(es) × {} thread(s), {})",
        report.scenario,
        report.target,
        report.transport,
        report.codec,
        report.processes,
        report.threads_per_process,
        report.io_driver
    );
    let _ = writeln!(
        out,
        "connections  target {}  connected {}  failed {}  open at end {}  dropped early {}  \
         reconnected {}  ramp {:.1} s ({:.0}/s)",
        c.target,
        c.connected,
        c.failed,
        c.open_at_end,
        c.dropped_early,
        c.reconnected,
        report.phases_seconds.ramp,
        c.connect_rate_per_second
    );
    let t = &report.throughput_per_second;
    let _ = writeln!(
        out,
        "throughput   sent {:.0}/s  pongs {:.0}/s  acks {:.0}/s  delivers {:.0}/s  over {:.1} s",
        t.sent, t.pongs, t.acks, t.delivers, report.phases_seconds.duration
    );
    if !report.latency_us.is_empty() {
        let _ = writeln!(
            out,
            "{:<12} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency µs", "count", "p50", "p90", "p99", "p99.9", "max"
        );
        for (kind, p) in &report.latency_us {
            let _ = writeln!(
                out,
                "{:<12} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
                kind, p.count, p.p50, p.p90, p.p99, p.p999, p.max
            );
        }
    }
    let _ = writeln!(
        out,
        "cpu          loadgen {:.2} s ({:.2} cores){}  over the measured window",
        report.cpu_seconds.loadgen,
        report.cpu_seconds.loadgen / report.phases_seconds.duration.max(1e-9),
        report
            .cpu_seconds
            .server
            .map_or_else(String::new, |server| format!(
                "  server {:.2} s ({:.2} cores)",
                server,
                server / report.phases_seconds.duration.max(1e-9)
            ))
    );
    if let Some(correctness) = &report.correctness {
        let v = &correctness.verdict;
        let _ = writeln!(
            out,
            "correctness  acked {}  lost {}  duplicates {}  resync overlap {}  seq gaps {}  refused {}  unanswered {}",
            v.acked,
            v.lost,
            v.duplicates,
            v.resync_overlap,
            v.seq_gaps,
            correctness.refused,
            correctness.unanswered
        );
    }
    if let Some(server) = &report.server {
        let _ = writeln!(
            out,
            "server rss   pid {}  before {:.1} MiB  at load end {:.1} MiB  peak {:.1} MiB  \
             per connection {}",
            server.pid,
            mib(server.rss_bytes_before),
            mib(server.rss_bytes_at_load_end),
            mib(server.rss_bytes_peak),
            server
                .rss_bytes_per_connection
                .map_or_else(|| "n/a".to_owned(), |bytes| format!("{bytes:.0} B"))
        );
    }
    let list = |map: &BTreeMap<String, u64>| {
        map.iter()
            .map(|(key, count)| format!("{key}={count}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    if !report.errors.is_empty() {
        let _ = writeln!(out, "errors       {}", list(&report.errors));
    }
    if !report.closes.is_empty() {
        let _ = writeln!(out, "closes       {}", list(&report.closes));
    }
    for hint in &report.hints {
        let _ = writeln!(out, "hint: {hint}");
    }
    out
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Throughput (top) and p50/p99 latency (bottom) per second, as SVG.
pub fn write_plot(report: &Report, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;

    let seconds = report.series.len().max(1) as f64;
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (top, bottom) = root.split_vertically(350);

    let rates: Vec<(&str, Points, RGBColor)> = vec![
        (
            "sent/s",
            report
                .series
                .iter()
                .map(|p| (p.second as f64, p.sent as f64))
                .collect(),
            BLUE,
        ),
        (
            "pongs/s",
            report
                .series
                .iter()
                .map(|p| (p.second as f64, p.pongs as f64))
                .collect(),
            GREEN,
        ),
        (
            "acks/s",
            report
                .series
                .iter()
                .map(|p| (p.second as f64, p.acks as f64))
                .collect(),
            MAGENTA,
        ),
        (
            "delivers/s",
            report
                .series
                .iter()
                .map(|p| (p.second as f64, p.delivers as f64))
                .collect(),
            RED,
        ),
    ];
    let rate_max = rates
        .iter()
        .flat_map(|(_, points, _)| points.iter().map(|(_, y)| *y))
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!("loadgen {} — throughput per second", report.scenario),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..seconds, 0f64..rate_max * 1.1)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("second of the measured window")
        .y_desc("frames/s")
        .draw()
        .map_err(plot_error)?;
    for (name, points, color) in rates {
        if points.iter().all(|(_, y)| *y == 0.0) {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points, color))
            .map_err(plot_error)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;

    let kinds: Vec<&'static str> = report.latency_us.keys().copied().collect();
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN];
    let mut lines: Vec<(String, Points, RGBColor)> = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        let color = palette[i % palette.len()];
        for (quantile, points) in [
            (
                "p50",
                report
                    .series
                    .iter()
                    .filter_map(|p| {
                        p.p50_us
                            .get(kind)
                            .map(|us| (p.second as f64, *us as f64 / 1000.0))
                    })
                    .collect::<Vec<_>>(),
            ),
            (
                "p99",
                report
                    .series
                    .iter()
                    .filter_map(|p| {
                        p.p99_us
                            .get(kind)
                            .map(|us| (p.second as f64, *us as f64 / 1000.0))
                    })
                    .collect(),
            ),
        ] {
            if !points.is_empty() {
                lines.push((format!("{kind} {quantile}"), points, color));
            }
        }
    }
    let latency_max = lines
        .iter()
        .flat_map(|(_, points, _)| points.iter().map(|(_, y)| *y))
        .fold(0.001f64, f64::max);
    let mut chart = ChartBuilder::on(&bottom)
        .caption("latency per second (ms)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..seconds, 0f64..latency_max * 1.1)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("second of the measured window")
        .y_desc("ms")
        .draw()
        .map_err(plot_error)?;
    for (name, points, color) in lines {
        let dashed = name.ends_with("p99");
        let style = if dashed {
            color.stroke_width(1)
        } else {
            color.stroke_width(2)
        };
        chart
            .draw_series(LineSeries::new(points, style))
            .map_err(plot_error)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

/// (second, value) pairs of one plotted line.
type Points = Vec<(f64, f64)>;

fn plot_error<E: std::fmt::Debug>(error: E) -> anyhow::Error {
    anyhow::anyhow!("draw plot: {error:?}")
}
