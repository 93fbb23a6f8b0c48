//! Reads and per-user writes against the stores, in the writer's layout
//! (`storage-writer/src/cache.rs` for Redis, `migrations/` for Postgres): membership, the
//! Redis hot cache with Postgres behind it, per-user read and clear state.

use bytes::Bytes;
use chatify_core::ids::SessionId;
use chatify_core::keys;
use chatify_proto::Message as _;
use chatify_proto::client::v1::{ChatMessage, MessageType};
use chatify_proto::page::EncodedChatMessage;
use redis::aio::ConnectionManager;
use sqlx::PgPool;

use crate::error::ReaderError;
use crate::hot_redis::{self, HotRedis, Reply};

/// Fails unless `user` is a member of `session` (a group that does not exist is NotFound).
pub async fn require_member(
    postgres: &PgPool,
    session: &SessionId,
    user: &str,
) -> Result<(), ReaderError> {
    if let Some(known) = member_by_id(session, user) {
        return known;
    }
    let (exists, member): (bool, bool) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM sessions WHERE session_id = $1), \
                EXISTS (SELECT 1 FROM session_members WHERE session_id = $1 AND user_id = $2)",
    )
    .bind(session.to_string())
    .bind(user)
    .fetch_one(postgres)
    .await?;
    match (exists, member) {
        (false, _) => Err(ReaderError::NotFound(format!(
            "session {session} does not exist"
        ))),
        (true, false) => Err(not_member(session, user)),
        (true, true) => Ok(()),
    }
}

/// Membership known from the session id alone: a single chat's two members; None for a
/// group.
pub fn member_by_id(session: &SessionId, user: &str) -> Option<Result<(), ReaderError>> {
    let SessionId::Single { lo, hi } = session else {
        return None;
    };
    Some(if user == lo || user == hi {
        Ok(())
    } else {
        Err(not_member(session, user))
    })
}

fn not_member(session: &SessionId, user: &str) -> ReaderError {
    ReaderError::PermissionDenied(format!("{user} is not a member of {session}"))
}

/// Adds the read of a group's members from the writer's members cache
/// ([`keys::session_members`]): `SISMEMBER`, then `SCARD`. Decode with
/// [`cached_membership`].
pub fn add_member_read(pipe: &mut redis::Pipeline, session: &SessionId, user: &str) {
    let key = keys::session_members(session);
    pipe.cmd("SISMEMBER").arg(&key).arg(user);
    pipe.cmd("SCARD").arg(&key);
}

/// Membership from the replies of [`add_member_read`]: None when the cache does not hold
/// the group (the writer never caches an empty set), so ask Postgres ([`require_member`]).
pub fn cached_membership(
    session: &SessionId,
    user: &str,
    is_member: bool,
    members: u64,
) -> Option<Result<(), ReaderError>> {
    match (members, is_member) {
        (0, _) => None,
        (_, true) => Some(Ok(())),
        (_, false) => Some(Err(not_member(session, user))),
    }
}

/// A user's state in one session: read cursor and clear watermark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserState {
    pub read_seq: u64,
    pub cleared_seq: u64,
}

pub async fn user_state(
    postgres: &PgPool,
    redis: &mut ConnectionManager,
    user: &str,
    session: &SessionId,
) -> Result<UserState, ReaderError> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT read_seq, cleared_seq FROM user_session_state WHERE user_id = $1 AND session_id = $2",
    )
    .bind(user)
    .bind(session.to_string())
    .fetch_optional(postgres)
    .await?;
    let (read_seq, cleared_seq) = row.unwrap_or_default();
    // The writer moves a sender's cursor in Redis to its own message: the later of the two.
    let cursor: Option<u64> = redis::cmd("HGET")
        .arg(keys::user_cursors(user))
        .arg(session.to_string())
        .query_async(redis)
        .await?;
    Ok(UserState {
        read_seq: (read_seq as u64).max(cursor.unwrap_or(0)),
        cleared_seq: cleared_seq as u64,
    })
}

/// The session's last seq: Redis session state, else Postgres.
pub async fn last_seq(
    postgres: &PgPool,
    redis: &mut ConnectionManager,
    session: &SessionId,
) -> Result<u64, ReaderError> {
    let cached: Option<u64> = redis::cmd("HGET")
        .arg(keys::session_state(session))
        .arg("last_seq")
        .query_async(redis)
        .await?;
    if let Some(seq) = cached {
        return Ok(seq);
    }
    let (seq,): (Option<i64>,) = sqlx::query_as(
        "SELECT (SELECT seq FROM messages WHERE session_id = $1 ORDER BY seq DESC LIMIT 1)",
    )
    .bind(session.to_string())
    .fetch_one(postgres)
    .await?;
    Ok(seq.unwrap_or(0) as u64)
}

/// Moves the read cursor forward only (atomic under concurrent calls) and returns it.
pub async fn mark_read(
    postgres: &PgPool,
    redis: &mut ConnectionManager,
    user: &str,
    session: &SessionId,
    seq: u64,
) -> Result<u64, ReaderError> {
    let (read_seq,): (i64,) = sqlx::query_as(
        "INSERT INTO user_session_state (user_id, session_id, read_seq) VALUES ($1, $2, $3) \
         ON CONFLICT (user_id, session_id) DO UPDATE \
         SET read_seq = GREATEST(user_session_state.read_seq, EXCLUDED.read_seq), \
             updated_at = now() \
         RETURNING read_seq",
    )
    .bind(user)
    .bind(session.to_string())
    .bind(seq as i64)
    .fetch_one(postgres)
    .await?;
    let forward = redis::Script::new(
        "local read = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') \
         if tonumber(ARGV[2]) > read then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end \
         return tonumber(redis.call('HGET', KEYS[1], ARGV[1]))",
    );
    let cursor: u64 = forward
        .key(keys::user_cursors(user))
        .arg(session.to_string())
        .arg(read_seq)
        .invoke_async(redis)
        .await?;
    Ok(cursor.max(read_seq as u64))
}

