//! loadgen: opens many WebSocket/TCP connections to a Chatify deployment, sends at a target
//! open-loop rate and reports connect rate, throughput, send→ack / send→deliver / ping→pong
//! percentiles and the correctness of what came back (loss, duplicates, seq gaps).
//!
//! This file is the process edge: it parses the command line, raises the open-file limit,
//! runs the run in-process or as `--processes` worker processes of itself (each a share of
//! the clients, merged exactly), shows progress, samples the server's RSS, and writes the
//! table, the JSON and the plot. See loadgen/README.md.

mod accounting;
mod cli;
mod engine;
mod frames;
mod groups;
mod rate;
mod report;
mod run;
mod stats;
mod token;
mod wire;

use std::io::{BufRead as _, Write as _};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Parser as _;

use crate::cli::Cli;
use crate::engine::Progress;
use crate::report::ServerMemory;
use crate::run::{ProcessResult, RunContext, Share};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// File descriptors a process keeps for itself (stdio, runtime, listeners of tests).
const FDS_RESERVED: u64 = 256;
/// Env var carrying the run id from the parent to its workers.
const RUN_ID_ENV: &str = "LOADGEN_RUN_ID";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let nofile = raise_nofile_limit();
    match cli.worker.as_deref() {
        Some([worker, workers]) => worker_main(&cli, *worker, *workers),
        Some(_) => anyhow::bail!("--worker takes INDEX COUNT"),
        None => parent_main(&cli, nofile),
    }
}

/// Raises the soft open-file limit to the hard one; returns the limit in force.
fn raise_nofile_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
}

fn parent_main(cli: &Cli, nofile: u64) -> anyhow::Result<()> {
    let common = &cli.common;
    anyhow::ensure!(common.connections > 0, "--connections must be positive");
    anyhow::ensure!(common.duration > 0.0, "--duration must be positive");
    let per_process = nofile.saturating_sub(FDS_RESERVED).max(1) as usize;
    let processes = if common.processes > 0 {
        common.processes
    } else {
        common.connections.div_ceil(per_process).max(1)
    };
    if common.connections.div_ceil(processes) > per_process {
        eprintln!(
            "warning: {} connections over {processes} process(es) exceed the open-file limit of \
             {nofile} per process: raise nofile (ulimit -n) or pass more --processes",
            common.connections
        );
    }
    let run_id = uuid::Uuid::now_v7().simple().to_string()[..12].to_owned();
    let started_at_unix_ms = unix_ns() / 1_000_000;
    let ramp_seconds = rate::ramp_ns(common.connections as u64, common.connect_rate) as f64 / 1e9;
    let server_pid = common.server_pid;

    let (result, rss, server_cpu) = if processes == 1 {
        let context = RunContext {
            run_id: run_id.clone(),
            share: Share {
                worker: 0,
                workers: 1,
            },
        };
        let prepared = run::prepare(cli, &context)?;
        let shards = prepared.threads;
        let progress: Vec<Arc<Progress>> =
            (0..shards).map(|_| Arc::new(Progress::default())).collect();
        let origin = Instant::now();
        let sampler = server_pid.map(|pid| RssSampler::start(pid, origin, load_end_ns(cli)));
        let display = ProgressDisplay::start(cli, origin, progress.clone());
        let own_cpu = cpu_over_window("self".into(), origin, measured_window_ns(cli));
        let server_cpu =
            server_pid.map(|pid| cpu_over_window(pid.to_string(), origin, measured_window_ns(cli)));
        let result = run::execute(cli, prepared, origin, &progress);
        display.stop();
        let mut result = result?;
        result.cpu_seconds = own_cpu.join().ok().flatten().unwrap_or(0.0);
        let server_cpu = server_cpu.and_then(|handle| handle.join().ok().flatten());
        (result, sampler.map(RssSampler::stop), server_cpu)
    } else {
        run_workers(cli, processes, &run_id, server_pid)?
    };
    let cpu = report::CpuSeconds {
        loadgen: result.cpu_seconds,
        server: server_cpu,
    };
    let facts = report::RunFacts {
        run_id,
        started_at_unix_ms,
        processes,
        ramp_seconds,
        server: rss.map(|rss| rss.memory(result.stats.open_at_end)),
        cpu,
    };
    let report = report::build(cli, &result, facts)?;
    print!("{}", report::table(&report));
    std::io::stdout().flush().context("flush stdout")?;
    if let Some(path) = &common.json {
        report::write_json(&report, path)?;
    }
    if let Some(path) = &common.plot {
        report::write_plot(&report, path)?;
    }
    Ok(())
}

