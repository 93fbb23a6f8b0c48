//! Harness of the writer tests: the real pipeline (`consumer::run`) against the real broker,
//! Redis, Postgres and MongoDB-protocol server, on topics, a consumer group and a Mongo
//! database of its own. Records are produced and read back as the gateway would.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatify_core::ids::SessionId;
use chatify_core::routing::Route;
use chatify_core::stores::Stores;
use chatify_core::topics::Topics;
use chatify_e2e::{service_env, unique_name};
use chatify_proto::Message as _;
use chatify_proto::bus::v1::{
    DeadLetter, MessageEvent, PushRecord, UpstreamCommand, upstream_command,
};
use chatify_proto::client::v1::{self as client, MessageType, server_frame};
use futures::TryStreamExt as _;
use mongodb::bson::{Document, doc};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use storage_writer::config::Config;
use storage_writer::error::WriterError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(60);
pub const UPSTREAM_PARTITIONS: i32 = 4;
/// Gateway nodes of the tests, each with a push topic.
pub const NODES: [&str; 2] = ["gw-a", "gw-b"];

/// One test's world.
pub struct Harness {
    pub topics: Topics,
    pub group: String,
    pub mongo_database: String,
    pub redis_url: String,
    pub postgres_url: String,
    pub mongo_url: String,
    pub producer: FutureProducer,
    pub redis: redis::aio::MultiplexedConnection,
    pub postgres: sqlx::PgPool,
    pub mongo: mongodb::Database,
    pub tap: Tap,
    /// Distinguishes this test's users and chats from every other run's.
    pub tag: String,
}

fn kafka() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", service_env("KAFKA_BOOTSTRAP_SERVERS"));
    config
}

impl Harness {
    /// Creates the topics and clients; `redis_db` selects a Redis database of its own
    /// (for tests that flush it).
    pub async fn new(redis_db: Option<u8>) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("TEST_LOG")
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let prefix = unique_name("wt");
        let topics = Topics::new(prefix.clone());
        let admin: AdminClient<DefaultClientContext> = kafka().create().unwrap();
        let mut new_topics = vec![
            (topics.upstream(), UPSTREAM_PARTITIONS),
            (topics.upstream_dlq(), 1),
            (topics.message_events(), 1),
        ];
        for node in NODES {
            new_topics.push((topics.push(node), 2));
        }
        let specs: Vec<NewTopic<'_>> = new_topics
            .iter()
            .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
            .collect();
        for result in admin
            .create_topics(&specs, &AdminOptions::new().operation_timeout(Some(WAIT)))
            .await
            .unwrap()
        {
            result.unwrap();
        }
        let mut redis_url = service_env("REDIS_URL");
        if let Some(db) = redis_db {
            redis_url = format!("{}/{db}", redis_url.trim_end_matches('/'));
        }
        let postgres_url = service_env("POSTGRES_URL");
        let mongo_url = service_env("MONGO_URL");
        let mongo_database = unique_name("wt").replace('-', "_");
        let redis = redis::Client::open(redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let postgres = sqlx::PgPool::connect(&postgres_url).await.unwrap();
        let mongo = mongodb::Client::with_uri_str(&mongo_url)
            .await
            .unwrap()
            .database(&mongo_database);
        let producer: FutureProducer = kafka().set("linger.ms", "1").create().unwrap();
        let mut tapped: Vec<(String, i32)> =
            vec![(topics.upstream_dlq(), 1), (topics.message_events(), 1)];
        for node in NODES {
            tapped.push((topics.push(node), 2));
        }
        let tap = Tap::start(&tapped);
        Self {
            group: format!("{prefix}-writer"),
            tag: prefix.replace('-', ""),
            topics,
            mongo_database,
            redis_url,
            postgres_url,
            mongo_url,
            producer,
            redis,
            postgres,
            mongo,
            tap,
        }
    }

    /// The writer's config, pointing at this test's world; `adjust` may reroute stores.
    pub fn config(&self) -> Config {
        let args = [
            "storage-writer".to_owned(),
            format!(
                "--kafka-bootstrap-servers={}",
                service_env("KAFKA_BOOTSTRAP_SERVERS")
            ),
            format!("--topic-prefix={}", self.topics_prefix()),
            format!("--redis-url={}", self.redis_url),
            format!("--postgres-url={}", self.postgres_url),
            format!("--mongo-url={}", self.mongo_url),
            format!("--mongo-database={}", self.mongo_database),
            format!("--consumer-group={}", self.group),
            "--retry-min-ms=50".to_owned(),
            "--retry-max-ms=500".to_owned(),
        ];
        let config: Config = chatify_core::config::parse_from(args).unwrap();
        config.validate().unwrap();
        config
    }

    fn topics_prefix(&self) -> String {
        self.topics
            .upstream()
            .trim_end_matches(".upstream")
            .to_owned()
    }

