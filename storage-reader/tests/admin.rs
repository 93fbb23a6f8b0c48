//! AdminService over real gRPC against real Redis and the broker: routes stored the way the
//! gateway stores them, RevokeToken and KickDevice, and the push records each gateway node's
//! topic then holds (exact connection ids, close code 1008, the `kicked` reason); the
//! deny-list entry and its TTL; who may call.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use chatify_core::keys;
use chatify_core::routing::Route;
use chatify_e2e::{service_env, unique_name};
use chatify_proto::Message as _;
use chatify_proto::bus::v1::PushRecord;
use chatify_proto::client::v1::server_frame::Frame;
use chatify_proto::storage::v1::admin_service_client::AdminServiceClient;
use chatify_proto::storage::v1::admin_service_server::AdminServiceServer;
use chatify_proto::storage::v1::storage_service_client::StorageServiceClient;
use chatify_proto::storage::v1::storage_service_server::StorageServiceServer;
use chatify_proto::storage::v1::{GetUnreadCountRequest, KickDeviceRequest, RevokeTokenRequest};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use storage_reader::admin::Admin;
use storage_reader::identity::{Gatekeeper, INTERNAL_TOKEN_HEADER};
use storage_reader::notify::{Notifier, now_ms};
use tonic::transport::Channel;
use tonic::{Code, Request};

const SECRET: &str = "admin-test-secret-that-is-long-enough-012345";
const INTERNAL: &str = "admin-internal-token-that-is-long-enough-0123";
const WAIT: Duration = Duration::from_secs(60);
const NODES: [&str; 2] = ["gw-a", "gw-b"];

struct World {
    admin: AdminServiceClient<Channel>,
    storage: StorageServiceClient<Channel>,
    channel: Channel,
    redis: redis::aio::MultiplexedConnection,
    topics: chatify_core::topics::Topics,
    tag: String,
}

fn client_token(user: &str, jti: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": user, "did": "phone", "jti": jti, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn internal<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(INTERNAL_TOKEN_HEADER, INTERNAL.parse().unwrap());
    request
}

fn as_client<T>(user: &str, jti: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", client_token(user, jti))
            .parse()
            .unwrap(),
    );
    request
}

impl World {
    async fn start() -> Self {
        let kafka = service_env("KAFKA_BOOTSTRAP_SERVERS");
        let prefix = unique_name("ad");
        let topics = chatify_core::topics::Topics::new(prefix.clone());
        let admin_client: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &kafka)
            .create()
            .unwrap();
        let names = [topics.push(NODES[0]), topics.push(NODES[1])];
        let specs: Vec<NewTopic<'_>> = names
            .iter()
            .map(|name| NewTopic::new(name, 1, TopicReplication::Fixed(1)))
            .collect();
        for result in admin_client
            .create_topics(&specs, &AdminOptions::new().operation_timeout(Some(WAIT)))
            .await
            .unwrap()
        {
            result.unwrap();
        }
        let redis_client = redis::Client::open(service_env("REDIS_URL")).unwrap();
        let manager = redis::aio::ConnectionManager::new(redis_client.clone())
            .await
            .unwrap();
        let gatekeeper = Gatekeeper::new(
            chatify_core::auth::Authenticator::hs256(SECRET.as_bytes()),
            Some(INTERNAL.to_owned()),
            manager.clone(),
        );
        let notifier = Notifier {
            producer: chatify_core::producer::RenewableProducer::new(
                ClientConfig::new().set("bootstrap.servers", &kafka).clone(),
                "reader",
            )
            .unwrap(),
            topics: topics.clone(),
        };
        let admin = Admin {
            gatekeeper: gatekeeper.clone(),
            redis: manager.clone(),
            notifier: notifier.clone(),
        };
        let postgres = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy(&service_env("POSTGRES_URL"))
            .unwrap();
        let mongo = mongodb::Client::with_uri_str(service_env("MONGO_URL"))
            .await
            .unwrap()
            .database(&prefix.replace('-', "_"));
        let storage = storage_reader::service::Storage {
            gatekeeper,
            postgres,
            redis: manager,
            hot: std::sync::Arc::new(
                storage_reader::hot_redis::HotRedis::with_defaults(&redis_client).unwrap(),
            ),
            mongo: mongo.collection("messages"),
            notifier,
            recall_window_ms: 60_000,
            archive: storage_reader::store::ArchiveStore::Postgres,
            marks_ttl_seconds: 3600,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(storage_reader::reflection_service().unwrap())
                .add_service(AdminServiceServer::new(admin))
                .add_service(StorageServiceServer::new(storage))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            admin: AdminServiceClient::new(channel.clone()),
            storage: StorageServiceClient::new(channel.clone()),
            channel,
            redis: redis_client
                .get_multiplexed_async_connection()
                .await
                .unwrap(),
            topics,
            tag: prefix.replace('-', ""),
        }
    }

    fn user(&self, name: &str) -> String {
        format!("{name}{}", self.tag)
    }

    /// A route stored the way the gateway stores it: `HSET chatify:user:{u} device route`.
    async fn route(&self, user: &str, device: &str, node: &str, connection_id: u64, jti: &str) {
        self.route_active_at(user, device, node, connection_id, jti, now_ms() as u64)
            .await;
    }

    async fn route_active_at(
        &self,
        user: &str,
        device: &str,
        node: &str,
        connection_id: u64,
        jti: &str,
        last_active_ms: u64,
    ) {
        let mut redis = self.redis.clone();
        redis::cmd("HSET")
            .arg(keys::user_routes(user))
            .arg(device)
            .arg(
                Route {
                    node_id: node.into(),
                    connection_id,
                    connected_at_ms: last_active_ms,
                    last_active_ms,
                    token_id: jti.into(),
                }
                .encode(),
            )
            .exec_async(&mut redis)
            .await
            .unwrap();
    }

    /// Every push record on each node's topic, by node (the calls that produced them have
    /// returned, so the broker has them all: read up to the high watermark).
    fn pushes(&self) -> BTreeMap<&'static str, Vec<PushRecord>> {
        let mut out = BTreeMap::new();
        for node in &NODES {
            let topic = self.topics.push(node);
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", service_env("KAFKA_BOOTSTRAP_SERVERS"))
                .set("group.id", unique_name("tap"))
                .create()
                .unwrap();
            let (_, high) = consumer.fetch_watermarks(&topic, 0, WAIT).unwrap();
            let mut list = rdkafka::TopicPartitionList::new();
            list.add_partition_offset(&topic, 0, rdkafka::Offset::Beginning)
                .unwrap();
            consumer.assign(&list).unwrap();
            let mut records = Vec::new();
            let deadline = std::time::Instant::now() + WAIT;
            let mut next = 0;
            while next < high {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{topic}: records missing"
                );
                if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                    next = message.offset() + 1;
                    records
                        .push(PushRecord::decode(message.payload().unwrap_or_default()).unwrap());
                }
            }
            out.insert(*node, records);
        }
        out
    }
}

