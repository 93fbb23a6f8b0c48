use std::sync::Arc;

use anyhow::Context as _;
use gateway_uring::auth::Authenticator;
use gateway_uring::config::Config;
use gateway_uring::push::{PushConsumer, PushSettings};
use gateway_uring::reader_bridge::ReaderBridge;
use gateway_uring::redis_bridge::{BridgeSettings, RedisBridge};
use gateway_uring::shard::{
    self, NodeShared, SEND_RATE_SWEEP_INTERVAL_MS, ShardCluster, ShardCommand, ShardSetup,
};
use gateway_uring::upstream::{Upstream, UpstreamSettings};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let huge_pages = opt_out_of_huge_pages();
    chatify_core::config::load_env_file()?;
    let config: Config = chatify_core::config::parse().unwrap_or_else(|error| error.exit());
    config.validate()?;
    // The admin endpoints and the Redis bridge are cold-path: a small tokio runtime on this
    // thread, apart from the monoio shards that own the connections.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the admin runtime")?;
    runtime.block_on(async {
        let push_assigned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readiness = gateway_uring::readiness(&config, Arc::clone(&push_assigned))?;
        let shutdown = CancellationToken::new();
        let admin = chatify_core::telemetry::start(
            &config.logs,
            config.admin_addr,
            readiness,
            shutdown.clone(),
        )
        .await?;
        if let Err(error) = huge_pages {
            tracing::warn!(%error, "cannot opt out of transparent huge pages");
        }
        raise_limits();
        let topics = config.kafka.topics();
        let push_topic = topics.push(&config.node_id);
        // In the background: with the broker down, start-up must not wait for it.
        tokio::spawn({
            let config = config.clone();
            let push_topic = push_topic.clone();
            async move { ensure_push_topic(&config, &push_topic).await }
        });
        let upstream = Upstream::new(&UpstreamSettings {
            bootstrap_servers: config.kafka.kafka_bootstrap_servers.clone(),
            upstream_topic: topics.upstream(),
            node_id: config.node_id.clone(),
            queue_messages_max: config.cluster.upstream_queue_messages_max,
            timeout_ms: config.cluster.upstream_timeout_ms,
            idempotence: config.cluster.upstream_idempotence,
            debug: config.kafka.kafka_debug.clone(),
        })
        .context("cannot create the upstream producer (KAFKA_BOOTSTRAP_SERVERS)")?;
        let redis = RedisBridge::start(
            redis::Client::open(config.redis.redis_url.as_str())?,
            BridgeSettings {
                node_id: config.node_id.clone(),
                topics: topics.clone(),
                presence_grace_ms: config.cluster.presence_grace_ms,
            },
            Arc::clone(&upstream),
        )
        .context("cannot start the redis bridge")?;
        let reader = match (&config.cluster.reader_url, &config.cluster.internal_token) {
            (Some(url), Some(token)) => Some(
                ReaderBridge::start(
                    url,
                    token,
                    std::time::Duration::from_millis(config.cluster.reader_timeout_ms),
                )
                .context("cannot start the reader bridge")?,
            ),
            _ => {
                tracing::warn!(
                    "CHATIFY_READER_URL is unset: sync, read and recall answer unavailable"
                );
                None
            }
        };
        let cluster = ShardCluster {
            node_id: Arc::from(config.node_id.as_str()),
            boot_nonce: boot_nonce(),
            upstream: Arc::clone(&upstream),
            reader,
            route_refresh_ms: config.cluster.route_refresh_ms,
        };
        let auth = Authenticator::hs256(config.jwt_secret.as_bytes());
        let node = Arc::new(NodeShared::new(&config.limits));
        // Cold path, off the shards: forget users whose send allowance has refilled, so the
        // limiter holds only recent senders.
        let sweeper = tokio::spawn(sweep_send_rates(Arc::clone(&node)));
        let mut shards = Vec::new();
        for index in 0..config.shard_count() {
            let setup = ShardSetup {
                index,
                ws_addr: config.ws_addr,
                tcp_addr: config.tcp_addr,
                io_driver: config.io_driver,
                uring_taskrun: config.uring_taskrun,
                limits: config.limits,
                auth: auth.clone(),
                redis: redis.clone(),
                node: Arc::clone(&node),
                cluster: cluster.clone(),
            };
            shards.push(shard::spawn(setup).with_context(|| {
                format!(
                    "cannot start shard {index} on CHATIFY_WS_ADDR {} / CHATIFY_TCP_ADDR {}",
                    config.ws_addr, config.tcp_addr
                )
            })?);
        }
        let inboxes: Vec<_> = shards.iter().map(|shard| shard.inbox.clone()).collect();
        upstream.attach_shards(inboxes.clone());
        let push = PushConsumer::start(
            &PushSettings {
                bootstrap_servers: config.kafka.kafka_bootstrap_servers.clone(),
                topic: push_topic.clone(),
                node_id: config.node_id.clone(),
                debug: config.kafka.kafka_debug.clone(),
            },
            inboxes,
            push_assigned,
        )
        .context("cannot start the push consumer")?;
        tracing::info!(
            node_id = %config.node_id,
            shards = shards.len(),
            ws = %config.ws_addr,
            tcp = %config.tcp_addr,
            "gateway-uring started"
        );
        chatify_core::telemetry::shutdown_signal().await;
        tokio::task::spawn_blocking(move || push.stop())
            .await
            .context("join push consumer")?;
        for shard in &shards {
            let _ = shard.inbox.send_async(ShardCommand::Shutdown).await;
        }
        for shard in shards {
            let joined = tokio::task::spawn_blocking(move || shard.thread.join())
                .await
                .context("join shard")?;
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(%error, "shard failed"),
                Err(_) => tracing::error!("shard panicked"),
            }
        }
        sweeper.abort();
        {
            let upstream = Arc::clone(&upstream);
            tokio::task::spawn_blocking(move || upstream.flush(std::time::Duration::from_secs(5)))
                .await
                .context("flush upstream")?;
        }
        shutdown.cancel();
        admin.await.context("admin server task")??;
        tracing::info!(live = node.live_connections(), "gateway-uring stopped");
        Ok(())
    })
}

