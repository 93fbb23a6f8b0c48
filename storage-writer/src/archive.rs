//! Step 5: the durable stores. Postgres first (one `INSERT .. SELECT FROM unnest(..) ON
//! CONFLICT DO NOTHING` per batch), then MongoDB (`insert_many`, unordered, duplicate keys
//! on replay ignored). Postgres is the source of truth for (message_id, seq): a row it
//! already holds under other values wins, and Mongo only ever gets what Postgres confirmed,
//! so the two never disagree.

use std::collections::{HashMap, HashSet};

use chatify_core::ids::MessageId;
use mongodb::bson::{self, Document, doc};
use sqlx::PgPool;

use crate::error::StoreFailure;
use crate::record::{Incoming, message_type_name};

/// A message to archive with the id and seq step 2 gave it.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    pub message: &'a Incoming,
    pub seq: u64,
}

/// What Postgres holds for a row after the insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archived {
    /// Stored now or by an earlier run of the same record, with the same id and seq.
    Stored,
    /// Postgres already holds this (sender, client_msg_id) under another id or seq (Redis
    /// lost the dedupe key): the stored message wins and this one is a resend.
    AlreadyStoredAs { message_id: MessageId, seq: u64 },
}

/// Postgres could not take some rows because their (session, seq) belongs to another
/// message: the seq counter went backwards. The caller repairs the counter and retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqCollision {
    pub indexes: Vec<usize>,
}

/// Inserts the rows into Postgres and reports, per row, what is stored.
pub async fn write_postgres(
    postgres: &PgPool,
    rows: &[Row<'_>],
) -> Result<Result<Vec<Archived>, SeqCollision>, StoreFailure> {
    if rows.is_empty() {
        return Ok(Ok(Vec::new()));
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut sessions = Vec::with_capacity(rows.len());
    let mut seqs = Vec::with_capacity(rows.len());
    let mut senders = Vec::with_capacity(rows.len());
    let mut client_ids = Vec::with_capacity(rows.len());
    let mut kinds = Vec::with_capacity(rows.len());
    let mut contents = Vec::with_capacity(rows.len());
    let mut created = Vec::with_capacity(rows.len());
    let mut burns = Vec::with_capacity(rows.len());
    for row in rows {
        let message = row.message;
        ids.push(message.message_id.as_uuid());
        sessions.push(message.session.to_string());
        seqs.push(row.seq as i64);
        senders.push(message.sender_id.as_str());
        client_ids.push(message.client_msg_id.as_str());
        kinds.push(message_type_name(message.message_type));
        contents.push(message.content.as_bytes());
        created.push(timestamp(message.timestamp_ms)?);
        burns.push(message.burn_after_seconds.map(|seconds| seconds as i32));
    }
    let inserted: Vec<uuid::Uuid> = sqlx::query_scalar(
        "INSERT INTO messages (message_id, session_id, seq, sender_id, client_msg_id, \
                               message_type, content, created_at, burn_after_seconds) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::text[], $5::text[], \
                              $6::text[], $7::bytea[], $8::timestamptz[], $9::int4[]) \
         ON CONFLICT DO NOTHING RETURNING message_id",
    )
    .bind(&ids)
    .bind(&sessions)
    .bind(&seqs)
    .bind(&senders)
    .bind(&client_ids)
    .bind(&kinds)
    .bind(&contents)
    .bind(&created)
    .bind(&burns)
    .fetch_all(postgres)
    .await?;
    let inserted: HashSet<uuid::Uuid> = inserted.into_iter().collect();
    let conflicted: Vec<usize> = (0..rows.len())
        .filter(|&index| !inserted.contains(&ids[index]))
        .collect();
    let mut outcome = vec![Archived::Stored; rows.len()];
    if conflicted.is_empty() {
        return Ok(Ok(outcome));
    }
    // Rows that were not inserted: a replay (same row), a resend whose dedupe key Redis
    // lost (same sender and client_msg_id, other id), or a seq collision.
    let conflict_senders: Vec<&str> = conflicted.iter().map(|&i| senders[i]).collect();
    let conflict_client_ids: Vec<&str> = conflicted.iter().map(|&i| client_ids[i]).collect();
    let existing: HashMap<(String, String), (uuid::Uuid, i64)> =
        stored_by_client_id(postgres, &conflict_senders, &conflict_client_ids)
            .await?
            .into_iter()
            .map(|(sender, client_msg_id, id, seq)| ((sender, client_msg_id), (id, seq)))
            .collect();
    let mut collisions = Vec::new();
    for index in conflicted {
        let key = (senders[index].to_owned(), client_ids[index].to_owned());
        match existing.get(&key) {
            Some(&(id, seq)) if id == ids[index] && seq == seqs[index] => {}
            Some(&(id, seq)) => {
                outcome[index] = Archived::AlreadyStoredAs {
                    message_id: MessageId::from(id),
                    seq: seq as u64,
                }
            }
            None => collisions.push(index),
        }
    }
    if collisions.is_empty() {
        Ok(Ok(outcome))
    } else {
        Ok(Err(SeqCollision {
            indexes: collisions,
        }))
    }
}

/// Stored (sender, client_msg_id, message_id, seq) of the given (sender, client_msg_id) pairs.
pub async fn stored_by_client_id(
    postgres: &PgPool,
    senders: &[&str],
    client_ids: &[&str],
) -> Result<Vec<(String, String, uuid::Uuid, i64)>, StoreFailure> {
    Ok(sqlx::query_as(
        "SELECT m.sender_id, m.client_msg_id, m.message_id, m.seq FROM messages m \
         JOIN unnest($1::text[], $2::text[]) AS k(sender_id, client_msg_id) \
         USING (sender_id, client_msg_id)",
    )
    .bind(senders)
    .bind(client_ids)
    .fetch_all(postgres)
    .await?)
}

/// Highest stored seq of each session, 0 for none: one index probe per session (a
/// backward scan of (session_id, seq)), not an aggregate over the whole history.
pub async fn max_seqs(
    postgres: &PgPool,
    sessions: &[String],
) -> Result<Vec<(String, i64)>, StoreFailure> {
    let rows: Vec<(String, Option<i64>)> = sqlx::query_as(
        "SELECT s.session_id, \
                (SELECT m.seq FROM messages m WHERE m.session_id = s.session_id \
                 ORDER BY m.seq DESC LIMIT 1) \
         FROM unnest($1::text[]) AS s(session_id)",
    )
    .bind(sessions)
    .fetch_all(postgres)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(session, seq)| (session, seq.unwrap_or(0)))
        .collect())
}

