//! Applies the Chatify Postgres migrations (creating the database if it is missing).

use chatify_migrations::Config;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    chatify_core::config::load_env_file()?;
    let config: Config = chatify_core::config::parse().unwrap_or_else(|error| error.exit());
    config.postgres.validate()?;
    chatify_core::telemetry::init_logs(&config.logs)?;
    chatify_migrations::migrate(&config.postgres.postgres_url).await?;
    let latest = chatify_migrations::MIGRATOR
        .iter()
        .map(|migration| migration.version)
        .max()
        .unwrap_or_default();
    tracing::info!(latest, "migrations applied");
    Ok(())
}
