//! A whole Chatify deployment for one test: the real gateway-uring, storage-writer and
//! storage-reader binaries on free loopback ports, against the real local services, with
//! topics of their own (a unique topic prefix, created here), so tests never see each
//! other's records. Plus the clients tests talk to it with: WebSocket (JSON) and TCP
//! (protobuf), tokens minted with the stack's secret, and a tail of any topic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chatify_proto::Message as _;
use chatify_proto::client::v1::{ClientFrame, ServerFrame, client_frame, server_frame};
use futures::{SinkExt as _, StreamExt as _};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::{free_local_addrs, http_get, service_env, unique_name, workspace_binary};

/// Signing secret of every stack's tokens.
pub const JWT_SECRET: &str = "e2e-stack-secret-that-is-long-enough-0123456789";
/// The gateways' credential as trusted internal callers of the reader.
pub const INTERNAL_TOKEN: &str = "e2e-internal-caller-token-0123456789abcdef";
/// How long a test waits for a frame it expects.
pub const FRAME_WAIT: Duration = Duration::from_secs(20);
const READY_WAIT: Duration = Duration::from_secs(90);

/// A running service binary; killed when dropped. Its stderr goes to a log file whose
/// path failing tests print.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    child: Option<Child>,
    pub admin: SocketAddr,
    pub log: PathBuf,
    command: Vec<(String, String)>,
    binary: String,
}

impl Service {
    fn spawn(binary: &str, name: &str, env: Vec<(String, String)>) -> Self {
        let admin = env
            .iter()
            .find(|(key, _)| key == "CHATIFY_ADMIN_ADDR")
            .and_then(|(_, value)| value.parse().ok())
            .expect("CHATIFY_ADMIN_ADDR set");
        let log = std::env::temp_dir().join(format!("{}.log", unique_name(name)));
        let mut service = Self {
            name: name.to_owned(),
            child: None,
            admin,
            log,
            command: env,
            binary: binary.to_owned(),
        };
        service.restart();
        service
    }

