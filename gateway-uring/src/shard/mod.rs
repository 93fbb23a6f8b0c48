//! Shards: one monoio runtime per core on a pinned thread, each with its own SO_REUSEPORT
//! WebSocket and TCP listeners, connection table and handler. Nothing on the hot path is
//! shared between shards but [`NodeShared`]: the connection counter touched at connect and
//! close, and the per-user send rate limiter checked once per `send` frame. Everything else
//! that crosses is a [`ShardCommand`] over each shard's bounded inbox: pushes from the push
//! consumer (one batch per poll), upstream failures from the producer's delivery reports,
//! shutdown.

mod buffers;
mod connection;
mod lifecycle;
mod pushes;
mod send_rate;
mod tcp_conn;
mod users;
mod writer;
mod ws_conn;

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::auth::{Authenticator, Identity};
use crate::config::{IoDriver, Limits, UringTaskRun};
use crate::handler::ClusterHandler;
use crate::push::PushItem;
use crate::reader_bridge::ReaderBridge;
use crate::redis_bridge::{RedisBridge, RouteEntry};
use crate::upstream::Upstream;

pub use connection::encode_reply;
pub use send_rate::{SEND_RATE_SWEEP_INTERVAL_MS, SendRateLimiter};
pub use writer::OutboundQueue;

/// io_uring submission queue entries per shard.
const URING_ENTRIES: u32 = 1024;
/// Commands waiting in one shard's inbox.
pub const SHARD_INBOX_MAX: usize = 1024;
/// Most inbox commands handled per wake-up (drained in bulk, bounded so accepts interleave).
const INBOX_DRAIN_MAX: usize = 256;

/// Bits of a connection id below the shard index.
const CONNECTION_SHARD_SHIFT: u32 = 56;

/// The shard that owns a connection id (its top 8 bits).
pub fn shard_of(connection_id: u64) -> usize {
    (connection_id >> CONNECTION_SHARD_SHIFT) as usize
}

/// Everything that may cross from one thread into a shard. Closed on purpose: adding a
/// cross-shard interaction means adding a variant here.
#[derive(Debug)]
pub enum ShardCommand {
    /// Stop accepting, close every connection with 1001, then exit.
    Shutdown,
    /// Frames from the push consumer for this shard's connections: one batch per poll.
    Push(Vec<PushItem>),
    /// The broker did not take a client's `send` (queue timeout, broker down): answer
    /// `unavailable` so the client resends.
    UpstreamFailed {
        connection_id: u64,
        client_msg_id: String,
        request_id: Option<String>,
    },
}

/// State of the whole node, shared by all shards (crosses shards). The connection counter
/// is touched only when a connection opens or closes; the send rate limiter once per `send`
/// frame, never for other frames.
#[derive(Debug)]
pub struct NodeShared {
    connections: AtomicUsize,
    /// Per user, not per connection or shard: SO_REUSEPORT puts each of a user's devices on
    /// any shard, so a shard-local limit would let a user with N devices send N times the
    /// rate. This is the one piece of per-frame state that crosses shards; a check is one
    /// striped read lock plus a compare-and-swap, once per `send`.
    pub send_rate: SendRateLimiter,
}

impl NodeShared {
    pub fn new(limits: &Limits) -> Self {
        Self {
            connections: AtomicUsize::new(0),
            send_rate: SendRateLimiter::new(
                NonZeroU32::new(limits.send_rate_per_second)
                    .expect("validated: CHATIFY_SEND_RATE_PER_SECOND > 0"),
                NonZeroU32::new(limits.send_burst).expect("validated: CHATIFY_SEND_BURST > 0"),
            ),
        }
    }

    /// Claims a connection slot; `None` when the node is full.
    pub fn try_claim(self: &Arc<Self>, max: usize) -> Option<ConnectionSlot> {
        let claimed = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |live| {
                (live < max).then_some(live + 1)
            })
            .is_ok();
        claimed.then(|| {
            metrics::gauge!("chatify_gateway_connections").increment(1.0);
            ConnectionSlot(Arc::clone(self))
        })
    }

    pub fn live_connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
}

