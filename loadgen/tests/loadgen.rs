//! Black-box tests of the loadgen binary: against the real gateway binary on loopback (needs
//! Redis from `scripts/services.sh up`, the gateway's token deny-list), and against tiny
//! misbehaving servers in the test that refuse, close, stay silent or answer garbage — each
//! must be reported by its code in the JSON result, and the run must end.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SECRET: &str = "loadgen-test-secret-0123456789-abcdefghij";
/// Longest a loadgen run in these tests may take before it counts as hung (the runs are
/// configured to take a few seconds; this is a hang guard, not a performance threshold).
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Variables of `<repo>/.local/chatify.env` (written by `scripts/services.sh up`).
fn repo_env() -> HashMap<String, String> {
    let mut dir: Option<&Path> = Some(Path::new(env!("CARGO_MANIFEST_DIR")));
    while let Some(current) = dir {
        let candidate = current.join(".local/chatify.env");
        if let Ok(text) = std::fs::read_to_string(&candidate) {
            return text
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .filter_map(|line| line.strip_prefix("export ").or(Some(line)))
                .filter_map(|line| line.split_once('='))
                .map(|(key, value)| {
                    let value = value.trim().trim_matches('"').trim_matches('\'');
                    (key.trim().to_owned(), value.to_owned())
                })
                .collect();
        }
        dir = current.parent();
    }
    panic!(
        "no .local/chatify.env above {}: run scripts/services.sh up",
        env!("CARGO_MANIFEST_DIR")
    );
}