    /// Starts a writer (the real pipeline) in this process.
    pub fn start_writer(&self, config: Config) -> Writer {
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            let stores = Stores::open(&config.redis, &config.postgres, &config.mongo)
                .await
                .unwrap();
            storage_writer::consumer::run(&config, stores, token).await
        });
        Writer { shutdown, task }
    }

    /// Waits until the writer's group has committed every upstream record produced so
    /// far, so a writer stopped after this leaves nothing for the next one to read again.
    /// Call it while a writer runs (a stopped one commits nothing more).
    pub async fn wait_all_committed(&self) {
        let consumer: Arc<BaseConsumer> = Arc::new(
            kafka()
                .set("group.id", &self.group)
                .set("enable.auto.commit", "false")
                .create()
                .unwrap(),
        );
        let upstream = self.topics.upstream();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (consumer, upstream) = (Arc::clone(&consumer), upstream.clone());
            // rdkafka's calls block: off the test's runtime thread, which runs the writer.
            let done = tokio::task::spawn_blocking(move || all_committed(&consumer, &upstream))
                .await
                .unwrap();
            if done {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for the writer to commit every upstream record"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A user id unique to this test.
    pub fn user(&self, name: &str) -> String {
        format!("{name}{}", self.tag)
    }

    pub fn single(&self, a: &str, b: &str) -> SessionId {
        SessionId::single(a, b).unwrap()
    }

    /// Produces one `send` upstream, as a gateway would.
    pub async fn send(&self, send: &Send<'_>) {
        let (receiver_id, session_id) = if send.session.is_group() {
            (None, Some(send.session.to_string()))
        } else {
            (send.session.peer_of(send.from).map(str::to_owned), None)
        };
        let command = UpstreamCommand {
            sender_id: send.from.to_owned(),
            device_id: "dev-1".into(),
            node_id: send.node.to_owned(),
            connection_id: send.connection_id,
            received_at_ms: send.received_at_ms,
            session_id: send.session.to_string(),
            message_id: String::new(),
            command: Some(upstream_command::Command::Send(client::Send {
                client_msg_id: send.client_msg_id.to_owned(),
                receiver_id,
                session_id,
                message_type: MessageType::Text as i32,
                content: send.content.to_owned(),
                burn_after_seconds: None,
                request_id: None,
            })),
        };
        self.produce_raw(&send.session.to_string(), &command.encode_to_vec())
            .await;
    }

    pub async fn produce_raw(&self, key: &str, payload: &[u8]) {
        self.producer
            .send(
                FutureRecord::to(&self.topics.upstream())
                    .key(key)
                    .payload(payload),
                WAIT,
            )
            .await
            .map_err(|(error, _)| error)
            .unwrap();
    }

    /// Registers a live connection of `user` on `node` (as the gateway will).
    pub async fn route(&mut self, user: &str, device: &str, node: &str, connection_id: u64) {
        let route = Route {
            node_id: node.to_owned(),
            connection_id,
            connected_at_ms: now_ms() as u64,
            last_active_ms: now_ms() as u64,
            token_id: format!("jti-{user}-{device}"),
        };
        redis::cmd("HSET")
            .arg(chatify_core::keys::user_routes(user))
            .arg(device)
            .arg(route.encode())
            .exec_async(&mut self.redis)
            .await
            .unwrap();
    }

    /// Archived (message_id, seq, client_msg_id) of a session, by seq.
    pub async fn postgres_rows(&self, session: &SessionId) -> Vec<(String, i64, String)> {
        let rows: Vec<(uuid::Uuid, i64, String)> = sqlx::query_as(
            "SELECT message_id, seq, client_msg_id FROM messages WHERE session_id = $1 ORDER BY seq",
        )
        .bind(session.to_string())
        .fetch_all(&self.postgres)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(id, seq, client)| (id.to_string(), seq, client))
            .collect()
    }

    /// Mongo (message_id, seq, client_msg_id) of a session, by seq.
    pub async fn mongo_rows(&self, session: &SessionId) -> Vec<(String, i64, String)> {
        let documents: Vec<Document> = self
            .mongo
            .collection::<Document>("messages")
            .find(doc! { "session_id": session.to_string() })
            .sort(doc! { "seq": 1 })
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        documents
            .into_iter()
            .map(|document| {
                (
                    document.get_str("_id").unwrap().to_owned(),
                    document.get_i64("seq").unwrap(),
                    document.get_str("client_msg_id").unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// Acks pushed to `node` for this session: (connection_ids, user_ids, ack).
    pub fn acks(
        &self,
        node: &str,
        session: &SessionId,
    ) -> Vec<(Vec<u64>, Vec<String>, client::Ack)> {
        self.pushes(node)
            .into_iter()
            .filter_map(|record| match record.frame?.frame? {
                server_frame::Frame::Ack(ack) if ack.session_id == session.to_string() => {
                    Some((record.connection_ids, record.user_ids, ack))
                }
                _ => None,
            })
            .collect()
    }

    /// Deliveries pushed to `node` for this session: (connection_ids, message).
    pub fn deliveries(
        &self,
        node: &str,
        session: &SessionId,
    ) -> Vec<(Vec<u64>, client::ChatMessage)> {
        self.pushes(node)
            .into_iter()
            .filter_map(|record| match record.frame?.frame? {
                server_frame::Frame::Deliver(deliver) => {
                    let message = deliver.message?;
                    (message.session_id == session.to_string())
                        .then_some((record.connection_ids, message))
                }
                _ => None,
            })
            .collect()
    }

    /// Errors pushed to `node`: (connection_ids, error).
    pub fn errors(&self, node: &str) -> Vec<(Vec<u64>, client::Error)> {
        self.pushes(node)
            .into_iter()
            .filter_map(|record| match record.frame?.frame? {
                server_frame::Frame::Error(error) => Some((record.connection_ids, error)),
                _ => None,
            })
            .collect()
    }

    pub fn pushes(&self, node: &str) -> Vec<PushRecord> {
        self.tap
            .records(&self.topics.push(node))
            .iter()
            .map(|payload| PushRecord::decode(payload.as_slice()).unwrap())
            .collect()
    }

    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.tap
            .records(&self.topics.upstream_dlq())
            .iter()
            .map(|payload| DeadLetter::decode(payload.as_slice()).unwrap())
            .collect()
    }

    pub fn message_events(&self) -> Vec<MessageEvent> {
        self.tap
            .records(&self.topics.message_events())
            .iter()
            .map(|payload| MessageEvent::decode(payload.as_slice()).unwrap())
            .collect()
    }

    /// The acks of `node` for `session` once there are `count` distinct client_msg_ids.
    pub async fn wait_acks(
        &self,
        node: &str,
        session: &SessionId,
        count: usize,
    ) -> Vec<client::Ack> {
        wait_until(&format!("{count} acks on {node} for {session}"), || {
            let mut acks: Vec<client::Ack> = self
                .acks(node, session)
                .into_iter()
                .map(|(_, _, ack)| ack)
                .collect();
            acks.sort_by_key(|ack| ack.seq);
            acks.dedup_by(|a, b| a.client_msg_id == b.client_msg_id);
            (acks.len() >= count).then_some(acks)
        })
        .await
    }
}

/// A `send` to produce.
pub struct Send<'a> {
    pub from: &'a str,
    pub session: &'a SessionId,
    pub client_msg_id: &'a str,
    pub content: &'a str,
    pub node: &'a str,
    pub connection_id: u64,
    pub received_at_ms: i64,
}

/// A writer running in this process.
pub struct Writer {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), WriterError>>,
}

impl Writer {
    /// Graceful stop: finishes the batch in hand and commits.
    pub async fn stop(self) -> Result<(), WriterError> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
    }

    /// Waits for the writer to stop on its own (an injected crash).
    pub async fn finished(self) -> Result<(), WriterError> {
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
    }
}

