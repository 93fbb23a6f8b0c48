//! Steps 1–2: dedupe and per-session seq, in one atomic Redis script per batch.
//!
//! For each message the script reads the dedupe key of (sender, client_msg_id). If it is
//! set, its value `message_id|seq` is the answer: the same message id means a replay of
//! this very record (finish it with that seq), another id means a client resend (answer
//! with the original ack, store nothing). If it is not set, the session's counter is
//! `INCR`ed and the key is set to `message_id|seq` with the dedupe TTL. Key and seq are
//! therefore written together and never assigned twice, and nothing here marks a message
//! as done: only the committed offset does, after the stores have it.
//!
//! A missing counter means Redis lost its data (or the session is new): the script then
//! answers "reseed" instead of counting from 1, and the counter is seeded from Postgres'
//! `max(seq)`, with the dedupe keys of messages Postgres already holds restored, so seq
//! never goes backwards or repeats and a stored message keeps its id and seq.

use std::collections::{BTreeSet, HashMap};

use chatify_core::ids::{MessageId, SessionId};
use chatify_core::keys;
use redis::aio::ConnectionManager;
use sqlx::PgPool;

use crate::archive;
use crate::error::StoreFailure;
use crate::record::Incoming;

/// What step 1–2 decided for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assigned {
    /// Store it with this seq (a replay gets the seq it was first given).
    Fresh { seq: u64 },
    /// A resend of a message already stored (or being stored) under this id and seq.
    Duplicate { message_id: MessageId, seq: u64 },
}

const ASSIGN: &str = r"
-- KEYS[2i-1] = dedupe key, KEYS[2i] = seq counter of message i
-- ARGV[1] = dedupe ttl seconds, ARGV[i+1] = message id of message i
local out = {}
for i = 1, #KEYS / 2 do
  local dedupe, counter = KEYS[2 * i - 1], KEYS[2 * i]
  local value = redis.call('GET', dedupe)
  if value then
    out[i] = value
  elseif redis.call('EXISTS', counter) == 0 then
    out[i] = 'R'
  else
    value = ARGV[i + 1] .. '|' .. redis.call('INCR', counter)
    redis.call('SET', dedupe, value, 'EX', ARGV[1])
    out[i] = value
  end
end
return out
";

/// Assigns every message a seq or recognises it as a resend: one script call per batch
/// (plus a Postgres read and a second call for sessions whose counter was missing).
pub async fn assign(
    redis: &mut ConnectionManager,
    postgres: &PgPool,
    messages: &[&Incoming],
    dedupe_ttl_seconds: u64,
) -> Result<Vec<Assigned>, StoreFailure> {
    let script = redis::Script::new(ASSIGN);
    let mut assigned: Vec<Option<Assigned>> = vec![None; messages.len()];
    let mut pending: Vec<usize> = (0..messages.len()).collect();
    // Two rounds suffice: the second runs after the counters were seeded.
    for _round in 0..2 {
        if pending.is_empty() {
            break;
        }
        let mut invocation = script.prepare_invoke();
        invocation.arg(dedupe_ttl_seconds);
        for &index in &pending {
            let message = messages[index];
            invocation
                .key(keys::dedupe(&message.sender_id, &message.client_msg_id))
                .key(keys::session_seq(&message.session))
                .arg(message.message_id.to_string());
        }
        let replies: Vec<String> = invocation.invoke_async(redis).await?;
        let mut reseed = Vec::new();
        for (&index, reply) in pending.iter().zip(&replies) {
            if reply == "R" {
                reseed.push(index);
                continue;
            }
            let (message_id, seq) = parse_value(reply)?;
            assigned[index] = Some(if message_id == messages[index].message_id {
                Assigned::Fresh { seq }
            } else {
                Assigned::Duplicate { message_id, seq }
            });
        }
        if !reseed.is_empty() {
            let to_seed: Vec<&Incoming> = reseed.iter().map(|&index| messages[index]).collect();
            reseed_from_postgres(redis, postgres, &to_seed, dedupe_ttl_seconds).await?;
        }
        pending = reseed;
    }
    assigned
        .into_iter()
        .map(|slot| {
            slot.ok_or_else(|| {
                StoreFailure::Inconsistent("seq counter still missing after reseeding".into())
            })
        })
        .collect()
}

fn parse_value(value: &str) -> Result<(MessageId, u64), StoreFailure> {
    let bad = || StoreFailure::Inconsistent(format!("malformed dedupe value {value:?}"));
    let (message_id, seq) = value.split_once('|').ok_or_else(bad)?;
    Ok((
        MessageId::parse(message_id).map_err(|_| bad())?,
        seq.parse().map_err(|_| bad())?,
    ))
}

/// Seeds the counters of these messages' sessions from Postgres (`SET NX`: a counter that
/// reappeared meanwhile wins) and restores the dedupe keys of those already stored.
async fn reseed_from_postgres(
    redis: &mut ConnectionManager,
    postgres: &PgPool,
    messages: &[&Incoming],
    dedupe_ttl_seconds: u64,
) -> Result<(), StoreFailure> {
    let sessions: Vec<String> = messages
        .iter()
        .map(|message| message.session.to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let maxima = archive::max_seqs(postgres, &sessions).await?;
    let senders: Vec<&str> = messages.iter().map(|m| m.sender_id.as_str()).collect();
    let client_ids: Vec<&str> = messages.iter().map(|m| m.client_msg_id.as_str()).collect();
    let stored = archive::stored_by_client_id(postgres, &senders, &client_ids).await?;
    let mut pipe = redis::pipe();
    let mut seeded: HashMap<String, i64> = HashMap::new();
    for (session_id, max_seq) in maxima {
        let session = SessionId::parse(&session_id)
            .map_err(|error| StoreFailure::Inconsistent(error.to_string()))?;
        pipe.cmd("SET")
            .arg(keys::session_seq(&session))
            .arg(max_seq)
            .arg("NX")
            .ignore();
        seeded.insert(session_id, max_seq);
    }
    for (sender_id, client_msg_id, message_id, seq) in &stored {
        pipe.cmd("SET")
            .arg(keys::dedupe(sender_id, client_msg_id))
            .arg(format!("{message_id}|{seq}"))
            .arg("NX")
            .arg("EX")
            .arg(dedupe_ttl_seconds)
            .ignore();
    }
    pipe.query_async::<()>(redis).await?;
    // A counter missing for a session with stored messages means Redis lost data.
    seeded.retain(|_, max_seq| *max_seq > 0);
    if !seeded.is_empty() {
        tracing::warn!(
            sessions = ?seeded,
            restored_dedupe_keys = stored.len(),
            "seq counters were missing for sessions with history: reseeded from postgres"
        );
        metrics::counter!("chatify_writer_seq_reseeds_total").increment(seeded.len() as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedupe_values_parse() {
        let id = MessageId::derive("a", "b", 1_700_000_000_000);
        assert_eq!(parse_value(&format!("{id}|42")).expect("valid"), (id, 42));
        assert!(parse_value("nope").is_err());
        assert!(parse_value(&format!("{id}|x")).is_err());
    }
}
