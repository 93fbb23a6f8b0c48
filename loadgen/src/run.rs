//! One process's share of a run: turns the command line into the [`Plan`] of this process's
//! clients (identities, targets, groups, droppers, phases), runs the shards, and merges their
//! measurements and correctness views into a [`ProcessResult`] — the unit that worker
//! processes send to the parent, which merges them the same way.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::accounting::{ClientView, Verdict, verdict};
use crate::cli::{Cli, IoDriver, Peers, Rate, Scenario, Target, Transport};
use crate::engine::{self, Behaviour, ClientPlan, Phases, Plan, Progress, SendTarget};
use crate::groups;
use crate::rate;
use crate::stats::Stats;
use crate::token;

/// Pause between the end of the connect ramp and the start of the load.
const SETTLE_NS: u64 = 500_000_000;
/// How long after the run's end the engine waits for closes before stopping.
const CLOSE_NS: u64 = 2_000_000_000;
/// Connections per source address by default (below the default ephemeral port range of
/// 28,232 ports, since each bind takes a port of its own).
pub const CONNECTIONS_PER_SOURCE_ADDR: usize = 25_000;

/// This process's place in the run.
#[derive(Debug, Clone, Copy)]
pub struct Share {
    pub worker: usize,
    pub workers: usize,
}

impl Share {
    /// The client slots of this worker: contiguous, whole units (pairs, groups).
    pub fn slots(&self, connections: usize, unit: usize) -> std::ops::Range<usize> {
        let unit = unit.max(1);
        let units = connections / unit;
        let start = units * self.worker / self.workers;
        let end = units * (self.worker + 1) / self.workers;
        let (start, end) = (start * unit, end * unit);
        // Clients that do not fill a unit go to the last worker (they idle in pairs/groups).
        if self.worker + 1 == self.workers {
            start..connections
        } else {
            start..end
        }
    }
}

/// What one process measured; what a worker hands the parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessResult {
    pub stats: Stats,
    pub verdict: Option<Verdict>,
    pub clients: usize,
    pub source_addrs: Vec<IpAddr>,
    pub threads: usize,
    pub io_driver: String,
    /// CPU seconds (user + system) this process used during the measured window.
    #[serde(default)]
    pub cpu_seconds: f64,
}

impl ProcessResult {
    pub fn merge(&mut self, other: ProcessResult) -> anyhow::Result<()> {
        self.stats.merge(other.stats)?;
        self.verdict = match (self.verdict.take(), other.verdict) {
            (Some(mut mine), Some(theirs)) => {
                mine.acked += theirs.acked;
                mine.deliveries_expected += theirs.deliveries_expected;
                mine.lost += theirs.lost;
                mine.duplicates += theirs.duplicates;
                mine.resync_overlap += theirs.resync_overlap;
                mine.seq_gaps += theirs.seq_gaps;
                for session in theirs.lossy_sessions {
                    if mine.lossy_sessions.len() < 10 {
                        mine.lossy_sessions.push(session);
                    }
                }
                Some(mine)
            }
            (mine, theirs) => mine.or(theirs),
        };
        self.clients += other.clients;
        self.cpu_seconds += other.cpu_seconds;
        self.source_addrs.extend(other.source_addrs);
        Ok(())
    }
}

/// Run-wide identifiers and timing shared by every process.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub run_id: String,
    pub share: Share,
}

/// Everything prepared before the clock starts (tokens minted, groups created).
#[derive(Debug)]
pub struct Prepared {
    plan_without_origin: PlanParts,
    pub threads: usize,
    pub driver: IoDriver,
    pub cpus: Vec<usize>,
}

#[derive(Debug)]
struct PlanParts {
    run_id: String,
    target: Target,
    server: std::net::SocketAddr,
    local_addrs: Vec<IpAddr>,
    clients: Vec<ClientPlan>,
    behaviour: Behaviour,
    senders: usize,
    connect_rate: f64,
    ramp_ns: u64,
    group_members: BTreeMap<String, Vec<usize>>,
}