/// Reads topics from their beginning into memory, outside any consumer group.
pub struct Tap {
    records: Arc<Mutex<HashMap<String, Vec<Vec<u8>>>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Tap {
    fn start(topics: &[(String, i32)]) -> Self {
        let consumer: BaseConsumer = kafka()
            .set("group.id", unique_name("tap"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        for (topic, partitions) in topics {
            for partition in 0..*partitions {
                list.add_partition_offset(topic, partition, Offset::Beginning)
                    .unwrap();
            }
        }
        consumer.assign(&list).unwrap();
        let records: Arc<Mutex<HashMap<String, Vec<Vec<u8>>>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sink, flag) = (Arc::clone(&records), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                    sink.lock()
                        .unwrap()
                        .entry(message.topic().to_owned())
                        .or_default()
                        .push(message.payload().unwrap_or_default().to_vec());
                }
            }
        });
        Self { records, stop }
    }

    pub fn records(&self, topic: &str) -> Vec<Vec<u8>> {
        self.records
            .lock()
            .unwrap()
            .get(topic)
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether `group`'s committed offset of every partition of `topic` is at its end.
fn all_committed(consumer: &BaseConsumer, topic: &str) -> bool {
    let timeout = Duration::from_secs(5);
    let mut list = TopicPartitionList::new();
    for partition in 0..UPSTREAM_PARTITIONS {
        list.add_partition(topic, partition);
    }
    let Ok(committed) = consumer.committed_offsets(list, timeout) else {
        return false;
    };
    (0..UPSTREAM_PARTITIONS).all(|partition| {
        let Ok((_, end)) = consumer.fetch_watermarks(topic, partition, timeout) else {
            return false;
        };
        match committed
            .find_partition(topic, partition)
            .map(|p| p.offset())
        {
            Some(Offset::Offset(offset)) => offset >= end,
            _ => end == 0,
        }
    })
}

/// Polls `check` until it returns a value; panics with `what` after [`WAIT`].
pub async fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Seqs are 1..=n with no gap and no duplicate.
pub fn assert_contiguous(rows: &[(String, i64, String)], n: usize) {
    let seqs: Vec<i64> = rows.iter().map(|(_, seq, _)| *seq).collect();
    assert_eq!(seqs, (1..=n as i64).collect::<Vec<_>>(), "seqs of {rows:?}");
    let mut clients: Vec<&String> = rows.iter().map(|(_, _, client)| client).collect();
    clients.sort();
    clients.dedup();
    assert_eq!(clients.len(), n, "one row per client_msg_id in {rows:?}");
}