/// Bounds of a seq page: exclusive `after` and `before` (0 = none), in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqPage {
    pub after: u64,
    pub before: u64,
    pub backward: bool,
    pub limit: usize,
}

/// Where a page came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Archive,
}

/// Which store serves pages the hot cache cannot (`CHATIFY_READER_ARCHIVE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchiveStore {
    Postgres,
    Mongo,
}

/// A page's messages: built from archive rows, or the hot cache's entries as they are
/// (already-encoded `ChatMessage`s, passed through to the response without decoding).
#[derive(Debug, Clone, PartialEq)]
pub enum PageMessages {
    Decoded(Vec<ChatMessage>),
    Encoded(Vec<EncodedChatMessage>),
}

impl PageMessages {
    pub fn len(&self) -> usize {
        match self {
            Self::Decoded(messages) => messages.len(),
            Self::Encoded(messages) => messages.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a page window is cut by: its entries' seqs.
trait Sequenced {
    fn seq(&self) -> u64;
}

impl Sequenced for ChatMessage {
    fn seq(&self) -> u64 {
        self.seq
    }
}

impl Sequenced for EncodedChatMessage {
    fn seq(&self) -> u64 {
        EncodedChatMessage::seq(self)
    }
}

/// Cuts a window of `limit + 1` to the page: (the visible messages, has_more, the seq of the
/// last message covered). The window is cut before `hidden` seqs are removed, so hiding
/// never ends paging early.
fn cut_window<T: Sequenced>(
    mut window: Vec<T>,
    limit: usize,
    hidden: &[u64],
) -> (Vec<T>, bool, Option<u64>) {
    let has_more = window.len() > limit;
    window.truncate(limit);
    let last_seq = window.last().map(Sequenced::seq);
    window.retain(|message| !hidden.contains(&message.seq()));
    (window, has_more, last_seq)
}

/// One page of a seq query for one user.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Visible messages of the page, in page order (hidden ones for the user removed).
    pub messages: PageMessages,
    /// Whether messages lie beyond this page in its direction.
    pub has_more: bool,
    /// Seq of the last message the page covered, visible or not: the next page's cursor.
    pub last_seq: Option<u64>,
    pub source: Source,
}

/// A page of `page.limit` seqs. The hot cache serves it when it holds every seq the page can
/// reach; otherwise the archive serves all of it (the archive has everything the cache has),
/// so a page never mixes sources and has no gap or duplicate. The window (and so `has_more`
/// and the cursor) is cut before the user's hidden messages are removed, so hiding never
/// ends paging early.
pub async fn seq_page(
    postgres: &PgPool,
    mongo: &mongodb::Collection<mongodb::bson::Document>,
    archive: ArchiveStore,
    hot: &HotRedis,
    hidden: &[u64],
    session: &SessionId,
    page: SeqPage,
) -> Result<Page, ReaderError> {
    let mut pipe = redis::pipe();
    add_window_read(&mut pipe, session, page);
    let mut replies = hot.query(&pipe).await?.into_iter();
    let cached = cached_window(session, page, &mut replies)?;
    page_from(postgres, mongo, archive, session, page, hidden, cached).await
}

/// A pipeline answered fewer replies than it had commands.
pub fn too_few_replies() -> ReaderError {
    ReaderError::Unavailable {
        store: "redis",
        reason: "pipeline answered too few replies".into(),
    }
}

/// Adds the hot-cache reads for `page`, from which [`cached_window`] tells whether the cache
/// serves it. Backward, one read: the newest `limit + 2` entries below `before` with no
/// lower bound, so the entries at or below `after` it may hold say whether the cache reaches
/// down to `after`. Forward, two: the oldest cached entry, then the window (`limit + 1`
/// entries above `after`).
pub fn add_window_read(pipe: &mut redis::Pipeline, session: &SessionId, page: SeqPage) {
    let hot = keys::session_hot_cache(session);
    let upper = if page.before == 0 {
        "+inf".to_owned()
    } else {
        format!("({}", page.before)
    };
    if page.backward {
        pipe.cmd("ZREVRANGEBYSCORE")
            .arg(&hot)
            .arg(&upper)
            .arg("-inf")
            .arg("LIMIT")
            .arg(0)
            .arg(page.limit + 2);
    } else {
        pipe.cmd("ZRANGE").arg(&hot).arg(0).arg(0).arg("WITHSCORES");
        pipe.cmd("ZRANGEBYSCORE")
            .arg(&hot)
            .arg(format!("({}", page.after))
            .arg(&upper)
            .arg("LIMIT")
            .arg(0)
            .arg(page.limit + 1);
    }
}

/// The cached window of `page` (at most `limit + 1` entries, in page order) from the
/// replies of [`add_window_read`] for a page with the same `before` and direction (a
/// backward page's read does not depend on `after`), or None when the hot cache does not
/// hold every seq the page can reach.
pub fn cached_window(
    session: &SessionId,
    page: SeqPage,
    replies: &mut impl Iterator<Item = Reply>,
) -> Result<Option<Vec<EncodedChatMessage>>, ReaderError> {
    let mut next = || replies.next().ok_or_else(too_few_replies);
    if page.backward {
        let newest = index_window(session, next()?.into_bulks()?)?;
        Ok(backward_window(page, newest))
    } else {
        let pair = next()?.into_bulks()?;
        let lowest = match pair.get(1) {
            Some(score) => Some(hot_redis::number(score)? as u64),
            None => None,
        };
        let window = next()?.into_bulks()?;
        // Every seq above `after` is cached.
        if lowest.is_some_and(|lowest| page.after + 1 >= lowest) {
            Ok(Some(index_window(session, window)?))
        } else {
            Ok(None)
        }
    }
}

/// A backward page's window from the newest cached entries below `before`, newest first
/// (`limit + 2` at most, no lower bound): served when the window is a full page, or the
/// cache reaches down to `after` — it holds an entry at or below `after` (then those above
/// it are all here), or it ran out exactly at `after + 1`.
fn backward_window(
    page: SeqPage,
    newest: Vec<EncodedChatMessage>,
) -> Option<Vec<EncodedChatMessage>> {
    let read_all = newest.len() < page.limit + 2;
    let reaches_below = newest.last().is_some_and(|entry| entry.seq() <= page.after);
    let mut window = newest;
    window.retain(|entry| entry.seq() > page.after);
    window.truncate(page.limit + 1);
    let ends_at_after = read_all
        && window
            .last()
            .is_some_and(|entry| entry.seq() == page.after + 1);
    (window.len() == page.limit + 1 || reaches_below || ends_at_after).then_some(window)
}

/// Hot-cache entries checked to be well-formed encoded `ChatMessage`s (the writer's layout,
/// `storage-writer/src/cache.rs`), not decoded: a cached page passes them through.
pub fn index_window(
    session: &SessionId,
    cached: Vec<Bytes>,
) -> Result<Vec<EncodedChatMessage>, ReaderError> {
    cached
        .into_iter()
        .map(|bytes| {
            EncodedChatMessage::new(bytes).map_err(|error| ReaderError::Unavailable {
                store: "redis",
                reason: format!(
                    "undecodable hot-cache entry in {}: {error}",
                    keys::session_hot_cache(session)
                ),
            })
        })
        .collect()
}

/// The page from the cached window when there is one (see [`cached_window`]), else from the
/// archive; the user's `hidden` seqs removed after the window is cut.
pub async fn page_from(
    postgres: &PgPool,
    mongo: &mongodb::Collection<mongodb::bson::Document>,
    archive: ArchiveStore,
    session: &SessionId,
    page: SeqPage,
    hidden: &[u64],
    cached: Option<Vec<EncodedChatMessage>>,
) -> Result<Page, ReaderError> {
    let (label, source) = if cached.is_some() {
        ("cache", Source::Cache)
    } else {
        ("archive", Source::Archive)
    };
    metrics::counter!("chatify_reader_page_source_total", "source" => label).increment(1);
    let (messages, has_more, last_seq) = match cached {
        Some(window) => {
            let (messages, has_more, last_seq) = cut_window(window, page.limit, hidden);
            (PageMessages::Encoded(messages), has_more, last_seq)
        }
        None => {
            let window = match archive {
                ArchiveStore::Postgres => postgres_window(postgres, session, page).await?,
                ArchiveStore::Mongo => mongo_window(mongo, session, page).await?,
            };
            let (messages, has_more, last_seq) = cut_window(window, page.limit, hidden);
            (PageMessages::Decoded(messages), has_more, last_seq)
        }
    };
    Ok(Page {
        messages,
        has_more,
        last_seq,
        source,
    })
}

async fn postgres_window(
    postgres: &PgPool,
    session: &SessionId,
    page: SeqPage,
) -> Result<Vec<ChatMessage>, ReaderError> {
    let order = if page.backward { "DESC" } else { "ASC" };
    let rows: Vec<ArchiveRow> = sqlx::query_as(&format!(
        "SELECT {ARCHIVE_COLUMNS} FROM messages m \
         WHERE m.session_id = $1 AND m.seq > $2 AND ($3 = 0 OR m.seq < $3) \
         ORDER BY m.seq {order} LIMIT $4"
    ))
    .bind(session.to_string())
    .bind(page.after as i64)
    .bind(page.before as i64)
    .bind((page.limit + 1) as i64)
    .fetch_all(postgres)
    .await?;
    Ok(rows.into_iter().map(ArchiveRow::into_message).collect())
}

async fn mongo_window(
    mongo: &mongodb::Collection<mongodb::bson::Document>,
    session: &SessionId,
    page: SeqPage,
) -> Result<Vec<ChatMessage>, ReaderError> {
    use futures::TryStreamExt as _;
    use mongodb::bson::doc;
    let unavailable = |error: mongodb::error::Error| ReaderError::Unavailable {
        store: "mongo",
        reason: error.to_string(),
    };
    let mut seq = doc! { "$gt": page.after as i64 };
    if page.before != 0 {
        seq.insert("$lt", page.before as i64);
    }
    let documents: Vec<mongodb::bson::Document> = mongo
        .find(doc! { "session_id": session.to_string(), "seq": seq })
        .sort(doc! { "seq": if page.backward { -1 } else { 1 } })
        .limit((page.limit + 1) as i64)
        .await
        .map_err(unavailable)?
        .try_collect()
        .await
        .map_err(unavailable)?;
    documents
        .iter()
        .map(|document| mongo_message(document, session))
        .collect()
}

/// A message from its MongoDB document (the writer's layout, `archive::mongo_document`).
fn mongo_message(
    document: &mongodb::bson::Document,
    session: &SessionId,
) -> Result<ChatMessage, ReaderError> {
    let bad = |field: &str| ReaderError::Unavailable {
        store: "mongo",
        reason: format!("message document without a valid {field}"),
    };
    let recalled = document.get_bool("recalled").unwrap_or(false);
    let message_type = message_type_of(document.get_str("message_type").unwrap_or("text"));
    Ok(ChatMessage {
        message_id: document.get_str("_id").map_err(|_| bad("_id"))?.to_owned(),
        session_id: session.to_string(),
        seq: document.get_i64("seq").map_err(|_| bad("seq"))? as u64,
        sender_id: document
            .get_str("sender_id")
            .map_err(|_| bad("sender_id"))?
            .to_owned(),
        message_type: message_type as i32,
        content: if recalled {
            String::new()
        } else {
            document.get_str("content").unwrap_or_default().to_owned()
        },
        timestamp: document
            .get_datetime("created_at")
            .map(|at| at.timestamp_millis())
            .map_err(|_| bad("created_at"))?,
        burn_after_seconds: document
            .get_i64("burn_after_seconds")
            .ok()
            .map(|seconds| seconds as u32),
        recalled,
    })
}

/// Messages of a time range `[start_ms, end_ms)` (end 0: unbounded; archive only), by seq
/// from `after_seq`, without those `user` hid.
pub async fn time_page(
    postgres: &PgPool,
    user: &str,
    session: &SessionId,
    (start_ms, end_ms): (i64, i64),
    after_seq: u64,
    limit: usize,
) -> Result<Vec<ChatMessage>, ReaderError> {
    let rows: Vec<ArchiveRow> = sqlx::query_as(&format!(
        "SELECT {ARCHIVE_COLUMNS} FROM messages m \
         WHERE m.session_id = $1 AND m.created_at >= to_timestamp($2 / 1000.0) \
           AND ($3 = 0 OR m.created_at < to_timestamp($3 / 1000.0)) AND m.seq > $4 \
           AND NOT EXISTS (SELECT 1 FROM message_hides h WHERE h.user_id = $5 \
                           AND h.message_id = m.message_id AND h.hidden_from <= now()) \
         ORDER BY m.seq ASC LIMIT $6"
    ))
    .bind(session.to_string())
    .bind(start_ms as f64)
    .bind(end_ms as f64)
    .bind(after_seq as i64)
    .bind(user)
    .bind((limit + 1) as i64)
    .fetch_all(postgres)
    .await?;
    Ok(rows.into_iter().map(ArchiveRow::into_message).collect())
}

/// One message by id, with whether `user` has hidden it.
pub async fn message_by_id(
    postgres: &PgPool,
    user: &str,
    message_id: uuid::Uuid,
) -> Result<Option<(ChatMessage, bool)>, ReaderError> {
    let row: Option<HiddenRow> = sqlx::query_as(&format!(
        "SELECT {ARCHIVE_COLUMNS}, EXISTS (SELECT 1 FROM message_hides h WHERE h.user_id = $2 \
                AND h.message_id = m.message_id AND h.hidden_from <= now()) AS hidden \
         FROM messages m WHERE m.message_id = $1"
    ))
    .bind(message_id)
    .bind(user)
    .fetch_optional(postgres)
    .await?;
    Ok(row.map(|row| (row.row.into_message(), row.hidden)))
}

/// What a user's page must leave out: the clear watermark and the hidden (deleted for me)
/// seqs in `(after, before)` (`before` 0 = no bound).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageMarks {
    pub cleared_seq: u64,
    pub hidden: Vec<u64>,
}

/// Member of [`keys::user_marks`] present once the set was filled from Postgres.
const MARKS_BUILT: &str = "built";
/// Member of [`keys::user_marks`] scored by the clear watermark.
const MARKS_CLEARED: &str = "cleared";

/// Adds the reads of a user's marks for `(after, before)`: `ZMSCORE key built cleared`, then
/// the members scored in the range. Decode the two replies with [`marks_from`].
pub fn add_marks_read(
    pipe: &mut redis::Pipeline,
    user: &str,
    session: &SessionId,
    after: u64,
    before: u64,
) {
    let key = keys::user_marks(session, user);
    pipe.cmd("ZMSCORE")
        .arg(&key)
        .arg(MARKS_BUILT)
        .arg(MARKS_CLEARED);
    let upper = if before == 0 {
        "+inf".to_owned()
    } else {
        format!("({before}")
    };
    pipe.cmd("ZRANGEBYSCORE")
        .arg(&key)
        .arg(format!("({after}"))
        .arg(upper);
}

/// The marks from the replies of [`add_marks_read`]; None when the set is not built (Redis
/// lost it, or never had it): call [`rebuild_marks`].
pub fn marks_from(scores: &[Option<f64>], members: &[Bytes]) -> Option<PageMarks> {
    let (Some(Some(_built)), Some(cleared)) = (scores.first(), scores.get(1)) else {
        return None;
    };
    Some(PageMarks {
        cleared_seq: cleared.map_or(0, |score| score as u64),
        // `built` and `cleared` may score inside the range: only seqs are hidden messages.
        hidden: members
            .iter()
            .filter_map(|member| std::str::from_utf8(member).ok()?.parse().ok())
            .collect(),
    })
}

/// Fills a user's marks of a session from Postgres (the truth) into Redis and returns those
/// in `(after, before)`. Merges rather than overwrites: marks only grow (a hide is never
/// undone, the watermark only rises), so a rebuild racing a write-through
/// ([`note_hidden`], [`note_cleared`]) ends with both.
pub async fn rebuild_marks(
    postgres: &PgPool,
    redis: &mut ConnectionManager,
    user: &str,
    session: &SessionId,
    (after, before): (u64, u64),
    ttl_seconds: u64,
) -> Result<PageMarks, ReaderError> {
    let (cleared, hidden): (i64, Vec<i64>) = sqlx::query_as(
        "SELECT coalesce((SELECT cleared_seq FROM user_session_state \
                          WHERE user_id = $1 AND session_id = $2), 0), \
                coalesce((SELECT array_agg(seq) FROM message_hides \
                          WHERE user_id = $1 AND session_id = $2 AND hidden_from <= now()), '{}')",
    )
    .bind(user)
    .bind(session.to_string())
    .fetch_one(postgres)
    .await?;
    let key = keys::user_marks(session, user);
    let mut pipe = redis::pipe();
    pipe.cmd("ZADD")
        .arg(&key)
        .arg("GT")
        .arg(cleared)
        .arg(MARKS_CLEARED)
        .ignore();
    if !hidden.is_empty() {
        let mut add = redis::cmd("ZADD");
        add.arg(&key);
        for seq in &hidden {
            add.arg(*seq).arg(*seq);
        }
        pipe.add_command(add).ignore();
    }
    pipe.cmd("ZADD").arg(&key).arg(0).arg(MARKS_BUILT).ignore();
    pipe.cmd("EXPIRE").arg(&key).arg(ttl_seconds).ignore();
    pipe.exec_async(redis).await?;
    metrics::counter!("chatify_reader_marks_rebuilds_total").increment(1);
    Ok(PageMarks {
        cleared_seq: cleared as u64,
        hidden: hidden
            .into_iter()
            .map(|seq| seq as u64)
            .filter(|seq| *seq > after && (before == 0 || *seq < before))
            .collect(),
    })
}

/// Drops a user's marks of a session from Redis. Called before a change to them is written
/// to Postgres, so that if the write-through after it fails, the next read rebuilds from
/// Postgres rather than trusting a stale set.
pub async fn forget_marks(
    redis: &mut ConnectionManager,
    user: &str,
    session: &SessionId,
) -> Result<(), ReaderError> {
    redis::cmd("DEL")
        .arg(keys::user_marks(session, user))
        .exec_async(redis)
        .await?;
    Ok(())
}

/// Write-through of a hidden message (after Postgres has it).
pub async fn note_hidden(
    redis: &mut ConnectionManager,
    user: &str,
    session: &SessionId,
    seq: u64,
    ttl_seconds: u64,
) -> Result<(), ReaderError> {
    let key = keys::user_marks(session, user);
    redis::pipe()
        .cmd("ZADD")
        .arg(&key)
        .arg(seq)
        .arg(seq)
        .ignore()
        .cmd("EXPIRE")
        .arg(&key)
        .arg(ttl_seconds)
        .ignore()
        .exec_async(redis)
        .await?;
    Ok(())
}

/// Write-through of a clear watermark (after Postgres has it); never lowers it.
pub async fn note_cleared(
    redis: &mut ConnectionManager,
    user: &str,
    session: &SessionId,
    cleared_seq: u64,
    ttl_seconds: u64,
) -> Result<(), ReaderError> {
    let key = keys::user_marks(session, user);
    redis::pipe()
        .cmd("ZADD")
        .arg(&key)
        .arg("GT")
        .arg(cleared_seq)
        .arg(MARKS_CLEARED)
        .ignore()
        .cmd("EXPIRE")
        .arg(&key)
        .arg(ttl_seconds)
        .ignore()
        .exec_async(redis)
        .await?;
    Ok(())
}

/// A stored message type (the writer's `record::message_type_name`) as the client enum.
fn message_type_of(name: &str) -> MessageType {
    MessageType::from_str_name(&format!("MESSAGE_TYPE_{}", name.to_ascii_uppercase()))
        .unwrap_or(MessageType::Text)
}

const ARCHIVE_COLUMNS: &str = "m.message_id, m.session_id, m.seq, m.sender_id, m.message_type, \
    m.content, (extract(epoch FROM m.created_at) * 1000)::int8 AS created_ms, \
    m.burn_after_seconds, m.recalled_at IS NOT NULL AS recalled";

#[derive(Debug, sqlx::FromRow)]
struct HiddenRow {
    #[sqlx(flatten)]
    row: ArchiveRow,
    hidden: bool,
}

#[derive(Debug, sqlx::FromRow)]
struct ArchiveRow {
    message_id: uuid::Uuid,
    session_id: String,
    seq: i64,
    sender_id: String,
    message_type: String,
    content: Vec<u8>,
    created_ms: i64,
    burn_after_seconds: Option<i32>,
    recalled: bool,
}

impl ArchiveRow {
    fn into_message(self) -> ChatMessage {
        let message_type = message_type_of(&self.message_type);
        ChatMessage {
            message_id: self.message_id.to_string(),
            session_id: self.session_id,
            seq: self.seq as u64,
            sender_id: self.sender_id,
            message_type: message_type as i32,
            // A recalled message is a tombstone: no content.
            content: if self.recalled {
                String::new()
            } else {
                String::from_utf8_lossy(&self.content).into_owned()
            },
            timestamp: self.created_ms,
            burn_after_seconds: self.burn_after_seconds.map(|seconds| seconds as u32),
            recalled: self.recalled,
        }
    }
}

/// One entry of a user's session list.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionEntry {
    pub session_id: String,
    pub updated_at_ms: i64,
    pub last_seq: u64,
    pub last_message: Option<ChatMessage>,
    pub read_seq: u64,
    pub cleared_seq: u64,
}