/// A claimed connection slot, released on drop.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<NodeShared>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("chatify_gateway_connections").decrement(1.0);
    }
}

/// What one shard needs to run; built on the main thread, moved into the shard thread.
#[derive(Debug, Clone)]
pub struct ShardSetup {
    pub index: usize,
    pub ws_addr: SocketAddr,
    pub tcp_addr: SocketAddr,
    pub io_driver: IoDriver,
    pub uring_taskrun: UringTaskRun,
    pub limits: Limits,
    pub auth: Authenticator,
    pub redis: RedisBridge,
    pub node: Arc<NodeShared>,
    pub cluster: ShardCluster,
}

/// The cluster side of a shard: who it is, where sends go, who answers history requests.
#[derive(Debug, Clone)]
pub struct ShardCluster {
    pub node_id: Arc<str>,
    /// Random per process start: part of every connection id and message id, so ids of
    /// this run never meet those of an earlier run of the same node (a stale push for a
    /// connection of a previous run finds nothing instead of a stranger).
    pub boot_nonce: u32,
    pub upstream: Arc<Upstream>,
    pub reader: Option<ReaderBridge>,
    pub route_refresh_ms: u64,
}

/// A live connection as pushes and route refreshes see it. Shard-local.
#[derive(Debug)]
pub(crate) struct LiveConnection {
    pub(crate) connection_id: u64,
    /// Frames waiting for the connection's task to write them.
    pub(crate) queue: OutboundQueue,
    /// Who the token said the client is (reached by the connection's frame handling
    /// through this entry: one copy per connection, in one allocation).
    pub(crate) identity: ConnectionIdentity,
    pub(crate) connected_at_ms: u64,
    /// Pushes go out in the wire format of the last data frame the client sent (protobuf
    /// for TCP and binary WebSocket frames, JSON for text frames).
    pub(crate) push_binary: Cell<bool>,
    /// Refreshed when the client is heard from; written to Redis in batches by the route
    /// refresh, never per frame, and read by the heartbeat sweep.
    pub(crate) last_active_ms: Cell<u64>,
    /// Set by the shard's heartbeat sweep when the client was silent for the heartbeat
    /// timeout; the connection's task then closes it with `heartbeat timeout` (the sweep
    /// wakes the task through the outbound queue's waker, which is the task's).
    pub(crate) heartbeat_expired: Cell<bool>,
    /// Reader requests (`sync`, `read`, `recall`) of this connection not answered yet.
    pub(crate) reader_in_flight: Cell<u32>,
}

impl LiveConnection {
    /// The heartbeat sweep found the client silent for too long: end its read.
    fn expire_heartbeat(&self) {
        self.heartbeat_expired.set(true);
        self.queue.wake();
    }

    pub(crate) fn route_entry(&self) -> RouteEntry {
        RouteEntry {
            user_id: self.identity.user_id().to_owned(),
            device_id: self.identity.device_id().to_owned(),
            token_id: self.identity.token_id().to_owned(),
            connection_id: self.connection_id,
            connected_at_ms: self.connected_at_ms,
            last_active_ms: self.last_active_ms.get(),
        }
    }
}

/// A connection's identity as its table entry keeps it (shard-local): the token's user id,
/// device id and token id one after another in one allocation, and where the first two
/// end. Every idle connection holds one, so it is 24 B and one block instead of three
/// `String`s (72 B and three blocks).
#[derive(Debug)]
pub(crate) struct ConnectionIdentity {
    ids: Box<str>,
    user_end: u32,
    device_end: u32,
}