    /// Starts the process again with the same settings (after [`Service::kill`]).
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open service log");
        let stdout = log.try_clone().expect("clone log handle");
        let mut command = Command::new(workspace_binary(&self.binary));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.command.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log);
        self.child = Some(command.spawn().expect("spawn service binary"));
    }

    /// kill -9: no shutdown path runs.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let admin = self.admin;
        let deadline = Instant::now() + READY_WAIT;
        let mut last = None;
        while Instant::now() < deadline {
            let probe = tokio::task::spawn_blocking(move || http_get(admin, "/readyz"))
                .await
                .expect("probe task");
            match probe {
                Ok((200, _)) => return,
                other => last = Some(other),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "{} never became ready: {last:?}; log {}:\n{}",
            self.name,
            self.log.display(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// The value of the first `/metrics` sample line starting with `line_prefix` (0 when
    /// the metric was never recorded).
    pub async fn metric(&self, line_prefix: &str) -> f64 {
        let admin = self.admin;
        let (_, body) = tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
            .await
            .expect("metrics task")
            .expect("metrics");
        body.lines()
            .find(|line| line.starts_with(line_prefix))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One gateway of a stack.
#[derive(Debug)]
pub struct Gateway {
    pub node_id: String,
    pub ws: SocketAddr,
    pub tcp: SocketAddr,
    pub service: Service,
}

impl Gateway {
    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.ws)
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// One gateway per node id.
    pub nodes: Vec<String>,
    pub reader: bool,
    pub writer: bool,
    /// Broker of this stack (default: the shared local one).
    pub kafka_bootstrap_servers: Option<String>,
    /// Extra env for every gateway.
    pub gateway_env: Vec<(String, String)>,
    /// Extra env for every process of the stack, overriding the defaults (e.g. the store
    /// URLs of a private set of services: `REDIS_URL`, `POSTGRES_URL`, `MONGO_URL`).
    pub service_env: Vec<(String, String)>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            nodes: vec!["gw-a".into()],
            reader: true,
            writer: true,
            kafka_bootstrap_servers: None,
            gateway_env: vec![("CHATIFY_PRESENCE_GRACE_MS".into(), "1500".into())],
            service_env: Vec::new(),
        }
    }
}

/// A running deployment.
#[derive(Debug)]
pub struct Stack {
    pub prefix: String,
    pub bootstrap_servers: String,
    pub gateways: Vec<Gateway>,
    pub writer: Option<Service>,
    pub reader: Option<Service>,
    pub reader_grpc: Option<SocketAddr>,
    pub run_id: String,
}

fn base_env(
    bootstrap: &str,
    prefix: &str,
    overrides: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = ["REDIS_URL", "POSTGRES_URL", "MONGO_URL"]
        .into_iter()
        .filter(|name| !overrides.iter().any(|(key, _)| key == name))
        .map(|name| (name.to_owned(), service_env(name)))
        .collect();
    env.push(("KAFKA_BOOTSTRAP_SERVERS".into(), bootstrap.to_owned()));
    env.push(("CHATIFY_TOPIC_PREFIX".into(), prefix.to_owned()));
    env.push(("JWT_SECRET".into(), JWT_SECRET.into()));
    env.push(("RUST_LOG".into(), "warn,gateway_uring=info".into()));
    env.push(("CHATIFY_LOG_FORMAT".into(), "text".into()));
    // A later entry wins when the process is spawned (`Command::envs`).
    env.extend(overrides.iter().cloned());
    env
}

/// Creates `{prefix}.upstream` and the other topics a stack uses (idempotent).
pub async fn create_topics(bootstrap: &str, prefix: &str, nodes: &[String]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("kafka admin client");
    let mut topics: Vec<(String, i32)> = vec![
        (format!("{prefix}.upstream"), 4),
        (format!("{prefix}.upstream.dlq"), 1),
        (format!("{prefix}.user-events"), 1),
        (format!("{prefix}.message-events"), 1),
    ];
    topics.extend(
        nodes
            .iter()
            .map(|node| (format!("{prefix}.push.{node}"), 2)),
    );
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .expect("create topics");
    for result in results {
        if let Err((name, code)) = result {
            assert_eq!(
                code,
                rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                "create topic {name}"
            );
        }
    }
}

impl Stack {
    pub async fn start(options: StackOptions) -> Self {
        let run_id = unique_name("e2e");
        let prefix = format!("t{}", run_id.replace('-', "."));
        // Node ids unique to this stack: a gateway clears the routes its node id left in
        // the shared Redis when it starts.
        let suffix = run_id.rsplit('-').next().unwrap_or("x").to_owned();
        let mut options = options;
        options.nodes = options
            .nodes
            .iter()
            .map(|node| format!("{node}-{suffix}"))
            .collect();
        let bootstrap = options
            .kafka_bootstrap_servers
            .clone()
            .unwrap_or_else(|| service_env("KAFKA_BOOTSTRAP_SERVERS"));
        create_topics(&bootstrap, &prefix, &options.nodes).await;
        let mut stack = Self {
            prefix: prefix.clone(),
            bootstrap_servers: bootstrap.clone(),
            gateways: Vec::new(),
            writer: None,
            reader: None,
            reader_grpc: None,
            run_id: run_id.clone(),
        };
        if options.writer {
            let [admin] = free_local_addrs();
            let mut env = base_env(&bootstrap, &prefix, &options.service_env);
            env.push(("CHATIFY_ADMIN_ADDR".into(), admin.to_string()));
            env.push(("CHATIFY_WRITER_GROUP".into(), format!("{run_id}-writers")));
            stack.writer = Some(Service::spawn("storage-writer", "writer", env));
        }
        if options.reader {
            let [admin, grpc] = free_local_addrs();
            let mut env = base_env(&bootstrap, &prefix, &options.service_env);
            env.push(("CHATIFY_ADMIN_ADDR".into(), admin.to_string()));
            env.push(("CHATIFY_GRPC_ADDR".into(), grpc.to_string()));
            env.push(("CHATIFY_INTERNAL_TOKEN".into(), INTERNAL_TOKEN.into()));
            stack.reader = Some(Service::spawn("storage-reader", "reader", env));
            stack.reader_grpc = Some(grpc);
        }
        for node in &options.nodes {
            let [admin, ws, tcp] = free_local_addrs();
            let mut env = base_env(&bootstrap, &prefix, &options.service_env);
            env.push(("CHATIFY_ADMIN_ADDR".into(), admin.to_string()));
            env.push(("CHATIFY_WS_ADDR".into(), ws.to_string()));
            env.push(("CHATIFY_TCP_ADDR".into(), tcp.to_string()));
            env.push(("CHATIFY_NODE_ID".into(), node.clone()));
            env.push(("CHATIFY_SHARDS".into(), "2".into()));
            if let Some(grpc) = stack.reader_grpc {
                env.push(("CHATIFY_READER_URL".into(), format!("http://{grpc}")));
                env.push(("CHATIFY_INTERNAL_TOKEN".into(), INTERNAL_TOKEN.into()));
            }
            env.extend(options.gateway_env.iter().cloned());
            let service = Service::spawn("gateway-uring", &format!("gateway-{node}"), env);
            stack.gateways.push(Gateway {
                node_id: node.clone(),
                ws,
                tcp,
                service,
            });
        }
        stack.wait_ready().await;
        stack
    }

    /// Waits until every process answers `/readyz` 200.
    pub async fn wait_ready(&self) {
        for service in self.services() {
            service.wait_ready().await;
        }
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.writer
            .iter()
            .chain(self.reader.iter())
            .chain(self.gateways.iter().map(|gateway| &gateway.service))
    }

    /// Every log, for a failing test's message.
    pub fn logs(&self) -> String {
        self.services()
            .map(|service| {
                format!(
                    "--- {} ({}):\n{}",
                    service.name,
                    service.log.display(),
                    std::fs::read_to_string(&service.log).unwrap_or_default()
                )
            })
            .collect()
    }

    /// A user id unique to this stack.
    pub fn user(&self, name: &str) -> String {
        format!("{name}-{}", self.run_id.rsplit('-').next().unwrap_or("x"))
    }

    pub fn topic(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }
}

/// A token for `user` on `device`, valid for an hour; its jti is returned too.
pub fn token(user: &str, device: &str) -> (String, String) {
    let jti = unique_name("jti");
    (token_with(user, device, &jti, 3600), jti)
}

/// A token with a chosen jti and lifetime (seconds from now; negative: expired).
pub fn token_with(user: &str, device: &str, jti: &str, lifetime_seconds: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "did": device, "jti": jti, "exp": now + lifetime_seconds}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("encode token")
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client speaking JSON text frames.
pub struct WsClient {
    stream: WsStream,
    /// Frames read while waiting for another kind, kept in order.
    pending: std::collections::VecDeque<Value>,
}

impl std::fmt::Debug for WsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsClient")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    Frame(u16, String),
    /// The socket ended without a close frame.
    Dropped,
}

