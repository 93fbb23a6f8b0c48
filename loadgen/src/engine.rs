//! The load engine: one monoio runtime per client shard thread (epoll or io_uring driver),
//! each owning its clients, their sockets, buffers and measurements (`Rc`/`RefCell`,
//! nothing shared between shards but the read-only [`Plan`]). A client connects at its slot
//! of the ramp (bound to one of the source addresses, round robin), authenticates, and then
//! runs two tasks on its socket: a reader that decodes and accounts for everything the
//! server sends, and a writer that sends at the open-loop schedule and coalesces everything
//! due (sends, heartbeats, answers the reader queued) into one write.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use chatify_proto::client::v1::{MessageType, Send, Sync as SyncFrame, client_frame, server_frame};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt as _, Splitable as _};
use monoio::net::TcpStream;

use crate::accounting::ClientView;
use crate::cli::{Codec, IoDriver, Transport};
use crate::frames::{self, Framer};
use crate::rate::{self, Schedule};
use crate::stats::{Counter, Latency, Stats};
use crate::token::Identity;
use crate::wire::{self, ServerFrameDecoder, ServerMessage};

/// Bytes a read asks for at least.
const READ_CHUNK_BYTES: usize = 4096;
/// Most scheduled sends put into one write (the rest stay due for the next).
const SENDS_PER_WRITE_MAX: usize = 256;
/// How long a closing client waits for the server's answer to its close.
const CLOSE_WAIT: Duration = Duration::from_millis(500);
/// Longest single timer: longer waits are taken in steps, since long monoio sleeps were seen
/// to fire late with thousands of timers armed (docs/BENCHMARKS.md).
const SLEEP_MAX: Duration = Duration::from_secs(1);
/// io_uring submission queue entries per shard.
const URING_ENTRIES: u32 = 4096;

/// What each client does once connected.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Heartbeats only.
    Idle,
    /// `ping` at an aggregate rate (`None`: closed loop with `in_flight` outstanding).
    Ping { rate: Option<f64>, in_flight: usize },
    /// `send` at an aggregate rate to the client's target.
    Chat { rate: f64, message_bytes: usize },
}

/// Whom a client's sends go to.
#[derive(Debug, Clone)]
pub enum SendTarget {
    None,
    /// A single chat with the user of client `peer` (an index into [`Plan::clients`]).
    Peer(usize),
    /// A random other client of this process for every send.
    RandomPeer,
    /// A group session id.
    Session(String),
}

/// One client of this process.
#[derive(Debug, Clone)]
pub struct ClientPlan {
    pub identity: Identity,
    pub target: SendTarget,
    /// Whether the client sends at all (group members beyond the senders only receive).
    pub sends: bool,
    /// `sync`: when (ns since origin) the client drops, if it is one of the droppers.
    pub drop_at_ns: Option<u64>,
    /// The sessions the client catches up on after a reconnect.
    pub sessions: Vec<String>,
}

/// Phase boundaries in ns since the origin.
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    pub load_start_ns: u64,
    pub measure_start_ns: u64,
    pub load_end_ns: u64,
    pub run_end_ns: u64,
    /// The engine stops here whatever is still open (`run_end` + close wait).
    pub hard_end_ns: u64,
}

/// Everything the shards of one process need, read-only once built (shared by `Arc`).
#[derive(Debug)]
pub struct Plan {
    pub run_id: String,
    pub transport: Transport,
    pub codec: Codec,
    pub host: String,
    pub path: String,
    pub server: SocketAddr,
    pub local_addrs: Vec<IpAddr>,
    pub clients: Vec<ClientPlan>,
    pub behaviour: Behaviour,
    /// Clients that send (the rate is shared among them).
    pub senders: usize,
    pub connect_rate: f64,
    pub connect_timeout: Duration,
    pub heartbeat_ns: u64,
    pub offline_ns: u64,
    pub sync_limit: u32,
    pub origin: Instant,
    pub phases: Phases,
}

impl Plan {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The second of the series `at_ns` falls in, if it is in the measured window.
    fn second(&self, at_ns: u64) -> Option<usize> {
        (at_ns >= self.phases.measure_start_ns && at_ns < self.phases.run_end_ns)
            .then(|| ((at_ns - self.phases.measure_start_ns) / 1_000_000_000) as usize)
    }

    /// Whether a send intended at `at_ns` is measured.
    fn measured(&self, at_ns: u64) -> bool {
        at_ns >= self.phases.measure_start_ns && at_ns < self.phases.load_end_ns
    }
}

