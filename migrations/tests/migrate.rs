//! Migrations go up from an empty database, are idempotent, go down and up again, and the
//! schema does what the writer relies on: batched UNNEST inserts that ignore replays.
//! Needs PostgreSQL from `scripts/services.sh up`.

use sqlx::{PgPool, Row as _};

struct ScratchDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl ScratchDatabase {
    async fn create() -> Self {
        chatify_core::config::load_repo_env(env!("CARGO_MANIFEST_DIR").as_ref())
            .unwrap_or_else(|error| panic!("{error}"));
        let base = std::env::var("POSTGRES_URL").expect("POSTGRES_URL in .local/chatify.env");
        let (server, _) = base.rsplit_once('/').expect("POSTGRES_URL has a database");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos();
        let name = format!("chatify_test_{}_{nanos}", std::process::id());
        Self {
            admin_url: format!("{server}/postgres"),
            url: format!("{server}/{name}"),
            name,
        }
    }

    async fn drop_database(self) {
        let admin = PgPool::connect(&self.admin_url)
            .await
            .expect("admin connection");
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&admin)
        .await
        .expect("drop scratch database");
    }
}

async fn table_names(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .expect("list tables")
}

/// Inserts messages the way the writer does: one UNNEST statement per batch.
async fn insert_batch(pool: &PgPool, rows: &[(uuid::Uuid, &str, i64, &str, &str)]) -> u64 {
    let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.0).collect();
    let sessions: Vec<&str> = rows.iter().map(|r| r.1).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.2).collect();
    let senders: Vec<&str> = rows.iter().map(|r| r.3).collect();
    let client_ids: Vec<&str> = rows.iter().map(|r| r.4).collect();
    sqlx::query(
        "INSERT INTO messages (message_id, session_id, seq, sender_id, client_msg_id,
                               message_type, content, created_at)
         SELECT m.id, m.session, m.seq, m.sender, m.client, 'text', convert_to('hi', 'UTF8'), now()
         FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[])
              AS m(id, session, seq, sender, client)
         ON CONFLICT DO NOTHING",
    )
    .bind(&ids)
    .bind(&sessions)
    .bind(&seqs)
    .bind(&senders)
    .bind(&client_ids)
    .execute(pool)
    .await
    .expect("unnest insert")
    .rows_affected()
}

#[tokio::test]
async fn migrations_apply_from_empty_and_the_archive_ignores_replays() {
    let scratch = ScratchDatabase::create().await;
    assert!(
        chatify_migrations::create_database_if_missing(&scratch.url)
            .await
            .expect("create database")
    );
    chatify_migrations::migrate(&scratch.url)
        .await
        .expect("migrate up from empty");
    // Running again is a no-op, not an error.
    chatify_migrations::migrate(&scratch.url)
        .await
        .expect("migrate again");

    let pool = PgPool::connect(&scratch.url).await.expect("connect");
    assert_eq!(
        table_names(&pool).await,
        [
            "message_hides",
            "messages",
            "session_members",
            "sessions",
            "user_session_state"
        ]
    );
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY 1")
        .fetch_all(&pool)
        .await
        .expect("applied versions");
    let embedded: Vec<i64> = chatify_migrations::MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| m.version)
        .collect();
    assert_eq!(applied, embedded);

    // One batch of 100 messages in two sessions.
    let rows: Vec<(uuid::Uuid, &str, i64, &str, &str)> = (1..=100_i64)
        .map(|i| {
            let session = if i % 2 == 0 { "grp:even" } else { "grp:odd" };
            let client: &'static str = Box::leak(format!("c-{i}").into_boxed_str());
            (uuid::Uuid::now_v7(), session, (i + 1) / 2, "u1", client)
        })
        .collect();
    assert_eq!(insert_batch(&pool, &rows).await, 100);
    // A Kafka replay of the same batch stores nothing new.
    assert_eq!(insert_batch(&pool, &rows).await, 0);
    // A different message claiming an existing (session, seq) is refused too.
    let clash = [(uuid::Uuid::now_v7(), "grp:even", 1_i64, "u2", "other")];
    assert_eq!(insert_batch(&pool, &clash).await, 0);

    let page = sqlx::query(
        "SELECT seq FROM messages WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind("grp:even")
    .bind(45_i64)
    .bind(10_i64)
    .fetch_all(&pool)
    .await
    .expect("page query");
    let seqs: Vec<i64> = page.iter().map(|row| row.get("seq")).collect();
    assert_eq!(seqs, [46, 47, 48, 49, 50]);

    // Constraints are real: a bad message type is refused.
    let bad_type = sqlx::query(
        "INSERT INTO messages (message_id, session_id, seq, sender_id, client_msg_id,
                               message_type, content, created_at)
         VALUES ($1, 'grp:x', 1, 'u1', 'c', 'hologram', '', now())",
    )
    .bind(uuid::Uuid::now_v7())
    .execute(&pool)
    .await;
    assert!(bad_type.is_err(), "message_type check constraint");

    // Down, and up again.
    chatify_migrations::MIGRATOR
        .undo(&pool, 0)
        .await
        .expect("migrate down");
    assert!(table_names(&pool).await.is_empty());
    chatify_migrations::MIGRATOR
        .run(&pool)
        .await
        .expect("migrate up again");
    assert_eq!(table_names(&pool).await.len(), 5);

    pool.close().await;
    scratch.drop_database().await;
}
