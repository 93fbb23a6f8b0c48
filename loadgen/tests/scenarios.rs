//! The chat scenarios end to end: loadgen against a whole Chatify deployment (the real
//! gateway, storage-writer and storage-reader binaries on their own topics, from
//! `chatify_e2e::stack`), checking that what loadgen reports adds up: every send acked,
//! every ack delivered to the other members, no loss, duplicate or gap, and after a drop
//! and catch-up `sync` nothing missing and nothing pushed twice (a message that came both
//! live and in the catch-up page is a resync overlap, counted apart).

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chatify_e2e::stack::{INTERNAL_TOKEN, JWT_SECRET, Stack, StackOptions};
use serde_json::Value;

/// Hang guard for one loadgen run (the runs take a few seconds), not a performance bound.
const RUN_LIMIT: Duration = Duration::from_secs(180);

fn loadgen(args: &[&str]) -> Value {
    let json = std::env::temp_dir().join(format!(
        "loadgen-scenario-{}-{}.json",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--quiet")
        .env("JWT_SECRET", JWT_SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn loadgen");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            panic!("loadgen {args:?} did not end within {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut table = String::new();
    let _ = child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut table);
    eprintln!("{table}");
    assert!(status.success(), "loadgen {args:?}: {status}");
    let text = std::fs::read_to_string(&json).expect("json result");
    let _ = std::fs::remove_file(&json);
    serde_json::from_str(&text).expect("json")
}

fn stack() -> (tokio::runtime::Runtime, Stack) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stack = runtime.block_on(Stack::start(StackOptions::default()));
    (runtime, stack)
}

fn u(result: &Value, path: &[&str]) -> u64 {
    let mut value = result;
    for key in path {
        value = &value[*key];
    }
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{path:?} not a number in {result}"))
}

#[test]
fn chat_pairs_deliver_every_acked_message_once() {
    let (_runtime, stack) = stack();
    let target = format!("ws://{}/ws", stack.gateways[0].ws);
    for codec in ["json", "protobuf"] {
        let result = loadgen(&[
            "chat",
            "--target",
            &target,
            "--codec",
            codec,
            "-n",
            "20",
            "--rate",
            "100",
            "--duration",
            "3",
            "--grace",
            "5",
        ]);
        let sent = u(&result, &["counts", "sent"]);
        assert_eq!(sent, 300, "{codec}: 100/s for 3 s");
        assert_eq!(
            u(&result, &["counts", "acks"]),
            sent,
            "{codec}: {}",
            result["errors"]
        );
        assert_eq!(u(&result, &["counts", "delivers"]), sent, "{codec}");
        let correctness = &result["correctness"];
        assert_eq!(u(&result, &["correctness", "acked"]), sent);
        assert_eq!(u(&result, &["correctness", "lost"]), 0, "{correctness}");
        assert_eq!(
            u(&result, &["correctness", "duplicates"]),
            0,
            "{correctness}"
        );
        assert_eq!(u(&result, &["correctness", "seq_gaps"]), 0, "{correctness}");
        assert_eq!(
            u(&result, &["correctness", "unanswered"]),
            0,
            "{correctness}"
        );
        assert_eq!(u(&result, &["latency_us", "ack", "count"]), sent);
        assert_eq!(u(&result, &["latency_us", "deliver", "count"]), sent);
    }
}

#[test]
fn group_fan_out_reaches_every_other_member() {
    let (_runtime, stack) = stack();
    let target = format!("ws://{}/ws", stack.gateways[0].ws);
    let grpc = format!("http://{}", stack.reader_grpc.expect("reader"));
    let result = loadgen(&[
        "group",
        "--target",
        &target,
        "-n",
        "15",
        "--group-size",
        "5",
        "--rate",
        "30",
        "--duration",
        "2",
        "--grace",
        "5",
        "--grpc-addr",
        &grpc,
        "--internal-token",
        INTERNAL_TOKEN,
    ]);
    let acks = u(&result, &["counts", "acks"]);
    assert_eq!(acks, 60, "{}", result["errors"]);
    assert_eq!(u(&result, &["counts", "delivers"]), acks * 4);
    assert_eq!(
        u(&result, &["correctness", "deliveries_expected"]),
        acks * 4
    );
    assert_eq!(
        u(&result, &["correctness", "lost"]),
        0,
        "{}",
        result["correctness"]
    );
    assert_eq!(u(&result, &["correctness", "seq_gaps"]), 0);
}

#[test]
fn sync_catch_up_misses_nothing_and_a_resync_overlap_is_no_duplicate() {
    let (_runtime, stack) = stack();
    let target = format!("ws://{}/ws", stack.gateways[0].ws);
    // 20 clients in 10 pairs at 100 sends/s for 4 s; half of them drop 1 s in, stay away
    // 1 s (their pair keeps sending to them) and catch up with `sync` from the last seq
    // they saw, while the live deliveries resume on their new connections.
    let result = loadgen(&[
        "sync",
        "--target",
        &target,
        "-n",
        "20",
        "--rate",
        "100",
        "--duration",
        "4",
        "--drop-share",
        "0.5",
        "--drop-after",
        "1",
        "--offline-ms",
        "1000",
        "--grace",
        "5",
    ]);
    let correctness = &result["correctness"];
    // A dropped client does not send while it is away, so fewer than 400 go out.
    assert!(u(&result, &["correctness", "acked"]) > 0, "{correctness}");
    assert!(u(&result, &["counts", "sync_requests"]) >= 10, "{result}");
    assert_eq!(u(&result, &["latency_us", "catch_up", "count"]), 10);
    assert!(u(&result, &["counts", "sync_messages"]) > 0, "{result}");
    assert_eq!(u(&result, &["correctness", "lost"]), 0, "{correctness}");
    assert_eq!(
        u(&result, &["correctness", "duplicates"]),
        0,
        "{correctness}"
    );
    assert_eq!(u(&result, &["correctness", "seq_gaps"]), 0, "{correctness}");
    // Reported, whatever its value in this run (it depends on timing).
    u(&result, &["correctness", "resync_overlap"]);
}