/// The connection ids each node was told to close with `reason`, sorted; every such record
/// carries close code 1008 and a `kicked` frame.
fn kicked_with(
    pushes: &BTreeMap<&'static str, Vec<PushRecord>>,
    reason: &str,
) -> BTreeMap<&'static str, Vec<u64>> {
    let mut out = BTreeMap::new();
    for (node, records) in pushes {
        for record in records {
            let Some(Frame::Kicked(kicked)) = record.frame.as_ref().and_then(|f| f.frame.as_ref())
            else {
                panic!("not a kick: {record:?}");
            };
            if kicked.reason != reason {
                continue;
            }
            assert_eq!(record.close_code, Some(1008), "{record:?}");
            assert!(record.user_ids.is_empty(), "{record:?}");
            let ids: &mut Vec<u64> = out.entry(*node).or_default();
            ids.extend(&record.connection_ids);
            ids.sort_unstable();
        }
    }
    out
}

#[tokio::test]
async fn revoke_token_denies_it_and_kicks_exactly_its_connections() {
    let mut world = World::start().await;
    let (alice, bob) = (world.user("alice"), world.user("bob"));
    let jti = format!("j1{}", world.tag);
    // Alice's token j1 on two devices on two nodes; another token on a third device; a
    // stale route of j1 (a node that stopped refreshing it); bob (same token id) is not alice.
    world.route(&alice, "phone", "gw-a", 1, &jti).await;
    world.route(&alice, "tablet", "gw-b", 2, &jti).await;
    world.route(&alice, "laptop", "gw-a", 3, "other-jti").await;
    world
        .route_active_at(&alice, "old", "gw-a", 4, &jti, 1_000)
        .await;
    world.route(&bob, "phone", "gw-a", 9, &jti).await;
    // Before: a call with the token works.
    let unread = || GetUnreadCountRequest {
        session_id: format!("p2p:{alice}:{bob}"),
        ..Default::default()
    };
    world
        .storage
        .get_unread_count(as_client(&alice, &jti, unread()))
        .await
        .unwrap();
    let expires_at_ms = now_ms() + 300_000;
    let response = world
        .admin
        .revoke_token(internal(RevokeTokenRequest {
            user_id: alice.clone(),
            token_id: jti.clone(),
            expires_at_ms,
            reason: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.connections_kicked, 2);
    let pushes = world.pushes();
    assert_eq!(
        kicked_with(&pushes, "token revoked"),
        BTreeMap::from([("gw-a", vec![1]), ("gw-b", vec![2])])
    );
    assert_eq!(pushes.values().map(Vec::len).sum::<usize>(), 2);
    // The deny-list entry lives until the token's expiry.
    let mut redis = world.redis.clone();
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(keys::revoked_token(&jti))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(ttl_ms > 290_000 && ttl_ms <= 300_000, "{ttl_ms}");
    // After: the token is refused by the reader as well.
    let refused = world
        .storage
        .get_unread_count(as_client(&alice, &jti, unread()))
        .await
        .expect_err("revoked");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // A token already past its expiry: no live route, still an entry with a positive TTL.
    let late = format!("j-late{}", world.tag);
    let response = world
        .admin
        .revoke_token(internal(RevokeTokenRequest {
            user_id: alice.clone(),
            token_id: late.clone(),
            expires_at_ms: now_ms() - 60_000,
            reason: "late".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.connections_kicked, 0);
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(keys::revoked_token(&late))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(ttl_ms > 0 && ttl_ms <= 1000, "{ttl_ms}");
}

#[tokio::test]
async fn kick_device_closes_one_device_or_all_of_them() {
    let mut world = World::start().await;
    let (alice, bob) = (world.user("alice"), world.user("bob"));
    world.route(&alice, "phone", "gw-a", 11, "ja").await;
    world.route(&alice, "tablet", "gw-b", 12, "jb").await;
    world.route(&alice, "laptop", "gw-a", 13, "jc").await;
    world.route(&bob, "phone", "gw-a", 19, "jd").await;
    let kick = |device: &str, reason: &str| {
        internal(KickDeviceRequest {
            user_id: alice.clone(),
            device_id: device.to_owned(),
            reason: reason.to_owned(),
        })
    };
    let one = world
        .admin
        .kick_device(kick("laptop", "one"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.connections_kicked, 1);
    let none = world
        .admin
        .kick_device(kick("fridge", "none"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.connections_kicked, 0);
    let all = world
        .admin
        .kick_device(kick("", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.connections_kicked, 3);
    let pushes = world.pushes();
    assert_eq!(
        kicked_with(&pushes, "one"),
        BTreeMap::from([("gw-a", vec![13])])
    );
    assert!(kicked_with(&pushes, "none").is_empty());
    assert_eq!(
        kicked_with(&pushes, "device kicked"),
        BTreeMap::from([("gw-a", vec![11, 13]), ("gw-b", vec![12])])
    );
    // One record per node per call: gw-a twice, gw-b once; bob's connection never named.
    assert_eq!(pushes["gw-a"].len(), 2);
    assert_eq!(pushes["gw-b"].len(), 1);
}

#[tokio::test]
async fn only_internal_callers_may_use_it_and_inputs_are_checked() {
    let mut world = World::start().await;
    let alice = world.user("alice");
    let revoke = || RevokeTokenRequest {
        user_id: alice.clone(),
        token_id: "jx".into(),
        expires_at_ms: now_ms() + 60_000,
        reason: String::new(),
    };
    let kick = || KickDeviceRequest {
        user_id: alice.clone(),
        ..Default::default()
    };
    // A client token: PermissionDenied. No credential, or a wrong secret: Unauthenticated.
    let status = world
        .admin
        .revoke_token(as_client(&alice, "jy", revoke()))
        .await
        .expect_err("client");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = world
        .admin
        .kick_device(as_client(&alice, "jy", kick()))
        .await
        .expect_err("client");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = world
        .admin
        .revoke_token(Request::new(revoke()))
        .await
        .expect_err("nobody");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = world
        .admin
        .kick_device(Request::new(kick()))
        .await
        .expect_err("nobody");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let mut wrong = Request::new(kick());
    wrong.metadata_mut().insert(
        INTERNAL_TOKEN_HEADER,
        "not-the-internal-token-but-long-enough-000"
            .parse()
            .unwrap(),
    );
    let status = world.admin.kick_device(wrong).await.expect_err("wrong");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // Refused calls changed nothing.
    let mut redis = world.redis.clone();
    let denied: bool = redis::cmd("EXISTS")
        .arg(keys::revoked_token("jx"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!denied);
    // Inputs.
    for (request, what) in [
        (
            RevokeTokenRequest {
                user_id: String::new(),
                ..revoke()
            },
            "user_id",
        ),
        (
            RevokeTokenRequest {
                token_id: String::new(),
                ..revoke()
            },
            "token_id",
        ),
        (
            RevokeTokenRequest {
                token_id: "t".repeat(1000),
                ..revoke()
            },
            "token_id",
        ),
    ] {
        let status = world
            .admin
            .revoke_token(internal(request))
            .await
            .expect_err("bad input");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(what), "{status:?}");
    }
    let status = world
        .admin
        .kick_device(internal(KickDeviceRequest {
            user_id: "no spaces".into(),
            ..Default::default()
        }))
        .await
        .expect_err("bad user");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("user_id"), "{status:?}");
}

#[tokio::test]
async fn reflection_lists_the_admin_service() {
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
    assert!(
        list.service
            .iter()
            .any(|service| service.name == "chatify.storage.v1.AdminService"),
        "{list:?}"
    );
}
