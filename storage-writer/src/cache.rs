//! Steps 4 and 6: what Redis keeps for fast reads, written after the durable stores have
//! the batch (so the cache never shows a message the archive does not hold). The layout is
//! the contract with storage-reader:
//!
//! - hot cache [`keys::session_hot_cache`]: sorted set, score = seq, member = protobuf
//!   `chatify.client.v1.ChatMessage`; the newest `hot_cache_messages` kept, TTL refreshed
//!   on every write. A replay writes the same member again (idempotent).
//! - session state [`keys::session_state`]: hash `last_seq`, `last_message_id`,
//!   `updated_at` (ms), `last_message` (protobuf `ChatMessage`); only moves forward.
//! - read cursors [`keys::user_cursors`]: hash session id -> seq; a sender has read its own
//!   message, so its cursor moves to that seq; only moves forward.
//! - a user's sessions [`keys::user_sessions`]: sorted set of session ids scored by the
//!   last activity in ms (`ZADD GT`), for every member.

use std::collections::BTreeMap;

use chatify_core::ids::SessionId;
use chatify_core::keys;
use chatify_proto::Message as _;
use chatify_proto::client::v1::ChatMessage;
use redis::aio::ConnectionManager;

use crate::error::StoreFailure;
use crate::record::Incoming;

/// A message as stored, ready for the cache and for delivery.
#[derive(Debug, Clone)]
pub struct StoredMessage<'a> {
    pub message: &'a Incoming,
    pub seq: u64,
}

impl StoredMessage<'_> {
    /// The client-facing message (the `deliver` payload and the hot-cache member).
    pub fn chat_message(&self) -> ChatMessage {
        let message = self.message;
        ChatMessage {
            message_id: message.message_id.to_string(),
            session_id: message.session.to_string(),
            seq: self.seq,
            sender_id: message.sender_id.clone(),
            message_type: message.message_type as i32,
            content: message.content.clone(),
            timestamp: message.timestamp_ms,
            burn_after_seconds: message.burn_after_seconds,
            recalled: false,
        }
    }
}

const FORWARD_ONLY: &str = r"
-- ARGV[1] = n session states; KEYS[1..n] = state hashes with ARGV quadruples from 2:
--   seq, message_id, updated_at, last_message
-- KEYS[n+1..] = cursor hashes with ARGV pairs after those: session_id, seq
local n = tonumber(ARGV[1])
for i = 1, n do
  local base = 2 + (i - 1) * 4
  local seq = tonumber(ARGV[base])
  local last = tonumber(redis.call('HGET', KEYS[i], 'last_seq') or '0')
  if seq > last then
    redis.call('HSET', KEYS[i], 'last_seq', ARGV[base], 'last_message_id', ARGV[base + 1],
      'updated_at', ARGV[base + 2], 'last_message', ARGV[base + 3])
  end
end
local cursor_base = 2 + n * 4
for j = n + 1, #KEYS do
  local at = cursor_base + (j - n - 1) * 2
  local seq = tonumber(ARGV[at + 1])
  local read = tonumber(redis.call('HGET', KEYS[j], ARGV[at]) or '0')
  if seq > read then
    redis.call('HSET', KEYS[j], ARGV[at], ARGV[at + 1])
  end
end
return 0
";

/// Cache settings.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    pub hot_cache_messages: usize,
    pub hot_cache_ttl_seconds: u64,
}

/// Writes the hot cache, session states, sender cursors and members' session lists for a
/// batch of stored messages: two round trips.
pub async fn write(
    redis: &mut ConnectionManager,
    stored: &[StoredMessage<'_>],
    members: &BTreeMap<&SessionId, &[String]>,
    limits: CacheLimits,
) -> Result<(), StoreFailure> {
    if stored.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    // Last message of each session in this batch, and the highest seq per (sender, session).
    let mut last: BTreeMap<&SessionId, (&StoredMessage<'_>, Vec<u8>)> = BTreeMap::new();
    let mut cursors: BTreeMap<(&str, &SessionId), u64> = BTreeMap::new();
    for entry in stored {
        let session = &entry.message.session;
        let encoded = entry.chat_message().encode_to_vec();
        pipe.zadd(keys::session_hot_cache(session), &encoded, entry.seq)
            .ignore();
        let newer = last
            .get(session)
            .is_none_or(|(previous, _)| previous.seq < entry.seq);
        if newer {
            last.insert(session, (entry, encoded));
        }
        let cursor = cursors
            .entry((entry.message.sender_id.as_str(), session))
            .or_default();
        *cursor = (*cursor).max(entry.seq);
    }
    let keep = limits.hot_cache_messages as isize;
    for (session, (entry, _)) in &last {
        let hot = keys::session_hot_cache(session);
        pipe.zremrangebyrank(&hot, 0, -(keep + 1))
            .ignore()
            .expire(&hot, limits.hot_cache_ttl_seconds as i64)
            .ignore();
        let updated_at = entry.message.timestamp_ms;
        let session_id = session.to_string();
        for member in members.get(session).copied().unwrap_or_default() {
            pipe.cmd("ZADD")
                .arg(keys::user_sessions(member))
                .arg("GT")
                .arg(updated_at)
                .arg(&session_id)
                .ignore();
        }
    }
    pipe.query_async::<()>(redis).await?;

    let script = redis::Script::new(FORWARD_ONLY);
    let mut invocation = script.prepare_invoke();
    invocation.arg(last.len());
    for (session, (entry, encoded)) in &last {
        invocation
            .key(keys::session_state(session))
            .arg(entry.seq)
            .arg(entry.message.message_id.to_string())
            .arg(entry.message.timestamp_ms)
            .arg(encoded.as_slice());
    }
    for ((sender, session), seq) in &cursors {
        invocation
            .key(keys::user_cursors(sender))
            .arg(session.to_string())
            .arg(*seq);
    }
    invocation.invoke_async::<i64>(redis).await?;
    Ok(())
}