/// ns from the origin to the end of the load phase (for the RSS sample at that moment).
fn load_end_ns(cli: &Cli) -> u64 {
    measured_window_ns(cli).1
}

/// The measured window, in ns from the origin (as `run::execute` lays out the phases).
fn measured_window_ns(cli: &Cli) -> (u64, u64) {
    let common = &cli.common;
    let start = rate::ramp_ns(common.connections as u64, common.connect_rate)
        + 500_000_000
        + run::seconds_ns(common.warmup);
    (start, start + run::seconds_ns(common.duration))
}

/// user + system CPU seconds of a process so far, from /proc/PID/stat (`self` for this one).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Linux reports clock ticks of USER_HZ, 100 on every mainstream configuration.
    Some((utime + stime) / 100.0)
}

/// Measures the CPU seconds `pid` uses over the measured window, on a thread of its own.
fn cpu_over_window(
    pid: String,
    origin: Instant,
    (from_ns, to_ns): (u64, u64),
) -> std::thread::JoinHandle<Option<f64>> {
    std::thread::spawn(move || {
        let wait_until = |ns: u64| {
            let at = Duration::from_nanos(ns);
            let elapsed = origin.elapsed();
            if at > elapsed {
                std::thread::sleep(at - elapsed);
            }
        };
        wait_until(from_ns);
        let start = cpu_seconds(&pid)?;
        wait_until(to_ns);
        Some(cpu_seconds(&pid)? - start)
    })
}

// ---------------------------------------------------------------------------------------------
// Worker processes
// ---------------------------------------------------------------------------------------------