/// A random number per process start (see `ShardCluster::boot_nonce`).
fn boot_nonce() -> u32 {
    use std::hash::{BuildHasher as _, Hasher as _};
    // std's RandomState is seeded from the OS; mix in time and pid for good measure.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish() as u32
}

/// Creates this node's push topic when the broker lacks it (a new node id needs its own
/// topic; nothing is auto-created by the broker). Failure is logged, not fatal: `/readyz`
/// stays red until the topic exists.
async fn ensure_push_topic(config: &Config, topic: &str) {
    let admin: Result<AdminClient<DefaultClientContext>, _> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.kafka_bootstrap_servers)
        .create();
    let admin = match admin {
        Ok(admin) => admin,
        Err(error) => {
            tracing::warn!(%error, "cannot create a kafka admin client");
            return;
        }
    };
    let new_topic = NewTopic::new(
        topic,
        config.cluster.push_topic_partitions,
        TopicReplication::Fixed(1),
    );
    let options = AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(5)));
    let created = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        admin.create_topics([&new_topic], &options),
    )
    .await;
    match created {
        Ok(Ok(results)) => {
            for result in results {
                match result {
                    Ok(name) => tracing::info!(topic = name, "created this node's push topic"),
                    Err((name, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                        tracing::debug!(topic = name, "push topic exists");
                    }
                    Err((name, code)) => {
                        tracing::warn!(topic = name, %code, "cannot create the push topic");
                    }
                }
            }
        }
        Ok(Err(error)) => tracing::warn!(%error, "cannot create the push topic"),
        Err(_) => tracing::warn!(topic, "creating the push topic timed out"),
    }
}

/// Every `SEND_RATE_SWEEP_INTERVAL_MS`, drops idle users from the send rate limiter.
async fn sweep_send_rates(node: Arc<NodeShared>) {
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(
        SEND_RATE_SWEEP_INTERVAL_MS,
    ));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let users = node.send_rate.sweep();
        metrics::gauge!("chatify_gateway_send_rate_users").set(users as f64);
    }
}

/// Raises the soft limits a gateway lives by to their hard limits: open files (one per
/// connection) and locked memory (io_uring maps its rings with it; kernels before 5.12
/// charge them to RLIMIT_MEMLOCK, and a low limit makes io_uring setup fail, so the shards
/// fall back to epoll). Raising a hard limit needs privileges we do not ask for: set it with
/// `ulimit -Hl` / systemd `LimitMEMLOCK=` / compose `ulimits` instead.
/// Memory follows the bytes in use, not the allocator's address ranges: mimalloc advises
/// the kernel to back its arenas with transparent huge pages (2 MiB), so on hosts where
/// THP is `madvise` or `always` every partly used 2 MiB range of the heap is resident in
/// full. For a gateway whose memory is mostly many small per-connection blocks that costs
/// far more than the TLB misses it saves (docs/BENCHMARKS.md, idle connections: about
/// 650 B per idle connection). The process opts out first thing, before the heap grows; a
/// failure (an old kernel, a seccomp filter) is logged once logging is up, not fatal.
fn opt_out_of_huge_pages() -> std::io::Result<()> {
    rustix::thread::disable_transparent_huge_pages(true).map_err(std::io::Error::from)
}

fn raise_limits() {
    for (name, resource) in [
        ("nofile", rlimit::Resource::NOFILE),
        ("memlock", rlimit::Resource::MEMLOCK),
    ] {
        match rlimit::getrlimit(resource) {
            Ok((soft, hard)) if soft < hard => match rlimit::setrlimit(resource, hard, hard) {
                Ok(()) => tracing::info!(limit = name, from = soft, to = hard, "raised soft limit"),
                Err(error) => tracing::warn!(limit = name, %error, "cannot raise soft limit"),
            },
            Ok((soft, _)) => tracing::info!(
                limit = name,
                value = soft,
                "limit already at its hard limit"
            ),
            Err(error) => tracing::warn!(limit = name, %error, "cannot read limit"),
        }
    }
}
