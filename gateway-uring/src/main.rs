use std::sync::Arc;

use anyhow::Context as _;
use gateway_uring::auth::Authenticator;
use gateway_uring::config::Config;
use gateway_uring::redis_bridge::RedisBridge;
use gateway_uring::shard::{
    self, NodeShared, SEND_RATE_SWEEP_INTERVAL_MS, ShardCommand, ShardSetup,
};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
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
        let readiness = gateway_uring::readiness(&config)?;
        let shutdown = CancellationToken::new();
        let admin = chatify_core::telemetry::start(
            &config.logs,
            config.admin_addr,
            readiness,
            shutdown.clone(),
        )
        .await?;
        raise_limits();
        let redis = RedisBridge::start(redis::Client::open(config.redis.redis_url.as_str())?)
            .context("cannot start the redis bridge")?;
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
                limits: config.limits,
                auth: auth.clone(),
                redis: redis.clone(),
                node: Arc::clone(&node),
            };
            shards.push(shard::spawn(setup).with_context(|| {
                format!(
                    "cannot start shard {index} on CHATIFY_WS_ADDR {} / CHATIFY_TCP_ADDR {}",
                    config.ws_addr, config.tcp_addr
                )
            })?);
        }
        tracing::info!(
            node_id = %config.node_id,
            shards = shards.len(),
            ws = %config.ws_addr,
            tcp = %config.tcp_addr,
            "gateway-uring started"
        );
        chatify_core::telemetry::shutdown_signal().await;
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
        shutdown.cancel();
        admin.await.context("admin server task")??;
        tracing::info!(live = node.live_connections(), "gateway-uring stopped");
        Ok(())
    })
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
