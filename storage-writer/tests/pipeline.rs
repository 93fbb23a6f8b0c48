//! The writer pipeline end to end against the real broker, Redis, Postgres and
//! MongoDB-protocol server: what is stored, acked and delivered, resends, replays, Redis
//! losing its data, stores going down, group fan-out, refusals and poison records.

mod common;

use std::collections::BTreeMap;

use chatify_core::ids::SessionId;
use chatify_core::keys;
use chatify_e2e::TcpProxy;
use chatify_proto::bus::v1::message_event;
use chatify_proto::client::v1::ErrorCode;
use common::{Harness, Send, assert_contiguous, now_ms, wait_until};

#[tokio::test]
async fn stores_acks_and_delivers_a_single_chat_in_order() {
    let mut h = Harness::new(None).await;
    let (alice, bob) = (h.user("alice"), h.user("bob"));
    let chat = h.single(&alice, &bob);
    h.route(&alice, "phone", "gw-a", 1).await;
    h.route(&alice, "laptop", "gw-b", 2).await;
    h.route(&bob, "phone", "gw-b", 7).await;
    let writer = h.start_writer(h.config());
    let base = now_ms();
    for i in 0..20 {
        h.send(&Send {
            from: &alice,
            session: &chat,
            client_msg_id: &format!("c{i}"),
            content: &format!("hello {i}"),
            node: "gw-a",
            connection_id: 1,
            received_at_ms: base + i,
        })
        .await;
    }
    let acks = h.wait_acks("gw-a", &chat, 20).await;
    let rows = h.postgres_rows(&chat).await;
    assert_contiguous(&rows, 20);
    assert_eq!(h.mongo_rows(&chat).await, rows, "mongo mirrors postgres");
    for ack in &acks {
        let row = &rows[ack.seq as usize - 1];
        assert_eq!((&ack.message_id, &ack.client_msg_id), (&row.0, &row.2));
    }
    // The origin connection is named; every device of alice gets the ack by user id.
    let (connections, users, _) = &h.acks("gw-a", &chat)[0];
    assert_eq!((connections, users), (&vec![1], &vec![alice.clone()]));
    let on_b = h.acks("gw-b", &chat);
    assert!(
        on_b.iter()
            .all(|(connections, users, _)| connections.is_empty() && users == &vec![alice.clone()])
    );

    // Bob's phone and alice's laptop (both on gw-b) get each message once, in seq order;
    // the sending connection does not get its own message back.
    let deliveries = wait_until("20 deliveries on gw-b", || {
        let found = h.deliveries("gw-b", &chat);
        (found.len() >= 20).then_some(found)
    })
    .await;
    let seqs: Vec<u64> = deliveries.iter().map(|(_, message)| message.seq).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    assert!(
        deliveries
            .iter()
            .all(|(connections, _)| connections == &vec![2, 7])
    );
    assert!(h.deliveries("gw-a", &chat).is_empty());
    assert_eq!(deliveries[3].1.content, "hello 3");

    // Redis: hot cache, session state, the sender's cursor, both users' session lists.
    let mut redis = h.redis.clone();
    let cached: usize = redis::cmd("ZCARD")
        .arg(keys::session_hot_cache(&chat))
        .query_async(&mut redis)
        .await
        .expect("zcard");
    assert_eq!(cached, 20);
    let last_seq: String = redis::cmd("HGET")
        .arg(keys::session_state(&chat))
        .arg("last_seq")
        .query_async(&mut redis)
        .await
        .expect("hget");
    assert_eq!(last_seq, "20");
    let cursor: String = redis::cmd("HGET")
        .arg(keys::user_cursors(&alice))
        .arg(chat.to_string())
        .query_async(&mut redis)
        .await
        .expect("hget");
    assert_eq!(cursor, "20");
    let bob_sessions: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys::user_sessions(&bob))
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .expect("zrange");
    assert_eq!(bob_sessions, vec![chat.to_string()]);
    let members: (String,) = sqlx::query_as(
        "SELECT string_agg(user_id, ',' ORDER BY user_id) FROM session_members WHERE session_id = $1",
    )
    .bind(chat.to_string())
    .fetch_one(&h.postgres)
    .await
    .expect("members");
    assert_eq!(members.0, format!("{alice},{bob}"));
    let stored_events = wait_until("20 stored events", || {
        let events: Vec<_> = h
            .message_events()
            .into_iter()
            .filter(|event| {
                event.session_id == chat.to_string()
                    && event.kind == message_event::Kind::Stored as i32
            })
            .collect();
        (events.len() >= 20).then_some(events)
    })
    .await;
    assert_eq!(stored_events.len(), 20);
    writer.stop().await.expect("graceful stop");
}