/// A workspace binary built next to this test, in the same profile.
fn workspace_binary(name: &str) -> PathBuf {
    let test_exe = std::env::current_exe().expect("test executable path");
    let profile_dir = test_exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build -p {name}` first (scripts/dev test builds every binary)",
        path.display()
    );
    path
}

fn free_addrs<const N: usize>() -> [SocketAddr; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("ephemeral port"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("local addr"))
}

struct Gateway {
    child: Child,
    ws: SocketAddr,
    tcp: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn start() -> Self {
        let [ws, tcp, admin] = free_addrs();
        let mut command = Command::new(workspace_binary("gateway-uring"));
        command
            .envs(repo_env())
            .env("JWT_SECRET", SECRET)
            .env("CHATIFY_WS_ADDR", ws.to_string())
            .env("CHATIFY_TCP_ADDR", tcp.to_string())
            .env("CHATIFY_ADMIN_ADDR", admin.to_string())
            .env("CHATIFY_SHARDS", "1")
            .env("RUST_LOG", "warn")
            .env_remove("CHATIFY_ENV_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = command.spawn().expect("spawn gateway");
        let gateway = Self { child, ws, tcp };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(ws).is_err()
            || std::net::TcpStream::connect(tcp).is_err()
        {
            assert!(Instant::now() < deadline, "gateway did not listen in time");
            std::thread::sleep(Duration::from_millis(50));
        }
        gateway
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.ws)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Runs loadgen with `args` (and `--json`), waits for it within [`RUN_LIMIT`], returns the
/// parsed result.
fn loadgen(args: &[&str]) -> Value {
    let json = std::env::temp_dir().join(format!(
        "loadgen-test-{}-{}.json",
        std::process::id(),
        uuid_like()
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--quiet")
        .env("JWT_SECRET", SECRET)
        .env_remove("LOADGEN_TARGET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn loadgen");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait loadgen") {
            break status;
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            panic!("loadgen {args:?} did not end within {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut table = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut table)
        .expect("read table");
    eprintln!("{table}");
    assert!(status.success(), "loadgen {args:?} failed: {status}");
    let text = std::fs::read_to_string(&json).expect("json result written");
    let _ = std::fs::remove_file(&json);
    serde_json::from_str(&text).expect("valid json result")
}

fn uuid_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos()
}

fn count(result: &Value, section: &str, key: &str) -> u64 {
    result[section][key].as_u64().unwrap_or(0)
}

#[test]
fn connect_holds_every_connection_and_reports_the_servers_memory() {
    let gateway = Gateway::start();
    let pid = gateway.pid().to_string();
    let result = loadgen(&[
        "connect",
        "--target",
        &gateway.ws_url(),
        "-n",
        "300",
        "--connect-rate",
        "1000",
        "--duration",
        "2",
        "--grace",
        "0",
        "--heartbeat-ms",
        "500",
        "--server-pid",
        &pid,
    ]);
    assert_eq!(result["scenario"], "connect");
    assert_eq!(result["connections"]["connected"], 300);
    assert_eq!(result["connections"]["failed"], 0);
    assert_eq!(result["connections"]["open_at_end"], 300);
    assert_eq!(result["connections"]["dropped_early"], 0);
    assert!(
        result["errors"].as_object().expect("errors").is_empty(),
        "{}",
        result["errors"]
    );
    // Heartbeats were answered (counted as other frames, not timed).
    assert!(
        count(&result, "counts", "frames_other") > 0,
        "{}",
        result["counts"]
    );
    let server = &result["server"];
    assert_eq!(server["pid"].as_u64(), Some(u64::from(gateway.pid())));
    assert!(server["rss_bytes_before"].as_u64().unwrap_or(0) > 0);
    assert!(server["rss_bytes_per_connection"].is_number(), "{server}");
    assert!(
        result["cpu_seconds"]["server"].is_number(),
        "{}",
        result["cpu_seconds"]
    );
    assert!(result["cpu_seconds"]["loadgen"].is_number());
    assert_eq!(result["latency_us"]["connect"]["count"], 300);
    // Every close at the end was answered by the gateway's 1000.
    assert_eq!(
        count(&result, "closes", "1000"),
        300,
        "{}",
        result["closes"]
    );
}

#[test]
fn ping_at_a_rate_reports_pongs_and_percentiles_on_json_and_protobuf() {
    let gateway = Gateway::start();
    for codec in ["json", "protobuf"] {
        let result = loadgen(&[
            "ping",
            "--target",
            &gateway.ws_url(),
            "--codec",
            codec,
            "-n",
            "50",
            "--rate",
            "1000",
            "--duration",
            "2",
            "--grace",
            "1",
            "--heartbeat-ms",
            "0",
        ]);
        let sent = count(&result, "counts", "sent");
        let pongs = count(&result, "counts", "pongs");
        // Open loop: 1000/s for 2 s is 2000 pings, each answered.
        assert_eq!(sent, 2000, "{codec}: {}", result["counts"]);
        assert_eq!(pongs, sent, "{codec}: every ping answered");
        let pong = &result["latency_us"]["pong"];
        assert_eq!(pong["count"], 2000);
        let p50 = pong["p50"].as_u64().expect("p50");
        let p99 = pong["p99"].as_u64().expect("p99");
        let max = pong["max"].as_u64().expect("max");
        assert!(p50 >= 1 && p50 <= p99 && p99 <= max, "{pong}");
        assert!(result["histograms"]["pong"].is_string());
        assert!(
            result["errors"].as_object().expect("errors").is_empty(),
            "{}",
            result["errors"]
        );
        assert!(result["series"].as_array().expect("series").len() >= 2);
    }
}

#[test]
fn ping_at_max_over_tcp_and_two_processes_merges_results() {
    let gateway = Gateway::start();
    let tcp = format!("tcp://{}", gateway.tcp);
    let result = loadgen(&[
        "ping",
        "--target",
        &tcp,
        "-n",
        "40",
        "--rate",
        "max",
        "--in-flight",
        "2",
        "--duration",
        "1",
        "--grace",
        "1",
        "--processes",
        "2",
    ]);
    assert_eq!(result["transport"], "tcp");
    assert_eq!(result["processes"], 2);
    assert_eq!(result["connections"]["connected"], 40);
    let pongs = count(&result, "counts", "pongs");
    assert!(pongs > 0, "{}", result["counts"]);
    // The merged histogram holds exactly the measured pongs of both workers.
    let timed = result["latency_us"]["pong"]["count"]
        .as_u64()
        .expect("count");
    assert!(timed > 0 && timed <= pongs);
    assert_eq!(result["source_addrs"].as_array().expect("addrs").len(), 2);
}

#[test]
fn wrong_tokens_are_reported_as_http_401() {
    let gateway = Gateway::start();
    let result = loadgen(&[
        "connect",
        "--target",
        &gateway.ws_url(),
        "-n",
        "20",
        "--duration",
        "1",
        "--jwt-secret",
        "not-the-gateway-secret-0123456789-abcdefgh",
    ]);
    assert_eq!(result["connections"]["connected"], 0);
    assert_eq!(result["connections"]["failed"], 20);
    assert_eq!(
        count(&result, "errors", "http:401"),
        20,
        "{}",
        result["errors"]
    );
}

/// A server that answers every connection with `answer` (after reading the request) and
/// then holds or closes it.
fn tiny_server(answer: &'static [u8], hold: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.read(&mut request);
            let _ = stream.write_all(answer);
            if hold {
                held.push(stream);
            }
        }
    });
    addr
}

#[test]
fn misbehaving_servers_are_reported_by_code_and_the_run_ends() {
    let cases: Vec<(&str, SocketAddr, &str)> = vec![
        (
            "garbage instead of http",
            tiny_server(b"\x00\x01\x02 hello\r\n\r\n", false),
            "handshake:garbage",
        ),
        (
            "http refusal",
            tiny_server(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy",
                false,
            ),
            "http:503",
        ),
        (
            "101 without the right accept key",
            tiny_server(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: bm90IHRoZSBrZXk=\r\n\r\n",
                true,
            ),
            "handshake:bad_accept",
        ),
        (
            "closes without answering",
            tiny_server(b"", false),
            "handshake:closed",
        ),
        (
            "accepts and stays silent",
            tiny_server(b"", true),
            "connect:timeout",
        ),
    ];
    for (what, addr, expected) in cases {
        let target = format!("ws://{addr}/ws");
        let result = loadgen(&[
            "ping",
            "--target",
            &target,
            "-n",
            "10",
            "--rate",
            "100",
            "--duration",
            "1",
            "--grace",
            "0",
            "--connect-timeout-ms",
            "1000",
        ]);
        assert_eq!(result["connections"]["connected"], 0, "{what}");
        assert_eq!(
            count(&result, "errors", expected),
            10,
            "{what}: {}",
            result["errors"]
        );
    }
    // Nothing listens: refused.
    let [closed] = free_addrs();
    let result = loadgen(&[
        "connect",
        "--target",
        &format!("ws://{closed}/ws"),
        "-n",
        "5",
        "--duration",
        "1",
    ]);
    assert_eq!(
        count(&result, "errors", "connect:refused"),
        5,
        "{}",
        result["errors"]
    );
    assert!(
        result["hints"]
            .as_array()
            .expect("hints")
            .iter()
            .any(|hint| hint.as_str().unwrap_or("").contains("somaxconn")),
        "{}",
        result["hints"]
    );
}

/// After a valid upgrade the server closes with 1008, or sends bytes that are no frame.
#[test]
fn closes_and_garbage_after_the_upgrade_are_counted() {
    for (answer, section, key) in [
        (&b"\x88\x0b\x03\xf0slow down"[..], "closes", "1008"),
        (
            &b"\xf1\x05hello"[..],
            "errors",
            "ws:reserved_bits_or_opcode",
        ),
        (&b"\x81\x07garbage"[..], "errors", "decode:json"),
    ] {
        let addr = upgrading_server(answer);
        let result = loadgen(&[
            "ping",
            "--target",
            &format!("ws://{addr}/ws"),
            "-n",
            "4",
            "--rate",
            "100",
            "--duration",
            "1",
            "--grace",
            "0",
        ]);
        assert_eq!(result["connections"]["connected"], 4, "{key}");
        assert_eq!(count(&result, section, key), 4, "{key}: {result}");
    }
}

/// Completes the WebSocket upgrade properly, then writes `after` and holds the socket.
fn upgrading_server(after: &'static [u8]) -> SocketAddr {
    use base64::Engine as _;
    use sha1::Digest as _;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(read) => request.extend_from_slice(&chunk[..read]),
                }
            }
            let text = String::from_utf8_lossy(&request);
            let key = text
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("sec-websocket-key")
                        .then(|| value.trim().to_owned())
                })
                .unwrap_or_default();
            let mut sha1 = sha1::Sha1::new();
            sha1.update(key.as_bytes());
            sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
            let accept = base64::engine::general_purpose::STANDARD.encode(sha1.finalize());
            let response = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            let _ = stream.write_all(response.as_bytes());
            let _ = stream.write_all(after);
            held.push(stream);
        }
    });
    addr
}
