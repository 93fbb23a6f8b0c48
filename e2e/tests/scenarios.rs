//! Whole-system scenarios of issue 8, black-box: the real gateway, storage-writer and
//! storage-reader binaries against the real broker, Redis, Postgres and Mongo, driven only
//! as clients (WebSocket JSON, TCP protobuf) and operators (the reader's gRPC) do. What
//! `gateway_cluster.rs` already covers (kicks, revocation, presence, broker outage) is not
//! repeated here. Every test has its own stack (topic prefix, node ids, user ids), so they
//! run in parallel.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chatify_e2e::service_env;
use chatify_e2e::stack::{
    Closed, FRAME_WAIT, Gateway, Stack, StackOptions, TcpClient, WsClient, internal_request,
    p2p_session, token, token_with,
};
use chatify_proto::Message as _;
use chatify_proto::client::v1::{self as client, client_frame, server_frame};
use chatify_proto::storage::v1::group_service_client::GroupServiceClient;
use chatify_proto::storage::v1::storage_service_client::StorageServiceClient;
use chatify_proto::storage::v1::{
    CreateGroupRequest, Direction, GetUnreadCountRequest, ListSessionsRequest,
    QueryMessagesRequest, SeqRange, query_messages_request,
};
use futures::TryStreamExt as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message as WsMessage;

fn default_gateway_env() -> Vec<(String, String)> {
    StackOptions::default().gateway_env
}

async fn postgres() -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&service_env("POSTGRES_URL"))
        .await
        .expect("connect to postgres")
}

fn mongo_messages(client: &mongodb::Client) -> mongodb::Collection<mongodb::bson::Document> {
    client.database("chatify").collection("messages")
}

async fn mongo() -> mongodb::Client {
    mongodb::Client::with_uri_str(service_env("MONGO_URL"))
        .await
        .expect("mongo client")
}

/// Stored rows (message_id, seq, session_id) of one (sender, client_msg_id).
async fn stored(
    pg: &sqlx::PgPool,
    sender: &str,
    client_msg_id: &str,
) -> Vec<(String, i64, String)> {
    sqlx::query_as(
        "SELECT message_id::text, seq, session_id FROM messages \
         WHERE sender_id = $1 AND client_msg_id = $2",
    )
    .bind(sender)
    .bind(client_msg_id)
    .fetch_all(pg)
    .await
    .expect("query messages")
}

/// Mongo documents (_id, seq) of one (sender, client_msg_id).
async fn stored_in_mongo(
    mongo: &mongodb::Client,
    sender: &str,
    client_msg_id: &str,
) -> Vec<(String, i64)> {
    let documents: Vec<mongodb::bson::Document> = mongo_messages(mongo)
        .find(mongodb::bson::doc! {"sender_id": sender, "client_msg_id": client_msg_id})
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("documents");
    documents
        .iter()
        .map(|document| {
            (
                document.get_str("_id").expect("_id").to_owned(),
                document.get_i64("seq").expect("seq"),
            )
        })
        .collect()
}

fn seq_of(frame: &Value) -> u64 {
    frame["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no seq in {frame}"))
}