impl WsClient {
    pub async fn connect(gateway: &Gateway, token: &str) -> Self {
        Self::connect_url(&gateway.ws_url(token)).await
    }

    pub async fn connect_url(url: &str) -> Self {
        let (stream, _) = tokio::time::timeout(FRAME_WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("websocket upgrade");
        Self {
            stream,
            pending: Default::default(),
        }
    }

    /// The HTTP status of a refused upgrade.
    pub async fn refused_status(url: &str) -> u16 {
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                response.status().as_u16()
            }
            other => panic!("expected a refused upgrade, got {:?}", other.map(|_| ())),
        }
    }

    pub async fn send(&mut self, frame: Value) {
        self.stream
            .send(WsMessage::Text(frame.to_string().into()))
            .await
            .expect("send frame");
    }

    /// Like [`Self::send`], `false` when the connection is already gone.
    pub async fn try_send(&mut self, frame: Value) -> bool {
        self.stream
            .send(WsMessage::Text(frame.to_string().into()))
            .await
            .is_ok()
    }

    /// Frames read while waiting for something else and not asked for since.
    pub fn take_pending(&mut self) -> Vec<Value> {
        self.pending.drain(..).collect()
    }

    /// Sends any WebSocket message as is (malformed or oversize input included).
    pub async fn send_raw(&mut self, message: WsMessage) {
        self.stream.send(message).await.expect("send message");
    }

    /// Every message of `session` after `after_seq`, paging with `limit` while the reader
    /// says `has_more`; each page must come back whole and in seq order.
    pub async fn sync_all(&mut self, session: &str, after_seq: u64, limit: u32) -> Vec<Value> {
        let mut messages = Vec::new();
        let mut after = after_seq;
        for page_number in 0.. {
            let request_id = format!("sync-{after}-{page_number}");
            self.send(json!({
                "type": "sync", "session_id": session, "after_seq": after, "limit": limit,
                "request_id": request_id,
            }))
            .await;
            let page = self.next_of("messages").await;
            assert_eq!(page["request_id"], request_id.as_str(), "{page}");
            let items = page["messages"].as_array().cloned().unwrap_or_default();
            assert!(items.len() <= limit as usize, "page over its limit: {page}");
            if let Some(last) = items.last() {
                after = last["seq"].as_u64().expect("seq");
            }
            messages.extend(items);
            if page["has_more"] != true {
                break;
            }
        }
        messages
    }

    /// Sends a `send` frame to a user.
    pub async fn send_to(&mut self, receiver: &str, client_msg_id: &str, content: &str) {
        self.send(json!({
            "type": "send", "client_msg_id": client_msg_id, "receiver_id": receiver,
            "message_type": "text", "content": content,
        }))
        .await;
    }

    async fn read_json(&mut self, wait: Duration) -> Option<Result<Value, Closed>> {
        loop {
            let next = tokio::time::timeout(wait, self.stream.next()).await.ok()?;
            return Some(match next {
                Some(Ok(WsMessage::Text(text))) => {
                    Ok(serde_json::from_str(&text).expect("json frame"))
                }
                Some(Ok(WsMessage::Binary(bytes))) => {
                    let frame = ServerFrame::decode(bytes.as_ref()).expect("protobuf frame");
                    let inner = frame.frame.expect("frame");
                    Ok(
                        serde_json::from_slice(&chatify_proto::json::encode_server_frame(&inner))
                            .expect("json"),
                    )
                }
                Some(Ok(WsMessage::Close(close))) => Err(close.map_or(Closed::Dropped, |c| {
                    Closed::Frame(c.code.into(), c.reason.to_string())
                })),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => Err(Closed::Dropped),
            });
        }
    }

    /// The next frame of type `kind` (others are kept for later), within [`FRAME_WAIT`].
    pub async fn next_of(&mut self, kind: &str) -> Value {
        self.try_next_of(kind, FRAME_WAIT).await.unwrap_or_else(|| {
            panic!(
                "no {kind} frame within {FRAME_WAIT:?}; other frames: {:?}",
                self.pending
            )
        })
    }

    /// Like [`Self::next_of`], `None` when nothing came within `wait`.
    pub async fn try_next_of(&mut self, kind: &str, wait: Duration) -> Option<Value> {
        if let Some(index) = self.pending.iter().position(|frame| frame["type"] == kind) {
            return self.pending.remove(index);
        }
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_json(left).await? {
                Ok(frame) if frame["type"] == kind => return Some(frame),
                Ok(frame) => self.pending.push_back(frame),
                Err(closed) => panic!(
                    "connection closed ({closed:?}) while waiting for {kind}; other frames: {:?}",
                    self.pending
                ),
            }
        }
    }

    /// Waits for the server to close; returns how.
    pub async fn closed(&mut self) -> Closed {
        let deadline = Instant::now() + FRAME_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_json(left).await {
                None => panic!("connection still open after {FRAME_WAIT:?}"),
                Some(Ok(frame)) => self.pending.push_back(frame),
                Some(Err(closed)) => return closed,
            }
        }
    }

    /// Frames of `kind` already received or arriving within `wait`.
    pub async fn drain_of(&mut self, kind: &str, wait: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(frame) = self.try_next_of(kind, wait).await {
            out.push(frame);
        }
        out
    }

    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
        // Read until the server's close reply so the close handshake completes.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(_)) = self.stream.next().await {}
        })
        .await;
    }
}