/// Live counters one shard publishes for the progress display (relaxed atomics written a
/// few times a second, never on the hot path).
#[derive(Debug, Default)]
pub struct Progress {
    pub open: AtomicU64,
    pub failed: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// What one shard hands back.
#[derive(Debug)]
pub struct ShardResult {
    pub stats: Stats,
    /// By client index.
    pub views: Vec<(usize, ClientView)>,
}

/// Runs the clients of `indices` on a new shard thread.
pub fn spawn_shard(
    plan: Arc<Plan>,
    shard_index: usize,
    indices: Vec<usize>,
    driver: IoDriver,
    cpu: Option<usize>,
    progress: Arc<Progress>,
) -> std::io::Result<std::thread::JoinHandle<anyhow::Result<ShardResult>>> {
    std::thread::Builder::new()
        .name(format!("loadgen-shard-{shard_index}"))
        .spawn(move || {
            if let Some(cpu) = cpu {
                // A restricted cpuset makes pinning fail; the run goes on unpinned.
                let _ = monoio::utils::bind_to_cpu_set([cpu]);
            }
            let uring = match driver {
                IoDriver::Auto => monoio::utils::detect_uring(),
                IoDriver::Uring => {
                    anyhow::ensure!(
                        monoio::utils::detect_uring(),
                        "--io-driver uring but io_uring is not available to this process"
                    );
                    true
                }
                IoDriver::Legacy => false,
            };
            let shard = run_shard(plan, indices, progress);
            let result = if uring {
                monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                    .with_entries(URING_ENTRIES)
                    .enable_timer()
                    .build()?
                    .block_on(shard)
            } else {
                monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                    .enable_timer()
                    .build()?
                    .block_on(shard)
            };
            Ok(result)
        })
}

/// Shard-local state.
struct Shard {
    plan: Arc<Plan>,
    stats: RefCell<Stats>,
    views: RefCell<HashMap<usize, ClientView>>,
    clients_running: Cell<usize>,
    /// Connections whose writer has not finished (open, as far as the end count goes).
    writers_running: Cell<usize>,
}

async fn run_shard(plan: Arc<Plan>, indices: Vec<usize>, progress: Arc<Progress>) -> ShardResult {
    let shard = Rc::new(Shard {
        plan: Arc::clone(&plan),
        stats: RefCell::new(Stats::default()),
        views: RefCell::new(
            indices
                .iter()
                .map(|&i| (i, ClientView::default()))
                .collect(),
        ),
        clients_running: Cell::new(indices.len()),
        writers_running: Cell::new(0),
    });
    for index in indices {
        monoio::spawn(run_client(Rc::clone(&shard), index));
    }
    loop {
        let now = plan.now_ns();
        {
            let stats = shard.stats.borrow();
            progress.open.store(stats.open_now(), Ordering::Relaxed);
            progress
                .failed
                .store(stats.get(Counter::ConnectFailed), Ordering::Relaxed);
            progress
                .sent
                .store(stats.get(Counter::Sent), Ordering::Relaxed);
            progress.received.store(
                stats.get(Counter::Pongs) + stats.get(Counter::Acks) + stats.get(Counter::Delivers),
                Ordering::Relaxed,
            );
        }
        if now >= plan.phases.hard_end_ns || shard.clients_running.get() == 0 {
            break;
        }
        monoio::time::sleep(Duration::from_millis(100)).await;
    }
    let still_open = shard.writers_running.get() as u64;
    shard.stats.borrow_mut().add_still_open(still_open);
    let mut stats = shard.stats.replace(Stats::default());
    stats.settle();
    let views = shard.views.borrow_mut().drain().collect();
    ShardResult { stats, views }
}

// ---------------------------------------------------------------------------------------------
// One client
// ---------------------------------------------------------------------------------------------

/// A wake-up for the writer: the reader queued bytes or the socket closed. Shard-local.
#[derive(Default)]
struct Notify {
    notified: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    fn notify(&self) {
        self.notified.set(true);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    fn notified(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |context| {
            if self.notified.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(context.waker().clone());
                Poll::Pending
            }
        })
    }
}