#[tokio::test]
async fn a_resend_gets_the_original_ack_and_a_replay_stores_nothing_new() {
    let h = Harness::new(None).await;
    let (alice, bob) = (h.user("alice"), h.user("bob"));
    let chat = h.single(&alice, &bob);
    let writer = h.start_writer(h.config());
    let base = now_ms();
    for i in 0..5 {
        h.send(&Send {
            from: &alice,
            session: &chat,
            client_msg_id: &format!("c{i}"),
            content: "x",
            node: "gw-a",
            connection_id: 1,
            received_at_ms: base + i,
        })
        .await;
    }
    let first = h.wait_acks("gw-a", &chat, 5).await;
    // The client lost its connection and resends c2 later, through another gateway.
    h.send(&Send {
        from: &alice,
        session: &chat,
        client_msg_id: "c2",
        content: "x",
        node: "gw-b",
        connection_id: 9,
        received_at_ms: base + 10_000,
    })
    .await;
    let resent = h.wait_acks("gw-b", &chat, 1).await;
    assert_eq!(resent[0].message_id, first[2].message_id);
    assert_eq!(resent[0].seq, 3);
    writer.stop().await.expect("stop");

    // A whole replay of the topic (a new consumer group reads it from the start).
    let mut config = h.config();
    config.consumer_group = format!("{}-replay", h.group);
    let replay = h.start_writer(config);
    wait_until("the replay's acks", || {
        let acks = h.acks("gw-a", &chat);
        (acks.len() >= 10).then_some(())
    })
    .await;
    replay.stop().await.expect("stop");
    for (_, _, ack) in h.acks("gw-a", &chat) {
        let original = first
            .iter()
            .find(|a| a.client_msg_id == ack.client_msg_id)
            .expect("known");
        assert_eq!(
            (&ack.message_id, ack.seq),
            (&original.message_id, original.seq)
        );
    }
    let rows = h.postgres_rows(&chat).await;
    assert_contiguous(&rows, 5);
    assert_eq!(h.mongo_rows(&chat).await, rows);

    // The counter did not move: the next message is seq 6.
    let writer = h.start_writer(h.config());
    h.send(&Send {
        from: &alice,
        session: &chat,
        client_msg_id: "c5",
        content: "x",
        node: "gw-a",
        connection_id: 1,
        received_at_ms: base + 20_000,
    })
    .await;
    wait_until("seq 6", || {
        h.acks("gw-a", &chat)
            .iter()
            .any(|(_, _, ack)| ack.client_msg_id == "c5" && ack.seq == 6)
            .then_some(())
    })
    .await;
    writer.stop().await.expect("stop");
}