/// A page of `user`'s sessions, newest activity first, after `cursor` (`ms:session_id` of
/// the previous page's last entry): one Redis round trip for the list, one for the states,
/// one Postgres query for the read and clear marks. If Redis has lost the list it is rebuilt
/// from Postgres first.
pub async fn session_page(
    postgres: &PgPool,
    redis: &mut ConnectionManager,
    user: &str,
    cursor: Option<(i64, String)>,
    limit: usize,
) -> Result<(Vec<SessionEntry>, bool), ReaderError> {
    let list = keys::user_sessions(user);
    let exists: bool = redis::cmd("EXISTS").arg(&list).query_async(redis).await?;
    if !exists {
        rebuild_session_list(postgres, redis, user).await?;
    }
    // Entries with the cursor's score sort by member in reverse; fetch a little extra to
    // step over them.
    const TIES: usize = 64;
    let upper = cursor
        .as_ref()
        .map(|(ms, _)| ms.to_string())
        .unwrap_or_else(|| "+inf".to_owned());
    let fetched: Vec<(String, f64)> = redis::cmd("ZREVRANGEBYSCORE")
        .arg(&list)
        .arg(&upper)
        .arg("-inf")
        .arg("WITHSCORES")
        .arg("LIMIT")
        .arg(0)
        .arg(limit + 1 + TIES)
        .query_async(redis)
        .await?;
    let mut page: Vec<(String, i64)> = fetched
        .into_iter()
        .map(|(session, score)| (session, score as i64))
        .filter(|(session, ms)| match &cursor {
            Some((at, after)) => *ms < *at || (*ms == *at && session < after),
            None => true,
        })
        .take(limit + 1)
        .collect();
    let has_more = page.len() > limit;
    page.truncate(limit);
    if page.is_empty() {
        return Ok((Vec::new(), false));
    }
    let mut pipe = redis::pipe();
    let mut cursor_fields = redis::cmd("HMGET");
    cursor_fields.arg(keys::user_cursors(user));
    for (session_id, _) in &page {
        let session = SessionId::parse(session_id)
            .map_err(|error| ReaderError::InvalidArgument(error.to_string()))?;
        pipe.cmd("HMGET")
            .arg(keys::session_state(&session))
            .arg("last_seq")
            .arg("last_message");
        cursor_fields.arg(session_id);
    }
    pipe.add_command(cursor_fields);
    let mut replies: Vec<redis::Value> = pipe.query_async(redis).await?;
    let cursors: Vec<Option<u64>> = match replies.pop() {
        Some(value) => redis::from_redis_value(value)?,
        None => Vec::new(),
    };
    let ids: Vec<&str> = page.iter().map(|(session, _)| session.as_str()).collect();
    let marks: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT session_id, read_seq, cleared_seq FROM user_session_state \
         WHERE user_id = $1 AND session_id = ANY($2)",
    )
    .bind(user)
    .bind(&ids)
    .fetch_all(postgres)
    .await?;
    let marks: std::collections::HashMap<String, (u64, u64)> = marks
        .into_iter()
        .map(|(session, read, cleared)| (session, (read as u64, cleared as u64)))
        .collect();
    let mut entries = Vec::with_capacity(page.len());
    for (((session_id, updated_at_ms), state), cursor) in page.into_iter().zip(replies).zip(cursors)
    {
        let (last_seq, last_message): (Option<u64>, Option<Vec<u8>>) =
            redis::from_redis_value(state)?;
        let (read_seq, cleared_seq) = marks.get(&session_id).copied().unwrap_or_default();
        let last_message = last_message
            .and_then(|bytes| ChatMessage::decode(bytes.as_slice()).ok())
            .filter(|message| message.seq > cleared_seq);
        entries.push(SessionEntry {
            session_id,
            updated_at_ms,
            last_seq: last_seq.unwrap_or(0),
            last_message,
            read_seq: read_seq.max(cursor.unwrap_or(0)),
            cleared_seq,
        });
    }
    Ok((entries, has_more))
}

