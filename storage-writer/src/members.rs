//! Who belongs to a session: the check before a message is stored (step 3) and the list of
//! recipients to deliver to (step 7). Members come from Postgres and are cached in Redis
//! ([`keys::session_members`], a set with a TTL); storage-reader deletes that key when it
//! changes a group's members. A single chat's two members are known from its id; the first
//! message of a single chat also creates its `sessions` and `session_members` rows, so the
//! reader sees the chat like any other session.

use std::collections::HashMap;

use chatify_core::ids::SessionId;
use chatify_core::keys;
use redis::aio::ConnectionManager;
use sqlx::PgPool;

use crate::error::StoreFailure;

/// What the stores know about a session's members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members {
    Known(Vec<String>),
    /// `grp:` id with no `sessions` row.
    UnknownGroup,
}

impl Members {
    pub fn contains(&self, user_id: &str) -> bool {
        match self {
            Self::Known(members) => members.iter().any(|member| member == user_id),
            Self::UnknownGroup => false,
        }
    }
}

/// Members of every session given: one Redis round trip, plus one Postgres round trip per
/// kind of cache miss and one Redis round trip to fill the cache.
pub async fn load(
    redis: &mut ConnectionManager,
    postgres: &PgPool,
    sessions: &[&SessionId],
    cache_ttl_seconds: u64,
) -> Result<HashMap<SessionId, Members>, StoreFailure> {
    let mut found = HashMap::with_capacity(sessions.len());
    if sessions.is_empty() {
        return Ok(found);
    }
    let mut pipe = redis::pipe();
    for session in sessions {
        pipe.smembers(keys::session_members(session));
    }
    let cached: Vec<Vec<String>> = pipe.query_async(redis).await?;
    let mut single_misses = Vec::new();
    let mut group_misses = Vec::new();
    for (session, members) in sessions.iter().zip(cached) {
        if !members.is_empty() {
            found.insert((*session).clone(), Members::Known(members));
        } else if session.is_group() {
            group_misses.push(session.to_string());
        } else {
            single_misses.push(*session);
        }
    }
    let mut fill: Vec<(SessionId, Vec<String>)> = Vec::new();
    if !single_misses.is_empty() {
        fill.extend(create_single_chats(postgres, &single_misses).await?);
    }
    if !group_misses.is_empty() {
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT s.session_id, m.user_id FROM sessions s \
             LEFT JOIN session_members m USING (session_id) \
             WHERE s.session_id = ANY($1)",
        )
        .bind(&group_misses)
        .fetch_all(postgres)
        .await?;
        let mut groups: HashMap<String, Vec<String>> = HashMap::new();
        for (session_id, user_id) in rows {
            let members = groups.entry(session_id).or_default();
            members.extend(user_id);
        }
        for session_id in group_misses {
            let session = SessionId::parse(&session_id)
                .map_err(|error| StoreFailure::Inconsistent(error.to_string()))?;
            match groups.remove(&session_id) {
                Some(members) if !members.is_empty() => fill.push((session, members)),
                // A group row with no member at all cannot be sent to; not cached, so
                // members added later count at once.
                Some(_) => {
                    found.insert(session, Members::Known(Vec::new()));
                }
                None => {
                    found.insert(session, Members::UnknownGroup);
                }
            }
        }
    }
    if !fill.is_empty() {
        let mut pipe = redis::pipe();
        for (session, members) in &fill {
            let key = keys::session_members(session);
            pipe.del(&key)
                .ignore()
                .sadd(&key, members)
                .ignore()
                .expire(&key, cache_ttl_seconds as i64)
                .ignore();
        }
        pipe.query_async::<()>(redis).await?;
    }
    found.extend(
        fill.into_iter()
            .map(|(session, members)| (session, Members::Known(members))),
    );
    Ok(found)
}

/// Creates the `sessions` and `session_members` rows of single chats (idempotent) and
/// returns their members.
async fn create_single_chats(
    postgres: &PgPool,
    sessions: &[&SessionId],
) -> Result<Vec<(SessionId, Vec<String>)>, StoreFailure> {
    let mut session_ids = Vec::with_capacity(sessions.len());
    let mut member_sessions = Vec::with_capacity(sessions.len() * 2);
    let mut member_users = Vec::with_capacity(sessions.len() * 2);
    let mut out = Vec::with_capacity(sessions.len());
    for session in sessions {
        let SessionId::Single { lo, hi } = session else {
            continue;
        };
        let id = session.to_string();
        for user in [lo, hi] {
            member_sessions.push(id.clone());
            member_users.push(user.clone());
        }
        session_ids.push(id);
        out.push(((*session).clone(), vec![lo.clone(), hi.clone()]));
    }
    let mut transaction = postgres.begin().await?;
    sqlx::query(
        "INSERT INTO sessions (session_id, kind) SELECT unnest($1::text[]), 'single' \
         ON CONFLICT DO NOTHING",
    )
    .bind(&session_ids)
    .execute(&mut *transaction)
    .await?;
    sqlx::query(
        "INSERT INTO session_members (session_id, user_id) \
         SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
    )
    .bind(&member_sessions)
    .bind(&member_users)
    .execute(&mut *transaction)
    .await?;
    transaction.commit().await?;
    Ok(out)
}