#[tokio::test]
async fn redis_losing_its_data_mid_stream_neither_repeats_nor_skips_a_seq() {
    // A Redis database of its own, so flushing it touches no other test.
    let h = Harness::new(Some(9)).await;
    let (alice, bob) = (h.user("alice"), h.user("bob"));
    let chat = h.single(&alice, &bob);
    let writer = h.start_writer(h.config());
    let base = now_ms();
    let send = |i: i64, received: i64| {
        let client = format!("c{i}");
        let (h, alice, chat) = (&h, &alice, &chat);
        async move {
            h.send(&Send {
                from: alice,
                session: chat,
                client_msg_id: &client,
                content: "x",
                node: "gw-a",
                connection_id: 1,
                received_at_ms: received,
            })
            .await
        }
    };
    for i in 0..5 {
        send(i, base + i).await;
    }
    let before = h.wait_acks("gw-a", &chat, 5).await;
    let mut redis = h.redis.clone();
    redis::cmd("FLUSHDB")
        .exec_async(&mut redis)
        .await
        .expect("flushdb");
    // A resend of c3 (its dedupe key is gone) and five new messages.
    send(3, base + 50_000).await;
    for i in 5..10 {
        send(i, base + i).await;
    }
    let after = h.wait_acks("gw-a", &chat, 10).await;
    let rows = h.postgres_rows(&chat).await;
    assert_contiguous(&rows, 10);
    assert_eq!(h.mongo_rows(&chat).await, rows);
    let c3: Vec<_> = h
        .acks("gw-a", &chat)
        .into_iter()
        .filter(|(_, _, ack)| ack.client_msg_id == "c3")
        .map(|(_, _, ack)| (ack.message_id, ack.seq))
        .collect();
    assert!(c3.len() >= 2, "the resend was answered");
    assert!(
        c3.iter()
            .all(|ack| *ack == (before[3].message_id.clone(), 4)),
        "{c3:?}"
    );
    assert_eq!(after.last().map(|ack| ack.seq), Some(10));
    writer.stop().await.expect("stop");
}

#[tokio::test]
async fn a_store_that_is_down_pauses_the_writer_and_nothing_is_lost() {
    let h = Harness::new(None).await;
    let postgres = TcpProxy::in_front_of(&h.postgres_url).await.expect("proxy");
    let mongo = TcpProxy::in_front_of(&h.mongo_url).await.expect("proxy");
    let mut config = h.config();
    config.postgres.postgres_url = postgres.url_for(&h.postgres_url);
    config.mongo.mongo_url = format!(
        "{}?directConnection=true&serverSelectionTimeoutMS=1000&connectTimeoutMS=1000",
        mongo.url_for(&h.mongo_url).trim_end_matches('/')
    );
    let (alice, bob) = (h.user("alice"), h.user("bob"));
    let chat = h.single(&alice, &bob);
    let writer = h.start_writer(config);
    let base = now_ms();
    let mut sent = 0;
    let mut send_batch = async |count: i64| {
        for _ in 0..count {
            h.send(&Send {
                from: &alice,
                session: &chat,
                client_msg_id: &format!("c{sent}"),
                content: "x",
                node: "gw-a",
                connection_id: 1,
                received_at_ms: base + sent,
            })
            .await;
            sent += 1;
        }
    };
    send_batch(3).await;
    h.wait_acks("gw-a", &chat, 3).await;

    for (store, down) in [("postgres", &postgres), ("mongo", &mongo)] {
        down.set_down();
        let acked_before = h.wait_acks("gw-a", &chat, 0).await.len();
        let stored_before = h.postgres_rows(&chat).await.len();
        send_batch(4).await;
        // While the store is down nothing new is acked (and Postgres gets nothing while it
        // is the one down).
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        assert_eq!(
            h.wait_acks("gw-a", &chat, 0).await.len(),
            acked_before,
            "acked while {store} was down"
        );
        if store == "postgres" {
            assert_eq!(h.postgres_rows(&chat).await.len(), stored_before);
        }
        down.set_up();
        h.wait_acks("gw-a", &chat, acked_before + 4).await;
    }
    let rows = h.postgres_rows(&chat).await;
    assert_contiguous(&rows, 11);
    assert_eq!(h.mongo_rows(&chat).await, rows);
    writer.stop().await.expect("stop");
}