/// Rebuilds a user's session list from Postgres (Redis lost it): every session the user is
/// a member of, scored by its last message time (or when the user joined).
async fn rebuild_session_list(
    postgres: &PgPool,
    redis: &mut ConnectionManager,
    user: &str,
) -> Result<(), ReaderError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT sm.session_id, (extract(epoch FROM coalesce(last.created_at, sm.joined_at)) \
                * 1000)::int8 \
         FROM session_members sm \
         LEFT JOIN LATERAL (SELECT created_at FROM messages m \
                            WHERE m.session_id = sm.session_id \
                            ORDER BY m.seq DESC LIMIT 1) last ON true \
         WHERE sm.user_id = $1",
    )
    .bind(user)
    .fetch_all(postgres)
    .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut add = redis::cmd("ZADD");
    add.arg(keys::user_sessions(user)).arg("GT");
    for (session, ms) in &rows {
        add.arg(*ms).arg(session);
    }
    add.exec_async(redis).await?;
    metrics::counter!("chatify_reader_session_list_rebuilds_total").increment(1);
    Ok(())
}

/// What a recall needs to know about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecallTarget {
    pub session_id: String,
    pub seq: u64,
    pub sender_id: String,
    pub created_ms: i64,
    pub recalled: bool,
}

pub async fn recall_target(
    postgres: &PgPool,
    message_id: uuid::Uuid,
) -> Result<Option<RecallTarget>, ReaderError> {
    let row: Option<(String, i64, String, i64, bool)> = sqlx::query_as(
        "SELECT session_id, seq, sender_id, (extract(epoch FROM created_at) * 1000)::int8, \
                recalled_at IS NOT NULL FROM messages WHERE message_id = $1",
    )
    .bind(message_id)
    .fetch_optional(postgres)
    .await?;
    Ok(row.map(
        |(session_id, seq, sender_id, created_ms, recalled)| RecallTarget {
            session_id,
            seq: seq as u64,
            sender_id,
            created_ms,
            recalled,
        },
    ))
}

