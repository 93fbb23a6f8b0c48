//! The three service binaries start against the real local services, answer `/healthz`,
//! report `/readyz` from real probes, expose `/metrics`, stop cleanly on SIGTERM, and refuse
//! bad config with a message naming the variable.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chatify_e2e::{free_local_addr, free_local_addrs, http_get, service_env, workspace_binary};

const START_WAIT: Duration = Duration::from_secs(60);
const JWT_SECRET: &str = "e2e-test-secret-that-is-long-enough-0123456789";

/// A running service binary, killed if the test fails half-way.
struct Running {
    child: Child,
    admin: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command(binary: &str) -> Command {
    let mut command = Command::new(workspace_binary(binary));
    for variable in [
        "KAFKA_BOOTSTRAP_SERVERS",
        "REDIS_URL",
        "POSTGRES_URL",
        "MONGO_URL",
        "CHATIFY_TOPIC_PREFIX",
    ] {
        command.env(variable, service_env(variable));
    }
    command
        .env("JWT_SECRET", JWT_SECRET)
        .env("RUST_LOG", "warn")
        .env_remove("CHATIFY_ENV_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

fn start(binary: &str, extra_env: &[(&str, String)]) -> Running {
    let [admin, grpc, ws, tcp] = free_local_addrs();
    let mut command = command(binary);
    command.env("CHATIFY_ADMIN_ADDR", admin.to_string());
    command.env("CHATIFY_GRPC_ADDR", grpc.to_string());
    command.env("CHATIFY_WS_ADDR", ws.to_string());
    command.env("CHATIFY_TCP_ADDR", tcp.to_string());
    for (variable, value) in extra_env {
        command.env(variable, value);
    }
    let child = command.spawn().expect("spawn service binary");
    let running = Running { child, admin };
    wait_for(&running, "/healthz", 200);
    running
}

/// Polls an admin path until it answers `status` (readiness may take a few probe rounds).
fn wait_for(running: &Running, path: &str, status: u16) -> String {
    let deadline = Instant::now() + START_WAIT;
    let mut last = None;
    while Instant::now() < deadline {
        match http_get(running.admin, path) {
            Ok((code, body)) if code == status => return body,
            other => last = Some(other),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "{path} on {} never answered {status}; last: {last:?}",
        running.admin
    );
}

fn stop(mut running: Running) {
    let pid = running.child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = running.child.try_wait().expect("wait") {
            assert!(status.success(), "exited with {status} after SIGTERM");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "did not stop within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_ready(binary: &str, probes: &[&str]) {
    let running = start(binary, &[]);
    let body = wait_for(&running, "/readyz", 200);
    for probe in probes {
        assert!(
            body.contains(&format!("{probe}: ok")),
            "{binary} /readyz: {body}"
        );
    }
    let (status, metrics) = http_get(running.admin, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("chatify_build_info"), "{metrics}");
    stop(running);
}

#[test]
fn gateway_starts_and_is_ready() {
    assert_ready("gateway-uring", &["kafka", "redis"]);
}

#[test]
fn storage_writer_starts_and_is_ready() {
    assert_ready("storage-writer", &["kafka", "redis", "postgres", "mongo"]);
}

#[test]
fn storage_reader_starts_and_is_ready() {
    assert_ready("storage-reader", &["kafka", "redis", "postgres", "mongo"]);
}

#[test]
fn a_store_that_is_down_makes_readyz_fail_but_not_healthz() {
    // Nothing listens on a port we just released.
    let closed = free_local_addr();
    let running = start(
        "storage-writer",
        &[("REDIS_URL", format!("redis://{closed}"))],
    );
    let (status, body) = http_get(running.admin, "/readyz").expect("readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("postgres: ok"), "{body}");
    assert!(
        body.lines()
            .any(|line| line.starts_with("redis: ") && !line.ends_with(": ok")),
        "{body}"
    );
    assert_eq!(http_get(running.admin, "/healthz").expect("healthz").0, 200);
    stop(running);
}

#[test]
fn bad_config_fails_fast_naming_the_variable() {
    let cases: [(&str, &str, &str); 5] = [
        (
            "storage-writer",
            "POSTGRES_URL",
            "mysql://127.0.0.1/chatify",
        ),
        ("storage-reader", "MONGO_URL", "http://127.0.0.1:27017"),
        ("gateway-uring", "JWT_SECRET", "short"),
        ("gateway-uring", "CHATIFY_ADMIN_ADDR", "not-an-address"),
        (
            "storage-writer",
            "KAFKA_BOOTSTRAP_SERVERS",
            "kafka-without-port",
        ),
    ];
    for (binary, variable, value) in cases {
        let output = command(binary)
            .env("CHATIFY_ADMIN_ADDR", free_local_addr().to_string())
            .env(variable, value)
            .output()
            .expect("run binary");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{binary} accepted {variable}={value}"
        );
        assert!(
            stderr.contains(variable),
            "{binary} with bad {variable}: {stderr}"
        );
    }
}