#[tokio::test]
async fn a_group_fans_out_once_per_node_and_strangers_are_refused() {
    let mut h = Harness::new(None).await;
    let owner = h.user("owner");
    let group = SessionId::group(&format!("g{}", h.tag)).expect("group id");
    let members: Vec<String> = (0..9).map(|i| h.user(&format!("m{i}"))).collect();
    sqlx::query(
        "INSERT INTO sessions (session_id, kind, name, owner_id) VALUES ($1, 'group', 'g', $2)",
    )
    .bind(group.to_string())
    .bind(&owner)
    .execute(&h.postgres)
    .await
    .expect("group");
    let mut roles = vec![(owner.clone(), "owner")];
    roles.extend(members.iter().map(|member| (member.clone(), "member")));
    for (user, role) in &roles {
        sqlx::query("INSERT INTO session_members (session_id, user_id, role) VALUES ($1, $2, $3)")
            .bind(group.to_string())
            .bind(user)
            .bind(role)
            .execute(&h.postgres)
            .await
            .expect("member");
    }
    // m0..m3 on gw-a, m4..m8 on gw-b; the owner on gw-a as connection 100.
    h.route(&owner, "phone", "gw-a", 100).await;
    for (i, member) in members.iter().enumerate() {
        let node = if i < 4 { "gw-a" } else { "gw-b" };
        h.route(member, "phone", node, 10 + i as u64).await;
    }
    let writer = h.start_writer(h.config());
    let base = now_ms();
    h.send(&Send {
        from: &owner,
        session: &group,
        client_msg_id: "hello",
        content: "hi all",
        node: "gw-a",
        connection_id: 100,
        received_at_ms: base,
    })
    .await;
    let stranger = h.user("stranger");
    h.send(&Send {
        from: &stranger,
        session: &group,
        client_msg_id: "spam",
        content: "buy",
        node: "gw-b",
        connection_id: 55,
        received_at_ms: base + 1,
    })
    .await;
    let nowhere = SessionId::group(&format!("none{}", h.tag)).expect("group id");
    h.send(&Send {
        from: &owner,
        session: &nowhere,
        client_msg_id: "lost",
        content: "?",
        node: "gw-a",
        connection_id: 100,
        received_at_ms: base + 2,
    })
    .await;
    h.wait_acks("gw-a", &group, 1).await;
    let expected: BTreeMap<&str, Vec<(Vec<u64>, u64)>> = [
        ("gw-a", vec![(vec![10, 11, 12, 13], 1)]),
        ("gw-b", vec![(vec![14, 15, 16, 17, 18], 1)]),
    ]
    .into_iter()
    .collect();
    let per_node = wait_until("one delivery record per node", || {
        let found: BTreeMap<&str, Vec<(Vec<u64>, u64)>> = ["gw-a", "gw-b"]
            .into_iter()
            .map(|node| {
                let found = h
                    .deliveries(node, &group)
                    .into_iter()
                    .map(|(connections, message)| (connections, message.seq))
                    .collect();
                (node, found)
            })
            .collect();
        (found == expected).then_some(found)
    })
    .await;
    assert_eq!(per_node, expected);
    let refused = wait_until("the stranger's refusal", || {
        h.errors("gw-b")
            .into_iter()
            .find(|(_, error)| error.client_msg_id.as_deref() == Some("spam"))
    })
    .await;
    assert_eq!(refused.0, vec![55]);
    assert_eq!(refused.1.code, ErrorCode::NotMember as i32);
    let unknown = wait_until("the unknown group's refusal", || {
        h.errors("gw-a")
            .into_iter()
            .find(|(_, error)| error.client_msg_id.as_deref() == Some("lost"))
    })
    .await;
    assert_eq!(unknown.1.code, ErrorCode::NotFound as i32);
    let rows = h.postgres_rows(&group).await;
    assert_eq!(rows.len(), 1, "only the member's message is stored");
    assert!(h.postgres_rows(&nowhere).await.is_empty());
    writer.stop().await.expect("stop");
}