/// Builds this process's clients. Slow work (minting, gRPC) happens here, before the start.
pub fn prepare(cli: &Cli, context: &RunContext) -> anyhow::Result<Prepared> {
    let common = &cli.common;
    let target = common.transport()?;
    let server = target.resolve()?;
    let share = context.share;
    let slots = share.slots(common.connections, cli.scenario.unit());
    let prefix = common
        .user_prefix
        .clone()
        .unwrap_or_else(|| format!("lg-{}-", context.run_id));
    let identities = match (&common.tokens_file, &common.jwt_secret) {
        (Some(path), _) => token::read_identities(path, slots.clone())?,
        (None, Some(secret)) => {
            token::mint_identities(secret.as_bytes(), &prefix, &context.run_id, slots.clone())?
        }
        (None, None) => anyhow::bail!(
            "no tokens: pass --jwt-secret (or JWT_SECRET) to mint them, or --tokens-file"
        ),
    };
    let count = identities.len();
    let mut group_members = BTreeMap::new();
    let mut targets: Vec<SendTarget> = vec![SendTarget::None; count];
    let mut sends = vec![false; count];
    let mut sessions: Vec<Vec<String>> = vec![Vec::new(); count];
    let mut drop_at = vec![None; count];
    let behaviour = match &cli.scenario {
        Scenario::Connect => Behaviour::Idle,
        Scenario::Ping(ping) => {
            sends.iter_mut().for_each(|send| *send = true);
            Behaviour::Ping {
                rate: match ping.rate {
                    Rate::PerSecond(rate) => Some(rate * count as f64 / common.connections as f64),
                    Rate::Max => None,
                },
                in_flight: ping.in_flight.max(1),
            }
        }
        Scenario::Chat(chat) => {
            for index in 0..count {
                targets[index] = match chat.peers {
                    Peers::Pairs if index ^ 1 < count => SendTarget::Peer(index ^ 1),
                    Peers::Pairs => SendTarget::None,
                    Peers::Random if count > 1 => SendTarget::RandomPeer,
                    Peers::Random => SendTarget::None,
                };
                sends[index] = !matches!(targets[index], SendTarget::None);
            }
            Behaviour::Chat {
                rate: chat.rate * count as f64 / common.connections as f64,
                message_bytes: chat.message_bytes,
            }
        }
        Scenario::Sync(sync) => {
            anyhow::ensure!(
                (0.0..=1.0).contains(&sync.drop_share),
                "--drop-share must be within 0..=1"
            );
            for index in 0..count {
                if index ^ 1 < count {
                    targets[index] = SendTarget::Peer(index ^ 1);
                    sends[index] = true;
                    sessions[index].push(p2p_session(
                        &identities[index].user_id,
                        &identities[index ^ 1].user_id,
                    ));
                }
                // Spread the droppers evenly: client i drops when the running share steps.
                let steps = |i: usize| (i as f64 * sync.drop_share).floor();
                if steps(index + 1) > steps(index) {
                    drop_at[index] = Some(0);
                }
            }
            Behaviour::Chat {
                rate: sync.rate * count as f64 / common.connections as f64,
                message_bytes: sync.message_bytes,
            }
        }
        Scenario::Group(group) => {
            let size = group.group_size.max(2);
            let member_lists: Vec<Vec<token::Identity>> = identities
                .chunks_exact(size)
                .map(<[token::Identity]>::to_vec)
                .collect();
            let caller = match &group.internal_token {
                Some(secret) => groups::Caller::Internal(secret.clone()),
                None => groups::Caller::OwnerToken,
            };
            let session_ids = if member_lists.is_empty() {
                Vec::new()
            } else {
                groups::create_groups(&group.grpc_addr, &caller, &context.run_id, &member_lists)?
            };
            let senders_per_group = if group.senders_per_group == 0 {
                size
            } else {
                group.senders_per_group.min(size)
            };
            for (group_index, session_id) in session_ids.iter().enumerate() {
                let members: Vec<usize> = (group_index * size..(group_index + 1) * size).collect();
                for (position, &member) in members.iter().enumerate() {
                    targets[member] = SendTarget::Session(session_id.clone());
                    sends[member] = position < senders_per_group;
                    sessions[member].push(session_id.clone());
                }
                group_members.insert(session_id.clone(), members);
            }
            Behaviour::Chat {
                rate: group.rate * count as f64 / common.connections as f64,
                message_bytes: group.message_bytes,
            }
        }
    };
    let senders = sends.iter().filter(|&&send| send).count();
    let clients = identities
        .into_iter()
        .enumerate()
        .map(|(index, identity)| ClientPlan {
            identity,
            target: targets[index].clone(),
            sends: sends[index],
            drop_at_ns: drop_at[index],
            sessions: std::mem::take(&mut sessions[index]),
        })
        .collect();
    let local_addrs = source_addrs(cli, &server, share);
    let connect_rate = common.connect_rate * count as f64 / common.connections.max(1) as f64;
    let threads = threads(common.threads, share.workers);
    Ok(Prepared {
        plan_without_origin: PlanParts {
            run_id: context.run_id.clone(),
            target,
            server,
            local_addrs,
            clients,
            behaviour,
            senders,
            connect_rate,
            ramp_ns: rate::ramp_ns(common.connections as u64, common.connect_rate),
            group_members,
        },
        threads,
        driver: common.io_driver,
        cpus: common.cpus.clone(),
    })
}