/// A TCP client: 4-byte big-endian length + protobuf frames.
#[derive(Debug)]
pub struct TcpClient {
    stream: tokio::net::TcpStream,
    pending: std::collections::VecDeque<server_frame::Frame>,
}

impl TcpClient {
    /// Connects and authenticates; panics unless `auth_ok` comes back.
    pub async fn connect(gateway: &Gateway, token: &str) -> Self {
        let stream = tokio::net::TcpStream::connect(gateway.tcp)
            .await
            .expect("tcp connect");
        let mut client = Self {
            stream,
            pending: Default::default(),
        };
        client
            .send(client_frame::Frame::Auth(chatify_proto::client::v1::Auth {
                token: token.to_owned(),
            }))
            .await;
        match client.read().await {
            Some(server_frame::Frame::AuthOk(_)) => client,
            other => panic!("expected auth_ok, got {other:?}"),
        }
    }

    pub async fn send(&mut self, frame: client_frame::Frame) {
        let payload = ClientFrame { frame: Some(frame) }.encode_to_vec();
        let mut framed = (payload.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&payload);
        self.stream.write_all(&framed).await.expect("tcp write");
    }

    async fn read(&mut self) -> Option<server_frame::Frame> {
        let mut length = [0_u8; 4];
        tokio::time::timeout(FRAME_WAIT, self.stream.read_exact(&mut length))
            .await
            .ok()?
            .ok()?;
        let mut payload = vec![0; u32::from_be_bytes(length) as usize];
        self.stream.read_exact(&mut payload).await.ok()?;
        ServerFrame::decode(payload.as_slice()).ok()?.frame
    }