/// State the reader and the writer of one connection share.
#[derive(Default)]
struct Live {
    /// Bytes the reader wants sent (answers to server pings, next sync pages).
    outbox: RefCell<BytesMut>,
    notify: Notify,
    /// The reader ended (the socket is gone), and when (ns since the origin).
    closed: Cell<bool>,
    closed_at_ns: Cell<u64>,
    /// We closed on purpose: the reader does not count the end as an early drop.
    closing: Cell<bool>,
    /// Closed-loop pings owed (one per pong received).
    pings_owed: Cell<usize>,
    /// Catch-up in progress: when it started and the sessions not caught up yet.
    catch_up: RefCell<Option<CatchUp>>,
}

struct CatchUp {
    started_ns: u64,
    pending: Vec<String>,
}

async fn run_client(shard: Rc<Shard>, index: usize) {
    let plan = Arc::clone(&shard.plan);
    let connect_at = rate::connect_at_ns(index as u64, plan.connect_rate);
    sleep_until(&plan, connect_at).await;
    let mut reconnect = false;
    let mut dropped = false;
    loop {
        if plan.now_ns() >= plan.phases.run_end_ns {
            break;
        }
        let started = plan.now_ns();
        shard.stats.borrow_mut().count(Counter::ConnectAttempts, 1);
        let connected =
            monoio::time::timeout(plan.connect_timeout, connect(&plan, index, reconnect)).await;
        let (stream, leftover) = match connected {
            Ok(Ok(connected)) => connected,
            Ok(Err(label)) => {
                let mut stats = shard.stats.borrow_mut();
                stats.count(Counter::ConnectFailed, 1);
                stats.error(label);
                break;
            }
            Err(_elapsed) => {
                let mut stats = shard.stats.borrow_mut();
                stats.count(Counter::ConnectFailed, 1);
                stats.error("connect:timeout");
                break;
            }
        };
        let now = plan.now_ns();
        {
            let mut stats = shard.stats.borrow_mut();
            stats.record(Latency::Connect, (now - started) / 1000, None);
            stats.count(Counter::Connected, 1);
            if reconnect {
                stats.count(Counter::Reconnected, 1);
            }
            stats.opened();
        }
        let live = Rc::new(Live::default());
        if reconnect {
            start_catch_up(&shard, index, &live, now);
        }
        let (read_half, write_half) = stream.into_split();
        let reader = monoio::spawn(read_loop(
            Rc::clone(&shard),
            index,
            Rc::clone(&live),
            read_half,
            leftover,
        ));
        let drop_at = if dropped {
            None
        } else {
            plan.clients[index].drop_at_ns
        };
        shard.writers_running.set(shard.writers_running.get() + 1);
        let end = write_loop(&shard, index, &live, write_half, drop_at).await;
        shard.writers_running.set(shard.writers_running.get() - 1);
        let closed_at = if live.closed.get() {
            live.closed_at_ns.get()
        } else {
            plan.now_ns()
        };
        if now < plan.phases.load_end_ns && closed_at >= plan.phases.load_end_ns {
            shard.stats.borrow_mut().held_through_load_end();
        }
        // Give the reader a moment to see the server's answer to our close.
        if !live.closed.get() {
            let _ = monoio::time::timeout(CLOSE_WAIT, reader).await;
        }
        shard.stats.borrow_mut().closed();
        match end {
            WriterEnd::Dropped => {
                shard.stats.borrow_mut().count(Counter::DroppedOnPurpose, 1);
                dropped = true;
                reconnect = true;
                let back_at = plan.now_ns().saturating_add(plan.offline_ns);
                sleep_until(&plan, back_at).await;
            }
            WriterEnd::Finished | WriterEnd::Broken => break,
        }
    }
    shard.clients_running.set(shard.clients_running.get() - 1);
}

async fn sleep_until(plan: &Plan, at_ns: u64) {
    loop {
        let now = plan.now_ns();
        if at_ns <= now {
            return;
        }
        monoio::time::sleep(Duration::from_nanos(at_ns - now).min(SLEEP_MAX)).await;
    }
}

/// Label of a socket error, as counted in `errors`.
pub fn io_label(stage: &str, error: &std::io::Error) -> String {
    let what = match error.raw_os_error() {
        Some(111) => "refused",
        Some(99) => "addr_not_available",
        Some(98) => "addr_in_use",
        Some(24) => "too_many_open_files",
        Some(23) => "file_table_full",
        Some(110) => "timed_out",
        Some(104) => "reset",
        Some(32) => "broken_pipe",
        Some(113) => "no_route",
        Some(101) => "network_unreachable",
        _ => "other",
    };
    if what == "other" {
        format!("{stage}:{:?}", error.kind()).to_lowercase()
    } else {
        format!("{stage}:{what}")
    }
}