/// The single-chat session id of two users (docs/PROTOCOL.md: sorted bytewise).
pub fn p2p_session(a: &str, b: &str) -> String {
    if a.as_bytes() <= b.as_bytes() {
        format!("p2p:{a}:{b}")
    } else {
        format!("p2p:{b}:{a}")
    }
}

fn threads(requested: usize, workers: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    cores.div_ceil(workers.max(1)).max(1)
}

/// The source addresses of this worker: its round-robin share of `--local-addr`, or for a
/// loopback target 127.0.0.2, 127.0.0.3, ... (each worker its own), or none.
pub fn source_addrs(cli: &Cli, server: &std::net::SocketAddr, share: Share) -> Vec<IpAddr> {
    let common = &cli.common;
    let all: Vec<IpAddr> = if !common.local_addrs.is_empty() {
        common.local_addrs.clone()
    } else if server.ip().is_loopback() && server.is_ipv4() {
        let wanted = if common.source_addrs > 0 {
            common.source_addrs
        } else {
            common
                .connections
                .div_ceil(CONNECTIONS_PER_SOURCE_ADDR)
                .max(share.workers)
        };
        (0..wanted.min(250))
            .map(|i| IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2 + i as u8)))
            .collect()
    } else {
        Vec::new()
    };
    if all.len() >= share.workers {
        all.into_iter()
            .enumerate()
            .filter(|(i, _)| i % share.workers == share.worker)
            .map(|(_, addr)| addr)
            .collect()
    } else {
        all
    }
}

