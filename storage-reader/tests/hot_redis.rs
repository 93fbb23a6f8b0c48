//! The page read's own Redis client against the real Redis (`REDIS_URL`), and against
//! servers that misbehave: refused, silent, garbage.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use chatify_e2e::{TcpProxy, service_env, unique_name};
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

fn pipeline(command: &str, args: &[&str]) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    let cmd = pipe.cmd(command);
    for arg in args {
        cmd.arg(*arg);
    }
    pipe
}

#[tokio::test]
async fn a_cancelled_call_never_leaves_its_late_reply_to_the_next() {
    // One connection: the late reply would be the next call's, were it not read off.
    let hot = HotRedis::new(&client(), 1, Duration::from_secs(30)).unwrap();
    let list = unique_name("hot-blocked");
    let blocked = pipeline("BLPOP", &[&list, "1"]);
    let cancelled = tokio::time::timeout(Duration::from_millis(100), hot.query(&blocked)).await;
    assert!(cancelled.is_err(), "BLPOP on an empty list blocks");
    let mut push = pipeline("RPUSH", &[&list, "late"]);
    push.cmd("EXPIRE").arg(&list).arg(60);
    let replies = hot.query(&push).await.unwrap();
    assert_eq!(replies, vec![Reply::Int(1), Reply::Int(1)]);
    // The BLPOP was answered (nil, after its second) before the push: the element is here.
    assert_eq!(
        hot.query(&pipeline("LPOP", &[&list])).await.unwrap(),
        vec![Reply::Bulk("late".into())]
    );
}

/// Spawns `hot.query(pipe)` and gives it time to queue.
async fn spawn_query(
    hot: &Arc<HotRedis>,
    pipe: redis::Pipeline,
) -> tokio::task::JoinHandle<Vec<Reply>> {
    let hot = hot.clone();
    let task = tokio::spawn(async move { hot.query(&pipe).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    task
}

#[tokio::test]
async fn a_cancelled_driver_leaves_its_batch_to_be_read_to_the_end() {
    let hot = Arc::new(HotRedis::new(&client(), 1, Duration::from_secs(30)).unwrap());
    let other = HotRedis::with_defaults(&client()).unwrap();
    let (gate, list) = (unique_name("hot-gate"), unique_name("hot-list"));
    // The lane's first batch blocks on `gate`; two calls queue behind it.
    let first = spawn_query(&hot, pipeline("BLPOP", &[&gate, "10"])).await;
    let driver = spawn_query(&hot, pipeline("BLPOP", &[&list, "10"])).await;
    let mate = spawn_query(&hot, pipeline("ECHO", &["mate"])).await;
    // Opening the gate hands the lane to `driver`, whose batch holds both queued calls.
    other
        .query(&pipeline("RPUSH", &[&gate, "open"]))
        .await
        .unwrap();
    assert_eq!(
        first.await.unwrap(),
        vec![Reply::Array(vec![
            Reply::Bulk(gate.clone().into()),
            Reply::Bulk("open".into())
        ])]
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    driver.abort();
    assert!(driver.await.unwrap_err().is_cancelled());
    assert!(
        !mate.is_finished(),
        "its reply comes after the blocked BLPOP's"
    );
    // The abandoned BLPOP is still read to the end, then its batch-mate's reply.
    other
        .query(&pipeline("RPUSH", &[&list, "taken"]))
        .await
        .unwrap();
    assert_eq!(mate.await.unwrap(), vec![Reply::Bulk("mate".into())]);
    // The abandoned BLPOP did take the element: it ran to the end rather than being cut.
    assert_eq!(
        other.query(&pipeline("LLEN", &[&list])).await.unwrap(),
        vec![Reply::Int(0)]
    );
    assert_eq!(
        hot.query(&pipeline("PING", &[])).await.unwrap(),
        vec![Reply::Status("PONG".into())]
    );
}

#[tokio::test]
async fn a_caller_gone_while_queued_is_withdrawn() {
    let hot = Arc::new(HotRedis::new(&client(), 1, Duration::from_secs(30)).unwrap());
    let other = HotRedis::with_defaults(&client()).unwrap();
    let gate = unique_name("hot-gate");
    let first = spawn_query(&hot, pipeline("BLPOP", &[&gate, "10"])).await;
    // Queued first, so it would drive the next batch: gone, it passes nothing on by itself.
    let gone = spawn_query(&hot, pipeline("ECHO", &["gone"])).await;
    let next = spawn_query(&hot, pipeline("ECHO", &["next"])).await;
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    other
        .query(&pipeline("RPUSH", &[&gate, "open"]))
        .await
        .unwrap();
    first.await.unwrap();
    assert_eq!(next.await.unwrap(), vec![Reply::Bulk("next".into())]);
}

#[tokio::test]
async fn many_concurrent_calls_share_a_few_connections() {
    let hot = Arc::new(HotRedis::new(&client(), 4, Duration::from_secs(30)).unwrap());
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
async fn calls_made_together_on_one_thread_go_out_in_one_write() {
    let redis_url = service_env("REDIS_URL");
    let proxy = TcpProxy::in_front_of(&redis_url).await.unwrap();
    let proxied = redis::Client::open(proxy.url_for(&redis_url)).unwrap();
    let hot = Arc::new(HotRedis::new(&proxied, 1, Duration::from_secs(30)).unwrap());
    // Connect the lane first, so the count below is the calls' writes alone.
    hot.query(&pipeline("PING", &[])).await.unwrap();
    let before = proxy.client_reads();
    // Spawned on this test's one thread, all ready at once: the first to drive lets the
    // others queue before it writes.
    let calls: Vec<_> = (0..8)
        .map(|n| {
            let hot = hot.clone();
            tokio::spawn(async move { hot.query(&pipeline("ECHO", &[&n.to_string()])).await })
        })
        .collect();
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(
            call.await.unwrap().unwrap(),
            vec![Reply::Bulk(n.to_string().into())]
        );
    }
    assert_eq!(
        proxy.client_reads() - before,
        1,
        "eight calls ready together are one batch, one write"
    );
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