/// Opens the socket (bound to the client's source address), upgrades or authenticates.
/// Returns the stream and whatever the server sent after the handshake.
async fn connect(
    plan: &Plan,
    index: usize,
    reconnect: bool,
) -> Result<(TcpStream, BytesMut), String> {
    let local =
        (!plan.local_addrs.is_empty()).then(|| plan.local_addrs[index % plan.local_addrs.len()]);
    let stream = open_socket(plan.server, local)
        .await
        .map_err(|error| io_label("connect", &error))?;
    let identity = &plan.clients[index].identity;
    let mut framer = Framer::new(plan.transport, plan.codec, seed(index, reconnect));
    let mut request = BytesMut::with_capacity(1024);
    let key = match plan.transport {
        Transport::WebSocket => {
            let key = wire::new_key(framer.rng());
            wire::encode_upgrade_request(
                &plan.host,
                &plan.path,
                &key,
                &identity.token,
                &mut request,
            );
            Some(key)
        }
        Transport::Tcp => {
            framer.push_auth(&identity.token, &mut request);
            None
        }
    };
    let mut stream = stream;
    let (result, _) = stream.write_all(request).await;
    result.map_err(|error| io_label("handshake", &error))?;
    let mut buffer = BytesMut::with_capacity(READ_CHUNK_BYTES);
    loop {
        match &key {
            Some(key) => {
                if let Some(consumed) =
                    wire::parse_upgrade_response(&buffer, key).map_err(|error| error.label())?
                {
                    let _ = buffer.split_to(consumed);
                    return Ok((stream, buffer));
                }
            }
            None => {
                if let Some(payload) =
                    wire::decode_tcp_frame(&mut buffer).map_err(|error| error.label())?
                {
                    return match frames::decode_protobuf(payload) {
                        Ok(server_frame::Frame::AuthOk(_)) => Ok((stream, buffer)),
                        Ok(server_frame::Frame::Error(error)) => {
                            Err(format!("auth:{}", error_code_name(error.code)))
                        }
                        Ok(_) => Err("auth:unexpected_frame".into()),
                        Err(error) => Err(error.label().into()),
                    };
                }
            }
        }
        buffer = match read_more(&mut stream, buffer).await {
            (Ok(0), _) => return Err("handshake:closed".into()),
            (Ok(_), buffer) => buffer,
            (Err(error), _) => return Err(io_label("handshake", &error)),
        };
    }
}

fn seed(index: usize, reconnect: bool) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    nanos ^ ((index as u64) << 20) ^ u64::from(reconnect)
}

/// A non-blocking connect from `local` (port chosen by the kernel), completed on the ring.
async fn open_socket(server: SocketAddr, local: Option<IpAddr>) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(server), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(local) = local {
        // Reuse ports in TIME_WAIT from earlier runs on the same source address.
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::new(local, 0).into())?;
    }
    match socket.connect(&server.into()) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(115) => {}
        Err(error) => return Err(error),
    }
    // A duplicate of the socket reads SO_ERROR once the connect completes; it lives only
    // for the connect.
    let probe = socket.try_clone()?;
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    stream.writable(false).await?;
    if let Some(error) = probe.take_error()? {
        return Err(error);
    }
    Ok(stream)
}