/// Runs the prepared clients with the clock started at `origin`; `progress` gets one slot
/// per shard.
pub fn execute(
    cli: &Cli,
    prepared: Prepared,
    origin: Instant,
    progress: &[Arc<Progress>],
) -> anyhow::Result<ProcessResult> {
    let common = &cli.common;
    let parts = prepared.plan_without_origin;
    let load_start_ns = parts.ramp_ns + SETTLE_NS;
    let measure_start_ns = load_start_ns + seconds_ns(common.warmup);
    let load_end_ns = measure_start_ns + seconds_ns(common.duration);
    let run_end_ns = load_end_ns + seconds_ns(common.grace);
    let phases = Phases {
        load_start_ns,
        measure_start_ns,
        load_end_ns,
        run_end_ns,
        hard_end_ns: run_end_ns + CLOSE_NS,
    };
    let drop_ns = match &cli.scenario {
        Scenario::Sync(sync) => Some(measure_start_ns + seconds_ns(sync.drop_after)),
        _ => None,
    };
    let (offline_ns, sync_limit) = match &cli.scenario {
        Scenario::Sync(sync) => (sync.offline_ms * 1_000_000, sync.sync_limit),
        _ => (0, 100),
    };
    let mut clients = parts.clients;
    for client in &mut clients {
        if client.drop_at_ns.is_some() {
            client.drop_at_ns = drop_ns;
        }
    }
    let user_index: HashMap<String, usize> = clients
        .iter()
        .enumerate()
        .map(|(index, client)| (client.identity.user_id.clone(), index))
        .collect();
    let client_count = clients.len();
    let plan = Arc::new(Plan {
        run_id: parts.run_id,
        transport: parts.target.transport,
        codec: common.codec,
        host: parts.target.authority.clone(),
        path: parts.target.path.clone(),
        server: parts.server,
        local_addrs: parts.local_addrs.clone(),
        clients,
        behaviour: parts.behaviour,
        senders: parts.senders.max(1),
        connect_rate: parts.connect_rate,
        connect_timeout: Duration::from_millis(common.connect_timeout_ms),
        heartbeat_ns: common.heartbeat_ms * 1_000_000,
        offline_ns,
        sync_limit,
        origin,
        phases,
    });
    let threads = prepared.threads.min(client_count.max(1));
    let mut handles = Vec::with_capacity(threads);
    for shard in 0..threads {
        // Round robin, so the ramp (in client order) is spread over the shards.
        let indices: Vec<usize> = (shard..client_count).step_by(threads).collect();
        let cpu = (!prepared.cpus.is_empty()).then(|| prepared.cpus[shard % prepared.cpus.len()]);
        let slot = progress
            .get(shard)
            .cloned()
            .unwrap_or_else(|| Arc::new(Progress::default()));
        handles.push(
            engine::spawn_shard(
                Arc::clone(&plan),
                shard,
                indices,
                prepared.driver,
                cpu,
                slot,
            )
            .context("start a shard thread")?,
        );
    }
    let mut stats = Stats::default();
    let mut views: Vec<ClientView> = vec![ClientView::default(); client_count];
    for handle in handles {
        let result = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a shard thread panicked"))??;
        stats.merge(result.stats)?;
        for (index, view) in result.views {
            views[index] = view;
        }
    }
    let chatty = matches!(
        cli.scenario,
        Scenario::Chat(_) | Scenario::Group(_) | Scenario::Sync(_)
    );
    let verdict = chatty.then(|| {
        let mut members = parts.group_members;
        for view in &views {
            for session in view.sessions.keys() {
                if members.contains_key(session) {
                    continue;
                }
                if let Some(pair) = p2p_members(session, &user_index) {
                    members.insert(session.clone(), pair);
                }
            }
        }
        verdict(&views, &members)
    });
    let uring = match prepared.driver {
        IoDriver::Auto => monoio::utils::detect_uring(),
        IoDriver::Uring => true,
        IoDriver::Legacy => false,
    };
    Ok(ProcessResult {
        stats,
        verdict,
        clients: client_count,
        source_addrs: parts.local_addrs,
        threads,
        io_driver: if uring { "io_uring" } else { "epoll" }.into(),
        cpu_seconds: 0.0,
    })
}

/// The two clients of a `p2p:a:b` session, when both are clients of this process.
fn p2p_members(session: &str, user_index: &HashMap<String, usize>) -> Option<Vec<usize>> {
    let rest = session.strip_prefix("p2p:")?;
    // User ids contain no ':' (docs/PROTOCOL.md), so the split is unambiguous.
    let (a, b) = rest.split_once(':')?;
    Some(vec![*user_index.get(a)?, *user_index.get(b)?])
}

pub fn seconds_ns(seconds: f64) -> u64 {
    (seconds.max(0.0) * 1e9) as u64
}

/// Whether a target's transport needs the TCP auth frame (for the docs of the result).
pub fn transport_name(transport: Transport) -> &'static str {
    match transport {
        Transport::WebSocket => "websocket",
        Transport::Tcp => "tcp",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_all_clients_in_whole_units() {
        for (connections, unit, workers) in [(100, 1, 3), (101, 2, 4), (1000, 10, 7), (5, 2, 1)] {
            let mut covered = Vec::new();
            for worker in 0..workers {
                let slots = Share { worker, workers }.slots(connections, unit);
                if worker + 1 < workers {
                    assert_eq!(slots.len() % unit, 0, "{connections}/{unit}/{workers}");
                }
                covered.extend(slots);
            }
            assert_eq!(covered, (0..connections).collect::<Vec<_>>());
        }
    }

    #[test]
    fn p2p_session_ids_sort_users_bytewise() {
        assert_eq!(p2p_session("u2", "u10"), "p2p:u10:u2");
        assert_eq!(p2p_session("a", "b"), "p2p:a:b");
        let users = HashMap::from([("a".to_owned(), 3), ("b".to_owned(), 7)]);
        assert_eq!(p2p_members("p2p:a:b", &users), Some(vec![3, 7]));
        assert_eq!(p2p_members("grp:1", &users), None);
    }
}