/// The caller's role in a group (None: not a member).
pub async fn group_role(
    postgres: &PgPool,
    session: &SessionId,
    user: &str,
) -> Result<Option<String>, ReaderError> {
    let role: Option<(String,)> =
        sqlx::query_as("SELECT role FROM session_members WHERE session_id = $1 AND user_id = $2")
            .bind(session.to_string())
            .bind(user)
            .fetch_optional(postgres)
            .await?;
    Ok(role.map(|(role,)| role))
}

/// Turns a message into a tombstone everywhere it is kept: Postgres (content purged,
/// recalled_at / recalled_by set), MongoDB, and the hot cache and session state when they
/// hold it. Idempotent.
pub async fn tombstone(
    postgres: &PgPool,
    mongo: &mongodb::Collection<mongodb::bson::Document>,
    redis: &mut ConnectionManager,
    message_id: uuid::Uuid,
    by: &str,
) -> Result<(), ReaderError> {
    use mongodb::bson::doc;
    let row: Option<ArchiveRow> = sqlx::query_as(&format!(
        "WITH updated AS ( \
           UPDATE messages SET recalled_at = coalesce(recalled_at, now()), \
                  recalled_by = coalesce(recalled_by, $2), content = ''::bytea \
           WHERE message_id = $1 RETURNING *) \
         SELECT {} FROM updated m",
        ARCHIVE_COLUMNS
    ))
    .bind(message_id)
    .bind(by)
    .fetch_optional(postgres)
    .await?;
    let Some(row) = row else {
        return Err(ReaderError::NotFound(format!(
            "message {message_id} does not exist"
        )));
    };
    mongo
        .update_one(
            doc! { "_id": message_id.to_string() },
            doc! { "$set": { "recalled": true, "content": "", "recalled_by": by } },
        )
        .await
        .map_err(|error| ReaderError::Unavailable {
            store: "mongo",
            reason: error.to_string(),
        })?;
    let message = row.into_message();
    let session = SessionId::parse(&message.session_id)
        .map_err(|error| ReaderError::InvalidArgument(error.to_string()))?;
    replace_cached(redis, &session, &message).await
}