/// A worker: prepares its share, says READY, starts at the parent's GO (a Unix-ns origin),
/// prints PROGRESS lines and finally its RESULT as one JSON line.
fn worker_main(cli: &Cli, worker: usize, workers: usize) -> anyhow::Result<()> {
    anyhow::ensure!(worker < workers, "--worker index out of range");
    let run_id = std::env::var(RUN_ID_ENV).context("worker started without LOADGEN_RUN_ID")?;
    let context = RunContext {
        run_id,
        share: Share { worker, workers },
    };
    let prepared = run::prepare(cli, &context)?;
    let shards = prepared.threads;
    let progress: Vec<Arc<Progress>> = (0..shards).map(|_| Arc::new(Progress::default())).collect();
    let mut stdout = std::io::stdout();
    writeln!(stdout, "READY")?;
    stdout.flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let origin_unix_ns: u64 = line
        .trim()
        .strip_prefix("GO ")
        .and_then(|ns| ns.parse().ok())
        .context("expected `GO <unix ns>` from the parent")?;
    let wait = origin_unix_ns.saturating_sub(unix_ns());
    std::thread::sleep(Duration::from_nanos(wait));
    let origin = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let reporter = {
        let progress = progress.clone();
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let [open, failed, sent, received] = sum_progress(&progress);
                println!("PROGRESS {open} {failed} {sent} {received}");
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let own_cpu = cpu_over_window("self".into(), origin, measured_window_ns(cli));
    let result = run::execute(cli, prepared, origin, &progress);
    done.store(true, Ordering::Relaxed);
    let _ = reporter.join();
    let mut result = result?;
    result.cpu_seconds = own_cpu.join().ok().flatten().unwrap_or(0.0);
    println!("RESULT {}", serde_json::to_string(&result)?);
    Ok(())
}

fn run_workers(
    cli: &Cli,
    processes: usize,
    run_id: &str,
    server_pid: Option<u32>,
) -> anyhow::Result<(ProcessResult, Option<RssSamples>, Option<f64>)> {
    let exe = std::env::current_exe().context("path of the loadgen binary")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut children = Vec::with_capacity(processes);
    for worker in 0..processes {
        let child = Command::new(&exe)
            .args(&args)
            .arg("--worker")
            .arg(worker.to_string())
            .arg(processes.to_string())
            .env(RUN_ID_ENV, run_id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start a worker process")?;
        children.push(child);
    }
    // Each worker's stdout is read by its own thread: READY, PROGRESS lines, RESULT.
    let mut readers = Vec::with_capacity(processes);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let mut progress_slots = Vec::with_capacity(processes);
    for child in &mut children {
        let stdout = child.stdout.take().context("worker stdout")?;
        let slot = Arc::new(Progress::default());
        progress_slots.push(Arc::clone(&slot));
        let ready_tx = ready_tx.clone();
        readers.push(std::thread::spawn(
            move || -> anyhow::Result<ProcessResult> {
                let mut result = None;
                let mut said_ready = false;
                for line in std::io::BufReader::new(stdout).lines() {
                    let line = line.context("read from a worker")?;
                    if line == "READY" {
                        said_ready = true;
                        let _ = ready_tx.send(Ok(()));
                    } else if let Some(rest) = line.strip_prefix("PROGRESS ") {
                        let values: Vec<u64> = rest
                            .split(' ')
                            .filter_map(|value| value.parse().ok())
                            .collect();
                        if let [open, failed, sent, received] = values[..] {
                            slot.open.store(open, Ordering::Relaxed);
                            slot.failed.store(failed, Ordering::Relaxed);
                            slot.sent.store(sent, Ordering::Relaxed);
                            slot.received.store(received, Ordering::Relaxed);
                        }
                    } else if let Some(json) = line.strip_prefix("RESULT ") {
                        result = Some(serde_json::from_str(json).context("worker result")?);
                    }
                }
                if !said_ready {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("a worker exited before READY")));
                }
                result.context("a worker ended without a result (see its stderr)")
            },
        ));
    }
    drop(ready_tx);
    for _ in 0..processes {
        ready_rx
            .recv()
            .context("a worker ended before it was ready")??;
    }
    // Start everyone together, a moment from now.
    let origin_unix_ns = unix_ns() + 200_000_000;
    for child in &mut children {
        let stdin = child.stdin.as_mut().context("worker stdin")?;
        writeln!(stdin, "GO {origin_unix_ns}").context("start a worker")?;
        stdin.flush()?;
    }
    std::thread::sleep(Duration::from_nanos(
        origin_unix_ns.saturating_sub(unix_ns()),
    ));
    let origin = Instant::now();
    let sampler = server_pid.map(|pid| RssSampler::start(pid, origin, load_end_ns(cli)));
    let server_cpu =
        server_pid.map(|pid| cpu_over_window(pid.to_string(), origin, measured_window_ns(cli)));
    let display = ProgressDisplay::start(cli, origin, progress_slots);
    let mut merged: Option<ProcessResult> = None;
    let mut first_error = None;
    for reader in readers {
        match reader.join() {
            Ok(Ok(result)) => match merged.as_mut() {
                Some(merged) => merged.merge(result)?,
                None => merged = Some(result),
            },
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(_) => {
                first_error.get_or_insert(anyhow::anyhow!("a worker reader thread panicked"));
            }
        }
    }
    for mut child in children {
        let _ = child.wait();
    }
    display.stop();
    let rss = sampler.map(RssSampler::stop);
    if let Some(error) = first_error {
        return Err(error);
    }
    let server_cpu = server_cpu.and_then(|handle| handle.join().ok().flatten());
    Ok((merged.context("no worker result")?, rss, server_cpu))
}