fn timestamp(ms: i64) -> Result<chrono::DateTime<chrono::Utc>, StoreFailure> {
    chrono::DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StoreFailure::Inconsistent(format!("timestamp {ms} out of range")))
}

/// The MongoDB document of a message: `_id` is the message id.
pub fn mongo_document(row: &Row<'_>) -> Document {
    let message = row.message;
    let mut document = doc! {
        "_id": message.message_id.to_string(),
        "session_id": message.session.to_string(),
        "seq": row.seq as i64,
        "sender_id": &message.sender_id,
        "client_msg_id": &message.client_msg_id,
        "message_type": message_type_name(message.message_type),
        "content": &message.content,
        "created_at": bson::DateTime::from_millis(message.timestamp_ms),
        "recalled": false,
    };
    if let Some(seconds) = message.burn_after_seconds {
        document.insert("burn_after_seconds", seconds as i64);
    }
    document
}

/// Indexes the reader's queries and the writer's idempotence rely on.
pub async fn ensure_mongo_indexes(
    collection: &mongodb::Collection<Document>,
) -> Result<(), StoreFailure> {
    use mongodb::IndexModel;
    use mongodb::options::IndexOptions;
    let unique = IndexOptions::builder().unique(true).build();
    collection
        .create_index(
            IndexModel::builder()
                .keys(doc! { "session_id": 1, "seq": 1 })
                .options(unique)
                .build(),
        )
        .await?;
    collection
        .create_index(
            IndexModel::builder()
                .keys(doc! { "sender_id": 1, "client_msg_id": 1 })
                .build(),
        )
        .await?;
    Ok(())
}

/// Inserts the documents, unordered; duplicate keys (a replay) are success, anything else
/// is an error.
pub async fn write_mongo(
    collection: &mongodb::Collection<Document>,
    documents: Vec<Document>,
) -> Result<(), StoreFailure> {
    use mongodb::error::ErrorKind;
    const DUPLICATE_KEY: i32 = 11000;
    if documents.is_empty() {
        return Ok(());
    }
    match collection.insert_many(documents).ordered(false).await {
        Ok(_) => Ok(()),
        Err(error) => match error.kind.as_ref() {
            ErrorKind::InsertMany(failure)
                if failure.write_concern_error.is_none()
                    && failure
                        .write_errors
                        .as_ref()
                        .is_some_and(|errors| errors.iter().all(|e| e.code == DUPLICATE_KEY)) =>
            {
                Ok(())
            }
            _ => Err(error.into()),
        },
    }
}