impl ConnectionIdentity {
    pub(crate) fn new(identity: &Identity) -> Self {
        let ids = [
            identity.user_id.as_str(),
            &identity.device_id,
            &identity.jti,
        ]
        .concat()
        .into_boxed_str();
        // A token is read from one request head (bounded by the handshake limits), so its
        // ids are far below 4 GiB.
        let user_end = identity.user_id.len();
        let device_end = user_end + identity.device_id.len();
        Self {
            ids,
            user_end: u32::try_from(user_end).expect("ids of one token fit in u32"),
            device_end: u32::try_from(device_end).expect("ids of one token fit in u32"),
        }
    }

    pub(crate) fn user_id(&self) -> &str {
        &self.ids[..self.user_end as usize]
    }

    pub(crate) fn device_id(&self) -> &str {
        &self.ids[self.user_end as usize..self.device_end as usize]
    }

    /// The token's `jti`.
    pub(crate) fn token_id(&self) -> &str {
        &self.ids[self.device_end as usize..]
    }
}

/// The shard's live connections by id (shard-local): a set of the entries themselves, looked
/// up by the id each holds, so a slot is one pointer (a map from id to entry would repeat
/// the id in every slot: 16 B instead of 8 per slot, ≈14 B per connection).
#[derive(Debug, Default)]
pub(crate) struct ConnectionTable(HashSet<ById>);

/// An entry that hashes and compares as its connection id.
#[derive(Debug)]
struct ById(Rc<LiveConnection>);

impl std::hash::Hash for ById {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Exactly as `u64` hashes, as `Borrow<u64>` requires.
        self.0.connection_id.hash(state);
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.connection_id == other.0.connection_id
    }
}

impl Eq for ById {}

impl std::borrow::Borrow<u64> for ById {
    fn borrow(&self) -> &u64 {
        &self.0.connection_id
    }
}

impl ConnectionTable {
    pub(crate) fn insert(&mut self, live: Rc<LiveConnection>) {
        self.0.replace(ById(live));
    }

    pub(crate) fn remove(&mut self, connection_id: &u64) -> Option<Rc<LiveConnection>> {
        self.0.take(connection_id).map(|entry| entry.0)
    }