fn sum_progress(slots: &[Arc<Progress>]) -> [u64; 4] {
    let mut sum = [0u64; 4];
    for slot in slots {
        sum[0] += slot.open.load(Ordering::Relaxed);
        sum[1] += slot.failed.load(Ordering::Relaxed);
        sum[2] += slot.sent.load(Ordering::Relaxed);
        sum[3] += slot.received.load(Ordering::Relaxed);
    }
    sum
}

// ---------------------------------------------------------------------------------------------
// Progress and server memory
// ---------------------------------------------------------------------------------------------

/// The live line on stderr (indicatif; hidden when stderr is not a terminal or --quiet).
struct ProgressDisplay {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProgressDisplay {
    fn start(cli: &Cli, origin: Instant, slots: Vec<Arc<Progress>>) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        if cli.common.quiet {
            return Self { done, thread: None };
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            None,
            indicatif::ProgressDrawTarget::stderr_with_hz(4),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        let target = cli.common.connections;
        let flag = Arc::clone(&done);
        let thread = std::thread::spawn(move || {
            let mut last = (Instant::now(), 0u64, 0u64);
            while !flag.load(Ordering::Relaxed) {
                let [open, failed, sent, received] = sum_progress(&slots);
                let elapsed = last.0.elapsed().as_secs_f64().max(1e-3);
                let sent_rate = sent.saturating_sub(last.1) as f64 / elapsed;
                let received_rate = received.saturating_sub(last.2) as f64 / elapsed;
                last = (Instant::now(), sent, received);
                bar.set_message(format!(
                    "t={:.0}s open {open}/{target} failed {failed} | sent {sent} ({sent_rate:.0}/s) \
                     received {received} ({received_rate:.0}/s)",
                    origin.elapsed().as_secs_f64()
                ));
                bar.tick();
                std::thread::sleep(Duration::from_millis(500));
            }
            bar.finish_and_clear();
        });
        Self {
            done,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Samples a PID's VmRSS from /proc every 250 ms.
struct RssSampler {
    pid: u32,
    done: Arc<AtomicBool>,
    before: u64,
    at_load_end: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

#[derive(Debug, Clone, Copy)]
struct RssSamples {
    pid: u32,
    before: u64,
    at_load_end: u64,
    peak: u64,
}

impl RssSamples {
    fn memory(self, open_at_end: u64) -> ServerMemory {
        ServerMemory {
            pid: self.pid,
            rss_bytes_before: self.before,
            rss_bytes_at_load_end: self.at_load_end,
            rss_bytes_peak: self.peak,
            rss_bytes_per_connection: (open_at_end > 0 && self.at_load_end > 0)
                .then(|| (self.at_load_end as f64 - self.before as f64) / open_at_end as f64),
        }
    }
}

fn read_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl RssSampler {
    fn start(pid: u32, origin: Instant, load_end_ns: u64) -> Self {
        let before = read_rss_bytes(pid).unwrap_or(0);
        if before == 0 {
            eprintln!("warning: cannot read /proc/{pid}/status: no server memory figures");
        }
        let done = Arc::new(AtomicBool::new(false));
        let at_load_end = Arc::new(AtomicU64::new(0));
        let peak = Arc::new(AtomicU64::new(before));
        let thread = {
            let (done, at_load_end, peak) = (
                Arc::clone(&done),
                Arc::clone(&at_load_end),
                Arc::clone(&peak),
            );
            std::thread::spawn(move || {
                let load_end = Duration::from_nanos(load_end_ns);
                while !done.load(Ordering::Relaxed) {
                    if let Some(rss) = read_rss_bytes(pid) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                        // The last sample before the load ends is the one reported.
                        if origin.elapsed() <= load_end {
                            at_load_end.store(rss, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            })
        };
        Self {
            pid,
            done,
            before,
            at_load_end,
            peak,
            thread,
        }
    }

    fn stop(self) -> RssSamples {
        self.done.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        RssSamples {
            pid: self.pid,
            before: self.before,
            at_load_end: self.at_load_end.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
        }
    }
}
