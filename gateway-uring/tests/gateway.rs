//! Black-box tests: the real gateway binary on loopback, driven by a real WebSocket client
//! (tokio-tungstenite) and raw sockets for what a well-behaved client cannot send. Every
//! scenario runs on both monoio drivers (epoll, and io_uring where the kernel allows it).
//! Needs Redis from `scripts/services.sh up` (the token deny-list).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};

const SECRET: &str = "gateway-test-secret-0123456789-abcdefghij";
const WAIT: Duration = Duration::from_secs(10);

fn redis_url() -> String {
    chatify_core::config::load_repo_env(env!("CARGO_MANIFEST_DIR").as_ref())
        .unwrap_or_else(|error| panic!("{error}"));
    std::env::var("REDIS_URL").expect("REDIS_URL in .local/chatify.env")
}

/// `N` loopback addresses with ports free a moment ago, all different: the listeners are
/// held together so the kernel cannot hand out one port twice.
fn free_addrs<const N: usize>() -> [SocketAddr; N] {
    let listeners: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("ephemeral port"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("local addr"))
}

/// The io_uring driver is tested where the kernel lets this process use it.
fn drivers() -> Vec<&'static str> {
    let mut drivers = vec!["legacy"];
    if monoio::utils::detect_uring() {
        drivers.push("uring");
    } else {
        eprintln!("io_uring is not available to this process: testing the epoll driver only");
    }
    drivers
}

struct Gateway {
    child: Child,
    ws: SocketAddr,
    tcp: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn start(driver: &str, extra: &[(&str, &str)]) -> Self {
        let [ws, tcp, admin] = free_addrs();
        let mut command = Command::new(env!("CARGO_BIN_EXE_gateway-uring"));
        command
            .env("JWT_SECRET", SECRET)
            .env("REDIS_URL", redis_url())
            .env("CHATIFY_WS_ADDR", ws.to_string())
            .env("CHATIFY_TCP_ADDR", tcp.to_string())
            .env("CHATIFY_ADMIN_ADDR", admin.to_string())
            .env("CHATIFY_IO_DRIVER", driver)
            .env("CHATIFY_SHARDS", "2")
            .env("RUST_LOG", "warn")
            // No broker answers here: these tests pin the connection engine, and every
            // `send` the engine lets through is refused `unavailable` by the producer's
            // timeout (the cluster path is tested in e2e/tests/gateway_cluster.rs).
            .env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
            .env("CHATIFY_UPSTREAM_TIMEOUT_MS", "300")
            .env("CHATIFY_NODE_ID", format!("gw-test-{}", std::process::id()))
            .env_remove("CHATIFY_ENV_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (variable, value) in extra {
            command.env(variable, value);
        }
        let child = command.spawn().expect("spawn gateway");
        let gateway = Self {
            child,
            ws,
            tcp,
            admin,
        };
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(ws).is_err()
            || std::net::TcpStream::connect(tcp).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "gateway did not listen within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        gateway
    }

    /// The value of one counter line in /metrics (0 when absent).
    async fn counter(&self, line_prefix: &str) -> f64 {
        let mut socket = TcpStream::connect(self.admin).await.expect("admin");
        socket
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut response = String::new();
        socket
            .read_to_string(&mut response)
            .await
            .expect("response");
        response
            .lines()
            .find(|line| line.starts_with(line_prefix))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0)
    }

    fn url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.ws)
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn token_for(user: &str, jti: &str, exp: u64) -> String {
    device_token_for(user, "device-1", jti, exp)
}

fn device_token_for(user: &str, device: &str, jti: &str, exp: u64) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": user, "did": device, "jti": jti, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode token")
}

fn token(user: &str) -> String {
    token_for(
        user,
        &format!("jti-{user}-{}", std::process::id()),
        now() + 600,
    )
}

type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn connect(gateway: &Gateway, user: &str) -> Client {
    connect_with(gateway, &token(user)).await
}

async fn connect_with(gateway: &Gateway, token: &str) -> Client {
    let (client, response) = tokio_tungstenite::connect_async(gateway.url(token))
        .await
        .expect("websocket upgrade");
    assert_eq!(response.status(), 101);
    client
}