    /// The next frame matching `pick` (others are kept for later).
    pub async fn next_matching<T>(
        &mut self,
        mut pick: impl FnMut(&server_frame::Frame) -> Option<T>,
    ) -> T {
        if let Some(index) = self.pending.iter().position(|frame| pick(frame).is_some()) {
            let frame = self.pending.remove(index).expect("index");
            return pick(&frame).expect("matched");
        }
        loop {
            let frame = self
                .read()
                .await
                .unwrap_or_else(|| panic!("tcp: no matching frame; others {:?}", self.pending));
            if let Some(found) = pick(&frame) {
                return found;
            }
            self.pending.push_back(frame);
        }
    }
}

/// Reads a topic from its start (its own consumer group).
pub struct TopicTail {
    consumer: StreamConsumer,
}

impl std::fmt::Debug for TopicTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicTail").finish_non_exhaustive()
    }
}

impl TopicTail {
    pub fn new(bootstrap: &str, topic: &str) -> Self {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", unique_name("tail"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .expect("tail consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        Self { consumer }
    }

    /// Records (key, payload) arriving within `wait` of each other, until `wait` passes
    /// with nothing new.
    pub async fn collect(&self, wait: Duration) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        while let Ok(Ok(message)) = tokio::time::timeout(wait, self.consumer.recv()).await {
            out.push((
                String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                message.payload().unwrap_or_default().to_vec(),
            ));
        }
        out
    }
}

/// Produces one raw record (what a writer or reader would publish).
pub async fn produce(bootstrap: &str, topic: &str, key: &str, payload: &[u8]) {
    produce_to(bootstrap, topic, None, key, payload).await;
}

/// Produces one record to `partition` of `topic` (by key when `None`), waiting for the ack.
pub async fn produce_to(
    bootstrap: &str,
    topic: &str,
    partition: Option<i32>,
    key: &str,
    payload: &[u8],
) {
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("producer");
    let mut record = rdkafka::producer::FutureRecord::to(topic)
        .key(key)
        .payload(payload);
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(error, _)| error)
        .expect("produce");
}

/// A user's routes in Redis: device id -> route.
pub async fn routes_of(user: &str) -> HashMap<String, chatify_core::routing::Route> {
    let client = redis::Client::open(service_env("REDIS_URL")).expect("redis url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let raw: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(chatify_core::keys::user_routes(user))
        .query_async(&mut connection)
        .await
        .expect("hgetall");
    raw.into_iter()
        .map(|(device, value)| {
            (
                device,
                chatify_core::routing::Route::decode(&value).expect("route decodes"),
            )
        })
        .collect()
}

/// A gRPC request to storage-reader as a trusted internal caller acting for `user` (what
/// the gateways do).
pub fn internal_request<T>(user: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let metadata = request.metadata_mut();
    metadata.insert(
        "x-chatify-internal-token",
        INTERNAL_TOKEN.parse().expect("ascii token"),
    );
    metadata.insert("x-chatify-user-id", user.parse().expect("ascii user id"));
    request
}

/// The single-chat session id of two users: `p2p:{lo}:{hi}`.
pub fn p2p_session(one: &str, other: &str) -> String {
    let mut pair = [one, other];
    pair.sort_unstable();
    format!("p2p:{}:{}", pair[0], pair[1])
}
