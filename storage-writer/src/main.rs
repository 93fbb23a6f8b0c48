use anyhow::Context as _;
use chatify_core::stores::Stores;
use storage_writer::config::Config;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chatify_core::config::load_env_file()?;
    let config: Config = chatify_core::config::parse().unwrap_or_else(|error| error.exit());
    config.validate()?;
    let stores = Stores::open(&config.redis, &config.postgres, &config.mongo).await?;
    let readiness = stores.readiness(
        &config.kafka.kafka_bootstrap_servers,
        storage_writer::required_topics(&config),
    )?;
    let shutdown = CancellationToken::new();
    let admin = chatify_core::telemetry::start(
        &config.logs,
        config.admin_addr,
        readiness,
        shutdown.clone(),
    )
    .await?;
    tracing::info!(group = %config.consumer_group, "storage-writer started");
    let writer_shutdown = shutdown.clone();
    let writer = tokio::spawn(async move {
        storage_writer::consumer::run(&config, stores, writer_shutdown).await
    });
    tokio::pin!(writer);
    // The writer finishes the batch in hand and commits before it returns.
    let result = tokio::select! {
        () = chatify_core::telemetry::shutdown_signal() => {
            shutdown.cancel();
            (&mut writer).await
        }
        finished = &mut writer => {
            shutdown.cancel();
            finished
        }
    };
    admin.await.context("admin server task")??;
    result.context("writer task")??;
    tracing::info!("storage-writer stopped");
    Ok(())
}
