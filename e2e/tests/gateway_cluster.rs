//! gateway-uring as a member of the cluster (issue 6), black-box: the real gateway,
//! storage-writer and storage-reader binaries against the real broker, Redis, Postgres and
//! Mongo. Clients talk WebSocket (JSON) and TCP (protobuf), as apps do.

use std::time::Duration;

use chatify_e2e::stack::{
    Closed, Stack, StackOptions, TcpClient, TopicTail, WsClient, produce, produce_to, routes_of,
    token,
};
use chatify_proto::Message as _;
use chatify_proto::bus::v1::{PushRecord, UserEvent, user_event};
use chatify_proto::client::v1::{self as client, server_frame};
use serde_json::json;

fn two_nodes() -> StackOptions {
    StackOptions {
        nodes: vec!["gw-a".into(), "gw-b".into()],
        ..StackOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_on_one_gateway_chat_through_kafka_and_the_writer() {
    let stack = Stack::start(StackOptions::default()).await;
    let gateway = &stack.gateways[0];
    let (alice, bob) = (stack.user("alice"), stack.user("bob"));
    let mut a = WsClient::connect(gateway, &token(&alice, "phone").0).await;
    let mut b = WsClient::connect(gateway, &token(&bob, "phone").0).await;

    a.send_to(&bob, "c1", "hello bob").await;
    let ack = a.next_of("ack").await;
    assert_eq!(ack["client_msg_id"], "c1", "{ack}");
    assert_eq!(ack["seq"], 1, "{ack}");
    let session = ack["session_id"].as_str().expect("session").to_owned();
    let deliver = b.next_of("deliver").await;
    let message = &deliver["message"];
    assert_eq!(message["message_id"], ack["message_id"]);
    assert_eq!(message["seq"], 1);
    assert_eq!(message["sender_id"], alice.as_str());
    assert_eq!(message["content"], "hello bob");
    assert_eq!(message["session_id"], session.as_str());

    b.send_to(&alice, "c1", "hi alice").await;
    let ack = b.next_of("ack").await;
    assert_eq!(ack["seq"], 2, "{ack}");
    let deliver = a.next_of("deliver").await;
    assert_eq!(deliver["message"]["content"], "hi alice");
    assert_eq!(deliver["message"]["seq"], 2);

    // A resend of the same client_msg_id gets the original ack, not a new message.
    a.send_to(&bob, "c1", "hello bob").await;
    let again = a.next_of("ack").await;
    assert_eq!(again["seq"], 1, "{again}");
    assert!(
        b.try_next_of("deliver", Duration::from_secs(2))
            .await
            .is_none(),
        "a resend was delivered again"
    );

    // A TCP client (protobuf) of the same user gets the next delivery too, in protobuf.
    let mut a_tcp = TcpClient::connect(gateway, &token(&alice, "desktop").0).await;
    b.send_to(&alice, "c2", "to both of alice's devices").await;
    let tcp_seq = a_tcp
        .next_matching(|frame| match frame {
            server_frame::Frame::Deliver(deliver) => deliver.message.as_ref().map(|m| m.seq),
            _ => None,
        })
        .await;
    assert_eq!(tcp_seq, 3);
    assert_eq!(a.next_of("deliver").await["message"]["seq"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_two_gateways_and_every_device_receive() {
    let stack = Stack::start(two_nodes()).await;
    let (gw_a, gw_b) = (&stack.gateways[0], &stack.gateways[1]);
    let (alice, bob) = (stack.user("alice"), stack.user("bob"));
    let mut alice_phone = WsClient::connect(gw_a, &token(&alice, "phone").0).await;
    let mut alice_laptop = WsClient::connect(gw_b, &token(&alice, "laptop").0).await;
    let mut bob_phone = WsClient::connect(gw_b, &token(&bob, "phone").0).await;
    let mut bob_tablet = WsClient::connect(gw_a, &token(&bob, "tablet").0).await;

    for n in 1..=5 {
        alice_phone
            .send_to(&bob, &format!("m{n}"), &format!("message {n}"))
            .await;
    }
    let mut acked = Vec::new();
    for _ in 1..=5 {
        acked.push(
            alice_phone.next_of("ack").await["seq"]
                .as_u64()
                .expect("seq"),
        );
    }
    acked.sort_unstable();
    assert_eq!(acked, vec![1, 2, 3, 4, 5]);
    // Both of bob's devices, on both gateways, get all five in seq order; so does the
    // sender's other device.
    for device in [&mut bob_phone, &mut bob_tablet, &mut alice_laptop] {
        let mut seqs = Vec::new();
        for _ in 1..=5 {
            seqs.push(
                device.next_of("deliver").await["message"]["seq"]
                    .as_u64()
                    .expect("seq"),
            );
        }
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    }
    // The sending connection gets its ack, not a copy of its own message.
    assert!(
        alice_phone
            .try_next_of("deliver", Duration::from_secs(1))
            .await
            .is_none()
    );
    // Routes: one per device, pointing at the right node.
    let routes = routes_of(&bob).await;
    assert_eq!(routes["phone"].node_id, gw_b.node_id);
    assert_eq!(routes["tablet"].node_id, gw_a.node_id);
    bob_phone.close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !routes_of(&bob).await.contains_key("phone"),
        "route removed on close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_read_and_recall_are_answered_by_the_reader() {
    let stack = Stack::start(StackOptions::default()).await;
    let gateway = &stack.gateways[0];
    let (alice, bob, carol) = (stack.user("alice"), stack.user("bob"), stack.user("carol"));
    let mut a = WsClient::connect(gateway, &token(&alice, "phone").0).await;
    for n in 1..=3 {
        a.send_to(&bob, &format!("s{n}"), &format!("offline {n}"))
            .await;
        a.next_of("ack").await;
    }
    let session = format!("p2p:{}", {
        let mut pair = [alice.clone(), bob.clone()];
        pair.sort();
        pair.join(":")
    });
    // bob was offline: he syncs from 0 and gets all three in order.
    let mut b = WsClient::connect(gateway, &token(&bob, "phone").0).await;
    b.send(json!({"type": "sync", "session_id": session, "after_seq": 0, "limit": 50, "request_id": "r1"}))
        .await;
    let page = b.next_of("messages").await;
    assert_eq!(page["request_id"], "r1", "{page}");
    let contents: Vec<_> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(contents, ["offline 1", "offline 2", "offline 3"]);
    // After seq 2 only the third.
    b.send(json!({"type": "sync", "session_id": session, "after_seq": 2, "request_id": "r2"}))
        .await;
    let page = b.next_of("messages").await;
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(1));

    // bob reads: alice gets a receipt.
    b.send(json!({"type": "read", "session_id": session, "seq": 3}))
        .await;
    let receipt = a.next_of("read_receipt").await;
    assert_eq!(receipt["user_id"], bob.as_str());
    assert_eq!(receipt["seq"], 3);

    // alice recalls her last message: both get `recalled`; bob may not recall it.
    let last = page["messages"][0]["message_id"].clone();
    b.send(json!({"type": "recall", "message_id": last, "request_id": "not-mine"}))
        .await;
    let refused = b.next_of("error").await;
    assert_eq!(refused["request_id"], "not-mine", "{refused}");
    assert_eq!(refused["code"], "forbidden", "{refused}");
    a.send(json!({"type": "recall", "message_id": last, "request_id": "rc"}))
        .await;
    for client in [&mut a, &mut b] {
        let recalled = client.next_of("recalled").await;
        assert_eq!(recalled["message_id"], last);
        assert_eq!(recalled["seq"], 3);
    }

    // A stranger may not sync someone else's chat: the reader's PermissionDenied arrives
    // as `forbidden` with the request id.
    let mut c = WsClient::connect(gateway, &token(&carol, "phone").0).await;
    c.send(json!({"type": "sync", "session_id": session, "after_seq": 0, "request_id": "snoop"}))
        .await;
    let refused = c.next_of("error").await;
    assert_eq!(refused["request_id"], "snoop");
    assert_eq!(refused["code"], "forbidden", "{refused}");
}

/// Presence events of `user` until `count` have arrived (or 30 s passed).
async fn wait_presence(tail: &TopicTail, user: &str, count: usize) -> Vec<user_event::Kind> {
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < count && std::time::Instant::now() < deadline {
        seen.extend(presence_events(
            &tail.collect(Duration::from_secs(1)).await,
            user,
        ));
    }
    seen
}

fn presence_events(records: &[(String, Vec<u8>)], user: &str) -> Vec<user_event::Kind> {
    records
        .iter()
        .filter(|(key, _)| key == user)
        .map(|(_, payload)| UserEvent::decode(payload.as_slice()).expect("user event"))
        .map(|event| event.kind())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_online_once_and_offline_only_after_the_grace_period() {
    let stack = Stack::start(two_nodes()).await;
    let tail = TopicTail::new(&stack.bootstrap_servers, &stack.topic("user-events"));
    let alice = stack.user("alice");
    let phone = WsClient::connect(&stack.gateways[0], &token(&alice, "phone").0).await;
    // A second device on another gateway: still one `online`.
    let laptop = WsClient::connect(&stack.gateways[1], &token(&alice, "laptop").0).await;
    phone.close().await;
    laptop.close().await;
    // A quick reconnect inside the 1.5 s grace period: no offline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = WsClient::connect(&stack.gateways[1], &token(&alice, "laptop").0).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut seen = wait_presence(&tail, &alice, 1).await;
    seen.extend(presence_events(
        &tail.collect(Duration::from_secs(3)).await,
        &alice,
    ));
    assert_eq!(seen, vec![user_event::Kind::Online], "{}", stack.logs());
    // Gone for good: offline after the grace period, once.
    again.close().await;
    let mut seen = wait_presence(&tail, &alice, 1).await;
    seen.extend(presence_events(
        &tail.collect(Duration::from_secs(3)).await,
        &alice,
    ));
    assert_eq!(seen, vec![user_event::Kind::Offline]);
}

fn kick_record(connection_ids: Vec<u64>, reason: &str) -> Vec<u8> {
    PushRecord {
        connection_ids,
        user_ids: vec![],
        frame: Some(client::ServerFrame {
            frame: Some(server_frame::Frame::Kicked(client::Kicked {
                reason: reason.into(),
            })),
        }),
        close_code: Some(1008),
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_closes_that_device_with_1008_and_a_newer_connection_replaces_an_older() {
    let stack = Stack::start(StackOptions::default()).await;
    let gateway = &stack.gateways[0];
    let alice = stack.user("alice");
    let mut phone = WsClient::connect(gateway, &token(&alice, "phone").0).await;
    let mut laptop = WsClient::connect(gateway, &token(&alice, "laptop").0).await;
    let route = routes_of(&alice)
        .await
        .remove("phone")
        .expect("phone route");
    // What storage-reader's AdminService publishes for a revoked token.
    produce(
        &stack.bootstrap_servers,
        &stack.topic(&format!("push.{}", gateway.node_id)),
        "k",
        &kick_record(vec![route.connection_id], "token revoked"),
    )
    .await;
    let kicked = phone.next_of("kicked").await;
    assert_eq!(kicked["reason"], "token revoked");
    assert_eq!(
        phone.closed().await,
        Closed::Frame(1008, "token revoked".into())
    );
    // The other device is untouched.
    laptop.send(json!({"type": "ping", "timestamp": 7})).await;
    assert_eq!(laptop.next_of("pong").await["timestamp"], 7);

    // The same device connecting again closes its older connection.
    let _newer = WsClient::connect(gateway, &token(&alice, "laptop").0).await;
    assert_eq!(
        laptop.closed().await,
        Closed::Frame(1008, "replaced by a newer connection of this device".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_for_a_connection_that_has_gone_is_dropped_and_counted() {
    let stack = Stack::start(StackOptions {
        reader: false,
        writer: false,
        ..StackOptions::default()
    })
    .await;
    let gateway = &stack.gateways[0];
    let alice = stack.user("alice");
    let mut live = WsClient::connect(gateway, &token(&alice, "phone").0).await;
    let live_id = routes_of(&alice).await["phone"].connection_id;
    let before = gateway
        .service
        .metric("chatify_gateway_pushes_total{outcome=\"gone\"}")
        .await;
    let pong = |timestamp| PushRecord {
        connection_ids: vec![live_id ^ 1, (7_u64 << 56) | 1, live_id],
        user_ids: vec![],
        frame: Some(client::ServerFrame {
            frame: Some(server_frame::Frame::Pong(client::Pong {
                timestamp: Some(timestamp),
            })),
        }),
        close_code: None,
    };
    let topic = stack.topic(&format!("push.{}", gateway.node_id));
    produce(&stack.bootstrap_servers, &topic, "k", b"not a push record").await;
    produce(
        &stack.bootstrap_servers,
        &topic,
        "k",
        &pong(42).encode_to_vec(),
    )
    .await;
    // The live target still gets its frame.
    assert_eq!(live.next_of("pong").await["timestamp"], 42);
    let after = gateway
        .service
        .metric("chatify_gateway_pushes_total{outcome=\"gone\"}")
        .await;
    assert_eq!(
        after - before,
        1.0,
        "one unknown connection on a known shard"
    );
    assert!(
        gateway
            .service
            .metric("chatify_gateway_push_dropped_total{reason=\"unknown_shard\"}")
            .await
            >= 1.0
    );
    assert!(
        gateway
            .service
            .metric("chatify_gateway_push_dropped_total{reason=\"undecodable\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_clears_the_routes_its_crash_left() {
    let mut stack = Stack::start(StackOptions {
        reader: false,
        writer: false,
        ..StackOptions::default()
    })
    .await;
    let tail = TopicTail::new(&stack.bootstrap_servers, &stack.topic("user-events"));
    let alice = stack.user("alice");
    let phone = WsClient::connect(&stack.gateways[0], &token(&alice, "phone").0).await;
    assert!(routes_of(&alice).await.contains_key("phone"));
    // Presence events are best effort: one not yet handed to the broker dies with a
    // killed node, so wait for `online` before the kill.
    let seen = wait_presence(&tail, &alice, 1).await;
    assert_eq!(seen, vec![user_event::Kind::Online]);
    stack.gateways[0].service.kill();
    drop(phone);
    assert!(
        routes_of(&alice).await.contains_key("phone"),
        "a kill -9 leaves the route"
    );
    stack.gateways[0].service.restart();
    stack.gateways[0].service.wait_ready().await;
    // The bridge clears at its first request; a connection of someone else makes one.
    let bob = stack.user("bob");
    let mut other = WsClient::connect(&stack.gateways[0], &token(&bob, "phone").0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !routes_of(&alice).await.contains_key("phone"),
        "{}",
        stack.logs()
    );
    let seen = wait_presence(&tail, &alice, 1).await;
    assert_eq!(seen, vec![user_event::Kind::Offline]);

    // The restarted node, ready, consumes every partition of its push topic: the group
    // member of its killed run holds none of them, and nothing produced after `/readyz`
    // turned green is skipped.
    let bob_id = routes_of(&bob).await["phone"].connection_id;
    let topic = stack.topic(&format!("push.{}", stack.gateways[0].node_id));
    for partition in 0..2 {
        let record = PushRecord {
            connection_ids: vec![bob_id],
            user_ids: vec![],
            frame: Some(client::ServerFrame {
                frame: Some(server_frame::Frame::Pong(client::Pong {
                    timestamp: Some(i64::from(partition)),
                })),
            }),
            close_code: None,
        };
        produce_to(
            &stack.bootstrap_servers,
            &topic,
            Some(partition),
            "k",
            &record.encode_to_vec(),
        )
        .await;
    }
    let mut partitions = vec![
        other.next_of("pong").await["timestamp"].clone(),
        other.next_of("pong").await["timestamp"].clone(),
    ];
    partitions.sort_by_key(|timestamp| timestamp.as_i64());
    assert_eq!(partitions, vec![json!(0), json!(1)], "{}", stack.logs());
}

/// A private broker for this test only: tansu on its own port and SQLite file, reached
/// (bootstrap and advertised address) only through a TCP proxy, so the test can cut the
/// broker off from the gateway and the writer without touching the shared broker.
struct PrivateBroker {
    child: std::process::Child,
    dir: std::path::PathBuf,
    proxy: chatify_e2e::TcpProxy,
}

impl PrivateBroker {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(chatify_e2e::unique_name("tansu"));
        std::fs::create_dir_all(&dir).expect("broker dir");
        let port = chatify_e2e::free_local_addr().port();
        let proxy = chatify_e2e::TcpProxy::start(&format!("127.0.0.1:{port}"))
            .await
            .expect("proxy");
        let tansu = std::env::var("HOME")
            .map(|home| std::path::PathBuf::from(home).join(".cargo/bin/tansu"))
            .ok()
            .filter(|path| path.is_file())
            .unwrap_or_else(|| "tansu".into());
        let listener = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://{}", proxy.addr());
        let log = std::fs::File::create(dir.join("tansu.log")).expect("log");
        let child = std::process::Command::new(tansu)
            .current_dir(&dir)
            .env("RUST_LOG", "warn")
            .env_remove("ADVERTISED_LISTENER_URL")
            .args([
                "broker",
                "--cluster-id",
                "private",
                "--listener-url",
                &listener,
            ])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tansu (scripts/services.sh installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "tansu did not listen");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self { child, dir, proxy }
    }

    fn bootstrap(&self) -> String {
        self.proxy.addr().to_string()
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_down_sends_get_unavailable_and_recover_after() {
    let broker = PrivateBroker::start().await;
    let stack = Stack::start(StackOptions {
        reader: false,
        kafka_bootstrap_servers: Some(broker.bootstrap()),
        // The default, idempotent producer: tansu 0.6 cannot bump the epoch of an
        // idempotent producer whose records timed out (every later produce fails with an
        // unknown broker error), so the gateway recovers by replacing its producer
        // (upstream.rs); Apache Kafka would recover the old one (KIP-360).
        gateway_env: vec![("CHATIFY_UPSTREAM_TIMEOUT_MS".into(), "2000".into())],
        ..StackOptions::default()
    })
    .await;
    let gateway = &stack.gateways[0];
    let (alice, bob) = (stack.user("alice"), stack.user("bob"));
    let mut a = WsClient::connect(gateway, &token(&alice, "phone").0).await;
    a.send_to(&bob, "before", "while the broker is up").await;
    assert_eq!(a.next_of("ack").await["seq"], 1);

    broker.proxy.set_down();
    a.send_to(&bob, "during", "while the broker is down").await;
    let refused = a.next_of("error").await;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    assert_eq!(refused["client_msg_id"], "during");
    // Nothing hangs: the connection still answers.
    a.send(json!({"type": "ping", "timestamp": 1})).await;
    assert_eq!(a.next_of("pong").await["timestamp"], 1);

    broker.proxy.set_up();
    // The client resends (same client_msg_id) once the broker is back.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let ack = loop {
        a.send_to(&bob, "during", "while the broker is down").await;
        if let Some(ack) = a.try_next_of("ack", Duration::from_secs(5)).await {
            break ack;
        }
        let _ = a.drain_of("error", Duration::from_millis(10)).await;
        assert!(
            std::time::Instant::now() < deadline,
            "no ack after the broker returned: {}",
            stack.logs()
        );
    };
    assert_eq!(ack["client_msg_id"], "during");
    assert_eq!(ack["seq"], 2, "{ack}");
    // A new connection works too.
    let mut again = WsClient::connect(gateway, &token(&alice, "laptop").0).await;
    again.send(json!({"type": "ping", "timestamp": 2})).await;
    assert_eq!(again.next_of("pong").await["timestamp"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_through_the_reader_closes_its_connection_and_refuses_it_after() {
    use chatify_proto::storage::v1::RevokeTokenRequest;
    use chatify_proto::storage::v1::admin_service_client::AdminServiceClient;
    let stack = Stack::start(StackOptions::default()).await;
    let gateway = &stack.gateways[0];
    let alice = stack.user("alice");
    let (phone_token, phone_jti) = token(&alice, "phone");
    let mut phone = WsClient::connect(gateway, &phone_token).await;
    let mut laptop = WsClient::connect(gateway, &token(&alice, "laptop").0).await;
    let grpc = stack.reader_grpc.expect("reader");
    let mut admin = AdminServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("reader grpc");
    let mut request = tonic::Request::new(RevokeTokenRequest {
        user_id: alice.clone(),
        token_id: phone_jti,
        // When the token would expire anyway (an hour from now, as `token` mints it).
        expires_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64
            + 3_600_000,
        reason: String::new(),
    });
    request.metadata_mut().insert(
        "x-chatify-internal-token",
        chatify_e2e::stack::INTERNAL_TOKEN.parse().expect("ascii"),
    );
    let kicked = admin
        .revoke_token(request)
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(kicked.connections_kicked, 1);
    assert_eq!(phone.next_of("kicked").await["reason"], "token revoked");
    assert_eq!(
        phone.closed().await,
        Closed::Frame(1008, "token revoked".into())
    );
    // The same token is refused at the upgrade; the other device stays.
    assert_eq!(
        WsClient::refused_status(&gateway.ws_url(&phone_token)).await,
        401
    );
    laptop.send(json!({"type": "ping", "timestamp": 3})).await;
    assert_eq!(laptop.next_of("pong").await["timestamp"], 3);
}