fn tcp_send(client_msg_id: &str, receiver: &str, content: &str) -> client_frame::Frame {
    client_frame::Frame::Send(client::Send {
        client_msg_id: client_msg_id.into(),
        receiver_id: Some(receiver.into()),
        session_id: None,
        message_type: client::MessageType::Text as i32,
        content: content.into(),
        burn_after_seconds: None,
        request_id: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_json_user_and_a_tcp_protobuf_user_chat_read_and_recall() {
    let stack = Stack::start(StackOptions::default()).await;
    let gateway = &stack.gateways[0];
    let (alice, bob) = (stack.user("alice"), stack.user("bob"));
    let session = p2p_session(&alice, &bob);
    let mut a = WsClient::connect(gateway, &token(&alice, "phone").0).await;
    let mut b = TcpClient::connect(gateway, &token(&bob, "desktop").0).await;

    // alice (JSON) -> bob (protobuf): acks carry message_id and seq, deliveries come in seq
    // order with the acked ids.
    for n in 1..=3 {
        a.send_to(&bob, &format!("w{n}"), &format!("from json {n}"))
            .await;
    }
    let mut acked = BTreeMap::new();
    for _ in 1..=3 {
        let ack = a.next_of("ack").await;
        assert_eq!(ack["session_id"], session.as_str(), "{ack}");
        let message_id = ack["message_id"].as_str().expect("message_id").to_owned();
        uuid::Uuid::parse_str(&message_id).expect("message_id is a uuid");
        acked.insert(seq_of(&ack), (ack["client_msg_id"].clone(), message_id));
    }
    assert_eq!(acked.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
    for expected in 1..=3_u64 {
        let message = b
            .next_matching(|frame| match frame {
                server_frame::Frame::Deliver(deliver) => deliver.message.clone(),
                _ => None,
            })
            .await;
        assert_eq!(message.seq, expected, "deliveries in seq order");
        assert_eq!(message.message_id, acked[&expected].1);
        assert_eq!(message.sender_id, alice);
        assert_eq!(message.content, format!("from json {expected}"));
    }

    // bob reads (protobuf): alice gets the receipt (JSON). (Before bob sends: a sender's
    // own message moves their read cursor past it.)
    b.send(client_frame::Frame::Read(client::Read {
        session_id: session.clone(),
        seq: 3,
        request_id: None,
    }))
    .await;
    let Some(receipt) = a.try_next_of("read_receipt", FRAME_WAIT).await else {
        let answer = b
            .next_matching(|frame| match frame {
                server_frame::Frame::Error(error) => Some(error.clone()),
                _ => None,
            })
            .await;
        panic!("no read_receipt for alice; bob's read was answered {answer:?}");
    };
    assert_eq!(
        (&receipt["user_id"], &receipt["seq"]),
        (&json!(bob), &json!(3))
    );
    // bob (protobuf) -> alice (JSON).
    b.send(tcp_send("t1", &alice, "from protobuf")).await;
    let ack = b
        .next_matching(|frame| match frame {
            server_frame::Frame::Ack(ack) => Some(ack.clone()),
            _ => None,
        })
        .await;
    assert_eq!((ack.client_msg_id.as_str(), ack.seq), ("t1", 4));
    assert_eq!(ack.session_id, session);
    let deliver = a.next_of("deliver").await;
    assert_eq!(deliver["message"]["message_id"], ack.message_id.as_str());
    assert_eq!(deliver["message"]["seq"], 4);
    assert_eq!(deliver["message"]["sender_id"], bob.as_str());
    assert_eq!(deliver["message"]["content"], "from protobuf");

    // alice reads: bob gets the receipt in protobuf.
    a.send(json!({"type": "read", "session_id": session, "seq": 4}))
        .await;
    let receipt = b
        .next_matching(|frame| match frame {
            server_frame::Frame::ReadReceipt(receipt) if receipt.user_id == alice => {
                Some(receipt.clone())
            }
            _ => None,
        })
        .await;
    assert_eq!(
        (receipt.session_id.as_str(), receipt.seq),
        (session.as_str(), 4)
    );

    // alice recalls her first message: `recalled` on both transports.
    let first = acked[&1].1.clone();
    a.send(json!({"type": "recall", "message_id": first, "request_id": "rc"}))
        .await;
    let recalled = a.next_of("recalled").await;
    assert_eq!(
        (&recalled["message_id"], &recalled["seq"]),
        (&json!(first), &json!(1))
    );
    let recalled = b
        .next_matching(|frame| match frame {
            server_frame::Frame::Recalled(recalled) => Some(recalled.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        (recalled.message_id.as_str(), recalled.seq),
        (first.as_str(), 1)
    );

    // bob's sync (protobuf) shows the tombstone and the rest, in order.
    b.send(client_frame::Frame::Sync(client::Sync {
        session_id: session.clone(),
        after_seq: 0,
        limit: 50,
        request_id: Some("s".into()),
    }))
    .await;
    let page = b
        .next_matching(|frame| match frame {
            server_frame::Frame::Messages(page) => Some(page.clone()),
            _ => None,
        })
        .await;
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert!(page.messages[0].recalled && page.messages[0].content.is_empty());
    assert!(!page.messages[1].recalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_user_syncs_a_hundred_messages_from_its_last_seq_in_order() {
    const OFFLINE_MESSAGES: usize = 100;
    let mut gateway_env = default_gateway_env();
    // The hundred go out at once: a burst above the default per-user allowance.
    gateway_env.push(("CHATIFY_SEND_BURST".into(), "500".into()));
    let stack = Stack::start(StackOptions {
        gateway_env,
        ..StackOptions::default()
    })
    .await;
    let gateway = &stack.gateways[0];
    let (alice, bob) = (stack.user("alice"), stack.user("bob"));
    let session = p2p_session(&alice, &bob);
    let mut a = WsClient::connect(gateway, &token(&alice, "phone").0).await;
    let mut b = WsClient::connect(gateway, &token(&bob, "phone").0).await;
    a.send_to(&bob, "before", "while bob is online").await;
    a.next_of("ack").await;
    let last_seen = seq_of(&b.next_of("deliver").await["message"]);
    assert_eq!(last_seen, 1);
    b.close().await;

    for n in 0..OFFLINE_MESSAGES {
        a.send_to(&bob, &format!("off-{n}"), &format!("offline {n}"))
            .await;
    }
    let mut acked: HashMap<String, (String, u64)> = HashMap::new();
    for _ in 0..OFFLINE_MESSAGES {
        let ack = a.next_of("ack").await;
        let client_msg_id = ack["client_msg_id"].as_str().expect("id").to_owned();
        let message_id = ack["message_id"].as_str().expect("id").to_owned();
        assert!(
            acked
                .insert(client_msg_id, (message_id, seq_of(&ack)))
                .is_none(),
            "one ack per message"
        );
    }

    // bob comes back and syncs from the last seq he saw, in pages.
    let mut b = WsClient::connect(gateway, &token(&bob, "phone").0).await;
    let synced = b.sync_all(&session, last_seen, 30).await;
    let seqs: Vec<u64> = synced.iter().map(seq_of).collect();
    let expected: Vec<u64> = (2..=OFFLINE_MESSAGES as u64 + 1).collect();
    assert_eq!(seqs, expected, "all of them, in order, no duplicates");
    for message in &synced {
        let content = message["content"].as_str().expect("content");
        let n = content.strip_prefix("offline ").expect("offline content");
        let (message_id, seq) = &acked[&format!("off-{n}")];
        assert_eq!(message["message_id"], message_id.as_str());
        assert_eq!(message["seq"], *seq);
        assert_eq!(message["sender_id"], alice.as_str());
    }
    // Nothing sent while he was away is pushed to him now.
    assert!(
        b.try_next_of("deliver", Duration::from_secs(1))
            .await
            .is_none()
    );
}

async fn storage_client(stack: &Stack) -> StorageServiceClient<tonic::transport::Channel> {
    let grpc = stack.reader_grpc.expect("reader");
    StorageServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("reader grpc")
}

async fn unread(
    storage: &mut StorageServiceClient<tonic::transport::Channel>,
    user: &str,
    session: &str,
) -> u64 {
    storage
        .get_unread_count(internal_request(
            user,
            GetUnreadCountRequest {
                user_id: user.into(),
                session_id: session.into(),
            },
        ))
        .await
        .expect("GetUnreadCount")
        .into_inner()
        .unread_count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_on_one_device_updates_unread_on_the_other_gateway() {
    let stack = Stack::start(StackOptions {
        nodes: vec!["gw-a".into(), "gw-b".into()],
        ..StackOptions::default()
    })
    .await;
    let (gw_a, gw_b) = (&stack.gateways[0], &stack.gateways[1]);
    let (alice, bob) = (stack.user("alice"), stack.user("bob"));
    let session = p2p_session(&alice, &bob);
    let mut alice_phone = WsClient::connect(gw_a, &token(&alice, "phone").0).await;
    let mut bob_phone = WsClient::connect(gw_a, &token(&bob, "phone").0).await;
    let mut bob_laptop = WsClient::connect(gw_b, &token(&bob, "laptop").0).await;
    for n in 1..=5 {
        alice_phone
            .send_to(&bob, &format!("m{n}"), &format!("message {n}"))
            .await;
        alice_phone.next_of("ack").await;
    }
    for device in [&mut bob_phone, &mut bob_laptop] {
        // Five deliveries however slow the gateway (each waits up to FRAME_WAIT), then
        // nothing more: a duplicate would arrive with them.
        let mut seqs = Vec::new();
        for _ in 1..=5 {
            seqs.push(seq_of(&device.next_of("deliver").await["message"]));
        }
        seqs.extend(
            device
                .drain_of("deliver", Duration::from_secs(2))
                .await
                .iter()
                .map(|deliver| seq_of(&deliver["message"])),
        );
        assert_eq!(seqs, [1, 2, 3, 4, 5], "each device gets each message once");
    }
    let mut storage = storage_client(&stack).await;
    assert_eq!(unread(&mut storage, &bob, &session).await, 5);

    // bob reads up to 3 on his phone (gateway a): his laptop (gateway b) is told, alice
    // gets the receipt, and the unread count the laptop would show is 2.
    bob_phone
        .send(json!({"type": "read", "session_id": session, "seq": 3}))
        .await;
    for device in [&mut bob_laptop, &mut alice_phone] {
        let receipt = device.next_of("read_receipt").await;
        assert_eq!(receipt["user_id"], bob.as_str());
        assert_eq!(receipt["seq"], 3);
        assert_eq!(receipt["session_id"], session.as_str());
    }
    assert_eq!(unread(&mut storage, &bob, &session).await, 2);
    let sessions = storage
        .list_sessions(internal_request(
            &bob,
            ListSessionsRequest {
                user_id: bob.clone(),
                limit: 10,
                cursor: String::new(),
            },
        ))
        .await
        .expect("ListSessions")
        .into_inner()
        .sessions;
    let summary = sessions
        .iter()
        .find(|summary| summary.session_id == session)
        .expect("the chat is listed");
    assert_eq!(
        (summary.last_seq, summary.read_seq, summary.unread_count),
        (5, 3, 2)
    );

    // Reading on the laptop moves it for the phone too.
    bob_laptop
        .send(json!({"type": "read", "session_id": session, "seq": 5}))
        .await;
    // (The phone may first get the receipt of its own read.)
    loop {
        let receipt = bob_phone.next_of("read_receipt").await;
        assert_eq!(receipt["user_id"], bob.as_str());
        if receipt["seq"] == 5 {
            break;
        }
        assert_eq!(receipt["seq"], 3, "{receipt}");
    }
    assert_eq!(unread(&mut storage, &bob, &session).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_a_thousand_over_two_gateways_delivers_once_to_the_online_tenth() {
    const MEMBERS: usize = 1_000;
    const ONLINE: usize = 100;
    const MESSAGES: u64 = 3;
    let stack = Stack::start(StackOptions {
        nodes: vec!["gw-a".into(), "gw-b".into()],
        ..StackOptions::default()
    })
    .await;
    let members: Vec<String> = (0..MEMBERS)
        .map(|index| stack.user(&format!("m{index}")))
        .collect();
    let owner = &members[0];
    let grpc = stack.reader_grpc.expect("reader");
    let mut groups = GroupServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("reader grpc");
    let session = groups
        .create_group(internal_request(
            owner,
            CreateGroupRequest {
                user_id: owner.clone(),
                name: "a thousand".into(),
                member_ids: members[1..].to_vec(),
            },
        ))
        .await
        .expect("CreateGroup")
        .into_inner()
        .session_id;

    // The first 100 members are online, alternating between the gateways.
    let mut online = Vec::with_capacity(ONLINE);
    for (index, member) in members[..ONLINE].iter().enumerate() {
        let gateway = &stack.gateways[index % 2];
        online.push(WsClient::connect(gateway, &token(member, "phone").0).await);
    }
    let mut acks = BTreeMap::new();
    for n in 1..=MESSAGES {
        online[0]
            .send(json!({
                "type": "send", "client_msg_id": format!("g{n}"), "session_id": session,
                "message_type": "text", "content": format!("to everyone {n}"),
            }))
            .await;
        let ack = online[0].next_of("ack").await;
        acks.insert(seq_of(&ack), ack["message_id"].clone());
    }
    assert_eq!(acks.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
    for client in &mut online[1..] {
        for seq in 1..=MESSAGES {
            let deliver = client.next_of("deliver").await;
            assert_eq!(deliver["message"]["seq"], seq, "in seq order");
            assert_eq!(deliver["message"]["message_id"], acks[&seq]);
        }
    }
    // Once: nothing more arrives at any of them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (index, client) in online.iter_mut().enumerate() {
        let extra = client.drain_of("deliver", Duration::from_millis(20)).await;
        assert!(
            extra.is_empty(),
            "member {index} got extra deliveries: {extra:?}"
        );
    }

    // The 900 offline members: every one reads all three through the reader (the path
    // `sync` takes), and a few connect and `sync` as clients.
    let storage = storage_client(&stack).await;
    let offline = &members[ONLINE..];
    for chunk in offline.chunks(25) {
        let pages = futures::future::join_all(chunk.iter().map(|member| {
            let mut storage = storage.clone();
            let session = session.clone();
            async move {
                storage
                    .query_messages(internal_request(
                        member,
                        QueryMessagesRequest {
                            user_id: member.clone(),
                            session_id: session,
                            range: Some(query_messages_request::Range::Seq(SeqRange {
                                after_seq: 0,
                                before_seq: 0,
                            })),
                            direction: Direction::Forward as i32,
                            limit: 50,
                            cursor: String::new(),
                        },
                    ))
                    .await
                    .map(|page| (member.clone(), page.into_inner()))
            }
        }))
        .await;
        for page in pages {
            let (member, page) = page.expect("QueryMessages");
            let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, [1, 2, 3], "{member}");
        }
    }
    for member in &offline[..5] {
        let mut client = WsClient::connect(&stack.gateways[1], &token(member, "phone").0).await;
        let synced = client.sync_all(&session, 0, 2).await;
        let seqs: Vec<u64> = synced.iter().map(seq_of).collect();
        assert_eq!(seqs, [1, 2, 3], "{member}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_after_a_dropped_connection_gets_the_original_ack_and_stores_one() {
    let stack = Stack::start(StackOptions::default()).await;
    let gateway = &stack.gateways[0];
    let (alice, bob) = (stack.user("alice"), stack.user("bob"));
    let mut b = WsClient::connect(gateway, &token(&bob, "phone").0).await;

    // r1: acked, then the connection drops (no close frame) and the app resends.
    let mut a = WsClient::connect(gateway, &token(&alice, "phone").0).await;
    a.send_to(&bob, "r1", "first").await;
    let original = a.next_of("ack").await;
    drop(a);
    let mut a = WsClient::connect(gateway, &token(&alice, "phone").0).await;
    a.send_to(&bob, "r1", "first").await;
    let again = a.next_of("ack").await;
    assert_eq!(again["message_id"], original["message_id"]);
    assert_eq!(again["seq"], original["seq"]);

    // r2: the connection drops right after the send, before any ack could arrive; the
    // app resends on its next connection and gets the one ack.
    a.send_to(&bob, "r2", "second").await;
    drop(a);
    let mut a = WsClient::connect(gateway, &token(&alice, "phone").0).await;
    a.send_to(&bob, "r2", "second").await;
    let second = a.next_of("ack").await;
    a.send_to(&bob, "r2", "second").await;
    let second_again = a.next_of("ack").await;
    assert_eq!(second["message_id"], second_again["message_id"]);
    assert_eq!(second["seq"], 2);

    // bob got each message once.
    let seqs: Vec<u64> = b
        .drain_of("deliver", Duration::from_secs(2))
        .await
        .iter()
        .map(|deliver| seq_of(&deliver["message"]))
        .collect();
    assert_eq!(seqs, [1, 2]);
    // One stored message per client_msg_id, in Postgres and Mongo, under the acked ids.
    let pg = postgres().await;
    let mongo = mongo().await;
    for ack in [&original, &second] {
        let client_msg_id = ack["client_msg_id"].as_str().expect("id");
        let message_id = ack["message_id"].as_str().expect("id").to_owned();
        let seq = ack["seq"].as_i64().expect("seq");
        assert_eq!(
            stored(&pg, &alice, client_msg_id).await,
            [(message_id.clone(), seq, p2p_session(&alice, &bob))]
        );
        assert_eq!(
            stored_in_mongo(&mongo, &alice, client_msg_id).await,
            [(message_id, seq)]
        );
    }
}

/// A token signed with `alg: none` (no signature).
fn none_alg_token(user: &str) -> String {
    use base64_url::encode;
    let header = encode(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = encode(
        json!({"sub": user, "did": "phone", "jti": "none-alg", "exp": 4_000_000_000_u64})
            .to_string()
            .as_bytes(),
    );
    format!("{header}.{claims}.")
}

/// Base64url without padding, enough for hand-made JWTs.
mod base64_url {
    pub fn encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0_u32, |n, (i, byte)| n | (u32::from(*byte) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }
}

fn wrong_key_token(user: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "did": "phone", "jti": "wrong-key", "exp": 4_000_000_000_u64}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-gateway-secret-0123456789abcdef"),
    )
    .expect("encode")
}

/// One good exchange between two well-behaved clients: proof the gateway still serves.
async fn good_exchange(from: &mut WsClient, to: &mut WsClient, to_user: &str, n: usize) {
    from.send_to(to_user, &format!("good-{n}"), &format!("still fine {n}"))
        .await;
    let ack = from.next_of("ack").await;
    assert_eq!(ack["client_msg_id"], format!("good-{n}"));
    let deliver = to.next_of("deliver").await;
    assert_eq!(deliver["message"]["content"], format!("still fine {n}"));
}

/// A raw TCP (protobuf) connection's next frame, or `None` once the server closed it.
async fn raw_tcp_frame(stream: &mut tokio::net::TcpStream) -> Option<server_frame::Frame> {
    let mut length = [0_u8; 4];
    tokio::time::timeout(FRAME_WAIT, stream.read_exact(&mut length))
        .await
        .expect("the server answers or closes in time")
        .ok()?;
    let mut payload = vec![0; u32::from_be_bytes(length) as usize];
    stream.read_exact(&mut payload).await.ok()?;
    client::ServerFrame::decode(payload.as_slice()).ok()?.frame
}

async fn assert_tcp_refused(gateway: &Gateway, auth: Option<&str>) {
    let mut stream = tokio::net::TcpStream::connect(gateway.tcp)
        .await
        .expect("tcp connect");
    if let Some(token) = auth {
        let payload = client::ClientFrame {
            frame: Some(client_frame::Frame::Auth(client::Auth {
                token: token.into(),
            })),
        }
        .encode_to_vec();
        let mut framed = (payload.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&payload);
        stream.write_all(&framed).await.expect("write auth");
    }
    match raw_tcp_frame(&mut stream).await {
        Some(server_frame::Frame::Error(error)) => {
            assert_eq!(error.code(), client::ErrorCode::Unauthorized, "{error:?}")
        }
        other => panic!("expected an unauthorized error, got {other:?}"),
    }
    assert!(raw_tcp_frame(&mut stream).await.is_none(), "closed after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_its_code_stores_nothing_and_others_keep_chatting() {
    let mut gateway_env = default_gateway_env();
    gateway_env.extend([
        ("CHATIFY_HANDSHAKE_TIMEOUT_MS".into(), "1000".into()),
        ("CHATIFY_SEND_RATE_PER_SECOND".into(), "2".into()),
        ("CHATIFY_SEND_BURST".into(), "5".into()),
        ("CHATIFY_RATE_LIMIT_STRIKES_MAX".into(), "3".into()),
    ]);
    let stack = Stack::start(StackOptions {
        gateway_env,
        ..StackOptions::default()
    })
    .await;
    let gateway = &stack.gateways[0];
    let pg = postgres().await;
    let users: HashMap<&str, String> = [
        "carol", "dave", "mallory", "oscar", "mal", "flood", "expired",
    ]
    .into_iter()
    .map(|name| (name, stack.user(name)))
    .collect();
    let (carol, dave) = (&users["carol"], &users["dave"]);
    let mut c = WsClient::connect(gateway, &token(carol, "phone").0).await;
    let mut d = WsClient::connect(gateway, &token(dave, "phone").0).await;
    let mut exchanges = 0;
    good_exchange(&mut c, &mut d, dave, exchanges).await;

    // Tokens: expired, `none` algorithm, wrong key, garbage: 401 before the upgrade.
    let refused_tokens = [
        token_with(&users["expired"], "phone", "expired-jti", -3600),
        none_alg_token(&users["mallory"]),
        wrong_key_token(&users["mallory"]),
        "not-a-jwt".to_owned(),
    ];
    for refused in &refused_tokens {
        assert_eq!(
            WsClient::refused_status(&gateway.ws_url(refused)).await,
            401,
            "{refused}"
        );
        assert_tcp_refused(gateway, Some(refused)).await;
    }
    exchanges += 1;
    good_exchange(&mut d, &mut c, carol, exchanges).await;

    // Forged sender fields are ignored: the sender is the token's user.
    let mallory = &users["mallory"];
    let mut m = WsClient::connect(gateway, &token(mallory, "phone").0).await;
    m.send(json!({
        "type": "send", "client_msg_id": "forged", "receiver_id": dave,
        "sender_id": carol, "user_id": carol, "from": carol,
        "message_type": "text", "content": "pretending to be carol",
    }))
    .await;
    let ack = m.next_of("ack").await;
    assert_eq!(ack["session_id"], p2p_session(mallory, dave).as_str());
    let deliver = d.next_of("deliver").await;
    assert_eq!(deliver["message"]["sender_id"], mallory.as_str());

    // A send to a group one is not in: not_member, nothing stored.
    let grpc = stack.reader_grpc.expect("reader");
    let mut groups = GroupServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("reader grpc");
    let group = groups
        .create_group(internal_request(
            carol,
            CreateGroupRequest {
                user_id: carol.clone(),
                name: "carol and dave".into(),
                member_ids: vec![dave.clone()],
            },
        ))
        .await
        .expect("CreateGroup")
        .into_inner()
        .session_id;
    m.send(json!({
        "type": "send", "client_msg_id": "intrude", "session_id": group,
        "message_type": "text", "content": "let me in",
    }))
    .await;
    let refused = m.next_of("error").await;
    assert_eq!(refused["code"], "not_member", "{refused}");
    assert_eq!(refused["client_msg_id"], "intrude");
    exchanges += 1;
    good_exchange(&mut c, &mut d, dave, exchanges).await;

    // An oversize frame: 1009.
    let mut o = WsClient::connect(gateway, &token(&users["oscar"], "phone").0).await;
    let huge = json!({
        "type": "send", "client_msg_id": "huge", "receiver_id": dave,
        "message_type": "text", "content": "x".repeat(70 * 1024),
    });
    o.send_raw(WsMessage::Text(huge.to_string().into())).await;
    assert!(matches!(o.closed().await, Closed::Frame(1009, _)));

    // Malformed JSON: 1007.
    let mut bad = WsClient::connect(gateway, &token(&users["mal"], "phone").0).await;
    bad.send_raw(WsMessage::Text(
        r#"{"type":"send","client_msg_id":"broken","receiver_id":"#.into(),
    ))
    .await;
    assert!(matches!(bad.closed().await, Closed::Frame(1007, _)));
    exchanges += 1;
    good_exchange(&mut d, &mut c, carol, exchanges).await;

    // A flood from one user: rate_limited, then 1008 after the strikes. (To oscar, who is
    // gone, so the good clients' frames stay apart from it.)
    let flooder = &users["flood"];
    let mut f = WsClient::connect(gateway, &token(flooder, "phone").0).await;
    for n in 0..40 {
        let frame = json!({
            "type": "send", "client_msg_id": format!("f{n}"), "receiver_id": users["oscar"],
            "message_type": "text", "content": "flood",
        });
        if !f.try_send(frame).await {
            break;
        }
    }
    let close = f.closed().await;
    assert_eq!(close, Closed::Frame(1008, "send rate abuse".into()));
    let mut rate_limited = HashSet::new();
    let mut flood_acked = HashSet::new();
    for frame in f.take_pending() {
        let client_msg_id = frame["client_msg_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match frame["type"].as_str() {
            Some("error") => {
                assert_eq!(frame["code"], "rate_limited", "{frame}");
                rate_limited.insert(client_msg_id);
            }
            Some("ack") => {
                flood_acked.insert(client_msg_id);
            }
            _ => {}
        }
    }
    // The strike that reaches the maximum closes instead of answering.
    assert!(!rate_limited.is_empty(), "{rate_limited:?}");

    // A slowloris upgrade (headers never finished) gets 408 at the deadline; a TCP
    // connection that never authenticates gets `unauthorized`; meanwhile chat goes on.
    let mut slow = tokio::net::TcpStream::connect(gateway.ws)
        .await
        .expect("connect");
    slow.write_all(b"GET /ws HTTP/1.1\r\nHost: chatify\r\nUpgrade: websocket\r\n")
        .await
        .expect("partial request");
    exchanges += 1;
    tokio::join!(
        good_exchange(&mut c, &mut d, dave, exchanges),
        assert_tcp_refused(gateway, None)
    );
    let mut answer = Vec::new();
    tokio::time::timeout(FRAME_WAIT, slow.read_to_end(&mut answer))
        .await
        .expect("the slow upgrade is closed by the deadline")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // Everyone well-behaved is still served, by the same process.
    exchanges += 1;
    good_exchange(&mut d, &mut c, carol, exchanges).await;
    // Nothing refused was stored; the forged message is stored under mallory; the good
    // messages and the flood's accepted sends are stored once each. Refused input has had
    // the time of the later good exchanges to reach the writer; give stragglers a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for refused in ["intrude", "huge", "broken"] {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT sender_id FROM messages WHERE client_msg_id = $1 AND sender_id = ANY($2)",
        )
        .bind(refused)
        .bind(users.values().cloned().collect::<Vec<_>>())
        .fetch_all(&pg)
        .await
        .expect("query");
        assert!(rows.is_empty(), "{refused} was stored: {rows:?}");
    }
    let forged = stored(&pg, mallory, "forged").await;
    assert_eq!(forged.len(), 1);
    assert_eq!(forged[0].2, p2p_session(mallory, dave));
    assert!(stored(&pg, carol, "forged").await.is_empty());
    let flood_stored: HashSet<String> =
        sqlx::query_as::<_, (String,)>("SELECT client_msg_id FROM messages WHERE sender_id = $1")
            .bind(flooder)
            .fetch_all(&pg)
            .await
            .expect("query")
            .into_iter()
            .map(|(id,)| id)
            .collect();
    assert!(flood_stored.is_disjoint(&rate_limited), "{flood_stored:?}");
    assert!(flood_acked.is_subset(&flood_stored));
    assert!(!flood_stored.is_empty(), "the allowed burst was stored");
    for n in 0..=exchanges {
        let sender = if n % 2 == 0 { carol } else { dave };
        assert_eq!(stored(&pg, sender, &format!("good-{n}")).await.len(), 1);
    }
    assert!(gateway.service.pid().is_some());
    assert_eq!(
        chatify_e2e::http_get(gateway.service.admin, "/readyz")
            .expect("readyz")
            .0,
        200
    );
}
