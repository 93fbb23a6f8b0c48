//! StorageService over real gRPC, on data the real writer pipeline stored (broker, Redis,
//! Postgres, MongoDB-protocol server): pages across the cache/archive boundary, identity
//! and every refusal code, monotonic reads under concurrency, unread counts, delete-for-me
//! and clear-session, burn-after-read, Postgres, Redis or Kafka down under the reader
//! (Unavailable), and the page-source counter behind the cache hit ratio.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use chatify_core::ids::SessionId;
use chatify_core::keys;
use chatify_core::stores::Stores;
use chatify_e2e::{service_env, unique_name};
use chatify_proto::Message as _;
use chatify_proto::bus::v1::{UpstreamCommand, upstream_command};
use chatify_proto::client::v1::{self as client, MessageType};
use chatify_proto::storage::v1::group_service_client::GroupServiceClient;
use chatify_proto::storage::v1::group_service_server::GroupServiceServer;
use chatify_proto::storage::v1::storage_service_client::StorageServiceClient;
use chatify_proto::storage::v1::storage_service_server::StorageServiceServer;
use chatify_proto::storage::v1::{
    AddMembersRequest, CreateGroupRequest, ListMembersRequest, RemoveMembersRequest, Role,
};
use chatify_proto::storage::v1::{
    ClearSessionRequest, DeleteMessageRequest, Direction, GetMessageRequest, GetUnreadCountRequest,
    MarkMessageReadRequest, QueryMessagesRequest, SeqRange, query_messages_request,
};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use storage_reader::group::Groups;
use storage_reader::hot_redis::HotRedis;
use storage_reader::identity::{Gatekeeper, INTERNAL_TOKEN_HEADER, INTERNAL_USER_HEADER};
use storage_reader::notify::Notifier;
use storage_reader::service::Storage;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request};

const SECRET: &str = "reader-test-secret-that-is-long-enough-0123";
const INTERNAL: &str = "reader-internal-token-that-is-long-enough-0123";
const WAIT: Duration = Duration::from_secs(60);
/// Group size limit of the test service.
const GROUP_MAX: usize = 6;

/// Where the test reader's own clients connect; the writer always uses the real services.
struct ReaderSetup {
    archive: storage_reader::store::ArchiveStore,
    /// The reader's Redis (gatekeeper, pages, marks, routes).
    redis_url: String,
    /// The brokers of the reader's notifier (pushes and events).
    kafka: String,
}

struct World {
    client: StorageServiceClient<Channel>,
    groups: GroupServiceClient<Channel>,
    channel: Channel,
    postgres: sqlx::PgPool,
    redis: redis::aio::MultiplexedConnection,
    tag: String,
    writer_stop: CancellationToken,
    producer: FutureProducer,
    upstream: String,
    push_topic: String,
    mongo: mongodb::Database,
}

fn token(user: &str, jti: &str) -> String {
    device_token(user, "phone", jti)
}

fn device_token(user: &str, device: &str, jti: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": user, "did": device, "jti": jti, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A request from one of `user`'s devices (its own token).
fn as_device<T>(user: &str, device: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!(
            "Bearer {}",
            device_token(user, device, &format!("j-{user}-{device}"))
        )
        .parse()
        .unwrap(),
    );
    request
}

/// A request carrying exactly `token`.
fn with_token<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn as_user<T>(user: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token(user, &format!("j-{user}")))
            .parse()
            .unwrap(),
    );
    request
}

impl World {
    /// MarkMessageRead as `user` (a client token); the read seq the reader answers.
    async fn mark_read(
        &self,
        user: &str,
        session_id: &str,
        seq: u64,
    ) -> Result<u64, tonic::Status> {
        self.client
            .clone()
            .mark_message_read(as_user(
                user,
                MarkMessageReadRequest {
                    session_id: session_id.to_owned(),
                    seq,
                    ..Default::default()
                },
            ))
            .await
            .map(|response| response.into_inner().read_seq)
    }

    /// Starts the writer (real pipeline) and the reader (real service, real gRPC).
    async fn start() -> Self {
        Self::start_with(storage_reader::store::ArchiveStore::Postgres).await
    }

    /// [`World::start`] with the reader's archive pages served by `archive`.
    async fn start_with(archive: storage_reader::store::ArchiveStore) -> Self {
        Self::start_reader(ReaderSetup {
            archive,
            redis_url: service_env("REDIS_URL"),
            kafka: service_env("KAFKA_BOOTSTRAP_SERVERS"),
        })
        .await
    }