/// Replaces a message's hot-cache entry and the session's `last_message` with `message`,
/// only where they hold that seq (the cache stays a contiguous suffix of the session).
pub async fn replace_cached(
    redis: &mut ConnectionManager,
    session: &SessionId,
    message: &ChatMessage,
) -> Result<(), ReaderError> {
    let replace = redis::Script::new(
        "if redis.call('ZCOUNT', KEYS[1], ARGV[1], ARGV[1]) > 0 then \
           redis.call('ZREMRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1]) \
           redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2]) end \
         if redis.call('HGET', KEYS[2], 'last_seq') == ARGV[1] then \
           redis.call('HSET', KEYS[2], 'last_message', ARGV[2]) end \
         return 0",
    );
    replace
        .key(keys::session_hot_cache(session))
        .key(keys::session_state(session))
        .arg(message.seq)
        .arg(message.encode_to_vec())
        .invoke_async::<i64>(redis)
        .await?;
    Ok(())
}

/// Starts the burn timers of the messages a read covers: burn-after-read messages in
/// `(after, upto]` sent by someone else, whose timer has not started.
pub async fn start_burn_timers(
    postgres: &PgPool,
    session: &SessionId,
    reader: &str,
    after: u64,
    upto: u64,
) -> Result<u64, ReaderError> {
    let started = sqlx::query(
        "UPDATE messages SET burn_due_at = now() + make_interval(secs => burn_after_seconds) \
         WHERE session_id = $1 AND seq > $2 AND seq <= $3 AND burn_after_seconds IS NOT NULL \
           AND sender_id <> $4 AND burn_due_at IS NULL",
    )
    .bind(session.to_string())
    .bind(after as i64)
    .bind(upto as i64)
    .bind(reader)
    .execute(postgres)
    .await?
    .rows_affected();
    Ok(started)
}

