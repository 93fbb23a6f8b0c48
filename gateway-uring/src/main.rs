use anyhow::Context as _;
use gateway_uring::config::Config;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    chatify_core::config::load_env_file()?;
    let config: Config = chatify_core::config::parse().unwrap_or_else(|error| error.exit());
    config.validate()?;
    // The admin endpoints are cold-path: a small tokio runtime on this thread, apart from
    // the monoio shards that will own the connections.
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
        tracing::info!(node_id = %config.node_id, "gateway-uring started");
        chatify_core::telemetry::shutdown_signal().await;
        shutdown.cancel();
        admin.await.context("admin server task")??;
        tracing::info!("gateway-uring stopped");
        Ok(())
    })
}