    /// The writer on the real services, and a reader whose own Redis and Kafka clients
    /// connect where `setup` says (to take one of them down under the reader only).
    async fn start_reader(setup: ReaderSetup) -> Self {
        let ReaderSetup {
            archive,
            redis_url: reader_redis_url,
            kafka: reader_kafka,
        } = setup;
        let kafka = service_env("KAFKA_BOOTSTRAP_SERVERS");
        let prefix = unique_name("rt");
        let topics = chatify_core::topics::Topics::new(prefix.clone());
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &kafka)
            .create()
            .unwrap();
        let names = [
            topics.upstream(),
            topics.upstream_dlq(),
            topics.message_events(),
            topics.push("gw-r"),
        ];
        let specs: Vec<NewTopic<'_>> = names
            .iter()
            .map(|name| NewTopic::new(name, 1, TopicReplication::Fixed(1)))
            .collect();
        for result in admin
            .create_topics(&specs, &AdminOptions::new().operation_timeout(Some(WAIT)))
            .await
            .unwrap()
        {
            result.unwrap();
        }
        let writer_config: storage_writer::config::Config = chatify_core::config::parse_from([
            "storage-writer".to_owned(),
            format!("--kafka-bootstrap-servers={kafka}"),
            format!("--topic-prefix={prefix}"),
            format!("--redis-url={}", service_env("REDIS_URL")),
            format!("--postgres-url={}", service_env("POSTGRES_URL")),
            format!("--mongo-url={}", service_env("MONGO_URL")),
            format!("--mongo-database={}", prefix.replace('-', "_")),
            format!("--consumer-group={prefix}-writer"),
        ])
        .unwrap();
        let stores = Stores::open(
            &writer_config.redis,
            &writer_config.postgres,
            &writer_config.mongo,
        )
        .await
        .unwrap();
        let writer_stop = CancellationToken::new();
        let writer_stores = stores.clone();
        let stop = writer_stop.clone();
        tokio::spawn(async move {
            storage_writer::consumer::run(&writer_config, writer_stores, stop)
                .await
                .unwrap();
        });
        let reader_redis = redis::Client::open(reader_redis_url).unwrap();
        let redis_manager = redis::aio::ConnectionManager::new(reader_redis.clone())
            .await
            .unwrap();
        let storage = Storage {
            gatekeeper: Gatekeeper::new(
                chatify_core::auth::Authenticator::hs256(SECRET.as_bytes()),
                Some(INTERNAL.to_owned()),
                redis_manager.clone(),
            ),
            postgres: stores.postgres.clone(),
            redis: redis_manager.clone(),
            hot: Arc::new(HotRedis::with_defaults(&reader_redis).unwrap()),
            mongo: stores.mongo.collection("messages"),
            notifier: Notifier {
                producer: chatify_core::producer::RenewableProducer::new(
                    ClientConfig::new()
                        .set("bootstrap.servers", &reader_kafka)
                        .clone(),
                    "reader",
                )
                .unwrap(),
                topics: topics.clone(),
            },
            recall_window_ms: 60_000,
            archive,
            marks_ttl_seconds: 3600,
        };
        let groups = Groups {
            gatekeeper: storage.gatekeeper.clone(),
            postgres: stores.postgres.clone(),
            redis: redis_manager,
            members_max: GROUP_MAX,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<StorageServiceServer<Storage>>().await;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(storage_reader::reflection_service().unwrap())
                .add_service(StorageServiceServer::new(storage))
                .add_service(GroupServiceServer::new(groups))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let client = StorageServiceClient::new(channel.clone());
        let groups = GroupServiceClient::new(channel.clone());
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &kafka)
            .create()
            .unwrap();
        let redis = stores
            .redis
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        Self {
            client,
            groups,
            channel,
            postgres: stores.postgres,
            redis,
            tag: prefix.replace('-', ""),
            writer_stop,
            producer,
            upstream: topics.upstream(),
            push_topic: topics.push("gw-r"),
            mongo: stores.mongo.clone(),
        }
    }

    /// Push records on gw-r until `found` picks what it waits for.
    async fn wait_push<T>(
        &self,
        mut found: impl FnMut(&chatify_proto::bus::v1::PushRecord) -> Option<T>,
    ) -> T {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        use rdkafka::message::Message as _;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", service_env("KAFKA_BOOTSTRAP_SERVERS"))
            .set("group.id", unique_name("tap"))
            .create()
            .unwrap();
        let mut list = rdkafka::TopicPartitionList::new();
        list.add_partition_offset(&self.push_topic, 0, rdkafka::Offset::Beginning)
            .unwrap();
        consumer.assign(&list).unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            assert!(std::time::Instant::now() < deadline, "push never came");
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                let record = chatify_proto::bus::v1::PushRecord::decode(
                    message.payload().unwrap_or_default(),
                )
                .unwrap();
                if let Some(value) = found(&record) {
                    return value;
                }
            }
        }
    }

    fn user(&self, name: &str) -> String {
        format!("{name}{}", self.tag)
    }

    /// Sends messages `first..first + count` from `from` through the writer and waits until
    /// the writer has stored and cached them (its Redis step, after Postgres and Mongo and
    /// before the acks: what a client could have been told about).
    async fn chat(&self, from: &str, session: &SessionId, first: usize, count: usize) {
        self.chat_with(from, session, first, count, None).await;
    }

    /// [`World::chat`] with burn-after-read messages.
    async fn chat_with(
        &self,
        from: &str,
        session: &SessionId,
        first: usize,
        count: usize,
        burn: Option<u32>,
    ) {
        let (_, before) = self.last_seq(session).await;
        self.send_range(from, session, first, count, burn).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.last_seq(session).await.1 >= before + count as u64 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "writer did not store"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Produces one send numbered `index` without waiting (it may be refused).
    async fn send_only(&self, from: &str, session: &SessionId, index: usize) {
        self.send_range(from, session, index, 1, None).await;
    }

    /// (session, last seq the writer cached) of a session.
    async fn last_seq(&self, session: &SessionId) -> (String, u64) {
        let mut redis = self.redis.clone();
        let last: Option<u64> = redis::cmd("HGET")
            .arg(keys::session_state(session))
            .arg("last_seq")
            .query_async(&mut redis)
            .await
            .unwrap();
        (session.to_string(), last.unwrap_or(0))
    }

    async fn send_range(
        &self,
        from: &str,
        session: &SessionId,
        first: usize,
        count: usize,
        burn_after_seconds: Option<u32>,
    ) {
        let (producer, topic) = (&self.producer, &self.upstream);
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        for i in first..first + count {
            let command = UpstreamCommand {
                sender_id: from.to_owned(),
                device_id: "phone".into(),
                node_id: "gw-r".into(),
                connection_id: 1,
                received_at_ms: base + i as i64,
                session_id: session.to_string(),
                message_id: String::new(),
                command: Some(upstream_command::Command::Send(client::Send {
                    client_msg_id: format!("{from}-{i}"),
                    receiver_id: session.peer_of(from).map(str::to_owned),
                    session_id: session.is_group().then(|| session.to_string()),
                    message_type: MessageType::Text as i32,
                    content: format!("message {i}"),
                    burn_after_seconds,
                    request_id: None,
                })),
            };
            producer
                .send(
                    FutureRecord::to(topic)
                        .key(&session.to_string())
                        .payload(&command.encode_to_vec()),
                    WAIT,
                )
                .await
                .map_err(|(error, _)| error)
                .unwrap();
        }
    }

    async fn page(
        &mut self,
        user: &str,
        session: &SessionId,
        backward: bool,
        limit: u32,
        cursor: &str,
    ) -> (Vec<u64>, String, bool) {
        let response = self
            .client
            .query_messages(as_user(
                user,
                QueryMessagesRequest {
                    session_id: session.to_string(),
                    direction: if backward {
                        Direction::Backward
                    } else {
                        Direction::Forward
                    } as i32,
                    limit,
                    cursor: cursor.to_owned(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let seqs = response
            .messages
            .iter()
            .map(|message| message.seq)
            .collect();
        (seqs, response.next_cursor, response.has_more)
    }

    /// Every seq `user` sees, paging in `limit`s.
    async fn all_pages(&mut self, user: &str, session: &SessionId, backward: bool) -> Vec<u64> {
        let mut seen = Vec::new();
        let mut cursor = String::new();
        loop {
            let (seqs, next, has_more) = self.page(user, session, backward, 7, &cursor).await;
            seen.extend(seqs);
            if !has_more {
                return seen;
            }
            cursor = next;
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.writer_stop.cancel();
    }
}

#[tokio::test]
async fn pages_cross_the_cache_and_archive_boundary_without_gap_or_duplicate() {
    let mut world = World::start().await;
    let (alice, bob) = (world.user("alice"), world.user("bob"));
    let chat = SessionId::single(&alice, &bob).unwrap();
    world.chat(&alice, &chat, 0, 30).await;
    // Keep only the newest 10 in the hot cache: seqs 1..=20 live only in the archive.
    let mut redis = world.redis.clone();
    redis::cmd("ZREMRANGEBYRANK")
        .arg(keys::session_hot_cache(&chat))
        .arg(0)
        .arg(-11)
        .exec_async(&mut redis)
        .await
        .unwrap();
    let forward = world.all_pages(&bob, &chat, false).await;
    assert_eq!(forward, (1..=30).collect::<Vec<_>>());
    let backward = world.all_pages(&bob, &chat, true).await;
    assert_eq!(backward, (1..=30).rev().collect::<Vec<_>>());
    // A page inside the cache and one across the boundary agree with the archive.
    let (seqs, cursor, more) = world.page(&bob, &chat, true, 5, "").await;
    assert_eq!(
        (seqs, cursor.as_str(), more),
        (vec![30, 29, 28, 27, 26], "26", true)
    );
    let (seqs, _, _) = world.page(&bob, &chat, false, 5, "18").await;
    assert_eq!(seqs, vec![19, 20, 21, 22, 23]);
    // Content survives both paths.
    let response = world
        .client
        .query_messages(as_user(
            &bob,
            QueryMessagesRequest {
                session_id: chat.to_string(),
                range: Some(query_messages_request::Range::Seq(SeqRange {
                    after_seq: 2,
                    before_seq: 4,
                })),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.messages.len(), 1);
    assert_eq!(response.messages[0].content, "message 2");
    assert_eq!(response.messages[0].sender_id, alice);
}

/// The value of `chatify_reader_page_source_total{source="<source>"}` in a Prometheus
/// exposition (what `/metrics` serves); 0 before the first count.
fn page_source_count(exposition: &str, source: &str) -> u64 {
    let series = format!("chatify_reader_page_source_total{{source=\"{source}\"}} ");
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .map_or(0, |value| value.trim().parse().unwrap())
}

#[tokio::test]
async fn each_page_counts_its_source_for_the_cache_hit_ratio() {
    // The reader's own recorder type, local to this test: `#[tokio::test]` runs every task
    // of the test (the gRPC server's too) on this thread, so only this test's pages count.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let _counting = metrics::set_default_local_recorder(&recorder);
    let mut world = World::start().await;
    let (alice, bob) = (world.user("alice"), world.user("bob"));
    let chat = SessionId::single(&alice, &bob).unwrap();
    world.chat(&alice, &chat, 0, 5).await;
    let counts = || {
        let exposition = metrics.render();
        (
            page_source_count(&exposition, "cache"),
            page_source_count(&exposition, "archive"),
        )
    };
    assert_eq!(counts(), (0, 0));
    // The hot cache holds the whole session: a hit.
    let (seqs, _, _) = world.page(&bob, &chat, false, 10, "").await;
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert_eq!(counts(), (1, 0), "a cache hit");
    // The hot cache lost the session: a miss, served by the archive.
    let mut redis = world.redis.clone();
    redis::cmd("DEL")
        .arg(keys::session_hot_cache(&chat))
        .exec_async(&mut redis)
        .await
        .unwrap();
    let (seqs, _, _) = world.page(&bob, &chat, false, 10, "").await;
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert_eq!(counts(), (1, 1), "a cache miss");
}

#[tokio::test]
async fn time_ranges_page_by_seq_and_hide_what_the_caller_deleted() {
    let mut world = World::start().await;
    let (alice, bob) = (world.user("alice"), world.user("bob"));
    let chat = SessionId::single(&alice, &bob).unwrap();
    world.chat(&alice, &chat, 0, 10).await;
    // Each message's server time, as the seq pages report it.
    let all = world
        .client
        .query_messages(as_user(
            &bob,
            QueryMessagesRequest {
                session_id: chat.to_string(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(all.len(), 10);
    let at: Vec<i64> = all.iter().map(|message| message.timestamp).collect();
    assert!(at.windows(2).all(|pair| pair[0] < pair[1]), "{at:?}");
    // Bob deletes seq 4 for himself.
    world
        .client
        .delete_message(as_user(
            &bob,
            DeleteMessageRequest {
                message_id: all[3].message_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let time_page = |world: &World, user: &str, range: (i64, i64), limit: u32, cursor: &str| {
        let mut client = world.client.clone();
        let request = as_user(
            user,
            QueryMessagesRequest {
                session_id: chat.to_string(),
                range: Some(query_messages_request::Range::Time(
                    chatify_proto::storage::v1::TimeRange {
                        start_ms: range.0,
                        end_ms: range.1,
                    },
                )),
                limit,
                cursor: cursor.to_owned(),
                ..Default::default()
            },
        );
        async move {
            client
                .query_messages(request)
                .await
                .map(|response| response.into_inner())
        }
    };
    // [time of seq 2, time of seq 8): seqs 2..=7, without bob's deleted 4, 3 a page.
    let first = time_page(&world, &bob, (at[1], at[7]), 3, "")
        .await
        .unwrap();
    let seqs: Vec<u64> = first.messages.iter().map(|m| m.seq).collect();
    assert_eq!((seqs, first.has_more), (vec![2, 3, 5], true));
    let second = time_page(&world, &bob, (at[1], at[7]), 3, &first.next_cursor)
        .await
        .unwrap();
    let seqs: Vec<u64> = second.messages.iter().map(|m| m.seq).collect();
    assert_eq!((seqs, second.has_more), (vec![6, 7], false));
    assert!(second.next_cursor.is_empty());
    // Alice did not delete it; an end of 0 is unbounded.
    let open = time_page(&world, &alice, (at[7], 0), 0, "").await.unwrap();
    let seqs: Vec<u64> = open.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![8, 9, 10]);
    assert_eq!(open.messages[0].content, "message 7");
    // An empty range, and a backward time range, are refused.
    let empty = time_page(&world, &bob, (at[5], at[5]), 0, "")
        .await
        .expect_err("empty range");
    assert_eq!(empty.code(), Code::InvalidArgument);
    let backward = world
        .client
        .query_messages(as_user(
            &bob,
            QueryMessagesRequest {
                session_id: chat.to_string(),
                range: Some(query_messages_request::Range::Time(
                    chatify_proto::storage::v1::TimeRange {
                        start_ms: at[0],
                        end_ms: 0,
                    },
                )),
                direction: Direction::Backward as i32,
                ..Default::default()
            },
        ))
        .await
        .expect_err("backward time range");
    assert_eq!(backward.code(), Code::InvalidArgument);
    // A stranger is refused a time range too.
    let stranger = world.user("mallory");
    let refused = time_page(&world, &stranger, (at[0], 0), 0, "")
        .await
        .expect_err("not a member");
    assert_eq!(refused.code(), Code::PermissionDenied);
    // Bob clears the chat (his watermark: seq 10), then alice sends two more.
    let cleared = world
        .client
        .clear_session(as_user(
            &bob,
            ClearSessionRequest {
                session_id: chat.to_string(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cleared.cleared_through_seq, 10);
    world.chat(&alice, &chat, 10, 2).await;
    let seqs = |page: chatify_proto::storage::v1::QueryMessagesResponse| {
        assert!(!page.has_more);
        page.messages.iter().map(|m| m.seq).collect::<Vec<u64>>()
    };
    // A time range over the whole chat shows bob only what came after his watermark, also
    // from a cursor below it; a range that ends below it is empty for him.
    let whole = time_page(&world, &bob, (at[0], 0), 0, "").await.unwrap();
    assert_eq!(seqs(whole), vec![11, 12]);
    let from_cursor = time_page(&world, &bob, (at[0], 0), 0, "3").await.unwrap();
    assert_eq!(seqs(from_cursor), vec![11, 12]);
    let before_clear = time_page(&world, &bob, (at[0], at[7]), 0, "")
        .await
        .unwrap();
    assert_eq!(seqs(before_clear), Vec::<u64>::new());
    // Alice did not clear: the same ranges still show her everything.
    let whole = time_page(&world, &alice, (at[0], 0), 0, "").await.unwrap();
    assert_eq!(seqs(whole), (1..=12).collect::<Vec<_>>());
    let before_clear = time_page(&world, &alice, (at[0], at[7]), 0, "")
        .await
        .unwrap();
    assert_eq!(seqs(before_clear), (1..=7).collect::<Vec<_>>());
}

#[tokio::test]
async fn identity_and_every_refusal_have_their_code() {
    let mut world = World::start().await;
    let (alice, bob, eve) = (world.user("alice"), world.user("bob"), world.user("eve"));
    let chat = SessionId::single(&alice, &bob).unwrap();
    world.chat(&alice, &chat, 0, 3).await;
    let query = |session: &str| QueryMessagesRequest {
        session_id: session.to_owned(),
        ..Default::default()
    };
    let code = |result: Result<tonic::Response<_>, tonic::Status>| {
        result
            .map(|_: tonic::Response<chatify_proto::storage::v1::QueryMessagesResponse>| ())
            .expect_err("refused")
            .code()
    };
    // No token, a forged token, a revoked token.
    let anonymous = world.client.query_messages(query(&chat.to_string())).await;
    assert_eq!(code(anonymous), Code::Unauthenticated);
    let mut forged = Request::new(query(&chat.to_string()));
    forged
        .metadata_mut()
        .insert("authorization", "Bearer a.b.c".parse().unwrap());
    assert_eq!(
        code(world.client.query_messages(forged).await),
        Code::Unauthenticated
    );
    let mut redis = world.redis.clone();
    redis::cmd("SET")
        .arg(keys::revoked_token(&format!("j-{eve}")))
        .arg(1)
        .arg("EX")
        .arg(60)
        .exec_async(&mut redis)
        .await
        .unwrap();
    let revoked = world
        .client
        .query_messages(as_user(&eve, query(&chat.to_string())))
        .await;
    assert_eq!(code(revoked), Code::Unauthenticated);
    // A member's revoked token, on a page the hot cache serves (the deny-list entry is read
    // in the page's own round trip); the member's other token still reads.
    redis::cmd("SET")
        .arg(keys::revoked_token(&format!("j-{bob}-tablet")))
        .arg(1)
        .arg("EX")
        .arg(60)
        .exec_async(&mut redis)
        .await
        .unwrap();
    let revoked = world
        .client
        .query_messages(as_device(&bob, "tablet", query(&chat.to_string())))
        .await;
    assert_eq!(code(revoked), Code::Unauthenticated);
    world
        .client
        .query_messages(as_device(&bob, "phone", query(&chat.to_string())))
        .await
        .unwrap();
    // A token the reader has verified (and so remembers) is refused as soon as it is
    // revoked: the deny-list is read on every call, by a page and by any other RPC.
    let watch = device_token(&bob, "watch", &format!("j-{bob}-watch"));
    let unread = || GetUnreadCountRequest {
        session_id: chat.to_string(),
        ..Default::default()
    };
    for _ in 0..2 {
        world
            .client
            .query_messages(with_token(&watch, query(&chat.to_string())))
            .await
            .unwrap();
        world
            .client
            .get_unread_count(with_token(&watch, unread()))
            .await
            .unwrap();
    }
    redis::cmd("SET")
        .arg(keys::revoked_token(&format!("j-{bob}-watch")))
        .arg(1)
        .arg("EX")
        .arg(60)
        .exec_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        code(
            world
                .client
                .query_messages(with_token(&watch, query(&chat.to_string())))
                .await
        ),
        Code::Unauthenticated
    );
    let refused = world
        .client
        .get_unread_count(with_token(&watch, unread()))
        .await
        .expect_err("revoked after it was verified");
    assert_eq!(refused.code(), Code::Unauthenticated);
    // A stranger, a forged user_id, a bad argument, an unknown group.
    let stranger = world.user("mallory");
    let refused = world
        .client
        .query_messages(as_user(&stranger, query(&chat.to_string())))
        .await;
    assert_eq!(code(refused), Code::PermissionDenied);
    let mut spoof = query(&chat.to_string());
    spoof.user_id = alice.clone();
    assert_eq!(
        code(world.client.query_messages(as_user(&bob, spoof)).await),
        Code::PermissionDenied
    );
    let mut too_many = query(&chat.to_string());
    too_many.limit = 500;
    assert_eq!(
        code(world.client.query_messages(as_user(&bob, too_many)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            world
                .client
                .query_messages(as_user(&bob, query("room:1")))
                .await
        ),
        Code::InvalidArgument
    );
    let nowhere = format!("grp:none{}", world.tag);
    assert_eq!(
        code(
            world
                .client
                .query_messages(as_user(&bob, query(&nowhere)))
                .await
        ),
        Code::NotFound
    );
    // The internal caller path acts for the named user, and only with the right secret.
    let mut internal = Request::new(query(&chat.to_string()));
    internal
        .metadata_mut()
        .insert(INTERNAL_TOKEN_HEADER, INTERNAL.parse().unwrap());
    internal
        .metadata_mut()
        .insert(INTERNAL_USER_HEADER, bob.parse().unwrap());
    let answered = world
        .client
        .query_messages(internal)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answered.messages.len(), 3);
    let mut wrong = Request::new(query(&chat.to_string()));
    wrong
        .metadata_mut()
        .insert(INTERNAL_TOKEN_HEADER, "nope".parse().unwrap());
    wrong
        .metadata_mut()
        .insert(INTERNAL_USER_HEADER, bob.parse().unwrap());
    assert_eq!(
        code(world.client.query_messages(wrong).await),
        Code::Unauthenticated
    );
    // GetMessage of a bad id and of an unknown one.
    let bad = world
        .client
        .get_message(as_user(
            &bob,
            GetMessageRequest {
                message_id: "x".into(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("bad id");
    assert_eq!(bad.code(), Code::InvalidArgument);
    let unknown = world
        .client
        .get_message(as_user(
            &bob,
            GetMessageRequest {
                message_id: "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("unknown id");
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn every_session_rpc_refuses_a_non_member() {
    use chatify_proto::storage::v1::RecallMessageRequest;
    let mut world = World::start().await;
    let (alice, bob, mallory) = (
        world.user("alice"),
        world.user("bob"),
        world.user("mallory"),
    );
    let trudy = world.user("trudy");
    let chat = SessionId::single(&alice, &bob).unwrap();
    world.chat(&alice, &chat, 0, 2).await;
    let created = world
        .groups
        .create_group(as_user(
            &alice,
            CreateGroupRequest {
                name: "closed".into(),
                member_ids: vec![bob.clone()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let group = SessionId::parse(&created.session_id).unwrap();
    // Numbered after the chat's two: a sender's client_msg_id is deduplicated.
    world.chat(&alice, &group, 2, 1).await;
    let (first,): (uuid::Uuid,) =
        sqlx::query_as("SELECT message_id FROM messages WHERE session_id = $1 AND seq = 1")
            .bind(chat.to_string())
            .fetch_one(&world.postgres)
            .await
            .unwrap();
    let message_id = first.to_string();
    let denied = |result: Result<(), tonic::Status>, rpc: &str| {
        let status = result.expect_err(rpc);
        assert_eq!(status.code(), Code::PermissionDenied, "{rpc}: {status:?}");
        assert!(status.message().contains(&mallory), "{rpc}: {status:?}");
    };
    let client = &mut world.client;
    for session in [&chat, &group] {
        let session = session.to_string();
        denied(
            client
                .query_messages(as_user(
                    &mallory,
                    QueryMessagesRequest {
                        session_id: session.clone(),
                        ..Default::default()
                    },
                ))
                .await
                .map(drop),
            "QueryMessages",
        );
        denied(
            client
                .clear_session(as_user(
                    &mallory,
                    ClearSessionRequest {
                        session_id: session.clone(),
                        ..Default::default()
                    },
                ))
                .await
                .map(drop),
            "ClearSession",
        );
        denied(
            client
                .mark_message_read(as_user(
                    &mallory,
                    MarkMessageReadRequest {
                        session_id: session.clone(),
                        seq: 1,
                        ..Default::default()
                    },
                ))
                .await
                .map(drop),
            "MarkMessageRead",
        );
        denied(
            client
                .get_unread_count(as_user(
                    &mallory,
                    GetUnreadCountRequest {
                        session_id: session.clone(),
                        ..Default::default()
                    },
                ))
                .await
                .map(drop),
            "GetUnreadCount",
        );
    }
    denied(
        client
            .get_message(as_user(
                &mallory,
                GetMessageRequest {
                    message_id: message_id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        "GetMessage",
    );
    denied(
        client
            .delete_message(as_user(
                &mallory,
                DeleteMessageRequest {
                    message_id: message_id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        "DeleteMessage",
    );
    denied(
        client
            .recall_message(as_user(
                &mallory,
                RecallMessageRequest {
                    message_id: message_id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        "RecallMessage",
    );
    let groups = &mut world.groups;
    denied(
        groups
            .list_members(as_user(
                &mallory,
                ListMembersRequest {
                    session_id: group.to_string(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        "ListMembers",
    );
    denied(
        groups
            .add_members(as_user(
                &mallory,
                AddMembersRequest {
                    session_id: group.to_string(),
                    member_ids: vec![trudy.clone()],
                    role: Role::Member as i32,
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        "AddMembers",
    );
    denied(
        groups
            .remove_members(as_user(
                &mallory,
                RemoveMembersRequest {
                    session_id: group.to_string(),
                    member_ids: vec![bob.clone()],
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        "RemoveMembers",
    );
    // Nothing they tried changed anything: the members still read everything, unhidden.
    assert_eq!(world.all_pages(&bob, &chat, false).await, vec![1, 2]);
    assert_eq!(world.all_pages(&bob, &group, false).await, vec![1]);
    let (hides,): (i64,) = sqlx::query_as("SELECT count(*) FROM message_hides WHERE user_id = $1")
        .bind(&mallory)
        .fetch_one(&world.postgres)
        .await
        .unwrap();
    assert_eq!(hides, 0);
}

#[tokio::test]
async fn reads_only_move_forward_and_unread_counts_follow() {
    let world = World::start().await;
    let (alice, bob) = (world.user("alice"), world.user("bob"));
    let chat = SessionId::single(&alice, &bob).unwrap();
    world.chat(&alice, &chat, 0, 30).await;
    let unread = |world: &World, user: &str| {
        let mut client = world.client.clone();
        let request = as_user(
            user,
            GetUnreadCountRequest {
                session_id: chat.to_string(),
                ..Default::default()
            },
        );
        async move {
            client
                .get_unread_count(request)
                .await
                .unwrap()
                .into_inner()
                .unread_count
        }
    };
    assert_eq!(unread(&world, &bob).await, 30);
    assert_eq!(unread(&world, &alice).await, 0, "own messages are read");
    // Two devices read concurrently, many times: the cursor never moves back.
    // Reads of 20 come from bob's phone, the others from his laptop (own tokens).
    let mark = |seq: u64| {
        let mut client = world.client.clone();
        let device = if seq.is_multiple_of(20) {
            "phone"
        } else {
            "laptop"
        };
        let request = as_device(
            &bob,
            device,
            MarkMessageReadRequest {
                session_id: chat.to_string(),
                seq,
                ..Default::default()
            },
        );
        async move {
            client
                .mark_message_read(request)
                .await
                .unwrap()
                .into_inner()
                .read_seq
        }
    };
    let results =
        futures::future::join_all((0..20).map(|i| mark(if i % 2 == 0 { 20 } else { 10 }))).await;
    // A 10 that landed before every 20 may answer 10; nothing answers less, and once the
    // 20s are in, a lower read never moves the cursor back.
    assert!(
        results.iter().all(|read| *read == 10 || *read == 20),
        "{results:?}"
    );
    assert_eq!(mark(5).await, 20);
    assert_eq!(mark(10).await, 20);
    // Both devices see the same unread count.
    assert_eq!(unread(&world, &bob).await, 10);
    let from_laptop = world
        .client
        .clone()
        .get_unread_count(as_device(
            &bob,
            "laptop",
            GetUnreadCountRequest {
                session_id: chat.to_string(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .unread_count;
    assert_eq!(from_laptop, 10);
    let past_end = world
        .mark_read(&bob, &chat.to_string(), 31)
        .await
        .expect_err("past the end");
    assert_eq!(past_end.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn delete_for_me_and_clear_hide_only_for_the_caller() {
    let mut world = World::start().await;
    let (alice, bob) = (world.user("alice"), world.user("bob"));
    let chat = SessionId::single(&alice, &bob).unwrap();
    world.chat(&alice, &chat, 0, 5).await;
    let (third,): (uuid::Uuid,) =
        sqlx::query_as("SELECT message_id FROM messages WHERE session_id = $1 AND seq = 3")
            .bind(chat.to_string())
            .fetch_one(&world.postgres)
            .await
            .unwrap();
    world
        .client
        .delete_message(as_user(
            &bob,
            DeleteMessageRequest {
                message_id: third.to_string(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    assert_eq!(world.all_pages(&bob, &chat, false).await, vec![1, 2, 4, 5]);
    assert_eq!(
        world.all_pages(&alice, &chat, false).await,
        vec![1, 2, 3, 4, 5]
    );
    let gone = world
        .client
        .get_message(as_user(
            &bob,
            GetMessageRequest {
                message_id: third.to_string(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("deleted for bob");
    assert_eq!(gone.code(), Code::NotFound);
    let kept = world
        .client
        .get_message(as_user(
            &alice,
            GetMessageRequest {
                message_id: third.to_string(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.message.unwrap().content, "message 2");

    let cleared = world
        .client
        .clear_session(as_user(
            &bob,
            ClearSessionRequest {
                session_id: chat.to_string(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cleared.cleared_through_seq, 5);
    assert!(world.all_pages(&bob, &chat, false).await.is_empty());
    assert!(world.all_pages(&bob, &chat, true).await.is_empty());
    world.chat(&alice, &chat, 5, 2).await;
    assert_eq!(world.all_pages(&bob, &chat, false).await, vec![6, 7]);
    assert_eq!(world.all_pages(&bob, &chat, true).await, vec![7, 6]);
    assert_eq!(world.all_pages(&alice, &chat, false).await.len(), 7);
    assert_eq!(
        world.all_pages(&alice, &chat, true).await,
        (1..=7).rev().collect::<Vec<_>>()
    );
    // Bob's marks live in Redis, built from Postgres and written through.
    let marks = keys::user_marks(&chat, &bob);
    let mut redis = world.redis.clone();
    let held: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(&marks)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(held.contains(&("3".to_owned(), 3.0)), "{held:?}");
    assert!(held.contains(&("cleared".to_owned(), 5.0)), "{held:?}");
    // Redis loses them: the next page rebuilds them from Postgres. A partial set (a
    // write-through that landed on a missing key) is rebuilt too, not trusted.
    for partial in [false, true] {
        redis::cmd("DEL")
            .arg(&marks)
            .exec_async(&mut redis)
            .await
            .unwrap();
        if partial {
            redis::cmd("ZADD")
                .arg(&marks)
                .arg(3)
                .arg(3)
                .exec_async(&mut redis)
                .await
                .unwrap();
        }
        assert_eq!(world.all_pages(&bob, &chat, false).await, vec![6, 7]);
        assert_eq!(world.all_pages(&bob, &chat, true).await, vec![7, 6]);
        let (cleared, built): (Option<f64>, Option<f64>) = redis::cmd("ZMSCORE")
            .arg(&marks)
            .arg("cleared")
            .arg("built")
            .query_async(&mut redis)
            .await
            .map(|scores: Vec<Option<f64>>| (scores[0], scores[1]))
            .unwrap();
        assert_eq!((cleared, built.is_some()), (Some(5.0), true));
    }
    // The page cursor inside the cleared range: still nothing up to the watermark.
    let (seqs, _, _) = world.page(&bob, &chat, false, 3, "2").await;
    assert_eq!(seqs, vec![6, 7]);
    let (seqs, _, has_more) = world.page(&bob, &chat, true, 3, "6").await;
    assert_eq!((seqs, has_more), (vec![], false));
}

#[tokio::test]
async fn groups_have_roles_a_size_limit_and_the_writer_sees_changes() {
    let mut world = World::start().await;
    let owner = world.user("owner");
    let (ann, ben, cat, dan, eve) = (
        world.user("ann"),
        world.user("ben"),
        world.user("cat"),
        world.user("dan"),
        world.user("eve"),
    );
    let created = world
        .groups
        .create_group(as_user(
            &owner,
            CreateGroupRequest {
                name: "team".into(),
                member_ids: vec![ann.clone(), ben.clone(), ann.clone(), owner.clone()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let group = SessionId::parse(&created.session_id).unwrap();
    assert!(group.is_group());
    let add = |user: &str, members: Vec<String>, role: Role| {
        let mut groups = world.groups.clone();
        let request = as_user(
            user,
            AddMembersRequest {
                session_id: group.to_string(),
                member_ids: members,
                role: role as i32,
                ..Default::default()
            },
        );
        async move {
            groups
                .add_members(request)
                .await
                .map(|r| r.into_inner().added)
        }
    };
    let remove = |user: &str, members: Vec<String>| {
        let mut groups = world.groups.clone();
        let request = as_user(
            user,
            RemoveMembersRequest {
                session_id: group.to_string(),
                member_ids: members,
                ..Default::default()
            },
        );
        async move {
            groups
                .remove_members(request)
                .await
                .map(|r| r.into_inner().removed)
        }
    };
    // Plain members cannot add; only the owner makes admins; admins add members.
    let code = |result: Result<u32, tonic::Status>| result.expect_err("refused").code();
    assert_eq!(
        code(add(&ann, vec![cat.clone()], Role::Member).await),
        Code::PermissionDenied
    );
    assert_eq!(
        add(&owner, vec![ann.clone()], Role::Admin).await.unwrap(),
        0,
        "already in"
    );
    assert_eq!(
        add(&owner, vec![cat.clone()], Role::Admin).await.unwrap(),
        1
    );
    assert_eq!(
        code(add(&cat, vec![dan.clone()], Role::Admin).await),
        Code::PermissionDenied
    );
    assert_eq!(add(&cat, vec![dan.clone()], Role::Member).await.unwrap(), 1);
    // 5 members now; the limit is 6: two more is refused and adds nothing.
    assert_eq!(
        code(add(&owner, vec![eve.clone(), world.user("fay")], Role::Member).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(add(&owner, vec![eve.clone()], Role::Owner).await),
        Code::InvalidArgument
    );
    let listed = world
        .groups
        .clone()
        .list_members(as_user(
            &ben,
            ListMembersRequest {
                session_id: group.to_string(),
                limit: 3,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.members.len(), 3);
    let rest = world
        .groups
        .clone()
        .list_members(as_user(
            &ben,
            ListMembersRequest {
                session_id: group.to_string(),
                limit: 3,
                cursor: listed.next_cursor.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.members.len(), 2);
    assert!(rest.next_cursor.is_empty());
    let everyone: Vec<(String, i32)> = listed
        .members
        .iter()
        .chain(&rest.members)
        .map(|member| (member.user_id.clone(), member.role))
        .collect();
    assert!(everyone.contains(&(owner.clone(), Role::Owner as i32)));
    assert!(everyone.contains(&(cat.clone(), Role::Admin as i32)));
    assert!(everyone.contains(&(dan.clone(), Role::Member as i32)));

    // Members talk through the writer; removal takes effect for the next message.
    world.chat(&ben, &group, 0, 1).await;
    assert_eq!(
        code(remove(&ben, vec![cat.clone()]).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(remove(&cat, vec![owner.clone()]).await),
        Code::FailedPrecondition
    );
    assert_eq!(remove(&cat, vec![ben.clone()]).await.unwrap(), 1);
    assert_eq!(
        remove(&dan, vec![dan.clone()]).await.unwrap(),
        1,
        "a member may leave"
    );
    let refused = world
        .client
        .query_messages(as_user(
            &ben,
            QueryMessagesRequest {
                session_id: group.to_string(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("ben was removed");
    assert_eq!(refused.code(), Code::PermissionDenied);
    // Ben's next send is refused by the writer (its members cache was dropped), the
    // owner's is stored after it.
    world.send_only(&ben, &group, 1).await;
    world.chat(&owner, &group, 0, 1).await;
    let (from_ben,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM messages WHERE session_id = $1 AND sender_id = $2")
            .bind(group.to_string())
            .bind(&ben)
            .fetch_one(&world.postgres)
            .await
            .unwrap();
    assert_eq!(from_ben, 1, "only the message sent while a member");
    // The writer has cached the new member list again: pages check it there, and ben
    // stays out while the owner reads.
    let mut redis = world.redis.clone();
    let cached: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys::session_members(&group))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        cached.contains(&owner) && !cached.contains(&ben),
        "{cached:?}"
    );
    let refused = world
        .client
        .query_messages(as_user(
            &ben,
            QueryMessagesRequest {
                session_id: group.to_string(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("ben was removed");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(world.all_pages(&owner, &group, false).await, vec![1, 2]);

    // Moderators recall anyone's message at any time; a plain member only their own.
    let ids: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT message_id, sender_id FROM messages WHERE session_id = $1 ORDER BY seq",
    )
    .bind(group.to_string())
    .fetch_all(&world.postgres)
    .await
    .unwrap();
    sqlx::query("UPDATE messages SET created_at = now() - interval '1 hour' WHERE session_id = $1")
        .bind(group.to_string())
        .execute(&world.postgres)
        .await
        .unwrap();
    let recall = |user: &str, id: uuid::Uuid| {
        let mut client = world.client.clone();
        let request = as_user(
            user,
            chatify_proto::storage::v1::RecallMessageRequest {
                message_id: id.to_string(),
                ..Default::default()
            },
        );
        async move {
            client
                .recall_message(request)
                .await
                .map(|r| r.into_inner().seq)
        }
    };
    assert_eq!(
        recall(&ann, ids[1].0)
            .await
            .expect_err("a member, not the sender")
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        recall(&cat, ids[1].0).await.unwrap(),
        2,
        "an admin, an hour later"
    );
    assert_eq!(
        recall(&owner, ids[0].0).await.unwrap(),
        1,
        "the owner, a removed member's"
    );
}

#[tokio::test]
async fn session_lists_page_newest_first_with_unread_counts_and_survive_redis_loss() {
    let world = World::start().await;
    let hub = world.user("hub");
    let peers: Vec<String> = (0..12).map(|i| world.user(&format!("p{i:02}"))).collect();
    for (i, peer) in peers.iter().enumerate() {
        let chat = SessionId::single(&hub, peer).unwrap();
        world.chat(peer, &chat, 0, i % 3 + 1).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let read_chat = SessionId::single(&hub, &peers[11]).unwrap();
    world
        .mark_read(&hub, &read_chat.to_string(), 2)
        .await
        .unwrap();
    let list_all = || {
        let mut client = world.client.clone();
        let hub = hub.clone();
        async move {
            let mut all = Vec::new();
            let mut cursor = String::new();
            loop {
                let page = client
                    .list_sessions(as_user(
                        &hub,
                        chatify_proto::storage::v1::ListSessionsRequest {
                            limit: 5,
                            cursor: cursor.clone(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                assert!(page.sessions.len() <= 5);
                all.extend(page.sessions);
                if page.next_cursor.is_empty() {
                    return all;
                }
                cursor = page.next_cursor;
            }
        }
    };
    let listed = list_all().await;
    let expected: Vec<String> = peers
        .iter()
        .rev()
        .map(|peer| SessionId::single(&hub, peer).unwrap().to_string())
        .collect();
    let ids: Vec<String> = listed.iter().map(|s| s.session_id.clone()).collect();
    assert_eq!(ids, expected, "newest activity first, each once");
    for summary in &listed {
        let peer_index = peers
            .iter()
            .position(|peer| summary.session_id.contains(peer.as_str()))
            .unwrap();
        let sent = (peer_index % 3 + 1) as u64;
        assert_eq!(summary.last_seq, sent);
        let expected_unread = if peer_index == 11 { sent - 2 } else { sent };
        assert_eq!(
            summary.unread_count, expected_unread,
            "{}",
            summary.session_id
        );
        let last = summary.last_message.as_ref().unwrap();
        assert_eq!(last.content, format!("message {}", sent - 1));
    }
    // Redis loses the list: it is rebuilt from Postgres, same sessions in the same order.
    let mut redis = world.redis.clone();
    redis::cmd("DEL")
        .arg(keys::user_sessions(&hub))
        .exec_async(&mut redis)
        .await
        .unwrap();
    let rebuilt: Vec<String> = list_all()
        .await
        .into_iter()
        .map(|summary| summary.session_id)
        .collect();
    assert_eq!(rebuilt, expected);
}

async fn route(world: &World, user: &str, connection_id: u64) {
    let mut redis = world.redis.clone();
    redis::cmd("HSET")
        .arg(keys::user_routes(user))
        .arg("phone")
        .arg(
            chatify_core::routing::Route {
                node_id: "gw-r".into(),
                connection_id,
                connected_at_ms: storage_reader::notify::now_ms() as u64,
                last_active_ms: storage_reader::notify::now_ms() as u64,
                token_id: format!("jti-{user}"),
            }
            .encode(),
        )
        .exec_async(&mut redis)
        .await
        .unwrap();
}

#[tokio::test]
async fn recall_tombstones_everywhere_and_reads_send_receipts() {
    use chatify_proto::client::v1::server_frame::Frame;
    use chatify_proto::storage::v1::RecallMessageRequest;
    let world = World::start().await;
    let (alice, bob) = (world.user("alice"), world.user("bob"));
    let chat = SessionId::single(&alice, &bob).unwrap();
    route(&world, &alice, 1).await;
    route(&world, &bob, 7).await;
    world.chat(&alice, &chat, 0, 3).await;
    let ids: Vec<(uuid::Uuid,)> =
        sqlx::query_as("SELECT message_id FROM messages WHERE session_id = $1 ORDER BY seq")
            .bind(chat.to_string())
            .fetch_all(&world.postgres)
            .await
            .unwrap();
    let recall = |user: &str, id: uuid::Uuid| {
        let mut client = world.client.clone();
        let request = as_user(
            user,
            RecallMessageRequest {
                message_id: id.to_string(),
                ..Default::default()
            },
        );
        async move { client.recall_message(request).await.map(|r| r.into_inner()) }
    };
    // Not the sender: refused. The sender within the window: a tombstone everywhere.
    assert_eq!(
        recall(&bob, ids[1].0)
            .await
            .expect_err("not the sender")
            .code(),
        Code::PermissionDenied
    );
    let recalled = recall(&alice, ids[1].0).await.unwrap();
    assert_eq!(
        (recalled.session_id.as_str(), recalled.seq),
        (chat.to_string().as_str(), 2)
    );
    let (content, at): (Vec<u8>, Option<String>) =
        sqlx::query_as("SELECT content, recalled_by FROM messages WHERE message_id = $1")
            .bind(ids[1].0)
            .fetch_one(&world.postgres)
            .await
            .unwrap();
    assert!(content.is_empty());
    assert_eq!(at.as_deref(), Some(alice.as_str()));
    let document = world
        .mongo
        .collection::<mongodb::bson::Document>("messages")
        .find_one(mongodb::bson::doc! { "_id": ids[1].0.to_string() })
        .await
        .unwrap()
        .unwrap();
    assert!(document.get_bool("recalled").unwrap());
    assert_eq!(document.get_str("content").unwrap(), "");
    // Both read paths show the tombstone: the cache (whole range cached) and the archive.
    for drop_cache in [false, true] {
        if drop_cache {
            let mut redis = world.redis.clone();
            redis::cmd("DEL")
                .arg(keys::session_hot_cache(&chat))
                .exec_async(&mut redis)
                .await
                .unwrap();
        }
        let page = world
            .client
            .clone()
            .query_messages(as_user(
                &bob,
                QueryMessagesRequest {
                    session_id: chat.to_string(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let second = &page.messages[1];
        assert!(second.recalled && second.content.is_empty(), "{second:?}");
        assert_eq!(page.messages[2].content, "message 2");
    }
    // Both devices get `recalled`, through one record for the node.
    let targets = world
        .wait_push(|record| match record.frame.as_ref()?.frame.as_ref()? {
            Frame::Recalled(recalled) if recalled.seq == 2 => Some(record.connection_ids.clone()),
            _ => None,
        })
        .await;
    let mut targets = targets;
    targets.sort_unstable();
    assert_eq!(targets, vec![1, 7]);
    // Past the window the sender is refused.
    sqlx::query(
        "UPDATE messages SET created_at = now() - interval '10 minutes' WHERE message_id = $1",
    )
    .bind(ids[2].0)
    .execute(&world.postgres)
    .await
    .unwrap();
    assert_eq!(
        recall(&alice, ids[2].0).await.expect_err("too late").code(),
        Code::FailedPrecondition
    );
    // Bob reads: alice's devices (and bob's) get a receipt.
    world.mark_read(&bob, &chat.to_string(), 3).await.unwrap();
    let receipt = world
        .wait_push(|record| match record.frame.as_ref()?.frame.as_ref()? {
            Frame::ReadReceipt(receipt) => Some((receipt.clone(), record.connection_ids.clone())),
            _ => None,
        })
        .await;
    assert_eq!(
        (receipt.0.user_id.as_str(), receipt.0.seq),
        (bob.as_str(), 3)
    );
    assert!(receipt.1.contains(&1));
}

#[tokio::test]
async fn burn_after_read_purges_the_content_in_every_store() {
    let world = World::start().await;
    let (alice, bob) = (world.user("alice"), world.user("bob"));
    let chat = SessionId::single(&alice, &bob).unwrap();
    world.chat_with(&alice, &chat, 0, 2, Some(1)).await;
    world.chat(&alice, &chat, 2, 1).await;
    let mut redis_manager =
        redis::aio::ConnectionManager::new(redis::Client::open(service_env("REDIS_URL")).unwrap())
            .await
            .unwrap();
    let collection = world
        .mongo
        .collection::<mongodb::bson::Document>("messages");
    // Alice reading her own messages starts nothing; nothing is due yet.
    world.mark_read(&alice, &chat.to_string(), 3).await.unwrap();
    // Bob reads the first burning message only.
    world.mark_read(&bob, &chat.to_string(), 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let burned = storage_reader::store::burn_due(&world.postgres, &collection, &mut redis_manager)
        .await
        .unwrap();
    // At least bob's first message (the sweep is global: other due rows may go too).
    assert!(burned >= 1);
    let rows: Vec<(i64, Vec<u8>, bool)> = sqlx::query_as(
        "SELECT seq, content, burned_at IS NOT NULL FROM messages WHERE session_id = $1 ORDER BY seq",
    )
    .bind(chat.to_string())
    .fetch_all(&world.postgres)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (1, Vec::new(), true),
            (2, b"message 1".to_vec(), false),
            (3, b"message 2".to_vec(), false)
        ]
    );
    let documents: Vec<mongodb::bson::Document> = {
        use futures::TryStreamExt as _;
        collection
            .find(mongodb::bson::doc! { "session_id": chat.to_string() })
            .sort(mongodb::bson::doc! { "seq": 1 })
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    };
    let contents: Vec<&str> = documents
        .iter()
        .map(|document| document.get_str("content").unwrap())
        .collect();
    assert_eq!(contents, vec!["", "message 1", "message 2"]);
    let page = world
        .client
        .clone()
        .query_messages(as_user(
            &alice,
            QueryMessagesRequest {
                session_id: chat.to_string(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let served: Vec<&str> = page.messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(
        served,
        vec!["", "message 1", "message 2"],
        "the cache was purged too"
    );
    // Another sweep leaves the unread burning message and the plain one alone.
    storage_reader::store::burn_due(&world.postgres, &collection, &mut redis_manager)
        .await
        .unwrap();
    let (kept,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM messages WHERE session_id = $1 AND burned_at IS NULL")
            .bind(chat.to_string())
            .fetch_one(&world.postgres)
            .await
            .unwrap();
    assert_eq!(kept, 2);
    // Now the session's last message burns: the session list shows it without its content.
    world.chat_with(&alice, &chat, 3, 1, Some(1)).await;
    let last_listed = |user: &str| {
        let mut client = world.client.clone();
        let request = as_user(
            user,
            chatify_proto::storage::v1::ListSessionsRequest::default(),
        );
        let chat = chat.to_string();
        async move {
            let sessions = client
                .list_sessions(request)
                .await
                .unwrap()
                .into_inner()
                .sessions;
            let summary = sessions
                .into_iter()
                .find(|summary| summary.session_id == chat)
                .expect("the chat is listed");
            let last = summary.last_message.expect("a last message");
            (last.seq, last.content)
        }
    };
    assert_eq!(last_listed(&bob).await, (4, "message 3".to_owned()));
    world.mark_read(&bob, &chat.to_string(), 4).await.unwrap();
    // Sweep until seq 4's timer has run out and it is burned.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        storage_reader::store::burn_due(&world.postgres, &collection, &mut redis_manager)
            .await
            .unwrap();
        let (burned,): (bool,) = sqlx::query_as(
            "SELECT burned_at IS NOT NULL FROM messages WHERE session_id = $1 AND seq = 4",
        )
        .bind(chat.to_string())
        .fetch_one(&world.postgres)
        .await
        .unwrap();
        if burned {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "seq 4 never burned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for user in [&alice, &bob] {
        assert_eq!(last_listed(user).await, (4, String::new()), "{user}");
    }
}

#[tokio::test]
async fn reflection_lists_the_services_and_health_reports_serving() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let world = World::start().await;
    let mut reflection = ServerReflectionClient::new(world.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    for expected in [
        "chatify.storage.v1.StorageService",
        "chatify.storage.v1.GroupService",
    ] {
        assert!(names.iter().any(|name| name == expected), "{names:?}");
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(world.channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "chatify.storage.v1.StorageService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn mongo_can_serve_the_archive_path() {
    let mut world = World::start_with(storage_reader::store::ArchiveStore::Mongo).await;
    let (alice, bob) = (world.user("alice"), world.user("bob"));
    let chat = SessionId::single(&alice, &bob).unwrap();
    world.chat(&alice, &chat, 0, 12).await;
    let mut redis = world.redis.clone();
    redis::cmd("DEL")
        .arg(keys::session_hot_cache(&chat))
        .exec_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        world.all_pages(&bob, &chat, false).await,
        (1..=12).collect::<Vec<_>>()
    );
    assert_eq!(
        world.all_pages(&bob, &chat, true).await,
        (1..=12).rev().collect::<Vec<_>>()
    );
    let page = world
        .client
        .query_messages(as_user(
            &bob,
            QueryMessagesRequest {
                session_id: chat.to_string(),
                limit: 1,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let first = &page.messages[0];
    assert_eq!((first.seq, first.content.as_str()), (1, "message 0"));
    assert_eq!(first.sender_id, alice);
    assert!(first.timestamp > 0);
}

#[tokio::test]
async fn a_store_that_is_down_answers_unavailable() {
    let postgres_url = service_env("POSTGRES_URL");
    let url = url::Url::parse(&postgres_url).unwrap();
    let proxy = chatify_e2e::TcpProxy::start(&format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port_or_known_default().unwrap()
    ))
    .await
    .unwrap();
    let mut through = url.clone();
    through.set_port(Some(proxy.addr().port())).unwrap();
    let postgres = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(through.as_str())
        .unwrap();
    let redis_client = redis::Client::open(service_env("REDIS_URL")).unwrap();
    let redis = redis::aio::ConnectionManager::new(redis_client.clone())
        .await
        .unwrap();
    let mongo = mongodb::Client::with_uri_str(service_env("MONGO_URL"))
        .await
        .unwrap()
        .database(&unique_name("rt").replace('-', "_"));
    let storage = Storage {
        gatekeeper: Gatekeeper::new(
            chatify_core::auth::Authenticator::hs256(SECRET.as_bytes()),
            None,
            redis.clone(),
        ),
        postgres,
        redis,
        hot: Arc::new(HotRedis::with_defaults(&redis_client).unwrap()),
        mongo: mongo.collection("messages"),
        notifier: Notifier {
            producer: chatify_core::producer::RenewableProducer::new(
                ClientConfig::new()
                    .set("bootstrap.servers", service_env("KAFKA_BOOTSTRAP_SERVERS"))
                    .clone(),
                "reader",
            )
            .unwrap(),
            topics: chatify_core::topics::Topics::new(unique_name("rt")),
        },
        recall_window_ms: 60_000,
        archive: storage_reader::store::ArchiveStore::Postgres,
        marks_ttl_seconds: 3600,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(StorageServiceServer::new(storage))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let mut client = StorageServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let chat = SessionId::single("downa", "downb").unwrap();
    let query = || {
        as_user(
            "downa",
            QueryMessagesRequest {
                session_id: chat.to_string(),
                ..Default::default()
            },
        )
    };
    client.query_messages(query()).await.expect("postgres up");
    // A chat the hot cache holds (written by the writer's cache code): once the caller's
    // marks are in Redis, its pages need no Postgres at all.
    let (sender, reader) = (unique_name("downc"), unique_name("downd"));
    let hot = SessionId::single(&sender, &reader).unwrap();
    let sent: Vec<storage_writer::record::Incoming> = (0..3)
        .map(|i| storage_writer::record::Incoming {
            position: storage_writer::record::Position {
                partition: 0,
                offset: i,
            },
            origin: storage_writer::record::Origin {
                node_id: "gw-r".into(),
                connection_id: 1,
            },
            sender_id: sender.clone(),
            device_id: "phone".into(),
            session: hot.clone(),
            message_id: chatify_core::ids::MessageId::derive(
                &sender,
                &format!("c{i}"),
                1_700_000_000_000 + i as u64,
            ),
            client_msg_id: format!("c{i}"),
            message_type: MessageType::Text,
            content: format!("message {i}"),
            burn_after_seconds: None,
            request_id: None,
            timestamp_ms: 1_700_000_000_000 + i,
        })
        .collect();
    let stored: Vec<storage_writer::cache::StoredMessage<'_>> = sent
        .iter()
        .enumerate()
        .map(|(i, message)| storage_writer::cache::StoredMessage {
            message,
            seq: i as u64 + 1,
        })
        .collect();
    let members = vec![sender.clone(), reader.clone()];
    let mut writer_redis = redis::aio::ConnectionManager::new(redis_client.clone())
        .await
        .unwrap();
    storage_writer::cache::write(
        &mut writer_redis,
        &stored,
        &std::iter::once((&hot, members.as_slice())).collect(),
        storage_writer::cache::CacheLimits {
            hot_cache_messages: 200,
            hot_cache_ttl_seconds: 600,
        },
    )
    .await
    .unwrap();
    let hot_query = || {
        as_user(
            &reader,
            QueryMessagesRequest {
                session_id: hot.to_string(),
                ..Default::default()
            },
        )
    };
    client
        .query_messages(hot_query())
        .await
        .expect("postgres up");
    proxy.set_down();
    let page = client
        .query_messages(hot_query())
        .await
        .expect("a cache hit needs no postgres")
        .into_inner();
    let seqs: Vec<u64> = page.messages.iter().map(|message| message.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    let status = client
        .query_messages(query())
        .await
        .expect_err("postgres down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("postgres"), "{status:?}");
    proxy.set_up();
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.query_messages(query()).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn redis_down_under_the_reader_answers_unavailable_naming_redis() {
    let redis_url = url::Url::parse(&service_env("REDIS_URL")).unwrap();
    let proxy = chatify_e2e::TcpProxy::start(&format!(
        "{}:{}",
        redis_url.host_str().unwrap(),
        redis_url.port().unwrap_or(6379)
    ))
    .await
    .unwrap();
    let mut through = redis_url.clone();
    through.set_port(Some(proxy.addr().port())).unwrap();
    let mut world = World::start_reader(ReaderSetup {
        archive: storage_reader::store::ArchiveStore::Postgres,
        redis_url: through.to_string(),
        kafka: service_env("KAFKA_BOOTSTRAP_SERVERS"),
    })
    .await;
    let (alice, bob) = (world.user("alice"), world.user("bob"));
    let chat = SessionId::single(&alice, &bob).unwrap();
    world.chat(&alice, &chat, 0, 3).await;
    assert_eq!(world.all_pages(&bob, &chat, false).await, vec![1, 2, 3]);
    proxy.set_down();
    let mut client = world.client.clone();
    let query = || {
        as_user(
            &bob,
            QueryMessagesRequest {
                session_id: chat.to_string(),
                ..Default::default()
            },
        )
    };
    let unread = || {
        as_user(
            &bob,
            GetUnreadCountRequest {
                session_id: chat.to_string(),
                ..Default::default()
            },
        )
    };
    // A page reads the deny-list, the marks and the window in one Redis round trip.
    let status = client
        .query_messages(query())
        .await
        .expect_err("redis down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("redis"), "{status:?}");
    // Every other call checks the token's deny-list entry in Redis first.
    let status = client
        .get_unread_count(unread())
        .await
        .expect_err("redis down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("redis"), "{status:?}");
    let status = client
        .list_sessions(as_user(
            &bob,
            chatify_proto::storage::v1::ListSessionsRequest::default(),
        ))
        .await
        .expect_err("redis down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("redis"), "{status:?}");
    // Redis back: the same reader serves again.
    proxy.set_up();
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.query_messages(query()).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(world.all_pages(&bob, &chat, false).await, vec![1, 2, 3]);
    let unread = client
        .get_unread_count(unread())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unread.unread_count, 3);
}

#[tokio::test]
async fn kafka_down_under_the_reader_fails_the_commands_that_publish_with_unavailable() {
    use chatify_proto::storage::v1::RecallMessageRequest;
    // Nothing listens there: the reader's notifier has no broker to reach.
    let closed = chatify_e2e::free_local_addr();
    let mut world = World::start_reader(ReaderSetup {
        archive: storage_reader::store::ArchiveStore::Postgres,
        redis_url: service_env("REDIS_URL"),
        kafka: closed.to_string(),
    })
    .await;
    let (alice, bob) = (world.user("alice"), world.user("bob"));
    let chat = SessionId::single(&alice, &bob).unwrap();
    route(&world, &alice, 1).await;
    world.chat(&alice, &chat, 0, 2).await;
    // Reads publish nothing: served as usual.
    assert_eq!(world.all_pages(&bob, &chat, false).await, vec![1, 2]);
    // A read that moves the cursor sends a receipt (a push to alice, a message event).
    let status = world
        .mark_read(&bob, &chat.to_string(), 2)
        .await
        .expect_err("kafka down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("kafka"), "{status:?}");
    // The cursor moved before the receipt failed; the client's retry still owes the other
    // members that receipt, so it tries to publish again (and fails again) instead of
    // answering OK with no receipt ever sent.
    let status = world
        .mark_read(&bob, &chat.to_string(), 2)
        .await
        .expect_err("the retry publishes the receipt, and kafka is still down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // A recall announces itself.
    let (message_id,): (uuid::Uuid,) =
        sqlx::query_as("SELECT message_id FROM messages WHERE session_id = $1 AND seq = 1")
            .bind(chat.to_string())
            .fetch_one(&world.postgres)
            .await
            .unwrap();
    let status = world
        .client
        .recall_message(as_user(
            &alice,
            RecallMessageRequest {
                message_id: message_id.to_string(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("kafka down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("kafka"), "{status:?}");
}
