use anyhow::Context as _;
use chatify_core::stores::Stores;
use chatify_proto::storage::v1::admin_service_server::AdminServiceServer;
use chatify_proto::storage::v1::group_service_server::GroupServiceServer;
use chatify_proto::storage::v1::storage_service_server::StorageServiceServer;
use storage_reader::config::Config;
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
        storage_reader::required_topics(&config),
    )?;
    let shutdown = CancellationToken::new();
    let admin = chatify_core::telemetry::start(
        &config.logs,
        config.admin_addr,
        readiness,
        shutdown.clone(),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("cannot listen on CHATIFY_GRPC_ADDR {}", config.grpc_addr))?;
    let Some(redis) = chatify_core::stores::connect_redis(&stores.redis, &shutdown).await else {
        return Ok(());
    };
    let storage = storage_reader::service::Storage {
        gatekeeper: storage_reader::identity::Gatekeeper::new(
            chatify_core::auth::Authenticator::hs256(config.jwt_secret.as_bytes()),
            config.internal_token.clone(),
            redis.clone(),
        ),
        postgres: stores.postgres.clone(),
        redis: redis.clone(),
        hot: std::sync::Arc::new(
            config
                .hot_redis(&stores.redis)
                .context("REDIS_URL for the page read")?,
        ),
        mongo: stores.mongo.collection("messages"),
        notifier: storage_reader::notify::Notifier {
            producer: chatify_core::producer::RenewableProducer::new(
                config
                    .kafka
                    .client_config("storage-reader")
                    .set("enable.idempotence", "true")
                    .set("acks", "all")
                    // As long as a call waits (`notify::PRODUCE_TIMEOUT`): a record the
                    // caller was told failed is not delivered minutes later.
                    .set("message.timeout.ms", "10000")
                    .clone(),
                "reader",
            )
            .context("kafka producer config")?,
            topics: config.kafka.topics(),
        },
        recall_window_ms: (config.recall_window_seconds * 1000) as i64,
        archive: config.archive,
        marks_ttl_seconds: config.marks_ttl_seconds,
    };
    let groups = storage_reader::group::Groups {
        gatekeeper: storage.gatekeeper.clone(),
        postgres: stores.postgres.clone(),
        redis: redis.clone(),
        members_max: config.group_members_max,
    };
    let admin_service = storage_reader::admin::Admin {
        gatekeeper: storage.gatekeeper.clone(),
        redis,
        notifier: storage.notifier.clone(),
    };
    let sweeper = tokio::spawn(storage_reader::store::burn_sweeper(
        storage.postgres.clone(),
        storage.mongo.clone(),
        storage.redis.clone(),
        std::time::Duration::from_millis(config.burn_sweep_ms.max(1)),
        shutdown.clone(),
    ));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<StorageServiceServer<storage_reader::service::Storage>>()
        .await;
    health
        .set_serving::<GroupServiceServer<storage_reader::group::Groups>>()
        .await;
    health
        .set_serving::<AdminServiceServer<storage_reader::admin::Admin>>()
        .await;
    tracing::info!(grpc = %config.grpc_addr, "storage-reader started");
    let grpc_shutdown = shutdown.clone();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(StorageServiceServer::new(storage))
            .add_service(GroupServiceServer::new(groups))
            .add_service(AdminServiceServer::new(admin_service))
            .add_service(storage_reader::reflection_service()?)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move { grpc_shutdown.cancelled().await },
            ),
    );
    chatify_core::telemetry::shutdown_signal().await;
    shutdown.cancel();
    grpc.await.context("grpc server task")??;
    sweeper.await.context("burn sweeper task")?;
    admin.await.context("admin server task")??;
    tracing::info!("storage-reader stopped");
    Ok(())
}