/// Reads more into the spare capacity of `buffer`; the buffer is owned by the read while it
/// runs (io_uring) and handed back.
async fn read_more<R: AsyncReadRent>(
    reader: &mut R,
    mut buffer: BytesMut,
) -> (std::io::Result<usize>, BytesMut) {
    use monoio::buf::IoBufMut as _;
    buffer.reserve(READ_CHUNK_BYTES);
    let start = buffer.len();
    let end = buffer.capacity();
    let (result, slice) = reader.read(buffer.slice_mut(start..end)).await;
    (result, slice.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------

async fn read_loop<R: AsyncReadRent>(
    shard: Rc<Shard>,
    index: usize,
    live: Rc<Live>,
    mut reader: R,
    mut buffer: BytesMut,
) {
    let transport = shard.plan.transport;
    let mut decoder = ServerFrameDecoder::default();
    let end: Option<String> = 'read: loop {
        loop {
            let decoded = match transport {
                Transport::WebSocket => decoder.decode(&mut buffer),
                Transport::Tcp => wire::decode_tcp_frame(&mut buffer)
                    .map(|frame| frame.map(ServerMessage::Binary)),
            };
            match decoded {
                Ok(Some(message)) => {
                    if let Some(end) = on_message(&shard, index, &live, message) {
                        break 'read Some(end);
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    shard.stats.borrow_mut().error(error.label());
                    break 'read Some("protocol_error".into());
                }
            }
        }
        if !live.outbox.borrow().is_empty() {
            live.notify.notify();
        }
        let (result, returned) = read_more(&mut reader, buffer).await;
        buffer = returned;
        match result {
            Ok(0) => break Some("eof".into()),
            Ok(read) => shard
                .stats
                .borrow_mut()
                .count(Counter::BytesReceived, read as u64),
            Err(error) => break Some(io_label("read", &error).replace("read:", "")),
        }
    };
    if let Some(end) = end {
        let mut stats = shard.stats.borrow_mut();
        stats.close(end);
        if !live.closing.get() && shard.plan.now_ns() < shard.plan.phases.run_end_ns {
            stats.count(Counter::DroppedEarly, 1);
        }
    }
    live.closed_at_ns.set(shard.plan.now_ns());
    live.closed.set(true);
    live.notify.notify();
}

/// Accounts for one server message; `Some(close label)` ends the connection.
fn on_message(shard: &Shard, index: usize, live: &Live, message: ServerMessage) -> Option<String> {
    let plan = &shard.plan;
    let frame = match message {
        ServerMessage::Text(payload) => frames::decode_json(&payload),
        ServerMessage::Binary(payload) => frames::decode_protobuf(payload),
        ServerMessage::Ping(payload) => {
            let mut outbox = live.outbox.borrow_mut();
            // Masks need no secrecy from our own server: a fixed one is fine here.
            wire::encode_client_frame(
                wire::Opcode::Pong,
                &payload,
                [0x5a, 0x17, 0xc3, 0x08],
                &mut outbox,
            );
            return None;
        }
        ServerMessage::Pong(_) => return None,
        ServerMessage::Close(code) => {
            return Some(code.map_or_else(|| "close:no_code".to_owned(), |code| code.to_string()));
        }
    };
    let frame = match frame {
        Ok(frame) => frame,
        Err(error) => {
            shard.stats.borrow_mut().error(error.label());
            return None;
        }
    };
    let now = plan.now_ns();
    let second = plan.second(now);
    match frame {
        server_frame::Frame::Pong(pong) => {
            let mut stats = shard.stats.borrow_mut();
            match pong.timestamp {
                // Heartbeats carry a negative timestamp: counted, not timed.
                Some(sent) if sent >= 0 => {
                    let sent = sent as u64;
                    stats.count_at(Counter::Pongs, 1, second);
                    if plan.measured(sent) {
                        stats.record(Latency::Pong, now.saturating_sub(sent) / 1000, second);
                    }
                    if matches!(plan.behaviour, Behaviour::Ping { rate: None, .. })
                        && now < plan.phases.load_end_ns
                    {
                        live.pings_owed.set(live.pings_owed.get() + 1);
                        live.notify.notify();
                    }
                }
                _ => stats.count(Counter::FramesOther, 1),
            }
        }
        server_frame::Frame::Ack(ack) => {
            let mut stats = shard.stats.borrow_mut();
            stats.count_at(Counter::Acks, 1, second);
            if let Some(sent) = intended_from_client_msg_id(&ack.client_msg_id)
                && plan.measured(sent)
            {
                stats.record(Latency::Ack, now.saturating_sub(sent) / 1000, second);
            }
            drop(stats);
            if let Some(view) = shard.views.borrow_mut().get_mut(&index) {
                view.on_ack(&ack.session_id, ack.seq);
            }
        }
        server_frame::Frame::Deliver(deliver) => {
            let Some(message) = deliver.message else {
                shard
                    .stats
                    .borrow_mut()
                    .error("decode:deliver_without_message");
                return None;
            };
            let mut stats = shard.stats.borrow_mut();
            stats.count_at(Counter::Delivers, 1, second);
            if let Some(sent) = intended_from_content(&message.content)
                && plan.measured(sent)
            {
                stats.record(Latency::Deliver, now.saturating_sub(sent) / 1000, second);
            }
            drop(stats);
            if let Some(view) = shard.views.borrow_mut().get_mut(&index) {
                view.on_message(&message.session_id, message.seq);
            }
        }
        server_frame::Frame::Messages(page) => {
            let mut stats = shard.stats.borrow_mut();
            stats.count(Counter::SyncPages, 1);
            stats.count(Counter::SyncMessages, page.messages.len() as u64);
            drop(stats);
            let last = page.messages.last().map(|message| message.seq);
            if let Some(view) = shard.views.borrow_mut().get_mut(&index) {
                for message in &page.messages {
                    view.on_resync(&message.session_id, message.seq);
                }
            }
            on_sync_page(shard, live, &page.session_id, page.has_more, last, now);
        }
        server_frame::Frame::Error(error) => {
            let mut stats = shard.stats.borrow_mut();
            stats.count(Counter::ErrorFrames, 1);
            if error.client_msg_id.is_some() {
                stats.count(Counter::SendRefused, 1);
            }
            stats.error(format!("error:{}", error_code_name(error.code)));
            drop(stats);
            // A refused sync page ends that session's catch-up (counted above).
            if let Some(request) = &error.request_id
                && let Some(session) = request.strip_prefix("sync:")
            {
                on_sync_page(shard, live, session, false, None, now);
            }
        }
        server_frame::Frame::Kicked(_) => {
            shard.stats.borrow_mut().error("kicked");
        }
        server_frame::Frame::AuthOk(_)
        | server_frame::Frame::ReadReceipt(_)
        | server_frame::Frame::Recalled(_)
        | server_frame::Frame::Ping(_)
        | server_frame::Frame::Presence(_) => {
            shard.stats.borrow_mut().count(Counter::FramesOther, 1);
        }
    }
    None
}

/// `ErrorCode` as the JSON snake_case name.
fn error_code_name(code: i32) -> String {
    use chatify_proto::client::v1::ErrorCode;
    match ErrorCode::try_from(code) {
        Ok(code) => code
            .as_str_name()
            .trim_start_matches("ERROR_CODE_")
            .to_lowercase(),
        Err(_) => format!("code_{code}"),
    }
}

/// `client_msg_id` is `<run>.<client>.<k>.<intended ns>`.
fn intended_from_client_msg_id(id: &str) -> Option<u64> {
    id.rsplit('.').next()?.parse().ok()
}

/// Message content starts with `lg <intended ns> `.
fn intended_from_content(content: &str) -> Option<u64> {
    content.strip_prefix("lg ")?.split(' ').next()?.parse().ok()
}

fn message_content(intended_ns: u64, message_bytes: usize) -> String {
    let mut content = format!("lg {intended_ns} ");
    while content.len() < message_bytes {
        content.push('x');
    }
    content
}

// ---------------------------------------------------------------------------------------------
// Catch-up (sync scenario)
// ---------------------------------------------------------------------------------------------

fn sync_frame(session_id: &str, after_seq: u64, limit: u32) -> client_frame::Frame {
    client_frame::Frame::Sync(SyncFrame {
        session_id: session_id.to_owned(),
        after_seq,
        limit,
        request_id: Some(format!("sync:{session_id}")),
    })
}

/// After a reconnect: one `sync` per session from the last seq seen before the drop.
fn start_catch_up(shard: &Shard, index: usize, live: &Live, now: u64) {
    let plan = &shard.plan;
    let sessions = plan.clients[index].sessions.clone();
    if sessions.is_empty() {
        return;
    }
    let mut framer = Framer::new(plan.transport, plan.codec, seed(index, true));
    let mut outbox = live.outbox.borrow_mut();
    let views = shard.views.borrow();
    for session in &sessions {
        let after = views.get(&index).map_or(0, |view| view.last_seq(session));
        framer.push(sync_frame(session, after, plan.sync_limit), &mut outbox);
        shard.stats.borrow_mut().count(Counter::SyncRequests, 1);
    }
    *live.catch_up.borrow_mut() = Some(CatchUp {
        started_ns: now,
        pending: sessions,
    });
}

/// A page arrived: ask for the next one, or mark the session caught up.
fn on_sync_page(
    shard: &Shard,
    live: &Live,
    session_id: &str,
    has_more: bool,
    last_seq: Option<u64>,
    now: u64,
) {
    let plan = &shard.plan;
    let mut catch_up = live.catch_up.borrow_mut();
    let Some(state) = catch_up.as_mut() else {
        return;
    };
    match (has_more, last_seq) {
        (true, Some(last)) => {
            let mut framer = Framer::new(plan.transport, plan.codec, now);
            framer.push(
                sync_frame(session_id, last, plan.sync_limit),
                &mut live.outbox.borrow_mut(),
            );
            shard.stats.borrow_mut().count(Counter::SyncRequests, 1);
            live.notify.notify();
        }
        _ => {
            state.pending.retain(|session| session != session_id);
            if state.pending.is_empty() {
                let started = state.started_ns;
                *catch_up = None;
                let mut stats = shard.stats.borrow_mut();
                stats.record(Latency::CatchUp, now.saturating_sub(started) / 1000, None);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterEnd {
    /// The run is over; we closed.
    Finished,
    /// `sync`: we dropped on purpose and reconnect later.
    Dropped,
    /// The socket is gone (the reader counted why).
    Broken,
}

async fn write_loop<W: AsyncWriteRent>(
    shard: &Shard,
    index: usize,
    live: &Live,
    mut writer: W,
    drop_at: Option<u64>,
) -> WriterEnd {
    let plan = &shard.plan;
    let client = &plan.clients[index];
    let mut framer = Framer::new(plan.transport, plan.codec, seed(index, false) ^ 0xabcd);
    let connected_at = plan.now_ns();
    let start = connected_at.max(plan.phases.load_start_ns);
    let mut schedule = match (&plan.behaviour, client.sends) {
        (
            Behaviour::Ping {
                rate: Some(rate), ..
            },
            _,
        ) => Some(Schedule::new(
            *rate,
            plan.senders as u64,
            index as u64,
            start,
            plan.phases.load_end_ns,
        )),
        (Behaviour::Chat { rate, .. }, true) => Some(Schedule::new(
            *rate,
            plan.senders as u64,
            index as u64,
            start,
            plan.phases.load_end_ns,
        )),
        _ => None,
    };
    let closed_loop = match plan.behaviour {
        Behaviour::Ping {
            rate: None,
            in_flight,
        } => Some(in_flight),
        _ => None,
    };
    let mut primed = false;
    // Heartbeats are spread over one interval so they do not arrive in waves.
    let mut heartbeat_next = (plan.heartbeat_ns > 0).then(|| {
        connected_at + plan.heartbeat_ns / 2 + (index as u64 * 7919) % plan.heartbeat_ns.max(1) / 2
    });
    let mut rng = wire::XorShift::new(seed(index, false));
    let mut due = Vec::with_capacity(SENDS_PER_WRITE_MAX);
    let mut buffer = BytesMut::with_capacity(512);
    let mut sent_k: u64 = 0;
    loop {
        if live.closed.get() {
            return WriterEnd::Broken;
        }
        let now = plan.now_ns();
        let ending = if now >= plan.phases.run_end_ns {
            Some(WriterEnd::Finished)
        } else if drop_at.is_some_and(|at| now >= at) {
            Some(WriterEnd::Dropped)
        } else {
            None
        };
        if let Some(end) = ending {
            live.closing.set(true);
            buffer.clear();
            framer.push_close(1000, "loadgen done", &mut buffer);
            if !buffer.is_empty() {
                let _ = writer.write_all(buffer).await;
            }
            let _ = writer.shutdown().await;
            return end;
        }
        let mut sends = 0u64;
        let mut second_of_first: Option<usize> = None;
        if let Some(schedule) = schedule.as_mut() {
            due.clear();
            schedule.take_due(now, SENDS_PER_WRITE_MAX, &mut due);
            for &intended in &due {
                match &plan.behaviour {
                    Behaviour::Ping { .. } => {
                        framer.push_ping(intended as i64, &mut buffer);
                    }
                    Behaviour::Chat { message_bytes, .. } => {
                        let frame =
                            send_frame(plan, index, &mut rng, sent_k, intended, *message_bytes);
                        sent_k += 1;
                        framer.push(frame, &mut buffer);
                    }
                    Behaviour::Idle => {}
                }
                sends += 1;
                if second_of_first.is_none() {
                    second_of_first = plan.second(intended);
                }
            }
        }
        if let Some(in_flight) = closed_loop
            && now >= plan.phases.load_start_ns
            && now < plan.phases.load_end_ns
        {
            let owed = if primed {
                live.pings_owed.replace(0)
            } else {
                primed = true;
                in_flight
            };
            for _ in 0..owed {
                framer.push_ping(now as i64, &mut buffer);
            }
            sends += owed as u64;
            second_of_first = plan.second(now);
        }
        if let Some(at) = heartbeat_next
            && now >= at
        {
            framer.push_ping(-(now.max(1) as i64), &mut buffer);
            heartbeat_next = Some(now + plan.heartbeat_ns);
        }
        {
            let mut outbox = live.outbox.borrow_mut();
            if !outbox.is_empty() {
                buffer.extend_from_slice(&outbox);
                outbox.clear();
            }
        }
        if sends > 0 {
            shard
                .stats
                .borrow_mut()
                .count_at(Counter::Sent, sends, second_of_first);
        }
        if !buffer.is_empty() {
            let bytes = buffer.len() as u64;
            let (result, returned) = writer.write_all(buffer).await;
            buffer = returned;
            buffer.clear();
            match result {
                Ok(_) => shard.stats.borrow_mut().count(Counter::BytesSent, bytes),
                Err(error) => {
                    shard.stats.borrow_mut().error(io_label("write", &error));
                    return WriterEnd::Broken;
                }
            }
            continue;
        }
        // Sleep until the next thing is due, or the reader wakes us.
        let mut wake = plan.phases.run_end_ns;
        if let Some(next) = schedule.as_ref().and_then(Schedule::next_due_ns) {
            wake = wake.min(next);
        }
        if let Some(at) = heartbeat_next {
            wake = wake.min(at);
        }
        if let Some(at) = drop_at {
            wake = wake.min(at);
        }
        let now = plan.now_ns();
        if closed_loop.is_some() && !primed && plan.phases.load_start_ns > now {
            wake = wake.min(plan.phases.load_start_ns);
        }
        if wake > now {
            let sleep = pin!(monoio::time::sleep(
                Duration::from_nanos(wake - now).min(SLEEP_MAX)
            ));
            let notified = pin!(live.notify.notified());
            futures::future::select(sleep, notified).await;
        }
    }
}

fn send_frame(
    plan: &Plan,
    index: usize,
    rng: &mut wire::XorShift,
    k: u64,
    intended_ns: u64,
    message_bytes: usize,
) -> client_frame::Frame {
    let client = &plan.clients[index];
    let (receiver_id, session_id) = match &client.target {
        SendTarget::Peer(peer) => (Some(plan.clients[*peer].identity.user_id.clone()), None),
        SendTarget::RandomPeer => {
            let count = plan.clients.len() as u64;
            let mut peer = rng.below(count.saturating_sub(1)) as usize;
            if peer >= index {
                peer += 1;
            }
            let peer = peer.min(plan.clients.len() - 1);
            (Some(plan.clients[peer].identity.user_id.clone()), None)
        }
        SendTarget::Session(session) => (None, Some(session.clone())),
        SendTarget::None => (None, None),
    };
    client_frame::Frame::Send(Send {
        client_msg_id: format!("{}.{index}.{k}.{intended_ns}", plan.run_id),
        receiver_id,
        session_id,
        message_type: MessageType::Text.into(),
        content: message_content(intended_ns, message_bytes),
        burn_after_seconds: None,
        request_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intended_times_travel_in_ids_and_content() {
        assert_eq!(
            intended_from_client_msg_id("abc.3.17.123456789"),
            Some(123_456_789)
        );
        assert_eq!(intended_from_client_msg_id("foreign-id"), None);
        let content = message_content(987_654_321, 64);
        assert_eq!(content.len(), 64);
        assert_eq!(intended_from_content(&content), Some(987_654_321));
        assert_eq!(intended_from_content("hello"), None);
        assert_eq!(intended_from_content(&message_content(5, 0)), Some(5));
    }

    #[test]
    fn error_codes_use_their_json_names() {
        use chatify_proto::client::v1::ErrorCode;
        assert_eq!(
            error_code_name(ErrorCode::RateLimited as i32),
            "rate_limited"
        );
        assert_eq!(
            error_code_name(ErrorCode::Unavailable as i32),
            "unavailable"
        );
        assert_eq!(error_code_name(999), "code_999");
    }

    #[test]
    fn socket_errors_get_stable_labels() {
        let refused = std::io::Error::from_raw_os_error(111);
        assert_eq!(io_label("connect", &refused), "connect:refused");
        let ports = std::io::Error::from_raw_os_error(99);
        assert_eq!(io_label("connect", &ports), "connect:addr_not_available");
    }
}
