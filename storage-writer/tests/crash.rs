//! A crash between every pair of pipeline steps, then a restart: exactly one stored message
//! per (sender, client_msg_id) with one id and one seq, no gap, no ack before the message
//! is durable, nothing committed past what is stored. Fail points (the `fail` crate) stop
//! the writer at each point as if the process died there: the attempt returns at once,
//! nothing after the point runs and no offset is committed.
//!
//! Fail points are process-wide, so this file holds one test that visits every point in
//! turn (its own test binary: no other test can trip them).

mod common;

use common::{Harness, Send, assert_contiguous, now_ms};
use storage_writer::error::WriterError;

/// (fail point, whether the batch is already in Postgres, and in Mongo, when it fires).
const POINTS: [(&str, bool, bool); 7] = [
    ("writer::after_members", false, false),
    ("writer::after_dedupe", false, false),
    ("writer::after_postgres", true, false),
    ("writer::after_mongo", true, true),
    ("writer::after_cache", true, true),
    ("writer::after_publish", true, true),
    ("writer::before_commit", true, true),
];

const MESSAGES: i64 = 6;

#[tokio::test]
async fn a_crash_between_any_two_steps_loses_and_duplicates_nothing() {
    let h = Harness::new(None).await;
    for (round, (point, in_postgres, in_mongo)) in POINTS.into_iter().enumerate() {
        // client_msg_ids are unique per sender: a sender per round.
        let alice = h.user(&format!("alice{round}"));
        let bob = h.user(&format!("bob{round}"));
        let chat = h.single(&alice, &bob);
        let base = now_ms();
        for i in 0..MESSAGES {
            h.send(&Send {
                from: &alice,
                session: &chat,
                client_msg_id: &format!("c{i}"),
                content: &format!("m{i}"),
                node: "gw-a",
                connection_id: 1,
                received_at_ms: base + i,
            })
            .await;
        }
        // The client resends c1 right away, in the same stream (possibly the same batch).
        h.send(&Send {
            from: &alice,
            session: &chat,
            client_msg_id: "c1",
            content: "m1",
            node: "gw-a",
            connection_id: 1,
            received_at_ms: base + 1_000,
        })
        .await;

        fail::cfg(point, "return").expect("fail point");
        let crashed = h.start_writer(h.config()).finished().await;
        fail::remove(point);
        assert!(
            matches!(crashed, Err(WriterError::InjectedCrash(name)) if name == point),
            "{point}: {crashed:?}"
        );
        let stored = h.postgres_rows(&chat).await.len();
        let mongo = h.mongo_rows(&chat).await.len();
        // The first batch may have held only part of the messages.
        assert_eq!(stored > 0, in_postgres, "{point}: postgres has {stored}");
        assert_eq!(mongo > 0, in_mongo, "{point}: mongo has {mongo}");
        let acked = h.acks("gw-a", &chat);
        if point != "writer::after_publish" && point != "writer::before_commit" {
            // Acks are the last step: tap may lag, but nothing may be there at all.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            assert!(
                h.acks("gw-a", &chat).is_empty(),
                "{point}: acked before durable"
            );
        } else {
            let _ = acked;
        }

        // Restart: the same group resumes from the last committed offset.
        let writer = h.start_writer(h.config());
        let acks = h.wait_acks("gw-a", &chat, MESSAGES as usize).await;
        // The resend may come in a batch after the last ack: committed before the stop, or the
        // next round's writer would read it first and trip its fail point on this round's
        // records alone.
        h.wait_all_committed().await;
        writer.stop().await.expect("stop");
        let rows = h.postgres_rows(&chat).await;
        assert_contiguous(&rows, MESSAGES as usize);
        assert_eq!(
            h.mongo_rows(&chat).await,
            rows,
            "{point}: mongo mirrors postgres"
        );
        // Every ack ever published for this chat names the stored id and seq.
        for (_, _, ack) in h.acks("gw-a", &chat) {
            let row = rows
                .iter()
                .find(|(_, _, client)| *client == ack.client_msg_id)
                .expect("acked message is stored");
            assert_eq!(
                (&ack.message_id, ack.seq as i64),
                (&row.0, row.1),
                "{point}: ack differs from the store"
            );
        }
        assert_eq!(acks.len(), MESSAGES as usize);
    }
}
