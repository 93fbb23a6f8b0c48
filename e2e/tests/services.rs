//! Each backing service really carries data: the same data goes in and comes out, through
//! the same client crates the services use. These tests need `scripts/services.sh up`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chatify_e2e::{service_env, unique_name};
use futures::TryStreamExt as _;
use mongodb::bson::{Document, doc};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};

const RECORDS: usize = 40;
const KEYS: usize = 5;
const WAIT: Duration = Duration::from_secs(30);

fn kafka_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", service_env("KAFKA_BOOTSTRAP_SERVERS"));
    config
}

fn consumer(group: &str) -> StreamConsumer {
    kafka_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .create()
        .expect("consumer config is valid")
}

/// (key, value) pairs read, in the order the consumer saw them.
async fn consume(consumer: &StreamConsumer, count: usize) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let message = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} records within {WAIT:?}", seen.len()))
            .expect("consume");
        let text =
            |bytes: Option<&[u8]>| String::from_utf8(bytes.expect("set").to_vec()).expect("utf8");
        seen.push((text(message.key()), text(message.payload())));
    }
    seen
}

#[tokio::test]
async fn kafka_consumer_group_resumes_at_the_committed_offset() {
    let topic = unique_name("chatify-test-wiring");
    let admin: AdminClient<DefaultClientContext> = kafka_config().create().expect("admin");
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 4, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(WAIT)),
        )
        .await
        .expect("create topics request");
    assert!(
        created.iter().all(Result::is_ok),
        "create {topic}: {created:?}"
    );

    // Keyed records: each key must come back in the order it was produced.
    let producer: FutureProducer = kafka_config()
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    for index in 0..RECORDS {
        let key = format!("session-{}", index % KEYS);
        let value = format!("{index}");
        producer
            .send(FutureRecord::to(&topic).key(&key).payload(&value), WAIT)
            .await
            .unwrap_or_else(|(error, _)| panic!("produce {index}: {error}"));
    }

    let group = unique_name("chatify-test-group");
    let first = consumer(&group);
    first.subscribe(&[&topic]).expect("subscribe");
    let first_half = consume(&first, RECORDS / 2).await;
    first
        .commit_consumer_state(CommitMode::Sync)
        .expect("commit consumed offsets");
    drop(first);

    // A new member of the same group starts where the first one committed.
    let second = consumer(&group);
    second.subscribe(&[&topic]).expect("subscribe");
    let second_half = consume(&second, RECORDS - RECORDS / 2).await;
    // Nothing more is waiting: every record was delivered exactly once.
    let extra = tokio::time::timeout(Duration::from_secs(3), second.recv()).await;
    assert!(
        extra.is_err(),
        "unexpected extra record {:?}",
        extra.map(|m| m.map(|m| m.offset()))
    );

    let all: Vec<_> = first_half.iter().chain(&second_half).collect();
    let values: BTreeSet<usize> = all.iter().map(|(_, v)| v.parse().expect("index")).collect();
    assert_eq!(values, (0..RECORDS).collect(), "lost or duplicated records");
    assert_eq!(all.len(), RECORDS, "duplicated records");
    let mut last_per_key: BTreeMap<&str, usize> = BTreeMap::new();
    for (key, value) in all {
        let index: usize = value.parse().expect("index");
        if let Some(previous) = last_per_key.insert(key, index) {
            assert!(previous < index, "{key}: {index} after {previous}");
        }
    }
    // The scratch topic is left behind on purpose: tansu 0.6.0's DeleteTopics removes every
    // topic of the cluster (its topic_delete_by.sql has no name filter), which would wipe
    // the shared broker's chatify.* topics.
}

#[tokio::test]
async fn redis_set_nx_ex_keeps_the_first_value_and_expires() {
    let client = redis::Client::open(service_env("REDIS_URL")).expect("redis url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let key = unique_name("chatify:test:dedupe");

    let first: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg("message-1|7")
        .arg("NX")
        .arg("EX")
        .arg(60)
        .query_async(&mut connection)
        .await
        .expect("set nx");
    assert_eq!(first.as_deref(), Some("OK"));
    let second: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg("message-2|8")
        .arg("NX")
        .arg("EX")
        .arg(60)
        .query_async(&mut connection)
        .await
        .expect("set nx again");
    assert_eq!(second, None, "a second SET NX must not win");
    let (value, ttl): (String, i64) = redis::pipe()
        .get(&key)
        .ttl(&key)
        .query_async(&mut connection)
        .await
        .expect("get + ttl");
    assert_eq!(value, "message-1|7");
    assert!((1..=60).contains(&ttl), "ttl {ttl}");

    // A whole batch in one pipelined round trip: only the new keys are claimed.
    let batch: Vec<String> = (0..100).map(|i| format!("{key}:{}", i % 60)).collect();
    let mut pipe = redis::pipe();
    for item in &batch {
        pipe.cmd("SET")
            .arg(item)
            .arg("v")
            .arg("NX")
            .arg("EX")
            .arg(60);
    }
    let replies: Vec<Option<String>> = pipe.query_async(&mut connection).await.expect("pipeline");
    assert_eq!(replies.iter().filter(|reply| reply.is_some()).count(), 60);

    let mut cleanup = redis::pipe();
    cleanup.del(&key);
    for item in &batch {
        cleanup.del(item);
    }
    let _: () = cleanup.query_async(&mut connection).await.expect("cleanup");
}

#[tokio::test]
async fn mongo_insert_many_then_indexed_find() {
    let client = mongodb::Client::with_uri_str(service_env("MONGO_URL"))
        .await
        .expect("mongo client");
    let collection = client
        .database("chatify_test")
        .collection::<Document>(&unique_name("messages"));
    collection
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "message_id": 1 })
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await
        .expect("unique index");
    collection
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "session_id": 1, "seq": -1 })
                .build(),
        )
        .await
        .expect("session index");

    let documents: Vec<Document> = (1..=300_i64)
        .map(|seq| {
            doc! {
                "message_id": format!("m-{seq}"),
                "session_id": if seq % 2 == 0 { "grp:even" } else { "grp:odd" },
                "seq": seq,
                "content": format!("hello {seq}"),
            }
        })
        .collect();
    let inserted = collection
        .insert_many(documents.clone())
        .await
        .expect("insert_many");
    assert_eq!(inserted.inserted_ids.len(), 300);

    // A replay of part of the batch, unordered: duplicates are refused, new rows land.
    let mut replay: Vec<Document> = documents[..10].to_vec();
    replay.push(doc! { "message_id": "m-301", "session_id": "grp:odd", "seq": 301_i64 });
    let error = collection
        .insert_many(replay)
        .ordered(false)
        .await
        .expect_err("duplicate message ids are refused");
    assert!(
        error.to_string().contains("E11000")
            || error.to_string().to_lowercase().contains("duplicate"),
        "{error}"
    );
    assert_eq!(
        collection.count_documents(doc! {}).await.expect("count"),
        301
    );

    let latest: Vec<Document> = collection
        .find(doc! { "session_id": "grp:even" })
        .sort(doc! { "seq": -1 })
        .limit(5)
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("cursor");
    let seqs: Vec<i64> = latest
        .iter()
        .map(|d| d.get_i64("seq").expect("seq"))
        .collect();
    assert_eq!(seqs, [300, 298, 296, 294, 292]);
    let names = collection.list_index_names().await.expect("indexes");
    assert!(
        names.iter().any(|name| name.starts_with("session_id")),
        "{names:?}"
    );

    collection.drop().await.expect("drop");
}