    pub(crate) fn get(&self, connection_id: &u64) -> Option<&Rc<LiveConnection>> {
        self.0.get(connection_id).map(|entry| &entry.0)
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Rc<LiveConnection>> {
        self.0.iter().map(|entry| &entry.0)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Shard-local state every connection task of the shard can reach.
pub(crate) struct Shard {
    pub(crate) index: usize,
    pub(crate) limits: Limits,
    pub(crate) auth: Authenticator,
    pub(crate) redis: RedisBridge,
    pub(crate) node: Arc<NodeShared>,
    pub(crate) cluster: ShardCluster,
    pub(crate) handler: ClusterHandler,
    /// Read and write buffers lent to connections while bytes are in hand, and the JSON
    /// scratch buffer.
    pub(crate) buffers: buffers::BufferPool,
    /// Live connections of this shard by connection id.
    pub(crate) connections: RefCell<ConnectionTable>,
    /// The same connections by user id, for pushes addressed to users (keyed by the
    /// entries' own identities, see [`users::UsersIndex`]).
    pub(crate) users: RefCell<users::UsersIndex>,
    next_connection: Cell<u64>,
    pub(crate) shutting_down: Cell<bool>,
}

impl Shard {
    /// Node-unique connection id: shard index in the top 8 bits, the boot nonce in the next
    /// 24, a per-shard counter in the low 32.
    pub(crate) fn next_connection_id(&self) -> u64 {
        let local = self.next_connection.get().wrapping_add(1) & 0xFFFF_FFFF;
        self.next_connection.set(local);
        ((self.index as u64) << CONNECTION_SHARD_SHIFT)
            | (u64::from(self.cluster.boot_nonce & 0xFF_FFFF) << 32)
            | local
    }

    /// Enters a connection in the shard's tables (pushes can reach it from now on).
    pub(crate) fn insert_connection(&self, live: Rc<LiveConnection>) {
        self.users.borrow_mut().insert(&live);
        self.connections.borrow_mut().insert(live);
    }

    /// Takes a connection out of the shard's tables.
    pub(crate) fn remove_connection(&self, connection_id: u64) -> Option<Rc<LiveConnection>> {
        let mut connections = self.connections.borrow_mut();
        let live = connections.remove(&connection_id)?;
        self.users.borrow_mut().remove(&live, &connections);
        Some(live)
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.handshake_timeout_ms)
    }
}

/// A running shard thread and its inbox.
#[derive(Debug)]
pub struct ShardHandle {
    pub inbox: flume::Sender<ShardCommand>,
    pub thread: std::thread::JoinHandle<std::io::Result<()>>,
}

/// Starts one shard thread; listeners are bound before this returns, so a taken port fails
/// start-up instead of a shard dying later.
pub fn spawn(setup: ShardSetup) -> std::io::Result<ShardHandle> {
    let (inbox, commands) = flume::bounded(SHARD_INBOX_MAX);
    let ws_listener = bind_reuse_port(setup.ws_addr)?;
    let tcp_listener = bind_reuse_port(setup.tcp_addr)?;
    let thread = std::thread::Builder::new()
        .name(format!("shard-{}", setup.index))
        .spawn(move || {
            // Pinning keeps a shard's caches warm; failure (e.g. a restricted cpuset) is
            // logged, not fatal.
            let cores = std::thread::available_parallelism().map_or(1, usize::from);
            if let Err(error) = monoio::utils::bind_to_cpu_set([setup.index % cores]) {
                tracing::warn!(shard = setup.index, ?error, "cannot pin shard to a core");
            }
            let (driver, taskrun) = (setup.io_driver, setup.uring_taskrun);
            run_on_driver(driver, taskrun, setup.index, move || {
                run_shard(setup, ws_listener, tcp_listener, commands)
            })
        })?;
    Ok(ShardHandle { inbox, thread })
}

fn bind_reuse_port(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    // Every shard binds the same address; the kernel spreads new connections over them.
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Runs `shard` on the requested monoio driver, logging which one it got.
fn run_on_driver<F, Fut>(
    driver: IoDriver,
    taskrun: UringTaskRun,
    index: usize,
    shard: F,
) -> std::io::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>>,
{
    let uring_available = monoio::utils::detect_uring();
    let use_uring = match driver {
        IoDriver::Auto => uring_available,
        IoDriver::Uring if !uring_available => {
            return Err(std::io::Error::other(
                "CHATIFY_IO_DRIVER=uring but io_uring is not available (kernel, seccomp or RLIMIT_MEMLOCK)",
            ));
        }
        IoDriver::Uring => true,
        IoDriver::Legacy => false,
    };
    if use_uring {
        let (mut runtime, taskrun) = uring_runtime(taskrun)?;
        tracing::info!(
            shard = index,
            driver = "io_uring",
            ?taskrun,
            "shard started"
        );
        runtime.block_on(shard())
    } else {
        tracing::info!(shard = index, driver = "epoll", "shard started");
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()?
            .block_on(shard())
    }
}

type UringRuntime = monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>;

/// A shard's io_uring runtime with the task-run mode asked for; a kernel that refuses the
/// mode's setup flags (older than 6.1 / 6.0) gets the next mode ([`UringTaskRun::fallback`]),
/// and the mode it got is returned.
pub(crate) fn uring_runtime(
    mut taskrun: UringTaskRun,
) -> std::io::Result<(UringRuntime, UringTaskRun)> {
    loop {
        let mut setup = io_uring::IoUring::builder();
        match taskrun {
            // The ring is only ever used from its shard's thread, which SINGLE_ISSUER
            // promises the kernel (and DEFER_TASKRUN requires).
            UringTaskRun::Defer => {
                setup.setup_defer_taskrun().setup_single_issuer();
            }
            UringTaskRun::Coop => {
                setup.setup_coop_taskrun().setup_single_issuer();
            }
            UringTaskRun::Signal => {}
        }
        let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .uring_builder(setup)
            .with_entries(URING_ENTRIES)
            .enable_timer()
            .build();
        match (built, taskrun.fallback()) {
            (Ok(runtime), _) => return Ok((runtime, taskrun)),
            (Err(error), Some(next)) => {
                tracing::warn!(?taskrun, %error, ?next, "io_uring refused the task-run setup");
                taskrun = next;
            }
            (Err(error), None) => return Err(error),
        }
    }
}

async fn run_shard(
    setup: ShardSetup,
    ws_listener: std::net::TcpListener,
    tcp_listener: std::net::TcpListener,
    commands: flume::Receiver<ShardCommand>,
) -> std::io::Result<()> {
    let ws_listener = monoio::net::TcpListener::from_std(ws_listener)?;
    let tcp_listener = monoio::net::TcpListener::from_std(tcp_listener)?;
    let handler = ClusterHandler::new(setup.index, &setup.cluster);
    let shard = Rc::new(Shard {
        index: setup.index,
        limits: setup.limits,
        auth: setup.auth,
        redis: setup.redis,
        node: setup.node,
        cluster: setup.cluster,
        handler,
        buffers: buffers::BufferPool::default(),
        connections: RefCell::new(ConnectionTable::default()),
        users: RefCell::new(users::UsersIndex::default()),
        next_connection: Cell::new(0),
        shutting_down: Cell::new(false),
    });
    let ws_accept = monoio::spawn(accept_loop(
        Rc::clone(&shard),
        ws_listener,
        Transport::WebSocket,
    ));
    let tcp_accept = monoio::spawn(accept_loop(Rc::clone(&shard), tcp_listener, Transport::Tcp));
    let refresher = monoio::spawn(refresh_routes(Rc::clone(&shard)));
    let heartbeats = monoio::spawn(sweep_heartbeats(Rc::clone(&shard)));

    'inbox: while let Ok(first) = commands.recv_async().await {
        let mut batch = vec![first];
        while batch.len() < INBOX_DRAIN_MAX {
            match commands.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        for command in batch {
            if handle_command(&shard, command).is_break() {
                break 'inbox;
            }
        }
    }

    // Shutdown (or every sender gone): stop accepting, ask every connection to close.
    shard.shutting_down.set(true);
    drop(ws_accept);
    drop(tcp_accept);
    drop(refresher);
    drop(heartbeats);
    let connections: Vec<Rc<LiveConnection>> =
        shard.connections.borrow().values().cloned().collect();
    for live in &connections {
        live.queue.close(1001, "server shutting down");
    }
    drop(connections);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !shard.connections.borrow().is_empty() && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(shard = shard.index, "shard stopped");
    Ok(())
}

/// One inbox command; `Break` stops the shard.
fn handle_command(shard: &Shard, command: ShardCommand) -> std::ops::ControlFlow<()> {
    match command {
        ShardCommand::Shutdown => return std::ops::ControlFlow::Break(()),
        ShardCommand::Push(items) => pushes::deliver(shard, &items),
        ShardCommand::UpstreamFailed {
            connection_id,
            client_msg_id,
            request_id,
        } => pushes::answer_upstream_failure(shard, connection_id, client_msg_id, request_id),
    }
    std::ops::ControlFlow::Continue(())
}

/// Every `CHATIFY_ROUTE_REFRESH_MS`, hands the routes of all this shard's connections (with
/// their last-active times) to the Redis bridge in one request: the route TTL is pushed out
/// and last-active is written in a batch, never per frame.
async fn refresh_routes(shard: Rc<Shard>) {
    let every = Duration::from_millis(shard.cluster.route_refresh_ms);
    loop {
        monoio::time::sleep(every).await;
        let entries: Vec<RouteEntry> = shard
            .connections
            .borrow()
            .values()
            .map(|live| live.route_entry())
            .collect();
        if !entries.is_empty() {
            shard.redis.refresh_routes(entries);
        }
    }
}

/// Heartbeat sweeps per heartbeat timeout: a silent connection is closed between 1 and
/// 1 + 1/4 timeouts after it was last heard from.
const HEARTBEAT_SWEEPS_PER_TIMEOUT: u64 = 4;
/// Bounds of the sweep interval.
const HEARTBEAT_SWEEP_MS_MIN: u64 = 10;
const HEARTBEAT_SWEEP_MS_MAX: u64 = 5_000;

/// Closes connections silent for the heartbeat timeout. One shard-wide timer instead of one
/// per connection: a monoio timer entry is several hundred bytes (cache-padded), which an
/// idle connection would carry for its whole life.
async fn sweep_heartbeats(shard: Rc<Shard>) {
    let timeout_ms = shard.limits.heartbeat_timeout_ms;
    let every_ms = (timeout_ms / HEARTBEAT_SWEEPS_PER_TIMEOUT)
        .clamp(HEARTBEAT_SWEEP_MS_MIN, HEARTBEAT_SWEEP_MS_MAX);
    loop {
        monoio::time::sleep(Duration::from_millis(every_ms)).await;
        let now_ms = chatify_core::routing::unix_now_ms();
        for live in shard.connections.borrow().values() {
            if !live.heartbeat_expired.get()
                && now_ms.saturating_sub(live.last_active_ms.get()) >= timeout_ms
            {
                live.expire_heartbeat();
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Transport {
    WebSocket,
    Tcp,
}

async fn accept_loop(shard: Rc<Shard>, listener: monoio::net::TcpListener, transport: Transport) {
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning; existing connections
                // keep working.
                metrics::counter!("chatify_gateway_accept_errors_total").increment(1);
                tracing::warn!(shard = shard.index, %error, "accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shard.shutting_down.get() {
            return;
        }
        let _ = stream.set_nodelay(true);
        let shard = Rc::clone(&shard);
        match transport {
            Transport::WebSocket => {
                monoio::spawn(ws_conn::serve(shard, stream));
            }
            Transport::Tcp => {
                monoio::spawn(tcp_conn::serve(shard, stream));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Size of the future a two-argument function returns, without calling it.
    fn future_bytes<A, B, F: std::future::Future>(_: impl FnOnce(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// What every idle connection holds besides the kernel's socket: its task (one
    /// allocation: monoio's task header and this future) and its entry in the shard's table.
    /// A regression here costs every connection, so the sizes are bounded (measured on the
    /// test build; BENCHMARKS.md "Idle connections" has the release figures).
    #[test]
    fn connection_task_sizes() {
        let ws = future_bytes(ws_conn::serve);
        let tcp = future_bytes(tcp_conn::serve);
        let entry = std::mem::size_of::<LiveConnection>();
        eprintln!(
            "bytes: ws_conn::serve future {ws}, tcp_conn::serve future {tcp}, LiveConnection {entry}"
        );
        // 264, 256 and 144 B when these budgets were set (328 and 288 B before the decoder's
        // reassembly state was boxed and a frame spanning reads kept its bytes in the boxed
        // read rather than in the task; 568 and 560 B before the idle read side was only the
        // zero-length `recv`). With monoio's task header (48 B) the task fits mimalloc's
        // 320 B size class; 16 B more would make it a 384 B block.
        assert!(ws <= 272, "ws_conn::serve future is {ws} B");
        assert!(tcp <= 272, "tcp_conn::serve future is {tcp} B");
        // The entry was 208 B before its identity became one allocation and 144 B before the
        // outbound queue's frames became a `ThinVec`; with the `Rc` header (16 B) 112 B is
        // mimalloc's 128 B size class.
        assert!(entry <= 112, "LiveConnection is {entry} B");
    }
}