async fn next_json(client: &mut Client) -> Value {
    loop {
        let message = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("a frame within the wait")
            .expect("stream open")
            .expect("valid frame");
        match message {
            Message::Text(text) => return serde_json::from_str(text.as_str()).expect("json frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads until the server's close frame; returns its code and reason.
async fn close_of(client: &mut Client) -> (u16, String) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match tokio::time::timeout(WAIT, client.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Ok(Some(Ok(Message::Close(None)))) => return (1005, String::new()),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(error))) => panic!("connection failed before a close frame: {error}"),
            Ok(None) => panic!("connection ended without a close frame"),
            Err(_) => break,
        }
    }
    panic!("no close frame within {WAIT:?}");
}

async fn http_status_of_upgrade(gateway: &Gateway, url: String) -> (u16, String) {
    match tokio_tungstenite::connect_async(url).await {
        Err(tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_ref()
                .map(|body| String::from_utf8_lossy(body).into_owned())
                .unwrap_or_default();
            (response.status().as_u16(), body)
        }
        other => panic!(
            "expected an HTTP refusal from {}, got {:?}",
            gateway.ws,
            other.map(|(_, r)| r.status())
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_before_the_upgrade() {
    let mut redis = redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let revoked_jti = format!("revoked-{}", std::process::id());
    let _: () = redis::cmd("SET")
        .arg(chatify_core::keys::revoked_token(&revoked_jti))
        .arg(1)
        .arg("EX")
        .arg(600)
        .query_async(&mut redis)
        .await
        .expect("revoke");
    for driver in drivers() {
        let gateway = Gateway::start(driver, &[]);
        let cases = [
            (format!("ws://{}/ws", gateway.ws), "missing token"),
            (gateway.url("garbage"), "malformed token"),
            (
                gateway.url(&token_for("u1", "j", now() - 3600)),
                "token expired",
            ),
            (
                gateway.url(&token_for("u1", &revoked_jti, now() + 600)),
                "token revoked",
            ),
        ];
        for (url, expected) in cases {
            let (status, body) = http_status_of_upgrade(&gateway, url).await;
            assert_eq!(status, 401, "{driver}: {expected}");
            assert!(
                body.contains(expected),
                "{driver}: body {body:?}, expected {expected:?}"
            );
        }
        let wrong_key = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "u1", "did": "d", "jti": "j", "exp": now() + 600}),
            &EncodingKey::from_secret(b"some-other-secret-some-other-secret!!"),
        )
        .expect("encode");
        assert_eq!(
            http_status_of_upgrade(&gateway, gateway.url(&wrong_key))
                .await
                .0,
            401
        );
        let (status, _) = http_status_of_upgrade(
            &gateway,
            format!("ws://{}/other?token={}", gateway.ws, token("u1")),
        )
        .await;
        assert_eq!(status, 404, "{driver}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_is_answered_and_send_without_a_broker_is_refused_as_unavailable_not_faked() {
    for driver in drivers() {
        let gateway = Gateway::start(driver, &[]);
        let mut client = connect(&gateway, "alice").await;

        client
            .send(Message::text(r#"{"type":"ping","timestamp":42}"#))
            .await
            .expect("send");
        assert_eq!(
            next_json(&mut client).await,
            json!({"type":"pong","timestamp":42}),
            "{driver}"
        );

        client
            .send(Message::Ping(b"hb".to_vec().into()))
            .await
            .expect("ws ping");
        let pong = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("pong")
            .expect("open")
            .expect("frame");
        assert_eq!(pong, Message::Pong(b"hb".to_vec().into()), "{driver}");

        client
            .send(Message::text(
                r#"{"type":"send","client_msg_id":"c1","receiver_id":"bob","message_type":"text","content":"hi","request_id":"r1"}"#,
            ))
            .await
            .expect("send");
        let reply = next_json(&mut client).await;
        assert_eq!(reply["type"], "error", "{driver}: {reply}");
        assert_eq!(reply["code"], "unavailable", "{driver}: {reply}");
        assert_eq!(reply["client_msg_id"], "c1");
        assert_eq!(reply["request_id"], "r1");

        // Well-formed JSON with bad fields: an error, and the connection stays open.
        client
            .send(Message::text(
                r#"{"type":"send","client_msg_id":"c2","receiver_id":"bob","session_id":"grp:1","message_type":"text","content":"x"}"#,
            ))
            .await
            .expect("send");
        let reply = next_json(&mut client).await;
        assert_eq!(reply["code"], "bad_request", "{driver}: {reply}");
        assert_eq!(reply["client_msg_id"], "c2");

        // Binary frames carry protobuf and are answered in protobuf.
        use chatify_proto::Message as _;
        let ping = chatify_proto::client::v1::ClientFrame {
            frame: Some(chatify_proto::client::v1::client_frame::Frame::Ping(
                chatify_proto::client::v1::Ping { timestamp: Some(7) },
            )),
        };
        client
            .send(Message::binary(ping.encode_to_vec()))
            .await
            .expect("send");
        let answer = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("reply")
            .expect("open")
            .expect("frame");
        let Message::Binary(bytes) = answer else {
            panic!("{driver}: expected a binary reply, got {answer:?}");
        };
        let decoded =
            chatify_proto::client::v1::ServerFrame::decode(bytes.as_ref()).expect("protobuf");
        assert_eq!(
            decoded.frame,
            Some(chatify_proto::client::v1::server_frame::Frame::Pong(
                chatify_proto::client::v1::Pong { timestamp: Some(7) }
            ))
        );

        client.close(None).await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_with_the_right_code() {
    for driver in drivers() {
        let gateway = Gateway::start(
            driver,
            &[
                ("CHATIFY_FRAME_BYTES_MAX", "1024"),
                ("CHATIFY_MESSAGE_BYTES_MAX", "4096"),
            ],
        );
        let cases: [(Message, u16); 4] = [
            (Message::text("not json"), 1007),
            (Message::text(r#"{"type":"teleport"}"#), 1007),
            (Message::binary(vec![0xff, 0xff, 0xff]), 1007),
            (Message::text("x".repeat(2000)), 1009),
        ];
        for (message, code) in cases {
            let mut client = connect(&gateway, "carol").await;
            client.send(message).await.expect("send");
            let (got, reason) = close_of(&mut client).await;
            assert_eq!(got, code, "{driver}: reason {reason:?}");
            assert!(
                !reason.is_empty(),
                "{driver}: close {code} without a reason"
            );
        }
    }
}

/// Raw upgrade over a plain socket, for frames a real client library refuses to send.
async fn raw_upgrade(gateway: &Gateway, user: &str) -> TcpStream {
    let mut socket = TcpStream::connect(gateway.ws).await.expect("connect");
    let request = format!(
        "GET /ws?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token(user)
    );
    socket
        .write_all(request.as_bytes())
        .await
        .expect("write upgrade");
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        let byte = socket.read_u8().await.expect("read response");
        response.push(byte);
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(
        text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "RFC 6455 accept key: {text}"
    );
    socket
}

/// Reads one unmasked server frame: (opcode, payload).
async fn raw_frame(socket: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut header = [0_u8; 2];
    tokio::time::timeout(WAIT, socket.read_exact(&mut header))
        .await
        .expect("frame in time")
        .expect("header");
    assert_eq!(header[1] & 0x80, 0, "server frames are never masked");
    let len = match header[1] & 0x7f {
        126 => usize::from(socket.read_u16().await.expect("len16")),
        127 => usize::try_from(socket.read_u64().await.expect("len64")).expect("fits"),
        len => usize::from(len),
    };
    let mut payload = vec![0; len];
    socket.read_exact(&mut payload).await.expect("payload");
    (header[0] & 0x0f, payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_1002() {
    for driver in drivers() {
        let gateway = Gateway::start(driver, &[]);
        // An unmasked client frame, and a reserved opcode.
        for frame in [vec![0x81, 0x02, b'h', b'i'], vec![0x83, 0x80, 1, 2, 3, 4]] {
            let mut socket = raw_upgrade(&gateway, "dave").await;
            socket.write_all(&frame).await.expect("write frame");
            let (opcode, payload) = raw_frame(&mut socket).await;
            assert_eq!(opcode, 0x8, "{driver}: expected a close frame");
            assert_eq!(
                u16::from_be_bytes([payload[0], payload[1]]),
                1002,
                "{driver}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_heartbeat_timeout() {
    for driver in drivers() {
        let gateway = Gateway::start(driver, &[("CHATIFY_HEARTBEAT_TIMEOUT_MS", "600")]);
        let mut client = connect(&gateway, "erin").await;
        let started = Instant::now();
        let (code, reason) = close_of(&mut client).await;
        assert_eq!(
            (code, reason.as_str()),
            (1000, "heartbeat timeout"),
            "{driver}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "{driver}: closed too early"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_refuses_with_503() {
    for driver in drivers() {
        let gateway = Gateway::start(driver, &[("CHATIFY_CONNECTIONS_MAX", "2")]);
        // The start-up port probes held slots too; wait until the gateway has let them go.
        let deadline = Instant::now() + WAIT;
        while gateway.counter("chatify_gateway_connections ").await > 0.0 {
            assert!(
                Instant::now() < deadline,
                "{driver}: probe connections never released"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first = connect(&gateway, "f1").await;
        let second = connect(&gateway, "f2").await;
        let (status, body) = http_status_of_upgrade(&gateway, gateway.url(&token("f3"))).await;
        assert_eq!(status, 503, "{driver}: {body}");
        drop(first);
        // The slot comes back once the server notices the close.
        let deadline = Instant::now() + WAIT;
        loop {
            match tokio_tungstenite::connect_async(gateway.url(&token("f4"))).await {
                Ok(_) => break,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(error) => panic!("{driver}: slot never came back: {error}"),
            }
        }
        drop(second);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_rate_is_limited_then_abuse_closes() {
    for driver in drivers() {
        let gateway = Gateway::start(
            driver,
            &[
                ("CHATIFY_SEND_RATE_PER_SECOND", "1"),
                ("CHATIFY_SEND_BURST", "2"),
                ("CHATIFY_RATE_LIMIT_STRIKES_MAX", "3"),
            ],
        );
        let mut client = connect(&gateway, "gina").await;
        // Sent back to back: a refusal is immediate, an allowed send is answered later by
        // the producer's timeout (no broker here), so compare the codes, not their order.
        let ids: Vec<String> = (0..4).map(|index| format!("c{index}")).collect();
        let mut codes = send_codes(&mut client, &ids).await;
        codes.sort();
        assert_eq!(
            codes,
            ["rate_limited", "rate_limited", "unavailable", "unavailable"],
            "{driver}"
        );
        let frame = json!({"type":"send","client_msg_id":"c9","receiver_id":"bob","message_type":"text","content":"x"});
        client
            .send(Message::text(frame.to_string()))
            .await
            .expect("send");
        let (code, reason) = close_of(&mut client).await;
        assert_eq!(
            (code, reason.as_str()),
            (1008, "send rate abuse"),
            "{driver}"
        );
    }
}

/// Sends one `send` frame per id, back to back.
async fn send_all(client: &mut Client, client_msg_ids: &[String]) {
    for client_msg_id in client_msg_ids {
        let frame = json!({"type":"send","client_msg_id":client_msg_id,"receiver_id":"bob","message_type":"text","content":"x"});
        client
            .send(Message::text(frame.to_string()))
            .await
            .expect("send");
    }
}

/// The `code` of the error answering each of `client_msg_ids`, in the order of the ids.
async fn codes_of(client: &mut Client, client_msg_ids: &[String]) -> Vec<String> {
    let mut by_id = std::collections::HashMap::new();
    while by_id.len() < client_msg_ids.len() {
        let reply = next_json(client).await;
        let id = reply["client_msg_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        by_id.insert(id, reply["code"].as_str().unwrap_or_default().to_owned());
    }
    client_msg_ids
        .iter()
        .map(|id| by_id.remove(id).unwrap_or_default())
        .collect()
}

/// Sends back to back, then collects the code answering each send.
async fn send_codes(client: &mut Client, client_msg_ids: &[String]) -> Vec<String> {
    send_all(client, client_msg_ids).await;
    codes_of(client, client_msg_ids).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_send_rate_is_per_user_across_devices() {
    const BURST: usize = 3;
    for driver in drivers() {
        let gateway = Gateway::start(
            driver,
            &[
                ("CHATIFY_SEND_RATE_PER_SECOND", "1"),
                ("CHATIFY_SEND_BURST", "3"),
                ("CHATIFY_RATE_LIMIT_STRIKES_MAX", "100"),
            ],
        );
        let rate_limited = r#"chatify_gateway_refusals_total{reason="rate_limited"}"#;
        let refused_before = gateway.counter(rate_limited).await;
        // Two devices of one user (own tokens, own connections, possibly on different shards)
        // and another user, all connected at once.
        let device_token = |device: &str| {
            let jti = format!("jti-kim-{device}-{}", std::process::id());
            device_token_for("kim", device, &jti, now() + 600)
        };
        let mut phone = connect_with(&gateway, &device_token("phone")).await;
        let mut laptop = connect_with(&gateway, &device_token("laptop")).await;
        let mut other = connect(&gateway, "lee").await;

        let started = Instant::now();
        let phone_ids: Vec<String> = (0..=BURST).map(|index| format!("p{index}")).collect();
        let laptop_ids: Vec<String> = (0..=BURST).map(|index| format!("l{index}")).collect();
        for index in 0..=BURST {
            send_all(&mut phone, &phone_ids[index..=index]).await;
            send_all(&mut laptop, &laptop_ids[index..=index]).await;
        }
        // The other user, meanwhile, has the whole burst of their own.
        let other_ids: Vec<String> = (0..BURST).map(|index| format!("o{index}")).collect();
        send_all(&mut other, &other_ids).await;
        let elapsed = started.elapsed();
        let phone_codes = codes_of(&mut phone, &phone_ids).await;
        let laptop_codes = codes_of(&mut laptop, &laptop_ids).await;
        let other_codes = codes_of(&mut other, &other_ids).await;

        let allowed = |codes: &[String]| codes.iter().filter(|c| *c == "unavailable").count();
        let both = [phone_codes.as_slice(), laptop_codes.as_slice()];
        assert!(
            both.iter()
                .flat_map(|codes| codes.iter())
                .all(|c| c == "unavailable" || c == "rate_limited"),
            "{driver}: phone {phone_codes:?} laptop {laptop_codes:?}"
        );
        // One allowance for both devices: the burst, plus what refilled at 1/s meanwhile
        // (nothing when the exchange took under a second).
        let allowed_total = allowed(&phone_codes) + allowed(&laptop_codes);
        let refilled = usize::try_from(elapsed.as_secs()).expect("small");
        assert!(
            (BURST..=BURST + refilled).contains(&allowed_total),
            "{driver}: {allowed_total} sends allowed over two devices in {elapsed:?}: \
             phone {phone_codes:?} laptop {laptop_codes:?}"
        );
        assert!(
            phone_codes.contains(&"rate_limited".to_owned())
                && laptop_codes.contains(&"rate_limited".to_owned()),
            "{driver}: both devices are limited: phone {phone_codes:?} laptop {laptop_codes:?}"
        );
        assert_eq!(
            other_codes,
            vec!["unavailable"; BURST],
            "{driver}: another user is not limited"
        );
        let refused = gateway.counter(rate_limited).await - refused_before;
        let expected = (2 * (BURST + 1) - allowed_total) as f64;
        assert_eq!(refused, expected, "{driver}: refusals counted in /metrics");

        // Below the strike limit both connections stay open and usable.
        for client in [&mut phone, &mut laptop] {
            client
                .send(Message::text(r#"{"type":"ping","timestamp":1}"#))
                .await
                .expect("ping");
            assert_eq!(next_json(client).await["type"], "pong", "{driver}");
        }
    }
}

async fn tcp_write(socket: &mut TcpStream, frame: chatify_proto::client::v1::client_frame::Frame) {
    use chatify_proto::Message as _;
    let payload = chatify_proto::client::v1::ClientFrame { frame: Some(frame) }.encode_to_vec();
    socket
        .write_u32(u32::try_from(payload.len()).expect("small"))
        .await
        .expect("len");
    socket.write_all(&payload).await.expect("payload");
}

async fn tcp_read(socket: &mut TcpStream) -> chatify_proto::client::v1::server_frame::Frame {
    use chatify_proto::Message as _;
    let len = tokio::time::timeout(WAIT, socket.read_u32())
        .await
        .expect("in time")
        .expect("len");
    let mut payload = vec![0; len as usize];
    socket.read_exact(&mut payload).await.expect("payload");
    chatify_proto::client::v1::ServerFrame::decode(payload.as_slice())
        .expect("protobuf")
        .frame
        .expect("frame set")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_needs_auth_first_then_speaks_protobuf() {
    use chatify_proto::client::v1::{Auth, ErrorCode, Ping, client_frame, server_frame};
    for driver in drivers() {
        let gateway = Gateway::start(driver, &[("CHATIFY_HANDSHAKE_TIMEOUT_MS", "500")]);

        let mut socket = TcpStream::connect(gateway.tcp).await.expect("connect");
        tcp_write(
            &mut socket,
            client_frame::Frame::Auth(Auth {
                token: token("hank"),
            }),
        )
        .await;
        let server_frame::Frame::AuthOk(ok) = tcp_read(&mut socket).await else {
            panic!("{driver}: expected auth_ok");
        };
        assert_eq!(
            (ok.user_id.as_str(), ok.device_id.as_str()),
            ("hank", "device-1")
        );
        tcp_write(
            &mut socket,
            client_frame::Frame::Ping(Ping { timestamp: Some(5) }),
        )
        .await;
        assert!(
            matches!(tcp_read(&mut socket).await, server_frame::Frame::Pong(p) if p.timestamp == Some(5))
        );

        // A first frame that is not auth, a bad token, and silence are all refused.
        let mut socket = TcpStream::connect(gateway.tcp).await.expect("connect");
        tcp_write(
            &mut socket,
            client_frame::Frame::Ping(Ping { timestamp: None }),
        )
        .await;
        let server_frame::Frame::Error(error) = tcp_read(&mut socket).await else {
            panic!("{driver}: expected error");
        };
        assert_eq!(error.code(), ErrorCode::Unauthorized);

        let mut socket = TcpStream::connect(gateway.tcp).await.expect("connect");
        tcp_write(
            &mut socket,
            client_frame::Frame::Auth(Auth {
                token: "nope".into(),
            }),
        )
        .await;
        let server_frame::Frame::Error(error) = tcp_read(&mut socket).await else {
            panic!("{driver}: expected error");
        };
        assert_eq!(error.code(), ErrorCode::Unauthorized);

        let mut socket = TcpStream::connect(gateway.tcp).await.expect("connect");
        let server_frame::Frame::Error(error) = tcp_read(&mut socket).await else {
            panic!("{driver}: expected error");
        };
        assert_eq!(
            (error.code(), error.reason.as_str()),
            (ErrorCode::Unauthorized, "auth timeout")
        );
        assert_eq!(
            socket.read_u8().await.ok(),
            None,
            "{driver}: closed after the refusal"
        );
    }
}

/// A masked client text frame (mask key fixed; masking is what matters, not secrecy).
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![
        0x81,
        0x80 | u8::try_from(payload.len()).expect("short payload"),
    ];
    frame.extend_from_slice(&mask);
    frame.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, byte)| byte ^ mask[i % 4]),
    );
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_disconnected_not_buffered() {
    for driver in drivers() {
        let gateway = Gateway::start(driver, &[("CHATIFY_SEND_QUEUE_FRAMES_MAX", "4")]);
        let socket = raw_upgrade(&gateway, "ivan").await;
        let (mut read_half, mut write_half) = socket.into_split();
        // Pings whose pongs are never read: the kernel buffers fill, then the bounded queue.
        let ping = masked_text(br#"{"type":"ping"}"#);
        let burst: Vec<u8> = ping
            .iter()
            .copied()
            .cycle()
            .take(ping.len() * 4096)
            .collect();
        let flood = tokio::spawn(async move {
            let mut sent_bytes = 0_usize;
            // Bounded so a gateway that never disconnects fails the test instead of hanging.
            while sent_bytes < 512 * 1024 * 1024 {
                if write_half.write_all(&burst).await.is_err() {
                    return true;
                }
                sent_bytes += burst.len();
            }
            false
        });
        let disconnected = tokio::time::timeout(Duration::from_secs(120), flood)
            .await
            .expect("the gateway disconnects a client that never reads")
            .expect("flood task");
        assert!(
            disconnected,
            "{driver}: 512 MiB of pings and still connected"
        );
        let slow = gateway
            .counter(r#"chatify_gateway_refusals_total{reason="slow_consumer"}"#)
            .await;
        assert!(slow >= 1.0, "{driver}: slow consumer not counted");
        // The socket is finished from the server's side.
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(WAIT, read_half.read_to_end(&mut sink)).await;
    }
}

/// A TCP proxy in front of Redis whose answers can be held back: while `slow` is set, each
/// chunk Redis sends is passed on only after `hold` (requests go through at once, so Redis
/// runs them on time and only their answers are late). Returns the proxied Redis URL.
async fn slow_answering_redis(
    slow: std::sync::Arc<std::sync::atomic::AtomicBool>,
    hold: Duration,
) -> String {
    let url = redis_url();
    let rest = url.strip_prefix("redis://").expect("redis:// url");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let upstream = authority.rsplit('@').next().expect("host:port").to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind proxy");
    let proxied = format!("redis://{}/{path}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                continue;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
            });
            let slow = std::sync::Arc::clone(&slow);
            tokio::spawn(async move {
                let mut chunk = vec![0_u8; 64 * 1024];
                loop {
                    let read = match server_read.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(read) => read,
                    };
                    if slow.load(std::sync::atomic::Ordering::Acquire) {
                        tokio::time::sleep(hold).await;
                    }
                    if client_write.write_all(&chunk[..read]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    proxied
}

/// A connection refused because Redis answered its route registration too late (the
/// bridge gives up after 2 s, the client gets 503) must not leave the route behind: the
/// registration did run in Redis, and a route to a connection that never existed would send
/// the user's pushes to nothing and make them look online until the key expired (this is
/// what made fan-out runs with connect bursts miss connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_answered_too_late_leaves_no_route() {
    let mut redis = redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    for driver in drivers() {
        let slow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let proxied =
            slow_answering_redis(std::sync::Arc::clone(&slow), Duration::from_secs(4)).await;
        let gateway = Gateway::start(driver, &[("REDIS_URL", proxied.as_str())]);
        // The bridge's Redis connection is made (and the node's old routes cleared) on the
        // first connect, while Redis still answers on time.
        let warm = connect(&gateway, &format!("warm-{driver}-{}", std::process::id())).await;
        drop(warm);
        slow.store(true, std::sync::atomic::Ordering::Release);
        let user = format!("late-route-{driver}-{}-{}", std::process::id(), now());
        let (status, body) = http_status_of_upgrade(&gateway, gateway.url(&token(&user))).await;
        assert_eq!(status, 503, "{driver}: {body}");
        // The registration script did run: it marked the user online.
        let presence: Option<String> = redis::cmd("GET")
            .arg(chatify_core::keys::user_presence(&user))
            .query_async(&mut redis)
            .await
            .expect("presence");
        assert_eq!(presence.as_deref(), Some("online"), "{driver}");
        slow.store(false, std::sync::atomic::Ordering::Release);
        // Its route is taken out again (otherwise it would stay for the key's 180 s TTL).
        let routes_key = chatify_core::keys::user_routes(&user);
        let deadline = Instant::now() + 3 * WAIT;
        loop {
            let route: Option<String> = redis::cmd("HGET")
                .arg(&routes_key)
                .arg("device-1")
                .query_async(&mut redis)
                .await
                .expect("route");
            if route.is_none() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{driver}: the refused connection's route stayed: {route:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
