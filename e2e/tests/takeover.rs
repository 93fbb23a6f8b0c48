//! A writer killed -9 and restarted at once, in the middle of steady traffic, takes the
//! upstream partitions back and acks again. On a broker of its own, so a stuck group cannot
//! disturb other tests.
//!
//! The chaos run (`chaos.rs`) also meets tansu 0.6's coordinator electing the dead member
//! leader of the new generation and handing the new writer an empty assignment (the
//! writer's stall watch, `storage_writer::stall`, makes it rejoin); this smaller schedule
//! has not been seen to provoke that (three runs, 2026-12-03), so it checks the takeover
//! itself.

use std::time::{Duration, Instant};

use chatify_e2e::private::PrivateBroker;
use chatify_e2e::stack::{Stack, StackOptions, WsClient, token};

/// Kill-and-restart rounds (each one a fresh chance for the coordinator to elect the
/// dead member).
const ROUNDS: u64 = 2;
/// How long a writer stays in the group before it is killed.
const HOLD: Duration = Duration::from_secs(12);
/// How long one message may take to be acked after a restart: the session timeout (10 s)
/// plus the stall window (20 s) plus the watch's period, with room to spare.
const ACK_WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_killed_and_restarted_at_once_takes_its_partitions_back() {
    let broker = PrivateBroker::start().await;
    let mut stack = Stack::start(StackOptions {
        reader: false,
        kafka_bootstrap_servers: Some(broker.bootstrap()),
        service_env: vec![("RUST_LOG".into(), "warn,storage_writer=info".into())],
        ..StackOptions::default()
    })
    .await;
    let (alice, bob) = (stack.user("alice"), stack.user("bob"));
    let mut client = WsClient::connect(&stack.gateways[0], &token(&alice, "phone").0).await;
    // Steady traffic from another user, so a writer dies in the middle of its work.
    let mut busy = WsClient::connect(&stack.gateways[0], &token(&bob, "phone").0).await;
    let background = tokio::spawn({
        let alice = alice.clone();
        async move {
            for n in 0.. {
                busy.send_to(&alice, &format!("b{n}"), "traffic").await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    for round in 0..=ROUNDS {
        if round > 0 {
            tokio::time::sleep(HOLD).await;
            // Killed as soon as it has done its work, restarted at once: the new member
            // joins while the dead one, the group's leader, is still in the group.
            let writer = stack.writer.as_mut().expect("writer");
            writer.kill();
            writer.restart();
            writer.wait_ready().await;
        }
        let client_msg_id = format!("m{round}");
        let started = Instant::now();
        let ack = loop {
            client
                .send_to(&bob, &client_msg_id, "after a writer restart")
                .await;
            // A repeated ack of the previous round's resends is not this one.
            let resend_at = Instant::now() + Duration::from_secs(5);
            let mut found = None;
            while let Some(ack) = client
                .try_next_of("ack", resend_at.saturating_duration_since(Instant::now()))
                .await
            {
                if ack["client_msg_id"] == client_msg_id.as_str() {
                    found = Some(ack);
                    break;
                }
            }
            if let Some(ack) = found {
                break ack;
            }
            assert!(
                started.elapsed() < ACK_WAIT,
                "round {round}: no ack within {ACK_WAIT:?}; logs:\n{}",
                stack.logs()
            );
        };
        assert!(ack["seq"].as_u64().is_some(), "{ack}");
    }
    background.abort();
}