#[tokio::test]
async fn poison_records_go_to_the_dead_letter_topic_without_blocking() {
    let h = Harness::new(None).await;
    let (alice, bob) = (h.user("alice"), h.user("bob"));
    let chat = h.single(&alice, &bob);
    let writer = h.start_writer(h.config());
    let key = chat.to_string();
    h.produce_raw(&key, b"\xff\x01garbage").await;
    let base = now_ms();
    h.send(&Send {
        from: &alice,
        session: &chat,
        client_msg_id: "huge",
        content: &"x".repeat(70 * 1024),
        node: "gw-a",
        connection_id: 3,
        received_at_ms: base,
    })
    .await;
    h.send(&Send {
        from: &alice,
        session: &chat,
        client_msg_id: "fine",
        content: "ok",
        node: "gw-a",
        connection_id: 3,
        received_at_ms: base + 1,
    })
    .await;
    let acks = h.wait_acks("gw-a", &chat, 1).await;
    assert_eq!((acks[0].client_msg_id.as_str(), acks[0].seq), ("fine", 1));
    let letters = wait_until("two dead letters", || {
        let letters = h.dead_letters();
        (letters.len() >= 2).then_some(letters)
    })
    .await;
    assert!(
        letters[0].reason.contains("not an UpstreamCommand"),
        "{letters:?}"
    );
    assert_eq!(letters[0].original, b"\xff\x01garbage");
    assert!(letters[1].reason.contains("more than"), "{letters:?}");
    let too_large = wait_until("the too-large error", || {
        h.errors("gw-a")
            .into_iter()
            .find(|(_, error)| error.client_msg_id.as_deref() == Some("huge"))
    })
    .await;
    assert_eq!(too_large.1.code, ErrorCode::TooLarge as i32);
    assert_eq!(too_large.0, vec![3]);
    assert_eq!(h.postgres_rows(&chat).await.len(), 1);
    writer.stop().await.expect("stop");
}

#[tokio::test]
async fn a_rebalance_mid_stream_neither_loses_nor_duplicates() {
    let h = Harness::new(None).await;
    let sender = h.user("alice");
    let chats: Vec<SessionId> = (0..8)
        .map(|i| h.single(&sender, &h.user(&format!("peer{i}"))))
        .collect();
    // Two members of one group share the partitions; one leaves mid-stream, another
    // joins: each partition moves at least once while records flow.
    let first = h.start_writer(h.config());
    let second = h.start_writer(h.config());
    let base = now_ms();
    let per_chat = 25;
    let mut third = None;
    for i in 0..per_chat {
        for (c, chat) in chats.iter().enumerate() {
            h.send(&Send {
                from: &sender,
                session: chat,
                client_msg_id: &format!("c{c}-{i}"),
                content: "x",
                node: "gw-a",
                connection_id: 1,
                received_at_ms: base + i as i64,
            })
            .await;
        }
        if i == 8 {
            first.shutdown.cancel();
        }
        if i == 16 {
            third = Some(h.start_writer(h.config()));
        }
    }
    first.finished().await.expect("first stops cleanly");
    for chat in &chats {
        h.wait_acks("gw-a", chat, per_chat).await;
        let rows = h.postgres_rows(chat).await;
        assert_contiguous(&rows, per_chat);
        assert_eq!(h.mongo_rows(chat).await, rows);
        for (_, _, ack) in h.acks("gw-a", chat) {
            let row = rows
                .iter()
                .find(|(_, _, client)| *client == ack.client_msg_id)
                .expect("stored");
            assert_eq!((&ack.message_id, ack.seq as i64), (&row.0, row.1));
        }
    }
    second.stop().await.expect("stop");
    third.expect("started").stop().await.expect("stop");
}