/// Most messages one sweep burns.
pub const BURN_SWEEP_BATCH: i64 = 500;

/// Purges the content of every message whose burn timer ran out: MongoDB and the hot cache
/// first, then Postgres, in one Postgres transaction holding the rows, so a failure leaves
/// them due for the next sweep. Returns how many were burned.
pub async fn burn_due(
    postgres: &PgPool,
    mongo: &mongodb::Collection<mongodb::bson::Document>,
    redis: &mut ConnectionManager,
) -> Result<usize, ReaderError> {
    use mongodb::bson::doc;
    let mut transaction = postgres.begin().await?;
    let rows: Vec<ArchiveRow> = sqlx::query_as(&format!(
        "SELECT {ARCHIVE_COLUMNS} FROM messages m \
         WHERE m.burn_due_at <= now() AND m.burned_at IS NULL \
         ORDER BY m.burn_due_at LIMIT $1 FOR UPDATE SKIP LOCKED"
    ))
    .bind(BURN_SWEEP_BATCH)
    .fetch_all(&mut *transaction)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let ids: Vec<uuid::Uuid> = rows.iter().map(|row| row.message_id).collect();
    let id_strings: Vec<String> = ids.iter().map(uuid::Uuid::to_string).collect();
    mongo
        .update_many(
            doc! { "_id": { "$in": &id_strings } },
            doc! { "$set": { "content": "", "burned": true } },
        )
        .await
        .map_err(|error| ReaderError::Unavailable {
            store: "mongo",
            reason: error.to_string(),
        })?;
    for row in rows {
        let mut message = row.into_message();
        message.content.clear();
        let session = SessionId::parse(&message.session_id)
            .map_err(|error| ReaderError::InvalidArgument(error.to_string()))?;
        replace_cached(redis, &session, &message).await?;
    }
    sqlx::query(
        "UPDATE messages SET content = ''::bytea, burned_at = now() WHERE message_id = ANY($1)",
    )
    .bind(&ids)
    .execute(&mut *transaction)
    .await?;
    transaction.commit().await?;
    metrics::counter!("chatify_reader_messages_burned_total").increment(ids.len() as u64);
    Ok(ids.len())
}

