//! The Postgres schema of Chatify: versioned `NNNN_name.up.sql` / `.down.sql` files in this
//! folder, embedded at compile time and applied by sqlx's migrator (which records applied
//! versions and checksums in `_sqlx_migrations`).

use chatify_core::config::{LogArgs, PostgresArgs};
use sqlx::migrate::{MigrateDatabase as _, Migrator};

/// Settings of `chatify-migrate`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "chatify-migrate",
    version,
    about = "Applies the Chatify Postgres migrations"
)]
pub struct Config {
    #[command(flatten)]
    pub logs: LogArgs,
    #[command(flatten)]
    pub postgres: PostgresArgs,
}

/// Every migration in this folder (the macro resolves paths from the crate root but refuses
/// a bare "."; `../migrations` is this folder).
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Creates the database named in `postgres_url` if it does not exist yet.
pub async fn create_database_if_missing(postgres_url: &str) -> Result<bool, sqlx::Error> {
    if sqlx::Postgres::database_exists(postgres_url).await? {
        return Ok(false);
    }
    match sqlx::Postgres::create_database(postgres_url).await {
        Ok(()) => Ok(true),
        // Another process created it between our check and our create.
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42P04") => Ok(false),
        Err(error) => Err(error),
    }
}

/// Creates the database if needed and applies every pending migration.
pub async fn migrate(postgres_url: &str) -> Result<(), sqlx::Error> {
    create_database_if_missing(postgres_url).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(postgres_url)
        .await?;
    MIGRATOR.run(&pool).await?;
    pool.close().await;
    Ok(())
}
