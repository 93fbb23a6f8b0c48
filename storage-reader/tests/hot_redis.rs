//! The page read's own Redis client against the real Redis (`REDIS_URL`), and against
//! servers that misbehave: refused, silent, garbage.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use chatify_e2e::{service_env, unique_name};
use storage_reader::hot_redis::{HotRedis, HotRedisError, Reply};

fn client() -> redis::Client {
    redis::Client::open(service_env("REDIS_URL")).unwrap()
}

#[tokio::test]
async fn a_pipeline_answers_one_reply_per_command_in_order() {
    let hot = HotRedis::with_defaults(&client()).unwrap();
    let key = unique_name("hot");
    let mut pipe = redis::pipe();
    pipe.cmd("DEL").arg(&key);
    pipe.cmd("ZADD")
        .arg(&key)
        .arg(1)
        .arg(b"one".as_slice())
        .arg(2)
        .arg(vec![0u8, 13, 10, 255]);
    pipe.cmd("ZRANGE").arg(&key).arg(0).arg(-1);
    pipe.cmd("ZRANGE").arg(&key).arg(0).arg(0).arg("WITHSCORES");
    pipe.cmd("ZMSCORE").arg(&key).arg("one").arg("none");
    pipe.cmd("GET").arg(&key);
    pipe.cmd("EXPIRE").arg(&key).arg(60);
    let mut replies = hot.query(&pipe).await.unwrap().into_iter();
    assert_eq!(replies.next(), Some(Reply::Int(0)));
    assert_eq!(replies.next(), Some(Reply::Int(2)));
    // Binary members (CRLF inside) come back byte for byte.
    assert_eq!(
        replies.next().unwrap().into_bulks().unwrap(),
        vec![b"one".to_vec(), vec![0u8, 13, 10, 255]]
    );
    assert_eq!(
        replies.next().unwrap().into_bulks().unwrap(),
        vec![b"one".to_vec(), b"1".to_vec()]
    );
    assert_eq!(
        replies.next().unwrap().into_optional_numbers().unwrap(),
        vec![Some(1.0), None]
    );
    // An error reply is that command's reply; the others still arrive.
    assert!(
        matches!(replies.next(), Some(Reply::Error(message)) if message.starts_with("WRONGTYPE"))
    );
    assert_eq!(replies.next(), Some(Reply::Int(1)));
    assert_eq!(replies.next(), None);
}

#[tokio::test]
async fn a_large_reply_arrives_across_many_reads() {
    let hot = HotRedis::with_defaults(&client()).unwrap();
    let key = unique_name("hot-large");
    let entry = vec![b'x'; 40_000];
    let mut fill = redis::pipe();
    for score in 0..50 {
        let mut member = entry.clone();
        member.extend_from_slice(score.to_string().as_bytes());
        fill.cmd("ZADD").arg(&key).arg(score).arg(member);
    }
    fill.cmd("EXPIRE").arg(&key).arg(60);
    hot.query(&fill).await.unwrap();
    let mut read = redis::pipe();
    read.cmd("ZRANGE").arg(&key).arg(0).arg(-1);
    let window = hot
        .query(&read)
        .await
        .unwrap()
        .remove(0)
        .into_bulks()
        .unwrap();
    assert_eq!(window.len(), 50);
    for (score, member) in window.iter().enumerate() {
        assert_eq!(&member[..40_000], entry.as_slice());
        assert_eq!(&member[40_000..], score.to_string().as_bytes());
    }
}

#[tokio::test]
async fn a_cancelled_call_never_leaves_its_late_reply_to_the_next() {
    // One connection at most: a reused connection would carry the late reply.
    let hot = HotRedis::new(&client(), 1, Duration::from_secs(30)).unwrap();
    let list = unique_name("hot-blocked");
    let mut blocked = redis::pipe();
    blocked.cmd("BLPOP").arg(&list).arg(5);
    let cancelled = tokio::time::timeout(Duration::from_millis(100), hot.query(&blocked)).await;
    assert!(cancelled.is_err(), "BLPOP on an empty list blocks");
    // Its reply would be this element, had the connection been reused.
    let mut push = redis::pipe();
    push.cmd("RPUSH").arg(&list).arg("late");
    push.cmd("EXPIRE").arg(&list).arg(60);
    let replies = hot.query(&push).await.unwrap();
    assert_eq!(replies, vec![Reply::Int(1), Reply::Int(1)]);
    let mut ping = redis::pipe();
    ping.cmd("PING");
    assert_eq!(
        hot.query(&ping).await.unwrap(),
        vec![Reply::Status("PONG".into())]
    );
}

#[tokio::test]
async fn many_concurrent_calls_share_a_bounded_pool() {
    let hot = std::sync::Arc::new(HotRedis::new(&client(), 4, Duration::from_secs(30)).unwrap());
    let calls = (0..64u64).map(|n| {
        let hot = hot.clone();
        tokio::spawn(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("ECHO").arg(n.to_string());
            hot.query(&pipe).await.unwrap()
        })
    });
    for (n, call) in calls.enumerate() {
        assert_eq!(
            call.await.unwrap(),
            vec![Reply::Bulk(n.to_string().into())],
            "each call gets its own reply"
        );
    }
}

#[tokio::test]
async fn a_refused_connection_is_an_error_naming_the_address() {
    // A port nothing listens on: bind one, then free it.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let hot = HotRedis::with_defaults(&client).unwrap();
    let mut ping = redis::pipe();
    ping.cmd("PING");
    let error = hot.query(&ping).await.expect_err("nothing listens");
    assert!(matches!(error, HotRedisError::Connect { .. }), "{error}");
    assert!(error.to_string().contains(&port.to_string()), "{error}");
}

/// A server that accepts, reads, and answers `answer` (or nothing).
async fn fake_server(answer: Option<&'static [u8]>) -> redis::Client {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                if let Some(answer) = answer {
                    let _ = socket.write_all(answer).await;
                    let _ = socket.shutdown().await;
                }
                // Silent: hold the socket until the client gives up.
                let _ = socket.read(&mut buf).await;
            });
        }
    });
    redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap()
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let hot = HotRedis::new(&fake_server(None).await, 2, Duration::from_millis(200)).unwrap();
    let mut ping = redis::pipe();
    ping.cmd("PING");
    let error = hot.query(&ping).await.expect_err("no answer");
    assert!(matches!(error, HotRedisError::Timeout(_)), "{error}");
}

#[tokio::test]
async fn garbage_or_a_short_answer_is_an_error() {
    let mut ping = redis::pipe();
    ping.cmd("PING");
    let garbage =
        HotRedis::with_defaults(&fake_server(Some(b"HTTP/1.1 400 Bad\r\n\r\n")).await).unwrap();
    let error = garbage.query(&ping).await.expect_err("not RESP");
    assert!(matches!(error, HotRedisError::Protocol(_)), "{error}");
    let short = HotRedis::with_defaults(&fake_server(Some(b"$10\r\nabc")).await).unwrap();
    let error = short.query(&ping).await.expect_err("closed mid-reply");
    assert!(matches!(error, HotRedisError::Closed), "{error}");
}