/// Runs [`burn_due`] every `interval` until `shutdown`.
pub async fn burn_sweeper(
    postgres: PgPool,
    mongo: mongodb::Collection<mongodb::bson::Document>,
    mut redis: ConnectionManager,
    interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match burn_due(&postgres, &mongo, &mut redis).await {
            Ok(0) => {}
            Ok(burned) => tracing::debug!(burned, "burn-after-read sweep"),
            Err(error) => tracing::warn!(%error, "burn-after-read sweep failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_type_names_map_to_the_client_enum() {
        assert_eq!(message_type_of("image"), MessageType::Image);
        assert_eq!(message_type_of("indicator"), MessageType::Indicator);
        assert_eq!(message_type_of("text"), MessageType::Text);
        assert_eq!(message_type_of("???"), MessageType::Text);
    }

    fn entries(seqs: impl IntoIterator<Item = u64>) -> Vec<EncodedChatMessage> {
        seqs.into_iter()
            .map(|seq| {
                let message = ChatMessage {
                    seq,
                    content: format!("m{seq}"),
                    ..ChatMessage::default()
                };
                EncodedChatMessage::new(message.encode_to_vec()).expect("well-formed")
            })
            .collect()
    }

    fn seqs(window: Option<Vec<EncodedChatMessage>>) -> Option<Vec<u64>> {
        window.map(|window| window.iter().map(EncodedChatMessage::seq).collect())
    }

    fn backward(after: u64, limit: usize) -> SeqPage {
        SeqPage {
            after,
            before: 0,
            backward: true,
            limit,
        }
    }

    #[test]
    fn a_backward_page_is_cached_when_full_or_when_the_cache_reaches_after() {
        // A full page (limit + 1 above `after`) whatever lies below.
        assert_eq!(
            seqs(backward_window(
                backward(0, 3),
                entries([90, 89, 88, 87, 86])
            )),
            Some(vec![90, 89, 88, 87])
        );
        // An entry at or below `after`: everything above it is cached.
        assert_eq!(
            seqs(backward_window(
                backward(88, 3),
                entries([90, 89, 88, 87, 86])
            )),
            Some(vec![90, 89])
        );
        // The cache ran out exactly at after + 1.
        assert_eq!(
            seqs(backward_window(backward(88, 3), entries([90, 89]))),
            Some(vec![90, 89])
        );
        assert_eq!(
            seqs(backward_window(backward(0, 50), entries([2, 1]))),
            Some(vec![2, 1])
        );
        // The cache ran out above after + 1: older seqs live only in the archive.
        assert_eq!(
            seqs(backward_window(backward(0, 50), entries([9, 8]))),
            None
        );
        assert_eq!(seqs(backward_window(backward(5, 3), entries([9, 8]))), None);
        // Nothing cached below `before`.
        assert_eq!(seqs(backward_window(backward(0, 3), Vec::new())), None);
        // Read to its bottom, but the bottom is not after + 1 (a gap: 6 is not cached).
        assert_eq!(seqs(backward_window(backward(5, 3), entries([9, 7]))), None);
    }
}
